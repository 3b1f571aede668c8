"""The agent's local unix socket: guest programs send topic messages to the host and subscribe
to the host's messages, with the same frames as the control port (no handshake).

Everything is bounded: at most MAX_CLIENTS connections; each client's outbound queue is capped
and a subscriber that does not read is disconnected (with a log line) instead of growing it.
"""
import errno
import logging
import os
import socket
import stat
from typing import TYPE_CHECKING, Dict, Optional, Set

from ..protocol import CorruptFrame, Frame, FrameDecoder, FrameType, Garbage, codes, frame_type_name
from ..protocol import messages as m
from .loop import ByteQueue

if TYPE_CHECKING:  # the server owns this module's LocalServer
    from .server import Agent

log = logging.getLogger("guestlink.agent")

MAX_CLIENTS = 64
CLIENT_QUEUE_MAX = 1 << 20
MAX_SUBSCRIPTIONS = 256
CLIENT_MAX_PAYLOAD = m.MAX_MESSAGE_DATA + 1 + m.MAX_TOPIC + 64


class LocalSocketError(Exception):
    pass


class LocalClient:
    def __init__(self, server: "LocalServer", sock: socket.socket, number: int) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.number = number
        self.decoder = FrameDecoder(max_payload=CLIENT_MAX_PAYLOAD)
        self.outq = ByteQueue()
        self.topics: Set[str] = set()
        self.closed = False

    def __str__(self) -> str:
        return "local client #%d" % self.number

    def send(self, frame_bytes: bytes) -> bool:
        if self.closed:
            return False
        if self.outq.size + len(frame_bytes) > CLIENT_QUEUE_MAX:
            log.warning("%s does not read its messages (%d bytes queued); disconnecting it",
                        self, self.outq.size)
            self.close()
            return False
        self.outq.push(frame_bytes)
        self.flush()
        return not self.closed

    def flush(self, mask: Optional[int] = None) -> None:
        if self.closed:
            return
        try:
            self.outq.write_to(self.sock.sendmsg)
        except BlockingIOError:
            pass
        except OSError as exc:
            log.debug("%s: write failed: %s", self, exc)
            self.close()
            return
        self._update_interest()

    def _update_interest(self) -> None:
        agent = self.server.agent
        events = agent.EV_READ | (agent.EV_WRITE if self.outq.size else 0)
        agent.set_interest(self.fd, events, self._on_event)

    def _on_event(self, mask: int) -> None:
        agent = self.server.agent
        if mask & agent.EV_WRITE:
            self.flush()
        if mask & agent.EV_READ and not self.closed:
            self._on_readable()

    def _on_readable(self) -> None:
        buf = self.server.agent.read_buf
        try:
            n = self.sock.recv_into(buf)
        except BlockingIOError:
            return
        except OSError as exc:
            log.debug("%s: read failed: %s", self, exc)
            n = 0
        if n == 0:
            self.close()
            return
        for ev in self.decoder.feed(memoryview(buf)[:n]):
            if self.closed:
                return
            if isinstance(ev, Frame):
                try:
                    self._on_frame(ev)
                except Exception:
                    log.exception("%s: unexpected error handling %r", self, ev)
                    if ev.id:
                        self.send(m.encode_error(ev.id, codes.INTERNAL, "internal error in the agent"))
            elif isinstance(ev, Garbage):
                log.debug("%s: skipped %d bytes of garbage", self, ev.nbytes)
            elif isinstance(ev, CorruptFrame):
                log.debug("%s: %r", self, ev)
                if ev.id:
                    self.send(m.encode_error(ev.id, codes.TOO_LARGE if ev.reason == "too_large"
                                             else codes.BAD_REQUEST, "frame was corrupt (%s)" % ev.reason))

    def _on_frame(self, frame: Frame) -> None:
        agent = self.server.agent
        if frame.type == FrameType.MESSAGE:
            try:
                topic, data = m.parse_message(frame.payload)
            except m.ProtocolViolation as exc:
                if frame.id:
                    self.send(m.encode_error(frame.id, exc.code, str(exc)))
                return
            code, message = agent.message_to_host(topic, data)
            if frame.id:
                if code is None:
                    self.send(m.encode_response(frame.id, {}))
                else:
                    self.send(m.encode_error(frame.id, code, message or ""))
        elif frame.type == FrameType.REQUEST:
            if not frame.id:
                return
            try:
                op, args = m.parse_request(frame.payload)
                if op in ("subscribe", "unsubscribe"):
                    topics = [m.check_topic(t) for t in args.str_list("topics", max_items=MAX_SUBSCRIPTIONS)]
                    if op == "subscribe":
                        if len(self.topics | set(topics)) > MAX_SUBSCRIPTIONS:
                            raise m.ProtocolViolation("at most %d subscriptions per client"
                                                      % MAX_SUBSCRIPTIONS, codes.TOO_LARGE)
                        self.topics.update(topics)
                    else:
                        self.topics.difference_update(topics)
                    log.debug("%s: subscriptions now %s", self, sorted(self.topics))
                    self.send(m.encode_response(frame.id, {}))
                elif op == "ping":
                    self.send(m.encode_response(frame.id, {"pong": True, "host_connected":
                                                           agent.session is not None}))
                else:
                    self.send(m.encode_error(frame.id, codes.UNKNOWN_COMMAND,
                                             "the local socket has no command %r (it knows subscribe, "
                                             "unsubscribe, ping)" % op))
            except m.ProtocolViolation as exc:
                self.send(m.encode_error(frame.id, exc.code, str(exc)))
        else:
            log.debug("%s: ignoring %s frame", self, frame_type_name(frame.type))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.agent.set_interest(self.fd, 0)
        self.outq.clear()
        try:
            self.sock.close()
        except OSError:
            pass
        self.server.clients.pop(self.fd, None)
        log.debug("%s disconnected", self)


class LocalServer:
    def __init__(self, agent: "Agent", path: str) -> None:
        self.agent = agent
        self.path = path
        self.sock: Optional[socket.socket] = None
        self.clients: Dict[int, LocalClient] = {}
        self._count = 0
        self._inode: Optional[int] = None

    def open(self) -> None:
        path = self.path
        directory = os.path.dirname(path)
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise LocalSocketError("cannot create %s: %s" % (directory, exc.strerror or exc))
        if os.path.lexists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1.0)
                probe.connect(path)
            except OSError:
                try:
                    os.unlink(path)  # stale socket from an earlier agent
                except OSError as exc:
                    raise LocalSocketError("cannot remove stale %s: %s" % (path, exc.strerror))
            else:
                raise LocalSocketError("%s is in use: another guestlink-agent is running" % path)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o117)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            os.chmod(path, 0o660)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise LocalSocketError("cannot listen on %s: %s" % (path, exc.strerror or exc))
        sock.setblocking(False)
        self.sock = sock
        self._inode = os.stat(path).st_ino
        self.agent.set_interest(sock.fileno(), self.agent.EV_READ, self._on_accept)
        log.info("local socket %s", path)

    def _on_accept(self, mask: int) -> None:
        if self.sock is None:
            return
        for _ in range(16):
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.warning("local socket: cannot accept: %s", exc.strerror)
                return
            if len(self.clients) >= MAX_CLIENTS:
                log.warning("local socket: refusing a client: already %d connected", MAX_CLIENTS)
                sock.close()
                continue
            sock.setblocking(False)
            self._count += 1
            client = LocalClient(self, sock, self._count)
            self.clients[client.fd] = client
            client._update_interest()
            log.debug("%s connected", client)

    def publish(self, topic: str, data: bytes) -> int:
        """Deliver a host message to every subscriber of ``topic``; returns how many got it."""
        frame = m.encode_message(topic, data)
        delivered = 0
        for client in list(self.clients.values()):
            if topic in client.topics and client.send(frame):
                delivered += 1
        return delivered

    def close(self) -> None:
        for client in list(self.clients.values()):
            client.close()
        if self.sock is not None:
            self.agent.set_interest(self.sock.fileno(), 0)
            self.sock.close()
            self.sock = None
            try:
                if os.stat(self.path).st_ino == self._inode and stat.S_ISSOCK(os.stat(self.path).st_mode):
                    os.unlink(self.path)
            except OSError:
                pass
