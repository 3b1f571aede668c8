"""The control master: one asyncio process per user holding the agent sessions of many VMs and
serving any number of local clients over its own unix socket (``guestlink master serve``; in the
spirit of OpenSSH's ControlMaster/ControlPersist). docs/master.md describes it for users.

* Listening: :mod:`.mastersock` says where. The master holds ``master.sock.lock`` (flock) for its
  lifetime: whoever holds it may remove a leftover socket (a SIGKILLed master's) and bind a new
  one, so a stale socket never blocks the next start, and two masters never run at once. The
  socket is bound under umask 0177 (0600; 0660 and group ``--group`` when asked) in the private
  directory, and every accepted connection's SO_PEERCRED uid must be ours (or root's, as
  OpenSSH's mux; with ``--group``, a member of that group) — anyone else gets an ERROR and EOF.
* One :class:`_VM` per VM (keyed by its control socket path; a libvirt domain is resolved once
  and cached): one :class:`~guestlink.host.session.Session` to its agent (reconnecting, the VM
  lock held like any client), the peers attached to it, and an idle timer.
* One :class:`_Peer` per client connection. After the attach exchange the peer speaks the agent
  protocol: its SYNC is answered with SYNC_ACK (the agent's description, the peer's nonce) once
  the VM's session is synchronised; each REQUEST (or acknowledged MESSAGE) becomes a relayed
  :class:`~guestlink.host.session.Call` on the VM's session under a new id, its EVENT, STREAM
  and final frames go back under the peer's id; STREAM (stdin) and CANCEL follow the call. When
  the agent restarts, every peer gets a HELLO (so its calls fail with ConnectionLost exactly as
  on a direct connection, and it re-synchronises); when the VM's socket closes, every peer's
  connection is closed. The guest's topic messages go to every synchronised peer that asked for
  them (peers filter by topic themselves, as the library always did).
* A peer that goes away has its calls in flight cancelled in the guest (CANCEL: an exec's
  process group is killed). A peer that cannot keep up (MAX_PEER_BUFFER unread) is dropped.
* A VM without peers is closed after the persist time; the master with no VM and no peer exits
  after the persist time. SIGTERM/SIGINT only set the stop flag; the serve loop closes the
  listener, the peers and every session, then removes its socket and releases the lock.
"""

import asyncio
import fcntl
import grp
import logging
import os
import pwd
import signal
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from ..protocol import ProtocolViolation, codes
from ..protocol import messages as m
from ..protocol.frames import MAX_PAYLOAD, Frame, FrameDecoder, FrameType, encode_frame
from ..protocol.safetext import printable
from . import errors as E
from . import mastersock as MS
from .options import ConnectOptions
from .session import Call, Payload, Resolver, Runstate, Session
from .timing import wait_within

log = logging.getLogger("guestlink.master")

#: Bytes queued to a peer that does not read before it is dropped.
MAX_PEER_BUFFER = 128 << 20
#: Seconds a new connection may take to send its first request.
FIRST_REQUEST_TIMEOUT = 10.0
#: Bytes a first request (attach) may take.
MAX_FIRST_REQUEST = 64 << 10
#: Most VMs, peers, and calls in flight per peer one master holds (bounds on what a local client
#: can make it hold).
MAX_VMS = 4096
MAX_PEERS = 16384
MAX_CALLS = 65536
#: Default timeout of a VM's session (the handshake; relayed calls carry the client's own).
SESSION_TIMEOUT = 10.0


class _VM:
    """One VM's agent session and the peers attached to it."""

    def __init__(self, master: "Master", ctl: str, data: Optional[str],
                 domain: Optional[Tuple[str, Optional[str], Optional[str], Optional[str]]],
                 resolver: Optional[Resolver], timeout: Optional[float],
                 queue_timeout: Optional[float]) -> None:
        self.master = master
        self.ctl = ctl
        self.domain = domain
        self.peers: Set["_Peer"] = set()
        self.idle: Optional[asyncio.TimerHandle] = None
        self.last_used = time.monotonic()
        self.closed = False
        #: who held the VM when this session had to queue for it (a direct client)
        self.holder: Optional[str] = None
        self.session = Session(
            ConnectOptions(ctl=ctl, data=data, timeout=timeout or SESSION_TIMEOUT, reconnect=True,
                           queue_timeout=queue_timeout, master=False, on_queue=self._queued),
            resolver, on_message=self._message, on_gone=self._gone, on_lost=self._lost)
        self.opening: "asyncio.Task[None]" = asyncio.get_running_loop().create_task(
            self.session.open())
        self.opening.add_done_callback(self._opened)

    @property
    def data(self) -> Optional[str]:
        return self.session.data

    def _queued(self, holder: str) -> None:
        self.holder = holder

    def _opened(self, task: "asyncio.Task[None]") -> None:
        if task.cancelled() or task.exception() is not None:
            self.closed = True  # the session closed itself; its attachers report why
            self.master.drop_vm(self)

    def _message(self, topic: str, data: bytes) -> None:
        frame = m.encode_message(topic, data)
        for peer in list(self.peers):
            if peer.messages and peer.synced:
                peer.send(frame)

    def _lost(self, restarted: bool) -> None:
        """The agent restarted (HELLO to every peer) or the socket closed (drop every peer)."""
        agent = self.session.agent
        hello = m.encode_hello(dict(agent) if agent is not None else {})
        for peer in list(self.peers):
            if restarted:
                peer.restart(hello)
            else:
                peer.close()

    def _gone(self, error: Optional[BaseException]) -> None:
        if not self.opening.done():
            return  # the open failed: each attaching peer gets its error (_first_request)
        for peer in list(self.peers):
            peer.close()
        self.master.drop_vm(self)

    def attach(self, peer: "_Peer") -> None:
        self.peers.add(peer)
        self.last_used = time.monotonic()
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None

    def detach(self, peer: "_Peer") -> None:
        self.peers.discard(peer)
        self.last_used = time.monotonic()
        if not self.peers and not self.closed and self.idle is None:
            self.idle = asyncio.get_running_loop().call_later(self.master.persist, self._expire)

    def _expire(self) -> None:
        self.idle = None
        if not self.peers:
            log.info("closing the idle session of %s", printable(self.ctl))
            self.master.drop_vm(self)

    async def close(self) -> None:
        self.closed = True
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        for peer in list(self.peers):
            peer.close()
        if not self.opening.done():
            self.opening.cancel()
        await self.session.close()

    def describe(self) -> Dict[str, Any]:
        agent = self.session.agent
        return {"ctl": self.ctl, "data": self.session.data,
                "domain": self.domain[0] if self.domain else None,
                "uri": self.domain[1] if self.domain else None,
                "state": self.session.runstate.value, "clients": len(self.peers),
                "hostname": agent.hostname if agent is not None else None,
                "agent_version": agent.version if agent is not None else None,
                "idle": round(time.monotonic() - self.last_used, 3) if not self.peers else 0.0}


class _Peer:
    """One client connection to the master."""

    def __init__(self, master: "Master", writer: asyncio.StreamWriter, pid: int, uid: int) -> None:
        self.master = master
        self.writer = writer
        self.pid = pid
        self.uid = uid
        self.vm: Optional[_VM] = None
        self.messages = True
        self.nonce: Optional[str] = None
        self.synced = False
        self.calls: Dict[int, Call] = {}
        self.acking: Optional["asyncio.Task[None]"] = None
        self.closed = False

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        transport = self.writer.transport
        if transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > MAX_PEER_BUFFER:
            log.warning("dropping client pid %d: it does not read what it asked for", self.pid)
            self.close()

    def close(self) -> None:
        """Close the connection (the serve task then forgets the peer's calls)."""
        if not self.closed:
            self.closed = True
            self.writer.transport.abort()

    def restart(self, hello: bytes) -> None:
        """The agent restarted: the peer's calls are lost (the VM's session failed them); tell
        the peer as the agent would, with a HELLO."""
        self.synced = False
        self.send(hello)

    # --- the agent protocol, relayed ----------------------------------------------------------

    def forget_calls(self) -> None:
        vm = self.vm
        calls, self.calls = self.calls, {}
        for call in calls.values():
            if vm is not None:
                vm.session.forget(call, cancel=True)
            elif not call.future.done():
                call.future.cancel()

    def on_sync(self, payload: bytes) -> None:
        try:
            nonce, protocol = m.parse_sync(payload)
        except ProtocolViolation:
            return
        if protocol != m.PROTOCOL_VERSION:
            self.send(m.encode_error(0, codes.PROTOCOL_MISMATCH, "the guestlink master speaks "
                                     "protocol %d, not %d" % (m.PROTOCOL_VERSION, protocol),
                                     {"nonce": nonce, "protocol": m.PROTOCOL_VERSION}))
            return
        if nonce != self.nonce:
            self.forget_calls()  # a new session of the peer: the old one's calls are over
            self.nonce = nonce
            self.synced = False
        vm = self.vm
        assert vm is not None
        agent = vm.session.agent
        if vm.session.runstate is Runstate.RUNNING and agent is not None:
            self.synced = True  # at once: the peer's next frames are requests
            self.send(m.encode_sync_ack(nonce, dict(agent)))
        elif self.acking is None or self.acking.done():
            self.acking = asyncio.get_running_loop().create_task(self._ack())

    async def _ack(self) -> None:
        vm = self.vm
        assert vm is not None
        try:
            await vm.session.wait_ready()
        except E.GuestlinkError:
            self.close()
            return
        agent = vm.session.agent
        if self.nonce is None or agent is None:
            return
        self.synced = True
        self.send(m.encode_sync_ack(self.nonce, dict(agent)))

    async def on_call(self, frame: Frame) -> None:
        """A REQUEST or an acknowledged MESSAGE: relay it under a new id."""
        cid = frame.id
        vm = self.vm
        assert vm is not None
        if not cid:
            return
        if not self.synced:
            self.send(m.encode_error(cid, codes.NOT_READY, "not synchronised with the master"))
            return
        if cid in self.calls:
            self.send(m.encode_error(cid, codes.BAD_REQUEST, "request id %d is already in flight"
                                     % cid))
            return
        if len(self.calls) >= MAX_CALLS:
            self.send(m.encode_error(cid, codes.BUSY, "more than %d requests in flight" % MAX_CALLS))
            return
        send = self.send

        def on_event(payload: Payload) -> None:
            send(encode_frame(FrameType.EVENT, payload, id=cid))

        def on_stream(flags: int, payload: Payload) -> None:
            send(encode_frame(FrameType.STREAM, payload, flags, cid))

        call = Call("relayed", on_event, on_stream)
        self.calls[cid] = call
        call.future.add_done_callback(lambda fut: self._finished(cid, call, fut))
        type_, flags, payload = frame.type, frame.flags, frame.payload
        try:
            await vm.session.send_call(
                call, lambda id_: encode_frame(type_, payload, flags, id_), None)
        except E.GuestlinkError:
            if self.calls.get(cid) is call:
                del self.calls[cid]
                self.send(m.encode_error(cid, codes.NOT_READY, "the VM's session is gone"))

    def _finished(self, cid: int, call: Call, fut: "asyncio.Future[Any]") -> None:
        if self.calls.get(cid) is call:
            del self.calls[cid]
        if fut.cancelled():
            return  # forgotten: the peer cancelled it or went away
        exc = fut.exception()
        if exc is None:
            self.send(encode_frame(FrameType.RESPONSE, fut.result(), id=cid))
        elif isinstance(exc, (E.ConnectionLost, E.RequestNotSent)):
            return  # the session was lost under it: the peer hears HELLO or EOF instead
        elif isinstance(exc, (E.RemoteError, E.ProtocolMismatch)):
            self.send(m.encode_error(cid, exc.code or codes.INTERNAL,
                                     getattr(exc, "message", str(exc)), exc.details))
        else:
            self.send(m.encode_error(cid, codes.INTERNAL, "relayed by the guestlink master: %s"
                                     % exc))

    async def on_follow_up(self, frame: Frame) -> None:
        """STREAM (stdin) or CANCEL of one of the peer's calls."""
        call = self.calls.get(frame.id)
        vm = self.vm
        if call is None or vm is None or not call.sent:
            return
        if frame.type == FrameType.CANCEL:
            data = m.encode_cancel(call.id)  # the final reply still comes back to the peer
        else:
            data = encode_frame(FrameType.STREAM, frame.payload, frame.flags, call.id)
        await vm.session.send_frames(call, [data])


class Master:
    """The master process's state; :meth:`serve` runs it until stopped or idle."""

    def __init__(self, persist: float = MS.DEFAULT_PERSIST, path: Optional[str] = None,
                 group: Optional[str] = None) -> None:
        if persist <= 0:
            raise ValueError("the master's persist time must be positive")
        self.persist = persist
        self.group = group
        self.gid: Optional[int] = None
        self.members: Set[int] = set()
        if group is not None:
            try:
                g = grp.getgrnam(group) if not group.isdigit() else grp.getgrgid(int(group))
            except KeyError:
                raise ValueError("no such group: %r" % group) from None
            self.gid = g.gr_gid
            for name in g.gr_mem:
                try:
                    self.members.add(pwd.getpwnam(name).pw_uid)
                except KeyError:
                    pass
        self.path = path or (os.environ.get(MS.SOCKET_ENV)
                             or os.path.join(MS.private_dir(group is not None), "master.sock"))
        self.vms: Dict[str, _VM] = {}
        self.domains: Dict[Tuple[str, Optional[str], Optional[str], Optional[str]],
                           Tuple[str, Optional[str]]] = {}
        self.peers: Set[_Peer] = set()
        self.started = time.time()
        self._stop: Optional[asyncio.Event] = None
        self._activity: Optional[asyncio.Event] = None
        self._lock_fd: Optional[int] = None
        self._closing: List["asyncio.Task[None]"] = []

    # --- lifecycle -----------------------------------------------------------------------------

    def take_lock(self) -> bool:
        """Take the master lock -> False if another master holds it."""
        fd = os.open(MS.lock_path(self.path), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self._lock_fd = fd
        return True

    def holder(self) -> Optional[int]:
        try:
            fd = os.open(MS.lock_path(self.path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            text = os.read(fd, 32).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        return int(text) if text.isdigit() else None

    def bind(self) -> socket.socket:
        """Bind the listening socket (the lock is held: whatever is at the path is stale)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            import stat as _stat
            if not (_stat.S_ISSOCK(st.st_mode) or _stat.S_ISLNK(st.st_mode)):
                raise OSError("refusing to replace %s: not a socket" % self.path)
            os.unlink(self.path)  # a SIGKILLed master's socket (unlink never follows a link)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
        if self.gid is not None:
            os.chown(self.path, -1, self.gid)
            os.chmod(self.path, 0o660)
            os.chown(os.path.dirname(self.path), -1, self.gid)
        sock.listen(512)
        sock.setblocking(False)
        return sock

    def request_stop(self) -> None:
        """Ask the serve loop to stop (signal handlers call this: it only sets a flag)."""
        if self._stop is not None:
            self._stop.set()

    async def serve(self, on_ready: Optional[Callable[[], None]] = None) -> None:
        """Listen until stopped (SIGTERM, ``master stop``) or idle for the persist time."""
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._activity = asyncio.Event()
        listener = self.bind()
        server = await asyncio.start_unix_server(self._serve_peer, sock=listener,
                                                 limit=MAX_PAYLOAD + 64)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        log.info("guestlink master pid %d listening on %s (persist %g s)", os.getpid(),
                 printable(self.path), self.persist)
        if on_ready is not None:
            on_ready()
        try:
            await self._run_until_stopped()
        finally:
            server.close()
            for peer in list(self.peers):
                peer.close()
            for vm in list(self.vms.values()):
                self.drop_vm(vm)
            if self._closing:
                await asyncio.gather(*self._closing, return_exceptions=True)
            try:
                os.unlink(self.path)
            except OSError:
                pass
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                try:
                    loop.remove_signal_handler(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    async def _run_until_stopped(self) -> None:
        """Until the stop flag, or no client for the persist time (no periodic wakeups)."""
        assert self._stop is not None and self._activity is not None
        stop, activity = self._stop, self._activity
        while not stop.is_set():
            activity.clear()
            try:
                await wait_within(_first(stop, activity), None if self.peers else self.persist)
            except asyncio.TimeoutError:
                if not self.peers:
                    log.info("guestlink master without clients for %g s: exiting", self.persist)
                    return

    def _changed(self) -> None:
        if self._activity is not None:
            self._activity.set()

    # --- VMs -----------------------------------------------------------------------------------

    async def find_vm(self, args: m.Fields, timeout: Optional[float],
                      queue_timeout: Optional[float]) -> _VM:
        vm_args = args.object("vm")
        domain = vm_args.str("domain", default=None, max_len=m.MAX_NAME)
        resolver: Optional[Resolver] = None
        key: Optional[Tuple[str, Optional[str], Optional[str], Optional[str]]] = None
        if domain:
            key = (domain, vm_args.str("uri", default=None, max_len=m.MAX_NAME),
                   vm_args.str("ctl_name", default=None, max_len=m.MAX_NAME),
                   vm_args.str("data_name", default=None, max_len=m.MAX_NAME))
            from ..libvirt import resolver as libvirt_resolver

            lookup = libvirt_resolver(*key)
            cached = self.domains.get(key)
            if cached is None or cached[0] not in self.vms:
                loop = asyncio.get_running_loop()
                cached = await loop.run_in_executor(None, lookup)
                self.domains[key] = cached
            ctl, data = cached
            resolver = self._caching(key, lookup)
        else:
            ctl = vm_args.str("ctl", max_len=4096)
            data = vm_args.str("data", default=None, max_len=4096)
            if not os.path.isabs(ctl) or (data is not None and not os.path.isabs(data)):
                raise ValueError("socket paths must be absolute")
        vm = self.vms.get(ctl)
        if vm is None or vm.closed:
            if len(self.vms) >= MAX_VMS:
                raise E.ConnectError("the guestlink master already serves %d VMs" % MAX_VMS)
            vm = _VM(self, ctl, data, key, resolver, timeout, queue_timeout)
            self.vms[ctl] = vm
            self._changed()
        return vm

    def _caching(self, key: Tuple[str, Optional[str], Optional[str], Optional[str]],
                 lookup: Resolver) -> Resolver:
        """The VM session's resolver (called in a thread before each reconnection): the domain
        may have restarted with new socket paths; the cache and the VM's key follow them."""
        loop = asyncio.get_running_loop()

        def resolve() -> Tuple[Optional[str], Optional[str]]:
            ctl, data = lookup()
            if ctl is not None:
                loop.call_soon_threadsafe(self._moved, key, ctl, data)
            return ctl, data
        return resolve

    def _moved(self, key: Tuple[str, Optional[str], Optional[str], Optional[str]], ctl: str,
               data: Optional[str]) -> None:
        self.domains[key] = (ctl, data)
        for old, vm in list(self.vms.items()):
            if vm.domain == key and old != ctl and ctl not in self.vms:
                del self.vms[old]
                vm.ctl = ctl
                self.vms[ctl] = vm

    def drop_vm(self, vm: _VM) -> None:
        if self.vms.get(vm.ctl) is vm:
            del self.vms[vm.ctl]
        if not vm.closed:
            task = asyncio.get_running_loop().create_task(vm.close())
            self._closing.append(task)
            task.add_done_callback(self._closing.remove)
        self._changed()

    # --- peers ---------------------------------------------------------------------------------

    def _allowed(self, uid: int, gid: int) -> bool:
        if uid in (os.getuid(), 0):
            return True
        return self.gid is not None and (gid == self.gid or uid in self.members)

    @staticmethod
    async def _close_refused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """End a refused client's connection after the ERROR written to it. Closing with its
        request still unread would reset the connection, and the client would see "connection
        reset" instead of the error: so half-close, then read (bounded: 64 KiB, 2 s) until the
        client closes."""
        try:
            await writer.drain()
            writer.write_eof()
            left = 64 * 1024
            deadline = time.monotonic() + 2.0
            while left > 0:
                chunk = await wait_within(reader.read(left), max(0.0, deadline - time.monotonic()))
                if not chunk:
                    break
                left -= len(chunk)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.transport.close()

    async def _serve_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            pid, uid, gid = MS.peer_creds(sock)
        except OSError:
            writer.transport.abort()
            return
        if not self._allowed(uid, gid) or len(self.peers) >= MAX_PEERS:
            log.warning("refusing a client of uid %d (pid %d)", uid, pid)
            writer.write(m.encode_error(0, MS.MASTER_ERROR, "this guestlink master serves its "
                                        "own user only", {"type": "PermissionDenied",
                                                          "module": E.__name__}))
            await self._close_refused(reader, writer)
            return
        peer = _Peer(self, writer, pid, uid)
        self.peers.add(peer)
        self._changed()
        try:
            await self._peer_session(peer, reader)
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # gone, or the master is stopping
        finally:
            peer.forget_calls()
            if peer.acking is not None:
                peer.acking.cancel()
            peer.close()
            self.peers.discard(peer)
            if peer.vm is not None:
                peer.vm.detach(peer)
            self._changed()

    async def _peer_session(self, peer: _Peer, reader: asyncio.StreamReader) -> None:
        decoder = FrameDecoder(MAX_PAYLOAD)
        first = await self._first_frame(reader, decoder)
        if first is None:
            return
        if not await self._first_request(peer, first):
            return
        while not peer.closed:
            data = await reader.read(1 << 18)
            if not data:
                return
            for ev in decoder.feed(data):
                if not isinstance(ev, Frame) or peer.closed:
                    continue
                t = ev.type
                if t == FrameType.SYNC:
                    peer.on_sync(ev.payload)
                elif t == FrameType.REQUEST or (t == FrameType.MESSAGE and ev.id):
                    await peer.on_call(ev)
                elif t in (FrameType.STREAM, FrameType.CANCEL):
                    await peer.on_follow_up(ev)

    async def _first_frame(self, reader: asyncio.StreamReader,
                           decoder: FrameDecoder) -> Optional[Frame]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FIRST_REQUEST_TIMEOUT
        received = 0
        while True:
            try:
                data = await wait_within(reader.read(65536), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return None
            if not data:
                return None
            received += len(data)
            for ev in decoder.feed(data):
                if isinstance(ev, Frame):
                    return ev
            if received > MAX_FIRST_REQUEST:
                return None

    async def _first_request(self, peer: _Peer, frame: Frame) -> bool:
        """Attach (-> True: the agent protocol follows), or answer status/stop (-> False)."""
        if frame.type != FrameType.REQUEST or frame.id != MS.FIRST_ID:
            return False
        try:
            op, args = m.parse_request(frame.payload)
            if op == MS.OP_STATUS:
                peer.send(m.encode_response(frame.id, self.status()))
                return False
            if op == MS.OP_STOP:
                peer.send(m.encode_response(frame.id, await self.stop(args)))
                return False
            if op != MS.OP_ATTACH:
                raise ProtocolViolation("unknown master request %r" % op)
            timeout = args.number("timeout", default=None, min=0, max=86400)
            queue_timeout = args.number("queue_timeout", default=None, min=0, max=86400)
            peer.messages = bool(args.bool("messages", default=True))
            vm = await self.find_vm(args, timeout, queue_timeout)
            vm.attach(peer)
            peer.vm = vm
            await wait_within(asyncio.shield(vm.opening), timeout)
            peer.send(m.encode_response(frame.id, {"ctl": vm.ctl, "data": vm.data}))
            return True
        except asyncio.TimeoutError:
            held = peer.vm
            exc: BaseException = E.AgentNotResponding(
                "the guest agent did not answer on %s within the timeout (is the agent running "
                "in the guest?)" % (held.ctl if held else "?"))
            if (held is not None and held.holder is not None
                    and held.session.runstate is Runstate.CONNECTING):
                exc = E.VMInUse("%s is in use by %s (a client without the guestlink master); the "
                                "master is waiting for it" % (held.ctl, printable(held.holder)),
                                held.ctl)
        except (ProtocolViolation, ValueError) as err:
            exc = E.ConnectError("bad request to the guestlink master: %s" % err)
        except E.GuestlinkError as err:
            exc = err
        peer.send(m.encode_error(frame.id, *MS.error_to_wire(exc)))
        return False

    # --- status and stop -----------------------------------------------------------------------

    def status(self) -> Dict[str, Any]:
        return {"pid": os.getpid(), "uid": os.getuid(), "socket": self.path,
                "uptime": round(time.time() - self.started, 3), "persist": self.persist,
                "clients": sum(1 for peer in self.peers if peer.vm is not None),
                "vms": [vm.describe() for vm in list(self.vms.values())]}

    async def stop(self, args: m.Fields) -> Dict[str, Any]:
        which = args.str("vm", default=None, max_len=4096)
        if which is None:
            self.request_stop()
            return {"stopping": True, "pid": os.getpid()}
        stopped = []
        for vm in list(self.vms.values()):
            if which in (vm.ctl, vm.domain[0] if vm.domain else None):
                stopped.append(vm.ctl)
                self.drop_vm(vm)
        return {"stopped": stopped}


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
