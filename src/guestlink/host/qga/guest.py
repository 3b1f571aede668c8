"""qemu-ga commands as Python calls, each reply validated: exec, file read/write, guest facts.

Every function takes a :class:`~guestlink.host.qga.transport.QgaTransport`. What qemu-ga sends is
untrusted: types, ranges and sizes are checked, base64 is decoded strictly, and anything else
raises ProtocolError (the host error tree, guestlink.host.errors).
"""

import asyncio
import base64
import binascii
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ...protocol import codes
from .. import errors as E
from .transport import QgaTransport

#: qemu-ga keeps at most this much of each output stream of guest-exec (GUEST_EXEC_MAX_OUTPUT)
QGA_OUTPUT_CAP = 16 * 1024 * 1024
#: The largest stdin guest-exec is given (it travels base64 inside one request)
MAX_STDIN = 8 * 1024 * 1024
#: Bytes per guest-file-read / guest-file-write (bounded further by the transport's request cap)
CHUNK = 1024 * 1024
#: Polling guest-exec-status: first pause, growth factor, longest pause (seconds)
POLL_FIRST, POLL_GROWTH, POLL_MAX = 0.002, 1.5, 0.25
#: Seconds one qemu-ga command may take when the caller gave no timeout
COMMAND_TIMEOUT = 30.0


def fields(obj: Any, what: str) -> Dict[str, Any]:
    if not isinstance(obj, dict):
        raise E.ProtocolError("malformed %s from qemu-ga: not an object" % what)
    return obj


def _int(obj: Dict[str, Any], key: str, what: str, lo: int, hi: int,
         required: bool = True) -> Optional[int]:
    value = obj.get(key)
    if value is None and not required:
        return None
    if type(value) is not int or not lo <= value <= hi:
        raise E.ProtocolError("malformed %s from qemu-ga: %r must be an integer in [%d, %d]"
                              % (what, key, lo, hi))
    return value


def _bool(obj: Dict[str, Any], key: str, what: str, default: Optional[bool] = None) -> bool:
    value = obj.get(key, default)
    if type(value) is not bool:
        raise E.ProtocolError("malformed %s from qemu-ga: %r must be a boolean" % (what, key))
    return value


def b64(obj: Dict[str, Any], key: str, what: str, max_bytes: int) -> bytes:
    """Strictly decode the base64 field ``key`` (absent: b''), at most ``max_bytes`` decoded."""
    value = obj.get(key)
    if value is None:
        return b""
    if not isinstance(value, str):
        raise E.ProtocolError("malformed %s from qemu-ga: %r must be a string" % (what, key))
    if len(value) > (max_bytes + 2) // 3 * 4:
        raise E.ProtocolError("malformed %s from qemu-ga: %r holds more than %d bytes"
                              % (what, key, max_bytes))
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise E.ProtocolError("malformed %s from qemu-ga: %r is not valid base64"
                              % (what, key)) from None
    return data


def _timeout(deadline: Optional[float]) -> float:
    if deadline is None:
        return COMMAND_TIMEOUT
    left = deadline - time.monotonic()
    if left <= 0:
        raise E.RequestTimeout("qemu-ga: out of time")
    return left


# --- exec ------------------------------------------------------------------------------------

@dataclass
class ExecStatus:
    """A validated guest-exec-status reply."""

    exited: bool
    exitcode: Optional[int] = None
    signal: Optional[int] = None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False


def parse_exec_status(obj: Any) -> ExecStatus:
    what = "guest-exec-status reply"
    f = fields(obj, what)
    exited = _bool(f, "exited", what)
    if not exited:
        return ExecStatus(False)
    exitcode = _int(f, "exitcode", what, 0, 255, required=False)
    signal = _int(f, "signal", what, 1, 127, required=False)
    if (exitcode is None) == (signal is None):
        raise E.ProtocolError("malformed %s from qemu-ga: an exited process needs exactly one of "
                              "exitcode and signal" % what)
    return ExecStatus(True, exitcode, signal,
                      b64(f, "out-data", what, QGA_OUTPUT_CAP), b64(f, "err-data", what, QGA_OUTPUT_CAP),
                      _bool(f, "out-truncated", what, False), _bool(f, "err-truncated", what, False))


async def exec_start(t: QgaTransport, argv: Sequence[str], stdin: Optional[bytes] = None,
                     env: Optional[List[str]] = None, capture: bool = True,
                     timeout: Optional[float] = None) -> int:
    """guest-exec ``argv`` (never a shell string) -> the guest pid."""
    if not argv:
        raise ValueError("empty command")
    args: Dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": capture}
    if env is not None:
        args["env"] = list(env)
    if stdin:
        if len(stdin) > MAX_STDIN:
            raise E.TooLarge(codes.TOO_LARGE, "stdin of %d bytes is more than qemu-ga's guest-exec "
                             "takes here (%d bytes)" % (len(stdin), MAX_STDIN))
        args["input-data"] = base64.b64encode(stdin).decode("ascii")
    reply = fields(await t.command("guest-exec", args, timeout or COMMAND_TIMEOUT),
                    "guest-exec reply")
    pid = _int(reply, "pid", "guest-exec reply", 1, 2 ** 31 - 1)
    assert pid is not None
    return pid


async def exec_status(t: QgaTransport, pid: int, timeout: Optional[float] = None) -> ExecStatus:
    reply = await t.command("guest-exec-status", {"pid": pid}, timeout or COMMAND_TIMEOUT)
    return parse_exec_status(reply)


async def exec_wait(t: QgaTransport, pid: int, deadline: Optional[float]) -> Optional[ExecStatus]:
    """Poll guest-exec-status with backoff until the process exited (-> its status) or
    ``deadline`` (monotonic) passed (-> None). The first status with ``exited`` hands the output
    over and qemu-ga forgets the process: a lost reply loses the output."""
    pause = POLL_FIRST
    while True:
        call_timeout = COMMAND_TIMEOUT if deadline is None else max(
            1.0, min(COMMAND_TIMEOUT, deadline - time.monotonic() + 1.0))
        status = await exec_status(t, pid, call_timeout)
        if status.exited:
            return status
        if deadline is not None and time.monotonic() >= deadline:
            return None
        sleep = pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic()))
        await asyncio.sleep(sleep)
        pause = min(POLL_MAX, pause * POLL_GROWTH)


async def run(t: QgaTransport, argv: Sequence[str], stdin: Optional[bytes] = None,
              timeout: Optional[float] = None) -> ExecStatus:
    """Run ``argv`` to completion (a helper command such as mv or sha256sum)."""
    pid = await exec_start(t, argv, stdin, timeout=timeout)
    status = await exec_wait(t, pid, time.monotonic() + (timeout or COMMAND_TIMEOUT))
    if status is None:
        await kill(t, pid)
        raise E.RequestTimeout("qemu-ga: %s did not finish in time" % argv[0])
    return status


async def kill(t: QgaTransport, pid: int) -> None:
    """SIGKILL the guest process ``pid`` (qemu-ga has no command of its own for it: kill(1))."""
    try:
        await exec_start(t, ["kill", "-KILL", str(pid)], capture=False, timeout=10.0)
    except E.GuestlinkError:
        pass


# --- files -------------------------------------------------------------------------------------

async def file_open(t: QgaTransport, path: str, mode: str, timeout: Optional[float] = None) -> int:
    reply = await t.command("guest-file-open", {"path": path, "mode": mode},
                            timeout or COMMAND_TIMEOUT)
    if type(reply) is not int or not 0 <= reply < 2 ** 63:
        raise E.ProtocolError("malformed guest-file-open reply from qemu-ga: not a handle")
    return reply


async def file_close(t: QgaTransport, handle: int, timeout: Optional[float] = None) -> None:
    await t.command("guest-file-close", {"handle": handle}, timeout or COMMAND_TIMEOUT)


def chunk_size(t: QgaTransport) -> int:
    """Raw bytes per guest-file-write that fit the transport's request cap in base64."""
    return max(4096, min(CHUNK, (t.max_request - 256) // 4 * 3))


async def file_write(t: QgaTransport, handle: int, data: bytes,
                     timeout: Optional[float] = None) -> None:
    what = "guest-file-write reply"
    reply = fields(await t.command("guest-file-write", {
        "handle": handle, "buf-b64": base64.b64encode(data).decode("ascii")},
        timeout or COMMAND_TIMEOUT), what)
    count = _int(reply, "count", what, 0, len(data))
    if count != len(data):
        raise E.RemoteIOError(codes.IO_ERROR, "qemu-ga wrote %s of %d bytes" % (count, len(data)))


async def file_read(t: QgaTransport, handle: int, count: int,
                    timeout: Optional[float] = None) -> Tuple[bytes, bool]:
    """Up to ``count`` bytes -> (data, eof)."""
    what = "guest-file-read reply"
    reply = fields(await t.command("guest-file-read", {"handle": handle, "count": count},
                                    timeout or COMMAND_TIMEOUT), what)
    n = _int(reply, "count", what, 0, count)
    data = b64(reply, "buf-b64", what, count)
    if len(data) != n:
        raise E.ProtocolError("malformed %s from qemu-ga: count %s but %d bytes" % (what, n, len(data)))
    return data, _bool(reply, "eof", what)


async def file_size(t: QgaTransport, handle: int, timeout: Optional[float] = None) -> int:
    """Size of an open file: seek to its end, then back to the start."""
    what = "guest-file-seek reply"
    end = fields(await t.command("guest-file-seek", {"handle": handle, "offset": 0,
                                                      "whence": "end"}, timeout or COMMAND_TIMEOUT), what)
    size = _int(end, "position", what, 0, 2 ** 62)
    await t.command("guest-file-seek", {"handle": handle, "offset": 0, "whence": "set"},
                    timeout or COMMAND_TIMEOUT)
    assert size is not None
    return size


# --- facts -------------------------------------------------------------------------------------

def str_field(obj: Dict[str, Any], key: str, what: str, max_len: int = 255) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str) or len(value) > max_len:
        raise E.ProtocolError("malformed %s from qemu-ga: %r must be a string of at most %d "
                              "characters" % (what, key, max_len))
    return value


async def version(t: QgaTransport, timeout: Optional[float] = None) -> Tuple[str, List[str]]:
    """guest-info -> (qemu-ga version, enabled command names)."""
    what = "guest-info reply"
    f = fields(await t.command("guest-info", None, timeout or COMMAND_TIMEOUT), what)
    commands = f.get("supported_commands", [])
    if not isinstance(commands, list) or len(commands) > 1024:
        raise E.ProtocolError("malformed %s from qemu-ga: supported_commands" % what)
    enabled = []
    for item in commands:
        c = fields(item, what)
        if _bool(c, "enabled", what, True):
            enabled.append(str_field(c, "name", what))
    return str_field(f, "version", what), enabled
