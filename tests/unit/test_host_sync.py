"""The synchronous facade (its loop in a background thread) against the fake agent."""
import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import guestlink  # noqa: E402
from guestlink.host import errors  # noqa: E402
from test_host_fakeagent import ThreadedAgent, short_tmp  # noqa: E402


@pytest.fixture
def path(tmp_path):
    return os.path.join(short_tmp(tmp_path), "ctl.sock")


def test_sync_facade_verbs(path):
    with ThreadedAgent(path) as agent:
        with guestlink.sync.connect(ctl=path, data=path + ".d", timeout=3) as vm:
            assert vm.agent.hostname == "fakevm" and vm.connected
            assert 0 < vm.ping() < 3
            assert vm.info()["hostname"] == "fakevm"
            result = vm.run(["echo", "hi"])
            assert (result.returncode, result.stdout) == (0, b"hi\n")
            assert vm.run(["cat"], input=b"abc").stdout == b"abc"
            with pytest.raises(errors.CommandFailed) as failed:
                vm.run(["fail", "2"], check=True)
            assert failed.value.result.returncode == 2
            with pytest.raises(errors.CommandTimedOut):
                vm.run(["sleep", "5"], timeout=0.1)
            assert vm.publish("t", "x") == 1
            with vm.exec(["cat"], stdin=True) as proc:
                proc.write(b"streamed")
                proc.close_stdin()
                chunks = list(proc.output())
                done = proc.wait()
            assert chunks == [("stdout", b"streamed")] and done.returncode == 0
            assert proc.returncode == 0 and proc.pid == 4242
            with pytest.raises(errors.UnknownCommand):
                vm.call("nope")
    assert not vm.connected


def test_sync_subscribe_is_a_blocking_iterator(path):
    helper = ThreadedAgent(path)
    with helper as agent:
        with guestlink.sync.connect(path, timeout=3) as vm:
            sub = vm.subscribe("events")
            timer = threading.Timer(0.1, lambda: helper.call(agent.push, "events", b"late"))
            helper.call(agent.push, "events", b"first")
            timer.start()
            got = []
            for msg in sub:
                got.append(msg.data)
                if len(got) == 2:
                    break
            timer.join()
            sub.close()
            with pytest.raises(EOFError):
                sub.get(timeout=1)
    assert got == [b"first", b"late"]


def test_sync_connect_errors(path):
    with pytest.raises(errors.SocketNotFound):
        guestlink.sync.connect(ctl=path)
    with ThreadedAgent(path, silent=True):
        with pytest.raises(errors.AgentNotResponding):
            guestlink.sync.connect(ctl=path, timeout=0.2)
