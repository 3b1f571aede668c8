"""A VM on a "remote" hypervisor (issue 13): a real sshd on 127.0.0.1 (own port, host key and
config, a generated client key authorized for root) stands in for a second hypervisor in front of
the test libvirtd; guestlink reaches it as ``qemu+ssh://root@127.0.0.1:PORT/system?keyfile=...``:
libvirt through the forwarded libvirt socket, the channels through forwarded sockets, all over
one OpenSSH ControlMaster (guestlink.host.remote). Real ssh, real libvirtd, real VM."""
import asyncio
import json
import os
import shutil
import socket
import subprocess
import time

import pytest

import guestlink
from guestlink.host.remote import SshHop
from test_libvirt_e2e import Domains, gl, libvirtd  # noqa: F401 (libvirtd: a fixture)

SSHD = "/usr/sbin/sshd"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not os.path.exists(SSHD) or not shutil.which("ssh"):
        pytest.fail("sshd/ssh missing: install openssh-server and openssh-client (scripts/setup; "
                    "testvm/debian-packages.txt)", pytrace=False)
    d = tmp_path_factory.mktemp("sshd")
    for key in ("hostkey", "clientkey"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                       check=True)
    (d / "authorized_keys").write_text((d / "clientkey.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = _free_port()
    (d / "sshd_config").write_text(
        "Port %d\nListenAddress 127.0.0.1\nHostKey %s\nPidFile %s\nAuthorizedKeysFile %s\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "AllowStreamLocalForwarding yes\nLogLevel VERBOSE\n"
        % (port, d / "hostkey", d / "sshd.pid", d / "authorized_keys"))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    log = open(d / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("sshd did not start: %s" % (d / "sshd.log").read_text()[-2000:],
                            pytrace=False)
            time.sleep(0.1)
    runtime = d / "run"  # the private directory of control and forwarded sockets
    runtime.mkdir(mode=0o700)
    uri = "qemu+ssh://root@127.0.0.1:%d/system?keyfile=%s&no_verify=1&known_hosts=%s" % (
        port, d / "clientkey", d / "known_hosts")
    yield {"uri": uri, "port": port, "dir": d, "env": {"XDG_RUNTIME_DIR": str(runtime)}}
    # stop the masters this test started, then sshd
    for cm in (runtime / "guestlink").glob("cm-*"):
        if not cm.name.endswith(".lock"):
            subprocess.run(["ssh", "-o", "ControlPath=%s" % cm, "-O", "exit", "x"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture(scope="module")
def remote_dom(libvirtd, testvm_base, agent_pyz):  # noqa: F811
    d = Domains(agent_pyz)
    name = d.define("remote")
    r = gl("ping", name, "--timeout", 90)
    assert r.returncode == 0, "agent of %s did not answer: %s\nconsole:\n%s" % (
        name, r.stderr, d.console(name)[-3000:])
    yield name
    d.close()


def _master_pid(sshd):
    old = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = sshd["env"]["XDG_RUNTIME_DIR"]
    try:
        return SshHop.parse(sshd["uri"]).master_pid()
    finally:
        if old is None:
            del os.environ["XDG_RUNTIME_DIR"]
        else:
            os.environ["XDG_RUNTIME_DIR"] = old


def _timed(*args, env=None):
    t = time.monotonic()
    r = gl(*args, env_extra=env)
    return r, time.monotonic() - t


def test_ping_exec_cp_through_ssh_reuse_one_master(sshd, remote_dom, tmp_path):
    uri, env = sshd["uri"], sshd["env"]
    assert _master_pid(sshd) is None
    first, t_first = _timed("ping", "-c", uri, remote_dom, "--json", env=env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["hostname"] == "guestlink-testvm"
    master = _master_pid(sshd)
    assert master is not None
    second, t_second = _timed("ping", "--connect", uri, remote_dom, env=env)
    assert second.returncode == 0, second.stderr
    assert _master_pid(sshd) == master  # no new ssh connection: the same master served it
    print("\nremote ping: first %.0f ms (ssh handshake), second %.0f ms (reused master)"
          % (t_first * 1000, t_second * 1000))

    r = gl("exec", "-c", uri, "--user", "guest", remote_dom, "--", "sh", "-c",
           "echo $HOME; exit 3", env_extra=env)
    assert (r.returncode, r.stdout) == (3, "/home/guest\n"), r.stderr

    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(3 << 20))
    r = gl("cp", "-c", uri, str(src), "%s:/tmp/up.bin" % remote_dom, env_extra=env)
    assert r.returncode == 0, r.stderr
    r = gl("cp", "-c", uri, "%s:/tmp/up.bin" % remote_dom, str(tmp_path / "down.bin"),
           env_extra=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "down.bin").read_bytes() == src.read_bytes()
    # $GUESTLINK_URI instead of -c, and the doctor through the same hop
    r = gl("ping", remote_dom, env_extra=dict(env, GUESTLINK_URI=uri))
    assert r.returncode == 0, r.stderr
    r = gl("doctor", "-c", uri, remote_dom, "--json", env_extra=env)
    items = {i["name"]: i for i in json.loads(r.stdout)}
    assert items["libvirt"]["ok"] and items["channels %s" % remote_dom]["ok"], items
    assert _master_pid(sshd) == master
    # list probes each agent through the hop's forwarded sockets (the domain's paths are the
    # hypervisor's)
    r = gl("list", "-c", uri, "--json", env_extra=env)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)["domains"]}
    assert rows[remote_dom]["hostname"] == "guestlink-testvm", rows[remote_dom]
    assert rows[remote_dom]["error"] is None


def test_library_connect_with_ssh_uri(sshd, remote_dom, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", sshd["env"]["XDG_RUNTIME_DIR"])

    async def main():
        async with guestlink.connect(domain=remote_dom, uri=sshd["uri"], timeout=30) as vm:
            r = await vm.run("id -un; echo $HOME", user="guest", check=True)
            return vm.session.ctl, r.stdout
    ctl, out = asyncio.run(main())
    assert out == b"guest\n/home/guest\n"
    assert ctl.startswith(sshd["env"]["XDG_RUNTIME_DIR"] + "/guestlink/fw-")  # a forwarded socket


def test_errors_name_the_hop(sshd, remote_dom):
    env = sshd["env"]
    closed = _free_port()
    bad = sshd["uri"].replace(":%d/" % sshd["port"], ":%d/" % closed)
    r = gl("ping", "-c", bad, remote_dom, env_extra=env)
    assert r.returncode == 69 and r.stderr.count("\n") == 1, r.stderr
    assert "ssh to root@127.0.0.1:%d failed" % closed in r.stderr
    assert "Connection refused" in r.stderr

    r = gl("ping", "-c", sshd["uri"], "no-such-domain", env_extra=env)
    assert r.returncode == 68 and r.stderr.count("\n") == 1, r.stderr
    assert "no libvirt domain 'no-such-domain' at qemu+ssh://root@127.0.0.1" in r.stderr

    r = gl("ping", "-c", sshd["uri"] + "&socket=/nonexistent/libvirt-sock", remote_dom,
           env_extra=env)
    assert r.returncode == 69 and r.stderr.count("\n") == 1, r.stderr
    assert "socket: no libvirt daemon socket on root@127.0.0.1" in r.stderr

    wrong_key = sshd["uri"].replace("clientkey", "hostkey")  # a key root does not authorize
    wrong_key = wrong_key.replace("root@", "nobody@")
    r = gl("ping", "-c", wrong_key, remote_dom, env_extra=env)
    assert r.returncode == 69 and "ssh to nobody@127.0.0.1" in r.stderr
    assert "Permission denied" in r.stderr, r.stderr
