"""Tests for what the ``pipekit`` command loads: --input values, pipeline targets, recorded definitions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import pipekit as pk
from pipekit.cli._load import LoadError, load_definition, load_pipeline, parse_inputs

YAML = "name: demo\nstages:\n  - name: a\n    command: echo a\n"


class TestParseInputs:
    def test_values(self, tmp_path: Path) -> None:
        """KEY=VALUE as it is (later = kept), KEY=@FILE from the file less one newline, @@ for a literal @."""
        (tmp_path / "v.txt").write_text("from file\n\n", encoding="utf-8")
        values = parse_inputs(["a=1", "b=x=y", "c=", f"d=@{tmp_path / 'v.txt'}", "e=@@home", " f =spaced "])
        assert values == {"a": "1", "b": "x=y", "c": "", "d": "from file\n", "e": "@home", "f": "spaced "}

    @pytest.mark.parametrize(
        ("items", "message"),
        [
            (["novalue"], "--input 'novalue': expected key=value"),
            (["=1"], "--input '=1': expected key=value"),
            (["a=1", "a=2"], "--input 'a' is given twice"),
            (["a=@/no/such/file"], "--input a=@/no/such/file: cannot read /no/such/file: No such file or directory"),
        ],
    )
    def test_errors(self, items: list[str], message: str) -> None:
        """Malformed items raise LoadError with one line naming the item."""
        with pytest.raises(LoadError) as info:
            parse_inputs(items)
        assert str(info.value) == message


class TestLoadPipeline:
    def test_spec_file(self, tmp_path: Path) -> None:
        """A .yaml file is loaded by pipekit.spec, keeping its text as the definition."""
        path = tmp_path / "demo.yml"
        path.write_text(YAML, encoding="utf-8")
        loaded = load_pipeline(str(path))
        assert loaded.kind == "spec"
        assert loaded.pipeline.name == "demo"
        assert loaded.definition == YAML
        assert loaded.source == str(path.resolve())

    def test_json_file(self, tmp_path: Path) -> None:
        """A .json file is read as JSON."""
        path = tmp_path / "demo.json"
        path.write_text('{"name": "demo", "stages": [{"name": "a", "command": "echo a"}]}', encoding="utf-8")
        assert load_pipeline(str(path)).pipeline.stage_names == ("a",)

    def test_python_file_twice_runs_it_afresh(self, tmp_path: Path) -> None:
        """Loading a .py file twice imports it twice (a fresh pipeline each time), leaving sys.modules alone."""
        path = tmp_path / "made.py"
        path.write_text(
            "import pipekit as pk\nfrom pipekit.testing import MockStage\n"
            "pipeline = pk.Pipeline('made').add_stage(MockStage('a'))\n",
            encoding="utf-8",
        )
        before = set(sys.modules)
        first = load_pipeline(str(path))
        second = load_pipeline(str(path))
        assert first.pipeline is not second.pipeline
        assert first.kind == "python"
        assert first.definition is None
        assert set(sys.modules) == before
        assert str(tmp_path) not in sys.path

    def test_not_utf8(self, tmp_path: Path) -> None:
        """A pipeline file that is not UTF-8 text is one clear line."""
        path = tmp_path / "bad.yaml"
        path.write_bytes(b"name: \xff\n")
        with pytest.raises(LoadError, match=r"bad\.yaml: not UTF-8 text"):
            load_pipeline(str(path))

    def test_directory(self, tmp_path: Path) -> None:
        """A directory named like a pipeline file is refused."""
        (tmp_path / "x.yaml").mkdir()
        with pytest.raises(LoadError, match="is a directory"):
            load_pipeline(str(tmp_path / "x.yaml"))


class TestLoadDefinition:
    def test_recorded_text(self) -> None:
        """A recorded definition is loaded from its text; problems name the run."""
        assert load_definition(YAML, "", run_id="abc").pipeline.name == "demo"
        with pytest.raises(LoadError, match=r"^run abc:\d+: "):
            load_definition("name: demo\nstages: []\n", "", run_id="abc")

    def test_python_source(self, tmp_path: Path) -> None:
        """Without a definition, the source is loaded; without either, the error says how to name the pipeline."""
        path = tmp_path / "p.py"
        path.write_text(
            "import pipekit as pk\nfrom pipekit.testing import MockStage\n"
            "pipeline = pk.Pipeline('p').add_stage(MockStage('a'))\n",
            encoding="utf-8",
        )
        assert isinstance(load_definition(None, str(path), run_id="abc").pipeline, pk.Pipeline)
        with pytest.raises(LoadError, match="--pipeline-from"):
            load_definition(None, "", run_id="abc")
