"""The pipekit pytest plugin, registered through the ``pytest11`` entry point.

Fixtures:

- ``pipekit_clock``: run the test on a fake autojump clock (asyncio and trio),
  returning a `pipekit.testing.FakeClock`. A test asking for it (or marked
  ``@pytest.mark.pipekit_clock(backends=[...], autojump_threshold=0)``) has its
  ``anyio_backend`` replaced by fake-clock variants, because the clock must be
  chosen when the event loop starts.
- ``pipekit_spans``: `pipekit.testing.capture_spans` for the test.
- ``pipekit_events``: `pipekit.testing.capture_events` for the test.
- ``mock_stage``: a factory of `pipekit.testing.MockStage`.

It works with the AnyIO pytest plugin on asyncio and trio; tests that ask for
none of these are left alone.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from ._capture import EventCapture, SpanCapture, capture_events, capture_spans
from ._clock import BackendSpec, FakeClock, current_fake_clock, fake_clock_backend
from ._mock import MockStage

__all__ = ["mock_stage", "pipekit_clock", "pipekit_events", "pipekit_spans"]

_MARKER = "pipekit_clock"


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``pipekit_clock`` marker."""
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(backends=None, autojump_threshold=0): run this AnyIO test on a fake autojump clock",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Module | pytest.Class, name: str, obj: object) -> None:
    """Give tests marked ``pipekit_clock`` the fixture, so the clock is checked."""
    if (
        collector.istestfunction(obj, name)
        and inspect.iscoroutinefunction(obj)  # a class-level marker leaves the sync tests alone
        and (collector.get_closest_marker(_MARKER) or any(m.name == _MARKER for m in getattr(obj, "pytestmark", ())))
    ):
        pytest.mark.usefixtures(_MARKER)(obj)


def _default_backends(metafunc: pytest.Metafunc) -> list[str | BackendSpec]:
    """The backends the test's ``anyio_backend`` fixture would give it, options included.

    So a project's ``anyio_backend`` (asyncio in debug mode, say) keeps its
    options under the fake clock. pytest has no public way to read a fixture's
    params, so this looks at its definition and falls back to both backends.
    """
    definitions = getattr(metafunc, "_arg2fixturedefs", {}).get("anyio_backend")
    params = getattr(definitions[-1], "params", None) if definitions else None
    if not params and definitions:
        # An unparametrized fixture pinning one backend (``return "trio"``):
        # use what it returns, if it can be called without pytest's request.
        func = getattr(definitions[-1], "func", None)
        try:
            takes_nothing = func is not None and not inspect.signature(func).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins
            takes_nothing = False
        if takes_nothing:
            assert func is not None
            value = getattr(func, "__wrapped__", func)()
            if isinstance(value, str) or (isinstance(value, tuple) and len(value) == 2):
                return [value]
    if params:
        found: list[str | BackendSpec] = []
        for param in params:
            value = param.values[0] if hasattr(param, "values") and len(param.values) == 1 else param
            if isinstance(value, str) or (isinstance(value, tuple) and len(value) == 2):
                found.append(value)
        if found:
            return found
    return ["asyncio", "trio"] if importlib.util.find_spec("trio") is not None else ["asyncio"]


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run tests that use the fake clock on fake-clock variants of ``anyio_backend``."""
    if _MARKER not in metafunc.fixturenames or not inspect.iscoroutinefunction(metafunc.function):
        return
    marker = metafunc.definition.get_closest_marker(_MARKER)
    options = marker.kwargs if marker is not None else {}
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        if "anyio_backend" in str(names):
            raise pytest.UsageError(
                f"{metafunc.definition.nodeid}: choose backends with @pytest.mark.pipekit_clock(backends=...) "
                "instead of parametrizing anyio_backend"
            )
    backends: Sequence[str | BackendSpec] = options.get("backends") or _default_backends(metafunc)
    threshold = float(options.get("autojump_threshold", 0.0))
    # A parametrize *marker* (not metafunc.parametrize) so pytest uses it in
    # place of the anyio_backend fixture's own parameters.
    metafunc.definition.add_marker(
        pytest.mark.parametrize(
            "anyio_backend",
            [fake_clock_backend(b, autojump_threshold=threshold) for b in backends],
            ids=[b if isinstance(b, str) else b[0] for b in backends],
        )
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Give every test its own trio MockClock (parametrized cases would share one)."""
    callspec = getattr(item, "callspec", None)
    if callspec is None or _MARKER not in getattr(item, "fixturenames", ()):
        return
    spec = callspec.params.get("anyio_backend")
    if isinstance(spec, tuple) and spec[0] == "trio" and "clock" in spec[1]:
        clock = spec[1]["clock"]
        fresh = fake_clock_backend(
            ("trio", {k: v for k, v in spec[1].items() if k != "clock"}),
            autojump_threshold=getattr(clock, "autojump_threshold", 0.0),
        )
        callspec.params["anyio_backend"] = fresh


@pytest.fixture
async def pipekit_clock(anyio_backend: Any) -> FakeClock:
    """The test's fake clock (the test runs on virtual time that jumps to the next timer)."""
    try:
        return current_fake_clock()
    except RuntimeError as exc:
        raise RuntimeError(
            f"pipekit_clock: {exc}. AnyIO reuses a running test loop while a module- or session-scoped "
            "async fixture keeps it alive; give such fixtures function scope, or set anyio_backend to "
            "pipekit.testing.fake_clock_backend(...) for the whole module."
        ) from None


@pytest.fixture
def pipekit_spans() -> Iterator[SpanCapture]:
    """Spans and metrics of the test's runs, on a private SDK provider."""
    with capture_spans(everywhere=True) as spans:
        yield spans


@pytest.fixture
def pipekit_events() -> Iterator[EventCapture]:
    """Events of the test's runs."""
    with capture_events(everywhere=True) as events:
        yield events


@pytest.fixture
def mock_stage() -> Callable[..., MockStage]:
    """A factory of `MockStage`: ``mock_stage("build", output={"digest": "x"}, fail_times=2)``."""
    return MockStage
