"""``guestlink cp`` against the fake agent: Ctrl-C cancels the transfer and says so in one line."""
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import guestlink  # noqa: E402
from test_host_fakeagent import ThreadedAgent, short_tmp  # noqa: E402

SRC = os.path.dirname(os.path.dirname(os.path.abspath(guestlink.__file__)))


def test_ctrl_c_during_cp_cancels_it_and_says_what_became_of_it(tmp_path):
    d = short_tmp(tmp_path)
    ctl, data = os.path.join(d, "ctl.sock"), os.path.join(d, "data.sock")
    data_server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # stands in for the data port
    data_server.bind(data)
    data_server.listen(1)
    src = tmp_path / "f"
    src.write_bytes(b"data")
    opened = threading.Event()

    async def transfer_open(conn, id_, args):  # never gets ready: the CLI waits until Ctrl-C
        opened.set()
        await asyncio.sleep(3600)

    try:
        with ThreadedAgent(ctl, handlers={"transfer.open": transfer_open}) as agent:
            proc = subprocess.Popen(
                [sys.executable, "-m", "guestlink", "cp", "--ctl", ctl, "--data", data, str(src),
                 ":/tmp/f"], env=dict(os.environ, PYTHONPATH=SRC), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                assert opened.wait(20), "the CLI never asked for the transfer"
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=20)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            deadline = time.monotonic() + 2
            while not agent.cancels and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        data_server.close()
    assert proc.returncode == 130 and out == b""
    assert err == (b"guestlink: interrupted: the copy was cancelled (its partial data was removed); "
                   b"run it again to copy, --resume cannot continue a cancelled copy\n")
    assert len(agent.cancels) == 1  # the agent was told (it drops its temp file)


def _cp(capsys, *argv):
    from guestlink import cli
    code = cli.main(["cp", "--ctl", "/nonexistent/ctl.sock"] + list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_several_sources_are_checked_before_connecting(capsys, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a")
    b.write_text("b")
    cases = [
        ([str(a), ":/tmp/x", ":/tmp/"], "cp: the sources must all be on one side and DST on the "
                                        "other (:PATH or VM:PATH names the guest)"),
        ([":/tmp/a", ":/tmp/b", str(a)], "cp: target %r is not a directory (several sources)" % str(a)),
        ([":/tmp/a", ":/tmp/b", str(tmp_path / "missing")],
         "cp: target %r is not a directory (several sources)" % str(tmp_path / "missing")),
        (["-", str(a), ":/tmp/"], "cp: - (stdin/stdout) takes a single source"),
        ([":/tmp/a", ":/tmp/b", "-"], "cp: - (stdin/stdout) takes a single source"),
        ([str(a), str(b), ":tmp/"], "cp: the guest path must be absolute, not 'tmp/'"),
        ([":/tmp/a", "vm2:/tmp/b", str(tmp_path)],
         "cp: the guest paths name different VMs (the default VM, vm2)"),
        (["vm1:/tmp/a", "vm2:/tmp/b", str(tmp_path)], "cp: the guest paths name different VMs "
                                                      "(vm1, vm2)"),
        ([str(a), str(b)], "cp: exactly one of SRC and DST must name the guest (:PATH or VM:PATH)"),
    ]
    for argv, message in cases:
        code, out, err = _cp(capsys, *argv)
        assert (code, out, err) == (2, "", "guestlink: error: %s\n" % message), argv


def test_several_sources_past_the_checks_reach_the_vm(capsys, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a")
    b.write_text("b")
    code, out, err = _cp(capsys, str(a), str(b), ":/tmp/")
    assert code == 69 and err == ("guestlink: error: control socket /nonexistent/ctl.sock does "
                                  "not exist\n")
    code, out, err = _cp(capsys, ":/tmp/a", ":/tmp/b", str(tmp_path))
    assert code == 69


def test_a_missing_local_file_is_named(capsys, tmp_path):
    from guestlink import cli
    err = cli.local_error(FileNotFoundError(2, "No such file or directory", str(tmp_path / "nope")))
    assert err == "local I/O error: %s: No such file or directory" % (tmp_path / "nope")
    assert cli.local_error(IsADirectoryError(21, "/x is a directory (use -r)")) == \
        "local I/O error: /x is a directory (use -r)"


def test_guest_messages_and_names_are_printed_escaped(capsys, tmp_path):
    """A guest's error message (and a label) reach the terminal with their controls escaped;
    --json output stays JSON."""
    import io
    import json

    from guestlink import cli
    from guestlink.cli.common import ProgressBar
    from guestlink.protocol import codes
    from test_host_fakeagent import Reply

    evil = "gone\x1b]0;pwned\x07\x1b[2J\u202e"

    async def fs_stat(conn, id_, args):
        raise Reply(codes.NOT_FOUND, "%s: %s" % (args.str("path"), evil))

    d = short_tmp(tmp_path)
    ctl = os.path.join(d, "ctl.sock")
    argv = ["cp", "--ctl", ctl, "--data", ctl + ".data", ":/a\x1b[1m", ":/b", str(tmp_path)]
    with ThreadedAgent(ctl, handlers={"fs.stat": fs_stat}):
        code = cli.main(argv)
        out, err = capsys.readouterr()
        json_code = cli.main(argv[:1] + ["--json"] + argv[1:])
        json_out, _ = capsys.readouterr()
    assert code != 0 and out == ""
    lines = err.splitlines()
    assert len(lines) == 2 and all(line.startswith("guestlink: error: ") for line in lines)
    assert "\x1b" not in err and "\x07" not in err and "\u202e" not in err
    assert "/a\\x1b[1m: gone\\x1b]0;pwned\\x07\\x1b[2J\\u202e" in lines[0]
    errors = json.loads(json_out)["errors"]
    assert json_code == code and errors[0]["error"].startswith("/a\x1b[1m: " + evil)

    stream = io.StringIO()
    bar = ProgressBar("f\x1b]0;x\x07", stream=stream)
    bar(1, 2)
    assert "f\\x1b]0;x\\x07 [" in stream.getvalue() and "\x07" not in stream.getvalue()
