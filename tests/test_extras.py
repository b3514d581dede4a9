"""Without an optional extra, importing what needs it says which extra to install, in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Run in a fresh interpreter where the module is made unimportable (a None entry in sys.modules).
_SCRIPT = """
import sys
sys.modules[{missing!r}] = None
try:
    {statement}
except ModuleNotFoundError as exc:
    print(type(exc).__name__, exc.name, exc, sep="|")
"""


def _run(missing: str, statement: str) -> str:
    script = _SCRIPT.format(missing=missing, statement=statement)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    return done.stdout.strip()


class TestMissingExtras:
    @pytest.mark.parametrize(
        ("missing", "module", "extra"),
        [("httpx", "pipekit.ci", "ci"), ("packaging", "pipekit.ci", "ci"), ("msgspec", "pipekit.spec", "cli")],
    )
    def test_importing_names_the_extra(self, missing: str, module: str, extra: str) -> None:
        """``import pipekit.ci`` without httpx names the ``ci`` extra and the missing module."""
        out = _run(missing, f"import {module}")
        assert out == (
            f"ModuleNotFoundError|{missing}|{module} needs the {extra!r} extra, which installs {missing!r}: "
            f"pip install 'pipekit[{extra}]'"
        )

    def test_the_command_exits_with_one_line(self) -> None:
        """The ``pipekit`` command without typer exits 1 with one line naming the ``cli`` extra."""
        script = "import sys; sys.modules['typer'] = None; sys.argv = ['pipekit', 'version']\n"
        script += "from pipekit.cli import main; main()"
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=60)
        assert done.returncode == 1
        assert done.stderr == (
            "pipekit: error: the pipekit command needs the 'cli' extra, which installs 'typer': "
            "pip install 'pipekit[cli]'\n"
        )

    def test_the_core_needs_no_extra(self) -> None:
        """``import pipekit`` works without any extra's modules."""
        script = (
            "import sys\nfor m in ('httpx', 'packaging', 'msgspec', 'yaml', 'typer', 'rich'): sys.modules[m] = None\n"
        )
        script += "import pipekit, pipekit.store, pipekit.testing; print('ok')"
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
        assert done.stdout == "ok\n"
