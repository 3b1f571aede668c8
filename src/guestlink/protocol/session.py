"""The session rules of the control channel as two state machines, one per side (sans-I/O, h11's way).

Neither machine reads, writes, sleeps or keeps time: the I/O layer feeds it what arrived and
writes out what it returns. The rules, written here once (docs/protocol.md, *Handshake*):

* The agent announces itself with HELLO whenever it (re)opens its port.
* The host starts every (re)connection with SYNC carrying a fresh random nonce, resends it every
  second (:meth:`HostSession.sync_due`) and on every HELLO while not synchronised, and ignores
  everything until the SYNC_ACK that echoes its nonce. A SYNC_ACK with the nonce whose protocol
  differs, or that is malformed, or an id-0 ERROR ``protocol_mismatch`` (for our nonce or naming
  none), or a frame of another frame version, ends the connection for good (no point in retrying).
* After the handshake a HELLO means the agent restarted, and a ``not_ready`` ERROR that it lost
  our session (it restarted and we missed its HELLO): every call in flight is lost and the host
  re-synchronises with a new nonce.
* The agent answers requests (and acknowledged messages) before a SYNC with ``not_ready``, a
  request id 0 not at all, a request whose id is still in flight with ``bad_request``; a repeated
  SYNC with the current nonce is acknowledged again, a new nonce ends the session and starts one.
* Request ids are 32-bit, never 0, wrap around, and the host never reuses one in flight.

Host side (the asyncio session layer drives it)::

    session = HostSession()                # one per connection
    write(session.start())                 # the first SYNC, with a fresh nonce
    ...every SYNC_INTERVAL: data = session.sync_due(); if data: write(data)
    ...on bytes read: for event in session.receive_data(data): handle(event)
    ...a partial frame stalled for PARTIAL_FRAME_STALL: for event in session.abandon_partial(): ...
    ...to call:  id_ = session.allocate_id(); write(m.encode_request(id_, op, args))
    ...to give up on a call: write(session.cancel(id_))   (or session.release(id_) without CANCEL)

``receive_data`` returns a list of the frozen events below; ``session.stats`` counts what needs no
action (garbage bytes, corrupt frames, stale frames, bad messages, messages, agent restarts).
What the host does with each event (exactly what host/client.py did before this module):

* :class:`SendBytes` — write ``data`` (a SYNC answering a HELLO, or the new handshake after a
  restart).
* :class:`Synchronised` — the handshake is done; ``agent`` is the validated description
  (``messages.parse_hello``). Calls may be sent now (``session.synchronised``).
* :class:`HandshakeFailed` — fatal: fail the handshake, every call and the connection with
  ProtocolMismatch (``mismatch``) or ProtocolError (malformed SYNC_ACK), carrying ``message`` and
  ``details``; do not reconnect.
* :class:`SessionLost` — fail every call in flight: ConnectionLost("connection lost (<reason>)")
  if it was written, else RequestNotSent("request not sent (<reason>)"); go RECONNECTING. The
  machine has already forgotten their ids and restarted the handshake (a SendBytes follows).
* :class:`Response` / :class:`ErrorReply` / :class:`MalformedReply` — the final reply of call
  ``id`` (its id is released): resolve it / fail it with ``errors.remote_error(code, message,
  details)`` / fail it with ProtocolError("malformed <what> from the agent: <message>").
  A ``not_ready`` ErrorReply is followed by a SessionLost.
* :class:`CallEvent`, :class:`CallStream` — non-final EVENT and STREAM frames of call ``id``.
* :class:`CallBroken` — a frame of call ``id`` arrived corrupt or in another frame version: fail
  it (ProtocolMismatch if ``mismatch`` else ProtocolError, with ``message``) and write
  ``session.cancel(id)``.
* :class:`Message` — a topic message from the guest.
* :class:`AgentError` — an id-0 ERROR after the handshake (log it; a mismatch is followed by
  HandshakeFailed).

Agent side: :class:`AgentSession` (see its docstring) — used by the guest agent and the tests'
fake agent.
"""
from typing import Any, Callable, Dict, List, Optional, Set, Union

from . import codes
from . import messages as m
from .frames import (MAX_ID, MAX_PAYLOAD, CorruptFrame, DecoderEvent, Frame, FrameDecoder,
                     FrameType, Garbage, UnsupportedVersion, Value, frame_type_name)
from .messages import Fields, ProtocolViolation

JSON = Dict[str, Any]


# --- host-side events --------------------------------------------------------------------------

class SendBytes(Value):
    """Write these bytes to the peer."""

    __slots__ = ("data",)
    data: bytes

    def __init__(self, data: bytes) -> None:
        self._init(data)


class Synchronised(Value):
    """The handshake completed; ``agent`` is the agent's validated description."""

    __slots__ = ("agent",)
    agent: JSON

    def __init__(self, agent: JSON) -> None:
        self._init(agent)


class HandshakeFailed(Value):
    """The peers cannot talk (``mismatch``: protocol versions; else a malformed SYNC_ACK)."""

    __slots__ = ("mismatch", "message", "details")
    mismatch: bool
    message: str
    details: JSON

    def __init__(self, mismatch: bool, message: str, details: Optional[JSON] = None) -> None:
        self._init(mismatch, message, {} if details is None else details)


class SessionLost(Value):
    """The agent restarted or forgot the session: every call in flight is lost."""

    __slots__ = ("reason",)
    reason: str

    def __init__(self, reason: str) -> None:
        self._init(reason)


class Response(Value):
    """RESPONSE: call ``id`` succeeded; ``payload`` is its JSON body, not parsed yet."""

    __slots__ = ("id", "payload")
    id: int
    payload: bytes

    def __init__(self, id: int, payload: bytes) -> None:
        self._init(id, payload)


class ErrorReply(Value):
    """ERROR: call ``id`` failed with ``code``."""

    __slots__ = ("id", "code", "message", "details")
    id: int
    code: str
    message: str
    details: JSON

    def __init__(self, id: int, code: str, message: str, details: JSON) -> None:
        self._init(id, code, message, details)


class MalformedReply(Value):
    """The final reply of call ``id`` could not be parsed."""

    __slots__ = ("id", "what", "message")
    id: int
    what: str
    message: str

    def __init__(self, id: int, what: str, message: str) -> None:
        self._init(id, what, message)


class CallEvent(Value):
    """EVENT: a non-final notification about call ``id`` (JSON body, not parsed yet)."""

    __slots__ = ("id", "payload")
    id: int
    payload: bytes

    def __init__(self, id: int, payload: bytes) -> None:
        self._init(id, payload)


class CallStream(Value):
    """STREAM: bytes of one of call ``id``'s streams (``messages.stream_flags(flags)``)."""

    __slots__ = ("id", "flags", "payload")
    id: int
    flags: int
    payload: bytes

    def __init__(self, id: int, flags: int, payload: bytes) -> None:
        self._init(id, flags, payload)


class CallBroken(Value):
    """A frame of call ``id`` was lost (corrupt, or another frame version): fail it and cancel it."""

    __slots__ = ("id", "mismatch", "message")
    id: int
    mismatch: bool
    message: str

    def __init__(self, id: int, mismatch: bool, message: str) -> None:
        self._init(id, mismatch, message)


class Message(Value):
    """A topic message from the guest."""

    __slots__ = ("topic", "data")
    topic: str
    data: bytes

    def __init__(self, topic: str, data: bytes) -> None:
        self._init(topic, data)


class AgentError(Value):
    """An ERROR with id 0 after the handshake: about the connection, not a call."""

    __slots__ = ("code", "message", "details")
    code: str
    message: str
    details: JSON

    def __init__(self, code: str, message: str, details: JSON) -> None:
        self._init(code, message, details)


HostEvent = Union[SendBytes, Synchronised, HandshakeFailed, SessionLost, Response, ErrorReply,
                  MalformedReply, CallEvent, CallStream, CallBroken, Message, AgentError]


def new_nonce() -> str:
    """A fresh handshake nonce: 128 random bits."""
    import secrets  # here: a client that brings its own nonce_factory never imports hashlib

    return secrets.token_hex(16)


class HostSession:
    """The host's side of one connection's session rules. See the module docstring."""

    def __init__(self, max_payload: int = MAX_PAYLOAD,
                 nonce_factory: Callable[[], str] = new_nonce) -> None:
        self.decoder = FrameDecoder(max_payload)
        self._new_nonce = nonce_factory
        self.nonce: Optional[str] = None
        self.synchronised = False
        self.failed = False
        self._in_flight: Set[int] = set()
        self._next_id = 1
        self.stats: Dict[str, int] = {"garbage_bytes": 0, "corrupt_frames": 0, "stale_frames": 0,
                                      "bad_messages": 0, "messages": 0, "agent_restarts": 0}

    # -- handshake ----------------------------------------------------------------------------

    def start(self) -> bytes:
        """Begin a handshake with a fresh nonce; returns the SYNC to write."""
        self.nonce = self._new_nonce()
        self.synchronised = False
        return m.encode_sync(self.nonce)

    def sync_due(self) -> Optional[bytes]:
        """The periodic resend: the SYNC again while not synchronised, else None."""
        if self.synchronised or self.failed or self.nonce is None:
            return None
        return m.encode_sync(self.nonce)

    # -- request ids --------------------------------------------------------------------------

    def allocate_id(self) -> int:
        """A request id for a new call: never 0, never one in flight (32-bit, wrapping)."""
        for _ in range(len(self._in_flight) + 2):
            id_ = self._next_id
            self._next_id = id_ + 1 if id_ < MAX_ID else 1
            if id_ not in self._in_flight:
                self._in_flight.add(id_)
                return id_
        raise RuntimeError("no free request id")  # pragma: no cover - 2**32 calls in flight

    def in_flight(self, id_: int) -> bool:
        return id_ in self._in_flight

    def release(self, id_: int) -> None:
        """Forget call ``id_`` (its replies, if any come, are stale)."""
        self._in_flight.discard(id_)

    def cancel(self, id_: int) -> bytes:
        """Forget call ``id_`` and return the CANCEL to write."""
        self._in_flight.discard(id_)
        return m.encode_cancel(id_)

    # -- input --------------------------------------------------------------------------------

    @property
    def partial(self) -> bool:
        """True while a frame has begun but not completed (the I/O layer times its stall)."""
        return self.decoder.partial

    def receive_data(self, data: bytes) -> List[HostEvent]:
        return self._handle(self.decoder.feed(data) if data else [])

    def abandon_partial(self) -> List[HostEvent]:
        """The partial frame stalled: its writer died mid-frame (docs/protocol.md)."""
        return self._handle(self.decoder.abandon_partial())

    def _handle(self, decoded: List[DecoderEvent]) -> List[HostEvent]:
        out: List[HostEvent] = []
        for event in decoded:
            if self.failed:
                break
            if isinstance(event, Frame):
                if self.synchronised:
                    self._frame(event, out)
                else:
                    self._handshake_frame(event, out)
            elif isinstance(event, Garbage):
                self.stats["garbage_bytes"] += event.nbytes
            elif isinstance(event, UnsupportedVersion):
                message = ("the agent sent a frame of protocol version %d; this host speaks "
                           "version 1" % event.version)
                if not self.synchronised:
                    self._fail(out, HandshakeFailed(True, message))
                elif event.id in self._in_flight:
                    self._in_flight.discard(event.id)
                    out.append(CallBroken(event.id, True, message))
            elif isinstance(event, CorruptFrame):
                self.stats["corrupt_frames"] += 1
                if self.synchronised and event.id in self._in_flight:
                    self._in_flight.discard(event.id)
                    out.append(CallBroken(event.id, False, "a %s frame of this request arrived "
                                          "corrupted (%s)" % (frame_type_name(event.type),
                                                              event.reason)))
        return out

    def _fail(self, out: List[HostEvent], event: HandshakeFailed) -> None:
        self.failed = True
        self.synchronised = False
        self._in_flight.clear()
        out.append(event)

    def _mismatch(self, message: str, details: JSON) -> HandshakeFailed:
        return HandshakeFailed(True, "the agent refused protocol %d: %s" % (m.PROTOCOL_VERSION,
                                                                             message), details)

    def _handshake_frame(self, frame: Frame, out: List[HostEvent]) -> None:
        t = frame.type
        if t == FrameType.HELLO:
            if self.nonce is not None:  # the agent (re)opened its port and may have missed SYNC
                out.append(SendBytes(m.encode_sync(self.nonce)))
        elif t == FrameType.SYNC_ACK:
            try:
                nonce = Fields(m.load_json_object(frame.payload, "SYNC_ACK"), "SYNC_ACK").str(
                    "nonce", max_len=m.MAX_NONCE)
            except ProtocolViolation:
                self.stats["stale_frames"] += 1
                return
            if nonce != self.nonce:
                self.stats["stale_frames"] += 1
                return
            try:
                agent = m.parse_hello(frame.payload)
            except ProtocolViolation as exc:
                self._fail(out, HandshakeFailed(False, "malformed SYNC_ACK from the agent: %s" % exc))
                return
            if agent["protocol"] != m.PROTOCOL_VERSION:
                self._fail(out, HandshakeFailed(True, "the agent speaks protocol %d; this host "
                                                "speaks %d" % (agent["protocol"], m.PROTOCOL_VERSION)))
                return
            self.synchronised = True
            out.append(Synchronised(agent))
        elif t == FrameType.ERROR and frame.id == 0:
            try:
                code, message, details = m.parse_error(frame.payload)
            except ProtocolViolation:
                return
            if code == codes.PROTOCOL_MISMATCH and details.get("nonce", self.nonce) == self.nonce:
                self._fail(out, self._mismatch(message, details))
        else:
            self.stats["stale_frames"] += 1

    def _restart(self, out: List[HostEvent], reason: str) -> None:
        self.stats["agent_restarts"] += 1
        self._in_flight.clear()
        out.append(SessionLost(reason))
        out.append(SendBytes(self.start()))

    def _frame(self, frame: Frame, out: List[HostEvent]) -> None:
        t = frame.type
        id_ = frame.id
        if t == FrameType.HELLO:
            self._restart(out, "the guest agent restarted")
        elif t == FrameType.MESSAGE:
            if id_ == 0:
                try:
                    topic, data = m.parse_message(frame.payload)
                except ProtocolViolation:
                    self.stats["bad_messages"] += 1
                    return
                self.stats["messages"] += 1
                out.append(Message(topic, data))
        elif t in (FrameType.RESPONSE, FrameType.ERROR, FrameType.EVENT, FrameType.STREAM):
            if id_ == 0:
                if t == FrameType.ERROR:
                    self._connection_error(frame.payload, out)
                return
            if id_ not in self._in_flight:
                self.stats["stale_frames"] += 1
                return
            if t == FrameType.RESPONSE:
                self._in_flight.discard(id_)
                out.append(Response(id_, frame.payload))
            elif t == FrameType.ERROR:
                self._in_flight.discard(id_)
                try:
                    code, message, details = m.parse_error(frame.payload)
                except ProtocolViolation as exc:
                    out.append(MalformedReply(id_, "ERROR reply", str(exc)))
                    return
                out.append(ErrorReply(id_, code, message, details))
                if code == codes.NOT_READY:
                    self._restart(out, "the guest agent lost the session (not_ready)")
            elif t == FrameType.EVENT:
                out.append(CallEvent(id_, frame.payload))
            else:
                out.append(CallStream(id_, frame.flags, frame.payload))
        # SYNC_ACK duplicates (answers to our resends) and frame types a host never receives are
        # ignored.

    def _connection_error(self, payload: bytes, out: List[HostEvent]) -> None:
        try:
            code, message, details = m.parse_error(payload)
        except ProtocolViolation:
            return
        out.append(AgentError(code, message, details))
        if code == codes.PROTOCOL_MISMATCH:
            self._fail(out, self._mismatch(message, details))


# --- agent side --------------------------------------------------------------------------------

class SessionStarted(Value):
    """A host session began (a SYNC with a new nonce)."""

    __slots__ = ("nonce",)
    nonce: str

    def __init__(self, nonce: str) -> None:
        self._init(nonce)


class SessionEnded(Value):
    """The host session ended; kill its execs, drop its calls."""

    __slots__ = ("reason",)
    reason: str

    def __init__(self, reason: str) -> None:
        self._init(reason)


class Request(Value):
    """A valid REQUEST of the current session, not already in flight."""

    __slots__ = ("id", "op", "args")
    id: int
    op: str
    args: Fields

    def __init__(self, id: int, op: str, args: Fields) -> None:
        self._init(id, op, args)


class Ignored(Value):
    """A frame the rules drop (``reason`` is for the log; ``warning``: worth a warning)."""

    __slots__ = ("reason", "warning")
    reason: str
    warning: bool

    def __init__(self, reason: str, warning: bool = False) -> None:
        self._init(reason, warning)


class Passed(Value):
    """A frame of the session that the rules leave to the agent (STREAM, CANCEL, MESSAGE...)."""

    __slots__ = ("frame",)
    frame: Frame

    def __init__(self, frame: Frame) -> None:
        self._init(frame)


AgentEvent = Union[SendBytes, SessionStarted, SessionEnded, Request, Ignored, Passed]

NOT_SYNCED = "the agent has not received a SYNC from this host session yet"

#: The exact payload every host sends for ``ping`` (``messages.encode_request(id, "ping")``).
#: These bytes parse to op "ping" with empty args, so a payload equal to them is that request
#: without the JSON loader: the simplest request skips the most expensive step of its path.
_PING_PAYLOAD = m.PING_PAYLOAD


class AgentSession:
    """The agent's side of the session rules, for one opening of the port.

    ``describe()`` returns the agent's description (HELLO and SYNC_ACK carry it);
    ``in_flight(id)`` says whether a request id is still being served in the current session.
    :meth:`hello` is the first frame of each opening; :meth:`receive_frame` turns a decoded frame
    into events: SendBytes (write them), SessionEnded then SessionStarted (a new SYNC),
    Request (serve it), Passed (a STREAM, CANCEL or MESSAGE frame of the session for the agent),
    Ignored (log it). :meth:`end` ends the session when the host goes away.
    """

    def __init__(self, describe: Callable[[], JSON], in_flight: Callable[[int], bool]) -> None:
        self._describe = describe
        self._in_flight = in_flight
        self.nonce: Optional[str] = None

    @property
    def active(self) -> bool:
        """True between a SYNC and the end of its session."""
        return self.nonce is not None

    def hello(self) -> bytes:
        return m.encode_hello(self._describe())

    def end(self) -> None:
        self.nonce = None

    def is_ping(self, frame: Frame) -> bool:
        """Whether ``receive_frame(frame)`` would return just ``[Request(frame.id, "ping", {})]``:
        a ping REQUEST of the current session, id non-zero and not in flight, in the exact bytes
        hosts send. Lets the agent answer its simplest request without building those events."""
        return (frame.type == FrameType.REQUEST and frame.id != 0 and self.nonce is not None
                and frame.payload == _PING_PAYLOAD and not self._in_flight(frame.id))

    def receive_frame(self, frame: Frame) -> List[AgentEvent]:
        t = frame.type
        if t == FrameType.SYNC:
            return self._sync(frame)
        if t == FrameType.REQUEST:
            return self._request(frame)
        if t in (FrameType.STREAM, FrameType.CANCEL):
            return [Passed(frame)] if self.active else []
        if t == FrameType.MESSAGE:
            if self.active:
                return [Passed(frame)]
            if frame.id:
                return [SendBytes(m.encode_error(frame.id, codes.NOT_READY, NOT_SYNCED))]
            return []
        return [Ignored("ignoring a %s frame from the host" % frame_type_name(t))]

    def _sync(self, frame: Frame) -> List[AgentEvent]:
        try:
            nonce, protocol = m.parse_sync(frame.payload)
        except ProtocolViolation as exc:
            return [Ignored("invalid SYNC ignored: %s" % exc, warning=True)]
        if protocol != m.PROTOCOL_VERSION:
            return [Ignored("host speaks protocol %d, this agent %d" % (protocol, m.PROTOCOL_VERSION),
                            warning=True),
                    SendBytes(m.encode_error(0, codes.PROTOCOL_MISMATCH,
                                             "the agent speaks protocol %d, not %d"
                                             % (m.PROTOCOL_VERSION, protocol),
                                             {"nonce": nonce, "protocol": m.PROTOCOL_VERSION}))]
        out: List[AgentEvent] = []
        if self.nonce == nonce:
            out.append(Ignored("repeated SYNC for the current session: acknowledged again"))
        else:
            if self.nonce is not None:
                out.append(SessionEnded("new SYNC from the host"))
            self.nonce = nonce
            out.append(SessionStarted(nonce))
        out.append(SendBytes(m.encode_sync_ack(nonce, self._describe())))
        return out

    def _request(self, frame: Frame) -> List[AgentEvent]:
        rid = frame.id
        if not rid:
            return [Ignored("REQUEST with id 0 ignored (ids must be non-zero)", warning=True)]
        if not self.active:
            return [SendBytes(m.encode_error(rid, codes.NOT_READY, NOT_SYNCED))]
        if self._in_flight(rid):
            return [SendBytes(m.encode_error(rid, codes.BAD_REQUEST,
                                             "request id %d is already in flight" % rid))]
        if frame.payload == _PING_PAYLOAD:
            return [Request(rid, "ping", Fields({}, "REQUEST.args"))]
        try:
            op, args = m.parse_request(frame.payload)
        except ProtocolViolation as exc:
            return [SendBytes(m.encode_error(rid, exc.code, str(exc)))]
        return [Request(rid, op, args)]
