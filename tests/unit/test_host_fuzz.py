"""Fuzz: whatever the agent answers, a verb returns a validated value or raises ProtocolError /
RemoteError -- never KeyError, TypeError or another leak -- and the connection stays usable."""
import json
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import guestlink  # noqa: E402
from guestlink.host import errors  # noqa: E402
from guestlink.host.client import CompletedProcess  # noqa: E402
from guestlink.protocol import FrameType  # noqa: E402
from guestlink.protocol import messages as m  # noqa: E402
from test_host_fakeagent import INFO, ThreadedAgent, raw_frame  # noqa: E402

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
