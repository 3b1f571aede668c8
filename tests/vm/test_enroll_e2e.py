"""guestlink enroll against real guests: Debian's qemu-guest-agent in the test VM (on its own
virtio-serial port), the real agent zipapp, its real installer, the real virtio_console driver,
and a real libvirtd domain booted without the guestlink channels (hot-plugged by enroll).

VMs: ``plain`` (qemu-ga, the guestlink ports, no agent running) for the enroll / re-enroll /
upgrade / remove sequence; ``nopython`` (python3 replaced by a stub that exits 127, or lies) for
the refusals, then with its qemu-ga stopped for the missing-qemu-ga error; a libvirt domain with
only a qemu-ga channel; and the sysv test disk (testvm.diskimage), booted twice.
"""

import asyncio
import io
import json
import re
import shutil
import time
import zipfile

import pytest
from test_libvirt_e2e import Domains, domain_xml, gl, libvirtd, virsh  # noqa: F401 (fixture)

from guestlink import enroll as EN
from guestlink.bundle import build_bundle_bytes
from guestlink.host.qga import SocketTransport
from guestlink.image import tree as T
from testvm.diskimage import DiskVM, ensure_disk

CONF = T.CONFIG


def qga_sh(vm, script):
    """(exit status, stdout) of ``sh -c script`` in the guest, through qemu-ga directly."""
    async def main():
        t = SocketTransport(vm.qga_path)
        await t.open(20)
        try:
            out = await EN.QgaExec(t).run(["sh", "-c", script], 60)
        finally:
            await t.close()
        return out.exit_code, out.stdout.decode()
    return asyncio.run(main())


def plain_args(vm):
    return ["--qga", vm.qga_path, "--ctl", vm.ctl_path, "--data", vm.data_path]


def guest_status(vm):
    code, out = qga_sh(vm, "python3 %s status --json" % T.AGENT_PYZ)
    assert code == 0, out
    return json.loads(out)


@pytest.fixture(scope="module")
def plain(make_vm):
    return make_vm(agent_pyz=None, qga=True)


@pytest.fixture(scope="module")
def upgrade_pyz(tmp_path_factory):
    """The real agent bundle with a newer version string."""
    src = zipfile.ZipFile(io.BytesIO(build_bundle_bytes()))
    out = io.BytesIO()
    out.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "guestlink/_version.py":
                data = b'__version__ = "9.9.9"\n'
            dst.writestr(info, data)
    path = tmp_path_factory.mktemp("upgrade") / "guestlink-agent-9.9.9.pyz"
    path.write_bytes(out.getvalue())
    return path


def test_enroll_installs_starts_and_pings_over_guestlink(plain):
    r = gl("ping", "--ctl", plain.ctl_path, "--timeout", 2)
    assert r.returncode != 0  # no guestlink agent yet
    r = gl("enroll", "--json", *plain_args(plain))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["action"] == "installed" and out["python"].startswith("3.")
    assert out["virtio_console"] == "loaded" and out["init"] == "rc.local"
    assert out["agent"]["hostname"] == "guestlink-testvm" and out["agent"]["ping_ms"] > 0
    for step in ("checking the guest", "copying the agent", "verifying its SHA-256",
                 "waiting for the agent"):
        assert step in r.stderr
    info = gl("info", "--json", "--ctl", plain.ctl_path, "--data", plain.data_path)
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["via"] == "guestlink"
    assert described["agent_version"] == out["version"]
    # what `image install` records: the same manifest and files, read in the guest
    status = guest_status(plain)
    assert status["installed"] and status["agent_version"] == out["version"]
    assert {f["state"] for f in status["files"]} == {"present"}
    assert {f["path"] for f in status["files"]} >= {T.AGENT_PYZ, T.WRAPPER, CONF, T.RC_LOCAL}
    code, leftovers = qga_sh(plain, "ls -d /tmp/guestlink-enroll-* 2>/dev/null; true")
    assert leftovers == ""  # the private copy directory is gone


def test_enroll_again_changes_nothing(plain):
    _, before = qga_sh(plain, "sha256sum %s %s" % (T.MANIFEST, T.AGENT_PYZ))
    r = gl("enroll", *plain_args(plain))
    assert r.returncode == 0, r.stderr
    assert re.match(r"already enrolled \(version [^)]+\), nothing changed", r.stdout)
    assert "copying the agent" not in r.stderr
    _, after = qga_sh(plain, "sha256sum %s %s" % (T.MANIFEST, T.AGENT_PYZ))
    assert after == before


def test_enroll_newer_version_upgrades_restarts_and_keeps_the_config(plain, upgrade_pyz):
    code, _ = qga_sh(plain, "echo '# edited by the admin' >> %s" % CONF)
    assert code == 0
    r = gl("enroll", "--json", "--agent", upgrade_pyz, *plain_args(plain))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["action"] == "upgraded" and out["version"] == "9.9.9"
    assert out["previous_version"] != "9.9.9"
    assert out["agent"]["version"] == "9.9.9"  # the restarted agent answered
    _, conf = qga_sh(plain, "cat %s" % CONF)
    assert conf.endswith("# edited by the admin\n")
    assert guest_status(plain)["manifest_version"] == "9.9.9"


def test_remove_undoes_the_enroll(plain):
    r = gl("enroll", "--remove", *plain_args(plain))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("removed guestlink agent")
    r = gl("ping", "--ctl", plain.ctl_path, "--timeout", 3)
    assert r.returncode != 0
    code, out = qga_sh(plain, "ls -d %s %s %s %s 2>&1; grep -c guestlink /etc/rc.local 2>&1; true"
                       % (T.AGENT_PYZ, T.MANIFEST, CONF, T.RCLOCAL_SCRIPT))
    assert out.count("No such file") >= 4, out
    r = gl("enroll", "--remove", *plain_args(plain))
    assert r.returncode == 0 and "not installed; nothing to do" in r.stdout


#: python3 in the "no python" guest: absent (exit 127, as sh says for a missing command), or, once
#: /tmp/hostile exists, a liar whose probe names /etc with a terminal escape as its temp directory
FAKE_PYTHON3 = b"""#!/bin/sh
if [ -f /tmp/hostile ]; then
    printf '%s\\n' '{"python": "3.11.2", "executable": "/usr/bin/python3", "virtio_console": "loaded", "installed_sha256": null, "tmpdir": "/etc/\\u001b]0;pwned\\u0007"}'
    exit 0
fi
exit 127
"""


@pytest.fixture(scope="module")
def nopython(make_vm):
    return make_vm(agent_pyz=None, qga=True, extra_files={"/usr/bin/python3": FAKE_PYTHON3})


def test_a_guest_without_python3_is_refused_and_nothing_is_written(nopython):
    vm = nopython
    r = gl("enroll", *plain_args(vm))
    assert r.returncode == 78, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and "no usable python3" in lines[0]
    assert "nothing was written" in lines[0]
    assert "Traceback" not in r.stderr
    code, out = qga_sh(vm, "ls -d /tmp/guestlink-enroll-* /var/lib/guestlink /usr/local/lib/guestlink"
                           " %s %s 2>/dev/null; true" % (CONF, T.RC_LOCAL))
    assert out == ""
    # a guest lying in its probe: refused on the host, its text escaped, still nothing written
    assert qga_sh(vm, "touch /tmp/hostile")[0] == 0
    r = gl("enroll", *plain_args(vm))
    assert r.returncode == 65, r.stderr
    assert "malformed probe result from the guest (field tmpdir)" in r.stderr
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr and "Traceback" not in r.stderr
    code, out = qga_sh(vm, "ls -d /var/lib/guestlink /usr/local/lib/guestlink %s 2>/dev/null; true"
                       % CONF)
    assert out == ""


def test_missing_qemu_ga_is_named(nopython, tmp_path):
    (tmp_path / "ctl.sock").write_bytes(b"")
    r = gl("enroll", "--qga", tmp_path / "none.sock", "--ctl", tmp_path / "ctl.sock")
    assert r.returncode == 69
    assert "no qemu-ga socket" in r.stderr and "org.qemu.guest_agent.0" in r.stderr
    # the port is there but qemu-ga is not running: stop init's respawn loop, then qemu-ga (in the
    # background, after qemu-ga has answered this very exec)
    vm = nopython
    code, _ = qga_sh(vm, "q=$(cat /run/qemu-ga.pid); loop=$(cut -d' ' -f4 /proc/$q/stat); "
                         "(sleep 1; kill $loop; kill $q) </dev/null >/dev/null 2>&1 &")
    assert code == 0
    time.sleep(3)
    r = gl("enroll", *plain_args(vm))
    assert r.returncode in (69, 75), r.stderr
    assert "qemu-ga did not answer" in r.stderr and "qemu-guest-agent" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    vm.stop()


# --- libvirt: a domain booted without the guestlink channels ---------------------------------------

QGA_ONLY = """\
    <controller type='virtio-serial' index='0'/>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>"""


@pytest.fixture(scope="module")
def domains(libvirtd, testvm_base, agent_pyz):  # noqa: F811 (libvirtd: the imported fixture)
    d = Domains(None)  # the guest has no agent of its own: enroll brings it
    yield d
    d.close()


def test_enroll_hot_plugs_the_channels_of_a_libvirt_domain(domains):
    name = "guestlink-e2e-enroll"
    workdir = domains.dir / "enroll"
    workdir.mkdir(mode=0o755)
    xml = domain_xml(name, workdir, domains.dir / "vmlinuz", domains.dir / "initrd.img", QGA_ONLY,
                     append="guestlink.nports=1")
    (workdir / "domain.xml").write_text(xml)
    virsh("define", str(workdir / "domain.xml"))
    domains.names.append(name)
    virsh("start", name)
    assert "org.guestlink.ctl" not in virsh("dumpxml", name).stdout
    deadline = time.monotonic() + 120  # a running VM: its qemu-ga has connected to libvirt
    while virsh("qemu-agent-command", name, '{"execute": "guest-ping"}', check=False).returncode:
        assert time.monotonic() < deadline, domains.console(name)[-2000:]
        time.sleep(1)
    r = gl("enroll", "--json", name, timeout=400)
    assert r.returncode == 0, "%s\nconsole:\n%s" % (r.stderr, domains.console(name)[-2000:])
    out = json.loads(r.stdout)
    assert out["action"] == "installed" and out["agent"]["ping_ms"] > 0
    assert any("org.guestlink.ctl" in c for c in out["channels"]["live"])
    assert any("org.guestlink.ctl" in c for c in out["channels"]["config"])
    assert "org.guestlink.ctl" in virsh("dumpxml", "--inactive", name).stdout
    r = gl("ping", "--json", name, "--timeout", 30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["via"] == "guestlink"  # not the domain's qemu-ga
    r = gl("enroll", "--remove", name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("removed guestlink agent")
    assert "channels stay in libvirt domain %s" % name in r.stderr
    r = gl("ping", "--via", "guestlink", name, "--timeout", 3)
    assert r.returncode != 0


# --- the sysv test disk: enrolled online, read offline, started at the next boot --------------------

def test_enrolled_disk_reads_the_same_offline_and_starts_the_agent_at_boot(tmp_path):
    disk = ensure_disk()
    img = tmp_path / "disk.qcow2"
    shutil.copyfile(disk.qcow2, img)
    vm = DiskVM(tmp_path / "vm1", img, disk, qga=True)
    try:
        vm.start(timeout=120)
        r = gl("enroll", "--json", *plain_args(vm))
        assert r.returncode == 0, "%s\nconsole:\n%s" % (r.stderr, vm.console_text()[-2000:])
        out = json.loads(r.stdout)
        assert out["action"] == "installed" and out["init"] == "sysv"
        assert "/etc/rc2.d/S01guestlink-agent" in out["changed"]
        online = guest_status(vm)
        code, _ = qga_sh(vm, "sync")
        assert code == 0
    finally:
        vm.stop()
    r = gl("image", "status", "--json", img)
    assert r.returncode == 0, r.stderr
    offline = json.loads(r.stdout)
    for key in ("installed", "agent_version", "manifest_version", "init", "installed_at",
                "ctl_name", "data_name", "files", "config"):
        assert offline[key] == online[key], key
    assert {f["state"] for f in offline["files"]} == {"present"}

    vm = DiskVM(tmp_path / "vm2", img, disk)  # no qemu-ga port this time: the agent starts by itself
    try:
        vm.start(timeout=120)
        deadline = time.monotonic() + 60
        while True:
            r = gl("ping", "--via", "guestlink", "--ctl", vm.ctl_path, "--data", vm.data_path,
                   "--timeout", 3)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.returncode == 0, "%s\nconsole:\n%s" % (r.stderr, vm.console_text()[-2000:])
        assert "starting /etc/rc2.d/S01guestlink-agent" in vm.console_text()
    finally:
        vm.stop()
