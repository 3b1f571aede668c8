"""Shared by tests/unit and tests/vm: the isolation of the guestlink master."""

import os
import tempfile as _tempfile

import pytest

# --- the guestlink master: isolated per pytest run (docs/master.md) ---------------------------
# Every CLI command would otherwise start (or reuse) this user's real master. This run gets its
# own master socket in a private temporary directory, the master is off unless a test turns it on
# (monkeypatch.setenv("GUESTLINK_MASTER", "1"): the master tests), masters started by tests exit
# after a short persist time, and whatever still runs at the end of the session is stopped.

_MASTER_DIR = _tempfile.mkdtemp(prefix="gl-master-")
os.environ["GUESTLINK_MASTER"] = "0"
os.environ["GUESTLINK_MASTER_SOCKET"] = os.path.join(_MASTER_DIR, "master.sock")
os.environ["GUESTLINK_PERSIST"] = "20s"


def _stop_test_masters():
    from guestlink.host import mastersock

    path = os.path.join(_MASTER_DIR, "master.sock")
    try:
        mastersock.request(mastersock.OP_STOP, {}, timeout=5, path=path)
    except Exception:
        return  # none running
    mastersock.wait_gone(path, 10)


@pytest.fixture(scope="session", autouse=True)
def _isolated_master():
    yield
    _stop_test_masters()
