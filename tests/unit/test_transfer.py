"""Data channel: sans-I/O codecs byte by byte, hello scan, hostile paths, resume logic, and the copy
engine over a socketpair (both directions, corruption, resume, cancel)."""

import asyncio
import hashlib
import os
import socket
import struct
import threading
import zlib

import pytest

from guestlink.filecopy import engine as CE
from guestlink.host import errors as E
from guestlink.host import transfer as HT
from guestlink.protocol import FrameDecoder, FrameType, ProtocolViolation, codes
from guestlink.protocol import transfer as T
from guestlink.protocol.frames import encode_frame


def test_data_frame_bytes():
    parts = T.data_parts(0x01020304, 0x0A0B, b"xyz")
    raw = b"".join(bytes(p) for p in parts)
    payload = struct.pack("!Q", 0x0A0B) + b"xyz"
    assert raw == encode_frame(FrameType.DATA, payload, id=0x01020304)
    assert raw[:4] == b"\x89GLK" and raw[5] == 16
    assert raw[8:12] == b"\x01\x02\x03\x04" and raw[12:16] == struct.pack("!I", 11)
    assert raw[-4:] == struct.pack("!I", zlib.crc32(payload))
    assert T.chunk_crc(0x0A0B, b"xyz") == zlib.crc32(payload)
    # the common decoder reads it too
    (frame,) = FrameDecoder().feed(raw)
    assert frame.type == FrameType.DATA and frame.id == 0x01020304 and frame.payload == payload


def test_end_and_hello_round_trip():
    end = FrameDecoder().feed(T.encode_end(7, 5, "sha256", "ab" * 32))[0]
    assert end.type == FrameType.DATA_END and end.id == 7
    assert T.parse_end(end.payload) == {"size": 5, "algorithm": "sha256", "digest": "ab" * 32}
    err = FrameDecoder().feed(T.encode_end_error(7, "changed", "moved"))[0]
    assert T.parse_end(err.payload) == {"error": "changed", "message": "moved"}
    assert T.parse_end(FrameDecoder().feed(T.encode_ack(7))[0].payload) == {"ok": True}
    hello = FrameDecoder().feed(T.encode_hello(9, "n" * 32, "agent"))[0]
    assert hello.type == FrameType.DATA_HELLO and T.parse_hello(hello.payload) == (9, "n" * 32, "agent")
    for bad in (b"[]", b"{", b'{"size": -1, "algorithm": "sha256", "digest": ""}',
                b'{"size": 1, "algorithm": "md5", "digest": ""}'):
        with pytest.raises(ProtocolViolation):
            T.parse_end(bad)
    with pytest.raises(ProtocolViolation):
        T.parse_hello(b'{"transfer": 0, "nonce": "x", "from": "agent"}')


def test_parse_header_strict():
    raw = T.encode_end(3, 0, "crc32", "00000000")
    h = T.parse_header(raw[:20])
    assert (h.type, h.id, h.length) == (FrameType.DATA_END, 3, len(raw) - 24)
    for i in range(20):
        bad = bytearray(raw[:20])
        bad[i] ^= 0x40
        with pytest.raises(ProtocolViolation) as exc:
            T.parse_header(bad)
        assert exc.value.code in (codes.CHECKSUM_MISMATCH, codes.PROTOCOL_MISMATCH, codes.TOO_LARGE)
    assert T.check_payload(raw[20:-4], raw[-4:])
    assert not T.check_payload(raw[20:-5] + b"!", raw[-4:])


def test_scan_hello_skips_stale_bytes_and_old_nonces():
    stale = (b"garbage\x89GL" + b"".join(bytes(p) for p in T.data_parts(5, 0, b"old data"))
             + T.encode_hello(5, "oldnonce", "host") + T.encode_hello(6, "newnonce", "agent"))
    hello = T.encode_hello(5, "newnonce", "host")
    after = b"".join(bytes(p) for p in T.data_parts(5, 0, b"fresh"))
    stream = stale + hello + after
    assert T.scan_hello(stream, 5, "newnonce", "host") == (len(stale) + len(hello),) * 2
    # fed in pieces of every size, the scanner finds the same spot and never keeps unbounded data
    for step in (1, 2, 3, 7, 20, 64):
        buf = bytearray()
        consumed = 0
        found = None
        for i in range(0, len(stream), step):
            buf += stream[i:i + step]
            end, keep = T.scan_hello(buf, 5, "newnonce", "host")
            if end is not None:
                found = consumed + end
                break
            consumed += keep
            del buf[:keep]
        assert found == len(stale) + len(hello), step
    # a hello whose payload was corrupted is not accepted
    bad = bytearray(hello)
    bad[25] ^= 1
    assert T.scan_hello(bytes(bad), 5, "newnonce", "host")[0] is None


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/.", "",
                                  "a\0b", "a\\..\\b", "..", "x/" + "y" * 300])
def test_safe_relpath_refuses_hostile_names(name):
    with pytest.raises(ProtocolViolation) as exc:
        T.safe_relpath(name)
    assert exc.value.code == codes.DENIED


def test_safe_relpath():
    assert T.safe_relpath("a/b c/..d") == ["a", "b c", "..d"]


def test_resume_logic():
    n1 = T.partial_name("/d/f", 100, 5, "sha256")
    assert n1 == T.partial_name("/d/f", 100, 5, "sha256")
    assert n1.startswith(".guestlink-") and n1.endswith(".part") and "/" not in n1
    assert len({n1, T.partial_name("/d/f", 101, 5, "sha256"), T.partial_name("/d/f", 100, 6, "sha256"),
                T.partial_name("/d/g", 100, 5, "sha256"), T.partial_name("/d/f", 100, 5, "crc32")}) == 5
    assert T.resume_offset(40, 100) == 40
    assert T.resume_offset(100, 100) == 100
    assert T.resume_offset(101, 100) == 0
    assert T.resume_offset(None, 100) == 0 and T.resume_offset(5, None) == 0


@pytest.mark.parametrize("algorithm,expected", [
    ("sha256", lambda d: hashlib.sha256(d).hexdigest()),
    ("blake2b", lambda d: hashlib.blake2b(d).hexdigest()),
    ("crc32", lambda d: "%08x" % zlib.crc32(d)),
])
def test_digests(algorithm, expected):
    h = T.new_digest(algorithm)
    h.update(b"abc")
    h.update(memoryview(b"def"))
    assert h.hexdigest() == expected(b"abcdef")


def test_crc32_shift_table_matches_default_chunk():
    assert T._CRC_SHIFT[T.DEFAULT_CHUNK] == T.crc32_shift_columns(T.DEFAULT_CHUNK)


@pytest.mark.parametrize("lengths", [[T.DEFAULT_CHUNK, T.DEFAULT_CHUNK, 77], [5, T.DEFAULT_CHUNK], [0]])
def test_crc32_update_chunk_equals_update(lengths):
    h = T.new_digest("crc32")
    h.update(b"prefix")
    off, whole = 6, b"prefix"
    for n in lengths:
        d = os.urandom(n)
        h.update_chunk(off, d, T.chunk_crc(off, d))
        off += n
        whole += d
    assert h.hexdigest() == "%08x" % zlib.crc32(whole)


@pytest.mark.parametrize("size", [0, 1000, 3 * T.DEFAULT_CHUNK + 5])
def test_engine_round_trip_crc32(tmp_path, size):
    data = os.urandom(size)
    out, got = _run_copy(tmp_path, data, offset=min(size, 7), algorithm="crc32")
    assert got == data
    assert out["sent"] == out["recv"] == (size, "%08x" % zlib.crc32(data))


# --- the copy engine over a socketpair ---------------------------------------------------------

def _pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


_ANNOUNCED = object()


def _run_copy(tmp_path, data, offset=0, corrupt_send=None, corrupt_recv=None, prefix=None,
              algorithm="sha256", chunk=T.DEFAULT_CHUNK, send_size=_ANNOUNCED, recv_size=_ANNOUNCED):
    src = tmp_path / "src"
    src.write_bytes(data)
    dst = tmp_path / "dst"
    dst.write_bytes(prefix if prefix is not None else data[:offset])
    a, b = _pair()
    ca, cb = threading.Event(), threading.Event()
    out = {}

    def sender():
        fd = os.open(str(src), os.O_RDONLY)
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            out["sent"] = CE.send_file(CE.Channel(a.fileno(), ca), fd, 42, algorithm, offset,
                                       len(data) if send_size is _ANNOUNCED else send_size,
                                       chunk=chunk, corrupt_at=corrupt_send)
        except CE.TransferError as exc:
            out["send_err"] = exc
        finally:
            os.close(fd)

    t = threading.Thread(target=sender)
    t.start()
    fd = os.open(str(dst), os.O_RDWR)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        out["recv"] = CE.recv_file(CE.Channel(b.fileno(), cb), fd, 42, algorithm, offset,
                                   len(data) if recv_size is _ANNOUNCED else recv_size,
                                   corrupt_at=corrupt_recv)
    except CE.TransferError as exc:
        out["recv_err"] = exc
        ca.set()
    finally:
        os.close(fd)
    t.join(10)
    a.close()
    b.close()
    return out, dst.read_bytes()


@pytest.mark.parametrize("size", [0, 1, 1000, T.DEFAULT_CHUNK, 3 * T.DEFAULT_CHUNK + 5])
def test_engine_round_trip(tmp_path, size):
    data = os.urandom(size)
    out, got = _run_copy(tmp_path, data)
    assert got == data
    assert out["sent"] == out["recv"] == (size, hashlib.sha256(data).hexdigest())


def test_engine_resume_digest_covers_whole_file(tmp_path):
    data = os.urandom(2 * T.DEFAULT_CHUNK + 77)
    out, got = _run_copy(tmp_path, data, offset=T.DEFAULT_CHUNK + 3, algorithm="blake2b")
    assert got == data
    assert out["recv"] == (len(data), hashlib.blake2b(data).hexdigest())


def test_engine_resume_with_wrong_prefix_fails_digest(tmp_path):
    data = os.urandom(5000)
    out, _ = _run_copy(tmp_path, data, offset=1000, prefix=b"\0" * 1000)
    assert out["recv_err"].code == codes.CHECKSUM_MISMATCH


@pytest.mark.parametrize("where", ["send", "recv"])
def test_engine_rejects_corrupt_chunk_and_keeps_only_verified_prefix(tmp_path, where):
    data = os.urandom(4 * 65536)
    kw = {"corrupt_send" if where == "send" else "corrupt_recv": 2 * 65536 + 9}
    out, got = _run_copy(tmp_path, data, chunk=65536, **kw)
    assert out["recv_err"].code == codes.CHECKSUM_MISMATCH
    assert len(got) <= 2 * 65536 and data.startswith(got)


def test_engine_sends_a_pipe_by_reading_it(tmp_path):
    data = os.urandom(200_000)
    r, w = os.pipe()
    a, b = _pair()
    out = {}

    def sender():
        out["sent"] = CE.send_file(CE.Channel(a.fileno(), threading.Event()), r, 7, "sha256",
                                   chunk=65536)

    t = threading.Thread(target=sender)
    t.start()
    os.write(w, data[:100_000])
    os.write(w, data[100_000:])
    os.close(w)
    dst = tmp_path / "dst"
    dst.write_bytes(b"")
    fd = os.open(str(dst), os.O_RDWR)
    try:
        out["recv"] = CE.recv_file(CE.Channel(b.fileno(), threading.Event()), fd, 7, "sha256")
    finally:
        os.close(fd)
    t.join(10)
    os.close(r)
    a.close()
    b.close()
    assert dst.read_bytes() == data
    assert out["sent"] == out["recv"] == (len(data), hashlib.sha256(data).hexdigest())


def test_engine_small_transfer_refuses_more_than_announced(tmp_path):
    """A transfer announced as smaller than one chunk runs without pipeline threads and with a
    buffer of the announced size: a sender that sends more is refused, not overrun."""
    data = os.urandom(20_000)
    out, got = _run_copy(tmp_path, data, send_size=None, recv_size=100)
    assert out["recv_err"].code == codes.TOO_LARGE
    assert got == b""


def test_engine_cancel_and_peer_gone(tmp_path):
    a, b = _pair()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CE.TransferError) as exc:
        CE.Channel(b.fileno(), cancel).read_exact(memoryview(bytearray(10)))
    assert exc.value.code == codes.CANCELLED
    a.close()
    with pytest.raises(CE.TransferError) as exc:
        CE.Channel(b.fileno(), threading.Event()).read_exact(memoryview(bytearray(10)))
    assert exc.value.interrupted
    b.close()


def test_wait_hello_keeps_following_bytes():
    a, b = _pair()
    a.sendall(b"stale" + T.encode_hello(8, "nn", "host") + b"NEXT")
    ch = CE.Channel(b.fileno(), threading.Event())
    ch.wait_hello(8, "nn", "host")
    buf = bytearray(4)
    ch.read_exact(memoryview(buf))
    assert buf == b"NEXT"
    a.close()
    b.close()


def test_recursive_listing_from_the_guest_is_bounded(monkeypatch):
    """A guest that pages forever (``next`` always growing) cannot make the host hold an
    unbounded listing."""
    class EndlessGuest:
        calls = 0

        async def call(self, op, args, timeout=None):
            self.calls += 1
            start = args["start"]
            return {"entries": [{"path": "f%d" % (start + i), "type": "file", "size": 1}
                                for i in range(10)], "next": start + 10}

    monkeypatch.setattr(HT, "MAX_TREE_ENTRIES", 95)
    guest = EndlessGuest()
    with pytest.raises(E.ProtocolError, match="exceeds 95 entries"):
        asyncio.run(HT.list_tree(guest, "/big"))
    assert guest.calls == 10
