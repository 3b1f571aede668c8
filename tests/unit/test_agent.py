"""The real agent (a subprocess, ``--ctl-device unix:PATH``) against a test that plays the host
with the protocol core. The harness comes first, the tests after it."""
import json
import os
import pty
import signal
import tty
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from guestlink.protocol import Frame, FrameDecoder, FrameType
from guestlink.protocol import messages as m

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src")
TIMEOUT = 10.0


def agent_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.abspath(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*args, input=None, timeout=TIMEOUT):
    return subprocess.run([sys.executable, "-m", "guestlink.agent"] + list(args), input=input,
                          capture_output=True, env=agent_env(), timeout=timeout)


class Reply:
    def __init__(self, frame):
        self.frame = frame
        self.type = frame.type
        self.ok = frame.type == FrameType.RESPONSE
        if self.ok:
            self.result = m.parse_response(frame.payload)
            self.code = None
        else:
            self.code, self.message, self.details = m.parse_error(frame.payload)

    def __repr__(self):
        return "Reply(%r)" % (self.result if self.ok else (self.code, self.message))


class ExecResult:
    def __init__(self, frames):
        self.frames = frames
        self.events = [m.parse_event(f.payload) for f in frames if f.type == FrameType.EVENT]
        self.stdout = b"".join(bytes(f.payload) for f in frames
                               if f.type == FrameType.STREAM and f.flags & 0xFF == 1)
        self.stderr = b"".join(bytes(f.payload) for f in frames
                               if f.type == FrameType.STREAM and f.flags & 0xFF == 2)
        self.eofs = sorted(f.flags & 0xFF for f in frames if f.type == FrameType.STREAM and f.flags & 0x100)
        self.reply = Reply(frames[-1])

    @property
    def pid(self):
        return self.events[0]["pid"]


class Host:
    """Listens on a unix socket; the agent (started with --ctl-device unix:PATH) connects to it."""

    def __init__(self, config_text="", extra_args=(), handlers=None):
        self.dir = tempfile.mkdtemp(prefix="gla-", dir="/tmp")
        self.ctl = os.path.join(self.dir, "ctl.sock")
        self.sock_path = os.path.join(self.dir, "run", "agent.sock")
        self.handlers_dir = os.path.join(self.dir, "handlers.d")
        os.mkdir(self.handlers_dir)
        for name, text in (handlers or {}).items():
            with open(os.path.join(self.handlers_dir, name), "w") as f:
                f.write(text)
        self.config = os.path.join(self.dir, "agent.conf")
        with open(self.config, "w") as f:
            f.write(config_text)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.ctl)
        self.listener.listen(4)
        self.listener.settimeout(TIMEOUT)
        self.log_path = os.path.join(self.dir, "agent.log")
        self.extra_args = list(extra_args)
        self.proc = None
        self.conn = None
        self.decoder = FrameDecoder()
        self.backlog = []
        self._next_id = 100

    def args(self, ctl_device=None):
        return ["run", "--config", self.config, "--ctl-device", ctl_device or "unix:" + self.ctl,
                "--socket", self.sock_path, "--handlers-dir", self.handlers_dir,
                "--log-level", "debug"] + self.extra_args

    def start(self, ctl_device=None, connect=True):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "guestlink.agent"] + self.args(ctl_device),
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                     env=agent_env())
        if connect:
            self.accept()
        return self

    def accept(self):
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(TIMEOUT)
        self.decoder = FrameDecoder()
        self.backlog = []
        return self.conn

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def close(self):
        if self.conn is not None:
            self.conn.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- frames -------------------------------------------------------------------------------

    def send(self, data):
        self.conn.sendall(data)

    def new_id(self):
        self._next_id += 1
        return self._next_id

    def next_frame(self, timeout=TIMEOUT, match=None):
        """The next Frame (optionally the next one for which match(frame) is true)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, f in enumerate(self.backlog):
                if match is None or match(f):
                    del self.backlog[i]
                    return f
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no matching frame within %g s; agent log:\n%s" % (timeout, self.log()))
            self.conn.settimeout(left)
            try:
                data = self.conn.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise EOFError("agent closed the connection; log:\n" + self.log())
            self.backlog.extend(ev for ev in self.decoder.feed(data) if isinstance(ev, Frame))

    def hello(self):
        f = self.next_frame(match=lambda f: f.type == FrameType.HELLO)
        return m.parse_hello(f.payload)

    def sync(self, nonce="0123456789abcdef0123456789abcdef"):
        self.send(m.encode_sync(nonce))
        f = self.next_frame(match=lambda f: f.type == FrameType.SYNC_ACK)
        got, desc = m.parse_sync_ack(f.payload)
        assert got == nonce
        return desc

    def request(self, op, args=None, id=None):
        rid = id or self.new_id()
        self.send(m.encode_request(rid, op, args))
        return rid

    def reply(self, rid, timeout=TIMEOUT):
        return Reply(self.next_frame(timeout, lambda f: f.id == rid and f.type in (
            FrameType.RESPONSE, FrameType.ERROR)))

    def call(self, op, args=None, timeout=TIMEOUT):
        return self.reply(self.request(op, args), timeout)

    def exec_frames(self, rid, timeout=TIMEOUT):
        frames = []
        while True:
            f = self.next_frame(timeout, lambda f: f.id == rid)
            frames.append(f)
            if f.type in (FrameType.RESPONSE, FrameType.ERROR):
                return ExecResult(frames)

    def run(self, wait=TIMEOUT, **args):
        return self.exec_frames(self.request("exec", args), wait)

    def started_pid(self, rid):
        f = self.next_frame(match=lambda f: f.id == rid and f.type == FrameType.EVENT)
        return m.parse_event(f.payload)["pid"]


def process_gone(pid):
    """True when pid no longer exists or is a zombie (nobody may reap orphans in a container)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def wait_for(predicate, timeout=TIMEOUT, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# == fixtures ==================================================================================

@pytest.fixture
def make_host():
    hosts = []

    def make(**kwargs):
        start = kwargs.pop("start", True)
        host = Host(**kwargs)
        hosts.append(host)
        if start:
            host.start()
        return host

    yield make
    for h in hosts:
        h.close()


@pytest.fixture
def host(make_host):
    h = make_host()
    h.hello()
    h.sync()
    return h


# == handshake ===================================================================================

def test_hello_on_connect_describes_the_agent(make_host):
    h = make_host()
    first = h.next_frame()
    assert first.type == FrameType.HELLO
    hello = m.parse_hello(first.payload)
    assert hello["agent"] == "guestlink-agent"
    assert hello["protocol"] == m.PROTOCOL_VERSION
    assert set(hello["capabilities"]) >= {"ping", "info", "exec", "shutdown", "reboot"}
    assert len(hello["session"]) >= 16
    assert hello["boot_id"] == open("/proc/sys/kernel/random/boot_id").read().strip()


def test_requests_before_sync_are_not_ready_then_sync_ack_echoes_nonce(make_host):
    h = make_host()
    h.hello()
    early = h.call("ping")
    assert early.code == "not_ready"
    desc = h.sync("feedfacefeedfacefeedfacefeedface")
    assert desc["agent"] == "guestlink-agent" and desc["session"]
    assert h.call("ping").result == {"pong": True}


def test_repeated_sync_same_nonce_keeps_session_new_nonce_ends_it(host):
    rid = host.request("exec", {"argv": ["cat"], "stdin": True})
    pid = host.started_pid(rid)
    host.sync()  # same nonce as the fixture's: a resend, the exec survives
    assert host.call("ping").ok
    assert not process_gone(pid)
    host.sync("another-nonce-another-nonce-0001")  # a new session kills the old one's processes
    assert wait_for(lambda: process_gone(pid))
    assert host.call("ping").ok


def test_protocol_mismatch(make_host):
    h = make_host()
    h.hello()
    h.send(m.encode_sync("n1", protocol=99))
    f = h.next_frame(match=lambda f: f.type == FrameType.ERROR)
    code, message, details = m.parse_error(f.payload)
    assert (f.id, code) == (0, "protocol_mismatch")
    assert details == {"nonce": "n1", "protocol": 1}


# == simple ops ==================================================================================

def test_ping_and_unknown_command(host):
    assert host.call("ping").result == {"pong": True}
    r = host.call("no-such-op")
    assert r.code == "unknown_command" and "no-such-op" in r.message


def test_info_fields(host):
    info = host.call("info").result
    assert info["hostname"] == socket.gethostname()
    assert info["kernel"]["release"] == os.uname().release
    assert info["uptime"] > 0
    assert info["protocol"] == 1 and info["agent_version"]
    assert info["python"].count(".") == 2
    assert len(info["boot_id"]) == 36
    assert "exec" in info["capabilities"]
    assert isinstance(info["os_release"], dict)
    assert any(a["interface"] == "lo" and a["address"] == "127.0.0.1" for a in info["addresses"])


def test_bad_request_args(host):
    assert host.call("exec", {"argv": ["true"], "shell": "true"}).code == "bad_request"
    assert host.call("exec", {}).code == "bad_request"
    assert host.call("exec", {"argv": "true"}).code == "bad_request"
    rid = host.new_id()
    host.send(m.encode_frame(FrameType.REQUEST, b"{not json", id=rid))
    assert host.reply(rid).code == "bad_request"


# == exec ========================================================================================

def test_exec_argv_and_shell_exit_codes_and_signal(host):
    r = host.run(argv=["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.stdout, r.stderr, r.eofs) == (b"out\n", b"err\n", [1, 2])
    assert r.events[0]["event"] == "started" and r.events[0]["pid"] > 0
    assert r.reply.result["returncode"] == 3 and r.reply.result["signal"] is None
    assert r.reply.result["timed_out"] is False and r.reply.result["duration"] >= 0
    r = host.run(shell="echo $((6 * 7)); kill -9 $$")
    assert r.stdout == b"42\n"
    assert (r.reply.result["returncode"], r.reply.result["signal"]) == (-9, 9)


def test_exec_env_cwd_and_errors(host):
    r = host.run(shell="echo $GREETING; pwd; echo ${HOME:-unset}", env={"GREETING": "hi"},
                 env_clear=True, cwd="/tmp")
    assert r.stdout == b"hi\n/tmp\nunset\n"
    r = host.call("exec", {"argv": ["/no/such/program"]})
    assert r.code == "not_found" and "/no/such/program" in r.message
    assert host.call("exec", {"argv": ["true"], "cwd": "/no/such/dir"}).code == "not_found"
    not_executable = os.path.join(host.dir, "data.txt")
    with open(not_executable, "w") as f:
        f.write("just text\n")
    os.chmod(not_executable, 0o644)
    r = host.call("exec", {"argv": [not_executable]})
    assert r.code == "permission_denied" and "data.txt" in r.message


def test_exec_output_is_streamed_while_the_process_runs(host):
    rid = host.request("exec", {"shell": "echo first; read line; echo \"got $line\"", "stdin": True})
    first = host.next_frame(match=lambda f: f.id == rid and f.type == FrameType.STREAM)
    assert first.payload == b"first\n"  # the process is still blocked in `read`
    host.send(m.encode_stream(rid, 0, b"second\n", eof=True))
    r = host.exec_frames(rid)
    assert r.stdout == b"got second\n" and r.reply.result["returncode"] == 0


def test_exec_stdin_binary_in_several_frames(host):
    payload = bytes(range(256)) * 1200  # 307,200 bytes
    rid = host.request("exec", {"argv": ["cat"], "stdin": True})
    for i in range(0, len(payload), 50000):
        host.send(m.encode_stream(rid, 0, payload[i:i + 50000]))
    host.send(m.encode_stream(rid, 0, b"", eof=True))
    r = host.exec_frames(rid)
    assert r.stdout == payload and r.reply.result["returncode"] == 0
    assert all(len(f.payload) <= 65536 for f in r.frames)


def test_exec_child_that_ignores_stdin_does_not_wedge(host):
    rid = host.request("exec", {"argv": ["true"], "stdin": True})
    host.send(m.encode_stream(rid, 0, b"x" * 200000, eof=True))
    assert host.exec_frames(rid).reply.result["returncode"] == 0
    assert host.call("ping").ok


def test_timeout_kills_the_whole_process_group(host):
    started = time.monotonic()
    r = host.run(shell="sleep 300 & echo $!; wait", timeout=0.5)
    assert time.monotonic() - started < 5
    res = r.reply.result
    assert res["timed_out"] is True and res["signal"] == signal.SIGTERM
    grandchild = int(r.stdout)
    assert wait_for(lambda: process_gone(grandchild))


def test_timeout_applies_to_a_process_that_closed_its_output(host):
    r = host.run(shell="exec >&- 2>&-; sleep 30", timeout=0.3)
    assert r.reply.result["timed_out"] is True and r.eofs == [1, 2]


def test_exit_while_a_grandchild_holds_the_pipe(host):
    started = time.monotonic()
    r = host.run(shell="sleep 30 & echo done")
    assert r.stdout == b"done\n" and r.reply.result["returncode"] == 0
    assert time.monotonic() - started < 5
    os.killpg(r.pid, signal.SIGKILL)  # the background sleep is not the agent's business


def test_cancel_kills_the_group(host):
    rid = host.request("exec", {"shell": "sleep 30 & sleep 30"})
    pid = host.started_pid(rid)
    host.send(m.encode_cancel(rid))
    assert host.reply(rid).code == "cancelled"
    assert wait_for(lambda: process_gone(pid))
    assert host.call("ping").ok


def test_several_execs_at_once_while_ping_stays_answered(host):
    rids = [host.request("exec", {"shell": "read x; echo $x-%d" % i, "stdin": True}) for i in range(5)]
    pids = [host.started_pid(rid) for rid in rids]
    assert host.call("ping").ok  # answered while all five are blocked on stdin
    assert not any(process_gone(p) for p in pids)
    for rid in rids:
        host.send(m.encode_stream(rid, 0, b"go\n", eof=True))
    results = [host.exec_frames(rid) for rid in rids]
    assert [r.stdout for r in results] == [b"go-%d\n" % i for i in range(5)]


def test_output_truncation_is_flagged(host):
    r = host.run(shell="head -c 300000 /dev/zero; echo tail >&2", output_limit=100000)
    assert len(r.stdout) == 100000 and r.stderr == b"tail\n"
    assert r.reply.result["stdout_truncated"] is True and r.reply.result["stderr_truncated"] is False
    assert r.reply.result["returncode"] == 0


def test_max_timeout_bounds_every_exec(make_host):
    h = make_host(config_text="[exec]\nmax_timeout = 0.3\n")
    h.hello()
    h.sync()
    r = h.run(argv=["sleep", "30"])
    assert r.reply.result["timed_out"] is True and r.reply.result["signal"] == signal.SIGTERM


def test_busy_limit(make_host):
    h = make_host(config_text="[exec]\nmax_concurrent = 2\n")
    h.hello()
    h.sync()
    for _ in range(2):
        h.started_pid(h.request("exec", {"argv": ["cat"], "stdin": True}))
    r = h.call("exec", {"argv": ["true"]})
    assert r.code == "busy" and "max_concurrent" in r.message


def test_host_disconnect_ends_the_session_and_the_agent_reconnects(make_host):
    h = make_host()
    h.hello()
    h.sync()
    rid = h.request("exec", {"argv": ["sleep", "30"]})
    pid = h.started_pid(rid)
    h.conn.close()
    assert wait_for(lambda: process_gone(pid))
    h.accept()  # the agent reconnects (at most once per second)
    assert h.hello()["agent"] == "guestlink-agent"
    assert h.call("ping").code == "not_ready"


# == policy and handlers =========================================================================

GREET = """
import time
def handle(args, ctx):
    ctx.log.info("greeting %s", args.get("name"))
    if args.get("name") == "boom":
        raise RuntimeError("the handler exploded on purpose")
    if args.get("name") == "notify":
        ctx.send_message("handler.note", "from the handler")
    if args.get("name") == "slow":
        while not __import__("os").path.exists(args["flag"]):
            time.sleep(0.01)
    return {"greeting": "hello %s" % args.get("name")}
"""


def test_policy_deny(make_host):
    h = make_host(config_text="[policy]\ndeny = exec, re*\n", handlers={"greet.py": GREET})
    caps = h.hello()["capabilities"]
    assert "exec" not in caps and "reboot" not in caps and "greet" in caps and "ping" in caps
    h.sync()
    r = h.call("exec", {"argv": ["true"]})
    assert r.code == "denied" and "policy" in r.message and "exec" in r.message
    assert h.call("greet", {"name": "x"}).ok


def test_allow_flag_overrides_config_and_applies_to_handlers(make_host):
    h = make_host(config_text="[policy]\nallow = *\n", extra_args=["--allow", "ping,info"],
                  handlers={"greet.py": GREET})
    assert sorted(h.hello()["capabilities"]) == ["info", "ping"]
    h.sync()
    assert h.call("greet", {"name": "x"}).code == "denied"


def test_user_handlers(make_host):
    flag = "/tmp/gla-flag-%d" % os.getpid()
    h = make_host(handlers={"greet.py": GREET, "ping.py": GREET, "Bad Name.py": GREET,
                            "broken.py": "raise ImportError('nope')\n"})
    caps = h.hello()["capabilities"]
    assert "greet" in caps and "broken" not in caps
    h.sync()
    assert h.call("greet", {"name": "tester"}).result == {"greeting": "hello tester"}
    assert h.call("ping").result == {"pong": True}  # ping.py may not shadow the built-in
    r = h.call("greet", {"name": "boom"})
    assert r.code == "handler_error" and "exploded on purpose" in r.message
    assert "Traceback" in h.log() and "exploded on purpose" in h.log()
    assert h.call("greet", {"name": "notify"}).ok
    note = h.next_frame(match=lambda f: f.type == FrameType.MESSAGE)
    assert note.id == 0 and m.parse_message(note.payload) == ("handler.note", b"from the handler")
    slow = h.request("greet", {"name": "slow", "flag": flag})
    assert h.call("ping").ok  # the loop is not blocked by the slow handler
    open(flag, "w").close()
    try:
        assert h.reply(slow).result == {"greeting": "hello slow"}
    finally:
        os.unlink(flag)


# == garbage and stale bytes =====================================================================

def test_garbage_then_a_valid_request_is_answered(host):
    host.send(os.urandom(5000).replace(b"\x89", b"x") + b"\x89GLK" + os.urandom(7))
    half = m.encode_request(55, "ping")
    host.send(half[:len(half) // 2])
    host.send(os.urandom(300).replace(b"\x89", b"x"))
    assert host.call("ping").result == {"pong": True}


def test_corrupt_request_gets_bad_request(host):
    frame = bytearray(m.encode_request(77, "ping"))
    frame[-5] ^= 0xFF  # payload byte: the header CRC still matches, the payload CRC does not
    host.send(bytes(frame))
    r = host.reply(77)
    assert r.code == "bad_request" and "corrupt" in r.message
    assert host.call("ping").ok


def test_stale_bytes_are_drained_on_open(make_host):
    """A character device (a pty standing in for the virtio port) holding bytes from before."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    try:
        os.write(master, m.encode_sync("stale-nonce") + m.encode_request(9, "ping") + b"junk")
        h = make_host(start=False)
        h.start(ctl_device=os.ttyname(slave), connect=False)
        dec = FrameDecoder()
        frames = []
        deadline = time.monotonic() + TIMEOUT

        def read_frames():
            while time.monotonic() < deadline:
                try:
                    data = os.read(master, 65536)
                except BlockingIOError:
                    time.sleep(0.01)
                    continue
                frames.extend(f for f in dec.feed(data) if isinstance(f, Frame))
                return
        os.set_blocking(master, False)
        while not frames:
            read_frames()
        assert frames[0].type == FrameType.HELLO
        os.write(master, m.encode_request(10, "ping"))
        while not any(f.id == 10 for f in frames):
            read_frames()
        # the stale SYNC was discarded, so the fresh request is refused and the stale one unanswered
        assert [(f.type, f.id) for f in frames[1:]] == [(FrameType.ERROR, 10)]
        assert m.parse_error(frames[1].payload)[0] == "not_ready"
        assert "discarded" in h.log() and "stale bytes" in h.log()
    finally:
        os.close(master)
        os.close(slave)


# == local socket and the send / listen commands ================================================

def test_send_from_the_guest_to_the_host(host):
    r = run_cli("send", "guest.events", "hello from the guest", "--socket", host.sock_path)
    assert r.returncode == 0, r.stderr
    f = host.next_frame(match=lambda f: f.type == FrameType.MESSAGE)
    assert f.id == 0 and m.parse_message(f.payload) == ("guest.events", b"hello from the guest")
    r = run_cli("send", "guest.bin", "-", "--socket", host.sock_path, input=b"\x00\xff" * 10)
    assert r.returncode == 0
    f = host.next_frame(match=lambda f: f.type == FrameType.MESSAGE)
    assert m.parse_message(f.payload) == ("guest.bin", b"\x00\xff" * 10)


def test_send_without_a_host_or_without_an_agent(make_host):
    h = make_host()
    h.hello()  # no SYNC: no host session
    r = run_cli("send", "t", "x", "--socket", h.sock_path)
    assert r.returncode == 3 and r.stderr == b"guestlink-agent: no host is connected\n"
    r = run_cli("send", "t", "x", "--socket", "/nonexistent/agent.sock")
    assert r.returncode == 2 and b"is guestlink-agent running?" in r.stderr
    assert r.stderr.count(b"\n") == 1
    r = run_cli("send", "bad topic!", "x", "--socket", h.sock_path)
    assert r.returncode == 64 and b"Traceback" not in r.stderr


def test_listen_receives_host_messages(host):
    listener = subprocess.Popen([sys.executable, "-m", "guestlink.agent", "listen", "host.orders",
                                 "other", "--count", "2", "--json", "--socket", host.sock_path],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=agent_env())
    try:
        delivered = 0
        deadline = time.monotonic() + TIMEOUT
        while not delivered and time.monotonic() < deadline:  # until the listener has subscribed
            rid = host.new_id()
            host.send(m.encode_message("host.orders", b"first", id=rid))
            delivered = host.reply(rid).result["delivered"]
        assert delivered == 1
        rid = host.new_id()
        host.send(m.encode_message("nobody.listens", b"x", id=rid))
        assert host.reply(rid).result == {"delivered": 0}
        rid = host.new_id()
        host.send(m.encode_message("other", b"\xff\xfe", id=rid))
        assert host.reply(rid).result == {"delivered": 1}
        out, err = listener.communicate(timeout=TIMEOUT)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert listener.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0] == {"topic": "host.orders", "data": "first"}
    assert lines[1] == {"topic": "other", "data_base64": "//4="}


def test_local_socket_is_mode_0660(host):
    import stat
    st = os.stat(host.sock_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660


# == lifecycle ===================================================================================

def test_sigterm_stops_cleanly(host):
    rid = host.request("exec", {"shell": "sleep 30 & sleep 30"})
    pid = host.started_pid(rid)
    host.proc.send_signal(signal.SIGTERM)
    assert host.proc.wait(TIMEOUT) == 0
    assert process_gone(pid)
    assert not os.path.exists(host.sock_path)
    assert "stopped" in host.log() and "Traceback" not in host.log()


def test_second_agent_on_the_same_socket_refuses_to_start(host):
    r = run_cli(*host.args())
    assert r.returncode == 1 and b"another guestlink-agent is running" in r.stderr
    assert host.call("ping").ok


def test_bad_config_file_is_a_clear_error(tmp_path):
    conf = tmp_path / "agent.conf"
    conf.write_text("[exec]\nmax_output = lots\n")
    r = run_cli("run", "--config", str(conf))
    assert r.returncode == 78
    assert r.stderr.count(b"\n") == 1 and b"max_output" in r.stderr and b"Traceback" not in r.stderr
    r = run_cli("run", "--config", str(tmp_path / "missing.conf"))
    assert r.returncode == 78 and b"does not exist" in r.stderr


def test_shutdown_replies_then_runs_the_command(make_host):
    marker = "/tmp/gla-poweroff-%d" % os.getpid()
    h = make_host(config_text="[power]\npoweroff_command = sh -c 'echo off > %s'\n" % marker)
    h.hello()
    h.sync()
    try:
        assert h.call("shutdown").result == {}
        assert wait_for(lambda: os.path.exists(marker))
    finally:
        if os.path.exists(marker):
            os.unlink(marker)


def _rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


def test_backpressure_when_the_host_does_not_read(host):
    total = 15 << 20
    rid = host.request("exec", {"shell": "head -c %d /dev/zero" % total})
    host.started_pid(rid)
    baseline = _rss_kib(host.proc.pid)
    time.sleep(1.0)  # the host does not read: the agent must stop reading the pipe, not buffer 15 MiB
    assert _rss_kib(host.proc.pid) - baseline < 8 * 1024
    assert host.call("ping", timeout=TIMEOUT).ok  # reading the reply drains the backlog as well
    r = host.exec_frames(rid, timeout=30)
    assert len(r.stdout) == total and r.reply.result["returncode"] == 0
