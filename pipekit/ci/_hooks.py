"""Hooks that report a run's events: to a terminal, to any HTTP endpoint, to Slack.

A hook is an async callable the core awaits with every event of a run
(``pipeline.with_hooks(...)``, ``execute(hooks=[...])``, the engine). The core
bounds each call by ``hook_timeout`` and logs and counts a hook that raises
(``response.hook_failures``); a hook never breaks a run. The hooks here add
two things on top: choosing which events they act on (``on=``), and, for the
HTTP ones, bounded retries of a failed delivery.
"""

from __future__ import annotations

import enum
import math
import sys
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from types import TracebackType
from typing import Any, Final, Self, TextIO

import anyio
import attrs
import httpx
import structlog
import tenacity as _t

from pipekit import _events as ev
from pipekit._errors import PipekitError
from pipekit._status import Status
from pipekit._version import __version__
from pipekit.ci._events import OutputLine

__all__ = [
    "HookDeliveryError",
    "HookStatistics",
    "HttpHook",
    "PrintHook",
    "SlackHook",
    "event_matches",
    "event_names",
    "event_to_dict",
]

_log = structlog.get_logger("pipekit")

SleepFunction = Callable[[float], Awaitable[Any]]

#: Names ``on=`` accepts besides event kinds: a finished run, by its status.
_FINISHED_BY_STATUS: Final = {
    f"pipeline_{status.value}": status
    for status in (Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT, Status.CANCELLED)
}
#: What `SlackHook` posts by default: the end of a run, whatever its status.
_RUN_ENDS: Final = tuple(_FINISHED_BY_STATUS)
#: Seconds closing an HTTP client may take (shielded from cancellation).
_CLOSE_TIMEOUT = 5.0
#: Nesting depth past which a value is not turned into plain JSON (it is repr'ed).
_MAX_DEPTH = 32
#: Exceptions chained below an error in `event_to_dict` (``cause`` of ``cause`` ...).
_MAX_CAUSES = 4
#: Characters of a failed response's body quoted in `HookDeliveryError`.
_BODY_EXCERPT = 200
#: Characters of an error summary in a Slack message (a section holds 3000).
_SLACK_ERROR_CHARS = 2800


# -- choosing events ---------------------------------------------------------------


def event_names() -> frozenset[str]:
    """Every name an ``on=`` selection accepts.

    These are the ``kind`` of every [`Event`][pipekit.Event] subclass defined
    so far (pipekit's, ``output_line``, and your own event classes once
    imported), plus ``pipeline_succeeded``, ``pipeline_failed``,
    ``pipeline_timed_out`` and ``pipeline_cancelled``: a ``pipeline_finished``
    event with that status.

    Returns:
        The names.
    """
    kinds: set[str] = set()
    pending: list[type[ev.Event]] = [ev.Event]
    while pending:
        for sub in pending.pop().__subclasses__():
            kinds.add(sub.kind)
            pending.append(sub)
    return frozenset(kinds | _FINISHED_BY_STATUS.keys())


def event_matches(event: ev.Event, on: Collection[str] | None) -> bool:
    """Whether ``event`` is one of those an ``on=`` selection names.

    Args:
        event: The event.
        on: Event names (see `event_names`), or None for every event except
            ``output_line`` (one per line a command prints: select it by name).

    Returns:
        True if ``event.kind`` is in ``on``, or ``event`` is a finished run
        whose derived name (``pipeline_failed``, ...) is.
    """
    if on is None:
        return event.kind != OutputLine.kind
    if event.kind in on:
        return True
    return isinstance(event, ev.PipelineFinished) and f"pipeline_{event.status.value}" in on


def _selection(on: str | Iterable[str] | None, owner: str) -> frozenset[str] | None:
    """Check an ``on=`` argument: None, one name or several, each a known name."""
    if on is None:
        return None
    names = (on,) if isinstance(on, str) else tuple(on)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{owner} on= takes event names (strings), got {name!r}")
    if not names:
        raise ValueError(f"{owner} on= names no events; pass on=None for every event")
    known = event_names()
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(
            f"{owner} on= has unknown event name(s) {', '.join(map(repr, unknown))}; "
            f"valid names: {', '.join(sorted(known))}"
        )
    return frozenset(names)


# -- events as JSON ------------------------------------------------------------------


class _NotPlainError(Exception):
    """A value that JSON cannot carry as it is."""


def _plain(value: Any, depth: int) -> Any:
    """``value`` as plain JSON data (lists, str-keyed dicts, finite numbers), or raise `_NotPlainError`."""
    if isinstance(value, enum.Enum):
        return _plain(value.value, depth + 1)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        raise _NotPlainError
    if depth >= _MAX_DEPTH:
        raise _NotPlainError
    if isinstance(value, list | tuple):
        return [_plain(item, depth + 1) for item in value]
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise _NotPlainError
        return {key: _plain(item, depth + 1) for key, item in value.items()}
    raise _NotPlainError


def _error_dict(error: BaseException, depth: int = 0) -> dict[str, Any]:
    cause = error.__cause__
    return {
        "type": type(error).__name__,
        "message": str(error),
        "cause": None if cause is None or depth >= _MAX_CAUSES else _error_dict(cause, depth + 1),
    }


def _to_json(value: Any) -> Any:
    if isinstance(value, BaseException):
        return _error_dict(value)
    try:
        return _plain(value, 0)
    except _NotPlainError:
        return repr(value)


def event_to_dict(event: ev.Event) -> dict[str, Any]:
    """An event as a JSON-ready dict, as `HttpHook` posts it.

    The keys are ``kind``, ``request_id``, ``pipeline``, ``timestamp``,
    ``stage``, ``attempt`` and ``error``, then the event class's own fields
    (``status``, ``duration``, ``output``, ...). An error becomes
    ``{"type": "StageFailedError", "message": ..., "cause": ...}`` (``cause``:
    the same for its ``__cause__``, or None); a status becomes its value;
    tuples become lists. Any value JSON cannot carry as it is (an object, a
    dict with non-string keys, ``nan``) becomes its ``repr()``, so a stage's
    ``output`` is kept only when it is plain data.

    Args:
        event: The event.

    Returns:
        A new dict of JSON types only.
    """
    data: dict[str, Any] = {"kind": event.kind}
    for field in attrs.fields(type(event)):
        value = getattr(event, field.name)
        data[field.name] = None if value is None else _to_json(value)
    return data


# -- human-readable lines ----------------------------------------------------------


def _seconds(duration: float) -> str:
    if duration < 60:
        return f"{duration:.2f}s"
    minutes, seconds = divmod(duration, 60)
    return f"{int(minutes)}m{seconds:04.1f}s"


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] + " ..." if len(lines) > 1 else (lines[0] if lines else "")


def _short_error(error: BaseException) -> str:
    """``Type: message`` on one line (just ``Type`` without a message)."""
    message = _one_line(str(error))
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _error_text(error: BaseException) -> str:
    """``Type: message``, with its direct cause unless the message quotes it already, on one line."""
    text = _short_error(error)
    if error.__cause__ is not None:
        cause = _short_error(error.__cause__)
        if cause not in text:
            text += f" (caused by {cause})"
    return text


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


_FINISHED_WORDS: Final = {
    Status.SUCCEEDED: "succeeded",
    Status.FAILED: "FAILED",
    Status.TIMED_OUT: "TIMED OUT",
    Status.CANCELLED: "CANCELLED",
}


def _describe(event: ev.Event) -> str:
    """The event in words, without the ``[pipeline]`` prefix."""
    stage = event.stage or "?"
    error = f": {_error_text(event.error)}" if event.error is not None else ""
    match event:
        case OutputLine():
            return f"{stage} {'|' if event.stream == 'stdout' else '!'} {event.line}"
        case ev.PipelineStarted():
            return "started" + (f" (in {event.parent})" if event.parent else "")
        case ev.StageStarted():
            return f"{stage} started"
        case ev.StageRetrying():
            return f"{stage} attempt {event.attempt} failed{error}; retrying in {_seconds(event.delay)}"
        case ev.StageSucceeded():
            if event.restored:
                return f"{stage} restored from an earlier run"
            retried = f" (attempt {event.attempt})" if event.attempt > 1 else ""
            return f"{stage} succeeded in {_seconds(event.duration)}{retried}"
        case ev.StageFailed():
            verb = "timed out" if event.status is Status.TIMED_OUT else "failed"
            return f"{stage} {verb} after {_plural(event.attempt, 'attempt')} in {_seconds(event.duration)}{error}"
        case ev.StageCancelled():
            return f"{stage} cancelled" + (f": {event.reason}" if event.reason else "")
        case ev.StageSkipped():
            return f"{stage} skipped" + (f": {event.reason}" if event.reason else "")
        case ev.RollbackStarted():
            return f"rolling back {', '.join(event.stages) or 'nothing'}"
        case ev.StageRolledBack():
            return f"{stage} rolled back"
        case ev.StageRollbackFailed():
            return f"{stage} rollback failed{error}"
        case ev.RollbackFinished():
            return f"rollback finished: {event.rolled_back} rolled back, {event.failed} failed"
        case ev.PipelineFinished():
            word = _FINISHED_WORDS.get(event.status, event.status.value.upper())
            return f"{word} in {_seconds(event.duration)}{error}"
        case _:
            return event.kind + (f" {event.stage}" if event.stage else "") + error


class PrintHook:
    """Writes one human-readable line per selected event.

    For example ``[release] build succeeded in 1.20s (attempt 2)``,
    ``[release] test | collected 12 items`` (a command's output line; ``!``
    instead of ``|`` for its standard error) and
    ``[release] FAILED in 3.10s: StageFailedError: ...``. Each line is
    flushed as it is written.

    Args:
        file: Where to write; ``sys.stdout`` (looked up at each call) by default.
        on: The event names to print (see `event_names`); None prints every
            event except command output lines.

    Raises:
        ValueError: ``on`` names an unknown event.
    """

    def __init__(self, file: TextIO | None = None, *, on: str | Iterable[str] | None = None) -> None:
        self.file = file
        self.on = _selection(on, "PrintHook")

    def format(self, event: ev.Event) -> str:
        """The line printed for ``event`` (without its line ending); override to change it.

        Args:
            event: The event.

        Returns:
            One line, starting with ``[pipeline name]``.
        """
        return f"[{event.pipeline}] {_describe(event)}"

    async def __call__(self, event: ev.Event) -> None:
        """Print ``event`` if it is selected."""
        if not event_matches(event, self.on):
            return
        out = sys.stdout if self.file is None else self.file
        out.write(self.format(event) + "\n")
        out.flush()

    def __repr__(self) -> str:
        on = None if self.on is None else sorted(self.on)
        return f"PrintHook(file={self.file!r}, on={on!r})"


# -- HTTP ----------------------------------------------------------------------------


class HookDeliveryError(PipekitError):
    """An HTTP hook could not deliver an event, after its retries if the failure was transient.

    Raised by [`HttpHook`][pipekit.ci.HttpHook] and [`SlackHook`][pipekit.ci.SlackHook]
    to the core, which logs and counts it (``response.hook_failures``): it
    never fails the run. The last transport error, if any, is ``__cause__``.

    Args:
        message: What happened, in one line.
        url: The endpoint, with credentials, query and (for Slack) the
            secret path left out.
        attempts: How many requests were made.
        status: The last response's HTTP status, or None if none came.
    """

    def __init__(self, message: str, *, url: str, attempts: int, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.attempts = attempts
        self.status = status


@attrs.frozen(kw_only=True)
class HookStatistics:
    """What an HTTP hook has done so far.

    Attributes:
        delivered: Events delivered (a 2xx response).
        failed: Events given up on (each one a `HookDeliveryError`).
        retried: Requests repeated after a transient failure.
    """

    delivered: int
    failed: int
    retried: int


class _BadStatusError(Exception):
    """A response that was not 2xx (internal: becomes a `HookDeliveryError`)."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        body = _one_line(response.text)
        if len(body) > _BODY_EXCERPT:
            body = body[:_BODY_EXCERPT] + "..."
        reason = f"HTTP {self.status} {response.reason_phrase}".rstrip()
        super().__init__(f"{reason} ({body})" if body else reason)
        self.retry_after = _retry_after(response.headers.get("retry-after"))


def _retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (the date form is ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _is_transient(error: BaseException) -> bool:
    """Whether another request might succeed: network trouble, timeouts, 5xx and 429."""
    if isinstance(error, _BadStatusError):
        return error.status >= 500 or error.status == httpx.codes.TOO_MANY_REQUESTS
    return isinstance(error, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError)


def _check_number(owner: str, name: str, value: float, *, positive: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{owner} {name}= must be a finite number {bound}, got {value!r}")
    return float(value)


class HttpHook:
    """POSTs each selected event as JSON to a URL, retrying transient failures.

    The body is [`event_to_dict(event)`][pipekit.ci.event_to_dict] (override
    `payload` to send something else). A connection error, a timeout, a 5xx or
    a 429 response is retried up to ``attempts`` requests in all, waiting
    ``backoff`` seconds, then twice as long each time, at most ``max_backoff``
    (a 429's ``Retry-After`` is honoured up to that bound). Any other non-2xx
    response is not retried. When it gives up, the hook raises
    [`HookDeliveryError`][pipekit.ci.HookDeliveryError]: the core logs and counts
    it, and the run goes on.

    Use it as an async context manager to reuse one connection pool for every
    event; used without one, each event gets its own short-lived client.
    Header values (tokens) never appear in its repr or in its errors. Keep
    ``attempts * timeout`` plus the back-off under the run's ``hook_timeout``
    (30 s by default): a hook that overruns it is not called again in that run.

    Args:
        url: The ``http://`` or ``https://`` endpoint.
        headers: Extra request headers (``Authorization``, say).
        timeout: Seconds each request may wait to connect, and then for each
            read and write (httpx's timeout).
        on: The event names to post (see `event_names`); None posts every
            event except command output lines.
        attempts: Requests per event at most, the first included.
        backoff: Seconds before the first retry.
        max_backoff: Upper bound of any one wait.
        sleep: Awaited with each wait (``anyio.sleep``); inject a recording
            fake in tests so they never really wait.

    Attributes:
        url: The endpoint.
        display_url: The endpoint as the hook shows it (in its repr, logs and
            errors): without credentials and query.
        on: The selected event names (None: all but command output lines).

    Raises:
        ValueError: The URL is not http(s), ``on`` names an unknown event, or
            a number is out of range.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        on: str | Iterable[str] | None = None,
        attempts: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        sleep: SleepFunction = anyio.sleep,
    ) -> None:
        owner = type(self).__name__
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ValueError(f"{owner} needs an http:// or https:// URL: {exc}") from None
        if parsed.scheme not in ("http", "https"):
            got = f"a {parsed.scheme}: URL" if parsed.scheme else "no scheme"
            raise ValueError(f"{owner} needs an http:// or https:// URL, got {got}")
        if not parsed.host:
            raise ValueError(f"{owner} needs a URL with a host, got none")
        if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
            raise ValueError(f"{owner} attempts= must be an integer >= 1, got {attempts!r}")
        self.url = url
        self.display_url = self._shown(parsed)
        self.on = _selection(on, owner)
        self.timeout = _check_number(owner, "timeout", timeout, positive=True)
        self.attempts = attempts
        self.backoff = _check_number(owner, "backoff", backoff)
        self.max_backoff = _check_number(owner, "max_backoff", max_backoff)
        self._headers = httpx.Headers({"User-Agent": f"pipekit/{__version__}", **(headers or {})})
        self._header_names = tuple(headers or ())
        self._sleep = sleep
        self._client: httpx.AsyncClient | None = None
        self._delivered = self._failed = self._retried = 0

    @staticmethod
    def _shown(url: httpx.URL) -> str:
        """``url`` as it may be shown: without credentials, query or fragment."""
        shown = str(url.copy_with(userinfo=b"", query=None, fragment=None))
        return shown + ("?..." if url.query else "")

    # -- what and when ---------------------------------------------------------

    def selects(self, event: ev.Event) -> bool:
        """Whether ``event`` is posted; override to narrow the selection further.

        Args:
            event: The event.

        Returns:
            True if the ``on`` selection matches it.
        """
        return event_matches(event, self.on)

    def payload(self, event: ev.Event) -> Any:
        """The JSON body posted for ``event``; override to send another shape.

        Args:
            event: The event.

        Returns:
            [`event_to_dict(event)`][pipekit.ci.event_to_dict].
        """
        return event_to_dict(event)

    def statistics(self) -> HookStatistics:
        """How many events were delivered and given up on, and how many requests were retried.

        Returns:
            A snapshot of the counters.
        """
        return HookStatistics(delivered=self._delivered, failed=self._failed, retried=self._retried)

    async def __call__(self, event: ev.Event) -> None:
        """Post ``event`` if it is selected.

        Raises:
            HookDeliveryError: Every attempt failed, or the endpoint refused it.
        """
        if not self.selects(event):
            return
        try:
            body = self.payload(event)
            if self._client is not None:
                await self._deliver(self._client, event.kind, body)
            else:
                client = self._new_client()
                try:
                    await self._deliver(client, event.kind, body)
                finally:
                    await self._close(client)
        except Exception:
            self._failed += 1
            raise
        self._delivered += 1

    # -- delivery --------------------------------------------------------------

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(headers=self._headers, timeout=self.timeout)

    @staticmethod
    async def _close(client: httpx.AsyncClient) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT):
            await client.aclose()

    def _wait(self, state: _t.RetryCallState) -> float:
        """Seconds before the next request: exponential, or the server's ``Retry-After``; capped."""
        delay = self.backoff * 2.0 ** min(state.attempt_number - 1, 64)
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, _BadStatusError) and error.retry_after is not None:
            delay = max(delay, error.retry_after)
        return min(delay, self.max_backoff)

    async def _deliver(self, client: httpx.AsyncClient, kind: str, body: Any) -> None:
        async def retry_scheduled(state: _t.RetryCallState) -> None:
            assert state.outcome is not None
            assert state.next_action is not None
            self._retried += 1
            _log.warning(
                "pipekit.hook.retry_scheduled",
                hook=type(self).__name__,
                url=self.display_url,
                event_kind=kind,
                attempt=state.attempt_number,
                delay=state.next_action.sleep,
                error=str(state.outcome.exception()),
            )

        retrying = _t.AsyncRetrying(
            stop=_t.stop_after_attempt(self.attempts),
            wait=self._wait,
            retry=_t.retry_if_exception(_is_transient),
            sleep=self._sleep,
            before_sleep=retry_scheduled,
            reraise=True,
        )
        made = 0
        try:
            async for manager in retrying:
                state = manager.retry_state
                made = state.attempt_number
                try:
                    response = await client.post(self.url, json=body)
                    if not response.is_success:
                        raise _BadStatusError(response)
                except Exception as exc:
                    state.set_exception((type(exc), exc, exc.__traceback__))
                else:
                    state.set_result(None)
        except _BadStatusError as exc:
            raise self._error(kind, made, str(exc), exc.status) from None
        except httpx.HTTPError as exc:
            raise self._error(kind, made, _short_error(exc), None) from exc

    def _error(self, kind: str, attempts: int, problem: str, status: int | None) -> HookDeliveryError:
        return HookDeliveryError(
            f"{type(self).__name__} could not deliver a {kind} event to {self.display_url} "
            f"({_plural(attempts, 'attempt')}): {problem}",
            url=self.display_url,
            attempts=attempts,
            status=status,
        )

    # -- resource --------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._client is not None:
            raise RuntimeError(f"{type(self).__name__} is already open")
        self._client = self._new_client()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool opened by ``async with`` (shielded, bounded); a no-op otherwise."""
        client, self._client = self._client, None
        if client is not None:
            await self._close(client)

    def __repr__(self) -> str:
        on = None if self.on is None else sorted(self.on)
        return f"{type(self).__name__}({self.display_url!r}, headers={list(self._header_names)!r}, on={on!r})"


# -- Slack ---------------------------------------------------------------------------

_SLACK_EMOJI: Final = {
    Status.SUCCEEDED: ":white_check_mark:",
    Status.FAILED: ":x:",
    Status.TIMED_OUT: ":hourglass:",
    Status.CANCELLED: ":no_entry_sign:",
}
_SLACK_VERBS: Final = {
    Status.SUCCEEDED: "succeeded",
    Status.FAILED: "failed",
    Status.TIMED_OUT: "timed out",
    Status.CANCELLED: "was cancelled",
}
_SLACK_EVENT_EMOJI: Final = {
    ev.StageFailed.kind: ":x:",
    ev.StageRollbackFailed.kind: ":x:",
    ev.StageRetrying.kind: ":repeat:",
    ev.StageSucceeded.kind: ":white_check_mark:",
    ev.StageCancelled.kind: ":no_entry_sign:",
}


def _slack_escape(text: str) -> str:
    """Escape the three characters Slack's message formatting treats as control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _mrkdwn(text: str) -> dict[str, str]:
    return {"type": "mrkdwn", "text": text}


class SlackHook(HttpHook):
    """Posts a Slack message to an incoming webhook when a run finishes.

    The message says which pipeline finished, how (with an emoji), how long
    it took and, if it failed, why. Only runs a caller started are reported,
    not the pipelines nested in them. Delivery is [`HttpHook`][pipekit.ci.HttpHook]'s,
    retries included; the webhook URL (a secret) is shown as its host only.

    Args:
        webhook_url: The Slack incoming-webhook URL.
        on: The event names to post; by default a run's end, whatever its
            status. Other events are posted as a one-line message.
        timeout: Seconds each request may wait to connect, read or write.
        attempts: Requests per event at most, the first included.
        backoff: Seconds before the first retry.
        max_backoff: Upper bound of any one wait.
        sleep: Awaited with each wait (``anyio.sleep``), for tests.

    Raises:
        ValueError: The URL is not http(s), or ``on`` names an unknown event.
    """

    def __init__(
        self,
        webhook_url: str,
        *,
        on: str | Iterable[str] | None = _RUN_ENDS,
        timeout: float = 5.0,
        attempts: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        sleep: SleepFunction = anyio.sleep,
    ) -> None:
        super().__init__(
            webhook_url,
            on=on,
            timeout=timeout,
            attempts=attempts,
            backoff=backoff,
            max_backoff=max_backoff,
            sleep=sleep,
        )

    @staticmethod
    def _shown(url: httpx.URL) -> str:
        """The webhook's path is its secret: show the host only."""
        return f"{url.scheme}://{url.netloc.decode('ascii')}/..."

    def selects(self, event: ev.Event) -> bool:
        """Whether ``event`` is posted: it is selected by ``on`` and not from a nested run.

        Args:
            event: The event.

        Returns:
            True to post it.
        """
        return getattr(event, "parent", None) is None and super().selects(event)

    def payload(self, event: ev.Event) -> dict[str, Any]:
        """The Slack message for ``event``: a ``text`` fallback and ``blocks``.

        Args:
            event: The event.

        Returns:
            The incoming-webhook payload.
        """
        name = _slack_escape(event.pipeline)
        if isinstance(event, ev.PipelineFinished):
            emoji = _SLACK_EMOJI.get(event.status, ":grey_question:")
            verb = _SLACK_VERBS.get(event.status, event.status.value)
            took = _seconds(event.duration)
            text = f"{emoji} Pipeline {name} {verb} in {took}"
            blocks: list[dict[str, Any]] = [
                {"type": "section", "text": _mrkdwn(f"{emoji} Pipeline *{name}* {verb} in {took}")},
                {
                    "type": "section",
                    "fields": [
                        _mrkdwn(f"*Pipeline*\n{name}"),
                        _mrkdwn(f"*Status*\n{event.status.value}"),
                        _mrkdwn(f"*Duration*\n{took}"),
                        _mrkdwn(f"*Request*\n`{_slack_escape(event.request_id)}`"),
                    ],
                },
            ]
            if event.error is not None:
                summary = _error_text(event.error)
                if len(summary) > _SLACK_ERROR_CHARS:
                    summary = summary[:_SLACK_ERROR_CHARS] + "..."
                blocks.insert(1, {"type": "section", "text": _mrkdwn(f"```{_slack_escape(summary)}```")})
        else:
            emoji = _SLACK_EVENT_EMOJI.get(event.kind, ":information_source:")
            text = f"{emoji} [{name}] {_slack_escape(_describe(event))}"
            blocks = [
                {"type": "section", "text": _mrkdwn(text)},
                {"type": "context", "elements": [_mrkdwn(f"request `{_slack_escape(event.request_id)}`")]},
            ]
        return {"text": text, "blocks": blocks}
