"""Exec semantics end to end (issue 13): the real agent in the test VM, restarted with an EMPTY
environment (``execve(..., {})``, as a bare init or a minimal unit would start it), runs commands
with the login-like environment of their user; ``--user guest`` (uid/gid 1000, home /home/guest,
from testvm/build.py), ``--cwd``, ``--env``; hostile fields refused; all through the real CLI and
library over the real virtio_console driver."""
import asyncio
import json
import subprocess
import sys
import time

import pytest

from guestlink.host import errors
from guestlink.host.client import connect
from vmhelpers import cli_env

#: Replaces the running agent by one started with an empty environment: detached (new session,
#: stdio on /dev/console), it waits for the exec that started it to finish, tells the test bed's
#: init loop not to respawn, stops the old agent and execs the same command line with env {}.
RESTART = r"""
import os, signal, sys, time
pid = int(open("/run/guestlink-agent.pid").read())
argv = open("/proc/%d/cmdline" % pid, "rb").read().split(b"\0")[:-1]
if os.fork():
    os._exit(0)
os.setsid()
fd = os.open("/dev/console", os.O_RDWR)
for i in (0, 1, 2):
    os.dup2(fd, i)
time.sleep(1)
open("/run/guestlink-stopping", "w").close()
os.kill(pid, signal.SIGTERM)
deadline = time.time() + 20
while os.path.exists("/proc/%d" % pid) and time.time() < deadline:
    time.sleep(0.1)
os.execve("/usr/bin/python3", [b"/usr/bin/python3"] + argv[1:], {})
"""


def _cli(vm, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "guestlink"] + list(args), env=cli_env(vm),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bare_vm(make_vm):
    vm = make_vm()

    async def restart():
        async with connect(ctl=vm.ctl_path, data=vm.data_path, timeout=30) as c:
            old = (await c.run(["cat", "/run/guestlink-agent.pid"], check=True)).stdout
            await c.run(["python3", "-c", RESTART], check=True)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # the client reconnects to the new agent
                try:
                    pids = (await c.run(["pgrep", "-f", "guestlink-agent.pyz"], check=True,
                                        timeout=10)).stdout.split()
                    if old.strip() not in pids:
                        return pids
                except errors.GuestlinkError:
                    pass
                await asyncio.sleep(0.5)
            raise AssertionError("the agent was not restarted")

    pids = asyncio.run(restart())
    assert len(pids) == 1
    vm.bare_agent_pid = int(pids[0])
    return vm


def test_agent_runs_with_an_empty_environment(bare_vm):
    r = _cli(bare_vm, "exec", "--", "sh", "-c", "tr '\\0' '\\n' < /proc/%d/environ | wc -c"
             % bare_vm.bare_agent_pid)
    assert r.returncode == 0 and r.stdout.strip() == "0", r


def test_login_environment_for_root(bare_vm):
    r = _cli(bare_vm, "exec", "--json", "--", "sh", "-c",
             'echo "$HOME|$USER|$LOGNAME|$SHELL|$PATH|$LANG"; cd ~ && pwd; id -u')
    assert r.returncode == 0, r.stderr
    lines = json.loads(r.stdout)["stdout"].splitlines()
    assert lines == ["/root|root|root|/bin/sh|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                     "/sbin:/bin|C.UTF-8", "/root", "0"]


def test_user_guest_with_groups_home_and_cd(bare_vm):
    r = _cli(bare_vm, "exec", "--user", "guest", "--", "sh", "-c",
             'id -u; id -g; id -G; echo "$HOME|$USER|$PATH"; cd ~ && pwd && touch mine && '
             'stat -c %u:%g mine; pwd -P')
    assert r.returncode == 0, r.stderr
    uid, gid, groups, env, home, owner, cwd = r.stdout.splitlines()
    assert (uid, gid, sorted(groups.split())) == ("1000", "1000", ["100", "1000"])
    assert env == "/home/guest|guest|/usr/local/bin:/usr/bin:/bin"
    assert (home, owner, cwd) == ("/home/guest", "1000:1000", "/home/guest")
    # not root: root's files are closed to it, and a private directory as one to start in too
    assert _cli(bare_vm, "exec", "--", "mkdir", "-m", "700", "/root/private").returncode == 0
    r = _cli(bare_vm, "exec", "--user", "guest", "--", "sh", "-c", "touch /root/x")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = _cli(bare_vm, "exec", "--user", "guest", "--cwd", "/root/private", "--", "true")
    assert r.returncode == 126 and r.stderr.count("\n") == 1
    assert "guest" in r.stderr and "cannot enter working directory /root/private" in r.stderr


def test_cwd_and_env_override(bare_vm):
    r = _cli(bare_vm, "exec", "--cwd", "/tmp", "--env", "LANG=de_DE.UTF-8", "--env", "X=a=b c",
             "--env", "HOME=/var", "--", "sh", "-c", 'pwd; echo "$LANG|$X|$HOME|$USER"; cd ~; pwd')
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["/tmp", "de_DE.UTF-8|a=b c|/var|root", "/var"]

    async def lib():
        async with connect(ctl=bare_vm.ctl_path, data=bare_vm.data_path, timeout=30) as c:
            return await c.run("echo $HOME:$(id -un):$(pwd)", user="guest", cwd="/tmp",
                               env={"EXTRA": "1"}, check=True)
    assert asyncio.run(lib()).stdout == b"/home/guest:guest:/tmp\n"


def test_hostile_fields_are_refused(bare_vm):
    r = _cli(bare_vm, "exec", "--user", "no-such-user", "--", "true")
    assert r.returncode == 127 and r.stderr.count("\n") == 1
    assert "no user 'no-such-user'" in r.stderr

    async def raw():
        async with connect(ctl=bare_vm.ctl_path, data=bare_vm.data_path, timeout=30) as c:
            refused = []
            for args in ({"argv": ["true"], "env": {"A=B": "1"}},
                         {"argv": ["true"], "env": {"A": "x\0y"}},
                         {"argv": ["true"], "env": {"V%d" % i: "" for i in range(1025)}},
                         {"argv": ["true"], "user": "../root"},
                         {"argv": ["true"], "cwd": "/\0"},
                         {"argv": ["true"], "setuid": 0}):
                with pytest.raises(errors.BadRequest) as exc:
                    await c.call("exec", args)
                refused.append(str(exc.value))
            ok = await c.run(["true"])
            return refused, ok.returncode
    refused, rc = asyncio.run(raw())
    assert rc == 0 and "unknown field 'setuid'" in refused[-1]
