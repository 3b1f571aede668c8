"""asyncio client for a guestlink agent, over the VM's control socket (a QEMU unix chardev).

::

    async with guestlink.connect(ctl="/run/vm1/ctl.sock", data="/run/vm1/data.sock") as vm:
        print(vm.agent.hostname, await vm.ping())
        result = await vm.run(["uname", "-r"], check=True)
        async with vm.exec(["cat"], stdin=True) as proc:
            await proc.write(b"hello")
            await proc.close_stdin()
            async for stream, data in proc.output():
                ...
        async for msg in vm.subscribe("events"):
            ...

Design (see docs/protocol.md for the wire contract):

* A run state (:class:`Runstate`, as in qemu.qmp): IDLE -> CONNECTING -> RUNNING, then
  RECONNECTING while the socket is re-opened or the agent re-synchronised, DISCONNECTED when the
  connection is gone for good (``reconnect=False``), CLOSED after :meth:`Client.close`.
* One reader task per socket feeds the sans-I/O :class:`~guestlink.protocol.FrameDecoder` and
  dispatches frames; writes go through one lock (write + drain) so frames never interleave and
  drains are ordered.
* Every handshake uses a fresh random nonce; SYNC is resent every second and on every HELLO;
  everything is ignored until the SYNC_ACK with our nonce. A HELLO after the handshake means the
  agent restarted: pending requests fail with ConnectionLost and the client re-synchronises.
* Pending requests are keyed by id (32-bit, wrapping, never 0 nor an id in flight). When the
  connection goes away, every request that was handed to the socket fails with ConnectionLost
  (outcome unknown); a request that had not been written yet waits for the reconnection (with
  ``reconnect=True``) or fails with RequestNotSent (safe to retry).
* Everything received is untrusted: each field used from a reply is validated and a malformed
  reply fails that request with ProtocolError.
"""

import asyncio
import collections
import collections.abc
import enum
import errno as _errno
import logging
import random
import secrets
import shlex
import time
from dataclasses import dataclass
from typing import Optional, Union

from ..protocol import (STREAM_STDERR, STREAM_STDIN, STREAM_STDOUT, CorruptFrame, Fields, Frame,
                        FrameDecoder, FrameType, Garbage, ProtocolViolation, UnsupportedVersion,
                        codes)
from ..protocol import messages as m
from ..protocol.frames import MAX_ID
from ..protocol.safetext import printable
from . import errors as E
from .vmlock import VMLock

log = logging.getLogger("guestlink.host")

#: Default per-call timeout in seconds (connect(timeout=...) overrides it).
DEFAULT_TIMEOUT = 10.0
#: SYNC is resent this often until the agent answers.
#: Seconds an incomplete frame may stall before it is taken as cut off (docs/protocol.md).
PARTIAL_FRAME_STALL = 2.0
SYNC_INTERVAL = 1.0
#: Reconnection backoff: first delay, factor, ceiling (seconds).
BACKOFF_FIRST, BACKOFF_FACTOR, BACKOFF_MAX = 0.1, 2.0, 5.0
#: stdin is sent in STREAM frames of at most this many bytes.
STREAM_CHUNK = 64 * 1024
#: Bytes per output stream that run() keeps in memory (and asks the agent to send) by default.
DEFAULT_OUTPUT_LIMIT = 64 * 1024 * 1024
#: Messages a subscription buffers before it drops the oldest.
DEFAULT_QUEUE_SIZE = 1024
#: Extra time the host allows past an exec's own timeout for the agent's SIGTERM/SIGKILL grace.
EXEC_KILL_GRACE = 2.0

_STREAM_NAMES = {STREAM_STDOUT: "stdout", STREAM_STDERR: "stderr"}

#: Longest timeout accepted (seconds, ~24 days): beyond 2**31 ms the agent's and the OS's timers
#: overflow, and no guestlink call is meant to wait that long.
MAX_TIMEOUT = 24 * 86400.0


def check_timeout(value: Optional[float], what: str = "timeout") -> Optional[float]:
    """``value`` as a float if it is None or a finite number of seconds in [0, MAX_TIMEOUT];
    otherwise ValueError (raised before anything is sent: inf, nan, negative, huge)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("%s must be a number of seconds, not %s" % (what, type(value).__name__))
    value = float(value)
    if not 0 <= value <= MAX_TIMEOUT:  # also false for nan
        raise ValueError("%s must be a finite number of seconds between 0 and %d, not %r"
                         % (what, MAX_TIMEOUT, value))
    return value


async def wait_within(aw, timeout: Optional[float]):
    """Await ``aw`` for at most ``timeout`` seconds (None: no limit) -> its result, else raise
    asyncio.TimeoutError. The one timed wait of the host code: asyncio.wait_for before Python
    3.12 loses a cancellation of the caller that coincides with ``aw`` completing (Ctrl-C was
    swallowed); here the caller's cancellation always wins."""
    if timeout is None:
        return await aw
    if hasattr(asyncio, "timeout"):  # 3.11+: counts cancellations, so none is lost
        async with asyncio.timeout(timeout):
            return await aw
    return await _wait_within_compat(aw, timeout)


async def _wait_within_compat(aw, timeout: float):
    """wait_within for Python < 3.11 (no asyncio.timeout)."""
    loop = asyncio.get_running_loop()
    inner = asyncio.ensure_future(aw)
    if inner.done():
        return inner.result()
    waiter = loop.create_future()

    def wake(_=None):
        if not waiter.done():
            waiter.set_result(None)

    handle = loop.call_later(max(0.0, timeout), wake)
    inner.add_done_callback(wake)
    try:
        await waiter
    except asyncio.CancelledError:
        # even when ``inner`` finished in the same loop iteration: the cancellation wins
        inner.cancel()
        inner.add_done_callback(_consume)
        raise
    finally:
        handle.cancel()
        inner.remove_done_callback(wake)
    if not inner.done():
        inner.cancel()
        await asyncio.wait([inner])
        if inner.cancelled():
            raise asyncio.TimeoutError()
    return inner.result()


class Runstate(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    RUNNING = "running"
    RECONNECTING = "reconnecting"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


class AgentInfo(collections.abc.Mapping):
    """The agent's validated self-description from its SYNC_ACK.

    A read-only mapping with the wire keys (``agent``, ``agent_version``, ``protocol``,
    ``capabilities``, ``hostname``, ``boot_id``, ``session``) and attributes ``name``,
    ``version``, ``protocol``, ``capabilities`` (tuple), ``hostname``, ``boot_id``, ``session``.
    """

    __slots__ = ("_d",)

    def __init__(self, description):
        d = dict(description)
        d["capabilities"] = tuple(d.get("capabilities", ()))
        self._d = d

    def __getitem__(self, key):
        return self._d[key]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)

    def __repr__(self):
        return "AgentInfo(%r)" % (self._d,)

    name = property(lambda self: self._d["agent"])
    version = property(lambda self: self._d["agent_version"])
    protocol = property(lambda self: self._d["protocol"])
    capabilities = property(lambda self: self._d["capabilities"])
    hostname = property(lambda self: self._d["hostname"])
    boot_id = property(lambda self: self._d["boot_id"])
    session = property(lambda self: self._d["session"])


@dataclass(frozen=True)
class Message:
    """A topic message from the guest."""

    topic: str
    data: bytes

    @property
    def text(self):
        return self.data.decode("utf-8", "replace")


@dataclass
class CompletedProcess:
    """The outcome of a command run in the guest (like subprocess.CompletedProcess).

    ``returncode`` is the exit status, or ``-N`` when the process was killed by signal N
    (``signal`` is then N). Output beyond the output limit was dropped and flagged truncated.
    """

    args: Union[str, list]
    returncode: int
    stdout: bytes = b""
    stderr: bytes = b""
    signal: Optional[int] = None
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration: float = 0.0
    pid: Optional[int] = None

    def check_returncode(self):
        """Raise CommandTimedOut or CommandFailed unless the command exited with status 0."""
        if self.timed_out:
            raise E.CommandTimedOut(self)
        if self.returncode != 0:
            raise E.CommandFailed(self)


class _Call:
    """One request in flight."""

    __slots__ = ("id", "op", "future", "sent", "conn", "on_event", "on_stream")

    def __init__(self, op, on_event=None, on_stream=None):
        self.id = 0
        self.op = op
        self.future = asyncio.get_running_loop().create_future()
        self.sent = False
        self.conn = None
        self.on_event = on_event
        self.on_stream = on_stream

    def fail(self, exc):
        if not self.future.done():
            self.future.set_exception(exc)
            # A failure nobody awaits (e.g. a cancelled exec) must not be logged as unretrieved.
            self.future.exception()

    def resolve(self, payload):
        if not self.future.done():
            self.future.set_result(payload)


class _Conn:
    """One open control socket and its handshake state."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.nonce = None
        self.synced = False
        self.closed = False
        self.handshake = None  # Future -> AgentInfo, replaced on every (re)handshake
        self.tasks = []

    def write(self, data):
        if self.closed or self.writer.is_closing():
            return False
        self.writer.write(data)
        return True


def _violation(what, exc):
    return E.ProtocolError("malformed %s from the agent: %s" % (what, exc))


def connect(ctl=None, data=None, *, domain=None, uri=None, ctl_name=None, data_name=None,
            timeout=DEFAULT_TIMEOUT, reconnect=True, max_payload=None,
            queue_size=DEFAULT_QUEUE_SIZE, queue_timeout=None, on_queue=None):
    """Connect to the agent of one VM.

    ``ctl`` is the control channel's unix socket, ``data`` the data channel's (kept for file
    transfer; not opened yet). Or ``domain``: a libvirt domain name or UUID (``uri`` as virsh's
    ``--connect``; default $LIBVIRT_DEFAULT_URI, else qemu:///system) whose live XML gives both
    paths, read again before every (re)connection (see :mod:`guestlink.libvirt`; its errors are
    ConnectErrors); its channels are named ``ctl_name``/``data_name`` when given, else as recorded
    in the domain's guestlink metadata, else org.guestlink.ctl/.data. ``timeout`` is the
    handshake timeout and every verb's default timeout (None: no limit). With ``reconnect=True``
    the client re-opens the socket with backoff after it breaks and calls made meanwhile wait for
    it up to their timeout.

    A VM serves one client at a time (QEMU's chardev accepts one connection): while another
    guestlink client is connected to it, this one waits its turn (:mod:`guestlink.host.vmlock`),
    calling ``on_queue(holder)`` once with a description of that client, for at most
    ``queue_timeout`` seconds (None: no limit; then VMInUse).

    Use as ``async with connect(...) as vm:`` or ``vm = await connect(...)`` (then ``await
    vm.close()``).
    """
    resolver = None
    if domain is not None:
        if ctl or data:
            raise ValueError("connect(): give either domain= or ctl=/data=, not both")
        from ..libvirt import resolver as _libvirt_resolver

        resolver = _libvirt_resolver(domain, uri, ctl_name, data_name)
    elif ctl_name or data_name:
        raise ValueError("connect(): ctl_name=/data_name= name a libvirt domain's channels; "
                         "they need domain=")
    client = Client(ctl, data, timeout=timeout, reconnect=reconnect, max_payload=max_payload,
                    queue_size=queue_size, resolver=resolver, queue_timeout=queue_timeout,
                    on_queue=on_queue)
    return _Connector(client)


class _Connector:
    def __init__(self, client):
        self._client = client

    def __await__(self):
        return self._client.connect().__await__()

    async def __aenter__(self):
        return await self._client.connect()

    async def __aexit__(self, *exc):
        await self._client.close()


class Client:
    """A connection to one guest agent. Create it with :func:`connect`."""

    def __init__(self, ctl, data=None, *, timeout=DEFAULT_TIMEOUT, reconnect=True,
                 max_payload=None, queue_size=DEFAULT_QUEUE_SIZE, resolver=None,
                 queue_timeout=None, on_queue=None):
        if not ctl and resolver is None:
            raise ValueError("connect() needs the control socket path (ctl=...)")
        # resolver: () -> (ctl, data), called before every socket open (libvirt domains)
        self._resolver = resolver
        self.ctl = str(ctl) if ctl else None
        self.data = str(data) if data else None
        self.timeout = check_timeout(timeout)
        self.reconnect = reconnect
        self._max_payload = max_payload
        self._queue_size = queue_size
        self.queue_timeout = check_timeout(queue_timeout, "queue_timeout")
        self._on_queue = on_queue
        self._vmlock = None
        self._state = Runstate.IDLE
        self._conn = None
        self._agent = None
        self._pending = {}
        self._next_id = 1
        self._wlock = None
        self._changed = None
        self._supervisor = None
        self._last_error = None
        self._subs = collections.defaultdict(set)
        self.stats = collections.Counter()

    # --- public state ---------------------------------------------------------------------

    @property
    def runstate(self):
        return self._state

    @property
    def agent(self):
        """:class:`AgentInfo` of the agent from the latest handshake."""
        return self._agent

    @property
    def connected(self):
        return self._state is Runstate.RUNNING

    def __repr__(self):
        return "<guestlink.Client %s %s>" % (self.ctl, self._state.value)

    async def __aenter__(self):
        if self._state is Runstate.IDLE:
            await self.connect()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # --- connecting -----------------------------------------------------------------------

    async def connect(self):
        """Open the socket and perform the handshake; returns self."""
        if self._state is not Runstate.IDLE:
            raise RuntimeError("connect() called on a client that is %s" % self._state.value)
        self._wlock = asyncio.Lock()
        self._changed = asyncio.get_running_loop().create_future()
        self._set_state(Runstate.CONNECTING)
        try:
            await self._resolve()
            await self._take_vm_lock()
            conn = await self._open_conn(resolve=False)
            try:
                await wait_within(asyncio.shield(conn.handshake), self.timeout)
            except asyncio.TimeoutError:
                raise E.AgentNotResponding(
                    "the guest agent did not answer on %s within %g s (is the agent running in the "
                    "guest? is another client connected?)" % (self.ctl, self.timeout)) from None
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def _resolve(self):
        if self._resolver is not None:
            loop = asyncio.get_running_loop()
            self.ctl, self.data = await loop.run_in_executor(None, self._resolver)

    async def _take_vm_lock(self):
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

    def _queued(self, holder):
        log.info("guestlink: %s is in use by %s; waiting", self.ctl, printable(holder))
        if self._on_queue is not None:
            self._on_queue(holder)

    async def _open_conn(self, resolve=True):
        if resolve and self._resolver is not None:
            await self._resolve()
            if self._vmlock is not None and self._vmlock.ctl != self.ctl:
                # the domain restarted with new socket paths: queue on the new ones
                self._vmlock.release()
                self._vmlock = None
                await self._take_vm_lock()
        reader, writer = await self._open_socket()
        conn = _Conn(reader, writer)
        if self._max_payload:
            conn.decoder = FrameDecoder(self._max_payload)
        self._conn = conn
        self._start_handshake(conn)
        loop = asyncio.get_running_loop()
        conn.tasks.append(loop.create_task(self._read_loop(conn)))
        conn.tasks.append(loop.create_task(self._sync_loop(conn)))
        return conn

    async def _open_socket(self):
        path = self.ctl
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

    def _start_handshake(self, conn):
        conn.nonce = secrets.token_hex(16)  # 128 bits
        conn.synced = False
        conn.handshake = asyncio.get_running_loop().create_future()
        conn.handshake.add_done_callback(_consume)
        self._send_sync(conn)

    def _send_sync(self, conn):
        conn.write(m.encode_sync(conn.nonce))

    async def _sync_loop(self, conn):
        while not conn.closed:
            await asyncio.sleep(SYNC_INTERVAL)
            if not conn.synced and not conn.closed:
                self._send_sync(conn)

    async def _read_loop(self, conn):
        reason = None
        try:
            loop = asyncio.get_running_loop()
            partial_since = None
            while True:
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
                events = conn.decoder.feed(data) if data else []
                if not conn.decoder.partial:
                    partial_since = None
                elif data or partial_since is None:
                    partial_since = loop.time()  # progress: a stall counts from the last bytes
                elif loop.time() - partial_since >= PARTIAL_FRAME_STALL:
                    events += conn.decoder.abandon_partial()
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

    def _handle(self, conn, event):
        if isinstance(event, Garbage):
            self.stats["garbage_bytes"] += event.nbytes
            log.debug("skipped %d bytes of garbage", event.nbytes)
            return
        if isinstance(event, UnsupportedVersion):
            exc = E.ProtocolMismatch("the agent sent a frame of protocol version %d; this host "
                                     "speaks version 1" % event.version)
            if not conn.synced:
                self._handshake_failed(conn, exc)
            else:
                self._fail_call(event.id, exc, cancel=True)
            return
        if isinstance(event, CorruptFrame):
            self.stats["corrupt_frames"] += 1
            log.debug("corrupt frame: %r", event)
            if conn.synced and event.id:
                self._fail_call(event.id, E.ProtocolError(
                    "a %s frame of this request arrived corrupted (%s)"
                    % (FrameType.name(event.type), event.reason)), cancel=True)
            return
        if not isinstance(event, Frame):
            return
        frame = event
        if not conn.synced:
            self._handle_handshake(conn, frame)
            return
        t = frame.type
        if t == FrameType.HELLO:
            self._agent_restarted(conn, "the guest agent restarted")
        elif t == FrameType.MESSAGE:
            if frame.id == 0:
                self._deliver_message(frame.payload)
        elif t in (FrameType.RESPONSE, FrameType.ERROR, FrameType.EVENT, FrameType.STREAM):
            if frame.id == 0:
                if t == FrameType.ERROR:
                    self._connection_error(conn, frame.payload)
                return
            call = self._pending.get(frame.id)
            if call is None:
                self.stats["stale_frames"] += 1
                return
            if t == FrameType.RESPONSE:
                self._pending.pop(frame.id, None)
                call.resolve(frame.payload)
            elif t == FrameType.ERROR:
                self._pending.pop(frame.id, None)
                try:
                    code, message, details = m.parse_error(frame.payload)
                except ProtocolViolation as exc:
                    call.fail(_violation("ERROR reply", exc))
                    return
                call.fail(E.remote_error(code, message, details))
                if code == codes.NOT_READY:
                    # The agent no longer knows our session (it restarted and we missed its HELLO).
                    self._agent_restarted(conn, "the guest agent lost the session (not_ready)")
            elif t == FrameType.EVENT:
                if call.on_event is not None:
                    call.on_event(frame.payload)
            else:
                if call.on_stream is not None:
                    call.on_stream(frame.flags, frame.payload)
        # SYNC_ACK duplicates (answers to our resends), and frame types a host never receives,
        # are ignored.

    def _handle_handshake(self, conn, frame):
        t = frame.type
        if t == FrameType.HELLO:
            self._send_sync(conn)  # the agent (re)opened its port and may have missed our SYNC
        elif t == FrameType.SYNC_ACK:
            try:
                obj = m.load_json_object(frame.payload, "SYNC_ACK")
                nonce = Fields(obj, "SYNC_ACK").str("nonce", max_len=m.MAX_NONCE)
            except ProtocolViolation:
                self.stats["stale_frames"] += 1
                return
            if nonce != conn.nonce:
                self.stats["stale_frames"] += 1
                log.debug("ignored a SYNC_ACK for another nonce")
                return
            try:
                agent = AgentInfo(m.parse_hello(frame.payload))
            except ProtocolViolation as exc:
                self._handshake_failed(conn, _violation("SYNC_ACK", exc))
                return
            if agent.protocol != m.PROTOCOL_VERSION:
                self._handshake_failed(conn, E.ProtocolMismatch(
                    "the agent speaks protocol %d; this host speaks %d"
                    % (agent.protocol, m.PROTOCOL_VERSION)))
                return
            conn.synced = True
            self._agent = agent
            if not conn.handshake.done():
                conn.handshake.set_result(agent)
            self._set_state(Runstate.RUNNING)
        elif t == FrameType.ERROR and frame.id == 0:
            try:
                code, message, details = m.parse_error(frame.payload)
            except ProtocolViolation:
                return
            if code == codes.PROTOCOL_MISMATCH and details.get("nonce", conn.nonce) == conn.nonce:
                self._handshake_failed(conn, E.ProtocolMismatch(
                    "the agent refused protocol %d: %s" % (m.PROTOCOL_VERSION, message), details))
        else:
            self.stats["stale_frames"] += 1

    def _connection_error(self, conn, payload):
        try:
            code, message, details = m.parse_error(payload)
        except ProtocolViolation:
            return
        log.warning("guestlink agent reported a connection error: %s: %s", printable(code),
                    printable(message))
        if code == codes.PROTOCOL_MISMATCH:
            self._handshake_failed(conn, E.ProtocolMismatch(
                "the agent refused protocol %d: %s" % (m.PROTOCOL_VERSION, message), details))

    def _handshake_failed(self, conn, exc):
        """A fatal handshake error (mismatch, malformed SYNC_ACK): no point in retrying."""
        self._last_error = exc
        if conn.handshake is not None and not conn.handshake.done():
            conn.handshake.set_exception(exc)
        self._fail_all(conn, exc, exc)
        self._close_conn(conn)
        if self._state not in (Runstate.CLOSED, Runstate.CONNECTING):
            self._set_state(Runstate.DISCONNECTED)
            self._end_subscriptions(exc)

    def _end_subscriptions(self, error):
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub._finish(error)

    def _agent_restarted(self, conn, why):
        self.stats["agent_restarts"] += 1
        self._fail_all(conn, E.ConnectionLost("connection lost (%s)" % why),
                       E.RequestNotSent("request not sent (%s)" % why))
        self._start_handshake(conn)
        self._set_state(Runstate.RECONNECTING)

    def _deliver_message(self, payload):
        try:
            topic, data = m.parse_message(payload)
        except ProtocolViolation as exc:
            self.stats["bad_messages"] += 1
            log.debug("ignored a malformed MESSAGE: %s", printable(exc))
            return
        self.stats["messages"] += 1
        msg = Message(topic, data)
        for sub in list(self._subs.get(topic, ())):
            sub._deliver(msg)

    # --- connection loss ------------------------------------------------------------------

    def _lost(self, conn, reason):
        if conn.closed:
            return
        self._last_error = E.ConnectionLost("connection lost: %s" % reason)
        if conn.handshake is not None and not conn.handshake.done():
            conn.handshake.set_exception(E.ConnectionLost(
                "the control socket was closed during the handshake (%s)" % reason))
        self._fail_all(conn, E.ConnectionLost("connection lost: %s" % reason),
                       E.RequestNotSent("request not sent: %s" % reason))
        self._close_conn(conn)
        if self._state in (Runstate.RUNNING, Runstate.RECONNECTING):
            if self.reconnect:
                self._set_state(Runstate.RECONNECTING)
                if self._supervisor is None or self._supervisor.done():
                    self._supervisor = asyncio.get_running_loop().create_task(self._reconnect_loop())
            else:
                self._set_state(Runstate.DISCONNECTED)
                self._end_subscriptions(self._last_error)

    def _fail_all(self, conn, sent_exc, unsent_exc):
        for id_, call in list(self._pending.items()):
            if call.conn is conn or call.conn is None:
                del self._pending[id_]
                call.fail(_copy_exc(sent_exc if call.sent else unsent_exc))

    def _fail_call(self, id_, exc, cancel=False):
        call = self._pending.pop(id_, None)
        if call is None:
            return
        call.fail(exc)
        if cancel and call.conn is not None:
            call.conn.write(m.encode_cancel(id_))

    def _close_conn(self, conn):
        if conn.closed:
            return
        conn.closed = True
        conn.synced = False
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

    async def _reconnect_loop(self):
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

    def _set_state(self, state):
        if state is self._state:
            return
        log.debug("guestlink client %s: %s -> %s", self.ctl, self._state.value, state.value)
        self._state = state
        fut, self._changed = self._changed, asyncio.get_running_loop().create_future()
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _wait_ready(self):
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
            await asyncio.shield(self._changed)

    # --- sending ----------------------------------------------------------------------------

    def _alloc_id(self):
        for _ in range(len(self._pending) + 2):
            id_ = self._next_id
            self._next_id = id_ + 1 if id_ < MAX_ID else 1
            if id_ not in self._pending:
                return id_
        raise RuntimeError("no free request id")  # pragma: no cover - 2**32 requests in flight

    def _deadline(self, timeout):
        if timeout is None:
            timeout = self.timeout
        if timeout is None:
            return None
        return asyncio.get_running_loop().time() + check_timeout(timeout)

    @staticmethod
    def _remaining(deadline):
        if deadline is None:
            return None
        return max(0.0, deadline - asyncio.get_running_loop().time())

    async def _send_call(self, call, make_frame, deadline, extra=()):
        """Send a request frame (and ``extra`` frames built from its id) once connected.

        On return the call is pending and was handed to the socket. Raises RequestNotSent if that
        could not happen before the deadline, ValueError if the frame cannot be encoded.
        """
        try:
            await wait_within(self._send_loop(call, make_frame, extra), self._remaining(deadline))
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

    async def _send_loop(self, call, make_frame, extra):
        while True:
            conn = await self._wait_ready()
            async with self._wlock:
                if conn.closed or not conn.synced or conn is not self._conn:
                    continue  # lost before we got to write: not sent, wait again
                call.id = self._alloc_id()
                data = make_frame(call.id)
                if extra:
                    data = b"".join([data] + [f(call.id) for f in extra])
                call.conn = conn
                self._pending[call.id] = call
                conn.writer.write(data)
                call.sent = True
                try:
                    await conn.writer.drain()
                except (OSError, RuntimeError):
                    pass  # the reader notices the broken socket and fails the call
                return

    async def _send_frames(self, call, frames):
        """Send follow-up frames (stdin, CANCEL) of a call on the call's own connection."""
        conn = call.conn
        async with self._wlock:
            if conn is None or conn.closed or call.future.done():
                return False
            conn.writer.write(b"".join(frames))
            try:
                await conn.writer.drain()
            except (OSError, RuntimeError):
                return False
        return True

    async def _await_reply(self, call, deadline, what):
        try:
            return await wait_within(asyncio.shield(call.future), self._remaining(deadline))
        except asyncio.TimeoutError:
            self._forget(call, cancel=True)
            raise E.RequestTimeout("no reply to %s from the agent within the timeout" % what) from None
        except asyncio.CancelledError:
            self._forget(call, cancel=True)
            raise

    def _forget(self, call, cancel=False):
        if self._pending.get(call.id) is call:
            del self._pending[call.id]
            if cancel and call.conn is not None and call.sent:
                call.conn.write(m.encode_cancel(call.id))
        if not call.future.done():
            call.future.cancel()

    async def _start_call(self, call, op, args, first, deadline, timeout_message):
        """Send REQUEST ``op`` and wait until ``first`` (set by a non-final event such as exec's
        "started" or a transfer's "ready") or the final reply resolves. On timeout or
        cancellation the call is forgotten and CANCEL sent."""
        await self._send_call(call, lambda id_: m.encode_request(id_, op, args), deadline)
        try:
            await wait_within(asyncio.wait([first, call.future],
                                                return_when=asyncio.FIRST_COMPLETED),
                                   self._remaining(deadline))
        except asyncio.TimeoutError:
            self._forget(call, cancel=True)
            raise E.RequestTimeout(timeout_message) from None
        except asyncio.CancelledError:
            self._forget(call, cancel=True)
            raise

    async def _idempotent_request(self, op, args=None, timeout=None):
        """_request for ops without side effects: when the session was lost under the call (an
        agent restart, or the agent noticing a previous client's disconnect late), retry once on
        the new session instead of failing (lessons: retry only what has no side effects)."""
        deadline = self._deadline(timeout)
        try:
            return await self._request(op, args, timeout)
        except (E.ConnectionLost, E.RequestNotSent, E.NotReady):
            remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if remaining is not None and remaining <= 0:
                raise
            log.debug("%s: session lost under the call; retrying once", op)
            return await self._request(op, args, remaining)

    async def _request(self, op, args=None, timeout=None):
        """Send REQUEST op and return the RESPONSE as a dict (ERROR -> RemoteError)."""
        deadline = self._deadline(timeout)
        call = _Call(op)
        await self._send_call(call, lambda id_: m.encode_request(id_, op, args), deadline)
        payload = await self._await_reply(call, deadline, op)
        try:
            return m.parse_response(payload)
        except ProtocolViolation as exc:
            raise _violation("%s reply" % op, exc) from None

    # --- verbs ------------------------------------------------------------------------------

    async def ping(self, *, timeout=None):
        """Round-trip a ping; returns the round-trip time in seconds."""
        start = time.monotonic()
        reply = await self._idempotent_request("ping", {}, timeout)
        if reply.get("pong") is not True:
            raise E.ProtocolError("malformed ping reply from the agent: no \"pong\": true")
        return time.monotonic() - start

    async def info(self, *, timeout=None):
        """The agent's description of the guest (validated dict, see docs/protocol.md)."""
        reply = await self._idempotent_request("info", {}, timeout)
        try:
            return _parse_info(reply)
        except ProtocolViolation as exc:
            raise _violation("info reply", exc) from None

    async def call(self, op, args=None, /, *, timeout=None, **kwargs):
        """Call a user-defined agent command: ``await vm.call("greet", name="x")`` -> dict.

        Arguments named like a keyword of this method can be passed as a dict positionally.
        """
        if not isinstance(op, str) or not m.OP_RE.match(op):
            raise ValueError("invalid command name %r" % (op,))
        merged = dict(args or {})
        merged.update(kwargs)
        return await self._request(op, merged, timeout)

    async def shutdown(self, *, timeout=None):
        """Ask the guest to power off (the agent answers first)."""
        await self._request("shutdown", {}, timeout)

    async def reboot(self, *, timeout=None):
        """Ask the guest to reboot (the agent answers first)."""
        await self._request("reboot", {}, timeout)

    async def publish(self, topic, data, *, timeout=None):
        """Send a topic message to the guest; returns how many local subscribers got it."""
        try:
            m.check_topic(topic)
        except ProtocolViolation as exc:
            raise ValueError(str(exc)) from None
        if isinstance(data, str):
            data = data.encode("utf-8")
        data = bytes(data)
        if len(data) > m.MAX_MESSAGE_DATA:
            raise ValueError("message of %d bytes exceeds %d" % (len(data), m.MAX_MESSAGE_DATA))
        deadline = self._deadline(timeout)
        call = _Call("publish")
        await self._send_call(call, lambda id_: m.encode_message(topic, data, id=id_), deadline)
        payload = await self._await_reply(call, deadline, "publish")
        try:
            reply = Fields(m.parse_response(payload), "publish reply")
            return reply.int("delivered", min=0, max=MAX_ID)
        except ProtocolViolation as exc:
            raise _violation("publish reply", exc) from None

    def subscribe(self, topic, *, queue_size=None):
        """Receive the guest's messages on ``topic`` (exact match).

        Returns a :class:`Subscription`, registered at once: use ``async for msg in
        vm.subscribe(t)``, ``async with vm.subscribe(t) as sub``, or ``await sub.get()``. Each
        subscription buffers at most ``queue_size`` messages; when full the OLDEST is dropped and
        ``sub.dropped`` counts it. It stays registered until ``sub.close()``, the end of its
        ``async with`` block, or the client's close (breaking out of ``async for`` does not
        unregister it). Messages that arrive while the connection is down are lost.
        """
        try:
            m.check_topic(topic)
        except ProtocolViolation as exc:
            raise ValueError(str(exc)) from None
        sub = Subscription(self, topic, queue_size or self._queue_size)
        if self._state in (Runstate.CLOSED, Runstate.DISCONNECTED):
            sub._finish(self._last_error if self._state is Runstate.DISCONNECTED else None)
        else:
            self._subs[topic].add(sub)
        return sub

    def _unsubscribe(self, sub):
        subs = self._subs.get(sub.topic)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.topic]

    def exec(self, cmd, *, stdin=False, timeout=None, env=None, env_clear=False, cwd=None,
             shell=None, output_limit=DEFAULT_OUTPUT_LIMIT, call_timeout=None):
        """Start a command in the guest with streamed I/O; use as ``async with vm.exec(...) as p``.

        ``cmd``: a list (argv) or a str (shell command line). ``shell=True`` runs a list through the
        shell (joined with shlex), ``shell=False`` splits a str into argv. ``timeout``: the
        command's own time limit (killed by the agent; the result says ``timed_out``).
        ``call_timeout``: limit for the agent to start it (default: the client's timeout).
        Leaving the ``async with`` block before the command finished cancels it remotely.
        """
        return Process(self, cmd, stdin=stdin, timeout=timeout, env=env, env_clear=env_clear,
                       cwd=cwd, shell=shell, output_limit=output_limit, call_timeout=call_timeout)

    async def run(self, cmd, *, check=False, timeout=None, input=None, env=None, cwd=None,
                  shell=None, env_clear=False, output_limit=DEFAULT_OUTPUT_LIMIT,
                  call_timeout=None):
        """Run a command in the guest and collect its output -> :class:`CompletedProcess`.

        ``input`` (bytes or str) is fed to its stdin (otherwise stdin is /dev/null). Output beyond
        ``output_limit`` bytes per stream is dropped and flagged ``stdout_truncated`` /
        ``stderr_truncated``. Raises CommandTimedOut (with the partial output) when ``timeout``
        expired, and CommandFailed on a non-zero status when ``check`` is true.
        """
        if isinstance(input, str):
            input = input.encode("utf-8")
        async with self.exec(cmd, stdin=input is not None, timeout=timeout, env=env,
                             env_clear=env_clear, cwd=cwd, shell=shell, output_limit=output_limit,
                             call_timeout=call_timeout) as proc:
            if input is not None:
                await proc.write(input)
                await proc.close_stdin()
            result = await proc.wait()
        if result.timed_out:
            raise E.CommandTimedOut(result, timeout)
        if check and result.returncode != 0:
            raise E.CommandFailed(result)
        return result

    # --- files (guestlink.host.transfer) ---------------------------------------------------

    async def push(self, local, remote, *, recursive=False, preserve=False, resume=False,
                   checksum="sha256", progress=None, timeout=None):
        """Copy ``local`` (a file, ``-`` for stdin, or a directory with ``recursive``) to the
        guest path ``remote`` over the data channel -> TransferResult. ``progress(done, total)``
        is called in the event loop (total is None for a stream)."""
        from . import transfer
        check_timeout(timeout)
        return await transfer.push(self, str(local), str(remote), recursive=recursive,
                                   preserve=preserve, resume=resume, checksum=checksum,
                                   progress=progress, timeout=timeout)

    async def pull(self, remote, local, *, recursive=False, preserve=False, resume=False,
                   checksum="sha256", progress=None, timeout=None):
        """Copy the guest path ``remote`` to ``local`` (a path, an existing directory, or ``-``
        for stdout) -> TransferResult. Same options as :meth:`push`."""
        from . import transfer
        check_timeout(timeout)
        return await transfer.pull(self, str(remote), str(local), recursive=recursive,
                                   preserve=preserve, resume=resume, checksum=checksum,
                                   progress=progress, timeout=timeout)

    # --- closing --------------------------------------------------------------------------

    async def close(self):
        """Close the connection; pending requests fail, subscriptions end."""
        if self._state is Runstate.CLOSED:
            return
        if self._state is Runstate.IDLE:
            self._state = Runstate.CLOSED
            return
        await self._shutdown()

    async def _shutdown(self):
        self._set_state(Runstate.CLOSED)
        link = getattr(self, "_datalink", None)
        if link is not None:
            link.reset()
        sup, self._supervisor = self._supervisor, None
        if sup is not None and sup is not asyncio.current_task():
            sup.cancel()
        conn = self._conn
        tasks = []
        if conn is not None:
            self._fail_all(conn, E.ConnectionLost("connection lost: the client was closed"),
                           E.RequestNotSent("request not sent: the client was closed"))
            tasks = list(conn.tasks)
            writer = conn.writer
            self._close_conn(conn)
        else:
            writer = None
        for id_, call in list(self._pending.items()):
            del self._pending[id_]
            call.fail(E.RequestNotSent("request not sent: the client was closed"))
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub._finish(None)
        self._subs.clear()
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
        lock, self._vmlock = self._vmlock, None
        if lock is not None:  # after the socket is closed, so the next client finds it free
            lock.release()


def _consume(fut):
    if not fut.cancelled():
        fut.exception()


def _copy_exc(exc):
    """A fresh exception of the same type and message (each failed call gets its own)."""
    try:
        new = type(exc).__new__(type(exc))
        new.__dict__.update(exc.__dict__)
        new.args = exc.args
        return new
    except Exception:  # pragma: no cover
        return exc


def _parse_info(reply):
    f = Fields(reply, "info reply")
    kernel = f.object("kernel")
    addresses = []
    raw = reply.get("addresses") or []
    if not isinstance(raw, list) or len(raw) > m.MAX_LIST:
        raise ProtocolViolation("info reply: field 'addresses' must be a list")
    for item in raw:
        a = Fields(item, "info reply.addresses[]")
        family = a.str("family", max_len=16)
        if family not in ("inet", "inet6"):
            raise ProtocolViolation("info reply: address family must be inet or inet6")
        addresses.append({"interface": a.str("interface", max_len=m.MAX_NAME),
                          "family": family, "address": a.str("address", max_len=m.MAX_NAME)})
    return {
        "hostname": f.str("hostname", max_len=m.MAX_NAME),
        "os_release": f.str_map("os_release", default={}),
        "kernel": {"release": kernel.str("release", default=""),
                   "version": kernel.str("version", default=""),
                   "machine": kernel.str("machine", default="")},
        "uptime": f.number("uptime", default=None, min=0),
        "agent_version": f.str("agent_version", max_len=m.MAX_NAME),
        "protocol": f.int("protocol", min=0, max=0xFFFF),
        "boot_id": f.str("boot_id", default="", max_len=m.MAX_NAME),
        "python": f.str("python", default="", max_len=m.MAX_NAME),
        "addresses": addresses,
        "capabilities": f.str_list("capabilities", default=[], max_items=256, max_len=m.MAX_NAME),
    }


# --- subscriptions ---------------------------------------------------------------------------

class Subscription:
    """Messages from the guest on one topic. See :meth:`Client.subscribe`."""

    def __init__(self, client, topic, maxsize):
        self.topic = topic
        self.maxsize = max(1, int(maxsize))
        self.dropped = 0
        self._client = client
        self._queue = collections.deque()
        self._wakeup = asyncio.Event()
        self._done = False
        self._error = None

    def _deliver(self, msg):
        if self._done:
            return
        if len(self._queue) >= self.maxsize:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(msg)
        self._wakeup.set()

    def _finish(self, error):
        if not self._done:
            self._done = True
            self._error = error
            self._wakeup.set()
        self._client._unsubscribe(self)

    def close(self):
        """Stop receiving; iteration ends after the messages already queued."""
        self._finish(None)

    async def get(self, timeout=None):
        """The next message. Raises the error that ended the connection for good (ConnectionLost,
        ProtocolMismatch; only with reconnect=False or an incompatible agent), EOFError after
        close() or the client's close, asyncio.TimeoutError after ``timeout`` seconds.

        Iterating (``async for``) ends quietly on close instead of raising EOFError."""
        timeout = check_timeout(timeout)
        msg = await wait_within(self._next(), timeout)
        if msg is None:
            raise EOFError("subscription to %r closed" % self.topic)
        return msg

    async def _next(self):
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._done:
                if self._error is not None:
                    raise _copy_exc(self._error)
                return None
            self._wakeup.clear()
            await self._wakeup.wait()

    def __aiter__(self):
        return self

    async def __anext__(self):
        msg = await self._next()
        if msg is None:
            raise StopAsyncIteration
        return msg

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()


# --- exec --------------------------------------------------------------------------------------

def _exec_request(cmd, shell, env, env_clear, cwd, stdin, timeout, output_limit):
    req = {}
    if isinstance(cmd, (bytes, bytearray)):
        raise TypeError("cmd must be a str (shell command line) or a list of str (argv)")
    if isinstance(cmd, str):
        if shell is False:
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
            req["shell"] = " ".join(shlex.quote(a) for a in argv)
        else:
            req["argv"] = argv
    if env:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise TypeError("env must map str to str")
        req["env"] = dict(env)
    if env_clear:
        req["env_clear"] = True
    if cwd is not None:
        req["cwd"] = str(cwd)
    if stdin:
        req["stdin"] = True
    if timeout is not None:
        if check_timeout(timeout) <= 0:
            raise ValueError("timeout must be positive")
        req["timeout"] = timeout
    if output_limit is not None:
        req["output_limit"] = int(output_limit)
    return req


class Process:
    """A command running in the guest; created by :meth:`Client.exec`.

    ``async for stream, data in proc.output()`` yields ("stdout"|"stderr", bytes) as output
    arrives. :meth:`wait` returns the :class:`CompletedProcess`, whose stdout/stderr hold the output
    NOT already consumed through :meth:`output`.
    """

    def __init__(self, client, cmd, *, stdin, timeout, env, env_clear, cwd, shell, output_limit,
                 call_timeout):
        self.args = cmd
        self.pid = None
        self.timeout = timeout
        self._client = client
        self._request = _exec_request(cmd, shell, env, env_clear, cwd, stdin, timeout, output_limit)
        self._stdin = bool(stdin)
        self._stdin_closed = not stdin
        self._limit = output_limit
        self._call_timeout = call_timeout
        self._call = None
        self._started = None
        self._chunks = collections.deque()
        self._wakeup = None
        self._received = {STREAM_STDOUT: 0, STREAM_STDERR: 0}
        self._truncated = {STREAM_STDOUT: False, STREAM_STDERR: False}
        self._eof = {STREAM_STDOUT: False, STREAM_STDERR: False}
        self._result = None
        self._cancelled = False

    @property
    def returncode(self):
        return None if self._result is None else self._result.returncode

    @property
    def done(self):
        return self._call is not None and self._call.future.done()

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, exc_type, exc, tb):
        if self._call is not None and not self._call.future.done():
            try:
                await self.cancel()
            except E.GuestlinkError:
                if exc_type is None:
                    raise

    async def start(self):
        """Send the exec request and wait until the agent started the process (or refused it)."""
        if self._call is not None:
            raise RuntimeError("process already started")
        client = self._client
        loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._started = loop.create_future()
        call = self._call = _Call("exec", self._on_event, self._on_stream)
        call.future.add_done_callback(self._on_done)
        await client._start_call(call, "exec", self._request, self._started,
                                 client._deadline(self._call_timeout),
                                 "the agent did not start the command within the timeout")
        if call.future.done() and call.future.exception() is not None:
            raise call.future.exception()
        return self

    def _on_done(self, fut):
        if self._started is not None and not self._started.done():
            self._started.set_result(None)
        if self._wakeup is not None:
            self._wakeup.set()

    def _fail(self, exc):
        call = self._call
        self._client._fail_call(call.id, exc, cancel=True)
        call.fail(exc)

    def _on_event(self, payload):
        try:
            f = Fields(m.parse_event(payload), "exec event")
            event = f.str("event", max_len=m.MAX_NAME)
            if event == "started":
                pid = f.int("pid", min=0, max=MAX_ID)
                self.pid = pid
                if not self._started.done():
                    self._started.set_result(None)
        except ProtocolViolation as exc:
            self._fail(_violation("exec event", exc))

    def _on_stream(self, flags, payload):
        stream, eof = m.stream_flags(flags)
        if stream not in self._eof:
            self._fail(E.ProtocolError("the agent sent output on stream %d" % stream))
            return
        if self._eof[stream]:
            return  # after EOF: ignore
        if payload:
            limit = self._limit
            room = len(payload) if limit is None else max(0, limit - self._received[stream])
            if room < len(payload):
                self._truncated[stream] = True
                payload = payload[:room]
            if payload:
                self._received[stream] += len(payload)
                self._chunks.append((_STREAM_NAMES[stream], bytes(payload)))
        if eof:
            self._eof[stream] = True
        self._wakeup.set()

    def _output_finished(self):
        return all(self._eof.values()) or self._call.future.done()

    async def output(self):
        """Yield (stream, bytes) as output arrives, until both streams end.

        Raises the request's error (ConnectionLost, ...) if it failed before the output ended."""
        self._check_started()
        while True:
            while self._chunks:
                yield self._chunks.popleft()
            if self._output_finished():
                fut = self._call.future
                if fut.done() and not fut.cancelled() and fut.exception() is not None:
                    if not self._cancelled:
                        raise fut.exception()
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    async def write(self, data):
        """Send bytes to the command's stdin (requires ``stdin=True``)."""
        self._check_started()
        if not self._stdin:
            raise ValueError("the process was started without stdin=True")
        if self._stdin_closed:
            raise ValueError("stdin is closed")
        if isinstance(data, str):
            data = data.encode("utf-8")
        data = memoryview(bytes(data))
        call = self._call
        frames = [m.encode_stream(call.id, STREAM_STDIN, bytes(data[i:i + STREAM_CHUNK]))
                  for i in range(0, len(data), STREAM_CHUNK)]
        if frames:
            await self._send(frames)

    async def close_stdin(self):
        """Send EOF on the command's stdin."""
        self._check_started()
        if self._stdin_closed:
            return
        self._stdin_closed = True
        await self._send([m.encode_stream(self._call.id, STREAM_STDIN, b"", eof=True)])

    async def _send(self, frames):
        call = self._call
        if call.future.done():
            exc = None if call.future.cancelled() else call.future.exception()
            if exc is not None:
                raise exc
            return  # finished: the agent would discard stdin anyway
        await self._client._send_frames(call, frames)

    async def wait(self):
        """Wait for the command to finish -> CompletedProcess (with the output not yet consumed)."""
        self._check_started()
        call = self._call
        client = self._client
        deadline = None
        if self.timeout is not None:
            extra = client.timeout if client.timeout is not None else DEFAULT_TIMEOUT
            deadline = asyncio.get_running_loop().time() + self.timeout + EXEC_KILL_GRACE + extra
        payload = await client._await_reply(call, deadline, "exec")
        if self._result is None:
            self._result = self._parse_result(payload)
        return self._result

    def _parse_result(self, payload):
        try:
            f = Fields(m.parse_response(payload), "exec reply")
            returncode = f.int("returncode", min=-255, max=255)
            signal = f.int("signal", default=None, min=1, max=255)
            timed_out = f.bool("timed_out", default=False)
            so_trunc = f.bool("stdout_truncated", default=False)
            se_trunc = f.bool("stderr_truncated", default=False)
            duration = f.number("duration", default=0.0, min=0)
        except ProtocolViolation as exc:
            raise _violation("exec reply", exc) from None
        if signal is None and returncode < 0:
            signal = -returncode
        out = {STREAM_STDOUT: [], STREAM_STDERR: []}
        for name, data in self._chunks:
            out[STREAM_STDOUT if name == "stdout" else STREAM_STDERR].append(data)
        self._chunks.clear()
        return CompletedProcess(
            args=self.args, returncode=returncode, stdout=b"".join(out[STREAM_STDOUT]),
            stderr=b"".join(out[STREAM_STDERR]), signal=signal, timed_out=timed_out,
            stdout_truncated=so_trunc or self._truncated[STREAM_STDOUT],
            stderr_truncated=se_trunc or self._truncated[STREAM_STDERR],
            duration=float(duration), pid=self.pid)

    async def cancel(self):
        """Cancel the command (the agent kills its process group); waits briefly for the agent."""
        self._check_started()
        call = self._call
        if call.future.done():
            return
        self._cancelled = True
        client = self._client
        sent = await client._send_frames(call, [m.encode_cancel(call.id)])
        if sent:
            try:
                await wait_within(asyncio.shield(call.future),
                                       client.timeout if client.timeout is not None else DEFAULT_TIMEOUT)
            except (E.GuestlinkError, asyncio.TimeoutError):
                pass
        client._forget(call)

    def _check_started(self):
        if self._call is None:
            raise RuntimeError("the process was not started: use 'async with vm.exec(...)'")
