"""Fixtures for the end-to-end suite against a real QEMU guest (see testvm/README.md).

Every test under tests/vm is marked ``vm``. Prerequisites are checked with `guestlink doctor`'s
checks (guestlink.doctor): QEMU by the ``testvm_base`` fixture, the rest by a test's
``@pytest.mark.needs("libguestfs", "supermin-kernel", ...)`` (names of doctor.HOST_CHECKS). A
missing one makes the test FAIL with doctor's line, verdict and fix (never skip): these tests must
run in CI, on a machine prepared by scripts/setup alone.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
for _p in (REPO, REPO / "src"):  # testvm, and guestlink for the tests (if not installed)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from guestlink import doctor  # noqa: E402
from testvm import TestVM, TestbedError, ensure_base  # noqa: E402
from vmhelpers import cli_env  # noqa: E402

HERE = Path(__file__).resolve().parent
_DEFAULT = object()


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(*names): host prerequisites the test needs, by "
                                       "guestlink doctor item name; a missing one fails the test")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.vm)


_verdicts = {}


def require(*names):
    """Fail the calling test with doctor's line for each prerequisite in ``names`` that is
    missing (each check runs once per session)."""
    for name in names:
        if name not in _verdicts:
            _verdicts[name] = doctor.HOST_CHECKS[name]()
    missing = [_verdicts[n].line() for n in names if not _verdicts[n].ok]
    if missing:
        pytest.fail("host prerequisite missing (scripts/setup installs it; guestlink doctor "
                    "checks it):\n" + "\n".join(missing), pytrace=False)


@pytest.fixture(autouse=True)
def _needs(request):
    for mark in request.node.iter_markers("needs"):
        require(*mark.args)


@pytest.fixture(scope="session")
def testvm_base():
    """The cached base image (kernel + initramfs); built on first use."""
    require("qemu")
    try:
        return ensure_base()
    except TestbedError as e:
        pytest.fail(f"cannot build the test VM: {e}", pytrace=False)


@pytest.fixture(scope="session")
def agent_pyz(tmp_path_factory):
    """The real agent zipapp, built with `python3 -m guestlink agent-bundle`."""
    out = tmp_path_factory.mktemp("agent") / "guestlink-agent.pyz"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, "-m", "guestlink", "agent-bundle", "-o", str(out)],
                       env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
    if r.returncode != 0 or not out.is_file():
        pytest.fail(f"`python3 -m guestlink agent-bundle -o {out}` failed "
                    f"(exit {r.returncode}):\n{r.stdout}", pytrace=False)
    return out


def _start(vm):
    try:
        vm.start()
    except TestbedError as e:
        vm.stop()
        pytest.fail(f"test VM failed to start: {e}", pytrace=False)
    except TimeoutError as e:
        vm.stop()
        pytest.fail(f"test VM did not boot: {e}", pytrace=False)
    return vm


@pytest.fixture(scope="session")
def vm(testvm_base, agent_pyz, tmp_path_factory):
    """One VM with the real agent, shared by the whole session."""
    v = TestVM(tmp_path_factory.mktemp("vm"), agent_pyz=agent_pyz)
    _start(v)
    yield v
    v.stop()


@pytest.fixture(scope="module")
def make_vm(testvm_base, request, tmp_path_factory):
    """Factory for tests that need a VM of their own: make_vm(**TestVM kwargs) -> started TestVM.

    agent_pyz defaults to the real agent (pass agent_pyz=None for no agent).
    start=False returns it unstarted. Module-scoped, so module-scoped fixtures can
    use it too: its VMs are stopped at the end of the test module (call vm.stop()
    earlier if a test is done with its VM)."""
    vms = []

    def make(agent_pyz=_DEFAULT, start=True, **kwargs):
        if agent_pyz is _DEFAULT:
            agent_pyz = request.getfixturevalue("agent_pyz")
        workdir = kwargs.pop("workdir", None) or tmp_path_factory.mktemp("vm")
        v = TestVM(workdir, agent_pyz=agent_pyz, **kwargs)
        vms.append(v)
        return _start(v) if start else v

    yield make
    for v in vms:
        v.stop()


@pytest.fixture
def run_cli(vm):
    """Run the real `guestlink` CLI against a VM (the session VM unless vm= is given)."""
    default_vm = vm

    def run(*args, vm=None, timeout=120):
        return subprocess.run([sys.executable, "-m", "guestlink"] + list(args),
                              env=cli_env(vm or default_vm),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=timeout)

    return run
