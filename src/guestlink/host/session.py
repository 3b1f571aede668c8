"""The session under the host client: one connection to one VM's agent, and the requests on it.

The verbs (:mod:`.client`, :mod:`.execs`, :mod:`.transfer`) use a :class:`Session` only through
this named API; nothing outside this module touches its underscored names:

* :meth:`Session.open` / :meth:`Session.close` -- connect (socket, VM lock, handshake) and close.
* :attr:`~Session.runstate`, :attr:`~Session.agent`, :attr:`~Session.last_error`,
  :attr:`~Session.stats`, and the settings :attr:`~Session.ctl`, :attr:`~Session.data`,
  :attr:`~Session.timeout`, :attr:`~Session.reconnect`, :attr:`~Session.queue_timeout`.
* :meth:`Session.deadline` (a call's ``timeout`` -> an absolute loop time, the session's
  default when None) and :meth:`Session.remaining` (that deadline -> seconds left).
* A request in flight is a :class:`Call`. :meth:`Session.request` sends one REQUEST and returns
  its validated RESPONSE; :meth:`Session.idempotent_request` also retries once when the session
  is lost under it (only for operations without side effects).
* For calls with events and streams (exec, transfers): :meth:`Session.send_call` hands a call's
  first frame to the socket once a synchronised connection exists; :meth:`Session.start_call`
  does that for a REQUEST and waits for its first event; :meth:`Session.send_frames` sends
  follow-up frames (stdin, CANCEL) on the call's own connection; :meth:`Session.await_reply`
  waits for the final reply; :meth:`Session.forget` drops a call (sending CANCEL if asked);
  :meth:`Session.fail_call` fails a pending call by id.
* What is not a reply goes to the owner through two callbacks given to the constructor:
  ``on_message(topic, data)`` for the guest's topic messages (validated), ``on_gone(error)``
  when the connection is gone for good (``error``: why, or None after :meth:`Session.close`).

Design (see docs/protocol.md for the wire contract):

* A run state (:class:`Runstate`, as in qemu.qmp): IDLE -> CONNECTING -> RUNNING, then
  RECONNECTING while the socket is re-opened or the agent re-synchronised, DISCONNECTED when the
  connection is gone for good (``reconnect=False``), CLOSED after :meth:`Session.close`.
* The session rules (handshake with a fresh nonce, SYNC resent every second and on HELLO, agent
  restart and ``not_ready``, request ids) are the sans-I/O state machine
  :class:`guestlink.protocol.session.HostSession`, one per socket; this module does its I/O and
  turns its events into outcomes of calls (its docstring lists what each event means here).
* One reader task per socket feeds the machine and dispatches its events; writes go through one
  lock (write + drain) so frames never interleave and drains are ordered.
* Pending requests are keyed by the id the machine allocated. When the connection goes away (or
  the agent restarted), every request that was handed to the socket fails with ConnectionLost
  (outcome unknown); a request that had not been written yet waits for the reconnection (with
  ``reconnect=True``) or fails with RequestNotSent (safe to retry).
* Everything received is untrusted: each field used from a reply is validated and a malformed
  reply fails that request with ProtocolError.
"""

import asyncio
import collections
import enum
import errno as _errno
import logging
import random
import socket
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..protocol import ProtocolViolation
from ..protocol import messages as m
from ..protocol import session as rules
from ..protocol.frames import MAX_PAYLOAD
from ..protocol.safetext import printable
from . import errors as E
from . import mastersock
from .agentinfo import AgentInfo
from .options import ConnectOptions
from .timing import check_timeout, consume, wait_within
from .vmlock import VMLock

log = logging.getLogger("guestlink.host")

#: SYNC is resent this often until the agent answers.
SYNC_INTERVAL = 1.0
#: Seconds an incomplete frame may stall before it is taken as cut off (docs/protocol.md).
PARTIAL_FRAME_STALL = 2.0
#: Reconnection backoff: first delay, factor, ceiling (seconds).
BACKOFF_FIRST, BACKOFF_FACTOR, BACKOFF_MAX = 0.1, 2.0, 5.0

#: () -> (ctl, data): the socket paths, looked up afresh before every (re)connection.
Resolver = Callable[[], Tuple[Optional[str], Optional[str]]]
Payload = Union[bytes, bytearray, memoryview]


class Runstate(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    RUNNING = "running"
    RECONNECTING = "reconnecting"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


class Call:
    """One request in flight: its id (set when sent), its outcome (``future``: the final reply's
    payload, or the exception), and the callbacks for its EVENT and STREAM frames."""

    __slots__ = ("id", "op", "future", "sent", "conn", "on_event", "on_stream")

    def __init__(self, op: str, on_event: Optional[Callable[[Payload], None]] = None,
                 on_stream: Optional[Callable[[int, Payload], None]] = None) -> None:
        self.id = 0
        self.op = op
        self.future: "asyncio.Future[Any]" = asyncio.get_running_loop().create_future()
        self.sent = False
        self.conn: Optional[_Conn] = None
        self.on_event = on_event
        self.on_stream = on_stream

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
            # A failure nobody awaits (e.g. a cancelled exec) must not be logged as unretrieved.
            self.future.exception()

    def resolve(self, payload: Payload) -> None:
        if not self.future.done():
            self.future.set_result(payload)


class _Conn:
    """One open control socket and its session machine."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 machine: rules.HostSession) -> None:
        self.reader = reader
        self.writer = writer
        self.machine = machine
        self.closed = False
        self.sync_task: Optional["asyncio.Task[None]"] = None
        # -> AgentInfo, replaced on every (re)handshake
        self.handshake: "asyncio.Future[AgentInfo]" = asyncio.get_running_loop().create_future()
        self.tasks: List["asyncio.Task[Any]"] = []

    @property
    def synced(self) -> bool:
        return not self.closed and self.machine.synchronised

    def write(self, data: bytes) -> bool:
        if self.closed or self.writer.is_closing():
            return False
        self.writer.write(data)
        return True


class Session:
    """The connection to one agent and the requests on it; see the module docstring."""

    def __init__(self, options: ConnectOptions, resolver: Optional[Resolver] = None, *,
                 on_message: Callable[[str, bytes], None],
                 on_gone: Callable[[Optional[BaseException]], None],
                 on_lost: Optional[Callable[[bool], None]] = None) -> None:
        self._resolver = resolver
        self._options = options
        self._on_lost = on_lost
        #: The guestlink master's policy for this session, and the attached socket it gave.
        self._policy = mastersock.policy(options.master, options.persist)
        self.via_master = False
        self._master_sock: Optional[socket.socket] = None
        self.ctl: Optional[str] = str(options.ctl) if options.ctl else None
        self.data: Optional[str] = str(options.data) if options.data else None
        self.timeout = options.timeout
        self.reconnect = options.reconnect
        self.queue_timeout = options.queue_timeout
        self._max_payload = options.max_payload
        self._on_queue = options.on_queue
        self._on_message = on_message
        self._on_gone = on_gone
        self._vmlock: Optional[VMLock] = None
        self._state = Runstate.IDLE
        self._conn: Optional[_Conn] = None
        self._agent: Optional[AgentInfo] = None
        self._pending: Dict[int, Call] = {}
        self._wlock: Optional[asyncio.Lock] = None
        self._changed: Optional["asyncio.Future[None]"] = None
        self._supervisor: Optional["asyncio.Task[None]"] = None
        self._last_error: Optional[BaseException] = None
        self._closed_stats: "collections.Counter[str]" = collections.Counter()

    @property
    def runstate(self) -> Runstate:
        return self._state

    @property
    def agent(self) -> Optional[AgentInfo]:
        """:class:`AgentInfo` of the agent from the latest handshake."""
        return self._agent

    @property
    def stats(self) -> "collections.Counter[str]":
        """What needed no action, counted over every connection: garbage_bytes, corrupt_frames,
        stale_frames, bad_messages, messages, agent_restarts."""
        total = collections.Counter(self._closed_stats)
        if self._conn is not None:
            total.update(self._conn.machine.stats)
        return total

    @property
    def last_error(self) -> Optional[BaseException]:
        """Why the latest connection ended (None if none did)."""
        return self._last_error

    # --- connecting -----------------------------------------------------------------------

    async def open(self) -> None:
        """Open the socket and perform the handshake."""
        if self._state is not Runstate.IDLE:
            raise RuntimeError("connect() called on a client that is %s" % self._state.value)
        self._wlock = asyncio.Lock()
        self._changed = asyncio.get_running_loop().create_future()
        self._set_state(Runstate.CONNECTING)
        try:
            if not await self._attach_master():
                if self.ctl is None:
                    await self._resolve()
                await self._take_vm_lock()
            conn = await self._open_conn(resolve=False)
            try:
                await wait_within(asyncio.shield(conn.handshake), self.timeout)
            except asyncio.TimeoutError:
                raise E.AgentNotResponding(
                    "the guest agent did not answer on %s within %g s (is the agent running in the "
                    "guest? is another client connected?)" % (self.ctl, self.timeout or 0)) from None
        except BaseException:
            await self._shutdown()
            raise

    async def _attach_master(self) -> bool:
        """Attach to the VM through this user's guestlink master (docs/master.md) -> whether
        this session goes through one (else it connects directly, as without a master)."""
        if not self._policy.use:
            return False
        o = self._options
        args = mastersock.attach_args(str(o.ctl) if o.ctl else None, str(o.data) if o.data else None,
                                      domain=o.domain, uri=o.uri, ctl_name=o.ctl_name,
                                      data_name=o.data_name, timeout=self.timeout,
                                      queue_timeout=self.queue_timeout)
        loop = asyncio.get_running_loop()
        route = await loop.run_in_executor(None, mastersock.open_route, self._policy, args,
                                           self.timeout)
        if route is None:
            if self.via_master:  # a reconnection, and the master is gone for good
                raise E.NotListening("the guestlink master is gone", self.ctl)
            return False
        sock, reply = route
        self.via_master = True
        self._master_sock = sock
        ctl, data = reply.get("ctl"), reply.get("data")
        self.ctl = ctl if isinstance(ctl, str) else self.ctl
        self.data = data if isinstance(data, str) else self.data
        return True

    async def _resolve(self) -> None:
        if self._resolver is not None:
            loop = asyncio.get_running_loop()
            self.ctl, self.data = await loop.run_in_executor(None, self._resolver)

    async def _take_vm_lock(self) -> None:
        assert self.ctl is not None  # given, or resolved from the libvirt domain
        try:
            lock = VMLock(self.ctl)
            lock.try_acquire()
        except (OSError, E.ConnectError) as exc:
            # taking turns is a courtesy between guestlink clients: without a usable lock
            # directory this client still works, as it would alone
            log.warning("guestlink: not queueing with other clients of %s: %s", self.ctl, exc)
            return
        self._vmlock = lock
        try:
            await lock.acquire(self.queue_timeout, self._queued)
        except OSError as exc:
            log.warning("guestlink: not queueing with other clients of %s: %s", self.ctl, exc)
            lock.release()
            self._vmlock = None

    def _queued(self, holder: str) -> None:
        log.info("guestlink: %s is in use by %s; waiting", self.ctl, printable(holder))
        if self._on_queue is not None:
            self._on_queue(holder)

    async def _open_conn(self, resolve: bool = True) -> _Conn:
        if resolve and self.via_master:
            try:
                await self._attach_master()
            except E.ProtocolError:
                raise
            except E.GuestlinkError as exc:  # the VM is not back yet: the reconnect loop retries
                if isinstance(exc, E.ConnectError):
                    raise
                raise E.ConnectError(str(exc), self.ctl) from None
        elif resolve and self._resolver is not None:
            await self._resolve()
            if self._vmlock is not None and self._vmlock.ctl != self.ctl:
                # the domain restarted with new socket paths: queue on the new ones
                self._vmlock.release()
                self._vmlock = None
                await self._take_vm_lock()
        reader, writer = await self._open_socket()
        conn = _Conn(reader, writer, rules.HostSession(self._max_payload or MAX_PAYLOAD))
        self._conn = conn
        self._new_handshake(conn)
        conn.write(conn.machine.start())
        loop = asyncio.get_running_loop()
        conn.tasks.append(loop.create_task(self._read_loop(conn)))
        return conn

    async def _open_socket(self) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        path = self.ctl
        sock, self._master_sock = self._master_sock, None
        if sock is not None:  # attached to the VM through the master
            sock.setblocking(False)
            return await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        try:
            return await asyncio.open_unix_connection(path, limit=1 << 20)
        except FileNotFoundError as exc:
            raise E.SocketNotFound("control socket %s does not exist" % path, path,
                                   exc.errno) from None
        except ConnectionRefusedError as exc:
            raise E.NotListening("nobody is listening on control socket %s (is the VM running?)"
                                 % path, path, exc.errno) from None
        except PermissionError as exc:
            raise E.PermissionDenied("permission denied opening control socket %s" % path, path,
                                     exc.errno) from None
        except OSError as exc:
            if exc.errno == _errno.ENOTSOCK:
                raise E.NotListening("%s is not a socket" % path, path, exc.errno) from None
            raise E.ConnectError("cannot connect to control socket %s: %s"
                                 % (path, exc.strerror or exc), path, exc.errno) from None

    def _new_handshake(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        conn.handshake = loop.create_future()
        conn.handshake.add_done_callback(consume)
        if conn.sync_task is None or conn.sync_task.done():
            # resends SYNC until synchronised, then ends: an idle session has no timer
            conn.tasks = [t for t in conn.tasks if not t.done()]
            conn.sync_task = loop.create_task(self._sync_loop(conn))
            conn.tasks.append(conn.sync_task)

    async def _sync_loop(self, conn: _Conn) -> None:
        while not conn.closed:
            await asyncio.sleep(SYNC_INTERVAL)
            if conn.machine.synchronised or conn.machine.failed:
                return
            data = conn.machine.sync_due()
            if data and not conn.closed:
                conn.write(data)

    async def _read_loop(self, conn: _Conn) -> None:
        reason = None
        try:
            loop = asyncio.get_running_loop()
            partial_since = None
            while True:
                data: Optional[bytes]
                if partial_since is None:
                    data = await conn.reader.read(65536)
                else:
                    # The reader never pauses, so a frame that stalls this long was cut off by an
                    # agent that died mid-write; what follows must not be eaten as its payload.
                    try:
                        data = await wait_within(conn.reader.read(65536), PARTIAL_FRAME_STALL)
                    except asyncio.TimeoutError:
                        data = None
                if data is not None and not data:
                    reason = "the control socket was closed by the other end"
                    break
                machine = conn.machine
                events = machine.receive_data(data) if data else []
                if not machine.partial:
                    partial_since = None
                elif data or partial_since is None:
                    partial_since = loop.time()  # progress: a stall counts from the last bytes
                elif loop.time() - partial_since >= PARTIAL_FRAME_STALL:
                    events += machine.abandon_partial()
                    partial_since = None
                for event in events:
                    if conn.closed:
                        return
                    self._handle(conn, event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # OSError, or a bug: either way this connection is finished
            if not isinstance(exc, OSError):
                # a bug met on the guest's input: one escaped line, the traceback only for debug
                log.error("guestlink: reader failed: %s: %s", type(exc).__name__, printable(exc))
                log.debug("guestlink: reader failure", exc_info=True)
            reason = "error reading the control socket: %s" % printable(exc)
        self._lost(conn, reason)

    # --- frame dispatch -------------------------------------------------------------------

    def _handle(self, conn: _Conn, event: rules.HostEvent) -> None:
        """Carry out one event of the session machine (see its module docstring)."""
        if isinstance(event, rules.SendBytes):
            conn.write(event.data)
        elif isinstance(event, rules.Synchronised):
            agent = AgentInfo(event.agent)
            self._agent = agent
            if not conn.handshake.done():
                conn.handshake.set_result(agent)
            self._set_state(Runstate.RUNNING)
        elif isinstance(event, rules.HandshakeFailed):
            self._handshake_failed(conn, E.ProtocolMismatch(event.message, event.details)
                                   if event.mismatch else E.ProtocolError(event.message))
        elif isinstance(event, rules.SessionLost):
            self._agent_restarted(conn, event.reason)
        elif isinstance(event, rules.Message):
            self._on_message(event.topic, event.data)
        elif isinstance(event, rules.AgentError):
            log.warning("guestlink agent reported a connection error: %s: %s",
                        printable(event.code), printable(event.message))
        else:
            self._handle_call_event(conn, event)

    def _handle_call_event(self, conn: _Conn, event: rules.HostEvent) -> None:
        if isinstance(event, rules.CallBroken):
            exc: E.GuestlinkError = (E.ProtocolMismatch(event.message) if event.mismatch
                                     else E.ProtocolError(event.message))
            call = self._pending.pop(event.id, None)
            if call is not None:
                call.fail(exc)
                conn.write(conn.machine.cancel(event.id))
            return
        if not isinstance(event, (rules.Response, rules.ErrorReply, rules.MalformedReply,
                                  rules.CallEvent, rules.CallStream)):
            return  # pragma: no cover - every event kind is handled above
        call = self._pending.get(event.id)
        if call is None:
            return
        if isinstance(event, rules.Response):
            del self._pending[event.id]
            call.resolve(event.payload)
        elif isinstance(event, rules.ErrorReply):
            del self._pending[event.id]
            call.fail(E.remote_error(event.code, event.message, event.details))
        elif isinstance(event, rules.MalformedReply):
            del self._pending[event.id]
            call.fail(E.malformed(event.what, event.message))
        elif isinstance(event, rules.CallEvent):
            if call.on_event is not None:
                call.on_event(event.payload)
        elif call.on_stream is not None:
            call.on_stream(event.flags, event.payload)

    def _handshake_failed(self, conn: _Conn, exc: E.GuestlinkError) -> None:
        """A fatal handshake error (mismatch, malformed SYNC_ACK): no point in retrying."""
        self._last_error = exc
        if not conn.handshake.done():
            conn.handshake.set_exception(exc)
        self._fail_all(conn, exc, exc)
        self._close_conn(conn)
        if self._state not in (Runstate.CLOSED, Runstate.CONNECTING):
            self._set_state(Runstate.DISCONNECTED)
            self._on_gone(exc)

    def _agent_restarted(self, conn: _Conn, why: str) -> None:
        # the machine counted the restart, forgot the ids and began a new handshake (its SYNC
        # is the next event)
        self._fail_all(conn, E.ConnectionLost("connection lost (%s)" % why),
                       E.RequestNotSent("request not sent (%s)" % why))
        self._new_handshake(conn)
        self._set_state(Runstate.RECONNECTING)
        if self._on_lost is not None:
            self._on_lost(True)

    # --- connection loss ------------------------------------------------------------------

    def _lost(self, conn: _Conn, reason: Optional[str]) -> None:
        if conn.closed:
            return
        self._last_error = E.ConnectionLost("connection lost: %s" % reason)
        if not conn.handshake.done():
            conn.handshake.set_exception(E.ConnectionLost(
                "the control socket was closed during the handshake (%s)" % reason))
        self._fail_all(conn, E.ConnectionLost("connection lost: %s" % reason),
                       E.RequestNotSent("request not sent: %s" % reason))
        self._close_conn(conn)
        if self._state in (Runstate.RUNNING, Runstate.RECONNECTING):
            if self._on_lost is not None:
                self._on_lost(False)
            if self.reconnect:
                self._set_state(Runstate.RECONNECTING)
                if self._supervisor is None or self._supervisor.done():
                    self._supervisor = asyncio.get_running_loop().create_task(self._reconnect_loop())
            else:
                self._set_state(Runstate.DISCONNECTED)
                self._on_gone(self._last_error)

    def _fail_all(self, conn: _Conn, sent_exc: BaseException, unsent_exc: BaseException) -> None:
        for id_, call in list(self._pending.items()):
            if call.conn is conn or call.conn is None:
                del self._pending[id_]
                call.fail(E.copy_error(sent_exc if call.sent else unsent_exc))

    def fail_call(self, id_: int, exc: BaseException, cancel: bool = False) -> None:
        """Fail the pending call ``id_`` with ``exc`` (and send CANCEL for it if ``cancel``)."""
        call = self._pending.pop(id_, None)
        if call is None:
            return
        call.fail(exc)
        if call.conn is not None:
            if cancel:
                call.conn.write(call.conn.machine.cancel(id_))
            else:
                call.conn.machine.release(id_)

    def _close_conn(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._closed_stats.update(conn.machine.stats)
        current = asyncio.current_task()
        for task in conn.tasks:
            if task is not current:
                task.cancel()
        try:
            conn.writer.close()
        except Exception:  # pragma: no cover - closing a broken transport
            pass
        if self._conn is conn:
            self._conn = None

    async def _reconnect_loop(self) -> None:
        delay = BACKOFF_FIRST
        while self._state is Runstate.RECONNECTING:
            conn = self._conn
            if conn is None or conn.closed:
                try:
                    conn = await self._open_conn()
                except E.ConnectError as exc:
                    self._last_error = exc
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * BACKOFF_FACTOR, BACKOFF_MAX)
                    continue
            try:
                await asyncio.shield(conn.handshake)
            except E.ProtocolError:
                return  # fatal: _handshake_failed moved us to DISCONNECTED
            except E.GuestlinkError:
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * BACKOFF_FACTOR, BACKOFF_MAX)
                continue
            delay = BACKOFF_FIRST
            if conn.synced:
                return

    # --- state ------------------------------------------------------------------------------

    def _set_state(self, state: Runstate) -> None:
        if state is self._state:
            return
        log.debug("guestlink client %s: %s -> %s", self.ctl, self._state.value, state.value)
        self._state = state
        fut, self._changed = self._changed, asyncio.get_running_loop().create_future()
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait_ready(self) -> None:
        """Wait until the session is synchronised (RequestNotSent if it is closed or gone)."""
        await self._wait_ready()

    async def _wait_ready(self) -> _Conn:
        """Wait until a synchronised connection exists; return it."""
        while True:
            conn = self._conn
            if self._state is Runstate.RUNNING and conn is not None and conn.synced:
                return conn
            if self._state is Runstate.CLOSED:
                raise E.RequestNotSent("request not sent: the client is closed")
            if self._state is Runstate.IDLE:
                raise E.RequestNotSent("request not sent: the client is not connected yet")
            if self._state is Runstate.DISCONNECTED:
                raise E.RequestNotSent("request not sent: not connected (%s)"
                                       % (self._last_error,)) from self._last_error
            assert self._changed is not None
            await asyncio.shield(self._changed)

    # --- sending ----------------------------------------------------------------------------

    def deadline(self, timeout: Optional[float]) -> Optional[float]:
        """The loop time by which a call with ``timeout`` (None: the session's) must be done."""
        if timeout is None:
            timeout = self.timeout
        if timeout is None:
            return None
        seconds = check_timeout(timeout)
        assert seconds is not None
        return asyncio.get_running_loop().time() + seconds

    @staticmethod
    def remaining(deadline: Optional[float]) -> Optional[float]:
        """Seconds left until ``deadline`` (None: no limit), never negative."""
        if deadline is None:
            return None
        return max(0.0, deadline - asyncio.get_running_loop().time())

    async def send_call(self, call: Call, make_frame: Callable[[int], bytes],
                        deadline: Optional[float],
                        extra: Sequence[Callable[[int], bytes]] = ()) -> None:
        """Send a request frame (and ``extra`` frames built from its id) once connected.

        On return the call is pending and was handed to the socket. Raises RequestNotSent if that
        could not happen before the deadline, ValueError if the frame cannot be encoded.
        """
        assert self._wlock is not None
        conn = self._conn
        if (not extra and self._state is Runstate.RUNNING and conn is not None and conn.synced
                and not conn.closed and not self._wlock.locked()
                and conn.writer.transport.get_write_buffer_size() == 0):
            # Connected, nobody writing, nothing queued: _send_loop cannot wait (no connection to
            # wait for, a free lock, a drain that returns at once), so the timed wait and its
            # timer are pure per-request cost.
            deadline = None
        try:
            await wait_within(self._send_loop(call, make_frame, extra), self.remaining(deadline))
        except asyncio.TimeoutError:
            if not call.sent:
                self._pending.pop(call.id, None)
                raise E.RequestNotSent(
                    "request not sent: no synchronised connection to the agent on %s within the "
                    "timeout (%s)" % (self.ctl, self._last_error or self._state.value)) from None
        except BaseException:
            if not call.sent:
                self._pending.pop(call.id, None)
            raise

    async def _send_loop(self, call: Call, make_frame: Callable[[int], bytes],
                         extra: Iterable[Callable[[int], bytes]]) -> None:
        assert self._wlock is not None
        while True:
            conn = await self._wait_ready()
            async with self._wlock:
                if conn.closed or not conn.synced or conn is not self._conn:
                    continue  # lost before we got to write: not sent, wait again
                call.id = conn.machine.allocate_id()
                try:
                    data = make_frame(call.id)
                    if extra:
                        data = b"".join([data] + [f(call.id) for f in extra])
                except BaseException:
                    conn.machine.release(call.id)  # never sent
                    raise
                call.conn = conn
                self._pending[call.id] = call
                conn.writer.write(data)
                call.sent = True
                try:
                    await conn.writer.drain()
                except (OSError, RuntimeError):
                    pass  # the reader notices the broken socket and fails the call
                return

    async def send_frames(self, call: Call, frames: Sequence[bytes]) -> bool:
        """Send follow-up frames (stdin, CANCEL) of a call on the call's own connection ->
        whether they were handed to the socket (not when the call is over or its socket gone)."""
        conn = call.conn
        assert self._wlock is not None
        async with self._wlock:
            if conn is None or conn.closed or call.future.done():
                return False
            conn.writer.write(b"".join(frames))
            try:
                await conn.writer.drain()
            except (OSError, RuntimeError):
                return False
        return True

    async def await_reply(self, call: Call, deadline: Optional[float], what: str,
                          shared: bool = True) -> Any:
        """The final reply's payload of a sent call; RequestTimeout after ``deadline`` (the call
        is then forgotten and CANCEL sent), the call's error if it failed.

        ``shared=False``: nobody else awaits ``call.future``, so it is awaited without a shield
        (a timeout or cancellation may cancel it: the call is forgotten then anyway), which
        saves an event-loop iteration per request."""
        try:
            fut = asyncio.shield(call.future) if shared else call.future
            return await wait_within(fut, self.remaining(deadline))
        except asyncio.TimeoutError as exc:
            if isinstance(exc, E.GuestlinkError):
                raise  # the call's own failure (e.g. RemoteTimeout), not our deadline
            self.forget(call, cancel=True)
            raise E.RequestTimeout("no reply to %s from the agent within the timeout" % what) from None
        except asyncio.CancelledError:
            self.forget(call, cancel=True)
            raise

    def forget(self, call: Call, cancel: bool = False) -> None:
        """Stop tracking ``call`` (its frames are dropped from now on), sending CANCEL for it if
        ``cancel`` and it was sent; its future is cancelled if still open."""
        if self._pending.get(call.id) is call:
            del self._pending[call.id]
            conn = call.conn
            if conn is not None:
                if cancel and call.sent:
                    conn.write(conn.machine.cancel(call.id))
                else:
                    conn.machine.release(call.id)
        if not call.future.done():
            call.future.cancel()

    async def start_call(self, call: Call, op: str, args: Dict[str, Any],
                         first: "asyncio.Future[Any]", deadline: Optional[float],
                         timeout_message: str) -> None:
        """Send REQUEST ``op`` and wait until ``first`` (set by a non-final event such as exec's
        "started" or a transfer's "ready") or the final reply resolves. On timeout or
        cancellation the call is forgotten and CANCEL sent."""
        await self.send_call(call, lambda id_: m.encode_request(id_, op, args), deadline)
        try:
            await wait_within(asyncio.wait([first, call.future],
                                           return_when=asyncio.FIRST_COMPLETED),
                              self.remaining(deadline))
        except asyncio.TimeoutError:
            self.forget(call, cancel=True)
            raise E.RequestTimeout(timeout_message) from None
        except asyncio.CancelledError:
            self.forget(call, cancel=True)
            raise

    async def idempotent_request(self, op: str, args: Optional[Dict[str, Any]] = None,
                                 timeout: Optional[float] = None) -> Dict[str, Any]:
        """:meth:`request` for ops without side effects: when the session was lost under the call
        (an agent restart, or the agent noticing a previous client's disconnect late), retry once
        on the new session instead of failing (lessons: retry only what has no side effects)."""
        deadline = self.deadline(timeout)
        try:
            return await self.request(op, args, timeout)
        except (E.ConnectionLost, E.RequestNotSent, E.NotReady):
            remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if remaining is not None and remaining <= 0:
                raise
            log.debug("%s: session lost under the call; retrying once", op)
            return await self.request(op, args, remaining)

    async def request(self, op: str, args: Optional[Dict[str, Any]] = None,
                      timeout: Optional[float] = None) -> Dict[str, Any]:
        """Send REQUEST op and return the RESPONSE as a dict (ERROR -> RemoteError)."""
        deadline = self.deadline(timeout)
        call = Call(op)
        await self.send_call(call, lambda id_: m.encode_request(id_, op, args), deadline)
        payload = await self.await_reply(call, deadline, op, shared=False)  # a call of its own
        try:
            return m.parse_response(payload)
        except ProtocolViolation as exc:
            raise E.malformed("%s reply" % op, exc) from None

    # --- closing --------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the connection; pending requests fail, ``on_gone(None)`` is called."""
        if self._state is Runstate.CLOSED:
            return
        if self._state is Runstate.IDLE:
            self._state = Runstate.CLOSED
            return
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._set_state(Runstate.CLOSED)
        sup, self._supervisor = self._supervisor, None
        if sup is not None and sup is not asyncio.current_task():
            sup.cancel()
        conn = self._conn
        tasks: List["asyncio.Task[Any]"] = []
        writer = None
        if conn is not None:
            self._fail_all(conn, E.ConnectionLost("connection lost: the client was closed"),
                           E.RequestNotSent("request not sent: the client was closed"))
            tasks = list(conn.tasks)
            writer = conn.writer
            self._close_conn(conn)
        for id_, call in list(self._pending.items()):
            del self._pending[id_]
            call.fail(E.RequestNotSent("request not sent: the client was closed"))
        self._on_gone(None)
        current = asyncio.current_task()
        for task in tasks + ([sup] if sup is not None else []):
            if task is not current:
                try:
                    await task
                except BaseException:
                    pass
        if writer is not None:
            try:
                await wait_within(writer.wait_closed(), 1.0)
            except Exception:
                pass
        if self._master_sock is not None:
            self._master_sock.close()
            self._master_sock = None
        lock, self._vmlock = self._vmlock, None
        if lock is not None:  # after the socket is closed, so the next client finds it free
            lock.release()
