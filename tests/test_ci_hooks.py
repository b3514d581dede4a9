"""Tests for pipekit.ci's hooks: event selection, events as JSON, PrintHook, HttpHook and SlackHook.

The HTTP hooks post to a real HTTP/1.1 server on 127.0.0.1 that the tests
start (`HookServer`): it records every request and can be told to fail the
next ones (a status, a hang past the client's timeout, or closing the
connection without answering).
"""

from __future__ import annotations

import io
import json
import math
import socket
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self

import anyio
import anyio.lowlevel
import attrs
import httpx
import pytest

import pipekit as pk
from pipekit.ci import (
    HookDeliveryError,
    HookStatistics,
    HttpHook,
    PrintHook,
    SlackHook,
    event_matches,
    event_names,
    event_to_dict,
)
from pipekit.ci._events import OutputLine
from pipekit.testing import MockStage, capture_logs

HOST = "127.0.0.1"
#: Seconds a hanging request waits (it is released sooner when the server stops).
HANG_SECONDS = 10.0
SECRET = "Bearer s3cr3t-t0ken"
SLACK_PATH = "/services/T000/B000/XXXXSECRETXXXX"
NO_RETRY = pk.RetryPolicy(max_attempts=1)

# -- the server --------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Received:
    """One request as the server got it.

    Attributes:
        method: The HTTP method.
        path: The request path.
        headers: The headers, names lower-cased.
        body: The JSON-decoded body.
        client_port: The client's port (the same for requests on one connection).
    """

    method: str
    path: str
    headers: Mapping[str, str]
    body: Any
    client_port: int


class _Server(ThreadingHTTPServer):
    hook_server: HookServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is observable
    server: _Server

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        received = Received(
            method="POST",
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=json.loads(raw),
            client_port=self.client_address[1],
        )
        mode = self.server.hook_server.record(received)
        if mode == "close":
            self.close_connection = True  # no answer at all
            return
        if mode == "hang":
            self.server.hook_server.released.wait(HANG_SECONDS)
            self.close_connection = True
            return
        status, _, retry_after = mode.partition(":")
        body = b"ok" if status == "200" else b"no_service"
        self.send_response(int(status))
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if retry_after:
            self.send_header("Retry-After", retry_after)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Keep the test output quiet."""


class HookServer:
    """A real HTTP server on a free port of 127.0.0.1, in a thread, recording every POST.

    Each request answers 200 unless `fail_next` planned otherwise: a status
    (``"500"``, ``"429:7"`` with ``Retry-After: 7``), ``"hang"`` (no answer
    until the server stops) or ``"close"`` (the connection is closed unanswered).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._plan: deque[str] = deque()
        self.released = threading.Event()
        self._server = _Server((HOST, 0), _Handler)
        self._server.hook_server = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hook-server", daemon=True
        )

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.released.set()
        self._server.shutdown()
        self._thread.join(timeout=5)
        self._server.server_close()

    @property
    def url(self) -> str:
        """The URL of the ``/hook`` endpoint."""
        return f"http://{HOST}:{self._server.server_address[1]}/hook"

    def url_for(self, path: str) -> str:
        """The URL of another path on this server."""
        return f"http://{HOST}:{self._server.server_address[1]}{path}"

    def fail_next(self, *modes: str) -> None:
        """Answer the next requests with ``modes``, one each, in order."""
        with self._lock:
            self._plan.extend(modes)

    def record(self, received: Received) -> str:
        """Keep one request; return how to answer it (called from the server's threads)."""
        with self._lock:
            self._received.append(received)
            return self._plan.popleft() if self._plan else "200"

    @property
    def received(self) -> list[Received]:
        """Every request so far, in arrival order."""
        with self._lock:
            return list(self._received)

    def bodies(self) -> list[Any]:
        """The JSON bodies received so far."""
        return [r.body for r in self.received]


@pytest.fixture
def server() -> Iterator[HookServer]:
    """A started `HookServer`, stopped after the test."""
    with HookServer() as started:
        yield started


@pytest.fixture
def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    return f"http://{HOST}:{port}/hook"


class Sleeps:
    """An injectable sleep that records the delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await anyio.lowlevel.checkpoint()


class Recorder:
    """A hook that keeps every event."""

    def __init__(self) -> None:
        self.events: list[pk.Event] = []

    async def __call__(self, event: pk.Event) -> None:
        self.events.append(event)


def two_stages(name: str = "release") -> pk.Pipeline:
    """``build`` then ``test``, both succeeding."""
    return pk.Pipeline(name).add_stage(MockStage("build", output={"image": "shop:1"})).add_stage(MockStage("test"))


def failing(name: str = "release") -> pk.Pipeline:
    """``build`` succeeds, ``test`` fails (no retries): a FAILED run with a rollback."""
    return (
        pk.Pipeline(name)
        .add_stage(MockStage("build", output="image"))
        .add_stage(MockStage("test", error=RuntimeError("3 tests failed")), retry=NO_RETRY)
    )


def make(cls: type[pk.Event], **fields: Any) -> pk.Event:
    """An event of ``cls`` with the common fields filled in."""
    return cls(request_id="r-1", pipeline="release", timestamp=1700000000.5, **fields)


def finished(status: pk.Status, **fields: Any) -> pk.PipelineFinished:
    """A PipelineFinished with ``status``."""
    return pk.PipelineFinished(request_id="r-1", pipeline="release", timestamp=1.0, status=status, **fields)


# -- selection ---------------------------------------------------------------------


class CustomEvent(pk.Event):
    """An event class a user defined."""

    kind: ClassVar[str] = "deploy_approved"


CORE_KINDS = {
    "pipeline_started",
    "stage_started",
    "stage_retrying",
    "stage_succeeded",
    "stage_failed",
    "stage_cancelled",
    "stage_skipped",
    "rollback_started",
    "stage_rolled_back",
    "stage_rollback_failed",
    "rollback_finished",
    "pipeline_finished",
}
DERIVED = {"pipeline_succeeded", "pipeline_failed", "pipeline_timed_out", "pipeline_cancelled"}


class TestEventSelection:
    """``event_names``, ``event_matches`` and the ``on=`` argument."""

    def test_names_cover_core_ci_and_derived_names(self) -> None:
        """Every core kind, ``output_line``, the per-status run ends and user event kinds are names."""
        names = event_names()
        assert names >= CORE_KINDS | DERIVED | {"output_line", "deploy_approved"}

    def test_default_selects_everything_but_output_lines(self) -> None:
        """``on=None`` matches every event except command output lines."""
        assert event_matches(make(pk.StageStarted, stage="build"), None)
        assert event_matches(finished(pk.Status.FAILED), None)
        assert event_matches(make(CustomEvent), None)
        assert not event_matches(make(OutputLine, stage="test", line="ok"), None)
        assert event_matches(make(OutputLine, stage="test", line="ok"), {"output_line"})

    @pytest.mark.parametrize(
        ("status", "name"),
        [
            (pk.Status.SUCCEEDED, "pipeline_succeeded"),
            (pk.Status.FAILED, "pipeline_failed"),
            (pk.Status.TIMED_OUT, "pipeline_timed_out"),
            (pk.Status.CANCELLED, "pipeline_cancelled"),
        ],
    )
    def test_derived_names_match_a_finished_run_by_status(self, status: pk.Status, name: str) -> None:
        """``pipeline_<status>`` matches only a run that ended so; ``pipeline_finished`` matches all."""
        event = finished(status)
        assert event_matches(event, {name})
        assert event_matches(event, {"pipeline_finished"})
        assert not event_matches(event, DERIVED - {name})
        assert not event_matches(make(pk.PipelineStarted), {name})

    def test_custom_event_is_matched_by_kind(self) -> None:
        """A user's event class is selected by its kind."""
        hook = PrintHook(io.StringIO(), on=["deploy_approved"])
        assert hook.on == frozenset({"deploy_approved"})
        assert event_matches(make(CustomEvent), hook.on)
        assert not event_matches(make(pk.StageStarted, stage="a"), hook.on)

    def test_unknown_name_is_a_one_line_error_listing_valid_names(self) -> None:
        """A misspelt name fails at construction, naming it and the valid names."""
        with pytest.raises(ValueError, match="unknown event name") as info:
            HttpHook("http://127.0.0.1/hook", on=("pipline_failed", "stage_failed"))
        message = str(info.value)
        assert "\n" not in message
        assert "'pipline_failed'" in message
        assert "'stage_failed'" not in message
        assert "valid names: " in message
        assert all(name in message for name in CORE_KINDS | DERIVED | {"output_line"})

    def test_single_string_and_empty_selection(self) -> None:
        """One name may be given as a string; an empty selection and non-strings are errors."""
        assert PrintHook(on="stage_failed").on == frozenset({"stage_failed"})
        with pytest.raises(ValueError, match="names no events"):
            PrintHook(on=())
        with pytest.raises(TypeError, match="takes event names"):
            PrintHook(on=[pk.StageFailed])  # type: ignore[list-item]


# -- events as JSON ------------------------------------------------------------------

COMMON = {"request_id": "r-1", "pipeline": "release", "timestamp": 1700000000.5}


class Opaque:
    """An output JSON cannot carry."""

    def __repr__(self) -> str:
        return "<Opaque>"


class TestEventToDict:
    """``event_to_dict``."""

    @pytest.mark.parametrize(
        ("event", "extra"),
        [
            (make(pk.PipelineStarted, request_type="release", input={"v": 1}), {
                "request_type": "release", "parent": None, "input": {"v": 1},
            }),
            (make(pk.StageStarted, stage="build", attempt=1), {}),
            (make(pk.StageRetrying, stage="build", attempt=1, delay=0.5), {"delay": 0.5}),
            (make(pk.StageSucceeded, stage="build", attempt=2, duration=1.5, output={"tags": ("a", "b")}), {
                "duration": 1.5, "output": {"tags": ["a", "b"]},
            }),
            (make(pk.StageFailed, stage="build", status=pk.Status.TIMED_OUT, duration=2.0), {
                "status": "timed_out", "duration": 2.0,
            }),
            (make(pk.StageCancelled, stage="build", reason="the run was cancelled"), {
                "status": "cancelled", "reason": "the run was cancelled",
            }),
            (make(pk.StageSkipped, stage="deploy", reason="condition is false"), {"reason": "condition is false"}),
            (make(pk.RollbackStarted, stages=("build", "push")), {"stages": ["build", "push"]}),
            (make(pk.StageRolledBack, stage="push"), {}),
            (make(pk.StageRollbackFailed, stage="push"), {}),
            (make(pk.RollbackFinished, rolled_back=1, failed=1), {"rolled_back": 1, "failed": 1}),
            (finished(pk.Status.SUCCEEDED, duration=3.25, parent="outer"), {
                "status": "succeeded", "duration": 3.25, "parent": "outer",
            }),
            (make(OutputLine, stage="test", stream="stderr", line="warning: x"), {
                "stream": "stderr", "line": "warning: x",
            }),
            (make(CustomEvent), {}),
        ],
        ids=lambda value: getattr(value, "kind", ""),
    )  # fmt: skip
    def test_each_event_type(self, event: pk.Event, extra: dict[str, Any]) -> None:
        """Every event becomes its kind, the common fields and its own fields, in JSON types."""
        data = event_to_dict(event)
        common = {
            "kind": event.kind,
            "request_id": "r-1",
            "pipeline": "release",
            "timestamp": event.timestamp,
            "stage": event.stage,
            "attempt": event.attempt,
            "error": None,
        }
        expected = {**common, **extra}
        assert {key: data[key] for key in expected} == expected
        assert list(data) == ["kind", *(field.name for field in attrs.fields(type(event)))]
        assert list(data)[:7] == list(common)
        assert json.loads(json.dumps(data, allow_nan=False)) == data

    def test_error_becomes_type_message_and_cause(self) -> None:
        """An error is its class name and message, with its ``__cause__`` rendered the same way."""
        try:
            try:
                raise KeyError("image")
            except KeyError as exc:
                raise pk.StageFailedError("build", attempts=3) from exc
        except pk.StageFailedError as exc:
            error = exc
        data = event_to_dict(finished(pk.Status.FAILED, error=error))
        assert data["error"] == {
            "type": "StageFailedError",
            "message": "stage 'build' failed after 3 attempts",
            "cause": {"type": "KeyError", "message": "'image'", "cause": None},
        }

    def test_unserialisable_output_becomes_its_repr(self) -> None:
        """An output JSON cannot carry as it is (an object, non-string keys, nan) is its repr."""
        for output, expected in [
            (Opaque(), "<Opaque>"),
            ({1: "a"}, "{1: 'a'}"),
            ([1.0, math.nan], "[1.0, nan]"),
            ({"ok": [Opaque()]}, "{'ok': [<Opaque>]}"),
            ({"fine": [1, "two", None, True, 2.5]}, {"fine": [1, "two", None, True, 2.5]}),
        ]:
            data = event_to_dict(make(pk.StageSucceeded, stage="build", output=output))
            assert data["output"] == expected
            json.dumps(data, allow_nan=False)

    def test_self_referencing_output_does_not_recurse_forever(self) -> None:
        """A cyclic output is cut off and repr'ed rather than recursing without end."""
        loop: list[Any] = []
        loop.append(loop)
        data = event_to_dict(make(pk.StageSucceeded, stage="build", output=loop))
        assert data["output"] == "[[...]]"

    async def test_every_event_of_a_real_run_is_json(self) -> None:
        """The events of a failing, rolled-back run all convert to JSON."""
        recorder = Recorder()
        with anyio.fail_after(5):
            response = await failing().with_hooks(recorder).execute(input={"version": "1.2"})
        assert response.status is pk.Status.FAILED
        dumped = [json.loads(json.dumps(event_to_dict(e), allow_nan=False)) for e in recorder.events]
        assert [d["kind"] for d in dumped] == [e.kind for e in recorder.events]
        assert dumped[-1]["error"]["type"] == "StageFailedError"
        assert dumped[-1]["error"]["cause"] == {"type": "RuntimeError", "message": "3 tests failed", "cause": None}


# -- PrintHook -----------------------------------------------------------------------


class TestPrintHook:
    """``PrintHook``."""

    async def test_prints_a_successful_run_with_a_retry(self) -> None:
        """One line per event; a retried stage says which attempt succeeded."""
        out = io.StringIO()
        policy = pk.RetryPolicy(max_attempts=2, initial_delay=0, jitter=0)
        pipeline = (
            pk.Pipeline("release")
            .add_stage(MockStage("build", fail_times=1, error=RuntimeError("registry down")), retry=policy)
            .add_stage(MockStage("test"))
        )
        with anyio.fail_after(5), capture_logs():
            response = await pipeline.execute(hooks=[PrintHook(out)])
        assert response.status is pk.Status.SUCCEEDED
        lines = [line.replace(f"{_duration(line)}", "T") for line in out.getvalue().splitlines()]
        assert lines == [
            "[release] started",
            "[release] build started",
            "[release] build attempt 1 failed: RuntimeError: registry down; retrying in T",
            "[release] build succeeded in T (attempt 2)",
            "[release] test started",
            "[release] test succeeded in T",
            "[release] succeeded in T",
        ]

    async def test_says_a_restored_stage_did_not_run(self) -> None:
        """A stage restored from an earlier run (retry --from-failed) is printed as restored, not succeeded."""
        out = io.StringIO()
        options = pk.RequestOptions(restore={"build": "wheel"})
        pipeline = pk.Pipeline("release").add_stage(MockStage("build")).add_stage(MockStage("test"))
        with anyio.fail_after(5), capture_logs():
            await pipeline.execute(pk.PipelineRequest(options=options), hooks=[PrintHook(out)])
        assert out.getvalue().splitlines()[1] == "[release] build restored from an earlier run"

    async def test_prints_a_failing_run(self) -> None:
        """A failure, the rollback and the run's end with its error are each one line."""
        out = io.StringIO()
        with anyio.fail_after(5), capture_logs():
            response = await failing().execute(hooks=[PrintHook(out)])
        assert response.status is pk.Status.FAILED
        lines = [line.replace(f"{_duration(line)}", "T") for line in out.getvalue().splitlines()]
        assert lines[-5:] == [
            "[release] test failed after 1 attempt in T: RuntimeError: 3 tests failed",
            "[release] rolling back build",
            "[release] build rolled back",
            "[release] rollback finished: 1 rolled back, 0 failed",
            "[release] FAILED in T: StageFailedError: stage 'test' failed after 1 attempt: "
            "RuntimeError: 3 tests failed",
        ]

    @pytest.mark.parametrize(
        ("event", "line"),
        [
            (make(OutputLine, stage="test", line="collected 12 items"), "[release] test | collected 12 items"),
            (make(OutputLine, stage="test", stream="stderr", line="warn"), "[release] test ! warn"),
            (make(pk.PipelineStarted, parent="outer"), "[release] started (in outer)"),
            (make(pk.StageFailed, stage="t", attempt=2, status=pk.Status.TIMED_OUT, duration=61.5),
             "[release] t timed out after 2 attempts in 1m01.5s"),
            (make(pk.StageCancelled, stage="t", reason="stage 'x' failed"), "[release] t cancelled: stage 'x' failed"),
            (make(pk.StageSkipped, stage="t", reason="condition is false"), "[release] t skipped: condition is false"),
            (make(pk.StageRollbackFailed, stage="t", error=OSError("disk\nfull")),
             "[release] t rollback failed: OSError: disk ..."),
            (finished(pk.Status.TIMED_OUT, duration=2), "[release] TIMED OUT in 2.00s"),
            (finished(pk.Status.CANCELLED, duration=2), "[release] CANCELLED in 2.00s"),
            (make(CustomEvent, stage="deploy"), "[release] deploy_approved deploy"),
        ],
        ids=lambda value: getattr(value, "kind", ""),
    )  # fmt: skip
    async def test_lines(self, event: pk.Event, line: str) -> None:
        """Each kind of event reads as one line (command output only when selected)."""
        out = io.StringIO()
        await PrintHook(out, on=event_names())(event)
        assert out.getvalue() == line + "\n"

    async def test_selection_and_output_lines(self) -> None:
        """Only selected events print; command output is not printed by default."""
        out = io.StringIO()
        await PrintHook(out)(make(OutputLine, stage="test", line="hidden"))
        await PrintHook(out, on="pipeline_failed")(finished(pk.Status.SUCCEEDED))
        assert out.getvalue() == ""
        await PrintHook(out, on="pipeline_failed")(finished(pk.Status.FAILED, duration=1))
        assert out.getvalue() == "[release] FAILED in 1.00s\n"

    async def test_writes_to_stdout_by_default(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without a file, lines go to ``sys.stdout`` as it is when the event arrives."""
        hook = PrintHook()
        await hook(make(pk.StageStarted, stage="build"))
        assert capsys.readouterr().out == "[release] build started\n"
        assert repr(hook) == "PrintHook(file=None, on=None)"

    async def test_format_can_be_overridden(self) -> None:
        """A subclass changes the line by overriding ``format``."""

        class Kinds(PrintHook):
            def format(self, event: pk.Event) -> str:
                return event.kind

        out = io.StringIO()
        with anyio.fail_after(5):
            await two_stages().execute(hooks=[Kinds(out, on="pipeline_finished")])
        assert out.getvalue() == "pipeline_finished\n"


def _duration(line: str) -> str:
    """The duration in ``line`` (``1.23s`` after ``in ``), or a marker that is not in it."""
    for word in line.replace(";", " ").replace(":", " ").split():
        if word.endswith("s") and word[:-1].replace(".", "").isdigit():
            return word
    return "\0"


# -- HttpHook -------------------------------------------------------------------------


class TestHttpHookDelivery:
    """``HttpHook`` posting to a real server."""

    async def test_posts_every_event_of_a_run_as_json(self, server: HookServer) -> None:
        """Each event of the run is POSTed, in order, as ``event_to_dict`` with the configured headers."""
        recorder = Recorder()
        hook = HttpHook(server.url, headers={"Authorization": SECRET, "X-Team": "shop"})
        with anyio.fail_after(10):
            response = await two_stages().execute(hooks=[recorder, hook], input={"version": "1.2"})
        assert response.status is pk.Status.SUCCEEDED
        assert response.hook_failures == 0
        assert server.bodies() == [event_to_dict(e) for e in recorder.events]
        assert [b["kind"] for b in server.bodies()] == [
            "pipeline_started",
            "stage_started",
            "stage_succeeded",
            "stage_started",
            "stage_succeeded",
            "pipeline_finished",
        ]
        assert server.bodies()[2]["output"] == {"image": "shop:1"}
        first = server.received[0]
        assert (first.method, first.path) == ("POST", "/hook")
        assert first.headers["authorization"] == SECRET
        assert first.headers["x-team"] == "shop"
        assert first.headers["content-type"] == "application/json"
        assert first.headers["user-agent"].startswith("pipekit/")
        assert hook.statistics() == HookStatistics(delivered=6, failed=0, retried=0)

    async def test_posts_only_selected_events(self, server: HookServer) -> None:
        """With ``on=``, only those events are posted (derived names included)."""
        hook = HttpHook(server.url, on=("stage_failed", "pipeline_failed"))
        with anyio.fail_after(10), capture_logs():
            await two_stages().execute(hooks=[hook])
            await failing().execute(hooks=[hook])
        assert [(b["kind"], b["stage"]) for b in server.bodies()] == [
            ("stage_failed", "test"),
            ("pipeline_finished", None),
        ]
        assert server.bodies()[1]["status"] == "failed"
        assert hook.statistics().delivered == 2

    async def test_context_manager_reuses_one_connection(self, server: HookServer) -> None:
        """Inside ``async with``, every event goes over one connection; outside, each gets its own."""
        async with HttpHook(server.url) as hook:
            with anyio.fail_after(10):
                await two_stages().execute(hooks=[hook])
        assert len({r.client_port for r in server.received}) == 1
        with anyio.fail_after(10):
            await two_stages().execute(hooks=[HttpHook(server.url)])
        assert len({r.client_port for r in server.received[6:]}) == 6

    async def test_aclose_is_idempotent_and_reentry_is_refused(self, server: HookServer) -> None:
        """``aclose`` twice is fine; entering an open hook again is an error; a closed one can reopen."""
        hook = HttpHook(server.url)
        async with hook:
            with pytest.raises(RuntimeError, match="already open"):
                await hook.__aenter__()
        await hook.aclose()
        async with hook:
            await hook(make(pk.StageStarted, stage="a"))
        assert hook.statistics().delivered == 1


class TestHttpHookRetries:
    """``HttpHook`` retrying transient failures, and giving up."""

    @pytest.mark.parametrize("modes", [("500", "503"), ("close", "close"), ("500", "close")])
    async def test_transient_failures_are_retried(self, server: HookServer, modes: tuple[str, ...]) -> None:
        """5xx answers and dropped connections are retried with exponential back-off."""
        sleeps = Sleeps()
        hook = HttpHook(server.url, sleep=sleeps)
        server.fail_next(*modes)
        with capture_logs() as logs:
            await hook(make(pk.StageStarted, stage="build"))
        assert len(server.received) == 3
        assert server.bodies()[0] == server.bodies()[2]
        assert sleeps.delays == [0.2, 0.4]
        assert hook.statistics() == HookStatistics(delivered=1, failed=0, retried=2)
        retries = [log for log in logs if log["event"] == "pipekit.hook.retry_scheduled"]
        assert [(r["attempt"], r["delay"], r["event_kind"]) for r in retries] == [
            (1, 0.2, "stage_started"),
            (2, 0.4, "stage_started"),
        ]

    async def test_timeouts_are_retried(self, server: HookServer) -> None:
        """A request that gets no answer within ``timeout`` is retried."""
        sleeps = Sleeps()
        hook = HttpHook(server.url, timeout=0.2, sleep=sleeps)
        server.fail_next("hang")
        with anyio.fail_after(10), capture_logs():
            await hook(make(pk.StageStarted, stage="build"))
        assert len(server.received) == 2
        assert hook.statistics() == HookStatistics(delivered=1, failed=0, retried=1)

    async def test_too_many_requests_honours_retry_after_up_to_the_cap(self, server: HookServer) -> None:
        """A 429 is retried after its ``Retry-After``, never longer than ``max_backoff``."""
        sleeps = Sleeps()
        hook = HttpHook(server.url, attempts=4, max_backoff=5, sleep=sleeps)
        server.fail_next("429:2", "429:60", "429")
        with capture_logs():
            await hook(make(pk.StageStarted, stage="build"))
        assert sleeps.delays == [2.0, 5.0, 0.8]
        assert hook.statistics().retried == 3

    async def test_backoff_is_capped(self, server: HookServer) -> None:
        """Waits double from ``backoff`` up to ``max_backoff``."""
        sleeps = Sleeps()
        hook = HttpHook(server.url, attempts=5, backoff=1, max_backoff=3, sleep=sleeps)
        server.fail_next("500", "500", "500", "500")
        with capture_logs():
            await hook(make(pk.StageStarted, stage="build"))
        assert sleeps.delays == [1.0, 2.0, 3.0, 3.0]
        assert hook.statistics().delivered == 1

    async def test_client_errors_are_not_retried(self, server: HookServer) -> None:
        """A 4xx other than 429 fails at once, with the status and the body's start in the error."""
        sleeps = Sleeps()
        hook = HttpHook(server.url, sleep=sleeps)
        server.fail_next("400")
        with pytest.raises(HookDeliveryError) as info:
            await hook(make(pk.StageStarted, stage="build"))
        error = info.value
        assert (error.status, error.attempts, error.url) == (400, 1, server.url)
        assert str(error) == (
            f"HttpHook could not deliver a stage_started event to {server.url} (1 attempt): "
            "HTTP 400 Bad Request (no_service)"
        )
        assert sleeps.delays == []
        assert len(server.received) == 1
        assert hook.statistics() == HookStatistics(delivered=0, failed=1, retried=0)

    async def test_exhausted_retries_raise_delivery_error(self, server: HookServer) -> None:
        """After ``attempts`` failed requests the hook raises, with the last status."""
        hook = HttpHook(server.url, attempts=2, sleep=Sleeps())
        server.fail_next("500", "502")
        with pytest.raises(HookDeliveryError, match=r"\(2 attempts\): HTTP 502 Bad Gateway") as info:
            await hook(make(pk.StageStarted, stage="build"))
        assert isinstance(info.value, pk.PipekitError)
        assert (info.value.status, info.value.attempts) == (502, 2)

    async def test_connection_refused_is_retried_then_raised(self, closed_port_url: str) -> None:
        """Nothing listening: every attempt is made, then the error carries the transport error as cause."""
        sleeps = Sleeps()
        hook = HttpHook(closed_port_url, sleep=sleeps)
        with pytest.raises(HookDeliveryError, match=r"\(3 attempts\): ConnectError") as info:
            await hook(make(pk.StageStarted, stage="build"))
        assert isinstance(info.value.__cause__, httpx.ConnectError)
        assert info.value.status is None
        assert sleeps.delays == [0.2, 0.4]
        assert hook.statistics() == HookStatistics(delivered=0, failed=1, retried=2)

    async def test_failures_are_counted_by_the_run_never_fatal(self, server: HookServer) -> None:
        """A hook that cannot deliver is logged and counted by the core; the run still succeeds."""
        hook = HttpHook(server.url, attempts=2, sleep=Sleeps(), headers={"Authorization": SECRET})
        server.fail_next(*["500"] * 4)  # the first two events fail both attempts
        with anyio.fail_after(10), capture_logs() as logs:
            response = await two_stages().execute(hooks=[hook])
        assert response.status is pk.Status.SUCCEEDED
        assert response.hook_failures == 2
        assert hook.statistics() == HookStatistics(delivered=4, failed=2, retried=2)
        failures = [log for log in logs if log["event"] == "pipekit.hook.failed"]
        assert [f["event_kind"] for f in failures] == ["pipeline_started", "stage_started"]
        # An expected delivery failure is one warning line, not a traceback per event.
        assert {f["log_level"] for f in failures} == {"warning"}
        assert all("exc_info" not in f for f in failures)
        assert failures[0]["error"].startswith("HookDeliveryError: ")
        assert SECRET not in repr(logs)
        assert len(server.received) == 8

    async def test_engine_counts_failures_too(self, closed_port_url: str) -> None:
        """Run in an engine, an undeliverable hook shows in the response and the engine's metrics."""
        hook = HttpHook(closed_port_url, attempts=1, on="pipeline_finished")
        with anyio.fail_after(10), capture_logs():
            async with pk.Engine() as engine:
                response = await engine.execute(two_stages().with_hooks(hook))
        assert response.status is pk.Status.SUCCEEDED
        assert response.hook_failures == 1
        assert engine.metrics("release").hook_failures == 1

    async def test_cancellation_is_not_retried(self, server: HookServer) -> None:
        """Cancelling a hook mid-request stops it at once: no retry, no delivery counted."""
        sleeps = Sleeps()
        hook = HttpHook(server.url, sleep=sleeps)
        server.fail_next("hang")
        with anyio.fail_after(10), anyio.move_on_after(0.2) as scope:
            await hook(make(pk.StageStarted, stage="build"))
        assert scope.cancelled_caught
        assert sleeps.delays == []
        assert hook.statistics() == HookStatistics(delivered=0, failed=0, retried=0)


class TestHttpHookConfiguration:
    """``HttpHook``'s arguments and what it shows of them."""

    def test_secrets_stay_out_of_repr(self) -> None:
        """The repr names header names only, and hides URL credentials and query."""
        hook = HttpHook("https://user:pw@ci.example.com/hook?token=abc", headers={"Authorization": SECRET})
        text = repr(hook)
        assert text == "HttpHook('https://ci.example.com/hook?...', headers=['Authorization'], on=None)"
        assert hook.display_url == "https://ci.example.com/hook?..."

    async def test_secrets_stay_out_of_errors(self, closed_port_url: str) -> None:
        """The delivery error shows neither header values nor the URL's query."""
        hook = HttpHook(closed_port_url + "?token=abc", headers={"Authorization": SECRET}, attempts=1)
        with pytest.raises(HookDeliveryError) as info:
            await hook(make(pk.StageStarted, stage="a"))
        assert SECRET not in str(info.value)
        assert "abc" not in str(info.value)
        assert info.value.url == closed_port_url + "?..."

    @pytest.mark.parametrize(
        ("url", "kwargs", "message"),
        [
            ("ftp://example.com/x", {}, "needs an http:// or https:// URL, got a ftp: URL"),
            ("example.com/hook", {}, "needs an http:// or https:// URL, got no scheme"),
            ("http:///hook", {}, "needs a URL with a host"),
            ("http://h/x", {"attempts": 0}, "attempts= must be an integer >= 1, got 0"),
            ("http://h/x", {"timeout": 0}, "timeout= must be a finite number > 0, got 0"),
            ("http://h/x", {"backoff": -1}, "backoff= must be a finite number >= 0, got -1"),
            ("http://h/x", {"max_backoff": math.inf}, "max_backoff= must be a finite number >= 0, got inf"),
        ],
    )
    def test_bad_arguments_are_one_line_errors(self, url: str, kwargs: dict[str, Any], message: str) -> None:
        """A bad URL or number fails at construction, naming the problem."""
        with pytest.raises(ValueError, match=r"^HttpHook ") as info:
            HttpHook(url, **kwargs)
        assert message in str(info.value)
        assert "\n" not in str(info.value)

    async def test_payload_can_be_overridden(self, server: HookServer) -> None:
        """A subclass posts another body by overriding ``payload``."""

        class Compact(HttpHook):
            def payload(self, event: pk.Event) -> Any:
                return [event.kind, event.stage]

        await Compact(server.url)(make(pk.StageStarted, stage="build"))
        assert server.bodies() == [["stage_started", "build"]]


# -- SlackHook ------------------------------------------------------------------------


class TestSlackHook:
    """``SlackHook``."""

    async def test_posts_one_message_when_a_run_fails(self, server: HookServer) -> None:
        """A failing run produces one message: name, status, duration, error summary and emoji."""
        hook = SlackHook(server.url_for(SLACK_PATH))
        with anyio.fail_after(10), capture_logs():
            response = await failing().execute(hooks=[hook])
        assert response.status is pk.Status.FAILED
        [message] = server.bodies()
        assert server.received[0].path == SLACK_PATH
        assert message["text"].startswith(":x: Pipeline release failed in ")
        header, error, facts = message["blocks"]
        assert header["type"] == "section"
        assert header["text"]["type"] == "mrkdwn"
        assert header["text"]["text"].startswith(":x: Pipeline *release* failed in ")
        assert error["text"]["text"] == (
            "```StageFailedError: stage 'test' failed after 1 attempt: RuntimeError: 3 tests failed```"
        )
        fields = [f["text"] for f in facts["fields"]]
        assert fields[:2] == ["*Pipeline*\nrelease", "*Status*\nfailed"]
        assert fields[2].startswith("*Duration*\n")
        assert fields[3] == f"*Request*\n`{response.id}`"

    async def test_posts_success_for_the_top_level_run_only(self, server: HookServer) -> None:
        """A nested pipeline's end is not reported; the outer run's success is, with its emoji."""
        outer = pk.Pipeline("outer").add_stage(MockStage("lint")).add_stage(two_stages("inner"))
        hook = SlackHook(server.url_for(SLACK_PATH))
        with anyio.fail_after(10):
            response = await outer.execute(hooks=[hook])
        assert response.status is pk.Status.SUCCEEDED
        [message] = server.bodies()
        assert message["text"].startswith(":white_check_mark: Pipeline outer succeeded in ")
        assert [b["type"] for b in message["blocks"]] == ["section", "section"]
        assert hook.statistics() == HookStatistics(delivered=1, failed=0, retried=0)

    @pytest.mark.parametrize(
        ("status", "start"),
        [(pk.Status.TIMED_OUT, ":hourglass: Pipeline a&lt;b&gt; timed out"),
         (pk.Status.CANCELLED, ":no_entry_sign: Pipeline a&lt;b&gt; was cancelled")],
    )  # fmt: skip
    def test_message_per_status_escapes_names(self, status: pk.Status, start: str) -> None:
        """Each end has its own emoji and wording; ``<``, ``>`` and ``&`` are escaped for Slack."""
        event = pk.PipelineFinished(request_id="r", pipeline="a<b>", timestamp=1.0, status=status, duration=1)
        message = SlackHook("https://hooks.slack.com/services/x").payload(event)
        assert message["text"] == f"{start} in 1.00s"

    async def test_other_selected_events_are_one_line_messages(self, server: HookServer) -> None:
        """Selected stage events are posted as a one-line message with the request id."""
        hook = SlackHook(server.url_for(SLACK_PATH), on="stage_failed")
        with anyio.fail_after(10), capture_logs():
            await failing().execute(hooks=[hook])
        [message] = server.bodies()
        assert message["text"] == ":x: [release] test failed after 1 attempt in " + message["text"].split(" in ")[1]
        assert message["text"].endswith(": RuntimeError: 3 tests failed")
        assert message["blocks"][1]["type"] == "context"

    async def test_retries_and_hides_the_webhook_path(self, server: HookServer) -> None:
        """Delivery is retried like HttpHook's; the secret path appears in neither repr nor error."""
        sleeps = Sleeps()
        hook = SlackHook(server.url_for(SLACK_PATH), attempts=2, sleep=sleeps)
        server.fail_next("500", "500", "503")
        event = finished(pk.Status.SUCCEEDED)
        with pytest.raises(HookDeliveryError) as info, capture_logs() as logs:
            await hook(event)
        await hook(event)
        assert sleeps.delays == [0.2, 0.2]
        assert hook.statistics() == HookStatistics(delivered=1, failed=1, retried=2)
        shown = f"http://{HOST}:{server.url.split(':')[2].split('/')[0]}/..."
        assert info.value.url == shown
        assert repr(hook).startswith(f"SlackHook({shown!r}")
        for text in (str(info.value), repr(hook), repr(logs)):
            assert "SECRET" not in text
