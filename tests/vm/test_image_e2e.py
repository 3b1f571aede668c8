"""`guestlink image` against real disk images, booted for real.

The disk (testvm/diskimage.py) is the test bed's guest as a sysv-style busybox system on an ext4
partition (partition 2 of an MBR qcow2; partition 1 has no filesystem). It has no agent and no
test-bed /init: the agent runs only if `guestlink image install` put it there, started by the
installed init script (/etc/rc2.d) or /etc/rc.local block.
"""

import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import testvm
from testvm.diskimage import DiskVM, ensure_disk

REPO = Path(__file__).resolve().parents[2]
NEWER = "0.1.0+e2e.2"


@pytest.fixture(scope="module")
def disk(testvm_base):
    try:
        return ensure_disk()
    except testvm.TestbedError as e:
        pytest.fail(f"cannot build the test disk: {e}", pytrace=False)


@pytest.fixture(scope="module")
def newer_pyz(tmp_path_factory):
    """The real agent bundle with a patched version string."""
    sys.path.insert(0, str(REPO / "src"))
    from guestlink.bundle import build_bundle_bytes
    src = zipfile.ZipFile(io.BytesIO(build_bundle_bytes()))
    out = tmp_path_factory.mktemp("newer") / "guestlink-agent.pyz"
    buf = io.BytesIO()
    buf.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "guestlink/_version.py":
                data = f'__version__ = "{NEWER}"\n'.encode()
            dst.writestr(info, data)
    out.write_bytes(buf.getvalue())
    return out


def _env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra or {})
    return env


def image(*args, env=None, timeout=600):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "guestlink", "image"] + [str(a) for a in args],
                       env=_env(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=timeout)
    r.seconds = time.monotonic() - t0
    print(f"image {' '.join(str(a) for a in args)}: exit {r.returncode} in {r.seconds:.1f} s\n"
          f"{r.stderr}{r.stdout}")
    return r


def cli(vm, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "guestlink"] + list(args),
                          env=_env({"GUESTLINK_CTL": vm.ctl_path, "GUESTLINK_DATA": vm.data_path}),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=timeout)


def status(img, *extra):
    r = image("status", img, "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def copy_disk(disk, tmp_path, name="disk.qcow2"):
    dst = tmp_path / name
    shutil.copyfile(disk.qcow2, dst)
    return dst


def boot(img, disk, tmp_path, name):
    vm = DiskVM(tmp_path / name, img, disk)
    try:
        vm.start(timeout=120)
    except (testvm.TestbedError, TimeoutError) as e:
        vm.stop()
        pytest.fail(f"the disk did not boot: {e}", pytrace=False)
    return vm


def wait_ping(vm, timeout=60):
    """The agent answers `guestlink ping` (it may still be starting after init's ready line)."""
    deadline = time.monotonic() + timeout
    while True:
        r = cli(vm, "ping", "--json", "--timeout", "3")
        if r.returncode == 0:
            return json.loads(r.stdout)
        if time.monotonic() > deadline:
            raise AssertionError(f"no ping answer within {timeout} s (exit {r.returncode}: "
                                 f"{r.stderr.strip()}); console:\n{vm.console_text()[-3000:]}")
        time.sleep(0.5)


def leftovers(img):
    """Anything an image command left behind: mounts, loop devices, helper processes, temp dirs."""
    found = []
    with open("/proc/self/mountinfo") as f:
        found += [l.split()[4] for l in f if "guestlink-image-" in l]
    if shutil.which("losetup"):
        out = subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE, text=True).stdout
        found += [l for l in out.splitlines() if "guestlink-image-" in l or str(img) in l]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and str(img) in cmdline and re.search(
                r"qemu-storage-daemon|guestfish|qemu-nbd|qemu-system", cmdline):
            found.append(f"process {pid}: {cmdline}")
    found += [str(p) for p in Path(tempfile_dir()).glob("guestlink-image-*")]
    return found


def tempfile_dir():
    import tempfile
    return tempfile.gettempdir()


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- the whole life cycle with the loop backend (sysv init script) -------------------------------

@pytest.mark.needs("loop-backend")
def test_loop_install_boot_upgrade_remove(disk, newer_pyz, tmp_path):
    img = copy_disk(disk, tmp_path)
    r = image("install", img, "--backend", "loop")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "installed guestlink agent 0.1.0"
    assert "partition 2, ext4 via loop device (qemu-storage-daemon FUSE export)" in r.stderr
    assert "init system: sysv" in r.stderr
    assert leftovers(img) == []
    st = status(img, "--backend", "loop")
    assert (st["installed"], st["agent_version"], st["init"]) == (True, "0.1.0", "sysv")
    assert {f["path"]: f["state"] for f in st["files"]}["/etc/rc2.d/S01guestlink-agent"] == "present"

    vm = boot(img, disk, tmp_path, "vm1")
    try:
        ping = wait_ping(vm)
        assert ping["agent_version"] == "0.1.0"
        assert "guestlink-testvm: starting /etc/rc2.d/S01guestlink-agent" in vm.console_text()
        r = cli(vm, "exec", "--", "sh", "-c", "cat /run/guestlink-agent.pid && ls /etc/rc2.d")
        assert r.returncode == 0 and "S01guestlink-agent" in r.stdout, r.stderr
        # the user edits the config inside the guest; the upgrade must keep it
        r = cli(vm, "exec", "--", "sh", "-c",
                "sed -i 's/^deny =$/deny = reboot/' /etc/guestlink/agent.conf && sync")
        assert r.returncode == 0, r.stderr
        # a running VM holds the image's lock: refused
        r = image("install", img, "--backend", "loop")
        assert r.returncode == 75 and "in use" in r.stderr
    finally:
        vm.stop()
    assert leftovers(img) == []

    r = image("install", img, "--agent", newer_pyz)  # auto: says which backend it took
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"upgraded guestlink agent 0.1.0 -> {NEWER}"
    assert re.search(r"backend: (nbd|loop) \(auto\)", r.stderr)
    assert "kept /etc/guestlink/agent.conf: modified since install" in r.stderr
    st = status(img)
    assert st["agent_version"] == NEWER and st["previous_version"] == "0.1.0"
    assert st["config"]["modified"] is True

    vm = boot(img, disk, tmp_path, "vm2")
    try:
        assert wait_ping(vm)["agent_version"] == NEWER
        r = cli(vm, "reboot")  # denied by the user's kept config
        assert r.returncode == 77, (r.returncode, r.stderr)
    finally:
        vm.stop()

    r = image("remove", img, "--backend", "loop")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"removed guestlink agent {NEWER}"
    assert "kept /etc/guestlink/agent.conf: modified since install" in r.stderr
    st = status(img, "--backend", "loop")
    assert st["installed"] is False and st["agent_version"] is None and st["foreign_files"] == []

    vm = boot(img, disk, tmp_path, "vm3")  # still boots
    try:
        text = vm.console_text()
        assert "guestlink-testvm: ready" in text
        assert "guestlink-agent" not in text and "starting /etc/rc2.d" not in text
        r = cli(vm, "ping", "--timeout", "3")
        assert r.returncode in (69, 75), (r.returncode, r.stderr)
    finally:
        vm.stop()
    assert leftovers(img) == []


# --- status on a running VM's disk: read-only, QEMU's lock shared ------------------------------

@pytest.mark.parametrize("backends", [
    pytest.param(("loop", "auto"), id="loop+auto", marks=pytest.mark.needs("loop-backend")),
    pytest.param(("guestfs",), id="guestfs",
                 marks=pytest.mark.needs("libguestfs", "supermin-kernel")),
])
def test_status_on_a_running_vms_disk_reads_without_writing(disk, tmp_path, backends):
    img = copy_disk(disk, tmp_path)
    r = image("install", img, "--backend", "loop")
    assert r.returncode == 0, r.stderr
    vm = boot(img, disk, tmp_path, "vm1")
    try:
        wait_ping(vm)
        # the guest stops writing its disk, so any change below would be ours; QEMU still holds
        # the image open read-write (its lock says so)
        r = cli(vm, "exec", "--", "sh", "-c", "sync && mount -o remount,ro / && sync")
        assert r.returncode == 0, r.stderr
        before = sha(img)
        r = image("install", img, "--backend", "loop")
        assert r.returncode == 75 and "in use" in r.stderr, r.stderr
        for backend in backends:
            st = status(img, "--backend", backend)
            assert (st["installed"], st["agent_version"], st["init"]) == (True, "0.1.0", "sysv")
            assert {f["path"]: f["state"] for f in st["files"]}[
                "/etc/rc2.d/S01guestlink-agent"] == "present"
            assert sha(img) == before, "image status changed the image (backend %s)" % backend
            assert [x for x in leftovers(img) if "qemu-system" not in x] == []
        assert wait_ping(vm, timeout=10)["agent_version"] == "0.1.0"  # the VM did not notice
    finally:
        vm.stop()
    assert leftovers(img) == []


# --- guestfs (rc.local path) ----------------------------------------------------------------

@pytest.mark.needs("libguestfs", "supermin-kernel")
def test_guestfs_install_boot_remove(disk, tmp_path):
    img = copy_disk(disk, tmp_path)
    r = image("install", img, "--backend", "guestfs", "--init", "rc.local")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "installed guestlink agent 0.1.0"
    assert "/dev/sda2, ext4 via libguestfs mount-local" in r.stderr
    print(f"guestfs install took {r.seconds:.1f} s")
    assert leftovers(img) == []
    vm = boot(img, disk, tmp_path, "vm1")
    try:
        assert wait_ping(vm)["agent_version"] == "0.1.0"
        assert "guestlink-testvm: running /etc/rc.local" in vm.console_text()
        r = cli(vm, "exec", "--", "cat", "/etc/rc.local")
        assert r.returncode == 0 and "guestlink-agent.init start" in r.stdout
    finally:
        vm.stop()
    r = image("remove", img, "--backend", "guestfs")
    assert r.returncode == 0 and r.stdout.strip() == "removed guestlink agent 0.1.0", r.stderr
    assert leftovers(img) == []
    st = status(img, "--backend", "loop")
    assert st["installed"] is False and st["foreign_files"] == []


# --- failures midway: nothing left behind, image unchanged ------------------------------------

@pytest.mark.parametrize("backend,fault,code", [
    ("loop", "staged:/etc/guestlink/agent.conf", 70),
    ("loop", "opened@sigint", 130),
    ("loop", "staged:/etc/init.d/guestlink-agent@sigint", 130),
    pytest.param("guestfs", "staged:/usr/local/sbin/guestlink-agent@sigint", 130,
                 marks=pytest.mark.needs("libguestfs", "supermin-kernel")),
])
def test_failure_midway_leaves_nothing_behind(disk, tmp_path, backend, fault, code):
    img = copy_disk(disk, tmp_path)
    r = image("install", img, "--backend", backend, env={"GUESTLINK_IMAGE_FAULT": fault})
    assert r.returncode == code, r.stderr
    assert ("interrupted; everything set up was undone" if code == 130 else
            "injected failure") in r.stderr
    assert leftovers(img) == []
    st = status(img, "--backend", "loop")
    assert st["installed"] is False and st["foreign_files"] == []


# --- raw images, read-only, unknown filesystems, full disks --------------------------------------

def test_raw_image_and_clear_errors(disk, tmp_path):
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk.qcow2), str(raw)], check=True)
    r = image("install", raw, "--backend", "loop", "--partition", "2")
    assert r.returncode == 0 and "raw file" in r.stderr, r.stderr
    assert status(raw, "--backend", "loop")["agent_version"] == "0.1.0"

    r = image("install", raw, "--backend", "loop", "--partition", "1")
    assert r.returncode == 65 and "partition 1 holds an unknown filesystem" in r.stderr

    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as f:
        f.truncate(16 << 20)
    r = image("install", blank, "--backend", "loop")
    assert r.returncode == 65 and "no Linux filesystem in the image" in r.stderr

    before = sha(raw)
    os.chmod(raw, 0o444)
    r = image("install", raw, "--backend", "loop")
    assert r.returncode == 73 and "read-only" in r.stderr
    assert sha(raw) == before
    assert leftovers(raw) == [] and leftovers(blank) == []


def test_full_guest_filesystem(tmp_path):
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text("ID=test\n")
    img = tmp_path / "full.raw"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-d", str(tree), str(img), "4M"],
                   check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={mnt}/filler", "bs=64k"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        listing = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*"))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    r = image("install", img, "--backend", "loop")
    assert r.returncode == 73 and "full" in r.stderr and "nothing was changed" in r.stderr
    assert leftovers(img) == []
    subprocess.run(["mount", "-o", "loop,ro", str(img), str(mnt)], check=True)
    try:
        assert sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*")) == listing
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.needs("loop-backend")
def test_hostile_image_entries_never_reach_the_host(tmp_path):
    """Links and device nodes an image plants at the installer's temp names, mounted by the real
    kernel: an absolute link names the guest's file, a device node is never written."""
    host = tmp_path / "host"
    host.mkdir()
    canary = host / "canary"
    canary.write_bytes(b"precious\n")
    os.chmod(canary, 0o600)
    missing = host / "created-by-install"
    tree = tmp_path / "tree"
    for d in ("etc/init.d", "etc/rc2.d", "etc/guestlink", "etc/modules-load.d",
              "usr/local/lib/guestlink", "lib/modules/6.1.0"):
        (tree / d).mkdir(parents=True)
    (tree / "etc/os-release").write_text("ID=test\n")
    os.symlink(str(canary), tree / "etc/guestlink/agent.conf.guestlink-tmp")
    os.symlink(str(missing), tree / "usr/local/lib/guestlink/guestlink-agent.pyz.guestlink-tmp")
    os.mknod(tree / "etc/modules-load.d/guestlink.conf.guestlink-tmp", stat.S_IFCHR | 0o600,
             os.makedev(1, 3))
    # a host file saying virtio_pci is built in: read through the link, virtio_pci would be left
    # out (a link to /dev/zero is the unit tests' job: here it would exhaust the host's memory)
    builtin = host / "modules.builtin"
    builtin.write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    os.symlink(str(builtin), tree / "lib/modules/6.1.0/modules.builtin")
    img = tmp_path / "hostile.raw"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(img), "16M"], check=True)
    r = image("install", img, "--backend", "loop", timeout=300)
    assert r.returncode == 0, r.stderr
    assert canary.read_bytes() == b"precious\n" and stat.S_IMODE(canary.stat().st_mode) == 0o600
    assert not os.path.lexists(missing)
    assert leftovers(img) == []
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop,ro", str(img), str(mnt)], check=True)
    try:
        for gpath in ("etc/guestlink/agent.conf", "usr/local/lib/guestlink/guestlink-agent.pyz",
                      "etc/modules-load.d/guestlink.conf"):
            assert stat.S_ISREG(os.lstat(mnt / gpath).st_mode), gpath
            assert not os.path.lexists(mnt / (gpath + ".guestlink-tmp")), gpath
        assert "virtio_pci" in (mnt / "etc/modules-load.d/guestlink.conf").read_text()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    r = image("remove", img, "--backend", "loop", timeout=300)
    assert r.returncode == 0, r.stderr
    assert canary.read_bytes() == b"precious\n"
    assert leftovers(img) == []


# --- nbd: only where the kernel module exists ---------------------------------------------------

def test_nbd_install_remove(disk, tmp_path):
    # The one skip of the suite: the nbd module is a property of the running kernel, which
    # scripts/setup cannot change; the command sequence and cleanup are covered by
    # tests/unit/test_image.py. The reason is guestlink doctor's line.
    from guestlink import doctor

    nbd = doctor.check_nbd_module()
    if not nbd.ok:
        print(nbd.line())
        pytest.skip(nbd.line())
    img = copy_disk(disk, tmp_path)
    r = image("install", img, "--backend", "nbd")
    assert r.returncode == 0 and "via /dev/nbd" in r.stderr, r.stderr
    assert status(img, "--backend", "nbd")["agent_version"] == "0.1.0"
    r = image("remove", img, "--backend", "nbd")
    assert r.returncode == 0, r.stderr
    assert leftovers(img) == []
