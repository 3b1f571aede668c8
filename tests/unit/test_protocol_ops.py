"""protocol/ops.py: each operation's fields, built by one side and validated by the other."""
import pytest

from guestlink.protocol import ops
from guestlink.protocol.messages import ProtocolViolation, dump_json, load_json_object

INFO = {
    "hostname": "vm", "os_release": {"ID": "debian"},
    "kernel": {"release": "6.1", "version": "#1", "machine": "x86_64"}, "uptime": 1.5,
    "agent_version": "1.0", "protocol": 1, "boot_id": "b", "python": "3.8.18",
    "addresses": [{"interface": "lo", "family": "inet", "address": "127.0.0.1"}],
    "capabilities": ["ping"],
}


def through_the_wire(obj: object) -> dict:
    return load_json_object(dump_json(obj))


@pytest.mark.parametrize("message", [
    ops.Pong(),
    ops.Info.from_wire(INFO),
    ops.ExecRequest(argv=("ls", "-l"), env={"A": "1"}, env_clear=True, cwd="/tmp", stdin=True,
                    timeout=2.5, output_limit=10),
    ops.ExecRequest(shell="echo hi"),
    ops.ExecStarted(42),
    ops.ExecResult(returncode=-9, signal=9, timed_out=True, stdout_truncated=True, duration=0.25),
    ops.ExecResult(returncode=0),
    ops.StatEntry("file", 3, 0o644, 10**18, 0, 0),
    ops.StatEntry("symlink", 3, 0o777, -5, 1, 1, target="x", path="a/b"),
    ops.TransferReady("n" * 32, 0, transfer=3, size=10, mode=0o600, path="/x", offsets=[0, 1]),
])
def test_what_one_side_builds_the_other_reads_back(message: object) -> None:
    wire = through_the_wire(message.to_wire())  # type: ignore[attr-defined]
    assert type(message).from_wire(wire) == message  # type: ignore[attr-defined]


def test_info_reads_the_agent_description_and_back() -> None:
    assert ops.Info.from_wire(INFO).to_wire() == INFO


@pytest.mark.parametrize("cls,obj", [
    (ops.Pong, {}),
    (ops.Pong, {"pong": 1}),
    (ops.Info, dict(INFO, addresses=[{"interface": "lo", "family": "ipx", "address": "x"}])),
    (ops.Info, dict(INFO, addresses="lo")),
    (ops.Info, dict(INFO, protocol=1 << 16)),
    (ops.ExecRequest, {}),
    (ops.ExecRequest, {"argv": ["a"], "shell": "a"}),
    (ops.ExecRequest, {"argv": []}),
    (ops.ExecRequest, {"argv": ["a\0"]}),
    (ops.ExecRequest, {"shell": "a\0"}),
    (ops.ExecRequest, {"argv": ["a"], "env": {"A=B": "1"}}),
    (ops.ExecRequest, {"argv": ["a"], "timeout": ops.MAX_EXEC_TIMEOUT * 2}),
    (ops.ExecRequest, {"argv": ["a"], "timeout": -1}),
    (ops.ExecRequest, {"argv": ["a" * (ops.MAX_ARG + 1)]}),
    (ops.ExecRequest, {"argv": ["a"], "output_limit": -1}),
    (ops.ExecStarted, {"event": "started", "pid": -1}),
    (ops.ExecResult, {"returncode": 256}),
    (ops.ExecResult, {"returncode": 0, "signal": 0}),
    (ops.ExecResult, {"returncode": 0, "duration": -1}),
    (ops.StatEntry, {"type": "file", "size": -1}),
    (ops.StatEntry, {"type": "file", "mode": 0o10000}),
    (ops.StatEntry, {"type": "file", "uid": 1 << 32}),
    (ops.StatEntry, {"type": "x" * 17}),
    (ops.TransferReady, {"offset": 0}),
    (ops.TransferReady, {"nonce": "n", "offset": -1}),
    (ops.TransferReady, {"nonce": "n", "offset": 0, "mtime_ns": 1 << 63}),
])
def test_what_the_peer_should_not_send_is_refused(cls: type, obj: dict) -> None:
    with pytest.raises(ProtocolViolation):
        cls.from_wire(obj)  # type: ignore[attr-defined]


def test_event_name() -> None:
    assert ops.event_name({"event": "ready"}) == "ready"
    with pytest.raises(ProtocolViolation):
        ops.event_name({"event": 5})
