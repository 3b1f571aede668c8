"""Guest strings printed outside payload data are escaped (issue 9: terminal escape injection)."""
from guestlink.protocol.safetext import printable


def test_escape_sequences_are_neutralised():
    hostile = "ok\x1b]0;pwned\x07\x1b[2J\r\nroot# \x9b31m\x7f"
    out = printable(hostile)
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out and "\x7f" not in out
    assert "\r" not in out and "\n" not in out
    assert out.startswith("ok\\x1b]0;pwned\\x07\\x1b[2J\\x0d\\x0aroot# \\x9b31m\\x7f")


def test_bidi_and_separators_are_escaped():
    assert printable("a\u202eb\u2066c\u2028") == "a\\u202eb\\u2066c\\u2028"


def test_plain_text_and_unicode_pass_unchanged():
    for s in ("hello world", "naïve café — 日本", "C:\\path"):
        assert printable(s) == s


def test_newlines_kept_on_request_and_bytes_decoded():
    assert printable("a\nb\x1b", keep_newlines=True) == "a\nb\\x1b"
    assert printable(b"x\xff\x1b") == "x\\xff\\x1b"
    assert printable(42) == "42"
