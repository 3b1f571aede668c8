"""Exec semantics (issue 13): a login-like environment for the user a command runs as, ``user``,
``cwd`` and ``env``, checked on both sides; against the REAL agent process (test_agent's harness),
the host library's request builder and the CLI. The real-VM proof is tests/vm/test_exec_env_e2e.py.
"""
import os
import pwd
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from guestlink import cli  # noqa: E402
from guestlink.agent import execs as agent_execs  # noqa: E402
from guestlink.host.execs import exec_request  # noqa: E402
from guestlink.host.options import ExecOptions  # noqa: E402
from guestlink.protocol import ProtocolViolation  # noqa: E402
from guestlink.protocol.ops import (EXEC_USER_CAPABILITY, MAX_ENV, MAX_ENV_TOTAL,  # noqa: E402
                                    ExecRequest)
from test_agent import SRC, Host  # noqa: E402
from test_host_fakeagent import ThreadedAgent, short_tmp  # noqa: E402

ROOT = os.geteuid() == 0
NOBODY = pwd.getpwnam("nobody")


class BareHost(Host):
    """The agent started with an EMPTY environment (no HOME, USER, PATH), as under a bare init."""

    def start(self, ctl_device=None, connect=True):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "guestlink.agent"] + self.args(ctl_device),
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                     env={"PYTHONPATH": os.path.abspath(SRC)})
        if connect:
            self.accept()
        return self


@pytest.fixture
def bare():
    h = BareHost()
    h.start()
    try:
        assert EXEC_USER_CAPABILITY in h.hello()["capabilities"]
        h.sync()
        yield h
    finally:
        h.close()


def env_of(result):
    assert result.reply.ok, result.reply
    return dict(line.split("=", 1) for line in result.stdout.decode().splitlines() if "=" in line)


def test_login_environment_under_an_empty_agent_environment(bare):
    me = pwd.getpwuid(os.geteuid())
    env = env_of(bare.run(argv=["/usr/bin/env"]))
    assert env["HOME"] == me.pw_dir and env["USER"] == env["LOGNAME"] == me.pw_name
    assert env["SHELL"] == (me.pw_shell or "/bin/sh") and env["LANG"] == "C.UTF-8"
    assert env["PATH"] == (agent_execs.ROOT_PATH if ROOT else agent_execs.USER_PATH)
    assert "PYTHONPATH" not in env  # the agent's own environment is not inherited
    # a bare command name is found through that PATH; ~ expands to HOME
    r = bare.run(shell="cd ~ && pwd && env | sort | head -c0")
    assert r.reply.ok and r.stdout == (me.pw_dir + "\n").encode()


def test_env_overrides_and_env_clear(bare):
    env = env_of(bare.run(argv=["/usr/bin/env"], env={"LANG": "de_DE.UTF-8", "HOME": "/tmp",
                                                      "EXTRA": "a=b c"}))
    assert env["LANG"] == "de_DE.UTF-8" and env["HOME"] == "/tmp" and env["EXTRA"] == "a=b c"
    assert "USER" in env
    env = env_of(bare.run(argv=["/usr/bin/env"], env={"ONLY": "1"}, env_clear=True))
    assert env == {"ONLY": "1"}


def test_cwd(bare):
    r = bare.run(argv=["/bin/pwd"], cwd="/tmp")
    assert r.reply.ok and r.stdout == b"/tmp\n"
    assert bare.call("exec", {"argv": ["true"], "cwd": "/etc/passwd"}).code == "not_a_directory"


@pytest.mark.skipif(not ROOT, reason="switching user needs root (the test VM runs its agent as root)")
def test_user_runs_with_their_ids_groups_and_environment(bare, tmp_path):
    r = bare.run(shell='id -u; id -g; id -G; echo "$HOME $USER $LOGNAME $PATH"', user="nobody",
                 cwd="/tmp")
    assert r.reply.ok, (r.reply, r.stderr)
    uid, gid, groups, env = r.stdout.decode().splitlines()
    assert (int(uid), int(gid)) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert set(map(int, groups.split())) == set(os.getgrouplist("nobody", NOBODY.pw_gid))
    assert env == "%s nobody nobody %s" % (NOBODY.pw_dir, agent_execs.USER_PATH)
    # the working directory is entered as the user: root's private directory is refused
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    r = bare.call("exec", {"argv": ["true"], "cwd": str(private), "user": "nobody"})
    assert r.code == "permission_denied" and "cannot enter working directory" in r.message
    r = bare.call("exec", {"argv": ["true"], "user": "no-such-user-x"})
    assert r.code == "not_found" and "no user 'no-such-user-x'" in r.message
    # the agent keeps working after the refusals
    assert bare.run(argv=["true"], user="root").reply.ok


def test_non_root_agent_refuses_another_user(monkeypatch):
    monkeypatch.setattr(agent_execs.os, "geteuid", lambda: 4242)
    with pytest.raises(agent_execs.OpError) as exc:
        agent_execs.run_as("root")
    assert exc.value.code == "permission_denied" and "does not run as root" in str(exc.value)
    with pytest.raises(agent_execs.OpError) as exc:
        agent_execs.run_as("no-such-user-x")
    assert exc.value.code == "not_found"


HOSTILE = [
    {"argv": ["true"], "env": {"A=B": "x"}},
    {"argv": ["true"], "env": {"": "x"}},
    {"argv": ["true"], "env": {"A": "x\0y"}},
    {"argv": ["true"], "env": {"A\0": "x"}},
    {"argv": ["true"], "env": {"V%d" % i: "" for i in range(MAX_ENV + 1)}},
    {"argv": ["true"], "env": {"V%d" % i: "x" * 70000 for i in range(3)}},  # > MAX_ENV_TOTAL
    {"argv": ["true"], "env": {"A": 1}},
    {"argv": ["true"], "env": ["A=1"]},
    {"argv": ["true"], "user": ""},
    {"argv": ["true"], "user": "-root"},
    {"argv": ["true"], "user": "ro ot"},
    {"argv": ["true"], "user": "r\u00f6ot"},
    {"argv": ["true"], "user": "x" * 65},
    {"argv": ["true"], "user": 0},
    {"argv": ["true"], "cwd": ""},
    {"argv": ["true"], "cwd": "/tmp\0/x"},
    {"argv": ["true"], "uid": 0},  # a field this agent does not know: refused, not ignored
]


def test_hostile_fields_are_refused_by_the_agent(bare):
    assert MAX_ENV_TOTAL < 3 * 70000
    for args in HOSTILE:
        r = bare.call("exec", args)
        assert r.code == "bad_request", (args if len(repr(args)) < 200 else list(args), r)
        with pytest.raises(ProtocolViolation):
            ExecRequest.from_wire(args)
    r = bare.call("exec", {"argv": ["true"], "uid": 0})
    assert "unknown field 'uid'" in r.message
    assert bare.run(argv=["true"]).reply.ok  # still serving


def test_the_host_refuses_what_the_agent_would(tmp_path):
    for env in ({"A=B": "x"}, {"A": "x\0"}, {"V%d" % i: "" for i in range(MAX_ENV + 1)}):
        with pytest.raises(ValueError):
            exec_request(["true"], ExecOptions(env=env))
    for user in ("", "a b", "-x", "x" * 65):
        with pytest.raises(ValueError):
            exec_request(["true"], ExecOptions(user=user))
    assert exec_request(["id"], ExecOptions(user="guest", cwd="~x", env={"K": "V"})) == {
        "argv": ["id"], "user": "guest", "cwd": "~x", "env": {"K": "V"},
        "output_limit": ExecOptions().output_limit}


def test_cli_refuses_bad_fields_before_connecting(capsys, tmp_path):
    path = os.path.join(short_tmp(tmp_path), "ctl.sock")  # nothing listens there
    for argv in (["--env", "A\0=1"], ["--user", "a b"], ["--user", ""], ["--cwd", ""]):
        code = cli.main(["exec", "--ctl", path] + argv + ["--", "true"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("guestlink: error: exec: ") and err.count("\n") == 1


def test_an_old_agent_without_the_capability_gets_a_clear_error(capsys, tmp_path):
    path = os.path.join(short_tmp(tmp_path), "ctl.sock")
    with ThreadedAgent(path) as agent:  # the fake agent predates exec.user
        assert EXEC_USER_CAPABILITY not in agent.description["capabilities"]
        code = cli.main(["exec", "--ctl", path, "--user", "guest", "--", "id"])
    err = capsys.readouterr().err
    assert code == 70 and err.count("\n") == 1
    assert "cannot run a command as another user: update the agent" in err


class NobodyHost(BareHost):
    """The real agent running as nobody (not root), with an empty environment."""

    def start(self, ctl_device=None, connect=True):
        os.chmod(self.dir, 0o755)  # the agent opens it to read its config (not writable)
        os.chmod(self.ctl, 0o777)
        os.makedirs(os.path.dirname(self.sock_path), exist_ok=True)
        os.chown(os.path.dirname(self.sock_path), NOBODY.pw_uid, NOBODY.pw_gid)
        for path in (self.config, self.handlers_dir):
            os.chmod(path, 0o755 if os.path.isdir(path) else 0o644)
        self._log = open(self.log_path, "ab")
        # the system's python: the test's may live where nobody cannot read (the agent is stdlib)
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        self.proc = subprocess.Popen([python, "-m", "guestlink.agent"] + self.args(ctl_device),
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                     env={"PYTHONPATH": os.path.abspath(SRC)}, cwd="/",
                                     user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[])
        if connect:
            self.accept()
        return self


@pytest.mark.skipif(not ROOT, reason="starting the agent as nobody needs root")
def test_a_non_root_agent_refuses_another_user_but_runs_its_own(tmp_path):
    h = NobodyHost()
    try:
        h.start()
        h.hello()
        h.sync()
        r = h.call("exec", {"argv": ["true"], "user": "root"})
        assert r.code == "permission_denied"
        assert r.message == ("cannot run as user 'root': the agent does not run as root (it runs "
                             "as uid %d)" % NOBODY.pw_uid)
        env = env_of(h.run(argv=["/usr/bin/env"], user="nobody"))  # itself: no switch needed
        assert env["USER"] == "nobody" and env["HOME"] == NOBODY.pw_dir
        assert env["PATH"] == agent_execs.USER_PATH
        assert h.run(argv=["/usr/bin/id", "-u"]).stdout == b"%d\n" % NOBODY.pw_uid
    finally:
        h.close()
