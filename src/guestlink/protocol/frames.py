"""Frame layer: bytes in, events out. No I/O here (sans-I/O, like h11).

Wire layout (big-endian, see docs/protocol.md)::

    0   4  magic      89 47 4C 4B  ("\\x89GLK")
    4   1  version    1
    5   1  type       FrameType
    6   2  flags      meaning depends on type
    8   4  id         request id (0 = not tied to a request)
    12  4  length     payload length, <= max_payload
    16  4  hcrc       CRC-32 of bytes 0..15
    20  n  payload
    20+n 4 pcrc       CRC-32 of the payload

A virtio-serial port is a byte stream that may start mid-frame (a previous host client left half a
frame, the guest reopened the port, garbage was written). The decoder therefore never trusts a
header until its CRC matches; on any mismatch it drops one byte and searches for the next magic.
A header with a valid CRC but a corrupt payload drops the whole frame and reports it, so the
request it belonged to can be failed instead of hanging.
"""

import enum
import struct
import zlib
from typing import Any, List, Optional, Tuple, TypeVar, Union

MAGIC = b"\x89GLK"
VERSION = 1
HEADER = struct.Struct("!4sBBHIII")
HEADER_SIZE = HEADER.size  # 20
TRAILER = struct.Struct("!I")
TRAILER_SIZE = TRAILER.size
OVERHEAD = HEADER_SIZE + TRAILER_SIZE
_PREFIX = struct.Struct("!4sBBHII")  # the header without its own CRC

#: Largest payload either side accepts unless configured lower. Control payloads are far smaller;
#: data chunks use up to this much.
MAX_PAYLOAD = 1 << 20
MAX_ID = 0xFFFFFFFF


class FrameType(enum.IntEnum):
    HELLO = 1  # agent -> host, whenever the agent (re)opens the port
    SYNC = 2  # host -> agent, fresh nonce on every (re)connect
    SYNC_ACK = 3  # agent -> host, echoes the nonce
    REQUEST = 4  # host -> agent (and local client -> agent): JSON {"op", "args"}
    RESPONSE = 5  # final successful reply to a request
    ERROR = 6  # final failed reply to a request (or id 0: connection-level)
    STREAM = 7  # bytes of a request's stream (exec stdin/stdout/stderr); flags = fd | EOF
    CANCEL = 8  # host -> agent: cancel request `id`
    MESSAGE = 9  # topic message, either direction (binary: topic length, topic, data)
    EVENT = 10  # non-final JSON notification about a request (e.g. exec started)
    DATA = 16  # data port: a chunk of a transfer
    DATA_END = 17  # data port: end of a transfer with the whole-file digest
    DATA_HELLO = 18  # data port: the opener's greeting naming the transfer it is ready for


_TYPE_NAMES = {t.value: t.name for t in FrameType}


def frame_type_name(value: int) -> str:
    """The name of a frame type, including one this implementation does not know (the decoder
    passes unknown types through: the peer may be newer)."""
    return _TYPE_NAMES.get(value, "TYPE_%d" % value)


#: STREAM flags: the low byte is the stream number, bit 8 marks its end.
STREAM_STDIN = 0
STREAM_STDOUT = 1
STREAM_STDERR = 2
FLAG_EOF = 0x100


_V = TypeVar("_V", bound="Value")


class Value:
    """Base of the protocol's small immutable values (the decoder's and the session machines'
    events): what a frozen dataclass with ``__slots__`` gives (fields in ``__slots__`` order, ``==``
    by type and fields, ``hash``, ``repr``, assignment raises AttributeError), without importing
    dataclasses (and inspect, ast, ...) on the one-shot CLI path, where the import and the
    decorating cost more than the command's own work. Subclasses list their fields in
    ``__slots__``, annotate them, and store them with :meth:`_init` in a typed ``__init__`` whose
    parameters are the fields; :meth:`replace` is ``dataclasses.replace``."""

    __slots__: Tuple[str, ...] = ()

    def _init(self, *values: Any) -> None:
        if len(values) != len(self.__slots__):  # a field added to __slots__ but not passed on
            raise TypeError("%s takes %d fields, not %d"
                            % (type(self).__name__, len(self.__slots__), len(values)))
        for name, value in zip(self.__slots__, values):
            object.__setattr__(self, name, value)

    def _values(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def replace(self: _V, **changes: Any) -> _V:
        """A copy with ``changes`` (``dataclasses.replace``; the ``__init__`` takes the fields by
        their names)."""
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return type(self)(**values)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Value)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return "%s(%s)" % (type(self).__qualname__, ", ".join(
            "%s=%r" % (name, getattr(self, name)) for name in self.__slots__))

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:  # copy and pickle: rebuilt by __init__
        return type(self), self._values()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("cannot assign to field %r of a frozen %s" % (name, type(self).__name__))

    def __delattr__(self, name: str) -> None:
        raise AttributeError("cannot delete field %r of a frozen %s" % (name, type(self).__name__))


# The decoder's events. ``type`` is an int, not a FrameType: an unknown type is passed through.

class Frame(Value):
    """One decoded frame."""

    __slots__ = ("type", "flags", "id", "payload")
    type: int
    flags: int
    id: int
    payload: bytes

    def __init__(self, type: int, flags: int, id: int, payload: bytes) -> None:
        setattr = object.__setattr__  # one per frame: the generic _init's loop, unrolled
        setattr(self, "type", type)
        setattr(self, "flags", flags)
        setattr(self, "id", id)
        setattr(self, "payload", payload)

    def __repr__(self) -> str:
        return "Frame(%s, flags=%#x, id=%d, %d bytes)" % (
            frame_type_name(self.type), self.flags, self.id, len(self.payload))


class Garbage(Value):
    """Bytes skipped while looking for the next valid header."""

    __slots__ = ("nbytes",)
    nbytes: int

    def __init__(self, nbytes: int) -> None:
        self._init(nbytes)


class CorruptFrame(Value):
    """A frame whose header was valid but whose payload failed its CRC, was too large, or was cut
    off (``reason``: "crc", "too_large" or "truncated"). The frame's bytes were skipped."""

    __slots__ = ("type", "flags", "id", "length", "reason")
    type: int
    flags: int
    id: int
    length: int
    reason: str

    def __init__(self, type: int, flags: int, id: int, length: int, reason: str) -> None:
        self._init(type, flags, id, length, reason)

    def __repr__(self) -> str:
        return "CorruptFrame(%s, id=%d, %d bytes, %s)" % (
            frame_type_name(self.type), self.id, self.length, self.reason)


class UnsupportedVersion(Value):
    """A frame with a valid header CRC but a protocol version this implementation does not speak."""

    __slots__ = ("version", "type", "id")
    version: int
    type: int
    id: int

    def __init__(self, version: int, type: int, id: int) -> None:
        self._init(version, type, id)

    def __repr__(self) -> str:
        return "UnsupportedVersion(%d, %s)" % (self.version, frame_type_name(self.type))


DecoderEvent = Union[Frame, Garbage, CorruptFrame, UnsupportedVersion]
#: What the encoders take as a payload (the data path passes memoryviews of its buffers).
Payload = Union[bytes, bytearray, memoryview]


def encode_header(type: int, length: int, flags: int = 0, id: int = 0,
                  version: int = VERSION) -> bytes:
    if not 0 <= id <= MAX_ID:
        raise ValueError("frame id out of range: %r" % (id,))
    if not 0 <= flags <= 0xFFFF:
        raise ValueError("frame flags out of range: %r" % (flags,))
    prefix = _PREFIX.pack(MAGIC, version, type, flags, id, length)
    return prefix + TRAILER.pack(zlib.crc32(prefix))


def encode_parts(type: int, payload: Payload = b"", flags: int = 0, id: int = 0,
                 max_payload: int = MAX_PAYLOAD,
                 payload_crc: Optional[int] = None) -> Tuple[bytes, Payload, bytes]:
    """Return the frame as (header, payload, trailer), ready for writev without a copy.

    ``payload_crc`` lets a caller that already computed the payload's CRC-32 (the data path does,
    for its chunk check) avoid computing it twice.
    """
    length = len(payload)
    if length > max_payload:
        raise ValueError("payload of %d bytes exceeds the %d-byte frame limit" % (length, max_payload))
    if payload_crc is None:
        payload_crc = zlib.crc32(payload)
    return encode_header(type, length, flags, id), payload, TRAILER.pack(payload_crc)


def encode_frame(type: int, payload: Payload = b"", flags: int = 0, id: int = 0,
                 max_payload: int = MAX_PAYLOAD) -> bytes:
    """Return the frame's bytes."""
    return b"".join(encode_parts(type, payload, flags, id, max_payload))


class FrameDecoder:
    """Incremental decoder. ``feed(data)`` returns the list of events completed by ``data``.

    Events are Frame, Garbage, CorruptFrame and UnsupportedVersion. The decoder keeps at most one
    partial frame buffered (bounded by ``max_payload``), scans each byte a constant number of
    times, and never raises on any input.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        if max_payload < 0 or max_payload > MAX_ID:
            raise ValueError("max_payload out of range")
        self.max_payload = max_payload
        self._buf = bytearray()
        self._pos = 0
        self._skipped = 0
        # When a valid header announced a frame, remember it so we don't re-parse the header
        # while waiting for the rest of the payload.
        self._pending: Optional[Tuple[int, int, int, int]] = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events."""
        return len(self._buf) - self._pos

    def reset(self) -> None:
        """Forget everything buffered (for example when the port is reopened)."""
        self._buf = bytearray()
        self._pos = 0
        self._skipped = 0
        self._pending = None

    def feed(self, data: Payload) -> List[DecoderEvent]:
        if not self._buf and not self._skipped and len(data) >= OVERHEAD:
            # The usual case: nothing buffered and ``data`` is exactly one intact frame (one
            # request per read). Decoded in place, with the same checks and the same event the
            # general path below gives; anything else falls through to it.
            magic, version, type_, flags, id_, length, hcrc = HEADER.unpack_from(data, 0)
            if (magic == MAGIC and version == VERSION and length <= self.max_payload
                    and len(data) == OVERHEAD + length
                    and zlib.crc32(data[:HEADER_SIZE - 4]) == hcrc):
                payload = bytes(data[HEADER_SIZE:HEADER_SIZE + length])
                if zlib.crc32(payload) == TRAILER.unpack_from(data, HEADER_SIZE + length)[0]:
                    return [Frame(type_, flags, id_, payload)]
        events: List[DecoderEvent] = []
        if data:
            self._buf += data
        buf = self._buf
        pos = self._pos
        end = len(buf)
        while True:
            if self._pending is not None:
                type_, flags, id_, length = self._pending
                need = HEADER_SIZE + length + TRAILER_SIZE
                if end - pos < need:
                    break
                self._pending = None
                payload_start = pos + HEADER_SIZE
                payload_end = payload_start + length
                payload = bytes(buf[payload_start:payload_end])
                (pcrc,) = TRAILER.unpack_from(buf, payload_end)
                self._flush_skipped(events)
                if zlib.crc32(payload) != pcrc:
                    events.append(CorruptFrame(type_, flags, id_, length, "crc"))
                else:
                    events.append(Frame(type_, flags, id_, payload))
                pos += need
                continue
            if end - pos < HEADER_SIZE:
                # Keep what might be the start of a header; count the rest as garbage.
                if end - pos >= len(MAGIC):
                    idx = buf.find(MAGIC, pos)
                    if idx < 0:
                        keep_from = max(pos, end - (len(MAGIC) - 1))
                        keep_from = self._magic_prefix_start(buf, keep_from, end)
                        self._skipped += keep_from - pos
                        pos = keep_from
                    elif idx > pos:
                        self._skipped += idx - pos
                        pos = idx
                break
            if buf[pos:pos + 4] != MAGIC:
                idx = buf.find(MAGIC, pos + 1)
                if idx < 0:
                    keep_from = self._magic_prefix_start(buf, max(pos + 1, end - (len(MAGIC) - 1)), end)
                    self._skipped += keep_from - pos
                    pos = keep_from
                    break
                self._skipped += idx - pos
                pos = idx
                continue
            magic, version, type_, flags, id_, length, hcrc = HEADER.unpack_from(buf, pos)
            if zlib.crc32(buf[pos:pos + HEADER_SIZE - 4]) != hcrc:
                self._skipped += 1
                pos += 1
                continue
            if version != VERSION:
                self._flush_skipped(events)
                events.append(UnsupportedVersion(version, type_, id_))
                pos += HEADER_SIZE
                continue
            if length > self.max_payload:
                self._flush_skipped(events)
                events.append(CorruptFrame(type_, flags, id_, length, "too_large"))
                # The length is authentic (the header CRC matched) but we will not buffer it:
                # skip the header and let the scan step over the payload.
                pos += HEADER_SIZE
                continue
            self._pending = (type_, flags, id_, length)
        if pos:
            del buf[:pos]
        self._pos = 0
        return events

    @staticmethod
    def _magic_prefix_start(buf: bytearray, start: int, end: int) -> int:
        """Index of the earliest suffix of buf[start:end] that is a proper prefix of MAGIC."""
        for i in range(start, end):
            if MAGIC.startswith(bytes(buf[i:end])):
                return i
        return end

    @property
    def partial(self) -> bool:
        """True while a frame's header has been accepted but its payload is incomplete."""
        return self._pending is not None

    def abandon_partial(self) -> List[DecoderEvent]:
        """Give up on an incomplete frame (its writer died mid-frame) and rescan after its magic.

        Whatever followed such a frame would otherwise be taken as the rest of its payload. The
        I/O layer calls this when a partial frame has stalled (see docs/protocol.md, *Truncated
        frames*); returns the events this produces, starting with CorruptFrame(reason="truncated").
        """
        if self._pending is None:
            return []
        type_, flags, id_, length = self._pending
        self._pending = None
        events: List[DecoderEvent] = []
        self._flush_skipped(events)
        events.append(CorruptFrame(type_, flags, id_, length, "truncated"))
        del self._buf[:1]
        self._skipped += 1
        return events + self.feed(b"")

    def _flush_skipped(self, events: List[DecoderEvent]) -> None:
        if self._skipped:
            events.append(Garbage(self._skipped))
            self._skipped = 0

    def flush_garbage(self) -> List[DecoderEvent]:
        """Report garbage counted so far (events are otherwise emitted before the next frame)."""
        events: List[DecoderEvent] = []
        self._flush_skipped(events)
        return events
