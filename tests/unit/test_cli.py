"""The guestlink CLI: exit codes, one-line errors, output formats, against the fake agent."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import guestlink  # noqa: E402
from guestlink import cli  # noqa: E402
from guestlink.protocol import FrameType  # noqa: E402
from guestlink.protocol import messages as m  # noqa: E402
from test_host_fakeagent import (INFO, Reply, ThreadedAgent, raw_frame,  # noqa: E402
                                 short_tmp)

SRC = os.path.dirname(os.path.dirname(os.path.abspath(guestlink.__file__)))


@pytest.fixture
def path(tmp_path):
    return os.path.join(short_tmp(tmp_path), "ctl.sock")


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("GUESTLINK_CTL", raising=False)
    monkeypatch.delenv("GUESTLINK_DATA", raising=False)


def gl(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    assert err.count("\n") == 1 and err.startswith("guestlink: error: "), err
    assert "Traceback" not in err
    return err


def spawn(*argv, **kwargs):
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.Popen([sys.executable, "-m", "guestlink"] + list(argv), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


# --- connection errors ------------------------------------------------------------------------

def test_missing_socket_exits_69_with_one_line(capsys, path):
    code, out, err = gl(capsys, "ping", "--ctl", path)
    assert code == 69 and out == ""
    assert one_line(err) == "guestlink: error: control socket %s does not exist\n" % path


def test_nobody_listening_exits_69(capsys, path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    try:
        code, out, err = gl(capsys, "info", "--ctl", path)
    finally:
        s.close()
    assert code == 69 and "nobody is listening" in one_line(err)


def test_agent_not_answering_exits_75(capsys, path):
    with ThreadedAgent(path, silent=True):
        started = time.monotonic()
        code, out, err = gl(capsys, "ping", "--ctl", path, "--timeout", "0.3")
    assert code == 75 and time.monotonic() - started < 2
    assert "did not answer" in one_line(err)


def test_protocol_mismatch_exits_76(capsys, path):
    with ThreadedAgent(path, mismatch=True):
        code, out, err = gl(capsys, "ping", "--ctl", path)
    assert code == 76 and "protocol" in one_line(err)


def test_no_vm_given_is_a_usage_error(capsys, monkeypatch, path):
    code, out, err = gl(capsys, "ping")
    assert code == 2 and "--ctl" in one_line(err)
    monkeypatch.setenv("GUESTLINK_CTL", path)  # the environment supplies the default
    code, out, err = gl(capsys, "ping")
    assert code == 69 and path in err


def test_usage_errors_exit_2(capsys, path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["ping", "--timeout", "-1", "--ctl", path])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
    assert cli.main([]) == 2
    # refused before connecting: no socket needed
    assert gl(capsys, "exec", "--ctl", path, "--env", "NOEQUALS", "--", "true")[0] == 2
    assert gl(capsys, "exec", "--ctl", path)[0] == 2
    assert gl(capsys, "exec", "--ctl", path, "--")[0] == 2
    assert gl(capsys, "call", "x", "--ctl", path, "--json-args", "[1]")[0] == 2
    code, out, err = gl(capsys, "call", "x", "--ctl", path, "--arg", "novalue")
    assert code == 2 and "KEY=VALUE" in one_line(err)
    with ThreadedAgent(path):
        assert gl(capsys, "send", "bad topic!", "x", "--ctl", path)[0] == 2
        assert gl(capsys, "call", "Bad Op", "--ctl", path)[0] == 2
    capsys.readouterr()


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for code in ("69", "70", "74", "75", "76", "77", "124", "130"):
        assert "\n  %3s  " % code in out or "\n   %s  " % code in out, code


# --- commands ---------------------------------------------------------------------------------

def test_ping_and_info(capsys, path):
    with ThreadedAgent(path):
        code, out, err = gl(capsys, "ping", "--ctl", path)
        assert code == 0 and out.startswith("pong from fakevm") and err == ""
        code, out, err = gl(capsys, "ping", "--ctl", path, "--json")
        assert code == 0 and json.loads(out)["rtt"] > 0
        code, out, err = gl(capsys, "info", "--ctl", path, "--json", "--data", path + ".d")
        info = json.loads(out)
        assert code == 0 and info["hostname"] == "fakevm" and info["kernel"]["machine"] == "x86_64"
        code, out, err = gl(capsys, "info", "--ctl", path)
        assert code == 0 and "hostname:  fakevm" in out and "6.1.0-cloud-amd64" in out


def test_exec_streams_and_propagates_status(capsys, path):
    with ThreadedAgent(path) as agent:
        code, out, err = gl(capsys, "exec", "-n", "--ctl", path, "--", "both", "7")
        assert (code, out, err) == (7, "to-stdout\n", "to-stderr\n")
        code, out, err = gl(capsys, "exec", "-n", "--ctl", path, "--", "kill", "15")
        assert code == 128 + 15
        code, out, err = gl(capsys, "exec", "-n", "--ctl", path, "--timeout", "0.2", "--", "sleep", "9")
        assert code == 124 and out == "sleeping\n"
        code, out, err = gl(capsys, "exec", "-n", "--ctl", path, "--", "fail", "42")
        assert code == 42 and err == "failing\n"
        code, out, err = gl(capsys, "exec", "-n", "--ctl", path, "--", "fail", "300")
        assert code == 76 and "malformed exec reply" in one_line(err.replace("failing\n", ""))
        code, out, err = gl(capsys, "exec", "-n", "--ctl", path, "--", "missing")
        assert code == 127 and "no such program" in one_line(err)
        code, out, err = gl(capsys, "exec", "-n", "--ctl", path, "--", "forbidden")
        assert code == 77 and "policy" in one_line(err)
        code, out, err = gl(capsys, "exec", "-n", "--ctl", path, "--shell", "--env", "A=1",
                            "--cwd", "/tmp", "--", "echo", "a", "b")
        assert code == 0 and out == "a b\n"
        assert agent.execs[-1]["shell"] == "echo a b" and agent.execs[-1]["env"] == {"A": "1"}
        assert agent.execs[-1]["cwd"] == "/tmp" and "stdin" not in agent.execs[-1]
        code, out, err = gl(capsys, "exec", "-n", "--ctl", path, "echo", "no-dashes")
        assert code == 0 and out == "no-dashes\n"


def test_exec_json(capsys, path):
    with ThreadedAgent(path):
        code, out, err = gl(capsys, "exec", "-n", "--json", "--ctl", path, "--", "both", "3")
        obj = json.loads(out)
        assert code == 3 and err == ""
        assert (obj["returncode"], obj["stdout"], obj["stderr"]) == (3, "to-stdout\n", "to-stderr\n")
        assert obj["timed_out"] is False and obj["signal"] is None and "duration" in obj
        assert "stdout_base64" not in obj
        code, out, err = gl(capsys, "exec", "-n", "--json", "--ctl", path, "--", "binary")
        obj = json.loads(out)
        assert obj["stdout_base64"] == "//4AQQ==" and obj["stdout"] == "\ufffd\ufffd\x00A"
        code, out, err = gl(capsys, "exec", "-n", "--json", "--timeout", "0.2", "--ctl", path,
                            "--", "sleep", "5")
        obj = json.loads(out)
        assert code == 124 and obj["timed_out"] is True and obj["stdout"] == "sleeping\n"


def test_exec_connection_lost_exits_74(capsys, path):
    helper = ThreadedAgent(path)
    with helper as agent:
        def drop_once_running():
            deadline = time.monotonic() + 10
            while not agent.execs and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)
            helper.call(agent.drop)
        timer = threading.Thread(target=drop_once_running)
        timer.start()
        code, out, err = gl(capsys, "exec", "-n", "--ctl", path, "--", "sleep", "9")
        timer.join()
    assert code == 74 and "connection lost" in one_line(err) and out == "sleeping\n"


def test_send_listen_call_power(capsys, path):
    helper = ThreadedAgent(path, delivered=3)

    async def greet(conn, id_, args):
        return {"greeting": "hello " + args.str("name"), "n": args.int("n", default=0)}

    with helper as agent:
        agent.handlers["greet"] = greet
        code, out, err = gl(capsys, "send", "--ctl", path, "host.orders", "go")
        assert code == 0 and out == "delivered to 3 subscribers\n"
        code, out, err = gl(capsys, "send", "--ctl", path, "--json", "host.orders", "again")
        assert json.loads(out) == {"delivered": 3}
        assert agent.published == [("host.orders", b"go"), ("host.orders", b"again")]

        stop = threading.Event()

        def ticker():
            i = 0
            while not stop.wait(0.05):
                helper.call(agent.push, "ticks", b"tick %d" % i)
                helper.call(agent.push, "other", b"ignored")
                i += 1
        t = threading.Thread(target=ticker)
        t.start()
        try:
            code, out, err = gl(capsys, "listen", "--ctl", path, "--json", "--count", "2", "ticks")
            code2, out2, err2 = gl(capsys, "listen", "--ctl", path, "--count", "1", "ticks")
        finally:
            stop.set()
            t.join()
        lines = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and len(lines) == 2
        assert all(l["topic"] == "ticks" and l["data"].startswith("tick ") for l in lines)
        assert code2 == 0 and out2.startswith("tick ") and out2.count("\n") == 1

        code, out, err = gl(capsys, "call", "--ctl", path, "greet", "--arg", "name=cli",
                            "--json-args", '{"n": 5}', "--json")
        assert code == 0 and json.loads(out) == {"greeting": "hello cli", "n": 5}
        code, out, err = gl(capsys, "call", "--ctl", path, "nope")
        assert code == 70 and "unknown_command" in one_line(err)
        assert gl(capsys, "shutdown", "--ctl", path)[0] == 0
        assert gl(capsys, "reboot", "--ctl", path)[0] == 0
        assert agent.power == ["shutdown", "reboot"]


def test_agent_bundle(capsys, tmp_path):
    target = tmp_path / "agent.pyz"
    code, out, err = gl(capsys, "agent-bundle", "-o", str(target))
    assert code == 0 and target.stat().st_size > 1000 and os.access(str(target), os.X_OK)
    code, out, err = gl(capsys, "agent-bundle", "-o", str(tmp_path / "no" / "such" / "dir.pyz"))
    assert code == 73 and "cannot write" in one_line(err)


def test_agent_delegates_to_the_agent_cli(monkeypatch):
    import types
    calls = []
    fake = types.ModuleType("guestlink.agent.cli")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "guestlink.agent.cli", fake)
    import guestlink.agent
    monkeypatch.setattr(guestlink.agent, "cli", fake, raising=False)
    assert cli.main(["agent", "--config", "/etc/x"]) == 0
    assert cli.main(["agent"]) == 0
    assert cli.main(["agent", "send", "t", "d"]) == 0
    assert calls == [["run", "--config", "/etc/x"], ["run"], ["send", "t", "d"]]


def test_exit_code_table_is_complete():
    from guestlink.host import errors as E
    assert cli.exit_code_for(E.SocketNotFound("x")) == 69
    assert cli.exit_code_for(E.NotListening("x")) == 69
    assert cli.exit_code_for(E.PermissionDenied("x")) == 77
    assert cli.exit_code_for(E.AgentNotResponding("x")) == 75
    assert cli.exit_code_for(E.RequestTimeout("x")) == 75
    assert cli.exit_code_for(E.ProtocolMismatch("x")) == 76
    assert cli.exit_code_for(E.ProtocolError("x")) == 76
    assert cli.exit_code_for(E.ConnectionLost("x")) == 74
    assert cli.exit_code_for(E.RequestNotSent("x")) == 74
    assert cli.exit_code_for(E.remote_error("denied", "no")) == 77
    assert cli.exit_code_for(E.remote_error("internal", "bug")) == 70
    assert cli.exit_code_for(E.remote_error("never_heard_of", "?")) == 70
    assert cli.exit_code_for(E.remote_error("not_found", "?"), "exec") == 127
    assert cli.exit_code_for(E.remote_error("permission_denied", "?"), "exec") == 126


# --- real processes: stdin forwarding and Ctrl-C ----------------------------------------------

def test_exec_forwards_piped_stdin(path):
    with ThreadedAgent(path) as agent:
        proc = spawn("exec", "--ctl", path, "--", "cat", stdin=subprocess.PIPE)
        out, err = proc.communicate(b"piped \x00 bytes", timeout=20)
    assert proc.returncode == 0, err
    assert out == b"piped \x00 bytes" and agent.execs[-1]["stdin"] is True


def test_ctrl_c_cancels_the_remote_command_and_exits_130(path):
    with ThreadedAgent(path) as agent:
        proc = spawn("exec", "-n", "--ctl", path, "--", "sleep", "30", stdin=subprocess.DEVNULL)
        line = proc.stdout.readline()  # "sleeping": the command runs
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        deadline = time.monotonic() + 2
        while not agent.cancels and time.monotonic() < deadline:
            time.sleep(0.02)
    assert line == b"sleeping\n"
    assert proc.returncode == 130 and err == b""
    assert len(agent.cancels) == 1


# --- a hostile guest: escaping, no tracebacks, finite timeouts, truncation ------------------------

EVIL = "\x1b]0;pwned\x07\x1b[2J\x1b[H\u202eroot@host:~# \x9b31m\x7f"


def assert_inert(text):
    """Nothing a terminal would act on: no ESC/CSI/BEL/DEL or bidi override, at most newlines."""
    for bad in ("\x1b", "\x9b", "\x07", "\x7f", "\u202e"):
        assert bad not in text, repr(text)


def test_guest_strings_are_escaped_in_every_text_output(capsys, path):
    hostile_info = dict(INFO, hostname=EVIL, os_release={"PRETTY_NAME": EVIL}, python=EVIL,
                        addresses=[{"interface": EVIL, "family": "inet", "address": EVIL}],
                        kernel={"release": EVIL, "version": EVIL, "machine": EVIL},
                        agent_version=EVIL, boot_id=EVIL)

    async def info(conn, id_, args):
        return hostile_info

    async def greet(conn, id_, args):
        raise Reply("internal", "failed: " + EVIL)

    async def evil_exec(conn, id_, args):
        raise Reply("not_found", "no such program: " + EVIL)

    helper = ThreadedAgent(path, handlers={"info": info, "greet": greet, "exec": evil_exec})
    helper.agent.description.update(hostname=EVIL, agent_version=EVIL)
    with helper:
        code, out, err = gl(capsys, "ping", "--ctl", path)
        assert code == 0 and out.startswith("pong from \\x1b]0;pwned\\x07")
        assert_inert(out + err)
        code, out, err = gl(capsys, "info", "--ctl", path)
        assert code == 0 and "hostname:  \\x1b]0;pwned" in out and out.count("\n") == 8
        assert_inert(out + err)
        code, out, err = gl(capsys, "info", "--ctl", path, "--json")  # JSON escapes by itself
        assert code == 0 and json.loads(out)["hostname"] == EVIL
        assert_inert(out + err)
        code, out, err = gl(capsys, "call", "--ctl", path, "greet")
        assert code == 70 and "failed: \\x1b]0;pwned" in one_line(err)
        assert_inert(out + err)
        code, out, err = gl(capsys, "exec", "-n", "--ctl", path, "--", "x")
        assert code == 127 and "no such program: \\x1b" in one_line(err)
        assert_inert(out + err)


def test_an_agent_connection_error_is_logged_escaped(capsys, caplog, path):
    helper = ThreadedAgent(path)
    with helper as agent:
        def evil_error():
            for conn in agent.conns:
                conn.send(raw_frame(FrameType.ERROR, json.dumps(
                    {"code": "internal", "message": EVIL}).encode(), 0))

        async def greet(conn, id_, args):
            evil_error()
            await asyncio.sleep(0.2)
            return {"ok": True}

        agent.handlers["greet"] = greet
        code, out, err = gl(capsys, "call", "--ctl", path, "greet")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert code == 0 and "connection error: internal: \\x1b]0;pwned" in logged
    assert_inert(out + err + logged)


def test_an_unexpected_exception_is_one_escaped_line_exit_70(capsys, path, monkeypatch):
    from guestlink.protocol import ProtocolViolation

    async def leaky(vm, args):
        raise ProtocolViolation("bad reply " + EVIL + "\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "ping", leaky)
    with ThreadedAgent(path):
        code, out, err = gl(capsys, "ping", "--ctl", path)
        assert code == 70 and out == ""
        assert err.startswith("guestlink: internal error: ProtocolViolation: bad reply \\x1b]0;")
        assert err.endswith("\\x0asecond line; please report it\n") and err.count("\n") == 1
        assert_inert(err)
        monkeypatch.setenv("GUESTLINK_DEBUG", "1")
        code, out, err = gl(capsys, "ping", "--ctl", path)
    assert code == 70 and "Traceback (most recent call last)" in err
    assert err.endswith("; please report it\n")


def test_the_agent_cli_has_the_same_last_resort(capsys, monkeypatch):
    from guestlink.agent import cli as agent_cli

    def broken(args):
        raise KeyError("\x1b[2Jboom")

    monkeypatch.setattr(agent_cli, "cmd_send", broken)
    monkeypatch.delenv("GUESTLINK_DEBUG", raising=False)
    code = agent_cli.main(["send", "topic", "data"])
    out, err = capsys.readouterr()
    assert code == 70 and out == ""
    assert err == "guestlink-agent: internal error: KeyError: '\\x1b[2Jboom'; please report it\n"


@pytest.mark.parametrize("argv", [
    ["ping", "--timeout", "inf"], ["ping", "--timeout", "nan"], ["info", "--timeout", "-1"],
    ["ping", "--timeout", "1e12"], ["exec", "--timeout", "inf", "--", "true"],
    ["exec", "--connect-timeout", "nan", "--", "true"], ["run", "--connect-timeout", "inf", "x"],
    ["ping", "--queue-timeout", "inf"],
    ["ping", "--queue-timeout", "-0.5"], ["list", "--timeout", "inf"],
], ids=" ".join)
def test_non_finite_or_huge_timeouts_are_usage_errors(capsys, path, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + (["--ctl", path] if argv[0] != "list" else []))
    out, err = capsys.readouterr()
    assert exc.value.code == cli.EXIT_USAGE and out == ""
    assert "number of seconds" in err and "Traceback" not in err


def test_exec_says_when_the_agent_cut_its_output(capsys, path):
    async def cut(conn, id_, args):
        conn.send(m.encode_event(id_, {"event": "started", "pid": 7}))
        conn.send(m.encode_stream(id_, 1, b"first part"))
        conn.send(m.encode_stream(id_, 1, b"", eof=True))
        conn.send(m.encode_stream(id_, 2, b"", eof=True))
        return {"returncode": 0, "stdout_truncated": True, "stderr_truncated": False}

    with ThreadedAgent(path, handlers={"exec": cut}):
        code, out, err = gl(capsys, "exec", "-n", "--ctl", path, "--", "big")
        assert code == 0 and out == "first part"
        assert err == ("guestlink: warning: the command's stdout was cut at the output limit; "
                       "the rest was dropped\n")
        code, out, err = gl(capsys, "exec", "-n", "--json", "--ctl", path, "--", "big")
        assert code == 0 and json.loads(out)["stdout_truncated"] is True and err == ""


def _stubborn_exec(conn, id_, args):
    """A command whose cancel the guest never confirms (a hung process, a slow agent)."""
    async def handler(conn, id_, args):
        conn.send(m.encode_event(id_, {"event": "started", "pid": 9}))
        conn.send(m.encode_stream(id_, 1, b"running\n"))
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                continue
    return handler(conn, id_, args)


def test_ctrl_c_twice_ends_at_once_when_the_guest_does_not_confirm(path):
    with ThreadedAgent(path, handlers={"exec": _stubborn_exec}) as agent:
        proc = spawn("exec", "-n", "--ctl", path, "--connect-timeout", "60", "--", "hang",
                     stdin=subprocess.DEVNULL)
        try:
            assert proc.stdout.readline() == b"running\n"
            proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 5
            while not agent.cancels and time.monotonic() < deadline:
                time.sleep(0.02)
            assert agent.cancels, "the first Ctrl-C did not cancel the command in the guest"
            assert proc.poll() is None  # it waits for the guest to confirm the cancel
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=5)
            elapsed = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
            out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130 and elapsed < 3
    assert b"Traceback" not in err


def test_ctrl_c_during_a_request_storm_always_exits_130(path):
    """Ctrl-C lands while replies complete in a tight loop (the race wait_for lost): the first
    SIGINT ends the command every time, promptly."""
    async def spam_exec(conn, id_, args):
        conn.send(m.encode_event(id_, {"event": "started", "pid": 3}))
        while True:
            conn.send(m.encode_stream(id_, 2, b"."))
            await asyncio.sleep(0.001)

    with ThreadedAgent(path, handlers={"exec": spam_exec}):
        for _ in range(3):
            proc = spawn("exec", "-n", "--ctl", path, "--", "spam", stdin=subprocess.DEVNULL)
            try:
                assert proc.stderr.read(1) == b"."
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=15)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate(timeout=10)
            assert proc.returncode == 130


def test_list_escapes_what_the_agents_say(capsys, path, monkeypatch):
    import types

    from guestlink import libvirt as L

    chan = types.SimpleNamespace(path=path, state="connected")
    row = types.SimpleNamespace(id=3, name="vm1", uuid="u", state="running", ctl=chan, data=None,
                                names=types.SimpleNamespace(ctl=L.CTL_NAME, data=L.DATA_NAME))
    monkeypatch.setattr(L, "backend", lambda uri: types.SimpleNamespace(uri="test:///", name="fake",
                                                                         hop=None))
    monkeypatch.setattr(L, "list_domains", lambda *a, **kw: [row])
    helper = ThreadedAgent(path)
    helper.agent.description.update(hostname=EVIL, agent_version=EVIL)
    with helper:
        code, out, err = gl(capsys, "list", "--verbose")
    assert code == 0 and "vm1" in out and "\\x1b]0;pwned" in out
    assert_inert(out + err)


def test_an_exception_no_task_awaited_is_one_line_not_a_traceback(capsys, path, monkeypatch):
    async def orphan(vm, args):
        async def fails():
            raise RuntimeError("orphan \x1b[2J")
        task = asyncio.ensure_future(fails())
        await asyncio.sleep(0.01)
        del task  # never awaited: asyncio reports it when the task is collected
        import gc
        gc.collect()
        return 0

    monkeypatch.setitem(cli.COMMANDS, "ping", orphan)
    monkeypatch.delenv("GUESTLINK_DEBUG", raising=False)
    with ThreadedAgent(path):
        code, out, err = gl(capsys, "ping", "--ctl", path)
    assert code == 0
    assert err == "guestlink: warning: internal: RuntimeError: orphan \\x1b[2J\n"


@pytest.mark.parametrize("argv", [["list"], ["image", "status", "/nonexistent.img"]], ids=" ".join)
def test_ctrl_c_in_any_command_is_130_without_a_traceback(capsys, monkeypatch, argv):
    from guestlink.cli import libvirt as libvirt_cli
    from guestlink.cli import image as image_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(libvirt_cli, "run", interrupted)
    monkeypatch.setattr(image_cli, "run", interrupted)
    code, out, err = gl(capsys, *argv)
    assert (code, out, err) == (130, "", "")
