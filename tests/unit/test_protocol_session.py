"""The session rules as state machines (protocol/session.py), driven with bytes only, h11-style:
every scenario is also fed one byte at a time and must give the same events."""
import struct
import zlib
from typing import Any, Dict, Iterator, List

import pytest

from guestlink.protocol import codes
from guestlink.protocol import messages as m
from guestlink.protocol import session as S
from guestlink.protocol.frames import MAX_ID, Frame, FrameDecoder, FrameType, encode_frame

AGENT = {"agent": "guestlink-agent", "agent_version": "1.0", "protocol": 1,
         "capabilities": ["ping"], "hostname": "vm", "boot_id": "b", "session": "s"}


def nonces() -> Iterator[str]:
    n = 0
    while True:
        n += 1
        yield "nonce%d" % n


def host() -> S.HostSession:
    it = nonces()
    return S.HostSession(nonce_factory=lambda: next(it))


def feed(session: S.HostSession, data: bytes, bytewise: bool) -> List[S.HostEvent]:
    if not bytewise:
        return session.receive_data(data)
    events: List[S.HostEvent] = []
    for i in range(len(data)):
        events += session.receive_data(data[i:i + 1])
    return events


def sent_frames(events: List[S.HostEvent]) -> List[Frame]:
    decoder = FrameDecoder()
    out: List[Frame] = []
    for ev in events:
        if isinstance(ev, S.SendBytes):
            out += [f for f in decoder.feed(ev.data) if isinstance(f, Frame)]
    return out


def synced(bytewise: bool = False) -> S.HostSession:
    s = host()
    s.start()
    events = feed(s, m.encode_sync_ack("nonce1", AGENT), bytewise)
    assert events == [S.Synchronised(m.parse_hello(m.encode_sync_ack("nonce1", AGENT)[20:-4]))]
    assert s.synchronised
    return s


def version2_header() -> bytes:
    """A valid header (its CRC right) of a frame version this side does not speak."""
    prefix = struct.pack("!4sBBHII", b"\x89GLK", 2, FrameType.HELLO, 0, 0, 0)
    return prefix + struct.pack("!I", zlib.crc32(prefix))


BYTEWISE = pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])


@BYTEWISE
def test_handshake_ignores_everything_until_the_ack_with_our_nonce(bytewise: bool) -> None:
    s = host()
    sync = s.start()
    assert m.parse_sync(FrameDecoder().feed(sync)[0].payload) == ("nonce1", 1)  # type: ignore[union-attr]
    noise = (b"garbage" + m.encode_sync_ack("stale", AGENT) + m.encode_response(1, {})
             + m.encode_error(0, codes.INTERNAL, "x"))
    assert feed(s, noise, bytewise) == []
    assert not s.synchronised and s.stats["garbage_bytes"] == 7 and s.stats["stale_frames"] == 2
    # a HELLO while syncing: SYNC again, same nonce
    events = feed(s, m.encode_hello(AGENT), bytewise)
    assert [m.parse_sync(f.payload)[0] for f in sent_frames(events)] == ["nonce1"]
    assert s.sync_due() == sync
    events = feed(s, m.encode_sync_ack("nonce1", AGENT), bytewise)
    assert [type(e) for e in events] == [S.Synchronised]
    assert events[0].agent["hostname"] == "vm"  # type: ignore[union-attr]
    assert s.sync_due() is None


@BYTEWISE
@pytest.mark.parametrize("frame,mismatch", [
    (m.encode_sync_ack("nonce1", dict(AGENT, protocol=2)), True),
    (m.encode_sync_ack("nonce1", dict(AGENT, hostname=7)), False),
    (m.encode_error(0, codes.PROTOCOL_MISMATCH, "old", {"nonce": "nonce1"}), True),
    (m.encode_error(0, codes.PROTOCOL_MISMATCH, "old"), True),
    (version2_header(), True),
])
def test_a_fatal_handshake_failure_ends_the_session(frame: bytes, mismatch: bool,
                                                     bytewise: bool) -> None:
    s = host()
    s.start()
    events = feed(s, frame + m.encode_sync_ack("nonce1", AGENT), bytewise)
    assert len(events) == 1 and isinstance(events[0], S.HandshakeFailed)
    assert events[0].mismatch is mismatch and s.failed and not s.synchronised
    assert s.sync_due() is None


def test_a_mismatch_for_another_nonce_is_ignored() -> None:
    s = host()
    s.start()
    assert s.receive_data(m.encode_error(0, codes.PROTOCOL_MISMATCH, "x", {"nonce": "old"})) == []
    assert not s.failed


@BYTEWISE
def test_replies_are_routed_by_id_and_release_it(bytewise: bool) -> None:
    s = synced(bytewise)
    a, b, c = s.allocate_id(), s.allocate_id(), s.allocate_id()
    assert (a, b, c) == (1, 2, 3)
    data = (m.encode_event(a, {"event": "started"}) + m.encode_stream(a, 1, b"out")
            + m.encode_response(a, {"x": 1}) + m.encode_response(a, {"again": 1})
            + m.encode_error(b, codes.DENIED, "no", {"k": "v"})
            + encode_frame(FrameType.ERROR, b"not json", id=c)
            + m.encode_message("topic", b"data") + m.encode_message("t", b"acked", id=9)
            + encode_frame(FrameType.MESSAGE, b"\x05ab")
            + m.encode_response(77, {}) + m.encode_sync_ack("nonce1", AGENT))
    events = feed(s, data, bytewise)
    assert events[:5] == [
        S.CallEvent(a, b'{"event":"started"}'), S.CallStream(a, 1, b"out"),
        S.Response(a, b'{"x":1}'), S.ErrorReply(b, codes.DENIED, "no", {"k": "v"}),
        events[4]]
    assert isinstance(events[4], S.MalformedReply) and events[4].id == c
    assert events[5:] == [S.Message("topic", b"data")]
    assert not any(s.in_flight(i) for i in (a, b, c))
    assert s.stats["stale_frames"] == 2 and s.stats["bad_messages"] == 1 and s.stats["messages"] == 1


@BYTEWISE
@pytest.mark.parametrize("trigger,reason", [
    (m.encode_hello(AGENT), "the guest agent restarted"),
    (m.encode_error(1, codes.NOT_READY, "who are you"), "the guest agent lost the session (not_ready)"),
])
def test_a_restart_loses_every_call_and_resyncs_with_a_fresh_nonce(trigger: bytes, reason: str,
                                                                 bytewise: bool) -> None:
    s = synced()
    first, second = s.allocate_id(), s.allocate_id()
    events = feed(s, trigger, bytewise)
    if trigger[5] == FrameType.ERROR:
        assert events[0] == S.ErrorReply(first, codes.NOT_READY, "who are you", {})
        events = events[1:]
    assert events[0] == S.SessionLost(reason)
    assert [m.parse_sync(f.payload)[0] for f in sent_frames(events[1:])] == ["nonce2"]
    assert not s.synchronised and not s.in_flight(second) and s.stats["agent_restarts"] == 1
    # the ack for the old nonce no longer counts
    assert feed(s, m.encode_sync_ack("nonce1", AGENT), bytewise) == []
    assert [type(e) for e in feed(s, m.encode_sync_ack("nonce2", AGENT), bytewise)] == [S.Synchronised]


def test_a_corrupt_frame_of_a_call_breaks_that_call_only() -> None:
    s = synced()
    id_ = s.allocate_id()
    bad = bytearray(m.encode_response(id_, {"x": 1}))
    bad[-1] ^= 1
    other = bytearray(m.encode_response(99, {}))
    other[-1] ^= 1
    events = s.receive_data(bytes(bad) + bytes(other))
    assert events == [S.CallBroken(id_, False, "a RESPONSE frame of this request arrived corrupted (crc)")]
    assert s.stats["corrupt_frames"] == 2 and not s.in_flight(id_)
    assert s.cancel(id_) == m.encode_cancel(id_)


def test_a_truncated_frame_is_abandoned_on_request() -> None:
    s = synced()
    id_ = s.allocate_id()
    data = m.encode_response(id_, {"x": 1})
    assert s.receive_data(data[:-3]) == [] and s.partial
    events = s.abandon_partial()
    assert [type(e) for e in events] == [S.CallBroken] and not s.partial


def test_an_id0_error_after_the_handshake_is_reported_and_a_mismatch_is_fatal() -> None:
    s = synced()
    assert s.receive_data(m.encode_error(0, codes.INTERNAL, "hmm")) == [
        S.AgentError(codes.INTERNAL, "hmm", {})]
    events = s.receive_data(m.encode_error(0, codes.PROTOCOL_MISMATCH, "old"))
    assert [type(e) for e in events] == [S.AgentError, S.HandshakeFailed] and s.failed


def test_ids_wrap_skip_zero_and_ids_in_flight() -> None:
    s = synced()
    s._next_id = MAX_ID
    assert s.allocate_id() == MAX_ID
    assert s.allocate_id() == 1
    s._next_id = MAX_ID
    assert s.allocate_id() == 2  # MAX_ID and 1 are still in flight
    s.release(1)
    s._next_id = 1
    assert s.allocate_id() == 1


# --- agent side --------------------------------------------------------------------------------

class AgentDriver:
    def __init__(self) -> None:
        self.busy: set = set()
        self.session = S.AgentSession(lambda: dict(AGENT), lambda i: i in self.busy)
        self.decoder = FrameDecoder()

    def send(self, data: bytes) -> List[S.AgentEvent]:
        out: List[S.AgentEvent] = []
        for f in self.decoder.feed(data):
            assert isinstance(f, Frame)
            out += self.session.receive_frame(f)
        return out


def replies(events: List[S.AgentEvent]) -> List[Dict[str, Any]]:
    out = []
    for f in sent_frames(events):  # type: ignore[arg-type]
        if f.type == FrameType.ERROR:
            code, message, _ = m.parse_error(f.payload)
            out.append({"id": f.id, "code": code})
        else:
            out.append({"id": f.id, "type": f.type})
    return out


def test_agent_answers_not_ready_before_a_sync() -> None:
    a = AgentDriver()
    assert replies(a.send(m.encode_request(5, "ping"))) == [{"id": 5, "code": codes.NOT_READY}]
    assert replies(a.send(m.encode_message("t", b"x", id=6))) == [{"id": 6, "code": codes.NOT_READY}]
    assert a.send(m.encode_message("t", b"x")) == [] and a.send(m.encode_cancel(5)) == []


def test_agent_sync_starts_repeats_and_replaces_sessions() -> None:
    a = AgentDriver()
    events = a.send(m.encode_sync("n1"))
    assert events[0] == S.SessionStarted("n1") and a.session.active
    assert replies(events) == [{"id": 0, "type": FrameType.SYNC_ACK}]
    events = a.send(m.encode_sync("n1"))
    assert [type(e) for e in events] == [S.Ignored, S.SendBytes]
    events = a.send(m.encode_sync("n2"))
    assert events[:2] == [S.SessionEnded("new SYNC from the host"), S.SessionStarted("n2")]
    events = a.send(m.encode_sync("n3", protocol=9))
    assert replies(events) == [{"id": 0, "code": codes.PROTOCOL_MISMATCH}] and a.session.nonce == "n2"
    assert [type(e) for e in a.send(encode_frame(FrameType.SYNC, b"[]"))] == [S.Ignored]
    a.session.end()
    assert not a.session.active


def test_agent_request_rules() -> None:
    a = AgentDriver()
    a.send(m.encode_sync("n1"))
    assert [type(e) for e in a.send(m.encode_request(0, "ping"))] == [S.Ignored]
    events = a.send(m.encode_request(7, "ping", {"a": 1}))
    assert len(events) == 1 and isinstance(events[0], S.Request)
    assert (events[0].id, events[0].op, events[0].args.obj) == (7, "ping", {"a": 1})
    a.busy.add(7)
    assert replies(a.send(m.encode_request(7, "ping"))) == [{"id": 7, "code": codes.BAD_REQUEST}]
    assert replies(a.send(encode_frame(FrameType.REQUEST, b'{"op": 5}', id=8))) == [
        {"id": 8, "code": codes.BAD_REQUEST}]
    stream = m.encode_stream(7, 0, b"in")
    assert a.send(stream) == [S.Passed(FrameDecoder().feed(stream)[0])]  # type: ignore[list-item]
    assert [type(e) for e in a.send(m.encode_hello(AGENT))] == [S.Ignored]


def _is_plain_ping(events: List[S.AgentEvent], id_: int) -> bool:
    return (len(events) == 1 and isinstance(events[0], S.Request) and events[0].id == id_
            and events[0].op == "ping" and events[0].args.obj == {})


def test_agent_is_ping_agrees_with_receive_frame() -> None:
    """The agent's ping fast path (AgentSession.is_ping) keeps the general path's rules: it only
    takes frames the general path would turn into exactly one plain ping Request (a ping spelt
    differently is left to the general path, which answers it the same way)."""
    frames = [m.encode_request(5, "ping"), m.encode_request(0, "ping"),
              m.encode_request(6, "ping", {"a": 1}), m.encode_request(7, "info"),
              encode_frame(FrameType.REQUEST, b'{"op": "ping", "args": {}}', id=8),
              encode_frame(FrameType.REQUEST, b'{"op":"ping"}', id=9),
              encode_frame(FrameType.MESSAGE, m.PING_PAYLOAD, id=10),
              encode_frame(FrameType.STREAM, m.PING_PAYLOAD, id=11),
              encode_frame(FrameType.REQUEST, m.PING_PAYLOAD, flags=1, id=12)]
    for synced in (False, True):
        a = AgentDriver()
        if synced:
            a.send(m.encode_sync("n1"))
        a.busy.add(5)
        for data in frames + [m.encode_request(13, "ping")]:
            (frame,) = FrameDecoder().feed(data)
            assert isinstance(frame, Frame)
            fast = a.session.is_ping(frame)
            plain = _is_plain_ping(a.session.receive_frame(frame), frame.id)
            assert plain if fast else True, frame
            assert fast == (synced and frame.id in (12, 13)), frame
            assert plain == (synced and frame.id in (8, 9, 12, 13)), frame
    # the bytes the fast paths recognise are what the general path would decode
    op, args = m.parse_request(m.PING_PAYLOAD)
    assert (op, args.obj, args.where) == ("ping", {}, "REQUEST.args")
    assert m.load_json_object(m.PONG_PAYLOAD) == m.parse_response(m.PONG_PAYLOAD) == {"pong": True}
    prepared = m.PreparedResponse({"pong": True})
    assert prepared.frame(42) == m.encode_response(42, {"pong": True})
