"""End to end: the host library against the real agent in a real QEMU guest (virtio_console driver).

One VM serves the whole module (booted by the ``vm`` fixture in conftest.py); tests that change the
agent's configuration boot a VM of their own with ``make_vm``.
"""
import asyncio
import os
import socket
import time

import pytest

import guestlink
from guestlink.host import errors
from guestlink.protocol import FrameDecoder, FrameType, messages

TIMEOUT = 30.0


def run_async(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def connect(vm, **kwargs):
    kwargs.setdefault("timeout", TIMEOUT)
    return guestlink.connect(ctl=vm.ctl_path, data=vm.data_path, **kwargs)


def test_handshake_describes_the_agent(vm):
    async def main():
        async with connect(vm) as conn:
            return dict(conn.agent)

    agent = run_async(main())
    assert agent["agent"] == "guestlink-agent"
    assert agent["agent_version"] == guestlink.__version__
    assert agent["protocol"] == messages.PROTOCOL_VERSION
    assert agent["hostname"] == "guestlink-testvm"
    assert len(agent["boot_id"]) == 36
    assert {"ping", "info", "exec", "shutdown", "reboot"} <= set(agent["capabilities"])


def test_ping_and_info(vm):
    async def main():
        async with connect(vm) as conn:
            rtt = await conn.ping()
            info = await conn.info()
            return rtt, info

    rtt, info = run_async(main())
    assert 0 < rtt < TIMEOUT
    assert info["hostname"] == "guestlink-testvm"
    assert info["kernel"]["release"].endswith("-cloud-amd64")
    assert info["os_release"]["ID"] == "debian"
    assert info["uptime"] > 0
    assert info["agent_version"] == guestlink.__version__
    assert any(a["interface"] == "lo" for a in info["addresses"])


def test_exec_output_exit_codes_and_signals(vm):
    async def main():
        async with connect(vm) as conn:
            ok = await conn.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
            shell = await conn.run("echo $((6 * 7))")
            killed = await conn.run("kill -9 $$")
            with pytest.raises(errors.CommandFailed) as failed:
                await conn.run(["false"], check=True)
            with pytest.raises(errors.RemoteNotFound):
                await conn.run(["/no/such/program"])
            return ok, shell, killed, failed.value

    ok, shell, killed, failed = run_async(main())
    assert (ok.returncode, ok.stdout, ok.stderr) == (3, b"out\n", b"err\n")
    assert shell.returncode == 0 and shell.stdout == b"42\n"
    assert killed.returncode == -9 and killed.signal == 9
    assert failed.result.returncode == 1


def test_exec_output_is_streamed_before_the_command_ends(vm):
    async def main():
        async with connect(vm) as conn:
            async with conn.exec(["sh", "-c", "echo first; sleep 3; echo second"]) as proc:
                chunks = []
                async for stream, data in proc.output():
                    chunks.append((time.monotonic(), stream, data))
                result = await proc.wait()
            return chunks, result

    chunks, result = run_async(main())
    text = b"".join(d for _, s, d in chunks if s == "stdout")
    assert text == b"first\nsecond\n" and result.returncode == 0
    first_at = next(t for t, _, d in chunks if b"first" in d)
    second_at = next(t for t, _, d in chunks if b"second" in d)
    assert second_at - first_at > 2.0, "output was not streamed as produced"


def test_exec_stdin_env_cwd(vm):
    payload = bytes(range(256)) * 300  # 76,800 bytes: several frames, binary-safe

    async def main():
        async with connect(vm) as conn:
            echoed = await conn.run(["cat"], input=payload)
            env = await conn.run("echo $GREETING; pwd", env={"GREETING": "hello"}, cwd="/tmp")
            return echoed, env

    echoed, env = run_async(main())
    assert echoed.stdout == payload
    assert env.stdout == b"hello\n/tmp\n"


def test_timeout_kills_the_whole_process_group(vm):
    async def main():
        async with connect(vm) as conn:
            started = time.monotonic()
            with pytest.raises(errors.CommandTimedOut) as info:
                await conn.run("(sleep 300; echo never) & echo $! > /tmp/grandchild; wait", timeout=2)
            elapsed = time.monotonic() - started
            pid = (await conn.run(["cat", "/tmp/grandchild"])).stdout.strip().decode()
            alive = await conn.run(["sh", "-c", "kill -0 %s 2>/dev/null && echo alive || echo gone" % pid])
            return elapsed, info.value, alive.stdout

    elapsed, exc, alive = run_async(main())
    assert elapsed < 15
    assert exc.result.timed_out
    assert alive == b"gone\n"


def test_concurrent_execs_and_ping_stays_responsive(vm):
    async def main():
        async with connect(vm) as conn:
            started = time.monotonic()
            runs = [conn.run("sleep 2; echo %d" % i) for i in range(6)]
            gathered = asyncio.gather(*runs)
            await asyncio.sleep(0.3)
            rtt = await conn.ping()
            results = await gathered
            return time.monotonic() - started, rtt, results

    elapsed, rtt, results = run_async(main())
    assert [r.stdout for r in results] == [b"%d\n" % i for i in range(6)]
    assert elapsed < 2 * 6, "execs ran one after another"
    assert rtt < 2, "ping waited for a running exec"


def test_output_truncation_is_flagged(vm):
    async def main():
        async with connect(vm) as conn:
            async with conn.exec("head -c 300000 /dev/zero", output_limit=100000) as proc:
                return await proc.wait()

    result = run_async(main())
    assert len(result.stdout) == 100000 and result.stdout_truncated and result.returncode == 0


def test_messages_both_ways(vm):
    async def main():
        async with connect(vm) as conn:
            # guest -> host
            sub = conn.subscribe("guest.events")
            receive = asyncio.ensure_future(sub.__anext__())
            await asyncio.sleep(0.2)
            sent = await conn.run(["python3", "/opt/guestlink/guestlink-agent.pyz", "send", "guest.events",
                                   "hello from the guest"])
            msg = await asyncio.wait_for(receive, TIMEOUT)
            # host -> guest: a guest listener waits for one message on a topic
            async with conn.exec(["python3", "/opt/guestlink/guestlink-agent.pyz", "listen",
                                  "host.orders", "--count", "1"]) as listener:
                delivered = 0
                deadline = time.monotonic() + TIMEOUT
                while delivered == 0 and time.monotonic() < deadline:
                    delivered = await conn.publish("host.orders", b"reboot-not-really")
                    if not delivered:
                        await asyncio.sleep(0.2)  # the listener has not subscribed yet
                got = await listener.wait()
            return sent, msg, delivered, got

    sent, msg, delivered, got = run_async(main())
    assert sent.returncode == 0, sent.stderr
    assert (msg.topic, msg.data) == ("guest.events", b"hello from the guest")
    assert delivered == 1
    assert got.returncode == 0 and b"reboot-not-really" in got.stdout


def test_host_reconnect_mid_session(vm):
    """Close the socket with a command running, reopen: the agent ends the old session cleanly."""
    async def main():
        async with connect(vm, reconnect=False) as conn:
            await conn.run("rm -f /tmp/orphan; true")
            pending = asyncio.ensure_future(conn.run("sleep 30; touch /tmp/orphan"))
            await asyncio.sleep(1.0)
        with pytest.raises((errors.ConnectionLost, asyncio.CancelledError, errors.GuestlinkError)):
            await pending
        async with connect(vm) as conn:
            rtt = await conn.ping()
            ps = await conn.run("ps | grep -c '[s]leep 30' || true")
            return rtt, ps.stdout

    rtt, count = run_async(main())
    assert rtt < TIMEOUT
    assert count.strip() == b"0", "the old session's process group was not killed"


class RawPort:
    """A bare protocol peer on the control socket, without the host library."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(1.0)
        self.decoder = FrameDecoder()

    def frames(self, deadline):
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                yield None  # let the caller resend what the protocol says to resend
                continue
            assert data, "the control socket closed"
            for event in self.decoder.feed(data):
                if hasattr(event, "payload"):
                    yield event
        raise AssertionError("no answer before the deadline")

    def handshake(self, nonce):
        """Resend SYNC every second and on every HELLO, as docs/protocol.md requires."""
        self.sock.sendall(messages.encode_sync(nonce))
        for frame in self.frames(time.monotonic() + TIMEOUT):
            if frame is None or frame.type == FrameType.HELLO:
                self.sock.sendall(messages.encode_sync(nonce))
            elif frame.type == FrameType.SYNC_ACK and messages.parse_sync_ack(frame.payload)[0] == nonce:
                return

    def request(self, id, op):
        self.sock.sendall(messages.encode_request(id, op))
        for frame in self.frames(time.monotonic() + TIMEOUT):
            if frame is not None and frame.id == id and frame.type in (FrameType.RESPONSE, FrameType.ERROR):
                return frame

    def close(self):
        self.sock.close()


def test_raw_garbage_then_a_normal_request(vm):
    """Garbage and half frames on the port, before and inside a session, must not wedge the agent."""
    raw = RawPort(vm.ctl_path)
    try:
        half = messages.encode_request(99, "ping")
        raw.sock.sendall(os.urandom(5000) + b"\x89GLK" + os.urandom(7) + half[: len(half) // 2])
        raw.handshake("rawnonce-1")
        # Inside the established session: garbage, and magics followed by broken headers.
        raw.sock.sendall(os.urandom(3000).replace(b"\x89", b"x") + b"\x89GLK\x01\x04" + os.urandom(40)
                         + b"\x89GLK" + half[4:19])
        reply = raw.request(7, "ping")
        assert reply.type == FrameType.RESPONSE, messages.parse_error(reply.payload)
        assert messages.parse_response(reply.payload) == {"pong": True}
    finally:
        raw.close()

    async def main():
        async with connect(vm) as conn:
            return await conn.ping()

    assert run_async(main()) < TIMEOUT


def test_agent_restart_inside_the_guest(vm):
    async def main():
        async with connect(vm) as conn:
            before = dict(conn.agent)
            pid = (await conn.run("pgrep -f 'guestlink-agent.pyz run' | head -n1")).stdout.strip().decode()
            assert pid.isdigit()
            await conn.run("setsid sh -c 'sleep 1; kill -TERM %s' </dev/null >/dev/null 2>&1 &" % pid)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    await conn.ping(timeout=5)
                except (errors.ConnectionLost, errors.RequestNotSent, errors.RequestTimeout):
                    pass
                if conn.agent["session"] != before["session"]:
                    break
                await asyncio.sleep(0.5)
            after = dict(conn.agent)
            new_pid = (await conn.run("pgrep -f 'guestlink-agent.pyz run' | head -n1")).stdout.strip().decode()
            return before, after, pid, new_pid

    before, after, pid, new_pid = run_async(main())
    assert after["session"] != before["session"], "the client never saw the restarted agent"
    assert after["boot_id"] == before["boot_id"]
    assert new_pid != pid


def test_cli_against_the_vm(vm, run_cli):
    ping = run_cli("ping", "--json")
    assert ping.returncode == 0, ping.stderr
    info = run_cli("info", "--json")
    assert info.returncode == 0 and '"hostname": "guestlink-testvm"' in info.stdout.replace('":"', '": "')
    code = run_cli("exec", "--", "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7")
    assert code.returncode == 7
    assert code.stdout == "to-stdout\n" and code.stderr == "to-stderr\n"
    assert run_cli("exec", "--", "sh", "-c", "kill -TERM $$").returncode == 128 + 15
    assert run_cli("exec", "--timeout", "1", "--", "sleep", "30").returncode == 124


def test_a_new_host_is_noticed_at_once_and_an_agent_without_one_stays_idle(vm):
    """The agent learns of a host connecting from the driver's wakeup (edge-triggered epoll on
    the port), not from a once-a-second poll; without a host it does not spin."""
    async def handshake_seconds():
        t0 = time.monotonic()
        async with connect(vm) as conn:
            await conn.ping()
        return time.monotonic() - t0

    async def agent_cpu_ticks():
        async with connect(vm) as conn:
            r = await conn.run(["sh", "-c", "cut -d' ' -f14,15 /proc/$(cat /run/guestlink-agent.pid)"
                                            "/stat"], check=True)
            return sum(int(x) for x in r.stdout.split())

    async def main():
        await handshake_seconds()  # the agent may still be starting after the boot
        await asyncio.sleep(0.3)
        waits = []
        for _ in range(5):
            waits.append(await handshake_seconds())
            await asyncio.sleep(0.3)  # the agent is back to "no host" (it polled every 1 s)
        before = await agent_cpu_ticks()
        await asyncio.sleep(3)
        after = await agent_cpu_ticks()
        return waits, after - before

    waits, ticks = run_async(main())
    print("handshake after a reconnect: %s s; agent CPU over 3 s without a host: %d ticks"
          % (", ".join("%.3f" % w for w in waits), ticks))
    assert max(waits) < 0.5, waits  # a 1 s poll would make most of them 0.3-1 s
    assert ticks < 100, ticks  # spinning would burn ~300 (3 s at 100 Hz)
