"""guestlink against a REAL libvirtd: domains defined with `guestlink libvirt xml`, reached by name.

The `libvirtd` fixture starts virtlogd and libvirtd (Debian's libvirt-daemon,
libvirt-daemon-driver-qemu, libvirt-clients; see testvm/debian-packages.txt) unless a libvirtd
already answers on qemu:///system, and stops what it started at the end (when /dev/kvm exists
but libvirt-qemu may not open it, a throwaway libvirtd first probes QEMU with /dev/kvm hidden:
see _probe_qemu_without_kvm; otherwise every libvirt call re-probes QEMU). The `libvirt-qemu`
user/group the QEMU driver runs guests as come from scripts/setup. It cannot start: the test
FAILS (no skips), with guestlink doctor's line when libvirt does not answer. Domains are `type='qemu'` (TCG) with direct kernel boot of the testvm guest
(kernel + initramfs + agent overlay from testvm.write_initrd), named `guestlink-e2e-*`; they are
destroyed and undefined at the end (and leftovers of an interrupted run at the start).
"""

import base64
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

from guestlink import doctor
from testvm import guest_files, kernel_cmdline, write_initrd
from testvm.vm import QEMU, QEMU_CPU
from vmhelpers import clean_env

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
    env = clean_env()
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


def _require_qemu_user():
    """The QEMU driver runs guests as libvirt-qemu and refuses to start without the user."""
    try:
        pwd.getpwnam("libvirt-qemu")
        grp.getgrnam("libvirt-qemu")
    except KeyError:
        pytest.fail("the libvirt-qemu user or group libvirtd runs guests as is missing: run "
                    "scripts/setup (it creates them)", pytrace=False)


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
        _require_qemu_user()
        os.makedirs("/var/log/libvirt", exist_ok=True)
        for daemon, sock in (("virtlogd", "/run/libvirt/virtlogd-sock"),
                             ("libvirtd", "/run/libvirt/libvirt-sock")):
            if daemon == "virtlogd" and os.path.exists(sock) and _sock_alive(sock):
                continue
            if daemon == "libvirtd":
                _probe_qemu_without_kvm(logdir)
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
                pytest.fail("%s\nlibvirtd's log:\n%s" % (
                    doctor.check_libvirt(URI).line(),
                    (logdir / "libvirtd.log").read_text()[-3000:]), pytrace=False)
            time.sleep(0.5)
    _cleanup_domains()
    yield URI
    _cleanup_domains()
    _stop(started)


def _kvm_usable_by(user, path="/dev/kvm"):
    """Whether ``user`` (with its groups) may open ``path`` read-write by the mode bits, as
    libvirt decides that KVM is usable (virFileAccessibleAs as the user it runs QEMU as)."""
    st = os.stat(path)
    pw = pwd.getpwnam(user)
    if st.st_uid == pw.pw_uid:
        bits = st.st_mode >> 6
    elif st.st_gid in os.getgrouplist(user, pw.pw_gid):
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & 6 == 6


def _probe_qemu_without_kvm(logdir):
    """Have libvirt (re)probe QEMU's capabilities with /dev/kvm hidden, when /dev/kvm exists but
    libvirt-qemu may not open it: a libvirtd of our own, run once in a private mount namespace
    where /dev/kvm is an empty mode-000 file, until `virsh capabilities` answers.

    Why: libvirt 9 probes QEMU as libvirt-qemu but *keeping CAP_DAC_OVERRIDE*, so the probe
    opens /dev/kvm and records KVM as enabled, while its cache check (virQEMUCapsIsValid) asks
    whether libvirt-qemu itself may open /dev/kvm, gets no, and throws the capabilities away
    ("KVM was enabled when probing ..., but it is not available now"). Every API call that
    needs them then probes QEMU again (~4 s each, several per call): `virsh define` took
    ~50 s, `virsh version` ~15 s. Probed without KVM, the cached capabilities agree with that
    check and stay valid for the real libvirtd started next (with the real /dev/kvm: libvirt
    cannot move a file mount into a domain's /dev). The domains here are type='qemu' (TCG) and
    never use KVM. Best effort: on any failure the real libvirtd is just slow."""
    if not os.path.exists("/dev/kvm") or _kvm_usable_by("libvirt-qemu"):
        return
    if not (shutil.which("unshare") and shutil.which("mount")):
        return
    hidden = logdir / "kvm-hidden"
    hidden.write_bytes(b"")
    hidden.chmod(0)
    with open(logdir / "libvirtd-probe.log", "wb") as log:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount --bind "$0" /dev/kvm && exec libvirtd', str(hidden)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while proc.poll() is None and time.monotonic() < deadline:
                if not _sock_alive("/run/libvirt/libvirt-sock"):
                    time.sleep(0.1)
                    continue
                try:
                    if virsh("capabilities", check=False, timeout=120).returncode == 0:
                        break
                except subprocess.TimeoutExpired:
                    pass
                time.sleep(0.5)
        finally:
            _stop([("libvirtd (probe)", proc, log)])


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


def domain_xml(name, workdir, kernel, initrd, channels_xml, metadata_xml="", append=""):
    return """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
{metadata}
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
           metadata=metadata_xml.rstrip("\n"),
           cmdline=kernel_cmdline(2, append), model=QEMU_CPU.split(",")[0],
           features="\n".join("    <feature policy='require' name='%s'/>" % f.lstrip("+")
                              for f in QEMU_CPU.split(",")[1:]),
           emulator=shutil.which(QEMU), workdir=workdir, channels=channels_xml.rstrip("\n"))


def split_paste(text):
    """`guestlink libvirt xml` output as its comments say to paste it: (into <devices>, the
    <metadata> element for under <domain>, "" when it prints none)."""
    lines = text.splitlines(keepends=True)
    at = next((i for i, ln in enumerate(lines) if ln.strip() == "<metadata>"), len(lines))
    return "".join(lines[:at]), "".join(lines[at:])


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

    def define(self, short, channels=True, start=True, xml_args=(), agent_args=()):
        """Define (and start) a domain; ``xml_args`` go to `guestlink libvirt xml`, whose output
        is pasted as its comments say (devices, and a <metadata> under <domain> if it prints
        one); ``agent_args`` to the guest's agent (kernel command line guestlink.args=)."""
        name = PREFIX + short
        workdir = self.dir / short
        workdir.mkdir(mode=0o755)
        chans = metadata = ""
        if channels:
            r = gl("libvirt", "xml", *xml_args)
            assert r.returncode == 0, r.stderr
            chans, metadata = split_paste(r.stdout)
            chans = "\n".join("    " + line for line in chans.splitlines())
        append = ""
        if agent_args:
            append = "guestlink.args=" + base64.b64encode(
                "".join(a + "\n" for a in agent_args).encode()).decode()
        xml = domain_xml(name, workdir, self.dir / "vmlinuz", self.dir / "initrd.img", chans,
                         metadata, append)
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
    for extra in ([], ["--socket-dir", str(tmp_path), "--ports", "8"],
                  ["--ctl-name", "gl.ctl", "--data-name", "gl.data"]):
        r = gl("libvirt", "xml", *extra)
        assert r.returncode == 0, r.stderr
        devices, metadata = split_paste(r.stdout)
        assert bool(metadata) == ("gl.ctl" in extra)  # a record only for custom names
        doc = tmp_path / "domain.xml"
        doc.write_text(domain_xml("guestlink-e2e-validate", tmp_path, "/boot/vmlinuz",
                                  "/boot/initrd.img", devices, metadata))
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


CUSTOM_NAMES = ["--ctl-name", "gl.ctl", "--data-name", "gl.data"]


def test_custom_channel_names_by_domain_name(domains, tmp_path):
    """`libvirt xml` with custom names, agent started with them: every command by domain name
    alone finds the channels through the domain's guestlink metadata."""
    name = domains.define("names", xml_args=CUSTOM_NAMES, agent_args=CUSTOM_NAMES)
    inactive = ET.fromstring(virsh("dumpxml", "--inactive", name).stdout)
    record = inactive.find("metadata/{https://guestlink.invalid/xmlns/1}channels")
    assert record is not None and record.attrib == {"ctl": "gl.ctl", "data": "gl.data"}
    r = gl("ping", name, "--timeout", 90)
    assert r.returncode == 0 and "pong from guestlink-testvm" in r.stdout, "%s\nconsole:\n%s" % (
        r.stderr, domains.console(name)[-3000:])
    # the agent really serves the custom ports (the defaults do not exist in this guest)
    r = gl("exec", name, "--", "ls", "/dev/virtio-ports")
    assert r.returncode == 0 and sorted(r.stdout.split()) == ["gl.ctl", "gl.data"], r.stderr
    payload = os.urandom(200 * 1024) + b"custom"
    src = tmp_path / "up.bin"
    src.write_bytes(payload)
    r = gl("cp", "-q", src, "%s:/tmp/names.bin" % name)  # the data channel: gl.data
    assert r.returncode == 0, r.stderr
    back = tmp_path / "down.bin"
    r = gl("cp", "-q", "%s:/tmp/names.bin" % name, back)
    assert r.returncode == 0 and back.read_bytes() == payload, r.stderr
    r = gl("list", "--json")
    assert r.returncode == 0, r.stderr
    row = {d["name"]: d for d in json.loads(r.stdout)["domains"]}[name]
    assert (row["ctl_name"], row["data_name"], row["channel"], row["hostname"]) == (
        "gl.ctl", "gl.data", "connected", "guestlink-testvm")
    assert row["ctl"].endswith("gl.ctl") and row["data"].endswith("gl.data")
    import guestlink.sync

    with guestlink.sync.connect(domain=name, uri=URI, timeout=30) as vm:
        assert vm.run(["cat", "/etc/hostname"], check=True).stdout == b"guestlink-testvm\n"
    with guestlink.sync.connect(domain=name, uri=URI, ctl_name="gl.ctl", data_name="gl.data",
                                timeout=30) as vm:
        assert vm.agent.hostname == "guestlink-testvm"
    # names given explicitly win over the record: the option, then the environment
    r = gl("ping", name, "--ctl-name", CTL)
    assert r.returncode == 78 and r.stderr.count("\n") == 1, r.stderr
    assert ("has no guestlink channel %s (looked for ctl %s (given) and data gl.data (recorded in "
            "the domain's metadata); its virtio channels: gl.ctl, gl.data)" % (CTL, CTL)
            in r.stderr), r.stderr
    r = gl("exec", name, "--", "true", env_extra={"GUESTLINK_CTL_NAME": "env.ctl"})
    assert r.returncode == 78 and "looked for ctl env.ctl (given)" in r.stderr, r.stderr
    r = gl("ping", "--domain", name, *CUSTOM_NAMES, env_extra={"GUESTLINK_CTL_NAME": "env.ctl"})
    assert r.returncode == 0, r.stderr


def test_attach_records_names_in_live_and_persistent_metadata(domains):
    """Without the record the custom channels are not found; `libvirt attach` with the names
    writes it through libvirt's metadata API, live and persistent, and addressing works again."""
    name = domains.define("names2", xml_args=CUSTOM_NAMES, agent_args=CUSTOM_NAMES)
    r = gl("ping", name, "--timeout", 90)
    assert r.returncode == 0, "%s\nconsole:\n%s" % (r.stderr, domains.console(name)[-3000:])
    virsh("metadata", name, "--uri", "https://guestlink.invalid/xmlns/1", "--remove", "--live",
          "--config")
    r = gl("ping", name)
    assert r.returncode == 78 and r.stderr.count("\n") == 1, r.stderr
    assert ("looked for ctl %s and data %s (the default); its virtio channels: gl.ctl, gl.data"
            % (CTL, DATA)) in r.stderr
    r = gl("libvirt", "attach", name, *CUSTOM_NAMES, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    want = "metadata guestlink:channels ctl=gl.ctl data=gl.data"
    assert out["config"] == [want] and out["live"] == [want] and out["names"] == ["gl.ctl", "gl.data"]
    for flags in ([], ["--inactive"]):
        root = ET.fromstring(virsh("dumpxml", *flags, name).stdout)
        record = root.find("metadata/{https://guestlink.invalid/xmlns/1}channels")
        assert record is not None and record.attrib == {"ctl": "gl.ctl", "data": "gl.data"}, flags
    r = gl("exec", name, "--", "cat", "/etc/hostname")
    assert r.returncode == 0 and r.stdout.strip() == "guestlink-testvm", r.stderr
    # detach (persistent config) takes the names from the record and removes it with them
    virsh("destroy", name)
    r = gl("libvirt", "detach", name)
    assert r.returncode == 0 and "removed metadata guestlink:channels" in r.stdout, r.stdout
    inactive = virsh("dumpxml", "--inactive", name).stdout
    assert "gl.ctl" not in inactive and "guestlink.invalid" not in inactive
