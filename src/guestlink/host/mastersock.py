"""The control master's rendezvous, shared by the master and its clients (no asyncio here: the
lean one-shot CLI path imports this and :mod:`.masterclient` only).

* Where: :func:`private_dir` (``$XDG_RUNTIME_DIR/guestlink`` else ``/tmp/guestlink-<uid>``,
  created 0700, checked with lstat to be a directory of ours that nobody else can write; the VM
  lock files live there too), :func:`socket_path` (``master.sock`` in it, or
  ``$GUESTLINK_MASTER_SOCKET``), :func:`lock_path`.
* Whether: :func:`policy` turns ``master=``/``persist=`` (and $GUESTLINK_MASTER,
  $GUESTLINK_PERSIST) into "use a running master" / "start one with this persist time" / "never".
* How: :func:`connect_socket` (lstat: a socket owned by us, never a planted link; then the
  master's SO_PEERCRED must be us or root), :func:`attach` (the "attach to VM X" exchange),
  :func:`start_master` (``guestlink master serve --detach``, which returns once it listens),
  :func:`open_route` (all of it: a socket attached to the VM, or None to go direct).
* The attach exchange is one REQUEST (id 1) on the new connection: ``master.attach`` with the VM
  (``ctl``/``data`` paths, or ``domain``/``uri``/``ctl_name``/``data_name``), ``timeout``,
  ``queue_timeout`` and ``messages`` (whether this client wants the guest's topic messages); the
  master answers RESPONSE ``{"ctl", "data"}`` once it holds a synchronised session to that VM,
  or ERROR ``master_error`` whose details name the exception (:func:`error_from_wire`). From then
  on the connection speaks the agent protocol exactly (docs/protocol.md): SYNC/SYNC_ACK, requests
  with the client's own ids, HELLO when the agent restarted. ``master.status`` and
  ``master.stop`` are the other first requests (``guestlink master status|stop``).
"""

import os
import socket
import stat
import struct
import sys
import time
from typing import Any, Dict, NamedTuple, Optional, Tuple

from ..protocol import ProtocolViolation
from ..protocol import messages as m
from ..protocol.frames import Frame, FrameDecoder, FrameType
from . import errors as E

MASTER_ENV = "GUESTLINK_MASTER"
PERSIST_ENV = "GUESTLINK_PERSIST"
SOCKET_ENV = "GUESTLINK_MASTER_SOCKET"
#: The CLI's persist time when neither --persist nor $GUESTLINK_PERSIST says otherwise.
DEFAULT_PERSIST = 60.0
#: Longest persist time accepted (a day): a master is meant to go away by itself.
MAX_PERSIST = 86400.0
OP_ATTACH = "master.attach"
OP_STATUS = "master.status"
OP_STOP = "master.stop"
FIRST_ID = 1
#: The ERROR code of a failed attach / master request (details["type"] names the exception).
MASTER_ERROR = "master_error"
#: Bytes a master reply to the first request may take (a status listing 200 VMs fits easily).
MAX_FIRST_REPLY = 4 << 20
#: Seconds a client waits for a master it started to listen.
START_TIMEOUT = 5.0
_CREDS = struct.Struct("3i")


# --- where ---------------------------------------------------------------------------------------

def private_dir(group_access: bool = False) -> str:
    """This user's guestlink runtime directory (its lock files and master socket), created 0700
    if missing; refused (ConnectError) unless it is a real directory (lstat: never a link) owned
    by this user that no one else can write. One of ours that others could read is tightened to
    0700 (0710 with ``group_access``: a master's group must reach its socket)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _owned_dir(runtime):  # not one that `sudo` kept from another user
        path = os.path.join(runtime, "guestlink")
    else:
        path = os.path.join("/tmp", "guestlink-%d" % os.getuid())
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise E.ConnectError("cannot create %s: %s" % (path, exc.strerror or exc), path,
                             exc.errno) from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise E.ConnectError("refusing lock directory %s: not a directory owned by this user "
                             "and writable only by it" % path, path)
    want = 0o710 if group_access else 0o700
    if stat.S_IMODE(st.st_mode) & ~want:
        os.chmod(path, want)  # ours (checked above, and only we can replace it)
    return path


def _owned_dir(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def socket_path() -> str:
    """The master's socket: $GUESTLINK_MASTER_SOCKET, else ``master.sock`` in :func:`private_dir`."""
    return os.environ.get(SOCKET_ENV) or os.path.join(private_dir(), "master.sock")


def lock_path(sock: str) -> str:
    """The master's lock file (held for its lifetime: the stale-socket rule)."""
    return sock + ".lock"


# --- whether -------------------------------------------------------------------------------------

class Policy(NamedTuple):
    use: bool        # look for a running master
    start: float     # persist time to start one with; 0: never start one


def parse_duration(text: str) -> float:
    """``60``, ``60s``, ``5m``, ``1h`` -> seconds (ValueError otherwise; at most a day)."""
    t = text.strip().lower()
    scale = 1.0
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if t.endswith(suffix):
            t, scale = t[:-len(suffix)], factor
            break
    try:
        value = float(t) * scale
    except ValueError:
        raise ValueError("not a duration: %r (use e.g. 60, 60s, 5m, 1h)" % text) from None
    if not 0 <= value <= MAX_PERSIST:  # also false for nan
        raise ValueError("persist time must be between 0 and %d s, not %r" % (MAX_PERSIST, text))
    return value


def disabled_by_env() -> bool:
    return os.environ.get(MASTER_ENV, "").strip().lower() in ("0", "no", "false", "off", "never")


def policy(master: Optional[bool], persist: Optional[float]) -> Policy:
    """``master``: True (use one, start one if none runs), False (never), None (use a running
    one; start one only when ``persist`` > 0 is given). ``persist`` None: $GUESTLINK_PERSIST,
    else DEFAULT_PERSIST when starting. $GUESTLINK_MASTER=0 disables it whatever the arguments."""
    if master is False or disabled_by_env():
        return Policy(False, 0.0)
    if persist is None:
        env = os.environ.get(PERSIST_ENV)
        if env:
            try:
                persist = parse_duration(env)
            except ValueError:
                persist = None
        if persist is None and master is True:
            persist = DEFAULT_PERSIST
    return Policy(True, persist or 0.0)


# --- how -----------------------------------------------------------------------------------------

def peer_creds(sock: socket.socket) -> Tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket (SO_PEERCRED)."""
    pid, uid, gid = _CREDS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _CREDS.size))
    return pid, uid, gid


def connect_socket(path: str, timeout: Optional[float] = 5.0) -> socket.socket:
    """A blocking connection to the master at ``path``. ConnectError subclasses when there is no
    master (SocketNotFound / NotListening) or it is not ours (PermissionDenied)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise E.SocketNotFound("no guestlink master at %s" % path, path) from None
    except OSError as exc:
        raise E.ConnectError("cannot reach the guestlink master at %s: %s" % (path, exc.strerror),
                             path, exc.errno) from None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid not in (os.getuid(), 0):
        raise E.PermissionDenied("refusing %s: not a socket of this user" % path, path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise E.NotListening("no guestlink master listens on %s" % path, path,
                                 exc.errno) from None
        except OSError as exc:
            raise E.ConnectError("cannot connect to the guestlink master at %s: %s"
                                 % (path, exc.strerror or exc), path, exc.errno) from None
        _pid, uid, _gid = peer_creds(s)
        if uid not in (os.getuid(), 0):
            raise E.PermissionDenied("the guestlink master at %s runs as uid %d, not as this user"
                                     % (path, uid), path)
    except BaseException:
        s.close()
        raise
    return s


def error_to_wire(exc: BaseException) -> Tuple[str, str, Dict[str, Any]]:
    """(code, message, details) of an ERROR frame that :func:`error_from_wire` turns back into
    ``exc``'s class (a guestlink or libvirt error) with its message, path and errno."""
    details: Dict[str, Any] = {"type": type(exc).__name__, "module": type(exc).__module__}
    for attr in ("path", "errno"):
        value = getattr(exc, attr, None)
        if isinstance(value, (str, int)):
            details[attr] = value
    return MASTER_ERROR, str(exc), details


def error_from_wire(code: str, message: str, details: Dict[str, Any]) -> E.GuestlinkError:
    """The exception a master reported (a GuestlinkError: unknown types become ConnectError)."""
    if code != MASTER_ERROR:
        return E.remote_error(code, message, details)
    name, module = details.get("type"), details.get("module")
    cls: Any = None
    if isinstance(name, str) and module == E.__name__:
        cls = getattr(E, name, None)
    elif isinstance(name, str) and module == "guestlink.libvirt":
        from .. import libvirt

        cls = getattr(libvirt, name, None)
    if not (isinstance(cls, type) and issubclass(cls, E.GuestlinkError)) or issubclass(
            cls, (E.RemoteError, E.ProtocolMismatch)) or cls.__name__.startswith("_"):
        cls = E.ConnectError
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    path, errno = details.get("path"), details.get("errno")
    if issubclass(cls, E.ConnectError):
        exc.path = path if isinstance(path, str) else None
        exc.errno = errno if isinstance(errno, int) else None
    return exc


def first_request(sock: socket.socket, op: str, args: Dict[str, Any],
                  timeout: Optional[float]) -> Dict[str, Any]:
    """Send the connection's first request (attach, status, stop) and return its RESPONSE;
    raises the master's error, ConnectionLost, or AgentNotResponding after ``timeout``."""
    sock.settimeout(timeout)
    sock.sendall(m.encode_request(FIRST_ID, op, args))
    decoder = FrameDecoder()
    received = 0
    while True:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            raise E.AgentNotResponding("the guestlink master did not answer %s within %g s"
                                       % (op, timeout or 0)) from None
        except OSError as exc:
            raise E.ConnectionLost("connection to the guestlink master lost: %s"
                                   % (exc.strerror or exc)) from None
        if not data:
            raise E.ConnectionLost("the guestlink master closed the connection (%s)" % op)
        received += len(data)
        for ev in decoder.feed(data):
            # id 0: the master refused the connection before reading the request (another user)
            if isinstance(ev, Frame) and (ev.id == FIRST_ID
                                          or (ev.id == 0 and ev.type == FrameType.ERROR)):
                return _first_reply(ev)
        if received > MAX_FIRST_REPLY:
            raise E.ProtocolError("the guestlink master's reply to %s is too large" % op)


def _first_reply(frame: Frame) -> Dict[str, Any]:
    try:
        if frame.type == FrameType.RESPONSE:
            return m.parse_response(frame.payload)
        if frame.type == FrameType.ERROR:
            code, message, details = m.parse_error(frame.payload)
            raise error_from_wire(code, message, details)
    except ProtocolViolation as exc:
        raise E.ProtocolError("malformed reply from the guestlink master: %s" % exc) from None
    raise E.ProtocolError("unexpected frame type %d from the guestlink master" % frame.type)


def attach_args(ctl: Optional[str] = None, data: Optional[str] = None, *,
                domain: Optional[str] = None, uri: Optional[str] = None,
                ctl_name: Optional[str] = None, data_name: Optional[str] = None,
                timeout: Optional[float] = None, queue_timeout: Optional[float] = None,
                messages: bool = True) -> Dict[str, Any]:
    """The ``master.attach`` arguments (paths made absolute: the master's cwd is not ours)."""
    vm: Dict[str, Any]
    if domain:
        vm = {"domain": domain, "uri": uri, "ctl_name": ctl_name, "data_name": data_name}
    else:
        vm = {"ctl": os.path.abspath(str(ctl)), "data": os.path.abspath(str(data)) if data else None}
    return {"vm": vm, "timeout": timeout, "queue_timeout": queue_timeout, "messages": messages}


def start_master(persist: float, timeout: float = START_TIMEOUT) -> bool:
    """Start ``guestlink master serve --persist P --detach`` (it returns once the master listens,
    or finds one already running) -> whether it reported success."""
    import subprocess  # only here: most commands find the master running

    cmd = [sys.executable, "-m", "guestlink", "master", "serve", "--persist", "%gs" % persist,
           "--detach"]
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout, close_fds=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def open_route(pol: Policy, attach: Dict[str, Any],
               timeout: Optional[float]) -> Optional[Tuple[socket.socket, Dict[str, Any]]]:
    """A socket to this user's master attached to the VM in ``attach`` and its attach reply, or
    None when there is no master to use (then the caller connects directly, as without one).
    The VM's own errors (no such socket, no agent, no such domain) are raised."""
    if not pol.use:
        return None
    try:
        path = socket_path()
    except E.ConnectError:
        return None
    try:
        sock = connect_socket(path)
    except E.ConnectError:
        if pol.start <= 0 or not start_master(pol.start):
            return None
        try:
            sock = connect_socket(path)
        except E.ConnectError:
            return None
    wait = None if timeout is None else timeout + (attach.get("queue_timeout") or 0) + 5.0
    try:
        reply = first_request(sock, OP_ATTACH, attach, wait)
    except BaseException:
        sock.close()
        raise
    return sock, reply


def request(op: str, args: Dict[str, Any], timeout: Optional[float] = 10.0,
            path: Optional[str] = None) -> Dict[str, Any]:
    """One request to the running master (status, stop) -> its reply; ConnectError if none runs."""
    sock = connect_socket(path or socket_path())
    try:
        return first_request(sock, op, args, timeout)
    finally:
        sock.close()


def wait_gone(path: str, timeout: float) -> bool:
    """Wait until nothing listens at ``path`` any more -> whether that happened in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            connect_socket(path, 0.5).close()
        except E.ConnectError:
            return True
        time.sleep(0.02)
    return False
