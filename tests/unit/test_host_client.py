"""The asyncio host client against a fake agent over a real unix socket."""
import asyncio
import os
import socket
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import guestlink  # noqa: E402
from guestlink.host import errors  # noqa: E402
from guestlink.host.client import Runstate  # noqa: E402
from guestlink.protocol import FrameType, codes  # noqa: E402
from guestlink.protocol import messages as m  # noqa: E402
from test_host_fakeagent import DESCRIPTION, FakeAgent, Reply, raw_frame, short_tmp  # noqa: E402


def run(coro, limit=15):
    return asyncio.run(asyncio.wait_for(coro, limit))


@pytest.fixture
def path(tmp_path):
    return os.path.join(short_tmp(tmp_path), "ctl.sock")


def connect(path, **kw):
    kw.setdefault("timeout", 3)
    return guestlink.connect(ctl=path, data=path + ".data", **kw)


# --- handshake ---------------------------------------------------------------------------------

def test_handshake_exposes_the_validated_agent_and_uses_fresh_nonces(path):
    async def main():
        async with FakeAgent(path) as agent:
            async with connect(path) as vm:
                first = vm.agent
                state = vm.runstate
            async with connect(path) as vm:
                pass
            return first, state, agent.nonces

    agent, state, nonces = run(main())
    assert state is Runstate.RUNNING
    assert dict(agent) == dict(DESCRIPTION, capabilities=tuple(DESCRIPTION["capabilities"]))
    assert (agent.version, agent.hostname, agent.protocol) == ("0.1.0", "fakevm", 1)
    assert agent.boot_id == DESCRIPTION["boot_id"] and "exec" in agent.capabilities
    assert len(set(nonces)) == 2  # (each may be sent twice: once more on the agent's HELLO)
    assert all(len(n) >= 32 and int(n, 16) >= 0 for n in nonces)


def test_stale_sync_ack_and_garbage_are_ignored(path):
    async def main():
        async with FakeAgent(path, stale_ack=True, garbage=os.urandom(3000) + b"\x89GLK\x01") as agent:
            async with connect(path) as vm:
                rtt = await vm.ping()
                # garbage between frames after the handshake too
                agent.conn.send(b"\x00\x89GL junk " * 50)
                rtt2 = await vm.ping()
                return vm.agent, vm.stats, rtt, rtt2

    agent, stats, rtt, rtt2 = run(main())
    assert agent.hostname == "fakevm"  # not the stale ack's "stale"
    assert stats["stale_frames"] >= 1 and stats["garbage_bytes"] > 3000
    assert 0 < rtt < 3 and 0 < rtt2 < 3


def test_sync_is_resent_on_hello(path):
    async def main():
        async with FakeAgent(path, ignore_syncs=1, hello=False) as agent:
            async def hello_later():
                await asyncio.sleep(0.2)
                agent.conn.send(m.encode_hello(agent.description))
            started = time.monotonic()
            asyncio.ensure_future(hello_later())
            async with connect(path) as vm:
                await vm.ping()
            return time.monotonic() - started, agent.nonces

    elapsed, nonces = run(main())
    assert elapsed < 0.9  # answered after the HELLO, not the 1 s resend
    assert len(nonces) == 2 and nonces[0] == nonces[1]  # same nonce resent


def test_sync_is_resent_every_second(path):
    async def main():
        async with FakeAgent(path, ignore_syncs=1, hello=False) as agent:
            started = time.monotonic()
            async with connect(path) as vm:
                await vm.ping()
            return time.monotonic() - started, agent.nonces

    elapsed, nonces = run(main())
    assert 0.9 < elapsed < 2.5 and len(nonces) == 2


def test_missing_socket_and_nobody_listening(path):
    async def main():
        with pytest.raises(errors.SocketNotFound) as missing:
            await connect(path)
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)  # a socket file nobody listens on
        try:
            with pytest.raises(errors.NotListening) as refused:
                await connect(path)
        finally:
            s.close()
        return missing.value, refused.value

    missing, refused = run(main())
    assert "does not exist" in str(missing) and missing.path == path
    assert isinstance(missing, errors.ConnectError) and isinstance(refused, errors.ConnectError)
    assert "nobody is listening" in str(refused)


def test_silent_agent_raises_agent_not_responding(path):
    async def main():
        async with FakeAgent(path, silent=True) as agent:
            started = time.monotonic()
            with pytest.raises(errors.AgentNotResponding) as exc:
                await connect(path, timeout=0.3)
            return time.monotonic() - started, exc.value, agent

    elapsed, exc, agent = run(main())
    assert elapsed < 1.5 and "did not answer" in str(exc)


def test_protocol_mismatch(path):
    async def main():
        async with FakeAgent(path, mismatch=True):
            with pytest.raises(errors.ProtocolMismatch) as by_error:
                await connect(path)
        async with FakeAgent(path, ack_override=lambda nonce: m.encode_sync_ack(
                nonce, dict(DESCRIPTION, protocol=2))):
            with pytest.raises(errors.ProtocolMismatch) as by_ack:
                await connect(path)
        from guestlink.protocol.frames import encode_header
        async with FakeAgent(path, ack_override=lambda nonce: encode_header(
                FrameType.SYNC_ACK, 0, version=2)):
            with pytest.raises(errors.ProtocolMismatch) as by_version:
                await connect(path)
        async with FakeAgent(path, ack_override=lambda nonce: raw_frame(
                FrameType.SYNC_ACK, b'{"nonce": "%s", "agent": 5}' % nonce.encode())):
            with pytest.raises(errors.ProtocolError) as malformed:
                await connect(path)
        return by_error.value, by_ack.value, by_version.value, malformed.value

    by_error, by_ack, by_version, malformed = run(main())
    assert "protocol" in str(by_error) and isinstance(by_error, errors.ProtocolError)
    assert "protocol 2" in str(by_ack)
    assert "version 2" in str(by_version)
    assert not isinstance(malformed, errors.ProtocolMismatch)


# --- verbs ---------------------------------------------------------------------------------------

def test_ping_info_call_power(path):
    async def greet(conn, id_, args):
        return {"greeting": "hello %s" % args.str("name")}

    async def main():
        async with FakeAgent(path, handlers={"greet": greet}) as agent:
            async with connect(path) as vm:
                rtt = await vm.ping()
                info = await vm.info()
                greeting = await vm.call("greet", name="tester")
                greeting2 = await vm.call("greet", {"name": "dict", "timeout": 1}, timeout=2)
                await vm.shutdown()
                await vm.reboot()
                with pytest.raises(ValueError):
                    await vm.call("Bad Name")
                return rtt, info, greeting, greeting2, agent.power, agent.requests

    rtt, info, greeting, greeting2, power, requests = run(main())
    assert isinstance(rtt, float) and 0 < rtt < 3
    assert info["hostname"] == "fakevm" and info["kernel"]["release"] == "6.1.0-cloud-amd64"
    assert info["os_release"]["ID"] == "debian" and info["addresses"][0]["interface"] == "lo"
    assert info["uptime"] == 12.5 and "exec" in info["capabilities"]
    assert greeting == {"greeting": "hello tester"} and greeting2 == {"greeting": "hello dict"}
    assert ("greet", {"name": "dict", "timeout": 1}) in requests
    assert power == ["shutdown", "reboot"]


def test_remote_errors_map_to_classes(path):
    async def refuse(conn, id_, args):
        raise Reply(args.str("code"), "refused: " + args.str("code"), {"why": "test"})

    async def main():
        async with FakeAgent(path, handlers={"refuse": refuse}) as agent:
            async with connect(path) as vm:
                got = {}
                for code in list(codes.ERROR_CODES) + ["brand_new_code"]:
                    if code == codes.NOT_READY:
                        continue  # triggers a re-handshake, tested separately
                    with pytest.raises(errors.GuestlinkError) as exc:
                        await vm.call("refuse", code=code)
                    got[code] = exc.value
                with pytest.raises(errors.UnknownCommand):
                    await vm.call("no-such-op")
                with pytest.raises(errors.CommandDenied) as denied:
                    await vm.run(["forbidden"])
                with pytest.raises(errors.RemoteNotFound):
                    await vm.run(["missing"])
                return got, denied.value

    got, denied = run(main())
    assert type(got["denied"]) is errors.CommandDenied
    assert type(got["brand_new_code"]) is errors.RemoteError
    assert got["brand_new_code"].code == "brand_new_code"
    assert isinstance(got[codes.PROTOCOL_MISMATCH], errors.ProtocolMismatch)
    for code, exc in got.items():
        if code not in (codes.PROTOCOL_MISMATCH, "brand_new_code"):
            assert type(exc) is errors.REMOTE_ERRORS[code]
            assert exc.code == code and exc.details == {"why": "test"}
            assert "refused: " + code in str(exc)
    assert "policy" in str(denied) and denied.code == "denied"


def test_timeout_errors_are_builtin_timeout_errors():
    """``except TimeoutError`` catches every guestlink timeout, and nothing else of the tree."""
    timeouts = {errors.AgentNotResponding, errors.RequestTimeout, errors.RemoteTimeout,
                errors.CommandTimedOut}
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type):
            assert issubclass(cls, TimeoutError) == (cls in timeouts), name
    exc = errors.RequestTimeout("no reply to ping from the agent within the timeout")
    assert str(exc) == "no reply to ping from the agent within the timeout" and exc.errno is None


def test_every_error_code_has_a_class():
    assert set(errors.REMOTE_ERRORS) == set(codes.ERROR_CODES)
    for code, cls in errors.REMOTE_ERRORS.items():
        exc = errors.remote_error(code, "msg")
        assert isinstance(exc, cls) and exc.code == code
        assert issubclass(cls, (errors.RemoteError, errors.ProtocolError))
    # the documented tree: one docstring names every class
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert name in errors.__doc__, name


# --- exec ----------------------------------------------------------------------------------------

def test_run_collects_output_and_status(path):
    async def main():
        async with FakeAgent(path) as agent:
            async with connect(path) as vm:
                ok = await vm.run(["echo", "hello", "world"])
                shell = await vm.run("echo via shell")
                failed = await vm.run(["fail", "3"])
                killed = await vm.run(["kill", "9"])
                with pytest.raises(errors.CommandFailed) as check:
                    await vm.run(["fail", "4"], check=True)
                with pytest.raises(errors.CommandFailed) as check_kill:
                    await vm.run(["kill", "15"], check=True)
                fed = await vm.run(["cat"], input=b"\x00binary\xff" * 30000)
                fed_str = await vm.run(["cat"], input="text")
                await vm.run(["args"], env={"A": "1"}, cwd="/tmp", timeout=5)
                await vm.run(["true", "a b"], shell=True)
                await vm.run("echo 'x y' z", shell=False)
                return ok, shell, failed, killed, check.value, check_kill.value, fed, fed_str, agent.execs

    ok, shell, failed, killed, check, check_kill, fed, fed_str, execs = run(main())
    assert (ok.returncode, ok.stdout, ok.stderr, ok.args) == (0, b"hello world\n", b"", ["echo", "hello", "world"])
    assert ok.pid == 4242 and ok.signal is None and not ok.timed_out and ok.duration == 0.01
    assert shell.stdout == b"via shell\n" and execs[1]["shell"] == "echo via shell"
    assert (failed.returncode, failed.stderr) == (3, b"failing\n")
    assert (killed.returncode, killed.signal) == (-9, 9)
    assert check.result.returncode == 4 and check.stderr == b"failing\n" and "status 4" in str(check)
    assert "signal 15" in str(check_kill)
    assert fed.stdout == b"\x00binary\xff" * 30000 and fed_str.stdout == b"text"
    assert execs[6]["stdin"] is True and "stdin" not in execs[0]
    args_req = execs[8]
    assert args_req["env"] == {"A": "1"} and args_req["cwd"] == "/tmp" and args_req["timeout"] == 5
    assert args_req["output_limit"] == 64 * 1024 * 1024
    assert execs[9]["shell"] == "true 'a b'" and execs[10]["argv"] == ["echo", "x y", "z"]


def test_options_objects_are_the_keyword_arguments(path):
    """connect()/exec() build a ConnectOptions/ExecOptions; connect_with()/exec_with() take one."""
    from guestlink.host.client import connect_with
    from guestlink.host.options import ConnectOptions, ExecOptions

    with pytest.raises(ValueError):
        ConnectOptions(ctl=path, domain="vm1")
    with pytest.raises(ValueError):
        ConnectOptions(ctl=path, ctl_name="x")
    with pytest.raises(ValueError):
        ConnectOptions()
    with pytest.raises(ValueError):
        ConnectOptions(ctl=path, timeout=float("inf"))
    assert ConnectOptions(ctl=path, timeout=3).timeout == 3.0

    async def main():
        async with FakeAgent(path) as agent:
            async with connect_with(ConnectOptions(ctl=path, timeout=3)) as vm:
                async with vm.exec_with(["echo", "hi"], ExecOptions(cwd="/tmp")) as proc:
                    result = await proc.wait()
                return vm.timeout, result, agent.execs

    timeout, result, execs = run(main())
    assert timeout == 3.0 and result.stdout == b"hi\n"
    assert execs[0]["cwd"] == "/tmp" and execs[0]["output_limit"] == 64 * 1024 * 1024


def test_exec_streams_output_and_stdin(path):
    async def main():
        async with FakeAgent(path) as agent:
            async with connect(path) as vm:
                async with vm.exec(["cat"], stdin=True) as proc:
                    assert proc.pid == 4242
                    chunks = []
                    reader_done = asyncio.Event()

                    async def read():
                        async for stream, data in proc.output():
                            chunks.append((stream, data))
                        reader_done.set()
                    reader = asyncio.ensure_future(read())
                    await proc.write(b"one ")
                    for _ in range(200):
                        if chunks:
                            break
                        await asyncio.sleep(0.01)
                    first = list(chunks)
                    await proc.write("two")
                    await proc.close_stdin()
                    await reader
                    result = await proc.wait()
                async with vm.exec(["both", "5"]) as proc2:
                    result2 = await proc2.wait()  # nothing consumed: wait() returns it all
                return first, chunks, result, result2, proc.returncode

    first, chunks, result, result2, returncode = run(main())
    assert first == [("stdout", b"one ")]  # streamed before stdin was closed
    assert chunks == [("stdout", b"one "), ("stdout", b"two")]
    assert result.stdout == b"" and result.returncode == 0 and returncode == 0
    assert (result2.stdout, result2.stderr, result2.returncode) == (b"to-stdout\n", b"to-stderr\n", 5)


def test_timeout_gives_partial_output(path):
    async def main():
        async with FakeAgent(path) as agent:
            async with connect(path) as vm:
                started = time.monotonic()
                with pytest.raises(errors.CommandTimedOut) as exc:
                    await vm.run(["sleep", "10"], timeout=0.2)
                return time.monotonic() - started, exc.value

    elapsed, exc = run(main())
    assert elapsed < 2
    assert exc.result.timed_out and exc.stdout == b"sleeping\n" and exc.timeout == 0.2
    assert "timed out" in str(exc)


def test_leaving_exec_early_cancels_remotely(path):
    async def main():
        async with FakeAgent(path) as agent:
            async with connect(path) as vm:
                async with vm.exec(["sleep", "30"]) as proc:
                    async for stream, data in proc.output():
                        break  # got "sleeping", leave
                cancelled_ids = list(agent.cancels)
                # an explicit cancel() on a second one, then wait() reports it
                async with vm.exec(["sleep", "30"]) as proc2:
                    await proc2.cancel()
                    with pytest.raises(errors.Cancelled):
                        await proc2.wait()
                pong = await vm.ping()
                return cancelled_ids, agent.cancels, pong, data

    first, cancels, pong, data = run(main())
    assert len(first) == 1 and len(cancels) == 2 and data == b"sleeping\n" and pong > 0


def test_output_limit_is_enforced_by_the_host_too(path):
    async def main():
        async with FakeAgent(path, ignore_output_limit=True):
            async with connect(path) as vm:
                return await vm.run(["spam", "20", "1000"], output_limit=4500)

    result = run(main())
    assert len(result.stdout) == 4500 and len(result.stderr) == 4500
    assert result.stdout_truncated and result.stderr_truncated


def test_agent_truncation_flag_is_reported(path):
    async def main():
        async with FakeAgent(path):
            async with connect(path) as vm:
                async with vm.exec("spam 10 1000", output_limit=2500) as proc:
                    return await proc.wait()

    result = run(main())
    assert len(result.stdout) == 2500 and result.stdout_truncated


# --- concurrency ---------------------------------------------------------------------------------

def test_many_concurrent_requests_with_out_of_order_replies(path):
    async def slow(conn, id_, args):
        n = args.int("n")
        await asyncio.sleep(((n * 7919) % 50) / 1000.0)  # scrambled reply order
        return {"n": n, "id": id_}

    async def main():
        async with FakeAgent(path, handlers={"slow": slow}) as agent:
            async with connect(path) as vm:
                results = await asyncio.gather(*[vm.call("slow", n=i) for i in range(300)],
                                               *[vm.run(["echo", str(i)]) for i in range(20)])
                return results, agent

    results, agent = run(main())
    assert [r["n"] for r in results[:300]] == list(range(300))
    assert len({r["id"] for r in results[:300]}) == 300
    assert [r.stdout for r in results[300:]] == [b"%d\n" % i for i in range(20)]


def test_request_ids_wrap_and_skip_zero_and_ids_in_use(path):
    async def hang(conn, id_, args):
        await asyncio.sleep(30)

    async def main():
        async with FakeAgent(path, handlers={"hang": hang}) as agent:
            async with connect(path) as vm:
                vm.session._conn.machine._next_id = 0xFFFFFFFF
                h = asyncio.ensure_future(vm.call("hang"))
                await asyncio.sleep(0.05)
                vm.session._conn.machine._next_id = 0xFFFFFFFF  # force a collision with the id in flight
                await vm.ping()
                await vm.ping()
                h.cancel()
                ids = [id_ for id_ in vm.session._pending]
                return agent.requests, vm.session._conn.machine._next_id

    requests, next_id = run(main())
    assert next_id == 3  # 0xFFFFFFFF (hang), skip it, 1, 2


def test_request_timeout(path):
    async def hang(conn, id_, args):
        await asyncio.sleep(30)

    async def main():
        async with FakeAgent(path, handlers={"hang": hang}) as agent:
            async with connect(path) as vm:
                started = time.monotonic()
                with pytest.raises(errors.RequestTimeout):
                    await vm.call("hang", timeout=0.2)
                elapsed = time.monotonic() - started
                await asyncio.sleep(0.05)
                return elapsed, agent.cancels, await vm.ping()

    elapsed, cancels, pong = run(main())
    assert 0.15 < elapsed < 1 and len(cancels) == 1 and pong > 0


# --- connection loss, restart, reconnect -------------------------------------------------------

def test_disconnect_fails_sent_requests_with_connection_lost(path):
    async def hang(conn, id_, args):
        await asyncio.sleep(30)

    async def main():
        async with FakeAgent(path, handlers={"hang": hang}) as agent:
            async with connect(path, reconnect=False) as vm:
                calls = [asyncio.ensure_future(vm.call("hang")) for _ in range(3)]
                proc_cm = vm.exec(["sleep", "30"])
                proc = await proc_cm.__aenter__()
                await asyncio.sleep(0.1)
                agent.drop()
                results = await asyncio.gather(*calls, return_exceptions=True)
                with pytest.raises(errors.ConnectionLost):
                    async for _ in proc.output():
                        pass
                with pytest.raises(errors.ConnectionLost):
                    await proc.wait()
                await proc_cm.__aexit__(None, None, None)
                # not sent: the connection is gone and reconnect=False
                with pytest.raises(errors.RequestNotSent) as unsent:
                    await vm.ping()
                return results, unsent.value, vm.runstate

    results, unsent, state = run(main())
    assert all(isinstance(r, errors.ConnectionLost) for r in results)
    assert "closed by the other end" in str(results[0])
    assert state is Runstate.DISCONNECTED and "not connected" in str(unsent)


def test_requests_not_sent_when_no_connection_in_time(path):
    async def main():
        async with FakeAgent(path) as agent:
            async with connect(path) as vm:
                await agent.stop()  # socket gone: the client keeps retrying
                await asyncio.sleep(0.05)
                started = time.monotonic()
                with pytest.raises(errors.RequestNotSent) as exc:
                    await vm.ping(timeout=0.3)
                return time.monotonic() - started, exc.value, vm.runstate

    elapsed, exc, state = run(main())
    assert 0.25 < elapsed < 1.5 and state is Runstate.RECONNECTING
    assert "not sent" in str(exc)


def test_reconnect_after_the_socket_closes(path):
    async def main():
        async with FakeAgent(path) as agent:
            async with connect(path) as vm:
                await vm.ping()
                agent.drop()
                await asyncio.sleep(0.05)  # (a ping sent before the client saw EOF: ConnectionLost)
                pong = await vm.ping()  # waits for the reconnection
                # socket file gone for a while, then back: calls made meanwhile wait
                await agent.stop()
                await asyncio.sleep(0.05)
                later = asyncio.ensure_future(vm.ping(timeout=5))
                await asyncio.sleep(0.4)
                await agent.start()
                pong2 = await later
                return pong, pong2, agent.nonces, vm.runstate

    pong, pong2, nonces, state = run(main())
    assert pong > 0 and pong2 > 0 and state is Runstate.RUNNING
    assert len(set(nonces)) >= 3  # a fresh nonce per connection


def test_hello_mid_session_fails_pending_and_resyncs(path):
    async def hang(conn, id_, args):
        await asyncio.sleep(30)

    async def main():
        async with FakeAgent(path, handlers={"hang": hang}) as agent:
            async with connect(path) as vm:
                pending = asyncio.ensure_future(vm.call("hang"))
                await asyncio.sleep(0.05)
                agent.description = dict(DESCRIPTION, session="s2")
                agent.restart()
                with pytest.raises(errors.ConnectionLost) as lost:
                    await pending
                pong = await vm.ping()
                return lost.value, pong, vm.agent.session, agent.nonces

    lost, pong, session, nonces = run(main())
    assert "restarted" in str(lost) and pong > 0 and session == "s2"
    assert len(set(nonces)) == 2 and nonces[-1] != nonces[0]


def test_agent_dying_mid_frame_does_not_swallow_the_restarted_agent(path):
    """A frame cut off by a dying agent would eat the new HELLO; the stalled frame is abandoned."""
    async def hang(conn, id_, args):
        await asyncio.sleep(30)

    async def main():
        async with FakeAgent(path, handlers={"hang": hang}) as agent:
            async with connect(path) as vm:
                pending = asyncio.ensure_future(vm.call("hang", timeout=20))
                await asyncio.sleep(0.05)
                cut = m.encode_stream(999, 1, b"o" * 60000)[:3000]
                agent.description = dict(DESCRIPTION, session="s2")
                started = asyncio.get_running_loop().time()
                agent.restart(cut_frame=cut)
                with pytest.raises(errors.ConnectionLost):
                    await pending
                elapsed = asyncio.get_running_loop().time() - started
                pong = await vm.ping()
                return elapsed, pong, vm.stats["corrupt_frames"]

    elapsed, pong, corrupt = run(main())
    assert elapsed < 10 and pong > 0 and corrupt >= 1


def test_not_ready_reply_triggers_resync(path):
    """not_ready: the request did not run; side-effect-free verbs retry on the new session,
    everything else reports NotReady (safe to retry) and the client re-handshakes."""
    async def main():
        # no HELLO: the SYNC the host resends on it could re-sync the agent after we reset it
        async with FakeAgent(path, hello=False) as agent:
            async with connect(path) as vm:
                agent.conn.synced = False  # the agent forgot us without a HELLO
                pong = await vm.ping()  # retried once, transparently
                syncs_after_ping = len(set(agent.nonces))
                agent.conn.synced = False
                with pytest.raises(errors.NotReady):
                    await vm.call("greet")
                pong2 = await vm.ping()
                return pong, syncs_after_ping, pong2, len(set(agent.nonces))

    pong, syncs_after_ping, pong2, syncs = run(main())
    assert pong > 0 and pong2 > 0
    assert syncs_after_ping == 2 and syncs == 3


def test_close_fails_pending_and_ends_subscriptions(path):
    async def hang(conn, id_, args):
        await asyncio.sleep(30)

    async def main():
        async with FakeAgent(path, handlers={"hang": hang}):
            vm = await connect(path)
            pending = asyncio.ensure_future(vm.call("hang"))
            sub = vm.subscribe("t")
            got = []

            async def listen():
                async for msg in sub:
                    got.append(msg)
            listener = asyncio.ensure_future(listen())
            await asyncio.sleep(0.05)
            await vm.close()
            await vm.close()  # idempotent
            with pytest.raises(errors.ConnectionLost):
                await pending
            await listener
            with pytest.raises(errors.RequestNotSent):
                await vm.ping()
            return vm.runstate, got

    state, got = run(main())
    assert state is Runstate.CLOSED and got == []


# --- untrusted replies ---------------------------------------------------------------------------

def _corrupt(frame):
    return frame[:-1] + bytes([frame[-1] ^ 0xFF])


def test_malformed_replies_fail_the_call_with_protocol_error(path):
    replies = {}

    cases = {
        "ping_not_json": ("ping", lambda i: raw_frame(FrameType.RESPONSE, b"nope", i)),
        "ping_no_pong": ("ping", lambda i: m.encode_response(i, {"pong": "yes"})),
        "info_bad_kernel": ("info", lambda i: m.encode_response(i, dict(kernel="x", hostname="h",
                                                                        agent_version="1", protocol=1))),
        "info_bad_addr": ("info", lambda i: m.encode_response(i, dict(
            kernel={}, hostname="h", agent_version="1", protocol=1,
            addresses=[{"interface": "lo", "family": "ipx", "address": "1"}]))),
        "info_missing": ("info", lambda i: m.encode_response(i, {"hostname": "h"})),
        "error_bad": ("call", lambda i: raw_frame(FrameType.ERROR, b'{"code": 5}', i)),
        "error_not_json": ("call", lambda i: raw_frame(FrameType.ERROR, b"\x00", i)),
        "call_array": ("call", lambda i: raw_frame(FrameType.RESPONSE, b"[1]", i)),
        "exec_no_rc": ("exec", lambda i: m.encode_response(i, {"signal": None})),
        "exec_bool_rc": ("exec", lambda i: m.encode_response(i, {"returncode": True})),
        "exec_rc_range": ("exec", lambda i: m.encode_response(i, {"returncode": 10 ** 9})),
        "exec_bad_duration": ("exec", lambda i: m.encode_response(i, {"returncode": 0, "duration": "x"})),
        "exec_bad_event": ("exec", lambda i: m.encode_event(i, {"event": "started", "pid": "x"})),
        "exec_bad_stream": ("exec", lambda i: m.encode_stream(i, 5, b"x")),
        "corrupt_frame": ("call", lambda i: _corrupt(raw_frame(FrameType.RESPONSE, b"{}", i))),
    }

    async def main():
        out = {}
        async with FakeAgent(path) as agent:
            async def handler(conn, id_, args):
                return replies["current"](id_)
            for op in ("ping", "info", "exec", "bad"):
                agent.handlers[op] = handler
            async with connect(path) as vm:
                for name, (verb, make) in cases.items():
                    replies["current"] = make
                    with pytest.raises(errors.ProtocolError) as exc:
                        if verb == "ping":
                            await vm.ping(timeout=1)
                        elif verb == "info":
                            await vm.info(timeout=1)
                        elif verb == "exec":
                            await vm.run(["x"], call_timeout=1, timeout=1)
                        else:
                            await vm.call("bad", timeout=1)
                    out[name] = exc.value
                agent.delivered = -1
                with pytest.raises(errors.ProtocolError) as exc:
                    await vm.publish("t", b"x", timeout=1)
                out["publish_bad"] = exc.value
                agent.delivered = "many"
                with pytest.raises(errors.ProtocolError) as exc:
                    await vm.publish("t", b"x", timeout=1)
                out["publish_str"] = exc.value
                return out

    out = run(main())
    assert set(out) == set(cases) | {"publish_bad", "publish_str"}
    for name, exc in out.items():
        assert type(exc) is errors.ProtocolError, (name, exc)
        assert "agent" in str(exc) or "corrupted" in str(exc) or "stream" in str(exc), (name, exc)


def test_malformed_guest_messages_are_dropped(path):
    async def main():
        async with FakeAgent(path) as agent:
            async with connect(path) as vm:
                sub = vm.subscribe("t")
                agent.conn.send(raw_frame(FrameType.MESSAGE, b"\x05ab"))  # topic beyond payload
                agent.conn.send(raw_frame(FrameType.MESSAGE, b"\x02\xff\xfe"))  # not ASCII
                agent.conn.send(raw_frame(FrameType.MESSAGE, b"\x01!"))  # bad topic
                agent.conn.send(raw_frame(FrameType.MESSAGE, b""))
                agent.push("t", b"good")
                msg = await sub.get(timeout=2)
                return msg, vm.stats

    msg, stats = run(main())
    assert msg.data == b"good" and stats["bad_messages"] == 4


# --- messages ------------------------------------------------------------------------------------

def test_publish_and_subscribe(path):
    async def main():
        async with FakeAgent(path, delivered=2) as agent:
            async with connect(path) as vm:
                delivered = await vm.publish("host.orders", "go")
                delivered_bytes = await vm.publish("host.orders", b"\x00\x01")
                with pytest.raises(ValueError):
                    await vm.publish("bad topic!", b"")
                with pytest.raises(ValueError):
                    await vm.publish("t", b"x" * (256 * 1024 + 1))
                got = []
                async with vm.subscribe("guest.events") as sub:
                    other = vm.subscribe("other")
                    agent.push("guest.events", b"one")
                    agent.push("other", b"not for sub")
                    agent.push("guest.events", b"two")
                    async for msg in sub:
                        got.append(msg)
                        if len(got) == 2:
                            break
                    o = await other.__anext__()
                return delivered, delivered_bytes, agent.published, got, o

    delivered, delivered_bytes, published, got, other = run(main())
    assert (delivered, delivered_bytes) == (2, 2)
    assert published == [("host.orders", b"go"), ("host.orders", b"\x00\x01")]
    assert [(g.topic, g.data) for g in got] == [("guest.events", b"one"), ("guest.events", b"two")]
    assert got[0].text == "one" and other.data == b"not for sub"


def test_full_subscription_drops_oldest(path):
    async def main():
        async with FakeAgent(path) as agent:
            async with connect(path) as vm:
                sub = vm.subscribe("t", queue_size=3)
                for i in range(10):
                    agent.push("t", b"%d" % i)
                await vm.ping()  # all pushed frames were read before the pong
                got = [await sub.get(timeout=1) for _ in range(3)]
                sub.close()
                with pytest.raises(EOFError):
                    await sub.get()
                return [g.data for g in got], sub.dropped

    data, dropped = run(main())
    assert data == [b"7", b"8", b"9"] and dropped == 7


def test_subscription_raises_connection_lost_without_reconnect(path):
    async def main():
        async with FakeAgent(path) as agent:
            async with connect(path, reconnect=False) as vm:
                sub = vm.subscribe("t")
                agent.push("t", b"before")
                await vm.ping()
                agent.drop()
                first = await sub.__anext__()
                with pytest.raises(errors.ConnectionLost):
                    await sub.__anext__()
                return first

    assert run(main()).data == b"before"


def test_incompatible_agent_after_restart_disconnects_for_good(path):
    async def main():
        async with FakeAgent(path) as agent:
            async with connect(path) as vm:
                sub = vm.subscribe("t")
                agent.mismatch = True
                agent.restart()
                with pytest.raises(errors.ProtocolMismatch):  # the error that ended it
                    await sub.__anext__()
                with pytest.raises(errors.RequestNotSent) as exc:
                    await vm.ping()
                return vm.runstate, exc.value

    state, exc = run(main())
    assert state is Runstate.DISCONNECTED
    assert isinstance(exc.__cause__, errors.ProtocolMismatch) and "protocol" in str(exc)
