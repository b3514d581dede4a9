"""A deterministic fake clock for tests, on asyncio and trio alike.

Time is virtual and *autojumps*: whenever the event loop would sit idle
waiting for a timer, virtual time moves straight to that timer. Retry
back-off, stage delays and timeouts then take no real time, and timings are
exact and repeatable.

On trio this is ``trio.testing.MockClock(autojump_threshold=0)``. On asyncio
it is `FakeClockEventLoop`: a selector event loop whose ``time()`` is a
`VirtualClock` and whose selector, when a timer is due and no real I/O is
ready, advances the clock instead of blocking. It overrides only public
methods; it relies on asyncio computing its select timeout from ``time()``
(true of CPython's selector loops; uvloop can't be faked this way).

The clock must be chosen when the event loop starts: use `fake_clock_backend`
for the ``anyio_backend`` pytest fixture, the ``pipekit_clock`` fixture of
the pytest plugin, or `run_with_fake_clock` from synchronous code.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from socket import _GetAddrInfoResult

    from _typeshed import FileDescriptorLike

__all__ = [
    "FakeClock",
    "FakeClockEventLoop",
    "VirtualClock",
    "current_fake_clock",
    "fake_clock_backend",
    "run_with_fake_clock",
]

T = TypeVar("T")
BackendSpec = tuple[str, dict[str, Any]]

_NUMERIC_ONLY = socket.AI_NUMERICHOST | getattr(socket, "AI_NUMERICSERV", 0)


class VirtualClock:
    """Virtual monotonic time for `FakeClockEventLoop`; it only moves when jumped.

    Args:
        start: The initial virtual time.
        autojump_threshold: Real seconds the loop may wait for real I/O before
            jumping to the next timer (0: jump at once).
    """

    __slots__ = ("_autojump_threshold", "_now", "_start")

    def __init__(self, start: float = 0.0, *, autojump_threshold: float = 0.0) -> None:
        self._start = float(start)
        self._now = self._start
        self._autojump_threshold = 0.0
        self.autojump_threshold = autojump_threshold

    @property
    def autojump_threshold(self) -> float:
        """Real seconds to wait for I/O before auto-jumping (changeable at any time)."""
        return self._autojump_threshold

    @autojump_threshold.setter
    def autojump_threshold(self, value: float) -> None:
        value = float(value)
        if not value >= 0:  # also rejects NaN
            raise ValueError(f"autojump_threshold must be >= 0, got {value!r}")
        self._autojump_threshold = value

    def now(self) -> float:
        """The current virtual time (what the loop's ``time()`` returns)."""
        return self._now

    def elapsed(self) -> float:
        """Virtual seconds since the clock was created."""
        return self._now - self._start

    def jump(self, seconds: float) -> None:
        """Advance virtual time by ``seconds`` (>= 0)."""
        if not seconds >= 0:
            raise ValueError("time can't go backwards")
        self._now += seconds

    def __repr__(self) -> str:
        return f"<VirtualClock now={self._now!r} autojump_threshold={self._autojump_threshold!r}>"


class _AutojumpSelector(selectors.BaseSelector):
    """Wraps the real selector; when a timer is due and nothing is ready, jumps the clock."""

    def __init__(self, clock: VirtualClock, selector: selectors.BaseSelector | None = None) -> None:
        self._clock = clock
        self._selector = selector if selector is not None else selectors.DefaultSelector()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None or timeout <= 0:
            return self._selector.select(timeout)  # no timer: block for real; work ready: poll
        events = self._selector.select(min(timeout, self._clock.autojump_threshold))
        if not events:
            self._clock.jump(timeout)
        return events

    def register(self, fileobj: FileDescriptorLike, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._selector.register(fileobj, events, data)

    def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._selector.unregister(fileobj)

    def modify(self, fileobj: FileDescriptorLike, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._selector.modify(fileobj, events, data)

    def get_key(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._selector.get_key(fileobj)

    def get_map(self) -> Mapping[FileDescriptorLike, selectors.SelectorKey]:
        return self._selector.get_map()

    def close(self) -> None:
        self._selector.close()


class FakeClockEventLoop(asyncio.SelectorEventLoop):
    """An asyncio event loop running on a `VirtualClock` (the class is a valid ``loop_factory``).

    Args:
        clock: The clock (a fresh one starting at 0 by default); one per loop.
        selector: The real selector to wrap.
    """

    def __init__(self, clock: VirtualClock | None = None, *, selector: selectors.BaseSelector | None = None) -> None:
        self._fake_clock = clock if clock is not None else VirtualClock()  # before super() may call time()
        super().__init__(_AutojumpSelector(self._fake_clock, selector))

    @property
    def clock(self) -> VirtualClock:
        """The loop's virtual clock."""
        return self._fake_clock

    def time(self) -> float:
        """Virtual time."""
        return self._fake_clock.now()

    async def getaddrinfo(
        self,
        host: bytes | str | None,
        port: bytes | str | int | None,
        *,
        family: int = 0,
        type: int = 0,  # noqa: A002 - asyncio's signature
        proto: int = 0,
        flags: int = 0,
    ) -> _GetAddrInfoResult:
        """Resolve numeric addresses inline, as trio does (a resolver thread would let the clock run ahead)."""
        try:
            return socket.getaddrinfo(host, port, family, type, proto, flags | _NUMERIC_ONLY)
        except socket.gaierror:
            pass  # a real name: resolve exactly as asyncio would
        return await super().getaddrinfo(host, port, family=family, type=type, proto=proto, flags=flags)


def fake_clock_backend(
    backend: str | tuple[str, Mapping[str, Any]] = "asyncio", *, autojump_threshold: float = 0.0
) -> BackendSpec:
    """The ``anyio_backend`` value running ``backend`` on a fresh fake clock.

    Use it to put a whole test module (or suite) on virtual time::

        @pytest.fixture(params=["asyncio", "trio"])
        def anyio_backend(request):
            return pipekit.testing.fake_clock_backend(request.param)

    Args:
        backend: ``"asyncio"``, ``"trio"``, or an ``(name, options)`` pair to extend.
        autojump_threshold: Real seconds to wait for I/O before jumping.

    Raises:
        ValueError: For another backend, or asyncio with its own loop factory or uvloop.
    """
    name, options = (backend, {}) if isinstance(backend, str) else (backend[0], dict(backend[1]))
    if name == "asyncio":
        if options.get("loop_factory") is not None or options.get("use_uvloop"):
            raise ValueError("the fake clock needs its own asyncio loop: drop loop_factory/use_uvloop")

        def loop_factory() -> FakeClockEventLoop:
            return FakeClockEventLoop(VirtualClock(autojump_threshold=autojump_threshold))

        return ("asyncio", {**options, "loop_factory": loop_factory})
    if name == "trio":
        from trio.testing import MockClock  # noqa: PLC0415 - trio is optional

        return ("trio", {**options, "clock": MockClock(autojump_threshold=autojump_threshold)})
    raise ValueError(f"no fake clock for backend {name!r}; use 'asyncio' or 'trio'")


class FakeClock:
    """The running loop's fake clock, the same on both backends.

    Attributes:
        backend: ``"asyncio"`` or ``"trio"``.
    """

    def __init__(self, backend: str, clock: Any) -> None:
        self.backend = backend
        self._clock = clock  # a VirtualClock, or a trio.testing.MockClock
        self._start = self.now()

    def now(self) -> float:
        """Virtual time, as ``anyio.current_time()`` reads it."""
        if isinstance(self._clock, VirtualClock):
            return self._clock.now()
        return float(self._clock.current_time())

    def elapsed(self) -> float:
        """Virtual seconds since this handle was made."""
        return self.now() - self._start

    def jump(self, seconds: float) -> None:
        """Advance virtual time by hand."""
        self._clock.jump(seconds)

    def __repr__(self) -> str:
        return f"<FakeClock {self.backend} now={self.now():g}>"


def current_fake_clock() -> FakeClock:
    """The fake clock of the running event loop.

    Raises:
        RuntimeError: Outside an event loop, or if it does not run on a fake clock.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:
        backend = "asyncio"
        if isinstance(loop, FakeClockEventLoop):
            return FakeClock("asyncio", loop.clock)
        found = type(loop).__qualname__
    else:
        import trio  # noqa: PLC0415 - trio is optional
        from trio.testing import MockClock  # noqa: PLC0415

        backend = "trio"
        try:
            clock = trio.lowlevel.current_clock()
        except RuntimeError:
            raise RuntimeError("current_fake_clock() must be called inside an event loop") from None
        if isinstance(clock, MockClock):
            return FakeClock("trio", clock)
        found = type(clock).__qualname__
    raise RuntimeError(
        f"this {backend} event loop runs on a real clock ({found}); start it with "
        "pipekit.testing.fake_clock_backend(...) or use the pipekit_clock fixture"
    )


def run_with_fake_clock(
    fn: Callable[..., Awaitable[T]], *args: Any, backend: str = "asyncio", autojump_threshold: float = 0.0
) -> T:
    """``anyio.run(fn, *args)`` on a fake clock: for scripts and synchronous tests.

    Inside ``fn``, `current_fake_clock` returns the clock.
    """
    import anyio  # noqa: PLC0415 - keep the module light for the pytest plugin

    name, options = fake_clock_backend(backend, autojump_threshold=autojump_threshold)
    return anyio.run(fn, *args, backend=name, backend_options=options)
