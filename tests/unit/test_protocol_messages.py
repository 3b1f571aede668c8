"""Payload codecs: round trips, and every malformed input refused with ProtocolViolation only."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestlink.protocol import codes, messages as m
from guestlink.protocol.frames import FLAG_EOF, FrameDecoder, FrameType
from guestlink.protocol.messages import ProtocolViolation


def one_frame(data):
    events = FrameDecoder().feed(data)
    assert len(events) == 1
    return events[0]


HELLO = {"agent": "guestlink-agent", "agent_version": "0.1.0", "protocol": 1,
         "capabilities": ["ping", "exec"], "hostname": "vm", "boot_id": "b", "session": "s"}


def test_hello_round_trip():
    frame = one_frame(m.encode_hello(HELLO))
    assert frame.type == FrameType.HELLO
    assert m.parse_hello(frame.payload) == HELLO


def test_sync_and_ack_round_trip():
    frame = one_frame(m.encode_sync("abc123"))
    assert frame.type == FrameType.SYNC and m.parse_sync(frame.payload) == ("abc123", 1)
    frame = one_frame(m.encode_sync_ack("abc123", HELLO))
    nonce, info = m.parse_sync_ack(frame.payload)
    assert nonce == "abc123" and info == HELLO


def test_request_response_error_round_trip():
    frame = one_frame(m.encode_request(7, "exec", {"argv": ["ls", "-l"], "timeout": 2.5}))
    assert (frame.type, frame.id) == (FrameType.REQUEST, 7)
    op, args = m.parse_request(frame.payload)
    assert op == "exec" and args.str_list("argv") == ["ls", "-l"] and args.number("timeout") == 2.5
    frame = one_frame(m.encode_response(7, {"returncode": 0}))
    assert m.parse_response(frame.payload) == {"returncode": 0}
    frame = one_frame(m.encode_error(7, codes.DENIED, "no", {"op": "exec"}))
    assert m.parse_error(frame.payload) == (codes.DENIED, "no", {"op": "exec"})


def test_message_round_trip_binary_data():
    data = bytes(range(256))
    frame = one_frame(m.encode_message("vm/events.1", data, id=3))
    assert frame.id == 3 and m.parse_message(frame.payload) == ("vm/events.1", data)


def test_stream_flags():
    frame = one_frame(m.encode_stream(4, 2, b"err", eof=True))
    assert frame.flags == 2 | FLAG_EOF and m.stream_flags(frame.flags) == (2, True)


@pytest.mark.parametrize("topic", ["", "-x", "a b", "a" * 129, "é", "x\n", None, 5])
def test_bad_topics_refused(topic):
    with pytest.raises(ProtocolViolation):
        m.check_topic(topic)


@pytest.mark.parametrize("payload", [
    b"", b"[]", b"null", b"\xff\xfe", b'{"op": NaN}', b'{"op": "x"', b"[" * 100000,
    b'{"op": 5}', b'{"op": "../x"}', b'{"op": "ping", "args": []}',
])
def test_bad_requests_refused(payload):
    with pytest.raises(ProtocolViolation):
        m.parse_request(payload)


def test_fields_enforce_types_and_bounds():
    f = m.Fields({"n": True, "s": "x" * 10, "l": ["a", 1], "m": {"k": 2}, "t": 1e400 * 0}, "T")
    with pytest.raises(ProtocolViolation):
        f.int("n")  # a bool is not an integer
    with pytest.raises(ProtocolViolation):
        f.str("s", max_len=5)
    with pytest.raises(ProtocolViolation):
        f.str_list("l")
    with pytest.raises(ProtocolViolation):
        f.str_map("m")
    with pytest.raises(ProtocolViolation):
        f.str("missing")
    assert f.str("missing", default=None) is None
    with pytest.raises(ProtocolViolation):
        m.Fields({"x": 11}, "T").int("x", min=0, max=10)


def test_oversized_json_refused():
    with pytest.raises(ProtocolViolation) as info:
        m.load_json_object(b'{"a":"' + b"x" * m.MAX_JSON_PAYLOAD + b'"}')
    assert info.value.code == codes.TOO_LARGE
    with pytest.raises(ValueError):
        m.dump_json({"a": "x" * m.MAX_JSON_PAYLOAD})


def test_every_error_code_documented_in_protocol_md():
    import pathlib
    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    for code, meaning in codes.ERROR_CODES.items():
        assert "| %s | %s |" % (code, meaning) in doc


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_parsers_raise_only_protocol_violation(blob):
    for parse in (m.parse_hello, m.parse_sync, m.parse_sync_ack, m.parse_request, m.parse_response,
                  m.parse_error, m.parse_message, m.parse_event):
        try:
            parse(blob)
        except ProtocolViolation:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=6))
def test_fuzz_structured_hello_and_request(obj):
    raw = json.dumps(obj).encode()
    for parse in (m.parse_hello, m.parse_request, m.parse_error, m.parse_sync_ack):
        try:
            parse(raw)
        except ProtocolViolation:
            pass
