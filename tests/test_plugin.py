"""The ``pytest11`` entry point: pipekit installed in a fresh virtualenv gives a user's tests their fixtures.

A scratch virtualenv sees the project's environment (pytest, anyio, trio, the
OpenTelemetry SDK, hatchling, pip) through a ``.pth`` file, gets pipekit by a
real, non-editable ``pip install`` of this checkout, and runs a small user test
file with plain ``python -m pytest -p anyio``: only the entry point can provide
the fixtures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Each test may wait for its subprocesses (all bounded): venv 30 s + probe 15 s + pip 60 s, then pytest 60 s.
pytestmark = pytest.mark.timeout(180)

USER_PYTEST_INI = """\
[pytest]
anyio_mode = auto
addopts = --strict-markers
filterwarnings = error
"""

USER_TESTS = '''\
"""A user's tests: nothing here loads pipekit's plugin, the entry point does."""

import sys
from pathlib import Path

import anyio
import pytest

import pipekit as pk
import pipekit.testing.plugin
from pipekit.testing import assert_span_tree, assert_status


def test_plugin_came_from_the_installed_entry_point(request):
    """The plugin is registered under its entry-point name, from the installed copy of pipekit."""
    assert request.config.pluginmanager.get_plugin("pipekit") is pipekit.testing.plugin
    assert Path(pk.__file__).resolve().is_relative_to(Path(sys.prefix).resolve())


async def test_retry_on_the_fake_clock(pipekit_clock, mock_stage, pipekit_events):
    """Runs on asyncio and trio: 30 s of back-off take no real time and are exact."""
    push = mock_stage("push", output="tag", fail_times=2)
    policy = pk.RetryPolicy(max_attempts=3, initial_delay=30, multiplier=1, jitter=0)
    start = pipekit_clock.now()
    response = await pk.Pipeline("release").add_stage(push, retry=policy, timeout=60).execute()
    assert_status(response, pk.Status.SUCCEEDED)
    assert [call.time - start for call in push.calls] == [0, 30, 60]
    assert "stage_retrying" in pipekit_events.kinds()


@pytest.mark.pipekit_clock(backends=["trio"])
async def test_marked_for_trio_only():
    """The marker puts the test on trio's fake clock only."""
    await anyio.sleep(3600)
    assert pipekit.testing.current_fake_clock().backend == "trio"


async def test_spans(pipekit_spans, mock_stage):
    """Spans of the test's runs are captured on a private provider."""
    await pk.Pipeline("release").add_stage(mock_stage("build")).execute()
    assert_span_tree(pipekit_spans, """
        pipeline release
            stage build
    """)


async def test_plain_anyio_test_is_left_alone():
    """A test asking for none of the fixtures runs on anyio's own backends, on the real clock."""
    with pytest.raises(RuntimeError, match="real clock"):
        pipekit.testing.current_fake_clock()
'''

#: The sync test, then the async ones on asyncio and trio (anyio's default), but the trio-only one.
USER_TESTS_PASSING = 1 + 2 + 1 + 2 + 2


def _clean_env() -> dict[str, str]:
    """The environment without what would let the checkout, or other options, leak into the scratch venv."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTEST_ADDOPTS", "PYTEST_PLUGINS"):
        env.pop(name, None)
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)  # entry points are the point
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(args: list[str | Path], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a command with a bounded timeout, failing with its output when it fails."""
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch virtualenv with pipekit installed from this checkout (non-editable); its python."""
    work = tmp_path_factory.mktemp("plugin")
    venv = work / "venv"
    # No pip of its own (ensurepip is slow): the project's pip is visible through the .pth below.
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=work, timeout=30)
    python = venv / "bin" / "python"
    probe = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = Path(_run([python, "-c", probe], cwd=work, timeout=15).stdout.strip())
    paths = sysconfig.get_paths()
    project_dirs = dict.fromkeys([paths["purelib"], paths["platlib"]])  # the running (project) environment's
    (site_packages / "project-env.pth").write_text("".join(f"{d}\n" for d in project_dirs), encoding="utf-8")
    _run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", ROOT],
        cwd=work,
        timeout=60,
    )
    return python


class TestEntryPoint:
    def test_installed_distribution_declares_the_plugin(self, venv_python: Path) -> None:
        """In the scratch venv, ``pytest11`` lists ``pipekit``, from the installed (not editable) distribution."""
        probe = textwrap.dedent(
            """
            import importlib.metadata as md, json, sys
            dist = md.distribution("pipekit")
            print(json.dumps({
                "entry_points": [[e.name, e.value] for e in md.entry_points(group="pytest11")],
                "location": str(dist.locate_file("")),
                "files": [str(f) for f in dist.files or ()],
                "prefix": sys.prefix,
            }))
            """
        )
        found = json.loads(_run([venv_python, "-c", probe], cwd=venv_python.parent, timeout=15).stdout)
        assert ["pipekit", "pipekit.testing.plugin"] in found["entry_points"]
        assert Path(found["location"]).resolve().is_relative_to(Path(found["prefix"]).resolve())
        assert "pipekit/testing/plugin.py" in found["files"]
        assert not [f for f in found["files"] if f.endswith(".pth")]  # a real install, not an editable one

    def test_user_tests_get_the_fixtures(self, venv_python: Path, tmp_path: Path) -> None:
        """A user's test file using the fixtures passes on asyncio and trio, without ``-p pipekit...``."""
        (tmp_path / "pytest.ini").write_text(USER_PYTEST_INI, encoding="utf-8")
        (tmp_path / "test_user.py").write_text(USER_TESTS, encoding="utf-8")
        result = subprocess.run(
            [str(venv_python), "-m", "pytest", "-p", "anyio", "-p", "no:cacheprovider", "-v", "test_user.py"],
            cwd=tmp_path,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert f"{USER_TESTS_PASSING} passed" in result.stdout, output
        for variant in ("test_retry_on_the_fake_clock[asyncio]", "test_retry_on_the_fake_clock[trio]"):
            assert f"{variant} PASSED" in result.stdout, output
        assert "test_marked_for_trio_only[trio] PASSED" in result.stdout, output
