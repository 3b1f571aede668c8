"""Hostile input against the protocol's JSON, the real agent process, its trusted files, and the
host's partial-frame stall timer (issue 9).

The agent tests run the REAL agent (``python -m guestlink.agent run``) against a raw host written
here with the protocol module, so the test can send what a hostile host (or a broken library)
would: numbers the host library refuses to encode.
"""
import asyncio
import json
import logging
import os
import pwd
import socket
import stat
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import guestlink  # noqa: E402
from guestlink.agent import handlers as agent_handlers  # noqa: E402
from guestlink.agent.config import ConfigError, load_config  # noqa: E402
from guestlink.agent.loop import MAX_WAIT, Timers  # noqa: E402
from guestlink.host import session as host_session  # noqa: E402
from guestlink.host import errors  # noqa: E402
from guestlink.protocol import FrameDecoder, FrameType, codes  # noqa: E402
from guestlink.protocol import messages as m  # noqa: E402
from guestlink.protocol import transfer as t  # noqa: E402
from guestlink.protocol.frames import encode_frame  # noqa: E402
from test_agent_units import fake_agent, frames_from  # noqa: E402,F401 (a fixture)
from test_host_fakeagent import FakeAgent, short_tmp  # noqa: E402

SRC = os.path.dirname(os.path.dirname(os.path.abspath(guestlink.__file__)))
ENV = dict(os.environ, PYTHONPATH=SRC)
DEEP = b"[" * 100000


def nobody_uid() -> int:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


def need_root() -> None:
    assert os.geteuid() == 0, "these tests chown files to another user: run them as root"


# --- one bounded JSON loader ---------------------------------------------------------------------

ALL_LOADERS = [
    ("REQUEST", m.parse_request), ("HELLO", m.parse_hello), ("RESPONSE", m.parse_response),
    ("ERROR", m.parse_error), ("DATA_HELLO", t.parse_hello), ("DATA_END", t.parse_end),
]


@pytest.mark.parametrize("name,parse", ALL_LOADERS, ids=[n for n, _ in ALL_LOADERS])
@pytest.mark.parametrize("payload", [
    DEEP, b'{"size":' + DEEP, b'{"a":' + b"[" * 65 + b"]" * 65 + b"}",
    b'{"a":{"b":' + b'{"c":' * 70 + b"1" + b"}" * 72,
], ids=["100000-deep", "100000-deep-in-object", "65-deep-valid", "72-deep-objects"])
def test_deep_nesting_is_the_documented_error_for_every_loader(name, parse, payload):
    with pytest.raises(m.ProtocolViolation) as exc:
        parse(payload)
    assert exc.value.code == codes.BAD_REQUEST
    assert "nested more than 64 deep" in str(exc.value)


@pytest.mark.parametrize("name,parse", ALL_LOADERS, ids=[n for n, _ in ALL_LOADERS])
@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1" * 400 + b".0", b"NaN", b"-Infinity",
                                    b"9" * 65])
def test_non_finite_and_huge_numbers_are_refused_by_every_loader(name, parse, number):
    with pytest.raises(m.ProtocolViolation) as exc:
        parse(b'{"size":' + number + b',"transfer":' + number + b"}")
    assert exc.value.code == codes.BAD_REQUEST
    assert any(why in str(exc.value) for why in ("out of range", "is not allowed", "more than 64 digits"))


def test_brackets_quotes_and_digits_inside_strings_do_not_count():
    tricky = "[{" * 200 + '\\"' + "9" * 100 + "\\\\"
    obj = {"op": "x", "args": {"s": tricky, "t": "]]" * 300, "deep": [[[[{"a": [1.5e300]}]]]]}}
    payload = json.dumps(obj).encode()
    assert m.load_json_object(payload) == obj
    at_limit = {"a": 1}
    for _ in range(63):
        at_limit = {"a": at_limit}
    assert m.load_json_object(m.dump_json(at_limit)) == at_limit  # 64 deep: accepted both ways
    assert m.load_json_object(b'{"a":' + b"9" * 64 + b"}") == {"a": int("9" * 64)}


def test_shape_check_agrees_with_the_decoder_on_escapes_and_unicode():
    samples = ['{"a":"\\\\"}', '{"a":"\\\\\\"[[["}', '{"\u00e9[":"\u2028{"}', '{"a":["\\u005b",[]]}']
    for text in samples:
        assert m.load_json_object(text.encode()) == json.loads(text)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_encoder_refuses_non_finite_numbers_with_a_value_error(value):
    with pytest.raises(ValueError) as exc:
        m.encode_request(1, "exec", {"argv": ["true"], "timeout": value})
    assert "NaN or an infinite number" in str(exc.value)


def test_encoder_refuses_what_the_peer_would_refuse():
    deep = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(ValueError, match="nested more than 64 deep"):
        m.dump_json({"a": deep})
    very_deep = []
    for _ in range(100000):
        very_deep = [very_deep]
    with pytest.raises(ValueError, match="nested too deeply"):
        m.dump_json({"a": very_deep})
    with pytest.raises(ValueError, match="more than 64 digits"):
        m.dump_json({"a": 10 ** 70})


def test_fields_int_is_bounded_to_64_bits_unless_told_otherwise():
    f = m.load_json_object(b'{"big":18446744073709551616,"neg":-9223372036854775809,"ok":-9223372036854775808}')
    fields = m.Fields(f, "T")
    for key in ("big", "neg"):
        with pytest.raises(m.ProtocolViolation, match="an integer in"):
            fields.int(key)
    assert fields.int("ok") == -(2 ** 63)
    assert fields.int("big", max=None) == 2 ** 64  # a caller may lift the bound explicitly


def test_fields_number_refuses_non_finite_values_built_locally():
    f = m.Fields({"x": float("inf"), "y": float("nan"), "z": 10 ** 400}, "T")
    for key in ("x", "y"):
        with pytest.raises(m.ProtocolViolation):
            f.number(key, min=0)
    with pytest.raises(m.ProtocolViolation):
        f.number("z", min=0, max=10)


# --- the real agent against a raw host ------------------------------------------------------------

class RawHost:
    """The host end of the agent's ``--ctl-device unix:PATH``: plain frames, any payload."""

    def __init__(self, directory: str):
        self.dir = directory
        self.path = os.path.join(directory, "ctl.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.sock = None
        self.proc = None
        self.decoder = FrameDecoder()
        self.frames = []

    def start_agent(self) -> None:
        conf = os.path.join(self.dir, "agent.conf")
        open(conf, "a").close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "guestlink.agent", "run", "--config", conf,
             "--ctl-device", "unix:" + self.path, "--socket", os.path.join(self.dir, "local.sock"),
             "--handlers-dir", os.path.join(self.dir, "handlers"), "--log-level", "warning"],
            env=ENV, stderr=subprocess.PIPE)
        self.listener.settimeout(15)
        self.sock, _ = self.listener.accept()
        self.sock.settimeout(15)
        assert self.next_frame().type == FrameType.HELLO
        self.sock.sendall(m.encode_sync("n" * 32))
        ack = self.next_frame()
        assert ack.type == FrameType.SYNC_ACK, ack

    def next_frame(self, id_=None):
        deadline = time.monotonic() + 15
        while True:
            for i, frame in enumerate(self.frames):
                if id_ is None or frame.id == id_:
                    return self.frames.pop(i)
            assert time.monotonic() < deadline, "no frame from the agent within 15 s"
            data = self.sock.recv(65536)
            assert data, "the agent closed the control socket (agent stderr: %r)" % self.stderr()
            self.frames += [ev for ev in self.decoder.feed(data) if hasattr(ev, "payload")]

    def final(self, id_):
        """The final reply to request ``id_``: ("RESPONSE", obj) or ("ERROR", code)."""
        while True:
            frame = self.next_frame(id_)
            if frame.type == FrameType.RESPONSE:
                return "RESPONSE", m.parse_response(frame.payload)
            if frame.type == FrameType.ERROR:
                return "ERROR", m.parse_error(frame.payload)[0]

    def request(self, id_, payload: bytes) -> None:
        self.sock.sendall(encode_frame(FrameType.REQUEST, payload, id=id_))

    def stderr(self) -> bytes:
        if self.proc.poll() is None:
            return b"(still running)"
        return self.proc.stderr.read()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.listener.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc is not None:
            self.proc.stderr.close()


@pytest.fixture
def raw_host(tmp_path):
    host = RawHost(short_tmp(tmp_path))
    try:
        host.start_agent()
        yield host
    finally:
        host.close()


def exec_payload(timeout: bytes, argv=("true",)) -> bytes:
    return b'{"op":"exec","args":{"argv":' + json.dumps(list(argv)).encode() + b',"timeout":' + timeout + b"}}"


def test_real_agent_refuses_absurd_exec_timeouts_and_keeps_serving(raw_host):
    """Issue 9: timeout 1e400 (inf to json) or beyond ~24.8 days overflowed select() in the loop
    and the agent exited, dropping every session."""
    absurd = [b"1e400", str(2 ** 64).encode(), str(3e6 * 86400).encode(), b"-1e400", b"NaN"]
    for i, timeout in enumerate(absurd, start=1):
        raw_host.request(i, exec_payload(timeout))
        assert raw_host.final(i) == ("ERROR", codes.BAD_REQUEST), timeout
    raw_host.request(50, m.dump_json({"op": "ping", "args": {}}))
    assert raw_host.final(50) == ("RESPONSE", {"pong": True})
    assert raw_host.proc.poll() is None


def test_real_agent_survives_a_timer_beyond_what_select_can_wait(raw_host):
    """30 days is a legal timeout, longer than epoll can wait in one call (INT_MAX ms)."""
    raw_host.request(7, exec_payload(b"2592000", argv=["sleep", "1000"]))
    started = raw_host.next_frame(7)
    assert started.type == FrameType.EVENT, started
    time.sleep(0.3)  # the loop has waited at least once with that timer pending
    raw_host.request(8, m.dump_json({"op": "ping", "args": {}}))
    assert raw_host.final(8) == ("RESPONSE", {"pong": True})
    raw_host.sock.sendall(m.encode_cancel(7))
    assert raw_host.final(7) == ("ERROR", codes.CANCELLED)
    assert raw_host.proc.poll() is None


def test_real_agent_answers_deep_json_with_bad_request(raw_host):
    raw_host.request(3, b'{"op":"ping","args":' + DEEP + b"}")
    assert raw_host.final(3) == ("ERROR", codes.BAD_REQUEST)
    raw_host.request(4, m.dump_json({"op": "ping", "args": {}}))
    assert raw_host.final(4) == ("RESPONSE", {"pong": True})


# --- the agent's config and handler files must be trusted ---------------------------------------

def write(path, text: str, mode: int = 0o644) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return str(path)


def test_config_owned_by_another_user_is_refused(tmp_path):
    need_root()
    conf = write(tmp_path / "agent.conf", "[policy]\ndeny = exec\n")
    os.chown(conf, nobody_uid(), -1)
    with pytest.raises(ConfigError) as exc:
        load_config(conf)
    assert "refusing config file" in str(exc.value) and "owned by uid %d" % nobody_uid() in str(exc.value)


@pytest.mark.parametrize("mode", [0o666, 0o664, 0o646])
def test_config_writable_by_group_or_others_is_refused(tmp_path, mode):
    conf = write(tmp_path / "agent.conf", "[policy]\ndeny = exec\n", mode)
    with pytest.raises(ConfigError, match="writable by its group or by others"):
        load_config(conf)


def test_config_in_an_untrusted_directory_is_refused(tmp_path):
    need_root()
    confdir = tmp_path / "etc"
    confdir.mkdir()
    conf = write(confdir / "agent.conf", "[policy]\ndeny = exec\n")
    os.chmod(confdir, 0o777)
    with pytest.raises(ConfigError, match="writable by its group or by others"):
        load_config(conf)
    os.chmod(confdir, 0o755)
    os.chown(confdir, nobody_uid(), -1)
    with pytest.raises(ConfigError, match="owned by uid"):
        load_config(conf)
    os.chown(confdir, 0, -1)
    assert load_config(conf).deny == ["exec"]


def test_config_symlink_is_refused_and_a_trusted_file_still_loads(tmp_path):
    real = write(tmp_path / "real.conf", "[policy]\ndeny = exec\n")
    assert load_config(real).deny == ["exec"]
    os.symlink(real, tmp_path / "agent.conf")
    with pytest.raises(ConfigError, match="symbolic link"):
        load_config(str(tmp_path / "agent.conf"))


def test_agent_refuses_to_start_on_an_untrusted_config_with_one_line(tmp_path):
    conf = write(tmp_path / "agent.conf", "[policy]\ndeny = exec\n", 0o666)
    fifo = str(tmp_path / "fifo.conf")
    os.mkfifo(fifo, 0o600)
    for path in (conf, fifo):
        proc = subprocess.run([sys.executable, "-m", "guestlink.agent", "run", "--config", path,
                               "--ctl-device", "unix:" + str(tmp_path / "none.sock")],
                              env=ENV, capture_output=True, text=True, timeout=20)
        assert proc.returncode == 78, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert "refusing config file %s" % path in proc.stderr


HANDLER = "def handle(args, ctx):\n    return {'op': %r}\n"


def make_handlers(tmp_path):
    hdir = tmp_path / "handlers.d"
    hdir.mkdir(mode=0o755)
    for op in ("good", "foreign", "open", "linked"):
        write(hdir / (op + ".py"), HANDLER % op)
    return hdir


def test_untrusted_handler_files_are_skipped_with_one_line_each(tmp_path, caplog):
    need_root()
    hdir = make_handlers(tmp_path)
    os.chown(hdir / "foreign.py", nobody_uid(), -1)
    os.chmod(hdir / "open.py", 0o666)
    os.unlink(hdir / "linked.py")
    os.symlink(str(hdir / "good.py"), hdir / "linked.py")
    caplog.set_level(logging.INFO, "guestlink.agent")
    handlers = agent_handlers.load_handlers(str(hdir), ("ping",))
    assert sorted(handlers) == ["good"] and handlers["good"]({}, None) == {"op": "good"}
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 3 and all("\n" not in s for s in skipped)
    assert any("foreign.py is owned by uid" in s for s in skipped)
    assert any("open.py is writable by its group or by others (mode 0666)" in s for s in skipped)
    assert any("linked.py is a symbolic link" in s for s in skipped)


def test_untrusted_handlers_directory_loads_nothing(tmp_path, caplog):
    need_root()
    hdir = make_handlers(tmp_path)
    os.chmod(hdir, 0o777)
    caplog.set_level(logging.INFO, "guestlink.agent")
    assert agent_handlers.load_handlers(str(hdir), ("ping",)) == {}
    assert any("no user handlers loaded" in r.getMessage() and "writable" in r.getMessage()
               for r in caplog.records)
    os.chmod(hdir, 0o755)
    os.chown(hdir, nobody_uid(), -1)
    assert agent_handlers.load_handlers(str(hdir), ("ping",)) == {}
    os.chown(hdir, 0, -1)
    assert set(agent_handlers.load_handlers(str(hdir), ("ping",))) == {"good", "foreign", "open",
                                                                       "linked"}


def test_handler_is_compiled_from_the_checked_file_and_writes_no_bytecode(tmp_path):
    hdir = make_handlers(tmp_path)
    os.mkfifo(hdir / "pipe.py", 0o644)  # must not hang the agent's start
    handlers = agent_handlers.load_handlers(str(hdir), ("ping",))
    assert "pipe" not in handlers and handlers["open"]({}, None) == {"op": "open"}
    assert not (hdir / "__pycache__").exists()
    assert stat.S_ISFIFO(os.stat(hdir / "pipe.py").st_mode)


# --- the host's partial-frame stall timer ---------------------------------------------------------

def test_a_trickling_frame_is_not_a_stall_but_a_silent_one_is(tmp_path, monkeypatch):
    """docs/protocol.md: a partial frame is abandoned when it makes no progress for the stall
    time, not when it takes longer than that in total."""
    monkeypatch.setattr(host_session, "PARTIAL_FRAME_STALL", 1.0)
    path = os.path.join(short_tmp(tmp_path), "ctl.sock")

    async def trickle(conn, id_, args):
        frame = m.encode_response(id_, {"slow": "x" * 8})
        conn.send(frame[:30])
        for i in range(30, len(frame)):  # 0.3 s per byte: ~3.6 s in all, 3.6 x the stall time
            await asyncio.sleep(0.3)
            conn.send(frame[i:i + 1])
        return None

    async def stall(conn, id_, args):
        conn.send(m.encode_response(id_, {"never": "complete"})[:30])
        await asyncio.sleep(30)

    async def main():
        async with FakeAgent(path, handlers={"trickle": trickle, "stall": stall}):
            async with guestlink.connect(ctl=path, data=path + ".data", timeout=30) as vm:
                loop = asyncio.get_running_loop()
                started = loop.time()
                slow = await vm.call("trickle")
                trickled_for = loop.time() - started
                started = loop.time()
                with pytest.raises(errors.ProtocolError) as stalled:
                    await vm.call("stall")
                stalled_after = loop.time() - started
                return slow, trickled_for, stalled.value, stalled_after, await vm.ping()

    slow, trickled_for, stalled, stalled_after, pong = asyncio.run(asyncio.wait_for(main(), 40))
    assert slow == {"slow": "x" * 8} and trickled_for > 3
    assert "truncated" in str(stalled) and 0.9 < stalled_after < 5
    assert pong > 0


# --- the agent's loop: bounded waits, guarded select ----------------------------------------------

def test_timers_bound_the_wait_and_refuse_non_finite_delays():
    timers = Timers(clock=lambda: 1000.0)
    timers.call_later(2 ** 64, lambda: None)
    assert timers.timeout() == MAX_WAIT  # select() overflows beyond INT_MAX ms
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite"):
            timers.call_later(bad, lambda: None)


def test_a_failing_wait_does_not_end_the_agent(fake_agent, caplog):
    agent, port = fake_agent
    real_select = agent.sel.select
    failures = []

    def select_once_broken(timeout=None):
        if not failures:
            failures.append(timeout)
            raise OverflowError("timeout is too large")
        return real_select(timeout)

    caplog.set_level(logging.ERROR, "guestlink.agent")
    agent.sel.select = select_once_broken
    port.host_end.settimeout(10)
    port.present = True
    dec = FrameDecoder()
    assert frames_from(port.host_end, dec, 1)[0].type == FrameType.HELLO
    port.host_end.sendall(m.encode_sync("n-3") + m.encode_request(9, "ping"))
    ack, pong = frames_from(port.host_end, dec, 2)
    assert (pong.type, pong.id) == (FrameType.RESPONSE, 9) and failures
    assert any("waiting for events failed" in r.getMessage() for r in caplog.records)
