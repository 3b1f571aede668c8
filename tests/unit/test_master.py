"""The control master (guestlink.host.master) with fake agents over unix sockets: multiplexing,
fan-out, transfer turns, cancellation of a dead client's calls, agent restart, VM loss, idle
exit, stale sockets, SO_PEERCRED, status/stop, the lean CLI path. docs/master.md."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import guestlink
from guestlink.host import errors as E
from guestlink.host import mastersock as MS
from guestlink.host.master import Master
from guestlink.protocol import FrameDecoder, FrameType
from guestlink.protocol import messages as m
from test_host_fakeagent import ThreadedAgent, short_tmp

SRC = os.path.dirname(os.path.dirname(os.path.abspath(guestlink.__file__)))


class ThreadedMaster:
    """A Master serving in its own event-loop thread."""

    def __init__(self, path, persist=30.0):
        self.master = Master(persist, path=path)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()
        self.error = None

    def _run(self):
        try:
            self.loop.run_until_complete(self.master.serve(self.ready.set))
        except BaseException as exc:  # reported by the test
            self.error = exc
            self.ready.set()

    def __enter__(self):
        assert self.master.take_lock()
        self.thread.start()
        assert self.ready.wait(10) and self.error is None
        return self

    def call(self, fn, *args):
        async def go():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)

    def stop(self):
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.master.request_stop)
            self.thread.join(10)

    def __exit__(self, *exc):
        self.stop()
        self.loop.close()


@pytest.fixture
def d(tmp_path, monkeypatch):
    path = short_tmp(tmp_path)
    monkeypatch.setenv("GUESTLINK_MASTER", "1")
    monkeypatch.setenv(MS.SOCKET_ENV, os.path.join(path, "m.sock"))
    monkeypatch.setenv(MS.PERSIST_ENV, "20s")
    monkeypatch.delenv("GUESTLINK_CTL", raising=False)
    monkeypatch.delenv("GUESTLINK_DOMAIN", raising=False)
    yield path
    try:  # a master a test started through the CLI
        MS.request(MS.OP_STOP, {}, timeout=5, path=os.path.join(path, "m.sock"))
        MS.wait_gone(os.path.join(path, "m.sock"), 10)
    except E.GuestlinkError:
        pass


async def in_agent(agent, fn, *args):
    """``fn(*args)`` in the agent's loop, awaited from another loop."""
    return await asyncio.get_running_loop().run_in_executor(None, on_agent_loop, agent, fn, *args)


def on_agent_loop(agent, fn, *args):
    """Call ``fn(*args)`` in the event loop of a ThreadedAgent's ``agent`` (never another's)."""
    async def go():
        return fn(*args)
    return asyncio.run_coroutine_threadsafe(go(), agent.server.get_loop()).result(10)


def cli(*argv, env=None, **kw):
    env = dict(os.environ if env is None else env, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, "-m", "guestlink"] + list(argv), env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60, **kw)


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


# --- multiplexing ------------------------------------------------------------------------------

def test_many_clients_share_one_agent_connection_with_ids_rewritten(d):
    ctl = os.path.join(d, "ctl.sock")
    with ThreadedAgent(ctl) as agent, ThreadedMaster(os.path.join(d, "m.sock")):
        async def main():
            clients = [await guestlink.connect(ctl=ctl, master=True) for _ in range(4)]
            assert all(c.session.via_master for c in clients)

            async def work(i, c):
                out = []
                for j in range(10):
                    r = await c.run(["echo", "c%d-%d" % (i, j)])
                    out.append(r.stdout)
                    assert await c.ping() >= 0
                return out
            results = await asyncio.gather(*(work(i, c) for i, c in enumerate(clients)))
            for c in clients:
                await c.close()
            return results
        results = asyncio.run(main())
    for i, out in enumerate(results):
        assert out == [b"c%d-%d\n" % (i, j) for j in range(10)]
    assert len(agent.conns) == 1  # one session for all four clients
    assert len([op for op, _ in agent.requests if op == "exec"]) == 40


def test_messages_fan_out_to_every_subscriber(d):
    ctl = os.path.join(d, "ctl.sock")
    with ThreadedAgent(ctl) as agent, ThreadedMaster(os.path.join(d, "m.sock")) as tm:
        async def main():
            a = await guestlink.connect(ctl=ctl, master=True)
            b = await guestlink.connect(ctl=ctl, master=True)
            sa, sb, other = a.subscribe("t"), b.subscribe("t"), b.subscribe("u")
            await a.ping(), await b.ping()  # both synchronised
            await in_agent(agent, agent.push, "t", b"x1")
            got = [(await sa.get(5)).data, (await sb.get(5)).data]
            delivered = await a.publish("host.t", "hi")
            with pytest.raises(asyncio.TimeoutError):
                await other.get(0.2)  # another topic
            await a.close(), await b.close()
            return got, delivered
        got, delivered = asyncio.run(main())
    assert got == [b"x1", b"x1"]
    assert delivered == 1 and agent.published == [("host.t", b"hi")]


def test_transfers_through_a_master_take_turns_on_the_data_socket(d, monkeypatch):
    from guestlink.host import transfer

    ctl, data = os.path.join(d, "ctl.sock"), os.path.join(d, "data.sock")
    active, order = [], []

    async def fake_transfer(client, direction, *args):
        active.append(client)
        assert len(active) == 1, "two transfers on the data socket at once"
        order.append(("start", id(client)))
        await asyncio.sleep(0.2)
        order.append(("end", id(client)))
        active.remove(client)
        return ("reply", {}, [], 0.2)

    monkeypatch.setattr(transfer, "_transfer_in_turn", fake_transfer)
    with ThreadedAgent(ctl), ThreadedMaster(os.path.join(d, "m.sock")):
        async def main():
            a = await guestlink.connect(ctl=ctl, data=data, master=True)
            b = await guestlink.connect(ctl=ctl, data=data, master=True)
            await asyncio.gather(*(transfer._transfer_one(c, "push", {}, None, None, None, None, None)
                                   for c in (a, b)))
            await a.close(), await b.close()
        asyncio.run(main())
    assert [kind for kind, _ in order] == ["start", "end", "start", "end"]


# --- failures ----------------------------------------------------------------------------------

def test_a_client_killed_mid_exec_has_its_call_cancelled_in_the_guest(d):
    ctl = os.path.join(d, "ctl.sock")
    with ThreadedAgent(ctl) as agent, ThreadedMaster(os.path.join(d, "m.sock")):
        env = dict(os.environ, PYTHONPATH=SRC)
        proc = subprocess.Popen([sys.executable, "-m", "guestlink", "exec", "--ctl", ctl, "-n",
                                 "--", "sleep", "60"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            assert wait_for(lambda: agent.execs), "the exec never reached the agent"
            assert proc.stdout.readline() == b"sleeping\n"
            proc.kill()
            proc.wait(10)
            assert wait_for(lambda: agent.cancels), "the dead client's exec was not cancelled"
        finally:
            proc.kill()
            proc.wait()
    assert len(agent.cancels) == 1


def test_agent_restart_fails_calls_in_flight_then_clients_go_on(d):
    ctl = os.path.join(d, "ctl.sock")
    with ThreadedAgent(ctl) as agent, ThreadedMaster(os.path.join(d, "m.sock")) as tm:
        async def main():
            c = await guestlink.connect(ctl=ctl, master=True)
            proc = await c.exec(["sleep", "30"]).start()
            await in_agent(agent, agent.restart)
            with pytest.raises(E.ConnectionLost):
                await proc.wait()
            assert await c.ping() >= 0  # re-synchronised through the master
            r = await c.run(["echo", "again"])
            await c.close()
            return r.stdout
        assert asyncio.run(main()) == b"again\n"
    assert len(agent.conns) == 1  # the master kept its connection; the agent re-synchronised


def test_vm_socket_closing_ends_one_shot_clients_and_the_master_reconnects(d):
    ctl = os.path.join(d, "ctl.sock")
    with ThreadedAgent(ctl) as agent, ThreadedMaster(os.path.join(d, "m.sock")) as tm:
        async def main():
            c = await guestlink.connect(ctl=ctl, master=True, reconnect=False)
            proc = await c.exec(["sleep", "30"]).start()
            await in_agent(agent, agent.drop)
            with pytest.raises(E.ConnectionLost):
                await proc.wait()
            await c.close()
        asyncio.run(main())
        done = cli("ping", "--ctl", ctl)
        assert done.returncode == 0 and "pong from fakevm" in done.stdout, done.stderr
    assert len(agent.conns) == 2


def test_attach_errors_are_the_errors_of_a_direct_connection(d):
    with ThreadedMaster(os.path.join(d, "m.sock")):
        async def main():
            with pytest.raises(E.SocketNotFound, match="does not exist"):
                await guestlink.connect(ctl=os.path.join(d, "none.sock"), master=True)
        asyncio.run(main())
        done = cli("ping", "--ctl", os.path.join(d, "none.sock"))
        assert done.returncode == 69 and done.stderr.startswith("guestlink: error: control socket")


# --- lifecycle ---------------------------------------------------------------------------------

def _master_pid(sock):
    try:
        return MS.request(MS.OP_STATUS, {}, path=sock)["pid"]
    except E.GuestlinkError:
        return None


def test_started_by_a_command_it_exits_after_its_persist_time(d):
    ctl, sock = os.path.join(d, "ctl.sock"), os.path.join(d, "m.sock")
    with ThreadedAgent(ctl) as agent:
        done = cli("ping", "--ctl", ctl, "--persist", "1s")
        assert done.returncode == 0, done.stderr
        pid = _master_pid(sock)
        assert pid and pid != os.getpid()
        assert wait_for(lambda: not os.path.exists(sock), 15), "the master outlived its persist time"
        assert wait_for(lambda: not os.path.exists("/proc/%d" % pid) or
                        open("/proc/%d/stat" % pid).read().split()[2] == "Z", 5)
        assert agent.conns[0].writer.is_closing() or wait_for(
            lambda: agent.conns[0].writer.is_closing(), 5)


def test_a_stale_socket_of_a_killed_master_does_not_block_the_next(d):
    ctl, sock = os.path.join(d, "ctl.sock"), os.path.join(d, "m.sock")
    with ThreadedAgent(ctl):
        assert cli("ping", "--ctl", ctl).returncode == 0
        pid = _master_pid(sock)
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: _master_pid(sock) is None)
        assert os.path.exists(sock)  # stale
        done = cli("ping", "--ctl", ctl)
        assert done.returncode == 0, done.stderr
        new = _master_pid(sock)
        assert new and new != pid


def test_persist_0_and_GUESTLINK_MASTER_0_never_start_one(d, monkeypatch):
    ctl, sock = os.path.join(d, "ctl.sock"), os.path.join(d, "m.sock")
    with ThreadedAgent(ctl):
        assert cli("ping", "--ctl", ctl, "--persist", "0").returncode == 0
        assert not os.path.exists(sock)
        env = dict(os.environ, GUESTLINK_MASTER="0")
        assert cli("ping", "--ctl", ctl, env=env).returncode == 0
        assert not os.path.exists(sock)


def test_sigterm_stops_it_cleanly(d):
    ctl, sock = os.path.join(d, "ctl.sock"), os.path.join(d, "m.sock")
    with ThreadedAgent(ctl):
        assert cli("ping", "--ctl", ctl).returncode == 0
        pid = _master_pid(sock)
        os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: not os.path.exists(sock))
        assert not os.path.exists(MS.lock_path(sock)) or _master_pid(sock) is None


def test_status_and_stop(d):
    ctl, sock = os.path.join(d, "ctl.sock"), os.path.join(d, "m.sock")
    with ThreadedAgent(ctl):
        missing = cli("master", "status", "--json")
        assert missing.returncode == 69 and json.loads(missing.stdout) == {"running": False}
        assert cli("exec", "--ctl", ctl, "--", "true").returncode == 0
        st = cli("master", "status", "--json")
        info = json.loads(st.stdout)
        assert st.returncode == 0 and info["running"] and info["pid"] > 0
        assert [vm["ctl"] for vm in info["vms"]] == [ctl]
        assert info["vms"][0]["state"] == "running" and info["vms"][0]["hostname"] == "fakevm"
        text = cli("master", "status").stdout
        assert "master pid %d" % info["pid"] in text and ctl in text
        assert cli("master", "stop", ctl).stdout.startswith("closed the master's session of")
        assert json.loads(cli("master", "status", "--json").stdout)["vms"] == []
        bad = cli("master", "stop", "nosuchvm")
        assert bad.returncode == 69 and "holds no session of nosuchvm" in bad.stderr
        done = cli("master", "stop")
        assert done.returncode == 0 and "stopped the guestlink master" in done.stdout
        assert not os.path.exists(sock)
        assert cli("master", "stop").returncode == 69


# --- who may use it ------------------------------------------------------------------------------

@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become another uid")
def test_another_uid_is_refused_by_SO_PEERCRED(d):
    import tempfile

    open_dir = tempfile.mkdtemp(prefix="gl-peer-")  # reachable by the other uid
    os.chmod(open_dir, 0o755)
    sock = os.path.join(open_dir, "m.sock")
    with ThreadedMaster(sock):
        os.chmod(sock, 0o666)  # let the other uid reach accept(): SO_PEERCRED must refuse it
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(sock)
                s.settimeout(5)  # the master answers at once, before any request
                data = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                frames = [f for f in FrameDecoder().feed(data) if hasattr(f, "payload")]
                code = 0 if (len(frames) == 1 and frames[0].type == FrameType.ERROR
                             and b"own user only" in frames[0].payload) else 2
                # the real client sends its request first: it still gets the error, not a reset
                for _ in range(5):
                    try:
                        MS.request(MS.OP_STATUS, {}, path=sock)
                        code = 4
                    except E.PermissionDenied as exc:
                        if "own user only" not in str(exc):
                            code = 5
            except BaseException as exc:
                os.write(2, ("child: %r\n" % (exc,)).encode())
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        assert MS.request(MS.OP_STATUS, {}, path=sock)["pid"] == os.getpid()  # ours: served


def test_a_planted_symlink_is_never_followed(d, tmp_path):
    target = os.path.join(d, "elsewhere.sock")
    link = os.path.join(d, "link.sock")
    os.symlink(target, link)
    with pytest.raises(E.PermissionDenied, match="not a socket of this user"):
        MS.connect_socket(link)
    master = Master(5, path=link)
    assert master.take_lock()
    s = master.bind()  # the link is replaced by a socket, its target untouched
    s.close()
    assert not os.path.islink(link) and not os.path.exists(target)
    plain = os.path.join(d, "plain")
    open(plain, "w").close()
    with pytest.raises(OSError, match="not a socket"):
        Master(5, path=plain).bind()


def test_the_private_dir_is_refused_when_others_could_write_it(tmp_path, monkeypatch):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert MS.private_dir() == str(runtime / "guestlink")
    assert os.stat(runtime / "guestlink").st_mode & 0o777 == 0o700
    os.chmod(runtime / "guestlink", 0o755)
    MS.private_dir()
    assert os.stat(runtime / "guestlink").st_mode & 0o777 == 0o700  # tightened
    os.chmod(runtime / "guestlink", 0o777)
    with pytest.raises(E.ConnectError, match="refusing"):
        MS.private_dir()


# --- the lean one-shot path -------------------------------------------------------------------

def test_one_shot_commands_through_a_master_do_not_import_asyncio(d):
    ctl = os.path.join(d, "ctl.sock")
    probe = ("import sys; from guestlink.cli import main; code = main(sys.argv[1:]); "
             "sys.stdout.flush(); print('ASYNCIO' if 'asyncio' in sys.modules else 'LEAN'); "
             "sys.exit(code)")
    with ThreadedAgent(ctl) as agent, ThreadedMaster(os.path.join(d, "m.sock")):
        env = dict(os.environ, PYTHONPATH=SRC, GUESTLINK_CTL=ctl)
        for argv, out, code in ((["ping"], "pong from fakevm", 0),
                                (["info", "--json"], '"hostname": "fakevm"', 0),
                                (["info", "--json"], '"via": "guestlink"', 0),
                                (["exec", "--", "both", "3"], "to-stdout", 3),
                                (["exec", "--json", "--", "echo", "j"], '"stdout": "j\\n"', 0),
                                (["call", "nosuch"], "", 70),
                                (["send", "topic.a", "hello"], "delivered to 1 subscriber", 0)):
            done = subprocess.run([sys.executable, "-c", probe] + argv, env=env, text=True,
                                  capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
            assert done.returncode == code, (argv, done.stderr)
            assert out in done.stdout and done.stdout.rstrip().endswith("LEAN"), (argv, done.stdout)
        assert agent.published == [("topic.a", b"hello")]
        assert len(agent.conns) == 1
        # stdin is forwarded on the lean path too
        done = subprocess.run([sys.executable, "-m", "guestlink", "exec", "--", "cat"], env=env,
                              input=b"piped\n", capture_output=True, timeout=60)
        assert done.returncode == 0 and done.stdout == b"piped\n", done.stderr


#: What the lean path must never import (issue 14: the one-shot CLI as cheap as possible):
#: asyncio and the asyncio host modules, and dataclasses (with inspect, ast, dis, tokenize...):
#: the protocol's events and messages are protocol.frames.Value classes.
HEAVY = ("asyncio", "dataclasses", "inspect", "ast", "base64", "hashlib", "secrets", "subprocess",
         "guestlink.host.client", "guestlink.host.session", "guestlink.libvirt")


def test_the_lean_path_imports_only_what_it_uses(d):
    """The modules a one-shot command through a master imports (a guard on the start-up cost):
    none of HEAVY, at most 20 guestlink modules for ping (23 for exec: + ops, options, timing)."""
    ctl = os.path.join(d, "ctl.sock")
    probe = ("import sys; before = set(sys.modules); from guestlink.cli import main; "
             "code = main(sys.argv[1:]); import json; sys.stdout.flush(); "
             "print(json.dumps(sorted(set(sys.modules) - before))); sys.exit(code)")
    with ThreadedAgent(ctl), ThreadedMaster(os.path.join(d, "m.sock")):
        env = dict(os.environ, PYTHONPATH=SRC, GUESTLINK_CTL=ctl)
        for argv, most in ((["ping"], 20), (["exec", "--", "true"], 23)):
            done = subprocess.run([sys.executable, "-c", probe] + argv, env=env, text=True,
                                  capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
            assert done.returncode == 0, (argv, done.stderr)
            imported = json.loads(done.stdout.splitlines()[-1])
            assert [m for m in HEAVY if m in imported] == [], argv
            ours = [m for m in imported if m.startswith("guestlink")]
            assert len(ours) <= most, (argv, ours)
            assert len(imported) <= 90, (argv, imported)


def test_the_lean_path_resolves_a_domain_in_the_master_once(d, monkeypatch):
    from guestlink import libvirt

    ctl = os.path.join(d, "ctl.sock")
    calls = []

    def fake_resolver(name, uri=None, ctl_name=None, data_name=None):
        def resolve():
            calls.append((name, uri, ctl_name, data_name))
            return ctl, None
        return resolve

    monkeypatch.setattr(libvirt, "resolver", fake_resolver)
    with ThreadedAgent(ctl), ThreadedMaster(os.path.join(d, "m.sock")) as tm:
        env = dict(os.environ, PYTHONPATH=SRC, GUESTLINK_CTL_NAME="my.ctl")
        for _ in range(3):
            done = cli("ping", "vm1", env=env)
            assert done.returncode == 0, done.stderr
        status = tm.call(tm.master.status)
    assert calls == [("vm1", None, "my.ctl", None)]  # looked up once, then cached
    assert status["vms"][0]["domain"] == "vm1"


def test_the_master_socket_speaks_the_agent_protocol_after_attach(d):
    ctl = os.path.join(d, "ctl.sock")
    with ThreadedAgent(ctl), ThreadedMaster(os.path.join(d, "m.sock")):
        s = MS.connect_socket(os.path.join(d, "m.sock"))
        reply = MS.first_request(s, MS.OP_ATTACH, MS.attach_args(ctl, timeout=5), 10)
        assert reply == {"ctl": ctl, "data": None}
        s.sendall(m.encode_request(7, "ping", {}))  # before SYNC: not_ready, as the agent says
        s.sendall(m.encode_sync("ab" * 16))
        s.sendall(m.encode_request(8, "ping", {}))
        frames, dec = [], FrameDecoder()
        s.settimeout(5)
        while len(frames) < 3:
            frames += [f for f in dec.feed(s.recv(65536)) if hasattr(f, "payload")]
        s.close()
    kinds = [(f.type, f.id) for f in frames]
    assert kinds == [(FrameType.ERROR, 7), (FrameType.SYNC_ACK, 0), (FrameType.RESPONSE, 8)]
    assert m.parse_error(frames[0].payload)[0] == "not_ready"
    assert m.parse_sync_ack(frames[1].payload)[0] == "ab" * 16


def test_a_reconnecting_client_attaches_again_after_the_vm_socket_closed(d):
    ctl = os.path.join(d, "ctl.sock")
    with ThreadedAgent(ctl) as agent, ThreadedMaster(os.path.join(d, "m.sock")) as tm:
        async def main():
            c = await guestlink.connect(ctl=ctl, master=True, reconnect=True)
            sub = c.subscribe("t")
            await c.ping()
            await in_agent(agent, agent.drop)
            assert await c.ping(timeout=10) >= 0  # waited for the re-attach, then answered
            await in_agent(agent, agent.push, "t", b"back")
            got = (await sub.get(5)).data
            await c.close()
            return got
        assert asyncio.run(main()) == b"back"
    assert len(agent.conns) == 2


def test_a_vm_held_by_a_direct_client_is_reported_in_use(d):
    ctl = os.path.join(d, "ctl.sock")
    with ThreadedAgent(ctl), ThreadedMaster(os.path.join(d, "m.sock")):
        async def main():
            direct = await guestlink.connect(ctl=ctl, master=False)
            assert not direct.session.via_master
            with pytest.raises(E.VMInUse, match="in use by pid %d" % os.getpid()):
                await guestlink.connect(ctl=ctl, master=True, timeout=1)
            await direct.close()
            late = await guestlink.connect(ctl=ctl, master=True, timeout=5)  # its turn now
            assert late.session.via_master and await late.ping() >= 0
            await late.close()
        asyncio.run(main())


def test_ctrl_c_during_a_lean_exec_cancels_it_in_the_guest(d):
    ctl = os.path.join(d, "ctl.sock")
    with ThreadedAgent(ctl) as agent, ThreadedMaster(os.path.join(d, "m.sock")):
        env = dict(os.environ, PYTHONPATH=SRC)
        proc = subprocess.Popen([sys.executable, "-m", "guestlink", "exec", "--ctl", ctl, "-n",
                                 "--", "sleep", "60"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            assert proc.stdout.readline() == b"sleeping\n"
            proc.send_signal(signal.SIGINT)
            assert proc.wait(15) == 130
            assert b"Traceback" not in proc.stderr.read()
        finally:
            proc.kill()
            proc.wait()
        assert len(agent.cancels) == 1


def test_group_mode_opens_the_socket_to_one_group(d):
    import grp
    import stat

    group = grp.getgrgid(os.getgid()).gr_name
    sock = os.path.join(d, "g.sock")
    master = Master(5, path=sock, group=group)
    assert master.take_lock()
    listener = master.bind()
    try:
        st = os.stat(sock)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
        assert master._allowed(12345, os.getgid()) and not master._allowed(12345, 54321)
    finally:
        listener.close()
    with pytest.raises(ValueError, match="no such group"):
        Master(5, path=sock, group="no-such-group-here")


def test_when_no_master_can_start_clients_connect_directly(d, monkeypatch):
    ctl = os.path.join(d, "ctl.sock")
    monkeypatch.setenv(MS.SOCKET_ENV, os.path.join(d, "no", "such", "dir", "m.sock"))
    with ThreadedAgent(ctl):
        async def main():
            c = await guestlink.connect(ctl=ctl, master=True, persist=5)
            assert not c.session.via_master and await c.ping() >= 0
            await c.close()
        asyncio.run(main())
        done = cli("exec", "--ctl", ctl, "--", "echo", "direct")
        assert done.returncode == 0 and done.stdout == "direct\n", done.stderr


def test_garbage_or_an_unknown_first_request_gets_nothing_but_eof(d):
    sock = os.path.join(d, "m.sock")
    with ThreadedMaster(sock):
        s = MS.connect_socket(sock)
        s.sendall(os.urandom(100 << 10))  # no frame in the first 64 KiB: dropped
        s.settimeout(10)
        assert s.recv(100) == b""
        s.close()
        s = MS.connect_socket(sock)
        with pytest.raises(E.ConnectError, match="unknown master request"):
            MS.first_request(s, "master.nosuch", {}, 10)
        s.close()
        s = MS.connect_socket(sock)
        with pytest.raises(E.ConnectError, match="bad request"):
            MS.first_request(s, MS.OP_ATTACH, {"vm": {"ctl": "relative.sock"}}, 10)
        s.close()
        assert MS.request(MS.OP_STATUS, {}, path=sock)["vms"] == []  # still serving
