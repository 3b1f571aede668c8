"""Every exception the guestlink host library raises, in one tree.

This docstring is the single reference for error handling; the README renders it.

::

    GuestlinkError                     base of everything below
    ├── ConnectError                   could not open the VM's control socket (.path, .errno)
    │   ├── SocketNotFound             the socket file does not exist (VM not running? wrong path?)
    │   ├── NotListening               the file exists but nobody accepts on it (ECONNREFUSED)
    │   ├── PermissionDenied           no permission to open the socket
    │   └── VMInUse                    another guestlink client held the VM for longer than
    │                                  connect(queue_timeout=...) (see guestlink.host.vmlock)
    ├── AgentNotResponding  (T)        the socket is open but no agent completed the handshake in time
    ├── ProtocolError                  the agent sent something that breaks the protocol: a malformed
    │   │                              reply payload, a corrupted frame for a pending request, ...
    │   └── ProtocolMismatch           the peers speak incompatible protocol versions
    │                                  (also the ``protocol_mismatch`` error code)
    ├── ConnectionLost                 the connection broke (or the agent restarted) after the request
    │                                  was sent: its OUTCOME IS UNKNOWN (it may or may not have run)
    ├── RequestNotSent                 the request never left the host (not connected in time,
    │                                  connection lost before sending): SAFE TO RETRY
    ├── RequestTimeout      (T)        the request was sent but no reply came within its timeout
    │                                  (outcome unknown)
    ├── RemoteError                    the agent answered with an ERROR (.code, .message, .details);
    │   │                              one subclass per protocol error code, see REMOTE_ERRORS;
    │   │                              a code this version does not know is a plain RemoteError
    │   ├── BadRequest                 bad_request
    │   ├── UnknownCommand             unknown_command
    │   ├── CommandDenied              denied (the agent's policy refused it)
    │   ├── RemoteNotFound             not_found
    │   ├── RemotePermissionDenied     permission_denied (the guest OS refused access)
    │   ├── RemoteExists               exists
    │   ├── RemoteIsADirectory         is_a_directory
    │   ├── RemoteNotADirectory        not_a_directory
    │   ├── RemoteNoSpace              no_space
    │   ├── RemoteIOError              io_error
    │   ├── RemoteTimeout   (T)        timeout (an agent-side deadline)
    │   ├── Cancelled                  cancelled
    │   ├── Busy                       busy
    │   ├── TooLarge                   too_large
    │   ├── NotReady                   not_ready (the agent lost our session; the request did not
    │   │                              run; the client re-synchronises by itself)
    │   ├── ChecksumMismatch           checksum_mismatch
    │   ├── RemoteChanged              changed
    │   ├── HandlerError               handler_error (a user handler raised)
    │   └── InternalError              internal (a bug in the agent)
    ├── CommandFailed                  run(check=True): the command exited non-zero or was killed
    │                                  by a signal (.result is the CompletedProcess)
    └── CommandTimedOut     (T)        run(timeout=...): the command ran past its timeout and was
                                       killed (.result has the partial output)

(T): also a builtin ``TimeoutError``, so ``except TimeoutError`` catches every guestlink timeout
(and, as TimeoutError is an OSError, so does ``except OSError``: catch GuestlinkError first where
the two must differ).

Outside the tree, and only these: arguments the library refuses before anything is sent raise
ValueError or TypeError (e.g. a timeout that is negative, NaN, infinite or over MAX_TIMEOUT, ~24
days); ``Subscription.get(timeout=...)`` raises asyncio.TimeoutError, and EOFError once closed;
push and pull raise OSError for local files (e.g. ENOSPC when the guest announces more than the
host's free space). Whatever the agent sends, nothing else comes out (tests/unit/test_host_fuzz.py).

Retry guidance: RequestNotSent and NotReady are always safe to retry. ConnectionLost and
RequestTimeout mean the outcome is unknown; retry only operations without side effects (ping,
info, reading). ``protocol_mismatch`` received as a reply raises ProtocolMismatch, which is both a
ProtocolError and carries ``.code``.
"""

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Type, TypeVar, Union

from ..protocol import codes

if TYPE_CHECKING:  # pragma: no cover
    from .execs import CompletedProcess

_E = TypeVar("_E", bound=BaseException)


class GuestlinkError(Exception):
    """Base class of every guestlink host-side error."""


# --- connecting -----------------------------------------------------------------------------

class ConnectError(GuestlinkError):
    """The control socket could not be opened."""

    def __init__(self, message: str, path: Optional[str] = None,
                 errno: Optional[int] = None) -> None:
        GuestlinkError.__init__(self, message)
        self.path = path
        self.errno = errno


class SocketNotFound(ConnectError):
    """The socket file does not exist."""


class NotListening(ConnectError):
    """The socket file exists but nothing accepts connections on it (ECONNREFUSED)."""


class PermissionDenied(ConnectError):
    """The host refused access to the socket file."""


class VMInUse(ConnectError):
    """Another guestlink client is connected to this VM (one client per VM at a time) and did
    not finish within the queue timeout."""


class AgentNotResponding(GuestlinkError, TimeoutError):
    """The socket accepted the connection but no agent completed the handshake in time."""


# --- protocol ---------------------------------------------------------------------------------

class ProtocolError(GuestlinkError):
    """The agent broke the protocol (malformed payload, corrupted frame, unexpected reply)."""


class ProtocolMismatch(ProtocolError):
    """The agent speaks a protocol version this host library does not."""

    code = codes.PROTOCOL_MISMATCH

    def __init__(self, message: str, details: Optional[Dict[str, Any]] = None) -> None:
        ProtocolError.__init__(self, message)
        self.message = message
        self.details = details or {}


# --- connection and request fate ----------------------------------------------------------------

class ConnectionLost(GuestlinkError):
    """The connection broke after the request was sent: its outcome is unknown."""


class RequestNotSent(GuestlinkError):
    """The request never left the host; it is safe to retry."""


class RequestTimeout(GuestlinkError, TimeoutError):
    """The request was sent but no reply arrived within its timeout; its outcome is unknown."""


# --- errors reported by the agent -------------------------------------------------------------

class RemoteError(GuestlinkError):
    """The agent answered the request with an ERROR frame."""

    code: Optional[str] = None

    def __init__(self, code: str, message: str, details: Optional[Dict[str, Any]] = None) -> None:
        GuestlinkError.__init__(self, "%s (%s)" % (message, code) if message else
                                code or "the agent reported an error without a code or message")
        self.code = code
        self.message = message
        self.details = details or {}


class BadRequest(RemoteError):
    pass


class UnknownCommand(RemoteError):
    pass


class CommandDenied(RemoteError):
    """The agent's policy refused this command or path."""


class RemoteNotFound(RemoteError):
    pass


class RemotePermissionDenied(RemoteError):
    pass


class RemoteExists(RemoteError):
    pass


class RemoteIsADirectory(RemoteError):
    pass


class RemoteNotADirectory(RemoteError):
    pass


class RemoteNoSpace(RemoteError):
    pass


class RemoteIOError(RemoteError):
    pass


class RemoteTimeout(RemoteError, TimeoutError):
    pass


class Cancelled(RemoteError):
    pass


class Busy(RemoteError):
    pass


class TooLarge(RemoteError):
    pass


class NotReady(RemoteError):
    pass


class ChecksumMismatch(RemoteError):
    pass


class RemoteChanged(RemoteError):
    pass


class HandlerError(RemoteError):
    pass


class InternalError(RemoteError):
    pass


#: protocol error code -> exception class. Every code of ``guestlink.protocol.codes`` is mapped
#: (a unit test checks it); ``protocol_mismatch`` maps to ProtocolMismatch.
REMOTE_ERRORS: Dict[str, "Type[Union[RemoteError, ProtocolMismatch]]"] = {
    codes.BAD_REQUEST: BadRequest,
    codes.UNKNOWN_COMMAND: UnknownCommand,
    codes.DENIED: CommandDenied,
    codes.NOT_FOUND: RemoteNotFound,
    codes.PERMISSION_DENIED: RemotePermissionDenied,
    codes.EXISTS: RemoteExists,
    codes.IS_A_DIRECTORY: RemoteIsADirectory,
    codes.NOT_A_DIRECTORY: RemoteNotADirectory,
    codes.NO_SPACE: RemoteNoSpace,
    codes.IO_ERROR: RemoteIOError,
    codes.TIMEOUT: RemoteTimeout,
    codes.CANCELLED: Cancelled,
    codes.BUSY: Busy,
    codes.TOO_LARGE: TooLarge,
    codes.NOT_READY: NotReady,
    codes.PROTOCOL_MISMATCH: ProtocolMismatch,
    codes.CHECKSUM_MISMATCH: ChecksumMismatch,
    codes.CHANGED: RemoteChanged,
    codes.HANDLER_ERROR: HandlerError,
    codes.INTERNAL: InternalError,
}

for _code, _cls in REMOTE_ERRORS.items():
    if issubclass(_cls, RemoteError):  # ProtocolMismatch has its code already
        _cls.code = _code
del _code, _cls


def malformed(what: str, exc: object) -> "ProtocolError":
    """The ProtocolError for a malformed ``what`` from the agent (one wording for all)."""
    return ProtocolError("malformed %s from the agent: %s" % (what, exc))


def copy_error(exc: _E) -> _E:
    """A fresh exception of the same type and message (each failed call gets its own)."""
    try:
        new = type(exc).__new__(type(exc))
        new.__dict__.update(exc.__dict__)
        new.args = exc.args
        return new
    except Exception:  # pragma: no cover
        return exc


def remote_error(code: str, message: str,
                 details: Optional[Dict[str, Any]] = None) -> Union[RemoteError, ProtocolMismatch]:
    """Build the exception for an ERROR reply (code from the wire, already validated as a string)."""
    if code == codes.PROTOCOL_MISMATCH:
        return ProtocolMismatch("protocol mismatch: %s" % (message or "incompatible agent"), details)
    cls = REMOTE_ERRORS.get(code, RemoteError)
    assert issubclass(cls, RemoteError)
    return cls(code, message, details)


# --- command outcome ------------------------------------------------------------------------

class _CommandOutcome(GuestlinkError):
    """Base of the errors that carry the command's CompletedProcess as ``.result``."""

    result: "CompletedProcess"

    @property
    def stdout(self) -> bytes:
        return self.result.stdout

    @property
    def stderr(self) -> bytes:
        return self.result.stderr


class CommandFailed(_CommandOutcome):
    """``run(check=True)``: the command exited with a non-zero status or was killed by a signal."""

    def __init__(self, result: "CompletedProcess") -> None:
        self.result = result
        if result.signal:
            what = "was killed by signal %d" % result.signal
        else:
            what = "exited with status %d" % result.returncode
        GuestlinkError.__init__(self, "command %s %s" % (_describe(result.args), what))

    @property
    def returncode(self) -> int:
        return self.result.returncode


class CommandTimedOut(_CommandOutcome, TimeoutError):
    """``run(timeout=...)``: the command was killed at its timeout; ``.result`` has partial output."""

    def __init__(self, result: "CompletedProcess", timeout: Optional[float] = None) -> None:
        self.result = result
        self.timeout = timeout
        GuestlinkError.__init__(self, "command %s timed out%s" % (
            _describe(result.args), " after %g s" % timeout if timeout is not None else ""))


def _describe(args: Union[str, List[Any]]) -> str:
    text = args if isinstance(args, str) else " ".join(str(a) for a in args)
    if len(text) > 80:
        text = text[:77] + "..."
    return repr(text)


__all__ = [name for name, value in list(globals().items())
           if isinstance(value, type) and issubclass(value, GuestlinkError)
           and not name.startswith("_")] + [
    "REMOTE_ERRORS", "remote_error", "malformed", "copy_error"]


def qga_may_help(exc: BaseException) -> bool:
    """Whether ``connect(via="auto")`` tries qemu-ga after guestlink's agent failed with ``exc``:
    its channels are missing or nobody answers on them (not: no permission, VM busy, domain not
    running)."""
    from ..libvirt import LibvirtError, NoChannels

    if isinstance(exc, (SocketNotFound, NotListening, NoChannels, AgentNotResponding)):
        return True
    return isinstance(exc, ConnectError) and not isinstance(
        exc, (PermissionDenied, VMInUse, LibvirtError))
