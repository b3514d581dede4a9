"""Every ```python block of the documentation runs, so the examples cannot rot.

Each block is executed as a script in a fresh namespace, once with anyio's
default backend forced to asyncio and once to trio. A block whose first line is
``# docs: compile-only`` (a sketch needing a web framework, say) is only
compiled, so at least its syntax cannot rot; keep those rare.

A block whose first line is ``# docs: pytest`` is a user's test module: it is
written to a temporary directory and run by pytest in a subprocess (with the
AnyIO plugin and ``anyio_mode = auto``, as the testing page tells users), and
must pass. A block whose first line is ``# docs: file NAME.py`` runs as a
script too, and is also written as ``NAME.py`` beside the test modules of its
page, so they can import it.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import pipekit
import pipekit.testing
from pipekit.testing import FakeClockEventLoop, fake_clock_backend

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
COMPILE_ONLY = "# docs: compile-only"
PYTEST = "# docs: pytest"
_FILE = re.compile(r"# docs: file (?P<name>\w+\.py)[ \t]*$")
#: The configuration docs/testing.md tells users to use (``-p anyio`` is on the command line), warnings as errors.
PYTEST_INI = "[pytest]\nanyio_mode = auto\nfilterwarnings = error\n"

# An opening fence (any indentation, e.g. inside an admonition), its info string starting with "python".
_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*python\b.*$")


class Block:
    """One fenced python block: where it is and what it says."""

    def __init__(self, path: Path, index: int, line: int, source: str) -> None:
        self.path = path
        self.index = index
        self.line = line  # 1-based line of the block's first code line in the markdown file
        self.source = source

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}#{self.index}"

    @property
    def first_line(self) -> str:
        return self.source.lstrip().partition("\n")[0].strip()

    @property
    def is_pytest(self) -> bool:
        """A user's test module, run by pytest."""
        return self.first_line == PYTEST

    @property
    def file_name(self) -> str | None:
        """The module name a ``# docs: file NAME.py`` block is written as, else None."""
        match = _FILE.fullmatch(self.first_line)
        return match["name"] if match else None


def extract_blocks(path: Path) -> list[Block]:
    """Return the fenced ```python blocks of one markdown file, dedented."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _OPEN.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        closing = re.compile(rf"^{re.escape(indent)}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            body.append(lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: unclosed ```python block")
        blocks.append(Block(path, len(blocks), i + 2, textwrap.dedent("\n".join(body)) + "\n"))
        i = j + 1
    return blocks


def all_blocks() -> list[Block]:
    """Every python block of every page, in a stable order."""
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    return [block for path in pages for block in extract_blocks(path)]


BLOCKS = all_blocks()
SCRIPTS = [b for b in BLOCKS if not b.is_pytest]
PYTEST_MODULES = [b for b in BLOCKS if b.is_pytest]


def _fake_clock_threshold(options: dict[str, Any]) -> float | None:
    """The autojump threshold if ``options`` run a loop on a pipekit fake clock, else None."""
    from trio.testing import MockClock

    clock = options.get("clock")
    if isinstance(clock, MockClock):
        return float(clock.autojump_threshold)
    factory = options.get("loop_factory")
    if factory is None:
        return None
    loop = factory()
    try:
        return loop.clock.autojump_threshold if isinstance(loop, FakeClockEventLoop) else None
    finally:
        loop.close()


def _forcing_backend(real_run: Callable[..., Any], forced: str) -> Callable[..., Any]:
    """Wrap ``anyio.run`` so every event loop a block starts (``pk.run`` included) uses ``forced``.

    A loop on a fake clock (``pipekit.testing.run_with_fake_clock``) stays on
    one, of the forced backend.
    """

    def run(
        func: Callable[..., Awaitable[Any]],
        *args: object,
        backend: str = "asyncio",
        backend_options: dict[str, Any] | None = None,
    ) -> Any:
        del backend  # overridden: the test chooses the backend
        threshold = _fake_clock_threshold(backend_options or {})
        if threshold is None:
            return real_run(func, *args, backend=forced)
        _, options = fake_clock_backend(forced, autojump_threshold=threshold)
        return real_run(func, *args, backend=forced, backend_options=options)

    return run


class TestExtraction:
    def test_docs_have_python_examples(self) -> None:
        """The extractor finds the examples (an empty parametrisation would pass silently)."""
        assert len(BLOCKS) >= 20
        assert {b.path.name for b in BLOCKS} >= {"README.md", "index.md", "quickstart.md", "rollback.md", "engine.md"}
        assert {b.path.name for b in PYTEST_MODULES} >= {"testing.md"}
        assert [b.file_name for b in SCRIPTS if b.file_name] == ["release.py"]

    def test_extract_blocks_handles_indentation_and_other_languages(self, tmp_path: Path) -> None:
        """Indented fences are dedented; non-python fences and unclosed blocks are handled."""
        page = tmp_path / "page.md"
        page.write_text(
            "text\n```console\n$ make\n```\n"
            "!!! note\n    ```python\n    x = 1\n    ```\n"
            "```python title='t'\ny = 2\n```\n",
            encoding="utf-8",
        )
        blocks = extract_blocks(page)
        assert [(b.line, b.source) for b in blocks] == [(7, "x = 1\n"), (10, "y = 2\n")]
        page.write_text("```python\nx = 1\n", encoding="utf-8")
        with pytest.raises(ValueError, match="unclosed"):
            extract_blocks(page)

    def test_block_kinds(self, tmp_path: Path) -> None:
        """``# docs: pytest`` and ``# docs: file NAME.py`` on the first line mark test modules and importable files."""
        page = tmp_path / "page.md"
        page.write_text(
            "```python\n# docs: pytest\ndef test_x(): ...\n```\n"
            "```python\n\n# docs: file shop.py\nX = 1\n```\n"
            "```python\nx = 1  # docs: pytest\n```\n"
            "```python\n# docs: file shop\n```\n",
            encoding="utf-8",
        )
        blocks = extract_blocks(page)
        kinds = [(b.is_pytest, b.file_name) for b in blocks]
        assert kinds == [(True, None), (False, "shop.py"), (False, None), (False, None)]


class TestReference:
    def test_reference_lists_every_public_name(self) -> None:
        """docs/reference.md has a ``::: pipekit.<name>`` directive for every name in ``pipekit.__all__``."""
        reference = (DOCS / "reference.md").read_text(encoding="utf-8")
        documented = set(re.findall(r"^::: pipekit\.(\w+)\s*$", reference, flags=re.MULTILINE))
        assert sorted(set(pipekit.__all__) - documented) == []
        assert sorted(documented - set(pipekit.__all__)) == []

    def test_reference_lists_every_testing_name(self) -> None:
        """docs/reference.md has a ``::: pipekit.testing.<name>`` directive for every name in its ``__all__``."""
        reference = (DOCS / "reference.md").read_text(encoding="utf-8")
        documented = set(re.findall(r"^::: pipekit\.testing\.(\w+)\s*$", reference, flags=re.MULTILINE))
        assert sorted(set(pipekit.testing.__all__) ^ documented) == []


class TestExamples:
    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    @pytest.mark.parametrize("block", SCRIPTS, ids=[b.id for b in SCRIPTS])
    def test_example_runs(self, block: Block, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """The block runs to completion as a script (``pk.run``/``anyio.run`` on ``backend``)."""
        if block.source.lstrip().startswith(COMPILE_ONLY):
            assert compile(block.source, str(block.path), "exec") is not None
            return
        monkeypatch.setattr(anyio, "run", _forcing_backend(anyio.run, backend))
        # Pad with blank lines so tracebacks point at the markdown file's own line numbers.
        code = compile("\n" * (block.line - 1) + block.source, str(block.path), "exec")
        namespace: dict[str, Any] = {"__name__": "__main__"}
        exec(code, namespace)


def _pytest_plugin_args() -> list[str]:
    """``-p pipekit.testing.plugin`` unless pipekit's entry point loads it already (loading it twice fails)."""
    if any(ep.name == "pipekit" for ep in importlib.metadata.entry_points(group="pytest11")):
        return []
    return ["-p", "pipekit.testing.plugin"]


class TestPytestExamples:
    @pytest.mark.parametrize("block", PYTEST_MODULES, ids=[b.id for b in PYTEST_MODULES])
    def test_example_passes(self, block: Block, tmp_path: Path) -> None:
        """The test module passes under pytest, every test in it (with the page's files beside it)."""
        for other in extract_blocks(block.path):
            if other.file_name is not None:
                (tmp_path / other.file_name).write_text(other.source, encoding="utf-8")
        (tmp_path / "pytest.ini").write_text(PYTEST_INI, encoding="utf-8")
        module = tmp_path / f"test_{block.path.stem.replace('-', '_')}_{block.index}.py"
        # Pad with blank lines so failures point at the markdown file's own line numbers.
        module.write_text("\n" * (block.line - 1) + block.source, encoding="utf-8")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.pop("PYTEST_ADDOPTS", None)
        command = [sys.executable, "-m", "pytest", "-p", "anyio", *_pytest_plugin_args(), "-p", "no:cacheprovider"]
        result = subprocess.run(
            [*command, "-q", "-rfE", module.name],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=50,  # under pytest-timeout's 60 s
            check=False,
        )
        output = f"{block.id} (line {block.line}):\n{result.stdout}{result.stderr}"
        assert result.returncode == 0, output
        passed = re.search(r"^(\d+) passed in ", result.stdout.splitlines()[-1])
        assert passed is not None, output
        assert int(passed[1]) >= len(re.findall(r"^(?:async )?def test_", block.source, flags=re.MULTILINE)), output
