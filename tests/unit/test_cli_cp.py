"""``guestlink cp`` against the fake agent: Ctrl-C cancels the transfer and says so in one line."""
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import guestlink  # noqa: E402
from test_host_fakeagent import ThreadedAgent, short_tmp  # noqa: E402

SRC = os.path.dirname(os.path.dirname(os.path.abspath(guestlink.__file__)))


def test_ctrl_c_during_cp_cancels_it_and_says_what_became_of_it(tmp_path):
    d = short_tmp(tmp_path)
    ctl, data = os.path.join(d, "ctl.sock"), os.path.join(d, "data.sock")
    data_server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # stands in for the data port
    data_server.bind(data)
    data_server.listen(1)
    src = tmp_path / "f"
    src.write_bytes(b"data")
    opened = threading.Event()

    async def transfer_open(conn, id_, args):  # never gets ready: the CLI waits until Ctrl-C
        opened.set()
        await asyncio.sleep(3600)

    try:
        with ThreadedAgent(ctl, handlers={"transfer.open": transfer_open}) as agent:
            proc = subprocess.Popen(
                [sys.executable, "-m", "guestlink", "cp", "--ctl", ctl, "--data", data, str(src),
                 ":/tmp/f"], env=dict(os.environ, PYTHONPATH=SRC), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                assert opened.wait(20), "the CLI never asked for the transfer"
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=20)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            deadline = time.monotonic() + 2
            while not agent.cancels and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        data_server.close()
    assert proc.returncode == 130 and out == b""
    assert err == (b"guestlink: interrupted: the copy was cancelled (its partial data was removed); "
                   b"run it again to copy, --resume cannot continue a cancelled copy\n")
    assert len(agent.cancels) == 1  # the agent was told (it drops its temp file)
