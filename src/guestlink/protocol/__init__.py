"""The sans-I/O protocol core: frames, payload codecs, the session rules and the error-code table.

Nothing in this package performs I/O or imports socket, asyncio, selectors, subprocess or similar;
the guest agent's poll loop and the host's asyncio client both drive the same code with bytes.
Stdlib-only, CPython >= 3.8.
"""
from . import codes
from .frames import (FLAG_EOF, MAGIC, MAX_PAYLOAD, STREAM_STDERR, STREAM_STDIN, STREAM_STDOUT,
                     CorruptFrame, Frame, FrameDecoder, FrameType, Garbage, UnsupportedVersion,
                     encode_frame, encode_parts, frame_type_name)
from .messages import PROTOCOL_VERSION, Fields, ProtocolViolation

__all__ = [
    "codes", "FLAG_EOF", "MAGIC", "MAX_PAYLOAD", "STREAM_STDERR", "STREAM_STDIN", "STREAM_STDOUT",
    "CorruptFrame", "Frame", "FrameDecoder", "FrameType", "Garbage", "UnsupportedVersion",
    "encode_frame", "encode_parts", "frame_type_name", "PROTOCOL_VERSION", "Fields", "ProtocolViolation",
]
