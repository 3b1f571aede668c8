"""Blocking client of the agent's local socket, used by ``guestlink-agent send`` and ``listen``
(and usable from guest programs: ``from guestlink.agent.client import AgentClient``)."""
import errno
import socket
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from ..protocol import Frame, FrameDecoder, FrameType
from ..protocol import messages as m


class ClientError(Exception):
    """``exit_code`` says what went wrong (see cli.py)."""

    def __init__(self, message: str, exit_code: int = 1, code: Optional[str] = None) -> None:
        Exception.__init__(self, message)
        self.exit_code = exit_code
        self.code = code


EXIT_ERROR = 1
EXIT_NO_AGENT = 2
EXIT_NO_HOST = 3


class AgentClient:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.sock: Optional[socket.socket] = None
        self.decoder = FrameDecoder()
        self._next_id = 0
        self._pending: List[Frame] = []  # frames received while waiting for something else

    def connect(self) -> "AgentClient":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
                raise ClientError("cannot connect to %s: %s (is guestlink-agent running?)"
                                  % (self.path, exc.strerror), EXIT_NO_AGENT)
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise ClientError("cannot connect to %s: %s (the socket is mode 0660: run as root "
                                  "or as a member of its group)" % (self.path, exc.strerror), EXIT_NO_AGENT)
            raise ClientError("cannot connect to %s: %s" % (self.path, exc.strerror or exc), EXIT_NO_AGENT)
        self.sock = sock
        return self

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "AgentClient":
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _connected(self) -> socket.socket:
        if self.sock is None:
            raise ClientError("not connected to the agent")
        return self.sock

    def _recv_frame(self, timeout: Optional[float]) -> Optional[Frame]:
        """Next frame, or None on timeout. Raises ClientError when the agent closes the socket."""
        if self._pending:
            return self._pending.pop(0)
        sock = self._connected()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                sock.settimeout(left)
            else:
                sock.settimeout(None)
            try:
                data = sock.recv(65536)
            except socket.timeout:
                return None
            except OSError as exc:
                raise ClientError("connection to the agent failed: %s" % (exc.strerror or exc))
            if not data:
                raise ClientError("the agent closed the connection")
            frames = [ev for ev in self.decoder.feed(data) if isinstance(ev, Frame)]
            if frames:
                self._pending.extend(frames[1:])
                return frames[0]

    def _call(self, frame_bytes: bytes, rid: int) -> Dict[str, Any]:
        self._connected().sendall(frame_bytes)
        deadline = time.monotonic() + self.timeout
        while True:
            frame = self._recv_frame(max(0.0, deadline - time.monotonic()))
            if frame is None:
                raise ClientError("the agent did not answer within %g s" % self.timeout)
            if frame.id != rid:
                if frame.type == FrameType.MESSAGE:
                    self._pending.append(frame)
                continue
            if frame.type == FrameType.RESPONSE:
                return m.parse_response(frame.payload)
            if frame.type == FrameType.ERROR:
                code, message, _ = m.parse_error(frame.payload)
                raise ClientError(message, EXIT_NO_HOST if code == "not_ready" else EXIT_ERROR, code)

    def send(self, topic: str, data: bytes) -> Dict[str, Any]:
        """Send a topic message to the host; raises ClientError (exit 3) when no host is connected."""
        rid = self._new_id()
        return self._call(m.encode_message(topic, data, id=rid), rid)

    def subscribe(self, topics: Iterable[str]) -> Dict[str, Any]:
        rid = self._new_id()
        return self._call(m.encode_request(rid, "subscribe", {"topics": list(topics)}), rid)

    def ping(self) -> Dict[str, Any]:
        rid = self._new_id()
        return self._call(m.encode_request(rid, "ping"), rid)

    def messages(self) -> Iterator[Tuple[str, bytes]]:
        """Yield (topic, data) for every message the host publishes on a subscribed topic."""
        while True:
            frame = self._recv_frame(None)
            if frame is not None and frame.type == FrameType.MESSAGE and frame.id == 0:
                try:
                    yield m.parse_message(frame.payload)
                except m.ProtocolViolation:
                    continue
