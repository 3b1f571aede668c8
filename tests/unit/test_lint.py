"""mypy and ruff over the whole tree, configured in pyproject.toml, as part of the unit suite so that
CI (.ci/run -> scripts/test -> pytest) fails on a type or lint error. The guest side's 3.8 floor is
checked by vermin in test_architecture.py; the host's 3.9 floor is checked here."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent


def run_tool(*argv: str) -> None:
    proc = subprocess.run([str(BIN / argv[0])] + list(argv[1:]), cwd=str(ROOT),
                          capture_output=True, text=True)
    assert proc.returncode == 0, "%s exited %d:\n%s%s" % (
        " ".join(argv), proc.returncode, proc.stdout, proc.stderr)


def test_mypy() -> None:
    # The files and the per-module strictness come from [tool.mypy]; no cache so that a stale
    # .mypy_cache never hides an error.
    run_tool("mypy", "--no-incremental")


def test_ruff() -> None:
    run_tool("ruff", "check", "--no-cache", "src", "tests")


def test_host_side_runs_on_python_3_9() -> None:
    """mypy cannot target older than 3.10, so vermin reads the host code for the 3.9 floor of
    requires-python. asyncio.timeout is used only behind a sys.version_info >= (3, 11) check."""
    run_tool("vermin", "-q", "--no-tips", "--eval-annotations", "--backport", "typing",
             "--exclude", "asyncio.timeout", "-t=3.9-", "--violations", "src/guestlink")
