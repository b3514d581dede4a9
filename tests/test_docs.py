"""Every ```python block of the documentation runs, so the examples cannot rot.

Each block is executed as a script in a fresh namespace, once with anyio's
default backend forced to asyncio and once to trio. A block whose first line is
``# docs: compile-only`` (a sketch needing a web framework, say) is only
compiled, so at least its syntax cannot rot; keep those rare.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import pipekit

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
COMPILE_ONLY = "# docs: compile-only"

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


def _forcing_backend(real_run: Callable[..., Any], forced: str) -> Callable[..., Any]:
    """Wrap ``anyio.run`` so every event loop a block starts (``pk.run`` included) uses ``forced``."""

    def run(
        func: Callable[..., Awaitable[Any]],
        *args: object,
        backend: str = "asyncio",
        backend_options: dict[str, Any] | None = None,
    ) -> Any:
        del backend, backend_options  # overridden: the test chooses the backend
        return real_run(func, *args, backend=forced)

    return run


class TestExtraction:
    def test_docs_have_python_examples(self) -> None:
        """The extractor finds the examples (an empty parametrisation would pass silently)."""
        assert len(BLOCKS) >= 20
        assert {b.path.name for b in BLOCKS} >= {"README.md", "index.md", "quickstart.md", "rollback.md", "engine.md"}

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


class TestReference:
    def test_reference_lists_every_public_name(self) -> None:
        """docs/reference.md has a ``::: pipekit.<name>`` directive for every name in ``pipekit.__all__``."""
        reference = (DOCS / "reference.md").read_text(encoding="utf-8")
        documented = set(re.findall(r"^::: pipekit\.(\w+)\s*$", reference, flags=re.MULTILINE))
        assert sorted(set(pipekit.__all__) - documented) == []
        assert sorted(documented - set(pipekit.__all__)) == []


class TestExamples:
    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    @pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
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
