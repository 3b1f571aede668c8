"""The agent's transfer worker (agent/transfers.py) with a unix socket as the data port, no VM:
a host CANCEL removes the push's temp file even when the worker fails for another reason after
it (the host closes its data socket right after cancelling: "the peer went away")."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from guestlink.protocol import Fields  # noqa: E402
from guestlink.protocol.transfer import PARTIAL_PREFIX  # noqa: E402

# the `bed` fixture (a FileOps with a unix socket as its data port) is in conftest.py


def test_cancel_then_host_hangup_still_drops_the_temp_file(bed):
    target, server, agent, files = bed.target, bed.server, bed.agent, bed.files
    files.op_transfer_open(7, Fields({"transfer": 99, "direction": "push",
                                      "path": target + "/dst", "size": 10 << 20,
                                      "mtime_ns": 1, "checksum": "crc32"}, "args"))
    tr = agent.session.transfers[7]
    assert agent.events[0]["event"] == "ready"
    assert [n for n in os.listdir(target) if n.startswith(PARTIAL_PREFIX)]
    host, _ = server.accept()
    host.settimeout(10)
    assert host.recv(4096)  # the agent's DATA_HELLO: its worker now waits for the host's
    time.sleep(0.05)  # let it block in poll, so that the hangup (not the flag) wakes it
    # what the server does on CANCEL, then the host drops its data socket
    agent.session.transfers.pop(7)
    files.cancel(tr, "cancelled by the host", keep_partial=False)
    host.close()
    _, result, err = agent.results.get(timeout=10)
    files.finished(tr, result, err)  # the loop's part
    assert err is not None and result is None
    assert agent.replies == []  # the cancel was the answer
    assert os.listdir(target) == []  # the cancelled push left no temp file
    assert files.active is None
