"""Payload codecs for the control channel, shared by agent, host and local clients.

Control payloads are UTF-8 JSON objects; topic messages and stream bytes are binary. Every parse
function validates what it returns and raises ProtocolViolation (never anything else) on bad input,
because the bytes come from the other side, which neither side trusts.
"""

import builtins
import itertools
import json
import math
import re
import struct
import zlib
from typing import Any, Dict, Optional, Pattern, Tuple

from . import codes
from .frames import FLAG_EOF, TRAILER, FrameType, Payload, encode_frame, encode_header

JSON = Dict[str, Any]

PROTOCOL_VERSION = 1

#: Bounds on fields, shared so both sides refuse the same things.
MAX_JSON_PAYLOAD = 256 * 1024
MAX_STRING = 4096
MAX_NAME = 255
MAX_LIST = 4096
MAX_NONCE = 64
MAX_TOPIC = 128
MAX_MESSAGE_DATA = 256 * 1024
MAX_OP = 64
#: Deepest nesting of arrays/objects either side sends or accepts: far more than any message
#: needs, far less than what would exhaust the decoder's recursion (or the consumer's).
MAX_JSON_DEPTH = 64
#: Longest run of digits in a number: bounds the quadratic cost of int() on a hostile payload
#: (Python < 3.11 has no limit of its own); a float's repr never has more than 17.
MAX_NUMBER_DIGITS = 64
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
TOPIC_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}\Z")
OP_RE = re.compile(r"\A[a-z][a-z0-9_.-]{0,63}\Z")


class ProtocolViolation(Exception):
    """The peer sent something that does not follow the protocol."""

    def __init__(self, message: str, code: str = codes.BAD_REQUEST) -> None:
        Exception.__init__(self, message)
        self.code = code


# --- JSON ---------------------------------------------------------------------------------------
#
# The one JSON loader of the protocol (control channel and data port alike): bounded in size,
# nesting depth and number length, and refusing NaN and infinities (including 1e400, which the
# stdlib silently turns into inf), so every consumer gets finite, shallow values or a
# ProtocolViolation.

def _reject_constant(name: str) -> Any:
    raise ProtocolViolation("JSON constant %s is not allowed" % name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolViolation("JSON number %s is out of range" % text[:40])
    return value


# Built once: json.dumps/loads with options construct a new encoder/decoder on every call, which
# is a measurable share of a ping's cost in an emulated guest.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)

# The shape check runs before the decoder, so it must not recurse either, and it works on the UTF-8
# bytes with C-level operations only (it sees every payload): strings are cut out first (so
# brackets and digits inside them do not count), then digits and brackets are looked at. For
# anything json.loads accepts this reads exactly the structure the decoder will build (a string
# ends at the first unescaped quote for both); for anything else the decoder fails anyway.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789" + bytes(c for c in range(256) if not 48 <= c <= 57),
                                  b"0" * 10 + b" " * 246)
_LONG_NUMBER = b"0" * (MAX_NUMBER_DIGITS + 1)
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_shape_problem(data: bytes) -> Optional[str]:
    """Why the JSON ``data`` is nested too deep or has too long a number, or None."""
    if b"\\" in data:
        bare = _JSON_STRING.sub(b"", data)
    else:  # the common case, and several times faster: quotes alternate
        bare = b"".join(data.split(b'"')[0::2])
    if _LONG_NUMBER in bare.translate(_DIGITS_AS_ZERO):
        return "a number has more than %d digits" % MAX_NUMBER_DIGITS
    if bare.count(b"[") + bare.count(b"{") > MAX_JSON_DEPTH:
        brackets = bare.translate(None, _NOT_BRACKET)
        if max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets))) > MAX_JSON_DEPTH:
            return "arrays and objects are nested more than %d deep" % MAX_JSON_DEPTH
    return None


def dump_json(obj: Any) -> bytes:
    """Encode a payload; ValueError (or TypeError for a non-JSON type) if the peer would refuse it."""
    try:
        text = _ENCODER.encode(obj)
    except RecursionError:
        raise ValueError("JSON payload is nested too deeply to encode")
    except ValueError as exc:
        if "JSON compliant" not in str(exc):
            raise
        raise ValueError("JSON payload contains NaN or an infinite number, which the protocol "
                         "does not allow")
    data = text.encode("utf-8")
    if len(data) > MAX_JSON_PAYLOAD:
        raise ValueError("JSON payload of %d bytes exceeds %d" % (len(data), MAX_JSON_PAYLOAD))
    problem = json_shape_problem(data)
    if problem is not None:
        raise ValueError("JSON payload refused: %s" % problem)
    return data


def load_json_object(payload: Payload, what: str = "payload") -> JSON:
    """Decode a JSON object received from the peer, or raise ProtocolViolation (nothing else)."""
    if len(payload) > MAX_JSON_PAYLOAD:
        raise ProtocolViolation("%s of %d bytes exceeds %d" % (what, len(payload), MAX_JSON_PAYLOAD),
                                codes.TOO_LARGE)
    data = bytes(payload)
    problem = json_shape_problem(data)
    if problem is not None:
        raise ProtocolViolation("%s is refused: %s" % (what, problem))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("%s is not valid UTF-8 JSON: %s" % (what, str(exc)[:200]))
    try:
        obj = _DECODER.decode(text)
    except ProtocolViolation as exc:
        raise ProtocolViolation("%s is refused: %s" % (what, exc))
    except (ValueError, RecursionError) as exc:
        raise ProtocolViolation("%s is not valid UTF-8 JSON: %s" % (what, str(exc)[:200]))
    if not isinstance(obj, dict):
        raise ProtocolViolation("%s must be a JSON object" % what)
    return obj


# --- field validation --------------------------------------------------------------------------

# A sentinel default: a field without a default is required. Typed Any so that every accessor can
# take it as its default whatever its return type.
_MISSING: Any = object()


class Fields:
    """Typed, bounded access to a JSON object received from the peer."""

    def __init__(self, obj: Any, where: builtins.str) -> None:
        if not isinstance(obj, dict):
            raise ProtocolViolation("%s must be an object" % where)
        self.obj: JSON = obj
        self.where = where

    def _get(self, key: builtins.str, default: Any) -> Any:
        value = self.obj.get(key, _MISSING)
        if value is _MISSING or value is None:
            if default is _MISSING:
                raise ProtocolViolation("%s: missing field %r" % (self.where, key))
            return _MISSING
        return value

    def _bad(self, key: builtins.str, expected: builtins.str) -> ProtocolViolation:
        return ProtocolViolation("%s: field %r must be %s" % (self.where, key, expected))

    def str(self, key: builtins.str, default: Any = _MISSING, max_len: builtins.int = MAX_STRING,
            pattern: Optional[Pattern[builtins.str]] = None) -> Any:
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if not isinstance(value, str) or len(value) > max_len:
            raise self._bad(key, "a string of at most %d characters" % max_len)
        if pattern is not None and not pattern.match(value):
            raise self._bad(key, "a string matching %s" % pattern.pattern)
        return value

    def int(self, key: builtins.str, default: Any = _MISSING, min: Optional[builtins.int] = INT64_MIN,
            max: Optional[builtins.int] = INT64_MAX) -> Any:
        """An integer in [min, max]; by default what a 64-bit OS call takes (a bigger one would
        raise OverflowError in whatever the value reaches, far from this check)."""
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer")
        if (min is not None and value < min) or (max is not None and value > max):
            raise self._bad(key, "an integer in [%s, %s]" % (min, max))
        return value

    def number(self, key: builtins.str, default: Any = _MISSING, min: Optional[float] = None,
               max: Optional[float] = None) -> Any:
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(key, "a number")
        if ((isinstance(value, float) and not math.isfinite(value))
                or (min is not None and value < min)
                or (max is not None and value > max)):
            raise self._bad(key, "a number in [%s, %s]" % (min, max))
        return value

    def bool(self, key: builtins.str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def str_list(self, key: builtins.str, default: Any = _MISSING, max_items: builtins.int = MAX_LIST,
                 max_len: builtins.int = MAX_STRING) -> Any:
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if (not isinstance(value, list) or len(value) > max_items
                or not all(isinstance(v, str) and len(v) <= max_len for v in value)):
            raise self._bad(key, "a list of at most %d strings" % max_items)
        return list(value)

    def str_map(self, key: builtins.str, default: Any = _MISSING, max_items: builtins.int = MAX_LIST,
                max_len: builtins.int = MAX_STRING) -> Any:
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if (not isinstance(value, dict) or len(value) > max_items
                or not all(isinstance(v, str) and len(v) <= max_len and len(k) <= max_len
                           for k, v in value.items())):
            raise self._bad(key, "an object of at most %d string values" % max_items)
        return dict(value)

    def object(self, key: builtins.str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if not isinstance(value, dict):
            raise self._bad(key, "an object")
        return Fields(value, "%s.%s" % (self.where, key))


# --- handshake ---------------------------------------------------------------------------------

def encode_hello(info: JSON) -> bytes:
    """HELLO: the agent announces itself. ``info`` is the dict described in docs/protocol.md."""
    return encode_frame(FrameType.HELLO, dump_json(info))


def parse_hello(payload: Payload) -> JSON:
    """Validate a HELLO or SYNC_ACK's agent description; returns a clean dict."""
    f = Fields(load_json_object(payload, "HELLO"), "HELLO")
    return {
        "agent": f.str("agent", max_len=MAX_NAME),
        "agent_version": f.str("agent_version", max_len=MAX_NAME),
        "protocol": f.int("protocol", min=0, max=0xFFFF),
        "capabilities": f.str_list("capabilities", default=[], max_items=256, max_len=MAX_NAME),
        "hostname": f.str("hostname", default="", max_len=MAX_NAME),
        "boot_id": f.str("boot_id", default="", max_len=MAX_NAME),
        "session": f.str("session", default="", max_len=MAX_NONCE),
    }


def encode_sync(nonce: str, protocol: int = PROTOCOL_VERSION) -> bytes:
    return encode_frame(FrameType.SYNC, dump_json({"nonce": nonce, "protocol": protocol}))


def parse_sync(payload: Payload) -> Tuple[str, int]:
    f = Fields(load_json_object(payload, "SYNC"), "SYNC")
    return f.str("nonce", max_len=MAX_NONCE), f.int("protocol", min=0, max=0xFFFF)


def encode_sync_ack(nonce: str, info: JSON) -> bytes:
    body = dict(info)
    body["nonce"] = nonce
    return encode_frame(FrameType.SYNC_ACK, dump_json(body))


def parse_sync_ack(payload: Payload) -> Tuple[str, JSON]:
    """Returns (nonce, agent description)."""
    obj = load_json_object(payload, "SYNC_ACK")
    nonce = Fields(obj, "SYNC_ACK").str("nonce", max_len=MAX_NONCE)
    return nonce, parse_hello(payload)


# --- requests and replies ----------------------------------------------------------------------

#: The payloads of the simplest request and its reply, as ``dump_json`` writes them: built once,
#: and recognised by their exact bytes on the hot path (see AgentSession.is_ping).
PING_PAYLOAD = dump_json({"op": "ping", "args": {}})
PONG_PAYLOAD = dump_json({"pong": True})


def encode_request(id: int, op: str, args: Optional[JSON] = None) -> bytes:
    if op == "ping" and not args:
        return encode_frame(FrameType.REQUEST, PING_PAYLOAD, id=id)  # the same bytes, dumped once
    return encode_frame(FrameType.REQUEST, dump_json({"op": op, "args": args or {}}), id=id)


def parse_request(payload: Payload) -> Tuple[str, Fields]:
    """Returns (op, Fields of args)."""
    f = Fields(load_json_object(payload, "REQUEST"), "REQUEST")
    op = f.str("op", max_len=MAX_OP, pattern=OP_RE)
    args = f.object("args", default=None)
    return op, (args if args is not None else Fields({}, "REQUEST.args"))


def encode_response(id: int, result: Optional[JSON] = None) -> bytes:
    return encode_frame(FrameType.RESPONSE, dump_json(result if result is not None else {}), id=id)


class PreparedResponse:
    """A RESPONSE body that never changes (ping's), encoded and checksummed once: each reply then
    costs one header, not a JSON dump, its shape check and a payload CRC."""

    __slots__ = ("payload", "trailer")

    def __init__(self, result: JSON) -> None:
        self.payload = dump_json(result)
        self.trailer = TRAILER.pack(zlib.crc32(self.payload))

    def frame(self, id: int) -> bytes:
        """The RESPONSE frame for request ``id`` (what ``encode_response(id, result)`` returns)."""
        return encode_header(FrameType.RESPONSE, len(self.payload), id=id) + self.payload + self.trailer


def parse_response(payload: Payload) -> JSON:
    if payload == PONG_PAYLOAD:  # the agent's ping reply: exactly these bytes load to this
        return {"pong": True}
    return load_json_object(payload, "RESPONSE")


def encode_event(id: int, event: JSON) -> bytes:
    return encode_frame(FrameType.EVENT, dump_json(event), id=id)


def parse_event(payload: Payload) -> JSON:
    return load_json_object(payload, "EVENT")


def encode_error(id: int, code: str, message: str, details: Optional[JSON] = None) -> bytes:
    body: JSON = {"code": code, "message": message[:MAX_STRING]}
    if details:
        body["details"] = details
    return encode_frame(FrameType.ERROR, dump_json(body), id=id)


def parse_error(payload: Payload) -> Tuple[str, str, JSON]:
    """Returns (code, message, details). Unknown codes are kept: the host maps them to RemoteError."""
    f = Fields(load_json_object(payload, "ERROR"), "ERROR")
    details = f.object("details", default=None)
    return (f.str("code", max_len=MAX_NAME), f.str("message", default="", max_len=MAX_STRING),
            details.obj if details is not None else {})


def encode_cancel(id: int) -> bytes:
    return encode_frame(FrameType.CANCEL, id=id)


# --- topic messages ----------------------------------------------------------------------------

_TOPIC_LEN = struct.Struct("!B")


def check_topic(topic: Any) -> str:
    if not isinstance(topic, str) or not TOPIC_RE.match(topic):
        raise ProtocolViolation("invalid topic %r: 1-128 characters of A-Z a-z 0-9 . _ : / -, "
                                "starting with a letter or digit" % (topic,))
    return topic


def encode_message(topic: str, data: Payload, id: int = 0) -> bytes:
    """MESSAGE: payload = topic length (1 byte), topic (ASCII), data (bytes)."""
    check_topic(topic)
    if len(data) > MAX_MESSAGE_DATA:
        raise ValueError("message of %d bytes exceeds %d" % (len(data), MAX_MESSAGE_DATA))
    raw = topic.encode("ascii")
    return encode_frame(FrameType.MESSAGE, _TOPIC_LEN.pack(len(raw)) + raw + bytes(data), id=id)


def parse_message(payload: Payload) -> Tuple[str, bytes]:
    """Returns (topic, data)."""
    if len(payload) < 1:
        raise ProtocolViolation("MESSAGE without a topic")
    n = payload[0]
    if len(payload) < 1 + n:
        raise ProtocolViolation("MESSAGE topic length beyond the payload")
    try:
        topic = bytes(payload[1:1 + n]).decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolViolation("MESSAGE topic is not ASCII")
    check_topic(topic)
    data = bytes(payload[1 + n:])
    if len(data) > MAX_MESSAGE_DATA:
        raise ProtocolViolation("MESSAGE data of %d bytes exceeds %d" % (len(data), MAX_MESSAGE_DATA),
                                codes.TOO_LARGE)
    return topic, data


# --- streams -----------------------------------------------------------------------------------

def encode_stream(id: int, stream: int, data: Payload, eof: bool = False) -> bytes:
    return encode_frame(FrameType.STREAM, data, flags=stream | (FLAG_EOF if eof else 0), id=id)


def stream_flags(flags: int) -> Tuple[int, bool]:
    """Returns (stream number, eof)."""
    return flags & 0xFF, bool(flags & FLAG_EOF)
