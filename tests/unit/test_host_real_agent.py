"""The host client and CLI against the REAL agent (a subprocess), no VM.

A small relay stands in for QEMU's virtio-serial chardev: the agent connects to one unix socket
(``--ctl-device unix:PATH``), the host client to another, and the relay keeps the host side open
across agent restarts, as a virtio port does.
"""
import asyncio
import os
import subprocess
import sys
import tempfile

import pytest

import guestlink
from guestlink.host import errors

SRC = os.path.dirname(os.path.dirname(os.path.abspath(guestlink.__file__)))
ENV = dict(os.environ, PYTHONPATH=SRC)


class Relay:
    def __init__(self, directory):
        self.dir = directory
        self.agent_path = os.path.join(directory, "agent.sock")
        self.host_path = os.path.join(directory, "host.sock")
        self.agent_writer = None
        self.agent_ready = None
        self.host_writer = None
        self.servers = []
        self.procs = []

    async def start(self):
        self.agent_ready = asyncio.Event()
        self.servers.append(await asyncio.start_unix_server(self._on_agent, self.agent_path))
        self.servers.append(await asyncio.start_unix_server(self._on_host, self.host_path))
        return self

    async def _on_agent(self, reader, writer):
        self.agent_writer = writer
        self.agent_ready.set()
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if self.host_writer is not None and not self.host_writer.is_closing():
                self.host_writer.write(data)
        if self.agent_writer is writer:
            self.agent_writer = None
            self.agent_ready.clear()

    async def _on_host(self, reader, writer):
        self.host_writer = writer
        while True:
            data = await reader.read(65536)
            if not data:
                break
            await self.agent_ready.wait()
            self.agent_writer.write(data)
        writer.close()

    async def start_agent(self):
        conf = os.path.join(self.dir, "agent.conf")
        open(conf, "a").close()
        self.agent_ready.clear()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "guestlink.agent", "run", "--config", conf,
            "--ctl-device", "unix:" + self.agent_path, "--socket", os.path.join(self.dir, "local.sock"),
            "--handlers-dir", os.path.join(self.dir, "handlers"), "--log-level", "warning", env=ENV)
        self.procs.append(proc)
        await asyncio.wait_for(self.agent_ready.wait(), 10)
        return proc

    async def stop(self):
        for proc in self.procs:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
        for server in self.servers:
            server.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 40))


@pytest.fixture
def directory():
    with tempfile.TemporaryDirectory(prefix="glr-") as d:
        yield d


def test_real_agent_verbs(directory):
    async def main():
        relay = await Relay(directory).start()
        await relay.start_agent()
        try:
            async with guestlink.connect(ctl=relay.host_path, timeout=10) as vm:
                agent = dict(vm.agent)
                rtt = await vm.ping()
                info = await vm.info()
                ok = await vm.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
                killed = await vm.run("kill -9 $$")
                payload = bytes(range(256)) * 300
                echoed = await vm.run(["cat"], input=payload)
                env = await vm.run("echo $GREETING; pwd", env={"GREETING": "hi"}, cwd="/tmp")
                with pytest.raises(errors.CommandTimedOut) as timed:
                    await vm.run("echo partial; sleep 5", timeout=0.5)
                with pytest.raises(errors.RemoteNotFound):
                    await vm.run(["/no/such/program"])
                with pytest.raises(errors.UnknownCommand):
                    await vm.call("no-such-op")
                async with vm.exec(["sleep", "30"]):
                    pass  # leaving early cancels it
                many = await asyncio.gather(*[vm.run("echo %d" % i) for i in range(8)])
                trunc = await vm.run("head -c 300000 /dev/zero", output_limit=100000)
                return agent, rtt, info, ok, killed, echoed.stdout == payload, env, timed.value, many, trunc
        finally:
            await relay.stop()

    agent, rtt, info, ok, killed, echoed, env, timed, many, trunc = run(main())
    assert agent["agent"] == "guestlink-agent" and "exec" in agent["capabilities"]
    assert rtt > 0 and info["agent_version"] == guestlink.__version__
    assert (ok.returncode, ok.stdout, ok.stderr) == (3, b"out\n", b"err\n")
    assert (killed.returncode, killed.signal) == (-9, 9)
    assert echoed and env.stdout == b"hi\n/tmp\n"
    assert timed.result.timed_out and timed.stdout == b"partial\n"
    assert [r.stdout for r in many] == [b"%d\n" % i for i in range(8)]
    assert len(trunc.stdout) == 100000 and trunc.stdout_truncated


def test_real_agent_restart_is_detected(directory):
    async def main():
        relay = await Relay(directory).start()
        first = await relay.start_agent()
        try:
            async with guestlink.connect(ctl=relay.host_path, timeout=10) as vm:
                before = vm.agent["session"]
                pending = asyncio.ensure_future(vm.run(["sleep", "30"]))
                await asyncio.sleep(0.3)
                first.terminate()
                await first.wait()
                # over virtio the host learns of the restart only from the new agent's HELLO
                await relay.start_agent()
                with pytest.raises(errors.ConnectionLost) as lost:
                    await pending
                assert "restarted" in str(lost.value)
                rtt = await vm.ping(timeout=10)
                return before, vm.agent["session"], rtt
        finally:
            await relay.stop()

    before, after, rtt = run(main())
    assert before != after and rtt > 0


def test_real_agent_cli(directory):
    async def main():
        relay = await Relay(directory).start()
        await relay.start_agent()
        try:
            async def cli(*argv):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "guestlink", argv[0], "--ctl", relay.host_path, *argv[1:], env=ENV,
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                out, err = await proc.communicate()
                return proc.returncode, out, err
            # (the relay serves one host at a time, like QEMU's chardev)
            code = await cli("exec", "--", "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7")
            killed = await cli("exec", "--", "sh", "-c", "kill -TERM $$")
            timed = await cli("exec", "--timeout", "0.5", "--", "sleep", "30")
            return code, killed, timed
        finally:
            await relay.stop()

    code, killed, timed = run(main())
    assert code == (7, b"to-stdout\n", b"to-stderr\n")
    assert killed[0] == 128 + 15
    assert timed[0] == 124
