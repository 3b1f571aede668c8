"""Fuzz: whatever the agent answers, a verb returns a validated value or raises ProtocolError /
RemoteError -- never KeyError, TypeError or another leak -- and the connection stays usable."""
import asyncio
import errno
import json
import math
import os
import sys
import tempfile
import tracemalloc

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import guestlink  # noqa: E402
from guestlink.host import errors  # noqa: E402
from guestlink.host import transfer as HT  # noqa: E402
from guestlink.host.client import CompletedProcess  # noqa: E402
from guestlink.protocol import FrameType  # noqa: E402
from guestlink.protocol import messages as m  # noqa: E402
from guestlink.protocol.frames import encode_frame  # noqa: E402
from test_host_fakeagent import DESCRIPTION, INFO, ThreadedAgent, raw_frame  # noqa: E402

KEYS = ["pong", "hostname", "kernel", "release", "machine", "os_release", "uptime", "addresses",
        "interface", "family", "address", "agent_version", "protocol", "boot_id", "python",
        "capabilities", "returncode", "signal", "timed_out", "duration", "stdout_truncated",
        "delivered", "code", "message", "details", "event", "pid"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 40, 2 ** 40),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
                    st.sampled_from(["inet", "inet6", "started", "x86_64", "denied"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
    max_leaves=12)
objects = st.dictionaries(st.sampled_from(KEYS), values, max_size=8)


def mutated_info():
    return st.builds(lambda key, value: dict(INFO, **{key: value}), st.sampled_from(sorted(INFO)),
                     values)


payloads = st.one_of(
    st.binary(max_size=64),
    objects.map(lambda o: json.dumps(o).encode()),
    mutated_info().map(lambda o: json.dumps(o).encode()),
    values.map(lambda o: json.dumps(o).encode()),
)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    import tempfile
    path = os.path.join(tempfile.mkdtemp(prefix="glf-"), "ctl.sock")
    state = {}

    async def answer(conn, id_, args):
        kind, payload = state["next"]
        frames = []
        if kind == "event":
            frames.append(raw_frame(FrameType.EVENT, payload, id_))
            frames.append(m.encode_response(id_, {"returncode": 0}))
        else:
            frames.append(raw_frame(kind, payload, id_))
        return b"".join(frames)

    helper = ThreadedAgent(path, handlers={op: answer for op in ("ping", "info", "exec", "op")})
    with helper:
        with guestlink.sync.connect(ctl=path, timeout=2, reconnect=False) as vm:
            yield vm, state


def attempt(fn):
    try:
        return fn()
    except (errors.ProtocolError, errors.RemoteError) as exc:
        assert str(exc)
        return exc


FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(payload=payloads, kind=st.sampled_from([FrameType.RESPONSE, FrameType.ERROR]))
def test_fuzzed_replies_never_leak(rig, payload, kind):
    vm, state = rig
    state["next"] = (kind, payload)
    for verb in (vm.ping, vm.info, lambda: vm.call("op"), lambda: vm.run(["x"])):
        result = attempt(verb)
        if kind == FrameType.ERROR and not isinstance(result, errors.ProtocolError):
            assert isinstance(result, errors.RemoteError)
        if not isinstance(result, Exception):
            assert kind == FrameType.RESPONSE
            assert isinstance(result, (float, dict, CompletedProcess))
    assert vm.connected


@FUZZ
@given(payload=payloads)
def test_fuzzed_exec_events_never_leak(rig, payload):
    vm, state = rig
    state["next"] = ("event", payload)
    result = attempt(lambda: vm.run(["x"]))
    assert isinstance(result, (CompletedProcess, errors.ProtocolError))
    assert vm.connected


# --- a hostile agent over the real sockets: every reply type, every field ----------------------
#
# Each example plays one exchange with a fresh agent (control and data sockets) where ONE frame
# the guest sends -- a reply, an ERROR, an exec event or stream, a MESSAGE, a SYNC_ACK, an fs.*
# reply, a transfer's ready event or final reply -- is mutated: fields dropped, retyped, made huge,
# deeply nested, NaN/inf, extra fields added, or the whole payload replaced by junk. The public
# API must answer with a value or an error of the documented tree, within bounded memory.

DEEP = "__deep__"  # stands for a 100 000-level nested array in the JSON text
HUGE = "x" * (300 << 10)

hostile_values = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 80, 2 ** 80), st.floats(),  # NaN and inf too
    st.text(max_size=12), st.sampled_from([HUGE, DEEP, "", "..", "/etc/passwd", "a\x00b",
                                           "\x1b]0;x\x07", 2 ** 63, -1, 0, 1e308, "file", "dir"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(),
                                                         max_size=3))
mutation = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 50)),
    st.tuples(st.just("set"), st.integers(0, 50), hostile_values),
    st.tuples(st.just("extra"), st.text(max_size=8), hostile_values),
    st.tuples(st.just("replace"), st.one_of(hostile_values, st.binary(max_size=40))),
)
mutations = st.lists(mutation, min_size=1, max_size=3)


def mutate(valid: dict, muts) -> bytes:
    """The JSON payload of ``valid`` after ``muts`` (keys chosen by index, so every field can be
    hit whatever the reply)."""
    obj = dict(valid)
    whole = None
    for mut in muts:
        kind = mut[0]
        keys = sorted(obj)
        if kind == "drop" and keys:
            obj.pop(keys[mut[1] % len(keys)])
        elif kind == "set" and keys:
            obj[keys[mut[1] % len(keys)]] = mut[2]
        elif kind == "extra":
            obj[mut[1]] = mut[2]
        elif kind == "replace":
            whole = mut[1]
    if isinstance(whole, bytes):
        return whole
    text = json.dumps(obj if whole is None else whole)  # NaN/Infinity as JavaScript writes them
    return text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000).encode()


class _WithoutFirstFrame:
    """A connection that drops the first frame sent through it (an event already sent raw)."""

    def __init__(self, conn):
        self.conn, self.first = conn, True

    def send(self, data: bytes) -> None:
        if self.first:
            self.first = False
        else:
            self.conn.send(data)


async def _exchange(ctl: str, dl: str, scenario: str, target: str, muts, as_error: bool):
    """Run one scenario against a hostile agent; return what the public API returned or raised."""
    from test_host_hostile_transfer import NONCE, HostileAgent, reply_for, stat_reply

    box = {}  # "agent": the scenario's agent, for its handlers

    def hostile(valid: dict, name: str) -> bytes:
        return mutate(valid, muts) if name == target else json.dumps(valid).encode()

    def answer(id_, valid, name):
        if name == target and as_error:
            err = {"code": "internal", "message": "boom", "details": {}}
            return raw_frame(FrameType.ERROR, mutate(err, muts), id_)
        return raw_frame(FrameType.RESPONSE, hostile(valid, name), id_)

    async def simple(conn, id_, args):
        valid = {"ping": {"pong": True}, "info": dict(INFO), "op": {"ok": 1}}[scenario]
        return answer(id_, valid, "reply")

    async def exec_(conn, id_, args):
        conn.send(raw_frame(FrameType.EVENT, hostile({"event": "started", "pid": 42}, "event"),
                            id_))
        flags = 1 if target != "stream" else (muts[0][1] if muts[0][0] in ("drop", "set") else 7)
        conn.send(encode_frame(FrameType.STREAM, b"out", flags=flags & 0xFF, id=id_))
        conn.send(m.encode_stream(id_, 1, b"", eof=True))
        conn.send(m.encode_stream(id_, 2, b"", eof=True))
        return answer(id_, {"returncode": 0, "signal": None, "timed_out": False,
                            "stdout_truncated": False, "stderr_truncated": False,
                            "duration": 0.1}, "reply")

    async def fs_stat(conn, id_, args):
        kind = "dir" if scenario == "tree" else "file"
        return answer(id_, stat_reply(kind, 3), "stat")

    async def fs_list(conn, id_, args):
        return answer(id_, {"entries": [dict(stat_reply("file", 3), path="a")], "next": None},
                      "list")

    async def transfer_open(conn, id_, args):
        agent = box["agent"]
        if scenario == "push":
            conn.send(raw_frame(FrameType.EVENT, hostile(
                {"event": "ready", "transfer": args.int("transfer"), "nonce": "ab" * 16,
                 "offset": 0, "path": args.str("path")}, "ready"), id_))
            sock = await agent.data()
            agent.data_sock = None
            sock.close()  # no DATA_HELLO: the host's sender stops at once
            return answer(id_, {"path": args.str("path"), "size": 0, "digest": "0" * 64,
                                "algorithm": "sha256", "offset": 0}, "reply")
        if target == "ready":  # ours, raw (NaN and all), instead of send_files' own event
            conn.send(raw_frame(FrameType.EVENT, mutate(
                {"event": "ready", "transfer": args.int("transfer"), "nonce": NONCE, "offset": 0},
                muts), id_))
            conn = _WithoutFirstFrame(conn)
        done = await agent.send_files(conn, id_, args, [b"abc"])
        if done is None:
            return None
        return answer(id_, reply_for(args, done), "reply")

    async def message_scenario(vm):
        sub = vm.subscribe("t")
        for conn in box["agent"].conns:
            conn.send(raw_frame(FrameType.MESSAGE, hostile(
                {"topic": "t", "data": "x"}, "message"), 0))
            conn.send(m.encode_message("t", b"valid"))
        got = []
        while True:
            msg = await sub.get(timeout=2)
            got.append(msg)
            if msg.data == b"valid":
                return got

    handlers = {"ping": simple, "info": simple, "op": simple, "exec": exec_, "fs.stat": fs_stat,
                "fs.list": fs_list, "transfer.open": transfer_open}
    knobs = {}
    if scenario == "handshake":
        knobs["ack_override"] = lambda nonce: raw_frame(FrameType.SYNC_ACK, mutate(
            dict(DESCRIPTION, nonce=nonce), muts))
    if scenario == "publish":  # the fake agent encodes {"delivered": this} itself: no NaN, no DEEP
        delivered = next((mut[2] for mut in muts if mut[0] == "set"), 1)
        finite = not isinstance(delivered, float) or math.isfinite(delivered)
        knobs["delivered"] = delivered if finite and delivered != DEEP else "junk"
    agent = box["agent"] = HostileAgent(ctl, handlers=handlers, **knobs)
    async with agent:
        try:
            async with guestlink.connect(ctl=ctl, data=ctl + ".data", reconnect=False,
                                         timeout=0.5 if scenario == "handshake" else 2) as vm:
                if scenario in ("handshake", "ping"):
                    return await vm.ping()
                if scenario == "info":
                    return await vm.info()
                if scenario == "op":
                    return await vm.call("op")
                if scenario == "publish":
                    return await vm.publish("t", b"x")
                if scenario == "exec":
                    return await vm.run(["x"])
                if scenario == "message":
                    return await message_scenario(vm)
                if scenario == "pull":
                    return await vm.pull("/f", os.path.join(dl, "out"))
                if scenario == "tree":
                    return await vm.pull("/tree", os.path.join(dl, "tree"), recursive=True)
                if scenario == "push":
                    return await vm.push(__file__, "/remote/file")
                raise AssertionError(scenario)
        except errors.GuestlinkError as exc:
            assert str(exc)
            return exc


SCENARIOS = [
    ("handshake", "ack"), ("ping", "reply"), ("info", "reply"), ("op", "reply"),
    ("publish", "reply"), ("exec", "event"), ("exec", "stream"), ("exec", "reply"),
    ("message", "message"),
    ("pull", "stat"), ("pull", "ready"), ("pull", "reply"), ("tree", "stat"), ("tree", "list"),
    ("tree", "reply"), ("push", "ready"), ("push", "reply"),
]


@pytest.fixture(scope="module")
def memory():
    tracemalloc.start()
    yield
    tracemalloc.stop()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=st.sampled_from(SCENARIOS), muts=mutations, as_error=st.booleans())
@example(case=("pull", "reply"), muts=[("replace", DEEP)], as_error=False)
@example(case=("tree", "reply"), muts=[("set", 1, math.nan)], as_error=False)
@example(case=("pull", "ready"), muts=[("set", 2, math.inf)], as_error=False)
@example(case=("pull", "stat"), muts=[("drop", 4)], as_error=False)
@example(case=("info", "reply"), muts=[("set", 3, DEEP)], as_error=False)
@example(case=("exec", "reply"), muts=[("set", 0, 1e308)], as_error=True)
def test_a_hostile_agent_gets_only_documented_errors_in_bounded_memory(memory, case, muts,
                                                                       as_error):
    scenario, target = case
    as_error = as_error and target in ("reply", "stat", "list")
    with tempfile.TemporaryDirectory(prefix="glz-") as d:
        dl = os.path.join(d, "dl")
        os.mkdir(dl)
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            result = asyncio.run(asyncio.wait_for(
                _exchange(os.path.join(d, "c.sock"), dl, scenario, target, muts, as_error), 30))
        except OSError as exc:  # a pull the guest announced as larger than the host's free space
            assert exc.errno == errno.ENOSPC and scenario in ("pull", "tree"), repr(exc)
            result = exc
        except asyncio.TimeoutError:  # Subscription.get(timeout): documented
            assert scenario == "message"
            result = None
        peak = tracemalloc.get_traced_memory()[1] - base
    # what came out is a value of the documented type, or an error of the documented tree
    expected = {"handshake": float, "ping": float, "info": dict, "op": dict, "exec": CompletedProcess,
                "publish": int, "message": list, "pull": HT.TransferResult, "tree": HT.TransferResult,
                "push": HT.TransferResult}[scenario]
    assert result is None or isinstance(result, (expected, errors.GuestlinkError, OSError)), \
        repr(result)
    # the guest's payloads are capped at 1 MiB a frame: the host holds a few of them, no more
    assert peak < 48 << 20, peak
