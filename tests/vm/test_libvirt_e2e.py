"""guestlink against a REAL libvirtd: domains defined with `guestlink libvirt xml`, reached by name.

The `libvirtd` fixture starts virtlogd and libvirtd (Debian's libvirt-daemon,
libvirt-daemon-driver-qemu, libvirt-clients; see testvm/debian-packages.txt) unless a libvirtd
already answers on qemu:///system, and stops what it started at the end. It creates the
`libvirt-qemu` user/group the QEMU driver runs guests as, if missing. It cannot start: the test
FAILS (no skips). Domains are `type='qemu'` (TCG) with direct kernel boot of the testvm guest
(kernel + initramfs + agent overlay from testvm.write_initrd), named `guestlink-e2e-*`; they are
destroyed and undefined at the end (and leftovers of an interrupted run at the start).
"""

import grp
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from testvm import guest_files, kernel_cmdline, write_initrd
from testvm.vm import QEMU, QEMU_CPU

REPO = Path(__file__).resolve().parents[2]
URI = "qemu:///system"
PREFIX = "guestlink-e2e-"
CTL, DATA = "org.guestlink.ctl", "org.guestlink.data"


def virsh(*args, check=True, timeout=60):
    r = subprocess.run(["virsh", "-q", "-c", URI] + list(args), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError("virsh %s failed (%d): %s" % (" ".join(args), r.returncode, r.stderr))
    return r


def gl(*args, timeout=120, env_extra=None):
    """Run the real `guestlink` CLI (no GUESTLINK_CTL/DATA in its environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTLINK_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "guestlink"] + [str(a) for a in args], env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


def _answers():
    try:
        return subprocess.run(["virsh", "-c", URI, "version"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _ensure_qemu_user():
    """The QEMU driver runs guests as libvirt-qemu (Debian's libvirt-daemon-system creates it)."""
    try:
        pwd.getpwnam("libvirt-qemu")
        return
    except KeyError:
        pass
    if os.geteuid() != 0:
        pytest.fail("the libvirt-qemu user is missing and only root can create it", pytrace=False)
    try:
        grp.getgrnam("libvirt-qemu")
    except KeyError:
        subprocess.run(["groupadd", "--system", "libvirt-qemu"], check=True)
    subprocess.run(["useradd", "--system", "-g", "libvirt-qemu", "-d", "/var/lib/libvirt",
                    "-s", "/usr/sbin/nologin", "libvirt-qemu"], check=True)


def _cleanup_domains():
    r = virsh("list", "--all", "--name", check=False)
    for name in r.stdout.split():
        if name.startswith(PREFIX):
            virsh("destroy", name, check=False)
            virsh("undefine", name, check=False)


@pytest.fixture(scope="session")
def libvirtd(tmp_path_factory):
    missing = [t for t in ("libvirtd", "virtlogd", "virsh", "virt-xml-validate")
               if not shutil.which(t)]
    if missing:
        pytest.fail("libvirt tools missing: %s; install the Debian packages in "
                    "testvm/debian-packages.txt (scripts/setup)" % " ".join(missing), pytrace=False)
    started = []
    logdir = tmp_path_factory.mktemp("libvirtd")
    if not _answers():
        _ensure_qemu_user()
        os.makedirs("/var/log/libvirt", exist_ok=True)
        for daemon, sock in (("virtlogd", "/run/libvirt/virtlogd-sock"),
                             ("libvirtd", "/run/libvirt/libvirt-sock")):
            if daemon == "virtlogd" and os.path.exists(sock) and _sock_alive(sock):
                continue
            log = open(logdir / (daemon + ".log"), "wb")
            proc = subprocess.Popen([daemon], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            started.append((daemon, proc, log))
            deadline = time.monotonic() + 60
            while not (os.path.exists(sock) and _sock_alive(sock)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    _stop(started)
                    pytest.fail("%s did not start (status %s); log:\n%s" % (
                        daemon, proc.poll(), (logdir / (daemon + ".log")).read_text()[-3000:]),
                        pytrace=False)
                time.sleep(0.1)
        deadline = time.monotonic() + 60
        while not _answers():
            if time.monotonic() > deadline:
                _stop(started)
                pytest.fail("libvirtd does not answer on %s; log:\n%s" % (
                    URI, (logdir / "libvirtd.log").read_text()[-3000:]), pytrace=False)
            time.sleep(0.5)
    _cleanup_domains()
    yield URI
    _cleanup_domains()
    _stop(started)


def _sock_alive(path):
    import socket

    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
        return True
    except OSError:
        return False


def _stop(started):
    for _name, proc, log in reversed(started):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def domain_xml(name, workdir, kernel, initrd, channels_xml):
    return """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='forbid'>{model}</model>
{features}
  </cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <serial type='file'><source path='{workdir}/console.log'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
{channels}
  </devices>
</domain>
""".format(name=name, uuid=uuidlib.uuid4(), kernel=kernel, initrd=initrd,
           cmdline=kernel_cmdline(2), model=QEMU_CPU.split(",")[0],
           features="\n".join("    <feature policy='require' name='%s'/>" % f.lstrip("+")
                              for f in QEMU_CPU.split(",")[1:]),
           emulator=shutil.which(QEMU), workdir=workdir, channels=channels_xml.rstrip("\n"))


class Domains:
    """Defines and starts guestlink-e2e-* domains booting the test guest with the real agent."""

    def __init__(self, agent_pyz):
        # qemu runs as libvirt-qemu: everything it reads lives in a world-traversable directory
        self.dir = Path(tempfile.mkdtemp(prefix="gl-libvirt-", dir="/tmp"))
        self.dir.chmod(0o755)
        base = write_initrd(self.dir / "initrd.img", guest_files(agent_pyz))
        shutil.copy(base.kernel, self.dir / "vmlinuz")
        for f in ("initrd.img", "vmlinuz"):
            (self.dir / f).chmod(0o644)
        self.names = []

    def define(self, short, channels=True, start=True):
        name = PREFIX + short
        workdir = self.dir / short
        workdir.mkdir(mode=0o755)
        chans = ""
        if channels:
            r = gl("libvirt", "xml")
            assert r.returncode == 0, r.stderr
            chans = "\n".join("    " + line for line in r.stdout.splitlines())
        xml = domain_xml(name, workdir, self.dir / "vmlinuz", self.dir / "initrd.img", chans)
        (workdir / "domain.xml").write_text(xml)
        virsh("define", str(workdir / "domain.xml"))
        self.names.append(name)
        if start:
            virsh("start", name)
        return name

    def console(self, name):
        path = self.dir / name[len(PREFIX):] / "console.log"
        return path.read_text(errors="replace") if path.exists() else "(no console log)"

    def close(self):
        for name in self.names:
            virsh("destroy", name, check=False)
            virsh("undefine", name, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def domains(libvirtd, testvm_base, agent_pyz):
    d = Domains(agent_pyz)
    yield d
    d.close()


@pytest.fixture(scope="module")
def dom(domains):
    """A running domain with the channels from `guestlink libvirt xml`, its agent answering."""
    name = domains.define("a")
    r = gl("ping", name, "--timeout", 90)
    assert r.returncode == 0, "agent of %s did not answer: %s\nconsole:\n%s" % (
        name, r.stderr, domains.console(name)[-3000:])
    return name


def test_xml_validates_against_libvirt_schema(tmp_path):
    for extra in ([], ["--socket-dir", str(tmp_path), "--ports", "8"]):
        r = gl("libvirt", "xml", *extra)
        assert r.returncode == 0, r.stderr
        doc = tmp_path / "domain.xml"
        doc.write_text(domain_xml("guestlink-e2e-validate", tmp_path, "/boot/vmlinuz",
                                  "/boot/initrd.img", r.stdout))
        v = subprocess.run(["virt-xml-validate", str(doc), "domain"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        assert v.returncode == 0 and "validates" in v.stdout, v.stdout


def test_live_xml_has_the_sockets_libvirt_placed(dom):
    root = ET.fromstring(virsh("dumpxml", dom).stdout)
    paths = {c.find("target").get("name"): c.find("source").get("path")
             for c in root.iter("channel")}
    assert set(paths) == {CTL, DATA}
    for p in paths.values():
        assert p and os.path.exists(p)
    from guestlink.libvirt import resolve_domain

    assert resolve_domain(dom, URI) == (paths[CTL], paths[DATA])


def test_ping_and_info_by_name_and_uuid(dom):
    r = gl("ping", dom)
    assert r.returncode == 0 and "pong from guestlink-testvm" in r.stdout, r.stderr
    uuid = virsh("domuuid", dom).stdout.strip()
    r = gl("info", "--domain", uuid, "--connect", URI, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["hostname"] == "guestlink-testvm"
    r = gl("ping", dom, env_extra={"LIBVIRT_DEFAULT_URI": URI})
    assert r.returncode == 0, r.stderr


def test_exec_by_name(dom):
    r = gl("exec", dom, "--", "uname", "-r")
    assert r.returncode == 0, r.stderr
    assert re.match(r"\d+\.\d+", r.stdout)
    r = gl("exec", "--domain", dom, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")


def test_library_connect_by_domain(dom):
    import guestlink.sync

    with guestlink.sync.connect(domain=dom, uri=URI, timeout=30) as vm:
        assert vm.agent.hostname == "guestlink-testvm"
        assert vm.run(["echo", "hi"], check=True).stdout == b"hi\n"


def test_list_shows_connected_channel_and_agent(dom, domains):
    stopped = domains.define("stopped", start=False)
    r = gl("list", "--json", "--all")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["uri"] == URI and out["backend"] in ("virsh", "libvirt-python")
    rows = {d["name"]: d for d in out["domains"]}
    a = rows[dom]
    assert (a["state"], a["channel"], a["agent_version"], a["hostname"]) == (
        "running", "connected", "0.1.0", "guestlink-testvm")
    assert a["id"] is not None and a["data_channel"] == "disconnected"
    assert rows[stopped]["state"] == "shut off" and rows[stopped]["id"] is None
    r = gl("list", "-v")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if dom in ln.split())
    assert line.split()[2:] == ["running", "connected", "0.1.0", "guestlink-testvm"]
    assert stopped not in r.stdout.split()  # without --all: running domains only
    assert "via " in r.stdout  # says which libvirt access is used
    for forced in ("virsh",) + (("python",) if _has_libvirt_python() else ()):
        r = gl("list", "--json", env_extra={"GUESTLINK_LIBVIRT_BACKEND": forced})
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["backend"] == {"virsh": "virsh", "python": "libvirt-python"}[forced]
        assert {d["name"]: d["channel"] for d in out["domains"]}[dom] == "connected"


def _has_libvirt_python():
    try:
        import libvirt  # noqa: F401
        return True
    except ImportError:
        return False


def test_attach_then_restart_makes_it_reachable(domains):
    name = domains.define("b", channels=False)
    r = gl("ping", name)
    assert r.returncode == 78, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and "guestlink libvirt attach %s" % name in r.stderr
    r = gl("libvirt", "attach", name)
    assert r.returncode == 0, r.stderr
    assert "added channel org.guestlink.ctl" in r.stdout and "shut down and started" in r.stderr
    r = gl("libvirt", "attach", name, "--config", "--json")  # idempotent
    assert r.returncode == 0 and json.loads(r.stdout)["config"] == [], r.stdout + r.stderr
    r = gl("libvirt", "attach", name, "--live")  # no controller in the running domain
    assert r.returncode == 70 and "hot-plug" in r.stderr, r.stderr
    virsh("destroy", name)
    virsh("start", name)
    r = gl("ping", name, "--timeout", 90)
    assert r.returncode == 0, "%s\nconsole:\n%s" % (r.stderr, domains.console(name)[-3000:])
    r = gl("exec", name, "--", "cat", "/etc/hostname")
    assert r.returncode == 0 and r.stdout.strip() == "guestlink-testvm", r.stderr
    # detach: the persistent config loses the channels and our controller again
    virsh("destroy", name)
    r = gl("libvirt", "detach", name)
    assert r.returncode == 0 and "removed controller" in r.stdout, r.stdout + r.stderr
    inactive = virsh("dumpxml", "--inactive", name).stdout
    assert CTL not in inactive and "ua-guestlink-vser" not in inactive
    r = gl("libvirt", "detach", name, "--config")
    assert r.returncode == 0 and "nothing to do" in r.stdout


def test_errors_missing_and_stopped_domain_and_no_libvirt(domains, libvirtd):
    r = gl("ping", PREFIX + "does-not-exist")
    assert r.returncode == 68, r.stderr
    assert r.stderr == "guestlink: error: no libvirt domain %r at %s\n" % (
        PREFIX + "does-not-exist", URI)
    stopped = domains.define("off", start=False)
    for argv in (["ping", stopped], ["exec", stopped, "--", "true"]):
        r = gl(*argv)
        assert r.returncode == 69, r.stderr
        assert r.stderr.count("\n") == 1 and "is not running" in r.stderr
    r = gl("ping", stopped, "--connect", "qemu:///system?socket=/nonexistent/libvirt-sock")
    assert r.returncode == 69 and "libvirt is not reachable" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_cp_both_ways_by_domain_name(dom, tmp_path):
    payload = os.urandom(300 * 1024) + b"end"
    src = tmp_path / "up.bin"
    src.write_bytes(payload)
    r = gl("cp", "-q", src, "%s:/tmp/up.bin" % dom)
    assert r.returncode == 0, r.stderr
    r = gl("exec", dom, "--", "sha256sum", "/tmp/up.bin")
    import hashlib

    assert r.returncode == 0 and r.stdout.split()[0] == hashlib.sha256(payload).hexdigest()
    back = tmp_path / "down.bin"
    r = gl("cp", "-q", "%s:/tmp/up.bin" % dom, back)
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == payload
    r = gl("cp", "-q", src, PREFIX + "does-not-exist:/tmp/x")
    assert r.returncode == 68 and r.stderr.count("\n") == 1, r.stderr
