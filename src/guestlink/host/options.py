"""The options of a connection and of a command, each in one immutable value (a frozen
:class:`~guestlink.protocol.frames.Value`).

The public API keeps its keyword arguments (``connect(ctl=..., timeout=...)``,
``vm.exec(cmd, stdin=True, ...)``): those entry points build these objects, and everything under
them passes the object instead of repeating the argument list.
"""

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

from ..protocol import ProtocolViolation
from ..protocol import messages as m
from ..protocol.frames import Value
from ..protocol.ops import EXEC_USER_CAPABILITY, ExecRequest, check_env
from .timing import DEFAULT_TIMEOUT, check_timeout

#: Bytes per output stream that run() keeps in memory (and asks the agent to send) by default.
DEFAULT_OUTPUT_LIMIT = 64 * 1024 * 1024
#: Extra time the host allows past an exec's own timeout for the agent's SIGTERM/SIGKILL grace.
EXEC_KILL_GRACE = 2.0
#: Messages a subscription buffers before it drops the oldest.
DEFAULT_QUEUE_SIZE = 1024

PathLike = Union[str, "os.PathLike[str]"]
#: Which agent a connection uses: guestlink's, qemu-guest-agent's (guestlink.host.qga), or
#: guestlink's when it answers, else qemu-ga's.
VIA_GUESTLINK, VIA_QGA, VIA_AUTO = "guestlink", "qga", "auto"
VIAS = (VIA_AUTO, VIA_GUESTLINK, VIA_QGA)
#: A command for the guest: a list (argv) or a str (a shell command line).
Command = Union[str, List[str]]


class ConnectOptions(Value):
    """How to reach one VM's agent; see :func:`guestlink.host.client.connect` for each field.

    Either ``ctl`` (and ``data``) socket paths, or a libvirt ``domain`` (``uri``, ``ctl_name``,
    ``data_name``) whose live XML gives them. ``via`` picks the agent (:data:`VIAS`); ``qga`` is
    the qemu-ga socket of a plain QEMU VM (a domain's qemu-ga is reached through libvirt).
    Invalid combinations and timeouts raise ValueError /
    TypeError on construction, before anything is opened.
    """

    __slots__ = ("ctl", "data", "domain", "uri", "ctl_name", "data_name", "timeout", "reconnect",
                 "max_payload", "queue_size", "queue_timeout", "on_queue", "master", "persist", "via", "qga")
    ctl: Optional[PathLike]
    data: Optional[PathLike]
    domain: Optional[str]
    uri: Optional[str]
    ctl_name: Optional[str]
    data_name: Optional[str]
    timeout: Optional[float]
    reconnect: bool
    max_payload: Optional[int]
    queue_size: int
    queue_timeout: Optional[float]
    on_queue: Optional[Callable[[str], Any]]
    #: The guestlink master (docs/master.md): True use one (start one if none runs), False never,
    #: None use a running one (start one only when ``persist`` > 0 is given).
    master: Optional[bool]
    #: Seconds a master started for this connection stays after its last client (0: never start).
    persist: Optional[float]
    via: str
    qga: Optional[PathLike]

    def __init__(self, ctl: Optional[PathLike] = None, data: Optional[PathLike] = None,
                 domain: Optional[str] = None, uri: Optional[str] = None,
                 ctl_name: Optional[str] = None, data_name: Optional[str] = None,
                 timeout: Optional[float] = DEFAULT_TIMEOUT, reconnect: bool = True,
                 max_payload: Optional[int] = None, queue_size: int = DEFAULT_QUEUE_SIZE,
                 queue_timeout: Optional[float] = None,
                 on_queue: Optional[Callable[[str], Any]] = None, master: Optional[bool] = None,
                 persist: Optional[float] = None, via: str = VIA_AUTO,
                 qga: Optional[PathLike] = None) -> None:
        if via not in VIAS:
            raise ValueError("connect(): via must be one of %s, not %r" % (", ".join(VIAS), via))
        if domain is not None and qga:
            raise ValueError("connect(): a libvirt domain's qemu-ga is reached through libvirt; "
                             "qga= is the socket of a plain QEMU VM")
        if via == VIA_QGA and domain is None and not qga:
            raise ValueError("connect(via=\"qga\") needs a libvirt domain or the qemu-ga socket "
                             "path (qga=...)")
        if domain is not None:
            if ctl or data:
                raise ValueError("connect(): give either domain= or ctl=/data=, not both")
        elif ctl_name or data_name:
            raise ValueError("connect(): ctl_name=/data_name= name a libvirt domain's channels; "
                             "they need domain=")
        elif not ctl and not (qga and via != VIA_GUESTLINK):
            raise ValueError("connect() needs the control socket path (ctl=...)")
        # the validated floats replace the caller's values
        timeout = check_timeout(timeout)
        queue_timeout = check_timeout(queue_timeout, "queue_timeout")
        persist = check_timeout(persist, "persist")
        self._init(ctl, data, domain, uri, ctl_name, data_name, timeout, reconnect, max_payload,
                   queue_size, queue_timeout, on_queue, master, persist, via, qga)


class ExecOptions(Value):
    """How to run one command in the guest; see :meth:`guestlink.host.client.Client.exec`.

    The command gets a login-like environment for ``user`` (default: the agent's own user):
    HOME, USER, LOGNAME, SHELL, PATH and LANG from its passwd entry, then ``env`` on top."""

    __slots__ = ("stdin", "timeout", "env", "env_clear", "cwd", "shell", "output_limit",
                 "call_timeout", "user")
    stdin: bool
    timeout: Optional[float]
    env: Optional[Mapping[str, str]]
    env_clear: bool
    cwd: Optional[PathLike]
    shell: Optional[bool]
    output_limit: Optional[int]
    call_timeout: Optional[float]
    user: Optional[str]

    def __init__(self, stdin: bool = False, timeout: Optional[float] = None,
                 env: Optional[Mapping[str, str]] = None, env_clear: bool = False,
                 cwd: Optional[PathLike] = None, shell: Optional[bool] = None,
                 output_limit: Optional[int] = DEFAULT_OUTPUT_LIMIT,
                 call_timeout: Optional[float] = None, user: Optional[str] = None) -> None:
        self._init(stdin, timeout, env, env_clear, cwd, shell, output_limit, call_timeout, user)


def exec_request(cmd: Command, options: ExecOptions) -> Dict[str, Any]:
    """The ``exec`` REQUEST's arguments for ``cmd`` (ValueError/TypeError before anything is sent)."""
    shell = options.shell
    req: Dict[str, Any] = {}
    if isinstance(cmd, (bytes, bytearray)):
        raise TypeError("cmd must be a str (shell command line) or a list of str (argv)")
    if isinstance(cmd, str):
        if shell is False:
            import shlex  # here and below: an argv as given (the CLI's exec) needs no shlex

            argv = shlex.split(cmd)
            if not argv:
                raise ValueError("empty command")
            req["argv"] = argv
        else:
            req["shell"] = cmd
    else:
        argv = [str(a) if not isinstance(a, str) else a for a in cmd]
        if not argv:
            raise ValueError("empty command")
        if shell:
            import shlex

            req["shell"] = " ".join(shlex.quote(a) for a in argv)
        else:
            req["argv"] = argv
    env = options.env
    if env:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise TypeError("env must map str to str")
        try:
            check_env(dict(env))
        except ProtocolViolation as exc:
            raise ValueError(str(exc)) from None
        req["env"] = dict(env)
    if options.user is not None:
        req["user"] = options.user
    if options.env_clear:
        req["env_clear"] = True
    if options.cwd is not None:
        req["cwd"] = str(options.cwd)
    if options.stdin:
        req["stdin"] = True
    timeout = options.timeout
    if timeout is not None:
        seconds = check_timeout(timeout)
        if seconds is not None and seconds <= 0:
            raise ValueError("timeout must be positive")
        req["timeout"] = timeout
    if options.output_limit is not None:
        req["output_limit"] = int(options.output_limit)
    try:
        ExecRequest.from_wire(req)  # the agent's own checks, before anything is sent
    except ProtocolViolation as exc:
        raise ValueError(str(exc).replace("exec: ", "", 1)) from None
    return req


def check_exec_agent(request: Mapping[str, Any], agent: Any) -> None:
    """Refuse an ``exec`` the connected agent would misread: an agent without the exec.user
    capability predates ``user`` and would ignore it, running the command as itself."""
    if ("user" in request and agent is not None
            and EXEC_USER_CAPABILITY not in agent.capabilities):
        from .errors import UnknownCommand

        raise UnknownCommand("unknown_command", "the guest agent (version %s) cannot run a "
                             "command as another user: update the agent in the guest"
                             % agent.version)


def check_call(op: str, args: Optional[Mapping[str, Any]], kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """A user-defined command's name and merged arguments, checked (ValueError) before sending."""
    if not isinstance(op, str) or not m.OP_RE.match(op):
        raise ValueError("invalid command name %r" % (op,))
    merged = dict(args or {})
    merged.update(kwargs)
    return merged


def check_publish(topic: str, data: Any) -> bytes:
    """A topic message's topic and data (str: UTF-8), checked (ValueError) before sending."""
    try:
        m.check_topic(topic)
    except ProtocolViolation as exc:
        raise ValueError(str(exc)) from None
    if isinstance(data, str):
        data = data.encode("utf-8")
    data = bytes(data)
    if len(data) > m.MAX_MESSAGE_DATA:
        raise ValueError("message of %d bytes exceeds %d" % (len(data), m.MAX_MESSAGE_DATA))
    return data
