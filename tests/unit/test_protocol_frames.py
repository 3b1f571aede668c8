"""Frame layer: whole, byte by byte, random splits and merges, resync, fuzz."""
import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestlink.protocol import frames
from guestlink.protocol.frames import (FLAG_EOF, HEADER_SIZE, MAGIC, CorruptFrame, Frame,
                                       FrameDecoder, FrameType, Garbage, UnsupportedVersion,
                                       encode_frame, encode_parts)


def decode_all(data, max_payload=frames.MAX_PAYLOAD, splits=None):
    """Feed ``data`` in pieces (whole when splits is None) and return every event."""
    decoder = FrameDecoder(max_payload)
    events = []
    if splits is None:
        events += decoder.feed(data)
    else:
        pos = 0
        for cut in splits + [len(data)]:
            events += decoder.feed(data[pos:cut])
            pos = cut
    events += decoder.flush_garbage()
    return events, decoder


def frames_only(events):
    return [e for e in events if isinstance(e, Frame)]


def garbage_total(events):
    return sum(e.nbytes for e in events if isinstance(e, Garbage))


SAMPLE = [
    (FrameType.HELLO, 0, 0, b'{"agent":"x"}'),
    (FrameType.REQUEST, 0, 1, b'{"op":"ping","args":{}}'),
    (FrameType.STREAM, 1 | FLAG_EOF, 7, b"\x00" * 5000),
    (FrameType.RESPONSE, 0, 0xFFFFFFFF, b""),
    (FrameType.MESSAGE, 0, 0, MAGIC * 10),  # the magic inside a payload must not confuse anything
]


def sample_bytes():
    return b"".join(encode_frame(t, p, flags=f, id=i) for t, f, i, p in SAMPLE)


def expected_frames():
    return [Frame(t, f, i, p) for t, f, i, p in SAMPLE]


def test_header_layout_is_as_documented():
    data = encode_frame(FrameType.REQUEST, b"abc", flags=0x0102, id=0x01020304)
    assert data[:4] == b"\x89GLK"
    assert data[4] == 1 and data[5] == FrameType.REQUEST
    assert struct.unpack("!HII", data[6:16]) == (0x0102, 0x01020304, 3)
    assert struct.unpack("!I", data[16:20])[0] == zlib.crc32(data[:16])
    assert data[20:23] == b"abc"
    assert struct.unpack("!I", data[23:27])[0] == zlib.crc32(b"abc")
    assert len(data) == frames.OVERHEAD + 3


def test_encode_parts_matches_encode_frame():
    parts = encode_parts(FrameType.STREAM, b"xyz", flags=2, id=9)
    assert b"".join(parts) == encode_frame(FrameType.STREAM, b"xyz", flags=2, id=9)
    # A caller that already has the CRC gets the same bytes.
    assert encode_parts(FrameType.STREAM, b"xyz", 2, 9, payload_crc=zlib.crc32(b"xyz")) == parts


def test_whole_stream_decodes():
    events, decoder = decode_all(sample_bytes())
    assert events == expected_frames()
    assert decoder.buffered == 0


def test_byte_by_byte():
    data = sample_bytes()
    events, decoder = decode_all(data, splits=list(range(1, len(data))))
    assert events == expected_frames()
    assert decoder.buffered == 0


@pytest.mark.parametrize("seed", range(20))
def test_random_splits(seed):
    rng = random.Random(seed)
    data = sample_bytes()
    splits = sorted(rng.sample(range(1, len(data)), rng.randint(1, 30)))
    events, _ = decode_all(data, splits=splits)
    assert events == expected_frames()


def test_garbage_before_between_and_after_is_skipped_and_counted():
    good = [encode_frame(t, p, flags=f, id=i) for t, f, i, p in SAMPLE]
    junk = [b"hello", b"\x89G", b"\x89GL", b"\x89GLK" + b"\x00" * 30, b"\xff" * 100]
    data = junk[0] + good[0] + junk[1] + good[1] + junk[2] + good[2] + junk[3] + good[3] + good[4] + junk[4]
    for splits in (None, list(range(1, len(data)))):
        events, _ = decode_all(data, splits=splits)
        assert frames_only(events) == expected_frames()
        assert garbage_total(events) == sum(len(j) for j in junk)
        # Nothing other than frames and garbage reports.
        assert all(isinstance(e, (Frame, Garbage)) for e in events)


def test_half_frame_left_by_previous_client_then_new_frames():
    frame = encode_frame(FrameType.RESPONSE, b'{"x":1}', id=3)
    stale = frame[: len(frame) // 2]
    fresh = encode_frame(FrameType.SYNC_ACK, b'{"nonce":"n"}')
    events, _ = decode_all(stale + fresh)
    assert frames_only(events) == [Frame(FrameType.SYNC_ACK, 0, 0, b'{"nonce":"n"}')]
    assert garbage_total(events) == len(stale)


def test_payload_corruption_drops_the_frame_and_names_it():
    frame = bytearray(encode_frame(FrameType.REQUEST, b'{"op":"ping"}', id=42))
    frame[HEADER_SIZE + 3] ^= 0x01
    after = encode_frame(FrameType.REQUEST, b"{}", id=43)
    events, _ = decode_all(bytes(frame) + after)
    corrupt = [e for e in events if isinstance(e, CorruptFrame)]
    assert len(corrupt) == 1 and corrupt[0].id == 42 and corrupt[0].reason == "crc"
    assert frames_only(events) == [Frame(FrameType.REQUEST, 0, 43, b"{}")]


def test_header_corruption_resyncs_on_next_frame():
    frame = bytearray(encode_frame(FrameType.REQUEST, b"abc", id=1))
    frame[9] ^= 0xFF  # inside the id: header CRC fails
    after = encode_frame(FrameType.REQUEST, b"def", id=2)
    events, _ = decode_all(bytes(frame) + after)
    assert frames_only(events) == [Frame(FrameType.REQUEST, 0, 2, b"def")]
    assert garbage_total(events) == len(frame)


def test_oversized_frame_is_refused_without_buffering_it():
    big = encode_frame(FrameType.STREAM, b"x" * 2000, id=5)
    after = encode_frame(FrameType.REQUEST, b"ok", id=6)
    decoder = FrameDecoder(max_payload=1000)
    events = decoder.feed(big + after) + decoder.flush_garbage()
    too_large = [e for e in events if isinstance(e, CorruptFrame)]
    assert [(e.id, e.reason) for e in too_large] == [(5, "too_large")]
    assert frames_only(events)[-1] == Frame(FrameType.REQUEST, 0, 6, b"ok")


def test_unsupported_version_is_reported_not_garbage():
    prefix = struct.pack("!4sBBHII", MAGIC, 2, FrameType.HELLO, 0, 0, 0)
    header = prefix + struct.pack("!I", zlib.crc32(prefix))
    events, _ = decode_all(header + encode_frame(FrameType.HELLO, b"{}"))
    assert isinstance(events[0], UnsupportedVersion) and events[0].version == 2
    assert frames_only(events) == [Frame(FrameType.HELLO, 0, 0, b"{}")]


def test_buffer_stays_bounded_under_endless_garbage():
    decoder = FrameDecoder()
    rng = random.Random(1)
    for _ in range(200):
        decoder.feed(bytes(rng.getrandbits(8) for _ in range(1000)).replace(b"\x89", b"\x00"))
        assert decoder.buffered < len(MAGIC)


def test_encode_refuses_out_of_range():
    with pytest.raises(ValueError):
        encode_frame(FrameType.REQUEST, b"x" * 11, max_payload=10)
    with pytest.raises(ValueError):
        encode_frame(FrameType.REQUEST, id=-1)
    with pytest.raises(ValueError):
        encode_frame(FrameType.STREAM, flags=0x10000)


frame_strategy = st.tuples(
    st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 17, 18]),
    st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.binary(max_size=300))


@settings(max_examples=300, deadline=None)
@given(st.lists(frame_strategy, max_size=8), st.lists(st.binary(max_size=40), max_size=8),
       st.data())
def test_property_frames_survive_any_interleaved_garbage_and_splits(specs, junks, data):
    """Frames separated by garbage that contains no magic come out intact, whatever the split."""
    junks = [j.replace(b"\x89", b"") for j in junks]
    pieces = []
    for i, (t, f, i_, p) in enumerate(specs):
        if i < len(junks):
            pieces.append(junks[i])
        pieces.append(encode_frame(t, p, flags=f, id=i_))
    stream = b"".join(pieces)
    splits = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=20))))
    events, decoder = decode_all(stream, splits=splits)
    assert frames_only(events) == [Frame(t, f, i_, p) for t, f, i_, p in specs]
    assert garbage_total(events) == sum(len(j) for j in junks[:len(specs)])


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000), st.data())
def test_fuzz_never_crashes_and_stays_bounded(blob, data):
    """Arbitrary bytes give only events, never an exception, and nothing beyond one frame buffered."""
    # Salt the input with real magics and headers so the interesting paths are reached.
    salted = blob.replace(b"\x00\x00", MAGIC).replace(b"\x01\x01", encode_frame(4, b"{}", id=1)[:HEADER_SIZE])
    splits = sorted(set(data.draw(st.lists(st.integers(0, len(salted)), max_size=10))))
    events, decoder = decode_all(salted, max_payload=512, splits=splits)
    for e in events:
        assert isinstance(e, (Frame, Garbage, CorruptFrame, UnsupportedVersion))
    assert decoder.buffered <= HEADER_SIZE + 512 + 4
    whole, _ = decode_all(salted, max_payload=512)
    assert frames_only(events) == frames_only(whole)


def test_truncated_frame_swallows_what_follows_until_abandoned():
    truncated = encode_frame(FrameType.STREAM, b"x" * 5000, flags=1, id=3)[:1000]
    hello = encode_frame(FrameType.HELLO, b'{"agent":"restarted"}')
    decoder = FrameDecoder()
    assert decoder.feed(truncated + hello) == []
    assert decoder.partial
    events = decoder.abandon_partial()
    assert [(e.id, e.reason) for e in events if isinstance(e, CorruptFrame)] == [(3, "truncated")]
    assert frames_only(events) == [Frame(FrameType.HELLO, 0, 0, b'{"agent":"restarted"}')]
    assert not decoder.partial and decoder.buffered == 0
    assert decoder.abandon_partial() == []


def test_values_behave_as_frozen_dataclasses():
    """protocol.frames.Value (the events, ops messages, options): fields in order or by name,
    == by type and fields, hash, repr, immutable, replace()."""
    from guestlink.protocol.ops import ExecResult
    from guestlink.protocol.session import HandshakeFailed, Response

    a, b = Response(1, b"x"), Response(id=1, payload=b"x")
    assert a == b and hash(a) == hash(b) and a != Response(2, b"x")
    assert Response(1, b"x") != Garbage(1) and Garbage(3) == Garbage(3)
    assert repr(a) == "Response(id=1, payload=b'x')"
    assert repr(Frame(FrameType.REQUEST, 0, 7, b"ab")) == "Frame(REQUEST, flags=0x0, id=7, 2 bytes)"
    with pytest.raises(AttributeError):
        a.id = 2
    with pytest.raises(AttributeError):
        del a.id
    with pytest.raises(AttributeError):
        a.other = 1
    assert HandshakeFailed(True, "m").details == {}
    assert HandshakeFailed(True, "m").details is not HandshakeFailed(True, "m").details
    r = ExecResult(3)
    assert r.replace(signal=9) == ExecResult(3, signal=9) and r.signal is None
    with pytest.raises(TypeError):
        r.replace(nosuch=1)
    import copy
    import pickle
    assert copy.copy(a) == a and copy.deepcopy(r) == r and pickle.loads(pickle.dumps(a)) == a
