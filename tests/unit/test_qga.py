"""guestlink.host.qga against a fake qemu-ga on a unix socket: the resync, exec, files, the
fallback of connect(via=...), the libvirt transport, and hostile replies (only documented errors,
bounded memory).

The fake speaks qemu-ga's wire format (JSON lines; a 0xFF byte answered with a parse error, then
the 0xFF-marked guest-sync-delimited reply) and really runs guest-exec's commands and
guest-file-*'s files on this host, so push/pull/mv/sha256sum are the real thing.
"""
import asyncio
import base64
import json
import os
import subprocess
import sys
import tracemalloc
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import guestlink  # noqa: E402
from guestlink import libvirt as LV  # noqa: E402
from guestlink.host import errors as E  # noqa: E402
from guestlink.host.qga import QgaUnavailable  # noqa: E402
from guestlink.host.qga import guest as G  # noqa: E402
from guestlink.host.qga import transport as T  # noqa: E402
from guestlink.host.qga.transport import LibvirtTransport  # noqa: E402
from test_host_fakeagent import short_tmp  # noqa: E402

#: the session's master isolation (conftest.py) stays when a test cleans GUESTLINK_* out
MASTER_ENV = ("GUESTLINK_MASTER", "GUESTLINK_MASTER_SOCKET", "GUESTLINK_PERSIST")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def line(obj):
    return json.dumps(obj).encode() + b"\n"


class FakeQga:
    """A qemu-ga stand-in. ``override[name] = fn(args) -> bytes`` replaces a command's reply
    line(s) with raw bytes (hostile replies); ``greeting`` is written to each new connection
    before anything is read (stale bytes)."""

    def __init__(self, path, greeting=b""):
        self.path = path
        self.greeting = greeting
        self.override = {}
        self.calls = []
        self.procs = {}
        self.files = {}
        self.server = None
        self.corrupt_writes = False

    async def __aenter__(self):
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        for p in self.procs.values():
            if p.returncode is None:
                p.kill()
                await p.wait()

    async def _serve(self, reader, writer):
        writer.write(self.greeting)
        buf = b""
        try:
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    return
                buf += data
                while b"\n" in buf or b"\xff" in buf:
                    if buf.startswith(b"\xff"):
                        buf = buf[1:]
                        writer.write(line({"error": {"class": "GenericError",
                                                     "desc": "JSON parse error, stray '\\uFFFD'"}}))
                        continue
                    cut = min(i for i in (buf.find(b"\n"), buf.find(b"\xff")) if i >= 0)
                    req, buf = buf[:cut], buf[cut + (buf[cut:cut + 1] == b"\n"):]
                    if req.strip():
                        writer.write(await self._answer(json.loads(req)))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _answer(self, req):
        name, args = req["execute"], req.get("arguments", {})
        self.calls.append((name, args))
        if name in self.override:
            reply = self.override[name](args)
            return await reply if asyncio.iscoroutine(reply) else reply
        if name == "guest-sync-delimited":
            return b"\xff" + line({"return": args["id"]})
        fn = getattr(self, "do_" + name.replace("-", "_"), None)
        if fn is None:
            return line({"error": {"class": "CommandNotFound",
                                   "desc": "The command %s has not been found" % name}})
        try:
            return line({"return": await fn(args)})
        except OSError as exc:
            return line({"error": {"class": "GenericError",
                                   "desc": "failed to open file '%s': %s" % (args.get("path"),
                                                                             exc.strerror)}})

    async def do_guest_ping(self, args):
        return {}

    async def do_guest_info(self, args):
        return {"version": "7.2.0", "supported_commands": [
            {"name": n, "enabled": True, "success-response": True}
            for n in ("guest-ping", "guest-exec", "guest-get-osinfo", "guest-get-host-name")]}

    async def do_guest_get_host_name(self, args):
        return {"host-name": "fakevm"}

    async def do_guest_get_osinfo(self, args):
        return {"kernel-release": "6.1.0", "kernel-version": "#1", "machine": "x86_64",
                "id": "debian", "pretty-name": "Debian 12", "version-id": "12"}

    async def do_guest_exec(self, args):
        argv = [args["path"]] + args.get("arg", [])
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            raise OSError(exc.errno, "Failed to execute child process (No such file or "
                                     "directory)") from None
        stdin = base64.b64decode(args.get("input-data", ""))
        self.procs[proc.pid] = proc
        proc.collected = asyncio.ensure_future(proc.communicate(stdin))
        return {"pid": proc.pid}

    async def do_guest_exec_status(self, args):
        proc = self.procs[args["pid"]]
        if not proc.collected.done():
            return {"exited": False}
        out, err = proc.collected.result()
        del self.procs[args["pid"]]
        rc = proc.returncode
        status = {"exited": True, "out-data": base64.b64encode(out).decode(),
                  "err-data": base64.b64encode(err).decode()}
        status.update({"signal": -rc} if rc < 0 else {"exitcode": rc})
        return status

    async def do_guest_file_open(self, args):
        f = open(args["path"], args.get("mode", "r") + "b")
        handle = 1000 + len(self.files)
        self.files[handle] = f
        return handle

    async def do_guest_file_close(self, args):
        self.files.pop(args["handle"]).close()
        return {}

    async def do_guest_file_write(self, args):
        data = base64.b64decode(args["buf-b64"])
        if self.corrupt_writes:
            data = bytes([data[0] ^ 1]) + data[1:]
        self.files[args["handle"]].write(data)
        return {"count": len(data), "eof": False}

    async def do_guest_file_read(self, args):
        data = self.files[args["handle"]].read(args["count"])
        return {"count": len(data), "buf-b64": base64.b64encode(data).decode(),
                "eof": len(data) < args["count"]}

    async def do_guest_file_seek(self, args):
        f = self.files[args["handle"]]
        f.seek(args["offset"], {"set": 0, "cur": 1, "end": 2}[args["whence"]])
        return {"position": f.tell(), "eof": False}


@pytest.fixture
def sock(tmp_path):
    return os.path.join(short_tmp(tmp_path), "qga.sock")


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def qga_client(path, timeout=5.0):
    return await guestlink.connect(qga=path, via="qga", timeout=timeout)


# --- the transport ----------------------------------------------------------------------------

def test_sync_skips_stale_bytes_and_stale_replies(sock):
    """Bytes left from an earlier host (half a reply, old replies, an old sync reply with another
    id) are discarded up to the reply carrying this connection's fresh id."""
    stale = (b'{"return": {"pid": 4' + b"\n" + line({"return": {}}) + b"\xff" + line({"return": 7})
             + b"garbage \x00\x01\n")

    async def main():
        async with FakeQga(sock, greeting=stale) as fake:
            async with await qga_client(sock) as vm:
                assert vm.via == "qga"
                assert await vm.ping() >= 0
                assert vm.agent.version == "7.2.0" and vm.agent.hostname == "fakevm"
            syncs = [a["id"] for n, a in fake.calls if n == "guest-sync-delimited"]
            assert len(syncs) == 1 and syncs[0] != 7
    run(main())


def test_a_timed_out_command_resyncs_before_the_next(sock):
    """qemu-ga replies carry no id: a reply that comes after its command timed out must not be
    taken for the next command's."""
    async def late(args):
        await asyncio.sleep(0.6)
        return line({"return": {"version": "late", "supported_commands": []}})

    async def main():
        async with FakeQga(sock) as fake:
            async with await qga_client(sock) as vm:
                fake.override["guest-info"] = late
                with pytest.raises(E.RequestTimeout):
                    await G.version(vm.transport, 0.2)
                del fake.override["guest-info"]
                assert (await G.version(vm.transport, 5))[0] == "7.2.0"
            assert [n for n, _ in fake.calls].count("guest-sync-delimited") == 2
    run(main())


def test_missing_or_silent_qemu_ga_is_a_clear_error(sock, tmp_path):
    async def silent(reader, writer):
        await reader.read(1 << 20)
        await asyncio.sleep(5)

    async def main():
        with pytest.raises(QgaUnavailable, match="no qemu-ga socket .*org.qemu.guest_agent.0"):
            await qga_client(sock)
        server = await asyncio.start_unix_server(silent, sock)
        try:
            with pytest.raises(E.AgentNotResponding, match="qemu-ga did not answer.*installed"):
                await qga_client(sock, timeout=0.5)
        finally:
            server.close()
    run(main())


def test_qemu_ga_errors_map_to_the_error_tree(sock, tmp_path):
    async def main():
        async with FakeQga(sock):
            async with await qga_client(sock) as vm:
                with pytest.raises(E.UnknownCommand):
                    await vm.transport.command("guest-no-such", None, 5)
                with pytest.raises(E.RemoteNotFound):
                    await G.file_open(vm.transport, str(tmp_path / "absent"), "r", 5)
                with pytest.raises(E.RemoteNotFound):
                    await vm.run(["/nonexistent/program"])
    run(main())


# --- exec ---------------------------------------------------------------------------------------

def test_exec_stdin_exit_code_signal_and_output(sock):
    async def main():
        async with FakeQga(sock):
            async with await qga_client(sock) as vm:
                r = await vm.run(["sh", "-c", "cat; echo err >&2; exit 3"], input=b"in put")
                assert (r.returncode, r.stdout, r.stderr, r.signal) == (3, b"in put", b"err\n", None)
                r = await vm.run(["sh", "-c", "kill -TERM $$"])
                assert (r.returncode, r.signal) == (-15, 15)
                with pytest.raises(E.CommandFailed):
                    await vm.run(["false"], check=True)
                r = await vm.run("echo $0", shell=True)
                assert r.stdout.strip() == b"/bin/sh"
                r = await vm.run(["pwd"], cwd="/tmp", env={"A": "1"})
                assert r.stdout.strip() == b"/tmp"
                r = await vm.run(["sh", "-c", "echo $A"], env={"A": "x y"})
                assert r.stdout == b"x y\n"
                r = await vm.run(["head", "-c", "1000", "/dev/zero"], output_limit=10)
                assert len(r.stdout) == 10 and r.stdout_truncated
    run(main())


def test_exec_as_another_user_is_refused_before_anything_runs(sock):
    """qemu-ga runs everything as itself: user= is refused (not silently run as root)."""
    async def main():
        async with FakeQga(sock) as fake:
            async with await qga_client(sock) as vm:
                before = len(fake.calls)
                with pytest.raises(ValueError, match="not available through qemu-ga"):
                    await vm.run(["id", "-u"], user="guest")
                assert not [c for c in fake.calls[before:] if "guest-exec" in str(c)]
    run(main())


def test_exec_timeout_kills_the_process(sock):
    async def main():
        async with FakeQga(sock) as fake:
            async with await qga_client(sock) as vm:
                with pytest.raises(E.CommandTimedOut) as info:
                    await vm.run(["sleep", "30"], timeout=0.5)
                assert info.value.result.timed_out and info.value.result.signal == 9
                kills = [a for n, a in fake.calls if n == "guest-exec" and a["path"] == "kill"]
                assert kills and kills[0]["arg"][0] == "-KILL"
    run(main())


def test_qemu_gas_truncation_flag_reaches_the_result(sock):
    async def main():
        async with FakeQga(sock) as fake:
            async with await qga_client(sock) as vm:
                fake.override["guest-exec-status"] = lambda a: line({"return": {
                    "exited": True, "exitcode": 0, "out-data": "YWJj", "out-truncated": True}})
                r = await vm.run(["true"])
                assert r.stdout == b"abc" and r.stdout_truncated and not r.stderr_truncated
    run(main())


def test_stdin_over_the_cap_is_refused_before_sending(sock, monkeypatch):
    monkeypatch.setattr(G, "MAX_STDIN", 1000)

    async def main():
        async with FakeQga(sock) as fake:
            async with await qga_client(sock) as vm:
                with pytest.raises(E.TooLarge):
                    await vm.run(["cat"], input=b"x" * 1001)
                assert not [n for n, _ in fake.calls if n == "guest-exec"]
    run(main())


# --- files --------------------------------------------------------------------------------------

def test_push_and_pull_round_trip_with_progress(sock, tmp_path):
    src = tmp_path / "src.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(data)
    os.chmod(src, 0o640)
    guest_dir = tmp_path / "guest"
    guest_dir.mkdir()
    seen = []

    async def main():
        async with FakeQga(sock):
            async with await qga_client(sock) as vm:
                res = await vm.push(str(src), str(guest_dir) + "/",
                                    progress=lambda d, t: seen.append((d, t)))
                assert res.destination == str(guest_dir / "src.bin") and res.verified
                assert res.bytes == len(data)
                back = tmp_path / "back.bin"
                res2 = await vm.pull(str(guest_dir / "src.bin"), str(back))
                assert res2.digest == res.digest and back.read_bytes() == data
    run(main())
    assert (guest_dir / "src.bin").read_bytes() == data
    assert oct(os.stat(guest_dir / "src.bin").st_mode & 0o777) == oct(0o640)
    assert seen[-1] == (len(data), len(data)) and len(seen) == 4  # 1 MiB chunks
    assert sorted(os.listdir(guest_dir)) == ["src.bin"]  # no temporary file left


def test_a_corrupted_push_is_caught_and_leaves_nothing(sock, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello world")
    guest_dir = tmp_path / "guest"
    guest_dir.mkdir()
    (guest_dir / "old").write_bytes(b"keep")

    async def main():
        async with FakeQga(sock) as fake:
            fake.corrupt_writes = True
            async with await qga_client(sock) as vm:
                with pytest.raises(E.ChecksumMismatch):
                    await vm.push(str(src), str(guest_dir / "old"))
    run(main())
    assert sorted(os.listdir(guest_dir)) == ["old"] and (guest_dir / "old").read_bytes() == b"keep"


def test_a_failed_pull_leaves_no_local_file(sock, tmp_path):
    remote = tmp_path / "remote.bin"
    remote.write_bytes(b"x" * 5000)
    out = tmp_path / "out"
    out.mkdir()

    async def main():
        async with FakeQga(sock) as fake:
            async with await qga_client(sock) as vm:
                fake.override["guest-file-read"] = lambda a: line({"return": {
                    "count": 3, "buf-b64": "!!!!", "eof": False}})
                with pytest.raises(E.ProtocolError, match="base64"):
                    await vm.pull(str(remote), str(out / "f"))
                assert not [n for n, _ in fake.calls if n == "guest-file-close"] == []
    run(main())
    assert os.listdir(out) == []


def test_a_guest_without_sha256_tools_copies_unverified_and_says_so(sock, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"unverified")

    async def main():
        async with FakeQga(sock) as fake:
            async def no_hash_tools(args):
                if args["path"] in ("sha256sum", "python3"):
                    return line({"error": {"class": "GenericError", "desc": "Failed to execute "
                                           "child process (No such file or directory)"}})
                return line({"return": await fake.do_guest_exec(args)})
            fake.override["guest-exec"] = no_hash_tools
            async with await qga_client(sock) as vm:
                res = await vm.push(str(src), str(tmp_path / "dst.bin"))
                assert res.verified is False and res.digest is not None
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith("GUESTLINK_") or k in MASTER_ENV}
            r = await asyncio.get_running_loop().run_in_executor(None, lambda: _cli(
                ["cp", "--json", "--qga", sock, str(src), ":" + str(tmp_path / "dst2.bin")], env))
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["verified"] is False
            assert b"not verified end to end" in r.stderr
    run(main())
    assert (tmp_path / "dst.bin").read_bytes() == b"unverified"
    assert (tmp_path / "dst2.bin").read_bytes() == b"unverified"


def test_pull_reads_regular_files_only_and_never_past_their_size(sock, tmp_path):
    """/dev/zero would never end; a file larger than the size qemu-ga announced (it grew, or the
    guest lies) is read only up to that size and then fails the checksum: the host's disk is
    not filled by the guest."""
    remote = tmp_path / "remote.bin"
    remote.write_bytes(b"y" * 5000)
    out = tmp_path / "out"
    out.mkdir()

    async def main():
        async with FakeQga(sock) as fake:
            async with await qga_client(sock) as vm:
                with pytest.raises(E.BadRequest, match="not a regular file"):
                    await vm.pull("/dev/zero", str(out / "z"))
                fake.override["guest-file-seek"] = lambda a: line({"return": {
                    "position": 10 if a["whence"] == "end" else 0, "eof": False}})
                with pytest.raises(E.ChecksumMismatch):
                    await vm.pull(str(remote), str(out / "f"))
                reads = [a["count"] for n, a in fake.calls if n == "guest-file-read"]
                assert reads == [10]
    run(main())
    assert os.listdir(out) == []


def test_tree_resume_preserve_are_refused(sock, tmp_path):
    async def main():
        async with FakeQga(sock):
            async with await qga_client(sock) as vm:
                for kw in ({"recursive": True}, {"resume": True}, {"preserve": True}):
                    with pytest.raises(ValueError, match="not available through qemu-ga"):
                        await vm.push(str(tmp_path), "/tmp/x", **kw)
    run(main())


# --- hostile replies -----------------------------------------------------------------------------

HOSTILE = {
    "guest-exec": [b'{"return": {"pid": -1}}\n', b'{"return": {"pid": "7"}}\n',
                   b'{"return": {"pid": true}}\n', b'{"return": []}\n', b'{"nothing": 1}\n',
                   b'{"return": {"pid": ' + b"9" * 5000 + b"}}\n",
                   b'{"return": {"pid": NaN}}\n', b"[" * 100000 + b"\n",
                   b'{"error": "not an object"}\n', b'{"error": {"class": 1, "desc": []}}\n',
                   b"\xff\xfe\n", b"not json\n"],
    "guest-exec-status": [
        b'{"return": {"exited": "yes"}}\n',
        b'{"return": {"exited": true}}\n',
        b'{"return": {"exited": true, "exitcode": 0, "signal": 9}}\n',
        b'{"return": {"exited": true, "exitcode": 256}}\n',
        b'{"return": {"exited": true, "signal": 0}}\n',
        b'{"return": {"exited": true, "exitcode": 0, "out-data": "a=b="}}\n',
        b'{"return": {"exited": true, "exitcode": 0, "out-data": "\xc3\xa9AAA"}}\n',
        b'{"return": {"exited": true, "exitcode": 0, "out-data": 5}}\n',
        b'{"return": {"exited": true, "exitcode": 0, "err-truncated": 1}}\n',
    ],
}


@pytest.mark.parametrize("command,reply", [(c, r) for c, rs in HOSTILE.items() for r in rs])
def test_hostile_exec_replies_raise_protocol_errors(sock, command, reply):
    async def main():
        async with FakeQga(sock) as fake:
            async with await qga_client(sock) as vm:
                fake.override[command] = lambda a: reply
                with pytest.raises(E.GuestlinkError) as info:
                    await vm.run(["true"])
                assert isinstance(info.value, E.ProtocolError), repr(info.value)
                # the connection is usable afterwards (resynchronised)
                del fake.override[command]
                assert (await vm.run(["echo", "ok"])).stdout == b"ok\n"
    run(main())


def test_oversized_output_claim_is_refused(sock, monkeypatch):
    monkeypatch.setattr(G, "QGA_OUTPUT_CAP", 30)

    async def main():
        async with FakeQga(sock) as fake:
            async with await qga_client(sock) as vm:
                fake.override["guest-exec-status"] = lambda a: line({"return": {
                    "exited": True, "exitcode": 0, "out-data": base64.b64encode(b"x" * 60).decode()}})
                with pytest.raises(E.ProtocolError, match="more than 30 bytes"):
                    await vm.run(["true"])
    run(main())


def test_endless_reply_and_endless_stale_output_in_bounded_memory(sock, monkeypatch):
    """A guest that never ends its reply line, or floods stale bytes during the resync, gets a
    ProtocolError once MAX_REPLY / MAX_STALE bytes came, and the host holds no more than that."""
    monkeypatch.setattr(T, "MAX_REPLY", 1 << 20)
    monkeypatch.setattr(T, "MAX_STALE", 1 << 20)
    chunk = b"A" * 65536

    async def flood(reader, writer):
        await reader.read(100)
        try:
            for _ in range(200):  # 12.5 MiB, never a newline
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    async def flood_lines(reader, writer):
        await reader.read(100)
        try:
            for _ in range(200):
                writer.write(chunk[:-1] + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    async def main(handler):
        server = await asyncio.start_unix_server(handler, sock)
        try:
            with pytest.raises(E.ProtocolError, match="without ending|stale"):
                await qga_client(sock)
        finally:
            server.close()
            await server.wait_closed()
            os.unlink(sock)

    tracemalloc.start()
    try:
        for handler in (flood, flood_lines):
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            run(main(handler))
            assert tracemalloc.get_traced_memory()[1] - base < 8 << 20
    finally:
        tracemalloc.stop()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                          max_leaves=10),
       key=st.sampled_from(["return", "error", "x"]),
       command=st.sampled_from(["guest-exec", "guest-exec-status", "guest-file-open",
                                "guest-file-read", "guest-info", "guest-get-osinfo"]))
def test_fuzzed_replies_raise_only_documented_errors(tmp_path_factory, value, key, command):
    path = os.path.join(short_tmp(tmp_path_factory.mktemp("q")), "q.sock")
    remote = tmp_path_factory.mktemp("r") / "f"
    remote.write_bytes(b"data")

    async def main():
        async with FakeQga(path) as fake:
            async with await qga_client(path) as vm:
                fake.override[command] = lambda a: line({key: value}) if key != "x" else b"\n"
                try:
                    await vm.info()
                    await vm.run(["true"])
                    await vm.pull(str(remote), str(remote) + ".out")
                except E.GuestlinkError:
                    pass
    run(main())


# --- connect(via=...): the fallback -------------------------------------------------------------

def test_auto_falls_back_to_qemu_ga_when_guestlink_is_absent(sock, tmp_path):
    ctl = os.path.join(os.path.dirname(sock), "ctl.sock")

    async def main():
        async with FakeQga(sock):
            async with guestlink.connect(ctl=ctl, qga=sock, timeout=5) as vm:
                assert vm.via == "qga" and isinstance(vm.fallback_reason, E.SocketNotFound)
                info = await vm.info()
                assert info["via"] == "qga" and info["hostname"] == "fakevm"
                assert info["agent_version"] == "qemu-ga 7.2.0"
                assert info["os_release"]["PRETTY_NAME"] == "Debian 12"
            with pytest.raises(E.SocketNotFound):
                await guestlink.connect(ctl=ctl, qga=sock, via="guestlink", timeout=5)
        # neither answers: guestlink's error, with qemu-ga's added
        with pytest.raises(E.SocketNotFound, match="qemu-ga fallback failed too: (no|nothing listens on the) qemu-ga socket"):
            await guestlink.connect(ctl=ctl, qga=sock, timeout=5)
    run(main())


def test_auto_waits_its_turn_instead_of_falling_back(sock, tmp_path, monkeypatch):
    """A VM in use by another guestlink client is not a VM without guestlink: the second
    client waits past the 2 s probe and then gets guestlink, not qemu-ga."""
    from test_host_fakeagent import FakeAgent

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run_dir))
    monkeypatch.setattr("guestlink.host.client.AUTO_PROBE_TIMEOUT", 0.3)
    ctl = os.path.join(os.path.dirname(sock), "ctl.sock")

    async def main():
        async with FakeAgent(ctl), FakeQga(sock):
            queued = []
            async with guestlink.connect(ctl=ctl, qga=sock, timeout=5) as first:
                assert first.via == "guestlink"
                task = asyncio.ensure_future(guestlink.connect(
                    ctl=ctl, qga=sock, timeout=5, on_queue=queued.append).__aenter__())
                await asyncio.sleep(1.0)  # past the probe
                assert not task.done() and len(queued) == 1
            second = await asyncio.wait_for(task, 5)
            try:
                assert second.via == "guestlink"
            finally:
                await second.close()
    run(main())


def test_via_is_validated():
    with pytest.raises(ValueError, match="via must be one of"):
        guestlink.connect(ctl="/x", via="ssh")
    with pytest.raises(ValueError, match="needs a libvirt domain or the qemu-ga socket"):
        guestlink.connect(ctl="/x", via="qga")
    with pytest.raises(ValueError):
        guestlink.connect(domain="vm1", qga="/x")


# --- the libvirt transport ---------------------------------------------------------------------

class FakeBackend:
    name = "virsh"

    def __init__(self, replies):
        self.replies = replies
        self.sent = []

    def agent_command(self, domain, command, timeout):
        self.sent.append((domain, json.loads(command), timeout))
        r = self.replies.pop(0)
        if isinstance(r, Exception):
            raise r
        return r


def test_libvirt_transport_maps_replies_and_errors():
    async def main():
        be = FakeBackend(['{"return":{}}',
                          LV.GuestAgentCommandFailed("x", "failed to open file '/a': No such file"),
                          LV.GuestAgentNotConfigured("not configured"),
                          LV.GuestAgentNotResponding("silent"),
                          '{"return": 1' + "0" * 100 + "}"])
        t = LibvirtTransport("vm1", backend=be)
        assert t.max_request == T.MAX_REQUEST_VIRSH
        assert await t.command("guest-ping", None, 2.5) == {}
        assert be.sent[0] == ("vm1", {"execute": "guest-ping"}, 3)
        with pytest.raises(E.RemoteNotFound):
            await t.command("guest-file-open", {"path": "/a"}, 5)
        with pytest.raises(QgaUnavailable):
            await t.command("guest-ping", None, 5)
        with pytest.raises(E.RequestTimeout):
            await t.command("guest-ping", None, 5)
        with pytest.raises(E.ProtocolError):
            await t.command("guest-ping", None, 5)
        # a request longer than one virsh argument is refused before running virsh
        with pytest.raises(E.TooLarge):
            await G.file_write(t, 1, b"x" * T.MAX_REQUEST_VIRSH)
        assert G.chunk_size(t) * 4 // 3 + 256 <= T.MAX_REQUEST_VIRSH
    run(main())


def test_virsh_agent_command_runs_virsh_and_maps_its_errors(tmp_path):
    log = tmp_path / "args"
    virsh = tmp_path / "virsh"
    virsh.write_text("#!/bin/sh\nprintf '%%s\\n' \"$@\" > %s\n"
                     "case \"$*\" in *fail*) echo \"error: internal error: unable to execute QEMU "
                     "agent command 'guest-exec': Failed to execute child process\" >&2; exit 1;; "
                     "*none*) echo 'error: argument unsupported: QEMU guest agent is not "
                     "configured' >&2; exit 1;; esac\necho '{\"return\":{}}'\n" % log)
    virsh.chmod(0o755)
    be = LV.VirshBackend("qemu:///system", virsh=str(virsh))
    assert json.loads(be.agent_command("vm1", '{"execute":"guest-ping"}', 5)) == {"return": {}}
    assert log.read_text().split("\n")[:9] == [
        "-q", "-c", "qemu:///system", "qemu-agent-command", "--domain", "vm1", "--timeout", "5",
        '{"execute":"guest-ping"}']
    with pytest.raises(LV.GuestAgentCommandFailed) as info:
        be.agent_command("vm1", '{"fail":1}', 5)
    assert info.value.desc == "Failed to execute child process"
    with pytest.raises(LV.GuestAgentNotConfigured):
        be.agent_command("none", '{}', None)


def test_python_backend_agent_command(monkeypatch):
    class Err(Exception):
        def __init__(self, code, msg):
            self.code, self.msg = code, msg

        def get_error_code(self):
            return self.code

        def get_error_message(self):
            return self.msg

    calls = []

    def agent(dom, cmd, timeout, flags):
        calls.append((dom, cmd, timeout))
        if cmd == "bad":
            raise Err(86, "Guest agent is not responding: QEMU guest agent is not connected")
        return '{"return": {}}'

    fake_lv = types.SimpleNamespace(
        libvirtError=Err, VIR_ERR_NO_DOMAIN=42, VIR_ERR_AGENT_UNRESPONSIVE=86,
        VIR_ERR_AUTH_FAILED=45, VIR_ERR_ACCESS_DENIED=55, VIR_ERR_NO_CONNECT=5,
        VIR_ERR_SYSTEM_ERROR=38, VIR_ERR_RPC=39, registerErrorHandler=lambda *a: None,
        open=lambda uri: types.SimpleNamespace(lookupByName=lambda n: "dom:" + n))
    monkeypatch.setitem(sys.modules, "libvirt_qemu",
                        types.SimpleNamespace(qemuAgentCommand=agent,
                                              VIR_DOMAIN_QEMU_AGENT_COMMAND_DEFAULT=-1))
    be = LV.PythonBackend("qemu:///system", module=fake_lv)
    assert be.agent_command("vm1", "{}", None) == '{"return": {}}'
    assert calls[-1] == ("dom:vm1", "{}", -1)
    with pytest.raises(LV.GuestAgentNotConfigured):
        be.agent_command("vm1", "bad", 5)


def test_domain_xml_finds_the_qemu_ga_channel():
    xml = """<domain type='kvm' id='3'><name>vm1</name><uuid>u</uuid><devices>
      <channel type='unix'><source mode='bind' path='/run/q.sock'/>
        <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
        <address type='virtio-serial' controller='0' bus='0' port='1'/></channel>
      </devices></domain>"""
    dom = LV.parse_domain_xml(xml)
    assert dom.qga_channel is not None and dom.qga_channel.state == "connected"
    assert LV.parse_domain_xml(xml.replace("guest_agent", "other")).qga_channel is None


# --- the CLI ---------------------------------------------------------------------------------------

def _cli(args, env, stdin=b""):
    return subprocess.run([sys.executable, "-m", "guestlink"] + args, input=stdin,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                          env=dict(env, PYTHONPATH=os.path.join(REPO, "src")))


def test_cli_through_qemu_ga(sock, tmp_path):
    """The real CLI against the fake: the notice, exit statuses, --json saying via, usage errors."""
    env = {k: v for k, v in os.environ.items()
                   if not k.startswith("GUESTLINK_") or k in MASTER_ENV}
    env["GUESTLINK_QGA"] = sock
    env["GUESTLINK_CTL"] = os.path.join(os.path.dirname(sock), "absent-ctl.sock")

    async def main():
        async with FakeQga(sock) as fake:
            loop = asyncio.get_running_loop()
            call = lambda *a, **k: loop.run_in_executor(None, lambda: _cli(*a, **k))  # noqa: E731
            r = await call(["ping", "--json"], env)
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["via"] == "qga"
            notes = [ln for ln in r.stderr.decode().splitlines() if ln]
            assert len(notes) == 1 and "using qemu-guest-agent" in notes[0]
            assert "guestlink enroll" in notes[0]
            r = await call(["info"], env)
            assert r.returncode == 0 and b"agent:     qemu-ga 7.2.0\n" in r.stdout
            assert b"via:       qemu-guest-agent" in r.stdout
            r = await call(["exec", "--", "sh", "-c", "cat; exit 5"], env, b"piped")
            assert (r.returncode, r.stdout) == (5, b"piped")
            r = await call(["exec", "--", "sh", "-c", "kill -KILL $$"], env)
            assert r.returncode == 137
            r = await call(["cp", "-r", str(tmp_path), ":/tmp/x"], env)
            assert r.returncode == 2 and b"not available through qemu-ga" in r.stderr
            r = await call(["ping", "--via", "guestlink"], env)
            assert r.returncode == 69 and b"qemu-ga" not in r.stderr
            r = await call(["send", "t", "x"], env)  # a guestlink-only command: no fallback
            assert r.returncode == 69
            # guest strings are escaped in every text output
            hostile = "\x1b]0;pwned\x07\x1b[2J\u202e"
            fake.override["guest-get-host-name"] = lambda a: line({"return": {"host-name": hostile}})
            fake.override["guest-get-osinfo"] = lambda a: line({"return": {
                "kernel-release": hostile, "pretty-name": hostile}})
            for args in (["ping"], ["info"]):
                r = await call(args, env)
                assert r.returncode == 0, r.stderr
                assert b"\x1b" not in r.stdout + r.stderr and b"\\x1b]0;pwned" in r.stdout
    run(main(), 120)
    r = _cli(["ping", "--via", "qga"], {k: v for k, v in env.items() if k != "GUESTLINK_QGA"})
    assert r.returncode == 2 and b"--via qga needs" in r.stderr
