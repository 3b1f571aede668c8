"""Data channel: frame codecs, the hello scanner, digests, resume keys and path checks (sans-I/O).

Wire summary (docs/protocol.md, *Data channel*); all frames use the common frame layout with the
frame ``id`` set to the 32-bit transfer id chosen by the host:

* DATA_HELLO (18): JSON ``{"transfer": tid, "nonce": hex, "from": "agent"|"host"}``
* DATA (16): 8-byte big-endian file offset, then raw bytes. The frame's payload CRC-32 (over the
  offset and the bytes) is the chunk check.
* DATA_END (17): JSON ``{"size": total, "algorithm": name, "digest": hex}`` from the sender, or
  ``{"error": code, "message": str}`` when the sender gives up; from the receiver of a pull, an
  acknowledgement ``{"ok": true}``.

Nothing here performs I/O; the copy engine (``guestlink.filecopy.engine``) drives it.
"""

import hashlib
import struct
import zlib
from typing import Any, Dict, List, Optional, Tuple, Union

from . import codes
from .frames import (HEADER, HEADER_SIZE, MAGIC, TRAILER, TRAILER_SIZE, VERSION, FrameType,
                     encode_frame, encode_header)
from .messages import ProtocolViolation, dump_json, load_json_object

#: What the codecs take as data: bytes or a view into a reused buffer.
Buffer = Union[bytes, bytearray, memoryview]
#: A whole-file digest: hashlib's or _Crc32 (update() and hexdigest()).
Digest = Any

OFFSET = struct.Struct("!Q")
OFFSET_SIZE = OFFSET.size
#: Raw bytes per DATA frame (the payload adds the 8-byte offset; the frame limit is 1 MiB).
DEFAULT_CHUNK = 512 * 1024
ALGORITHMS = ("sha256", "blake2b", "crc32")
DEFAULT_ALGORITHM = "sha256"
MAX_TID = 0xFFFFFFFF
PARTIAL_PREFIX = ".guestlink-"
PARTIAL_SUFFIX = ".part"
#: Files in one batch transfer (transfer.open with "files"; the request must also fit one frame).
MAX_BATCH = 256
#: Bytes of batch entries a host puts in one transfer.open (MAX_JSON_PAYLOAD leaves room).
BATCH_REQUEST_BYTES = 192 * 1024


# --- digests -----------------------------------------------------------------------------------

def crc32_shift_columns(length: int) -> Tuple[int, ...]:
    """The linear map (over GF(2)) ``x -> crc32(d, x) ^ crc32(d, 0)`` for any ``length``-byte
    ``d``, as the images of the 32 bits: ``crc32(d, a) == crc32(d, b) ^ shift(a ^ b)``."""
    zeros = bytes(length)
    base = zlib.crc32(zeros)
    return tuple(zlib.crc32(zeros, 1 << i) ^ base for i in range(32))


#: crc32_shift_columns(DEFAULT_CHUNK), precomputed (a unit test checks it): lets a crc32 digest
#: follow full chunks from their frame CRCs alone, without a second pass over the data.
_CRC_SHIFT = {DEFAULT_CHUNK: (
    0x6f76172e, 0xdeec2e5c, 0x66a95af9, 0xcd52b5f2, 0x41d46da5, 0x83a8db4a, 0xdc20b0d5, 0x633067eb,
    0xc660cfd6, 0x57b099ed, 0xaf6133da, 0x85b361f5, 0xd017c5ab, 0x7b5e8d17, 0xf6bd1a2e, 0x360b321d,
    0x6c16643a, 0xd82cc874, 0x6b2896a9, 0xd6512d52, 0x77d35ce5, 0xefa6b9ca, 0x043c75d5, 0x0878ebaa,
    0x10f1d754, 0x21e3aea8, 0x43c75d50, 0x878ebaa0, 0xd46c7301, 0x73a9e043, 0xe753c086, 0x15d6874d,
)}


class _Crc32:
    name = "crc32"

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Buffer) -> None:
        self.value = zlib.crc32(data, self.value)

    def update_chunk(self, offset: int, data: Buffer, crc: int) -> None:
        """Same as update(data), given ``crc`` = chunk_crc(offset, data) (already checked)."""
        cols = _CRC_SHIFT.get(len(data))
        if cols is None:
            self.value = zlib.crc32(data, self.value)
            return
        # crc32(data, v) == crc32(data, c0) ^ shift(c0 ^ v), c0 = the CRC of the offset prefix
        v = zlib.crc32(OFFSET.pack(offset)) ^ self.value
        i = 0
        while v:
            if v & 1:
                crc ^= cols[i]
            v >>= 1
            i += 1
        self.value = crc

    def hexdigest(self) -> str:
        return "%08x" % self.value


def new_digest(algorithm: str) -> Digest:
    """A hash object with update()/hexdigest(): sha256 (as sha256sum), blake2b (as b2sum), crc32."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake2b":
        return hashlib.blake2b()
    if algorithm == "crc32":
        return _Crc32()
    raise ValueError("unknown checksum algorithm %r (use one of %s)" % (algorithm, ", ".join(ALGORITHMS)))


# --- frames ------------------------------------------------------------------------------------

def encode_hello(tid: int, nonce: str, sender: str) -> bytes:
    return encode_frame(FrameType.DATA_HELLO, dump_json({"transfer": tid, "nonce": nonce,
                                                         "from": sender}), id=tid)


def parse_hello(payload: Buffer) -> Tuple[int, str, str]:
    """Returns (tid, nonce, from) or raises ProtocolViolation."""
    obj = load_json_object(payload, "DATA_HELLO")
    tid, nonce, sender = obj.get("transfer"), obj.get("nonce"), obj.get("from")
    if (not isinstance(tid, int) or isinstance(tid, bool) or not 0 < tid <= MAX_TID
            or not isinstance(nonce, str) or not isinstance(sender, str)):
        raise ProtocolViolation("DATA_HELLO needs transfer (int), nonce and from (strings)")
    return tid, nonce, sender


def data_parts(tid: int, offset: int, data: Buffer, crc: Optional[int] = None) -> List[Buffer]:
    """A DATA frame as a list of buffers for writev: header, offset, data, trailer.

    ``crc`` is the CRC-32 of offset+data if the caller already has it (see :func:`chunk_crc`).
    """
    prefix = OFFSET.pack(offset)
    if crc is None:
        crc = zlib.crc32(data, zlib.crc32(prefix))
    return [encode_header(FrameType.DATA, OFFSET_SIZE + len(data), id=tid), prefix, data,
            TRAILER.pack(crc)]


def chunk_crc(offset: int, data: Buffer) -> int:
    """The payload CRC of a DATA frame carrying ``data`` at ``offset``."""
    return zlib.crc32(data, zlib.crc32(OFFSET.pack(offset)))


def encode_end(tid: int, size: int, algorithm: str, digest: str) -> bytes:
    return encode_frame(FrameType.DATA_END, dump_json({"size": size, "algorithm": algorithm,
                                                       "digest": digest}), id=tid)


def encode_end_error(tid: int, code: str, message: str) -> bytes:
    return encode_frame(FrameType.DATA_END, dump_json({"error": code, "message": message[:1000]}),
                        id=tid)


def encode_ack(tid: int) -> bytes:
    return encode_frame(FrameType.DATA_END, dump_json({"ok": True}), id=tid)


def parse_end(payload: Buffer) -> Dict[str, Any]:
    """Returns a dict with either size/algorithm/digest, error/message, or ok."""
    obj = load_json_object(payload, "DATA_END")
    if "error" in obj:
        code = obj.get("error")
        msg = obj.get("message", "")
        if not isinstance(code, str) or not isinstance(msg, str) or len(code) > 64:
            raise ProtocolViolation("DATA_END error must be a string code and message")
        return {"error": code, "message": msg[:1000]}
    if obj.get("ok") is True:
        return {"ok": True}
    size, algorithm, digest = obj.get("size"), obj.get("algorithm"), obj.get("digest")
    if (not isinstance(size, int) or isinstance(size, bool) or size < 0
            or algorithm not in ALGORITHMS or not isinstance(digest, str) or len(digest) > 256):
        raise ProtocolViolation("DATA_END needs size (int >= 0), algorithm and digest")
    return {"size": size, "algorithm": algorithm, "digest": digest}


class Header:
    __slots__ = ("type", "flags", "id", "length")

    def __init__(self, type: int, flags: int, id: int, length: int) -> None:
        self.type, self.flags, self.id, self.length = type, flags, id, length


def parse_header(buf: Buffer, max_payload: int = 1 << 20) -> Header:
    """Validate 20 header bytes (strict mode: no resync). Returns Header or raises ProtocolViolation
    with code checksum_mismatch (the stream is corrupt: the transfer must fail)."""
    if len(buf) < HEADER_SIZE:
        raise ProtocolViolation("short frame header", codes.CHECKSUM_MISMATCH)
    magic, version, type_, flags, id_, length, hcrc = HEADER.unpack_from(buf, 0)
    if magic != MAGIC or zlib.crc32(bytes(buf[:HEADER_SIZE - 4])) != hcrc:
        raise ProtocolViolation("corrupt frame header on the data port", codes.CHECKSUM_MISMATCH)
    if version != VERSION:
        raise ProtocolViolation("frame version %d on the data port" % version, codes.PROTOCOL_MISMATCH)
    if length > max_payload:
        raise ProtocolViolation("data frame of %d bytes exceeds %d" % (length, max_payload),
                                codes.TOO_LARGE)
    return Header(type_, flags, id_, length)


def check_payload(payload: Buffer, trailer: Buffer) -> bool:
    """True if ``trailer`` (4 bytes) is the CRC-32 of ``payload``."""
    expected: int = TRAILER.unpack_from(trailer, 0)[0]
    return zlib.crc32(payload) == expected


def scan_hello(buf: bytearray, tid: int, nonce: str,
               sender: str) -> Tuple[Optional[int], int]:
    """Look for the DATA_HELLO ``(tid, nonce, sender)`` in ``buf`` (bytes received so far).

    Returns ``(end, keep_from)``: ``end`` is the index just after the hello (the strict frame
    stream starts there) or None; when None, bytes before ``keep_from`` are stale and may be
    dropped. Anything else — garbage, frames of earlier transfers, hellos with another nonce — is
    skipped. Stale bytes can never be taken for the new transfer: its nonce is fresh.
    """
    n = len(buf)
    pos = 0
    while True:
        idx = buf.find(MAGIC, pos)
        if idx < 0:
            # keep a possible partial magic at the end
            for k in range(min(len(MAGIC) - 1, n), 0, -1):
                if MAGIC.startswith(bytes(buf[n - k:n])):
                    return None, n - k
            return None, n
        if n - idx < HEADER_SIZE:
            return None, idx
        magic, version, type_, flags, id_, length, hcrc = HEADER.unpack_from(buf, idx)
        if zlib.crc32(bytes(buf[idx:idx + HEADER_SIZE - 4])) != hcrc or version != VERSION:
            pos = idx + 1
            continue
        if type_ != FrameType.DATA_HELLO or id_ != tid or length > 4096:
            pos = idx + 1  # a stale frame: step over its magic (its payload is scanned too)
            continue
        end = idx + HEADER_SIZE + length + TRAILER_SIZE
        if n < end:
            return None, idx
        payload = bytes(buf[idx + HEADER_SIZE:idx + HEADER_SIZE + length])
        if check_payload(payload, buf[end - TRAILER_SIZE:end]):
            try:
                got = parse_hello(payload)
            except ProtocolViolation:
                got = None
            if got == (tid, nonce, sender):
                return end, end
        pos = idx + 1


# --- resume ------------------------------------------------------------------------------------

def partial_name(path: str, size: int, mtime_ns: int, algorithm: str) -> str:
    """File name (in the target directory) of the partial temp file for a resumable transfer.

    Derived from the transfer's identity: the destination path and the source's size and mtime
    (a changed source gets a fresh name, so stale partial data is never resumed). The digest
    algorithm is included because the digests of the prefix are recomputed anyway but a different
    --checksum is a different request.
    """
    key = "%s\0%d\0%d\0%s" % (path, size, mtime_ns, algorithm)
    return "%s%s%s" % (PARTIAL_PREFIX, hashlib.sha256(key.encode("utf-8", "surrogateescape"))
                       .hexdigest()[:24], PARTIAL_SUFFIX)


def resume_offset(partial_size: Optional[int], size: Optional[int]) -> int:
    """Where to resume given the partial file's size: 0 if it cannot be a prefix of the source."""
    if partial_size is None or size is None or partial_size < 0 or partial_size > size:
        return 0
    return partial_size


# --- untrusted relative paths -------------------------------------------------------------------

def safe_relpath(rel: object) -> List[str]:
    """Split a relative path received from the peer into components, refusing anything that could
    leave the destination: absolute paths, ``..``, empty or ``.`` components, NUL, backslashes.
    Raises ProtocolViolation (code denied)."""
    if not isinstance(rel, str) or not rel or len(rel) > 4096:
        raise ProtocolViolation("invalid path name %r" % (rel,), codes.DENIED)
    if rel.startswith("/") or "\0" in rel or "\\" in rel:
        raise ProtocolViolation("unsafe path name %r from the guest" % (rel,), codes.DENIED)
    parts = rel.split("/")
    for part in parts:
        if part in ("", ".", "..") or len(part) > 255:
            raise ProtocolViolation("unsafe path name %r from the guest" % (rel,), codes.DENIED)
    return parts


def batch_tid(tid: int, index: int) -> int:
    """The transfer id of the ``index``-th file of a batch opened as ``tid`` (wraps, never 0)."""
    return (tid - 1 + index) % MAX_TID + 1
