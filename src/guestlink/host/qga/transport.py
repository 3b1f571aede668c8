"""The two ways to reach qemu-guest-agent: its raw unix socket (plain QEMU) or libvirt.

Both offer ``await t.command(name, args, timeout) -> the "return" value``, one request at a time,
and turn everything qemu-ga (an untrusted guest program) sends into a value or an error of the
host error tree. qemu-ga replies carry no request id, so a transport that may hold a stale reply
(after a timeout, a broken line, a new connection) resynchronises before the next command.
"""

import asyncio
import errno as errno_
import json
import math
import secrets
import time
from typing import Any, Dict, Optional

from ...protocol import codes
from ...protocol.safetext import printable
from .. import errors as E
from ..timing import wait_within

#: The longest reply line accepted from qemu-ga (bytes). Two 16 MiB output streams in base64 are
#: ~45 MB; libvirt refuses replies over 10 MiB on its own (its QEMU_AGENT_MAX_RESPONSE_LEN).
MAX_REPLY = 48 * 1024 * 1024
#: Bytes of stale output discarded while resynchronising before giving up.
MAX_STALE = MAX_REPLY
#: The longest command line sent to qemu-ga (bytes): its JSON parser takes tokens up to 64 MiB.
MAX_REQUEST_SOCKET = 16 * 1024 * 1024
#: What one argv word may hold (Linux MAX_ARG_STRLEN is 128 KiB): the virsh backend's request cap.
MAX_REQUEST_VIRSH = 120 * 1024
#: libvirt's RPC string limit is larger, but stay well under it.
MAX_REQUEST_LIBVIRT = 4 * 1024 * 1024
#: Seconds a sync may take when the caller gave no timeout.
SYNC_TIMEOUT = 10.0
#: The longest integer literal accepted in a reply (a huge one would take quadratic time).
MAX_INT_DIGITS = 40


class QgaUnavailable(E.ConnectError):
    """qemu-ga cannot be reached: no qemu-ga channel, nothing listening, not configured."""


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise ValueError("integer literal of %d digits" % len(text))
    return int(text)


def _no_constant(name: str) -> Any:
    raise ValueError("%s is not JSON" % name)


def decode_json(data: bytes, what: str) -> Any:
    """Parse one JSON text from qemu-ga (bounded: no huge integers, NaN or deep nesting)."""
    try:
        return json.loads(data.decode("utf-8"), parse_int=_bounded_int, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise E.ProtocolError("malformed %s from qemu-ga: %s" % (what, printable(str(exc)[:200])))


#: qemu-ga error text -> the host error it means (first match wins; the text comes from the guest).
_ERROR_HINTS = (
    ("has been disabled", E.CommandDenied, codes.DENIED),
    ("no such file", E.RemoteNotFound, codes.NOT_FOUND),
    ("permission denied", E.RemotePermissionDenied, codes.PERMISSION_DENIED),
    ("is a directory", E.RemoteIsADirectory, codes.IS_A_DIRECTORY),
    ("not a directory", E.RemoteNotADirectory, codes.NOT_A_DIRECTORY),
    ("no space left", E.RemoteNoSpace, codes.NO_SPACE),
)


def qga_error(name: str, error: Any) -> E.GuestlinkError:
    """The host error for qemu-ga's ``{"error": {"class": ..., "desc": ...}}`` to ``name``."""
    if not isinstance(error, dict):
        return E.ProtocolError("malformed error reply from qemu-ga to %s" % name)
    cls, desc = error.get("class"), error.get("desc")
    if not isinstance(cls, str) or not isinstance(desc, str):
        return E.ProtocolError("malformed error reply from qemu-ga to %s: class and desc must be "
                               "strings" % name)
    cls, desc = cls[:100], desc[:1000]
    message = "qemu-ga: %s: %s" % (name, desc)
    if cls == "CommandNotFound" and "disabled" not in desc:
        return E.UnknownCommand(codes.UNKNOWN_COMMAND, message)
    low = desc.lower()
    for hint, exc_cls, code in _ERROR_HINTS:
        if hint in low:
            return exc_cls(code, message)
    return E.RemoteError("qga:" + cls, message)


def reply_value(obj: Any, name: str) -> Any:
    """The ``return`` value of a parsed reply to ``name``, or raise its error."""
    if not isinstance(obj, dict):
        raise E.ProtocolError("malformed reply from qemu-ga to %s: not a JSON object" % name)
    if "error" in obj:
        raise qga_error(name, obj["error"])
    if "return" not in obj:
        raise E.ProtocolError("malformed reply from qemu-ga to %s: no return or error" % name)
    return obj["return"]


def encode_command(name: str, args: Optional[Dict[str, Any]], limit: int) -> bytes:
    msg: Dict[str, Any] = {"execute": name}
    if args:
        msg["arguments"] = args
    data = json.dumps(msg, separators=(",", ":")).encode("ascii")
    if len(data) > limit:
        raise E.TooLarge(codes.TOO_LARGE, "a %d-byte %s request exceeds what this qemu-ga path "
                         "takes (%d bytes)" % (len(data), name, limit))
    return data


class QgaTransport:
    """Base of the transports: ``command()``, ``close()``, ``describe``, ``max_request``."""

    #: the largest request this path carries (bytes of JSON)
    max_request = MAX_REQUEST_SOCKET
    #: how the path is named in messages ("qemu-ga socket /run/x.sock", "libvirt domain vm1")
    describe = "qemu-ga"

    async def open(self, timeout: Optional[float]) -> None:
        """Connect and make sure qemu-ga answers (QgaUnavailable / AgentNotResponding)."""
        await self.command("guest-ping", None, timeout)

    async def command(self, name: str, args: Optional[Dict[str, Any]] = None,
                      timeout: Optional[float] = None) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class SocketTransport(QgaTransport):
    """qemu-ga on its virtio-serial port's host unix socket (``-chardev socket,...``).

    On every connect, after a timeout and after a broken reply it sends 0xFF (qemu-ga drops its
    partial input) then ``guest-sync-delimited`` with a fresh random id, and discards what comes
    before the 0xFF-marked reply carrying that id (stale replies survive host reconnects)."""

    max_request = MAX_REQUEST_SOCKET

    def __init__(self, path: str) -> None:
        self.path = path
        self.describe = "qemu-ga socket %s" % path
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf known to hold no newline
        self._lock = asyncio.Lock()
        self._synced = False

    async def open(self, timeout: Optional[float]) -> None:
        try:
            self._reader, self._writer = await wait_within(
                asyncio.open_unix_connection(self.path), timeout)
        except asyncio.TimeoutError:
            raise QgaUnavailable("timed out connecting to the qemu-ga socket %s" % self.path,
                                 self.path) from None
        except OSError as exc:
            raise self._connect_error(exc) from None
        async with self._lock:
            try:
                await self._sync(time.monotonic() + (timeout if timeout is not None else SYNC_TIMEOUT))
            except E.RequestTimeout:
                raise E.AgentNotResponding(
                    "qemu-ga did not answer on %s within %g s (is qemu-guest-agent installed and "
                    "running in the guest?)" % (self.path, timeout or SYNC_TIMEOUT)) from None

    def _connect_error(self, exc: OSError) -> E.ConnectError:
        hint = " (does the VM have a qemu-ga channel org.qemu.guest_agent.0 there?)"
        if exc.errno == errno_.ENOENT:
            return QgaUnavailable("no qemu-ga socket %s%s" % (self.path, hint), self.path, exc.errno)
        if exc.errno in (errno_.EACCES, errno_.EPERM):
            return E.PermissionDenied("permission denied opening the qemu-ga socket %s"
                                      % self.path, self.path, exc.errno)
        if exc.errno == errno_.ECONNREFUSED:
            return QgaUnavailable("nothing listens on the qemu-ga socket %s (is the VM running?)"
                                  % self.path, self.path, exc.errno)
        return QgaUnavailable("cannot connect to the qemu-ga socket %s: %s"
                              % (self.path, exc.strerror or exc), self.path, exc.errno)

    async def close(self) -> None:
        w, self._writer = self._writer, None
        if w is not None:
            w.close()
            try:
                await w.wait_closed()
            except (OSError, RuntimeError):
                pass

    async def _send(self, data: bytes) -> None:
        if self._writer is None:
            raise E.RequestNotSent("not connected to %s" % self.describe)
        try:
            self._writer.write(data)
            await self._writer.drain()
        except OSError as exc:
            raise E.ConnectionLost("connection to %s lost: %s" % (self.describe, exc)) from None

    async def _read_line(self, deadline: float) -> bytes:
        """The next line (without its newline), at most MAX_REPLY bytes, before ``deadline``."""
        assert self._reader is not None
        limit = MAX_REPLY
        while True:
            idx = self._buf.find(b"\n", self._scan)
            if idx >= 0:
                line = bytes(self._buf[:idx])
                del self._buf[:idx + 1]
                self._scan = 0
                if len(line) > limit:
                    raise E.ProtocolError("qemu-ga sent a reply of %d bytes (the limit is %d)"
                                          % (len(line), limit))
                return line
            self._scan = len(self._buf)
            if self._scan > limit:
                self._buf.clear()
                self._scan = 0
                raise E.ProtocolError("qemu-ga sent more than %d bytes without ending its reply"
                                      % limit)
            left = deadline - time.monotonic()
            if left <= 0:
                raise E.RequestTimeout("no reply from %s in time" % self.describe)
            try:
                chunk = await wait_within(self._reader.read(1 << 20), left)
            except asyncio.TimeoutError:
                raise E.RequestTimeout("no reply from %s in time" % self.describe) from None
            except OSError as exc:
                raise E.ConnectionLost("connection to %s lost: %s" % (self.describe, exc)) from None
            if not chunk:
                raise E.ConnectionLost("%s closed the connection" % self.describe)
            self._buf += chunk

    async def _sync(self, deadline: float) -> None:
        """0xFF + guest-sync-delimited{fresh id}; skip everything up to its 0xFF-marked reply."""
        self._synced = False
        sync_id = secrets.randbelow(1 << 31) + 1
        await self._send(b"\xff" + encode_command("guest-sync-delimited", {"id": sync_id},
                                                  MAX_REQUEST_SOCKET) + b"\n")
        discarded = 0
        while True:
            try:
                line = await self._read_line(deadline)
            except E.ProtocolError:  # an endless stale line: its bytes count as discarded
                line = b""
                discarded += MAX_REPLY
            discarded += len(line) + 1
            if discarded > MAX_STALE + MAX_REPLY:
                raise E.ProtocolError("qemu-ga on %s sent more than %d stale bytes while "
                                      "resynchronising" % (self.path, MAX_STALE))
            marker = line.rfind(b"\xff")
            if marker < 0:
                continue  # a stale reply, or the parse error qemu-ga reports for the 0xFF itself
            try:
                obj = decode_json(line[marker + 1:], "sync reply")
            except E.ProtocolError:
                continue
            if isinstance(obj, dict) and type(obj.get("return")) is int and obj["return"] == sync_id:
                self._synced = True
                return

    async def command(self, name: str, args: Optional[Dict[str, Any]] = None,
                      timeout: Optional[float] = None) -> Any:
        request = encode_command(name, args, self.max_request) + b"\n"
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        async with self._lock:
            if not self._synced:
                await self._sync(deadline)
            await self._send(request)
            self._synced = False  # until this command's reply has been read whole
            line = await self._read_line(deadline)
            if line.startswith(b"\xff"):  # a sync reply's marker can precede a line
                line = line.lstrip(b"\xff")
            obj = decode_json(line, "reply to %s" % name)
            self._synced = True
        return reply_value(obj, name)


class LibvirtTransport(QgaTransport):
    """qemu-ga of a libvirt domain through libvirt's agent API (``virsh qemu-agent-command`` or
    libvirt-python's ``qemuAgentCommand``); libvirt syncs with the agent itself."""

    def __init__(self, domain: str, uri: Optional[str] = None, backend: Any = None) -> None:
        from ... import libvirt as LV

        self.domain = domain
        self.backend = backend or LV.backend(uri)
        self.describe = "qemu-ga of libvirt domain %s" % domain
        self.max_request = (MAX_REQUEST_VIRSH if self.backend.name == "virsh"
                            else MAX_REQUEST_LIBVIRT)
        self._lock = asyncio.Lock()

    async def open(self, timeout: Optional[float]) -> None:
        from ... import libvirt as LV

        loop = asyncio.get_running_loop()
        dom = LV.parse_domain_xml(await loop.run_in_executor(None, self.backend.dumpxml,
                                                             self.domain))
        if not dom.running:
            raise LV.DomainNotRunning("libvirt domain %s is not running" % self.domain)
        if dom.qga_channel is None:
            raise QgaUnavailable("libvirt domain %s has no qemu-ga channel (%s)"
                                 % (self.domain, LV.QGA_NAME))
        try:
            await self.command("guest-ping", None, timeout)
        except E.RequestTimeout:
            raise E.AgentNotResponding(
                "qemu-ga of libvirt domain %s did not answer (is qemu-guest-agent installed and "
                "running in the guest?)" % self.domain) from None

    async def command(self, name: str, args: Optional[Dict[str, Any]] = None,
                      timeout: Optional[float] = None) -> Any:
        from ... import libvirt as LV

        request = encode_command(name, args, self.max_request).decode("ascii")
        seconds = max(1, math.ceil(timeout)) if timeout is not None else None
        loop = asyncio.get_running_loop()
        async with self._lock:
            try:
                text = await loop.run_in_executor(None, self.backend.agent_command, self.domain,
                                                  request, seconds)
            except LV.GuestAgentNotResponding as exc:
                raise E.RequestTimeout("%s: %s" % (self.describe, exc)) from None
            except LV.GuestAgentNotConfigured as exc:
                raise QgaUnavailable(str(exc)) from None
            except LV.GuestAgentCommandFailed as exc:
                raise qga_error(name, {"class": "GenericError", "desc": exc.desc}) from None
        if len(text) > MAX_REPLY:
            raise E.ProtocolError("qemu-ga sent a reply of %d bytes (the limit is %d)"
                                  % (len(text), MAX_REPLY))
        # libvirt hands back the whole reply object (qemuAgentCommand) or prints it (virsh)
        obj = decode_json(text.encode("utf-8", "surrogateescape"), "reply to %s" % name)
        return reply_value(obj, name)
