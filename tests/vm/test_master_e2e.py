"""The control master (docs/master.md) against the real agent in one QEMU guest (issue 14).

Every test gets its own master: a private socket directory (``GUESTLINK_MASTER_SOCKET``) and
``GUESTLINK_MASTER=1``, so the real ``guestlink`` commands (separate processes, as a user runs
them) start or share it; it is stopped at the end of the test. One VM serves the module; the
test that reboots it comes last.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from testvm import TestVM
from vmhelpers import cli_env, sha

AGENT = "/opt/guestlink/guestlink-agent.pyz"
NOBODY = 65534


class Master:
    """The environment of one test's master, and ``guestlink`` run in it."""

    def __init__(self, vm: TestVM, directory: str) -> None:
        self.vm = vm
        self.socket = os.path.join(directory, "master.sock")
        self.env = cli_env(vm)
        self.env.update(GUESTLINK_MASTER="1", GUESTLINK_MASTER_SOCKET=self.socket,
                        GUESTLINK_PERSIST="60s")

    def argv(self, *args: Any) -> List[str]:
        return [sys.executable, "-m", "guestlink"] + [str(a) for a in args]

    def gl(self, *args: Any, timeout: float = 120, check: bool = False,
           env: Optional[Dict[str, str]] = None) -> "subprocess.CompletedProcess[str]":
        r = subprocess.run(self.argv(*args), env=env or self.env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=timeout)
        if check:
            assert r.returncode == 0, "guestlink %s -> %d: %s%s" % (
                " ".join(map(str, args)), r.returncode, r.stdout[-2000:], r.stderr[-2000:])
        return r

    def popen(self, *args: Any) -> "subprocess.Popen[str]":
        return subprocess.Popen(self.argv(*args), env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sh(self, script: str, timeout: float = 60) -> str:
        """``sh -c script`` in the guest through the master (must exit 0); its stdout."""
        return self.gl("exec", "--", "sh", "-c", script, timeout=timeout, check=True).stdout

    def status(self) -> Dict[str, Any]:
        r = self.gl("master", "status", "--json", timeout=30)
        data: Dict[str, Any] = json.loads(r.stdout) if r.stdout.strip() else {}
        assert (r.returncode == 0) == bool(data.get("running")), (r.returncode, r.stdout, r.stderr)
        return data

    def pid(self) -> int:
        data = self.status()
        assert data.get("running"), data
        return int(data["pid"])

    def serve(self, *extra: str) -> int:
        self.gl("master", "serve", "--detach", *extra, timeout=60, check=True)
        return self.pid()

    def stop(self) -> None:
        self.gl("master", "stop", timeout=60)


def wait_until(what: str, predicate: Callable[[], Any], timeout: float = 60,
               interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (AssertionError, subprocess.SubprocessError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError("%s: not within %g s (last: %r)" % (what, timeout, last))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def vm_clients(m: Master) -> int:
    """How many clients the master has attached to the module's VM."""
    for v in m.status().get("vms") or []:
        if v.get("ctl") == m.vm.ctl_path:
            return int(v.get("clients") or 0)
    return 0


@pytest.fixture(scope="module")
def gvm(make_vm: Callable[..., TestVM]) -> TestVM:
    vm = make_vm()
    r = subprocess.run([sys.executable, "-m", "guestlink", "ping", "--timeout", "90"],
                       env=dict(cli_env(vm), GUESTLINK_MASTER="0"), stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return vm


@pytest.fixture
def m(gvm: TestVM) -> Iterator[Master]:
    directory = tempfile.mkdtemp(prefix="glm-", dir="/tmp")  # short: AF_UNIX path limit
    master = Master(gvm, directory)
    try:
        yield master
    finally:
        master.stop()
        shutil.rmtree(directory, ignore_errors=True)


def stop_listener(p: "subprocess.Popen[str]") -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def deliver_until_heard(m: Master, listener: "subprocess.Popen[str]", topic: str, text: str,
                        timeout: float = 60) -> str:
    """Send ``text`` on ``topic`` from the guest (the guest-side ``send``) until the listener,
    started with ``--count 1``, prints it and exits; returns what it printed."""
    deadline = time.monotonic() + timeout
    while listener.poll() is None and time.monotonic() < deadline:
        m.gl("exec", "--", "python3", AGENT, "send", topic, text, timeout=60)
        try:
            listener.wait(1.0)
        except subprocess.TimeoutExpired:
            pass
    stop_listener(listener)
    out, err = listener.communicate()
    assert listener.returncode == 0, (listener.returncode, out, err)
    return out


# --- tests -----------------------------------------------------------------------------------

def test_listen_runs_while_exec_cp_and_ping_proceed(m: Master, tmp_path: Path) -> None:
    listener = m.popen("listen", "e2e.master", "--count", "1")
    try:
        wait_until("the listener attached to the master", lambda: vm_clients(m) >= 1)
        assert m.sh("echo exec-beside-listen") == "exec-beside-listen\n"
        src = tmp_path / "push.bin"
        src.write_bytes(os.urandom(3 << 20))
        m.gl("cp", src, ":/tmp/master-e2e.bin", check=True)
        back = tmp_path / "pull.bin"
        m.gl("cp", ":/tmp/master-e2e.bin", back, check=True)
        assert sha(back) == sha(src)
        r = m.gl("ping", check=True)
        assert "pong" in r.stdout
        assert listener.poll() is None  # listening all along
        assert len(m.status()["vms"]) == 1  # one session to the VM, shared
        out = deliver_until_heard(m, listener, "e2e.master", "heard-while-busy")
        assert out == "heard-while-busy\n"
    finally:
        stop_listener(listener)


CLIENT = r'''
import sys
import guestlink.sync
i, n = int(sys.argv[1]), int(sys.argv[2])
with guestlink.sync.connect(ctl=sys.argv[3], data=sys.argv[4], master=True, timeout=120) as vm:
    assert vm._client.session.via_master, "not through the master"
    for j in range(n):
        r = vm.run(["sh", "-c", 'echo "out $1 $2"; echo "err $1 $2" >&2; exit $(($2 % 7))',
                    "sh", str(i), str(j)])
        want = (j % 7, ("out %d %d\n" % (i, j)).encode(), ("err %d %d\n" % (i, j)).encode())
        got = (r.returncode, r.stdout, r.stderr)
        assert got == want, (got, want)
print("client %d: %d execs ok" % (i, n))
'''


def test_eight_clients_fifty_execs_each(m: Master) -> None:
    m.serve()
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, str(i), "50", m.vm.ctl_path,
                               m.vm.data_path], env=m.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(8)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        results.append((p.returncode, out, err[-2000:]))
    assert [r[:2] for r in results] == [(0, "client %d: 50 execs ok\n" % i) for i in range(8)], \
        results
    assert len(m.status()["vms"]) == 1


def test_eight_one_shot_cli_clients_at_once(m: Master) -> None:
    """The lean one-shot path (blocking client, no asyncio) under concurrency: 8 shell loops of
    ``guestlink exec`` processes, each output and exit status its own."""
    m.serve()
    loop = ('for j in 0 1 2 3 4; do "$@" exec -- sh -c \'echo "o $0 $1"; exit $1\' "$I" "$j"; '
            'echo "rc $?"; done')
    procs = [subprocess.Popen(["sh", "-c", loop, "sh"] + m.argv(), env=dict(m.env, I=str(i)),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(8)]
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert out == "".join("o %d %d\nrc %d\n" % (i, j, j) for j in range(5)), (out, err)
    assert len(m.status()["vms"]) == 1


def test_client_killed_mid_exec_kills_its_guest_process(m: Master) -> None:
    m.sh("rm -f /tmp/killme.pid")
    master_pid = m.serve()
    client = m.popen("exec", "--", "sh", "-c", "echo $$ > /tmp/killme.pid; exec sleep 600")
    try:
        pid = int(wait_until("the guest process started",
                             lambda: m.sh("cat /tmp/killme.pid 2>/dev/null || true").strip()))
        assert m.sh("kill -0 %d && echo running" % pid) == "running\n"
        assert client.poll() is None and vm_clients(m) >= 1  # the exec is the master's client
        client.kill()
        client.wait(10)
        wait_until("the guest process was killed",
                   lambda: m.sh("kill -0 %d 2>/dev/null && echo running || echo gone" % pid)
                   == "gone\n", timeout=30)
    finally:
        stop_listener(client)
    assert m.pid() == master_pid  # the master survived its client's death


def agent_pid(m: Master) -> int:
    return int(m.sh("pgrep -o -f 'guestlink-agent.pyz run'").split()[0])


def test_agent_restarted_under_the_master(m: Master) -> None:
    master_pid = m.serve()
    listener = m.popen("listen", "e2e.restart", "--count", "1")
    try:
        wait_until("the listener attached", lambda: vm_clients(m) >= 1)
        old = agent_pid(m)
        # killed from a detached shell, so that this exec's own reply is not lost with the agent
        m.sh("setsid sh -c 'sleep 0.5; kill -9 %d' </dev/null >/dev/null 2>&1 &" % old)
        wait_until("a new agent answers through the master",
                   lambda: m.gl("ping", timeout=60).returncode == 0 and agent_pid(m) != old,
                   timeout=60)
        assert m.sh("echo after-restart") == "after-restart\n"
        assert m.pid() == master_pid
        out = deliver_until_heard(m, listener, "e2e.restart", "heard-after-restart")
        assert out == "heard-after-restart\n"
    finally:
        stop_listener(listener)


def test_stale_socket_of_a_sigkilled_master_does_not_block(m: Master) -> None:
    old = m.serve()
    os.kill(old, signal.SIGKILL)
    wait_until("the killed master is gone", lambda: not alive(old))
    assert os.path.exists(m.socket)  # left behind: nobody removed it
    r = m.gl("ping", check=True)  # starts a new master over the stale socket
    assert "pong" in r.stdout
    new = m.pid()
    assert new != old and alive(new)
    assert [v["ctl"] for v in m.status()["vms"]] == [m.vm.ctl_path]


def test_idle_master_exits(m: Master) -> None:
    m.gl("ping", "--persist", "5s", check=True)
    pid = m.pid()
    t0 = time.monotonic()
    wait_until("the idle master exited", lambda: not alive(pid), timeout=60)
    waited = time.monotonic() - t0
    assert not os.path.exists(m.socket)
    assert m.status() == {"running": False}
    assert waited < 60  # persist 5 s (VM session, then master): sanity bound only


PEER = r'''
import sys
from guestlink.host import mastersock as MS
try:
    sock = MS.connect_socket(sys.argv[1])
    try:
        reply = MS.first_request(sock, MS.OP_STATUS, {}, 10)
    finally:
        sock.close()
except Exception as exc:
    print("refused %s: %s" % (type(exc).__name__, exc))
else:
    print("served pid %s" % reply.get("pid"))
'''


def test_another_uid_is_refused(m: Master) -> None:
    pid = m.serve()
    if not shutil.which("setpriv"):
        pytest.fail("setpriv (util-linux) is needed to run a client as another uid",
                    pytrace=False)
    env = dict(m.env)
    as_nobody = ["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups"]
    # With CAP_DAC_OVERRIDE the socket's 0600 and its directory's 0700 do not stop the client:
    # what refuses it is the master's SO_PEERCRED check.
    with_dac = as_nobody + ["--inh-caps=+dac_override", "--ambient-caps=+dac_override"]
    outs = {}
    for name, prefix in (("root", []), ("nobody", as_nobody), ("nobody+dac", with_dac)):
        r = subprocess.run(prefix + [sys.executable, "-c", PEER, m.socket], env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (name, r.stderr)
        outs[name] = r.stdout.strip()
    assert outs["root"] == "served pid %d" % pid
    assert outs["nobody"].startswith("refused") and "ermission" in outs["nobody"], outs
    assert outs["nobody+dac"].startswith("refused"), outs
    # refused by the master's SO_PEERCRED check, not by the file system (its detached log)
    log = Path(m.socket).with_name("master.log").read_text()
    assert "refusing a client of uid %d" % NOBODY in log, log[-2000:]
    assert m.pid() == pid  # and it still serves its owner


def test_vm_rebooted_under_the_master(m: Master) -> None:
    vm = m.vm
    master_pid = m.serve()
    boot0 = json.loads(m.gl("info", "--json", check=True).stdout)["boot_id"]
    listener = m.popen("listen", "e2e.reboot", "--count", "1")
    try:
        wait_until("the listener attached", lambda: vm_clients(m) >= 1)
        mark = len(vm.console_text())
        m.gl("reboot", check=True)
        vm.wait_ready(timeout=120, start=mark)
        wait_until("the rebooted guest answers through the master",
                   lambda: m.gl("ping", timeout=60).returncode == 0, timeout=120)
        boot1 = json.loads(m.gl("info", "--json", check=True).stdout)["boot_id"]
        assert boot1 != boot0
        assert m.sh("echo after-reboot") == "after-reboot\n"
        assert m.pid() == master_pid
        out = deliver_until_heard(m, listener, "e2e.reboot", "heard-after-reboot")
        assert out == "heard-after-reboot\n"
    finally:
        stop_listener(listener)
