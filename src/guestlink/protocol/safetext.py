"""Make strings from the other side safe to print on a terminal.

A guest (or a disk image) controls hostnames, error messages, file names, log lines and manifest
fields. Printed raw, a string holding ESC sequences can set the window title, clear the screen or
draw a fake prompt; bidi controls can reorder what the operator reads. Every such string goes
through :func:`printable` before it reaches stderr, stdout (outside payload data) or a log line.
Payload data (exec output, ``listen`` data, ``cp -`` to stdout) stays raw, as ``cat`` prints it.

Stdlib-only and sans-I/O: both the host CLI and the agent use it.
"""

from typing import Any

# Unicode bidirectional formatting characters (UAX #9): embeddings, overrides, isolates, marks.
_BIDI = frozenset(
    [0x061C, 0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068,
     0x2069])
# Line/paragraph separators some terminals honour as newlines.
_SEPARATORS = frozenset([0x2028, 0x2029])


def _needs_escape(code: int) -> bool:
    return (code < 0x20 or 0x7F <= code <= 0x9F or code in _BIDI or code in _SEPARATORS)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return "\\x%02x" % code
    return "\\u%04x" % code


def printable(value: Any, keep_newlines: bool = False) -> str:
    """``value`` as text with every C0/C1 control, DEL and bidi control escaped (``\\x1b``).

    Tabs are escaped too; newlines only unless ``keep_newlines``. A backslash is left alone (the
    result is for a human to read, not to parse back). Non-strings are converted with ``str``
    first; bytes are decoded as UTF-8 with invalid sequences escaped.
    """
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("utf-8", "backslashreplace")
    elif isinstance(value, str):
        text = value
    else:
        text = str(value)
    if text.isprintable() and not any(ord(c) in _BIDI or ord(c) in _SEPARATORS for c in text):
        return text
    out = []
    for ch in text:
        if ch == "\n" and keep_newlines:
            out.append(ch)
        elif _needs_escape(ord(ch)):
            out.append(_escape(ch))
        else:
            out.append(ch)
    return "".join(out)
