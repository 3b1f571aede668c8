"""Each operation's request and reply fields, one definition for both sides (docs/protocol.md,
*Operations*).

Every message is a small immutable :class:`~guestlink.protocol.frames.Value` (as a frozen
dataclass, without importing dataclasses): the sending side builds it and calls ``to_wire()`` (the
JSON object to send), the receiving side calls ``from_wire(obj)``, which validates every field
with :class:`~guestlink.protocol.messages.Fields` (types, lengths, ranges) and raises
ProtocolViolation — nothing else — on anything the peer should not have sent. What a side then
does with valid values (the agent's configured limits, the host's defaults) stays with that side.

========================  ==========================  ===================================
operation                 request                     reply / events
========================  ==========================  ===================================
``ping``                  (no arguments)              :class:`Pong`
``info``                  (no arguments)              :class:`Info`
``exec``                  :class:`ExecRequest`        EVENT :class:`ExecStarted`, STREAMs,
                                                      :class:`ExecResult`
``fs.stat``               ``{"path"}``                :class:`StatEntry`
``fs.list`` entries       —                           :class:`StatEntry` (with ``path``)
``transfer.open``         (protocol/transfer.py)      EVENT :class:`TransferReady`
========================  ==========================  ===================================
"""
from typing import Any, Dict, Optional, Tuple

from .frames import MAX_ID, Value
from .messages import INT64_MAX, INT64_MIN, MAX_LIST, MAX_NAME, MAX_NONCE, Fields, ProtocolViolation

JSON = Dict[str, Any]

#: Longest argument, shell command, environment value or working directory of an exec.
MAX_ARG = 128 * 1024
#: At most this many environment variables in one exec request, and at most this many characters
#: in all their names and values together (below the 256 KiB JSON payload limit).
MAX_ENV = 1024
MAX_ENV_TOTAL = 192 * 1024
#: Longest user name an exec may ask to run as (useradd's limit is 32; this leaves room).
MAX_USER = 64
#: The exec request's fields: an agent refuses any other, so a newer host's field never passes
#: for done by an older agent.
EXEC_FIELDS = frozenset(("argv", "shell", "env", "env_clear", "cwd", "stdin", "timeout",
                         "output_limit", "user"))
#: What an agent that runs commands as the user's login-like environment and knows ``user``
#: adds to its capabilities (the host checks it before sending ``user``).
EXEC_USER_CAPABILITY = "exec.user"
#: Longest exec timeout accepted. A longer one is a mistake or an attack (2**64 s, 1e308 s): it
#: is refused rather than clamped, so the caller learns its number was not taken as meant.
MAX_EXEC_TIMEOUT = 365 * 86400.0
#: Time stamps in nanoseconds: what a 64-bit OS call takes.
MIN_NS, MAX_NS = INT64_MIN, INT64_MAX


def _fields(obj: Any, where: str) -> Fields:
    return obj if isinstance(obj, Fields) else Fields(obj, where)


# --- ping ----------------------------------------------------------------------------------------

class Pong(Value):
    """The ``ping`` reply."""

    __slots__ = ()

    def to_wire(self) -> JSON:
        return {"pong": True}

    @classmethod
    def from_wire(cls, obj: Any) -> "Pong":
        if _fields(obj, "ping reply").bool("pong", default=False) is not True:
            raise ProtocolViolation("ping reply: no \"pong\": true")
        return cls()


# --- info ----------------------------------------------------------------------------------------

class Address(Value):
    __slots__ = ("interface", "family", "address")
    interface: str
    family: str  # "inet" or "inet6"
    address: str

    def __init__(self, interface: str, family: str, address: str) -> None:
        self._init(interface, family, address)

    def to_wire(self) -> JSON:
        return {"interface": self.interface, "family": self.family, "address": self.address}

    @classmethod
    def from_wire(cls, obj: Any) -> "Address":
        a = _fields(obj, "info reply.addresses[]")
        family = a.str("family", max_len=16)
        if family not in ("inet", "inet6"):
            raise ProtocolViolation("info reply: address family must be inet or inet6")
        return cls(a.str("interface", max_len=MAX_NAME), family, a.str("address", max_len=MAX_NAME))


class Info(Value):
    """The ``info`` reply: the guest as the agent sees it."""

    __slots__ = ("hostname", "agent_version", "protocol", "os_release", "kernel", "uptime",
                 "boot_id", "python", "addresses", "capabilities")
    hostname: str
    agent_version: str
    protocol: int
    os_release: Dict[str, str]
    kernel: Dict[str, str]  # release, version, machine
    uptime: Optional[float]
    boot_id: str
    python: str
    addresses: Tuple[Address, ...]
    capabilities: Tuple[str, ...]

    def __init__(self, hostname: str, agent_version: str, protocol: int,
                 os_release: Optional[Dict[str, str]] = None,
                 kernel: Optional[Dict[str, str]] = None, uptime: Optional[float] = None,
                 boot_id: str = "", python: str = "", addresses: Tuple[Address, ...] = (),
                 capabilities: Tuple[str, ...] = ()) -> None:
        self._init(hostname, agent_version, protocol, {} if os_release is None else os_release,
                   {} if kernel is None else kernel, uptime, boot_id, python, addresses,
                   capabilities)

    def to_wire(self) -> JSON:
        return {
            "hostname": self.hostname, "os_release": dict(self.os_release),
            "kernel": {k: self.kernel.get(k, "") for k in ("release", "version", "machine")},
            "uptime": self.uptime, "agent_version": self.agent_version, "protocol": self.protocol,
            "boot_id": self.boot_id, "python": self.python,
            "addresses": [a.to_wire() for a in self.addresses],
            "capabilities": list(self.capabilities),
        }

    @classmethod
    def from_wire(cls, obj: Any) -> "Info":
        f = _fields(obj, "info reply")
        kernel = f.object("kernel")
        raw = f.obj.get("addresses") or []
        if not isinstance(raw, list) or len(raw) > MAX_LIST:
            raise ProtocolViolation("info reply: field 'addresses' must be a list")
        return cls(
            hostname=f.str("hostname", max_len=MAX_NAME),
            os_release=f.str_map("os_release", default={}),
            kernel={"release": kernel.str("release", default=""),
                    "version": kernel.str("version", default=""),
                    "machine": kernel.str("machine", default="")},
            uptime=f.number("uptime", default=None, min=0),
            agent_version=f.str("agent_version", max_len=MAX_NAME),
            protocol=f.int("protocol", min=0, max=0xFFFF),
            boot_id=f.str("boot_id", default="", max_len=MAX_NAME),
            python=f.str("python", default="", max_len=MAX_NAME),
            addresses=tuple(Address.from_wire(item) for item in raw),
            capabilities=tuple(f.str_list("capabilities", default=[], max_items=256,
                                          max_len=MAX_NAME)),
        )


# --- exec ----------------------------------------------------------------------------------------

class ExecRequest(Value):
    """The ``exec`` request: exactly one of ``argv`` (non-empty) and ``shell``. Fields left None
    take the agent's defaults (cwd "/", its configured output limit, no timeout, the agent's own
    user). The process gets a login-like environment for the user it runs as (HOME, USER,
    LOGNAME, SHELL, PATH, LANG), then ``env`` on top; ``env_clear`` starts from nothing instead.
    Unknown fields are refused (:data:`EXEC_FIELDS`)."""

    __slots__ = ("argv", "shell", "env", "env_clear", "cwd", "stdin", "timeout", "output_limit",
                 "user")
    argv: Optional[Tuple[str, ...]]
    shell: Optional[str]
    env: Dict[str, str]
    env_clear: bool
    cwd: Optional[str]
    stdin: bool
    timeout: Optional[float]
    output_limit: Optional[int]
    user: Optional[str]

    def __init__(self, argv: Optional[Tuple[str, ...]] = None, shell: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, env_clear: bool = False,
                 cwd: Optional[str] = None, stdin: bool = False, timeout: Optional[float] = None,
                 output_limit: Optional[int] = None, user: Optional[str] = None) -> None:
        self._init(argv, shell, {} if env is None else env, env_clear, cwd, stdin, timeout,
                   output_limit, user)

    def to_wire(self) -> JSON:
        req: JSON = {}
        if self.argv is not None:
            req["argv"] = list(self.argv)
        if self.shell is not None:
            req["shell"] = self.shell
        if self.env:
            req["env"] = dict(self.env)
        if self.env_clear:
            req["env_clear"] = True
        if self.cwd is not None:
            req["cwd"] = self.cwd
        if self.stdin:
            req["stdin"] = True
        if self.timeout is not None:
            req["timeout"] = self.timeout
        if self.output_limit is not None:
            req["output_limit"] = self.output_limit
        if self.user is not None:
            req["user"] = self.user
        return req

    @classmethod
    def from_wire(cls, obj: Any) -> "ExecRequest":
        args = _fields(obj, "exec")
        unknown = sorted(set(args.obj) - EXEC_FIELDS)
        if unknown:
            raise ProtocolViolation("exec: unknown field %r (this agent does not support it)"
                                    % unknown[0][:MAX_NAME])
        argv = args.str_list("argv", default=None, max_len=MAX_ARG)
        shell = args.str("shell", default=None, max_len=MAX_ARG)
        if (argv is None) == (shell is None):
            raise ProtocolViolation("exec: exactly one of 'argv' and 'shell' is required")
        if argv is not None and not argv:
            raise ProtocolViolation("exec: 'argv' must not be empty")
        if any("\0" in a for a in (argv if argv is not None else [shell])):
            raise ProtocolViolation("exec: arguments must not contain NUL characters")
        env = args.str_map("env", default={}, max_items=MAX_ENV, max_len=MAX_ARG)
        check_env(env)
        user = args.str("user", default=None, max_len=MAX_USER)
        if user is not None and (not user or not all(c.isalnum() or c in "._-" for c in user)
                                 or user.startswith("-") or not user.isascii()):
            raise ProtocolViolation("exec: invalid user name %r" % user)
        cwd = args.str("cwd", default=None, max_len=MAX_ARG)
        if cwd is not None and (not cwd or "\0" in cwd):
            raise ProtocolViolation("exec: 'cwd' must be a non-empty path without NUL characters")
        return cls(
            argv=tuple(argv) if argv is not None else None, shell=shell, env=env,
            env_clear=args.bool("env_clear", default=False),
            cwd=cwd,
            stdin=args.bool("stdin", default=False),
            timeout=args.number("timeout", default=None, min=0, max=MAX_EXEC_TIMEOUT),
            output_limit=args.int("output_limit", default=None, min=0),
            user=user,
        )


def check_env(env: Dict[str, str]) -> None:
    """An exec's environment, checked the same on both sides: names non-empty without ``=`` or
    NUL, values without NUL, at most MAX_ENV variables and MAX_ENV_TOTAL characters in all."""
    if len(env) > MAX_ENV:
        raise ProtocolViolation("exec: more than %d environment variables" % MAX_ENV)
    total = 0
    for k, v in env.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ProtocolViolation("exec: environment names and values must be strings")
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise ProtocolViolation("exec: invalid environment variable name or value %r"
                                    % k[:MAX_NAME])
        total += len(k) + len(v) + 2
    if total > MAX_ENV_TOTAL:
        raise ProtocolViolation("exec: the environment is larger than %d characters"
                                % MAX_ENV_TOTAL)


class ExecStarted(Value):
    """The exec's EVENT once its process runs."""

    __slots__ = ("pid",)
    pid: int

    def __init__(self, pid: int) -> None:
        self._init(pid)

    def to_wire(self) -> JSON:
        return {"event": "started", "pid": self.pid}

    @classmethod
    def from_wire(cls, obj: Any) -> "ExecStarted":
        return cls(_fields(obj, "exec event").int("pid", min=0, max=MAX_ID))


def event_name(obj: Any, where: str = "event") -> str:
    """The ``event`` field every EVENT payload carries (which class reads the rest)."""
    name: str = _fields(obj, where).str("event", max_len=MAX_NAME)
    return name


class ExecResult(Value):
    """The exec's final reply. ``signal``: the signal that ended the process, if one did."""

    __slots__ = ("returncode", "signal", "timed_out", "stdout_truncated", "stderr_truncated",
                 "duration")
    returncode: int
    signal: Optional[int]
    timed_out: bool
    stdout_truncated: bool
    stderr_truncated: bool
    duration: float

    def __init__(self, returncode: int, signal: Optional[int] = None, timed_out: bool = False,
                 stdout_truncated: bool = False, stderr_truncated: bool = False,
                 duration: float = 0.0) -> None:
        self._init(returncode, signal, timed_out, stdout_truncated, stderr_truncated, duration)

    def to_wire(self) -> JSON:
        return {"returncode": self.returncode, "signal": self.signal, "timed_out": self.timed_out,
                "stdout_truncated": self.stdout_truncated,
                "stderr_truncated": self.stderr_truncated, "duration": self.duration}

    @classmethod
    def from_wire(cls, obj: Any) -> "ExecResult":
        f = _fields(obj, "exec reply")
        return cls(
            returncode=f.int("returncode", min=-255, max=255),
            signal=f.int("signal", default=None, min=1, max=255),
            timed_out=f.bool("timed_out", default=False),
            stdout_truncated=f.bool("stdout_truncated", default=False),
            stderr_truncated=f.bool("stderr_truncated", default=False),
            duration=float(f.number("duration", default=0.0, min=0)),
        )


# --- files ---------------------------------------------------------------------------------------

class StatEntry(Value):
    """A file's description: the ``fs.stat`` reply, and each ``fs.list`` entry (with ``path``).

    ``type`` is "file", "dir", "symlink" or "other"; ``target`` a symlink's target."""

    __slots__ = ("type", "size", "mode", "mtime_ns", "uid", "gid", "target", "path")
    type: str
    size: Optional[int]
    mode: Optional[int]  # permission bits only (S_IMODE)
    mtime_ns: Optional[int]
    uid: Optional[int]
    gid: Optional[int]
    target: Optional[str]
    path: Optional[str]

    def __init__(self, type: str, size: Optional[int] = None, mode: Optional[int] = None,
                 mtime_ns: Optional[int] = None, uid: Optional[int] = None,
                 gid: Optional[int] = None, target: Optional[str] = None,
                 path: Optional[str] = None) -> None:
        self._init(type, size, mode, mtime_ns, uid, gid, target, path)

    def to_wire(self) -> JSON:
        out: JSON = {"type": self.type, "size": self.size, "mode": self.mode,
                     "mtime_ns": self.mtime_ns, "uid": self.uid, "gid": self.gid}
        if self.target is not None:
            out["target"] = self.target
        if self.path is not None:
            out["path"] = self.path
        return out

    @classmethod
    def from_wire(cls, obj: Any, where: str = "fs.stat reply") -> "StatEntry":
        f = _fields(obj, where)
        return cls(
            type=f.str("type", max_len=16),
            size=f.int("size", default=None, min=0, max=MAX_NS),
            mode=f.int("mode", default=None, min=0, max=0o7777),
            mtime_ns=f.int("mtime_ns", default=None, min=MIN_NS, max=MAX_NS),
            uid=f.int("uid", default=None, min=0, max=MAX_ID),
            gid=f.int("gid", default=None, min=0, max=MAX_ID),
            target=f.str("target", default=None),
            path=f.str("path", default=None),
        )


class TransferReady(Value):
    """``transfer.open``'s EVENT once the agent is ready on the data port: the transfer's id and
    nonce for the data channel's greeting, where it resumes (``offset``), and the source's
    attributes for a pull. ``offsets`` (a batch: one per file) is checked by the transfer code."""

    __slots__ = ("nonce", "offset", "transfer", "size", "mode", "mtime_ns", "uid", "gid", "path",
                 "offsets")
    nonce: str
    offset: int
    transfer: Optional[int]
    size: Optional[int]
    mode: Optional[int]
    mtime_ns: Optional[int]
    uid: Optional[int]
    gid: Optional[int]
    path: str
    offsets: Any  # as received: its caller checks it

    def __init__(self, nonce: str, offset: int, transfer: Optional[int] = None,
                 size: Optional[int] = None, mode: Optional[int] = None,
                 mtime_ns: Optional[int] = None, uid: Optional[int] = None,
                 gid: Optional[int] = None, path: str = "", offsets: Any = None) -> None:
        self._init(nonce, offset, transfer, size, mode, mtime_ns, uid, gid, path, offsets)

    def to_wire(self) -> JSON:
        out: JSON = {"event": "ready", "nonce": self.nonce, "offset": self.offset}
        for key in ("transfer", "size", "mode", "mtime_ns", "uid", "gid", "offsets"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.path:
            out["path"] = self.path
        return out

    @classmethod
    def from_wire(cls, obj: Any) -> "TransferReady":
        f = _fields(obj, "ready event")
        return cls(
            nonce=f.str("nonce", max_len=MAX_NONCE),
            offset=f.int("offset", min=0),
            transfer=f.int("transfer", default=None, min=0, max=MAX_ID),
            size=f.int("size", default=None, min=0),
            mode=f.int("mode", default=None, min=0, max=0o7777),
            mtime_ns=f.int("mtime_ns", default=None, min=MIN_NS, max=MAX_NS),
            uid=f.int("uid", default=None, min=0, max=MAX_ID),
            gid=f.int("gid", default=None, min=0, max=MAX_ID),
            path=f.str("path", default=""),
            offsets=f.obj.get("offsets"),
        )
