"""guestlink image: the tree installer (manifest, init kinds, upgrade, remove), partition tables,
the nbd backend's command sequence and cleanup (fake runner), backend selection, CLI errors."""

import errno
import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from contextlib import ExitStack

import pytest

from guestlink.bundle import build_bundle_bytes
from guestlink.image import tree as T
from guestlink.image.backends import Backend, NbdBackend, open_root
from guestlink.image.disk import (CommandFailed, ImageInfo, candidates, choose_partitions,
                                  partitions)
from guestlink.image.errors import (BackendUnavailable, ImageError, NoRootFilesystem, NoSpace)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def patched_bundle(version):
    """The real agent bundle with another version string (an "upgrade")."""
    src = zipfile.ZipFile(io.BytesIO(build_bundle_bytes()))
    out = io.BytesIO()
    out.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "guestlink/_version.py":
                data = ('__version__ = "%s"\n' % version).encode()
            dst.writestr(info, data)
    return out.getvalue()


def snapshot(root):
    """{relpath: (kind, content/target, mode)} of a tree: to prove it is unchanged."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir", st.st_mode & 0o7777)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", f.read(), st.st_mode & 0o7777)
    return out


def make_root(tmp_path, kind="sysv", rc_local=None):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib/os-release").write_text("ID=debian\n")
    os.symlink("../usr/lib/os-release", root / "etc/os-release")
    os.symlink("python3.11", root / "usr/bin/python3")
    (root / "usr/bin/python3.11").write_text("")
    (root / "sbin").mkdir()
    if kind == "systemd":
        (root / "lib/systemd").mkdir(parents=True)
        (root / "lib/systemd/systemd").write_text("")
        os.symlink("/lib/systemd/systemd", root / "sbin/init")
        (root / "etc/systemd/system").mkdir(parents=True)
        (root / "etc/init.d").mkdir()
        (root / "etc/rc2.d").mkdir()  # Debian with systemd has these too
    elif kind == "sysv":
        os.symlink("/bin/busybox", root / "sbin/init")
        for d in ("init.d", "rc0.d", "rc2.d", "rc3.d", "rc6.d"):
            (root / "etc" / d).mkdir()
    if rc_local is not None:
        (root / "etc/rc.local").write_text(rc_local)
        os.chmod(root / "etc/rc.local", 0o644)
    return root


@pytest.fixture(scope="module")
def pyz():
    return build_bundle_bytes()


def install(root, pyz, **kw):
    return T.Installer(T.Tree(str(root)), fault=kw.pop("fault", None)).install(pyz, **kw)


def remove(root):
    return T.Installer(T.Tree(str(root))).remove()


# --- tree installer --------------------------------------------------------------------------

def test_sysv_install_is_idempotent_and_remove_restores_the_tree_exactly(tmp_path, pyz):
    root = make_root(tmp_path, "sysv")
    before = snapshot(root)
    r = install(root, pyz)
    assert r["init"] == "sysv" and r["previous_version"] is None
    assert r["summary"] == "installed guestlink agent 0.1.0"
    assert os.readlink(root / "etc/rc2.d/S01guestlink-agent") == "../init.d/guestlink-agent"
    assert os.readlink(root / "etc/rc3.d/S01guestlink-agent") == "../init.d/guestlink-agent"
    assert os.readlink(root / "etc/rc0.d/K01guestlink-agent") == "../init.d/guestlink-agent"
    assert not (root / "etc/rc4.d").exists()  # only runlevel dirs that exist get links
    assert os.access(root / "etc/init.d/guestlink-agent", os.X_OK)
    assert (root / "usr/local/lib/guestlink/guestlink-agent.pyz").read_bytes() == pyz
    assert "virtio_console" in (root / "etc/modules-load.d/guestlink.conf").read_text()
    man = json.loads((root / "var/lib/guestlink/install.json").read_text())
    assert man["agent_version"] == "0.1.0" and man["init"] == "sysv"
    assert "/usr/local/lib/guestlink" in man["created_dirs"]
    after = snapshot(root)
    r2 = install(root, pyz)
    assert r2["summary"] == "guestlink agent 0.1.0 already installed; nothing to do"
    assert r2["changed"] == []
    assert {k: v for k, v in snapshot(root).items() if "install.json" not in k} == \
        {k: v for k, v in after.items() if "install.json" not in k}
    assert remove(root)["summary"] == "removed guestlink agent 0.1.0"
    assert snapshot(root) == before
    assert remove(root)["summary"] == "guestlink agent is not installed; nothing to do"


def test_systemd_unit_and_wanted_by_symlink(tmp_path, pyz):
    root = make_root(tmp_path, "systemd")
    r = install(root, pyz)
    assert r["init"] == "systemd"
    unit = (root / "etc/systemd/system/guestlink-agent.service").read_text()
    assert "ExecStart=/usr/local/sbin/guestlink-agent run" in unit
    assert "Restart=always" in unit and "WantedBy=multi-user.target" in unit
    link = root / "etc/systemd/system/multi-user.target.wants/guestlink-agent.service"
    assert os.readlink(link) == "/etc/systemd/system/guestlink-agent.service"
    assert not (root / "etc/rc2.d/S01guestlink-agent").exists()
    st = T.status(T.Tree(str(root)))
    assert st["installed"] and st["init"] == "systemd" and st["agent_version"] == "0.1.0"
    assert all(f["state"] == "present" for f in st["files"])
    remove(root)
    assert not link.exists() and not link.parent.exists()  # wants dir was created by install
    assert (root / "etc/systemd/system").is_dir()


def test_init_detection(tmp_path):
    assert T.detect_init(T.Tree(str(make_root(tmp_path / "a", "systemd"))))[0] == "systemd"
    assert T.detect_init(T.Tree(str(make_root(tmp_path / "b", "sysv"))))[0] == "sysv"
    assert T.detect_init(T.Tree(str(make_root(tmp_path / "c", "none"))))[0] == "rc.local"
    root = make_root(tmp_path / "d", "none")
    (root / "usr/lib/systemd").mkdir(parents=True)
    (root / "usr/lib/systemd/systemd").write_text("")
    (root / "sbin").rmdir()
    assert T.detect_init(T.Tree(str(root)))[0] == "systemd"


def test_rc_local_block_goes_before_exit_and_remove_restores_file_and_mode(tmp_path, pyz):
    original = "#!/bin/sh -e\necho hello\n\nexit 0\n"
    root = make_root(tmp_path, "none", rc_local=original)
    r = install(root, pyz)
    assert r["init"] == "rc.local"
    text = (root / "etc/rc.local").read_text()
    assert text.startswith("#!/bin/sh -e\necho hello\n")
    assert text.endswith(T.BLOCK_END + "\nexit 0\n")
    assert "/usr/local/lib/guestlink/guestlink-agent.init start" in text
    assert os.stat(root / "etc/rc.local").st_mode & 0o111  # made executable
    install(root, pyz)
    assert (root / "etc/rc.local").read_text().count(T.BLOCK_BEGIN) == 1
    remove(root)
    assert (root / "etc/rc.local").read_text() == original
    assert os.stat(root / "etc/rc.local").st_mode & 0o777 == 0o644


def test_rc_local_created_when_missing_and_deleted_on_remove(tmp_path, pyz):
    root = make_root(tmp_path, "none")
    install(root, pyz, init="rc.local")
    assert (root / "etc/rc.local").read_text().startswith("#!/bin/sh\n")
    remove(root)
    assert not (root / "etc/rc.local").exists()


def test_switching_init_kind_undoes_the_old_one(tmp_path, pyz):
    root = make_root(tmp_path, "sysv")
    before = snapshot(root)
    install(root, pyz)
    r = install(root, pyz, init="rc.local")
    assert "start method changed from sysv to rc.local" in r["notes"]
    assert not (root / "etc/rc2.d/S01guestlink-agent").exists()
    assert not (root / "etc/init.d/guestlink-agent").exists()
    assert T.BLOCK_BEGIN in (root / "etc/rc.local").read_text()
    remove(root)
    assert snapshot(root) == before


def test_guest_symlinks_never_lead_to_the_host(tmp_path, pyz):
    root = make_root(tmp_path, "none")
    (root / "etc/rc.d").mkdir()
    (root / "etc/rc.d/rc.local").write_text("#!/bin/sh\nexit 0\n")
    os.symlink("/etc/rc.d/rc.local", root / "etc/rc.local")  # absolute: inside the guest
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / str(outside).lstrip("/")).mkdir(parents=True)  # the same path inside the guest
    os.symlink(str(outside), root / "usr/local")  # absolute: means the guest's directory
    install(root, pyz, init="rc.local")
    assert T.BLOCK_BEGIN in (root / "etc/rc.d/rc.local").read_text()
    assert os.path.islink(root / "etc/rc.local")
    assert list(outside.iterdir()) == []
    assert (root / str(outside).lstrip("/") / "lib/guestlink/guestlink-agent.pyz").exists()


def test_upgrade_says_from_which_version_and_keeps_a_user_modified_config(tmp_path, pyz):
    root = make_root(tmp_path, "sysv")
    install(root, pyz, ctl_name="org.example.ctl")
    conf = root / "etc/guestlink/agent.conf"
    assert "ctl_name = org.example.ctl" in conf.read_text()
    conf.write_text(conf.read_text().replace("deny =", "deny = reboot"))
    newer = patched_bundle("0.2.0")
    r = install(root, newer)
    assert r["summary"] == "upgraded guestlink agent 0.1.0 -> 0.2.0"
    assert r["ctl_name"] == "org.example.ctl"  # remembered from the first install
    assert any("kept /etc/guestlink/agent.conf: modified" in n for n in r["notes"])
    assert "deny = reboot" in conf.read_text()
    st = T.status(T.Tree(str(root)))
    assert st["agent_version"] == "0.2.0" and st["config"]["modified"]
    r = remove(root)
    assert any("kept /etc/guestlink/agent.conf" in n for n in r["notes"])
    assert conf.exists() and not (root / "usr/local/lib/guestlink").exists()
    assert any("kept directory /etc/guestlink" in n for n in r["notes"])


def test_unmodified_config_follows_new_channel_names(tmp_path, pyz):
    root = make_root(tmp_path, "sysv")
    install(root, pyz)
    install(root, pyz, ctl_name="a.ctl", data_name="a.data")
    text = (root / "etc/guestlink/agent.conf").read_text()
    assert "ctl_name = a.ctl" in text and "data_name = a.data" in text


def test_config_is_valid_for_the_agent(tmp_path, pyz):
    from guestlink.agent.config import Config, read_config_file
    root = make_root(tmp_path, "sysv")
    install(root, pyz, ctl_name="x.ctl", data_name="x.data")
    cfg = read_config_file(Config(), str(root / "etc/guestlink/agent.conf"), required=True)
    assert (cfg.ctl_name, cfg.data_name, cfg.allow, cfg.deny) == ("x.ctl", "x.data", ["*"], [])


def test_foreign_files_are_backed_up_and_restored_and_foreign_config_kept(tmp_path, pyz):
    root = make_root(tmp_path, "sysv")
    (root / "usr/local/sbin").mkdir(parents=True)
    (root / "usr/local/sbin/guestlink-agent").write_text("#!/bin/sh\necho mine\n")
    (root / "etc/guestlink").mkdir()
    (root / "etc/guestlink/agent.conf").write_text("[agent]\nlog_level = debug\n")
    before = snapshot(root)
    r = install(root, pyz)
    assert any("kept the existing /etc/guestlink/agent.conf" in n for n in r["notes"])
    assert "python3" in (root / "usr/local/sbin/guestlink-agent").read_text()
    assert (root / "var/lib/guestlink/backup/usr/local/sbin/guestlink-agent").read_text() == \
        "#!/bin/sh\necho mine\n"
    remove(root)
    assert snapshot(root) == before


@pytest.mark.parametrize("stage", ["before-stage", "staged:/etc/guestlink/agent.conf",
                                   "staged:/etc/rc2.d/S01guestlink-agent"])
def test_failure_midway_leaves_the_tree_unchanged(tmp_path, pyz, stage):
    root = make_root(tmp_path, "sysv")
    before = snapshot(root)

    def fault(name):
        if name == stage:
            raise ImageError("injected")

    with pytest.raises(ImageError, match="injected"):
        install(root, pyz, fault=fault)
    assert snapshot(root) == before


def test_failure_midway_during_upgrade_keeps_the_old_install(tmp_path, pyz):
    root = make_root(tmp_path, "sysv")
    install(root, pyz)
    before = snapshot(root)

    def fault(name):
        if name == "staged:/usr/local/lib/guestlink/guestlink-agent.pyz":
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(NoSpace, match="full"):
        install(root, patched_bundle("0.3.0"), fault=fault)
    assert snapshot(root) == before


def test_full_filesystem_is_refused_before_writing(tmp_path, pyz, monkeypatch):
    root = make_root(tmp_path, "sysv")
    before = snapshot(root)

    class St:
        f_bavail, f_frsize, f_blocks = 10, 4096, 1000

    monkeypatch.setattr(T.os, "statvfs", lambda p: St)
    with pytest.raises(NoSpace, match="40 KiB free"):
        install(root, pyz)
    assert snapshot(root) == before


def test_read_only_tree_gives_a_clear_error(tmp_path, pyz, monkeypatch):
    root = make_root(tmp_path, "sysv")
    real_open = os.open

    def ro_open(path, flags, *a, **kw):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(T.os, "open", ro_open)
    before = snapshot(root)
    with pytest.raises(ImageError, match="read-only") as e:
        install(root, pyz)
    assert e.value.exit_code == 73
    assert snapshot(root) == before


def test_not_a_root_filesystem(tmp_path, pyz):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoRootFilesystem):
        install(tmp_path / "empty", pyz)


def test_virtio_pci_listed_unless_builtin_everywhere(tmp_path):
    root = make_root(tmp_path, "sysv")
    assert T.virtio_modules(T.Tree(str(root))) == ["virtio_pci", "virtio_console"]
    (root / "lib/modules/6.1.0").mkdir(parents=True)
    (root / "lib/modules/6.1.0/modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    assert T.virtio_modules(T.Tree(str(root))) == ["virtio_console"]
    (root / "lib/modules/6.2.0").mkdir(parents=True)
    assert T.virtio_modules(T.Tree(str(root))) == ["virtio_pci", "virtio_console"]


def test_damaged_manifest_is_reported(tmp_path, pyz):
    root = make_root(tmp_path, "sysv")
    (root / "var/lib/guestlink").mkdir(parents=True)
    (root / "var/lib/guestlink/install.json").write_text("{nope")
    with pytest.raises(ImageError, match="damaged") as e:
        install(root, pyz)
    assert e.value.exit_code == 65


def test_hand_installed_agent_is_not_removed(tmp_path):
    root = make_root(tmp_path, "sysv")
    (root / "usr/local/sbin").mkdir(parents=True)
    (root / "usr/local/sbin/guestlink-agent").write_text("x")
    with pytest.raises(ImageError, match="not installed by"):
        remove(root)
    assert (root / "usr/local/sbin/guestlink-agent").exists()


# --- partition tables and filesystems -----------------------------------------------------------

def ext4_at(buf, offset):
    struct.pack_into("<H", buf, offset + 1080, 0xEF53)
    struct.pack_into("<II", buf, offset + 1024 + 0x5C, 0x4, 0x2C0)


def mbr_disk(parts, size=16 << 20):
    """parts: [(type, start_lba, sectors, fs)] -> bytearray disk."""
    buf = bytearray(size)
    for i, (ptype, start, count, fs) in enumerate(parts):
        struct.pack_into("<B3sB3sII", buf, 446 + 16 * i, 0, b"\0\0\0", ptype, b"\0\0\0", start, count)
        if fs == "ext4":
            ext4_at(buf, start * 512)
    buf[510:512] = b"\x55\xaa"
    return buf


def test_mbr_partitions_and_root_candidates():
    disk = mbr_disk([(0x83, 2048, 8192, None), (0x83, 10240, 16384, "ext4")])
    cands = candidates(io.BytesIO(bytes(disk)), len(disk))
    assert [(p.number, p.start, p.size, t) for p, t in cands] == [
        (1, 2048 * 512, 8192 * 512, None), (2, 10240 * 512, 16384 * 512, "ext4")]
    assert [p.number for p, _ in choose_partitions(cands)] == [2]
    with pytest.raises(ImageError, match="partition 1 holds an unknown filesystem"):
        choose_partitions(cands, 1)
    with pytest.raises(ImageError, match="no partition 7"):
        choose_partitions(cands, 7)


def test_logical_partitions():
    disk = mbr_disk([(0x83, 2048, 2048, None), (0x05, 8192, 20000, None)])
    struct.pack_into("<B3sB3sII", disk, 8192 * 512 + 446, 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, 4096)
    disk[8192 * 512 + 510:8192 * 512 + 512] = b"\x55\xaa"
    ext4_at(disk, (8192 + 2048) * 512)
    cands = candidates(io.BytesIO(bytes(disk)), len(disk))
    assert [(p.number, t) for p, t in cands] == [(1, None), (5, "ext4")]


def test_gpt_partitions():
    disk = bytearray(4 << 20)
    struct.pack_into("<B3sB3sII", disk, 446, 0, b"\0\0\0", 0xEE, b"\0\0\0", 1, 8191)
    disk[510:512] = b"\x55\xaa"
    disk[512:520] = b"EFI PART"
    struct.pack_into("<QII", disk, 512 + 72, 2, 128, 128)
    entry = 1024
    disk[entry:entry + 16] = bytes(range(1, 17))
    struct.pack_into("<QQ", disk, entry + 32, 2048, 6143)
    ext4_at(disk, 2048 * 512)
    cands = candidates(io.BytesIO(bytes(disk)), len(disk))
    assert [(p.number, p.start, p.size, t) for p, t in cands] == [(1, 2048 * 512, 4096 * 512, "ext4")]


def test_whole_disk_filesystem_and_unknown_disk():
    disk = bytearray(2 << 20)
    ext4_at(disk, 0)
    cands = candidates(io.BytesIO(bytes(disk)), len(disk))
    assert [(p.number, t) for p, t in cands] == [(0, "ext4")]
    assert choose_partitions(cands, 1)[0][0].number == 0
    blank = candidates(io.BytesIO(bytes(2 << 20)), 2 << 20)
    with pytest.raises(ImageError, match="no partition table and no filesystem"):
        choose_partitions(blank)
    assert partitions(io.BytesIO(bytes(1024)), 1024) == []


# --- nbd backend with a fake runner ------------------------------------------------------------

class FakeNbdRunner:
    """Plays modprobe/qemu-nbd/mount/umount against a fake /dev and /sys."""

    def __init__(self, dev, sys_dir, disk, fail_on=None):
        self.dev, self.sys, self.disk, self.fail_on = dev, sys_dir, disk, fail_on
        self.calls = []

    def run(self, cmd, check=True, env=None, timeout=None, input=None):
        self.calls.append(list(cmd))
        if self.fail_on and self.fail_on(cmd):
            raise CommandFailed(cmd, 32, "%s: injected failure" % cmd[0])
        if cmd[0] == "modprobe":
            os.makedirs(os.path.join(self.sys, "block/nbd0"), exist_ok=True)
            open(os.path.join(self.dev, "nbd0"), "wb").close()
            with open(os.path.join(self.sys, "block/nbd0/size"), "w") as f:
                f.write("0\n")
        elif cmd[0] == "qemu-nbd" and cmd[1].startswith("--connect="):
            with open(os.path.join(self.dev, "nbd0"), "wb") as f:
                f.write(self.disk)
            with open(os.path.join(self.sys, "block/nbd0/size"), "w") as f:
                f.write("%d\n" % (len(self.disk) // 512))
            for n in (1, 2):
                open(os.path.join(self.dev, "nbd0p%d" % n), "wb").close()
        elif cmd[0] == "mount":
            if cmd[-2].endswith("p2"):
                os.makedirs(os.path.join(cmd[-1], "etc"))
                open(os.path.join(cmd[-1], "etc/os-release"), "w").close()
        elif cmd[0] == "umount":
            mnt = cmd[-1]
            if os.path.exists(os.path.join(mnt, "etc/os-release")):
                os.unlink(os.path.join(mnt, "etc/os-release"))
                os.rmdir(os.path.join(mnt, "etc"))
        return subprocess.CompletedProcess(cmd, 0, "", "")


def nbd_setup(tmp_path, fail_on=None):
    dev, sysd = tmp_path / "dev", tmp_path / "sys"
    dev.mkdir()
    sysd.mkdir()
    disk = bytes(mbr_disk([(0x83, 2048, 4096, "ext4"), (0x83, 8192, 16384, "ext4")]))
    runner = FakeNbdRunner(str(dev), str(sysd), disk, fail_on)
    backend = NbdBackend(runner=runner, dev_dir=str(dev), sys_dir=str(sysd), wait_timeout=0.5)
    return backend, runner, str(dev / "nbd0")


SAFE = "nodev,nosuid,noexec"  # an untrusted filesystem's devices/setuid/programs stay inert


def summarize(calls):
    out = []
    for c in calls:
        if c[0] in ("mount", "umount"):
            out.append([c[0]] + [("MNT" if "guestlink-image-" in a else a) for a in c[1:]])
        else:
            out.append(c)
    return out


def test_nbd_command_sequence_and_cleanup(tmp_path):
    backend, runner, dev = nbd_setup(tmp_path)
    info = ImageInfo("/img/disk.qcow2", "qcow2", 16 << 20)
    with ExitStack() as stack:
        root, desc = backend.open(info, stack)
        assert os.path.exists(os.path.join(root, "etc/os-release"))
        assert desc == "partition 2, ext4 via %s" % dev
        tmpdir = os.path.dirname(root)
    assert summarize(runner.calls) == [
        ["modprobe", "nbd", "max_part=16"],
        ["qemu-nbd", "--connect=" + dev, "--image-opts",
         "driver=qcow2,file.driver=file,file.filename=/img/disk.qcow2,backing="],
        ["mount", "-t", "ext4", "-o", SAFE, dev + "p1", "MNT"],  # partition 1: no os-release
        ["umount", "MNT"],
        ["mount", "-t", "ext4", "-o", SAFE, dev + "p2", "MNT"],  # the root
        ["umount", "MNT"],
        ["qemu-nbd", "--disconnect", dev],
    ]
    assert not os.path.exists(tmpdir)


def test_nbd_explicit_partition(tmp_path):
    backend, runner, dev = nbd_setup(tmp_path)
    with ExitStack() as stack:
        backend.open(ImageInfo("/i.raw", "raw", 16 << 20), stack, partition=2)
    assert [c for c in summarize(runner.calls) if c[0] == "mount"] == [
        ["mount", "-t", "ext4", "-o", SAFE, dev + "p2", "MNT"]]


def test_nbd_failed_mount_still_disconnects(tmp_path):
    backend, runner, dev = nbd_setup(tmp_path, fail_on=lambda c: c[0] == "mount")
    with pytest.raises(CommandFailed, match="injected"):
        with ExitStack() as stack:
            backend.open(ImageInfo("/i.qcow2", "qcow2", 16 << 20), stack, partition=2)
    assert summarize(runner.calls)[-2:] == [
        ["mount", "-t", "ext4", "-o", SAFE, dev + "p2", "MNT"],
        ["qemu-nbd", "--disconnect", dev]]
    assert not [p for p in os.listdir("/tmp") if p.startswith("guestlink-image-")
                and os.path.realpath("/tmp/" + p) in str(runner.calls)]


def test_nbd_failure_after_mount_unmounts_then_disconnects(tmp_path):
    backend, runner, dev = nbd_setup(tmp_path)
    with pytest.raises(RuntimeError, match="midway"):
        with ExitStack() as stack:
            backend.open(ImageInfo("/i.qcow2", "qcow2", 16 << 20), stack)
            raise RuntimeError("midway")
    assert summarize(runner.calls)[-2:] == [["umount", "MNT"], ["qemu-nbd", "--disconnect", dev]]


def test_nbd_without_module_is_unavailable(tmp_path):
    backend, runner, dev = nbd_setup(tmp_path, fail_on=lambda c: c[0] == "modprobe")
    with pytest.raises(BackendUnavailable, match="modprobe nbd failed"):
        with ExitStack() as stack:
            backend.open(ImageInfo("/i.qcow2", "qcow2", 16 << 20), stack)
    assert runner.calls == [["modprobe", "nbd", "max_part=16"]]


def test_nbd_locked_image(tmp_path):
    backend, runner, dev = nbd_setup(tmp_path)

    def fail(cmd):
        if cmd[0] == "qemu-nbd" and cmd[1].startswith("--connect"):
            raise CommandFailed(cmd, 1, 'Failed to get "write" lock')
        return False

    runner.fail_on = fail
    with pytest.raises(ImageError, match="in use") as e:
        with ExitStack() as stack:
            backend.open(ImageInfo("/i.qcow2", "qcow2", 16 << 20), stack)
    assert e.value.exit_code == 75
    assert not any(c[:2] == ["qemu-nbd", "--disconnect"] for c in runner.calls)


# --- backend selection ---------------------------------------------------------------------------

class FakeQemuImg:
    def __init__(self, stderr=None):
        self.stderr = stderr

    def run(self, cmd, check=True, **kw):
        if self.stderr:
            raise CommandFailed(cmd, 1, self.stderr)
        return subprocess.CompletedProcess(cmd, 0, json.dumps(
            {"format": "qcow2", "virtual-size": 1 << 20}), "")


def missing(what):
    class B(Backend):
        name = what

        def probe(self, info):
            return ["%s-tool" % what]
    return B


def test_auto_lists_what_each_backend_lacks(tmp_path):
    img = tmp_path / "d.qcow2"
    img.write_bytes(b"x")
    factories = {n: missing(n) for n in ("nbd", "loop", "guestfs")}
    with pytest.raises(BackendUnavailable) as e:
        open_root(str(img), ExitStack(), runner=FakeQemuImg(), factories=factories)
    assert str(e.value) == ("no backend can open %s here: nbd: needs nbd-tool; loop: needs "
                            "loop-tool; guestfs: needs guestfs-tool" % img)
    assert e.value.exit_code == 69


def test_auto_falls_through_to_the_first_backend_that_opens(tmp_path):
    img = tmp_path / "d.qcow2"
    img.write_bytes(b"x")
    log = []

    class Broken(Backend):
        name = "loop"

        def probe(self, info):
            return []

        def open(self, info, stack, partition=None, force=False):
            stack.callback(log.append, "loop cleaned up")
            raise BackendUnavailable("no fuse")

    class Works(Backend):
        name = "guestfs"

        def probe(self, info):
            return []

        def open(self, info, stack, partition=None, force=False):
            stack.callback(log.append, "guestfs closed")
            return "/r", "partition 1"

    factories = {"nbd": missing("nbd"), "loop": Broken, "guestfs": Works}
    with ExitStack() as stack:
        root, b, desc = open_root(str(img), stack, runner=FakeQemuImg(), factories=factories,
                                  log=log.append)
        assert (root, b.name, desc) == ("/r", "guestfs", "qcow2: partition 1")
        assert log == ["loop cleaned up", "backend: guestfs (auto)"]
    assert log[-1] == "guestfs closed"


def test_locked_image_is_refused(tmp_path):
    img = tmp_path / "d.qcow2"
    img.write_bytes(b"x")
    with pytest.raises(ImageError, match="in use .*--force") as e:
        open_root(str(img), ExitStack(), runner=FakeQemuImg(
            'qemu-img: Could not open: Failed to get shared "write" lock\nIs another process '
            'using the image?'))
    assert e.value.exit_code == 75


def test_read_only_image_file_is_refused(tmp_path):
    img = tmp_path / "d.qcow2"
    img.write_bytes(b"x")
    os.chmod(img, 0o444)
    with pytest.raises(ImageError, match="read-only") as e:
        open_root(str(img), ExitStack(), runner=FakeQemuImg())
    assert e.value.exit_code == 73


# --- CLI ---------------------------------------------------------------------------------------

def cli(*args):
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
    return subprocess.run([sys.executable, "-m", "guestlink", "image"] + list(args), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)


def test_cli_root_install_status_remove_json(tmp_path):
    root = make_root(tmp_path, "sysv")
    r = cli("install", "--root", str(root), "--json", "--channel-names", "c.ctl,c.data")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["version"] == "0.1.0" and out["init"] == "sysv" and out["ctl_name"] == "c.ctl"
    r = cli("status", "--root", str(root), "--json")
    st = json.loads(r.stdout)
    assert st["installed"] and st["agent_version"] == "0.1.0" and st["data_name"] == "c.data"
    r = cli("status", "--root", str(root))
    assert "guestlink agent 0.1.0 installed" in r.stdout and "started by: sysv" in r.stdout
    r = cli("remove", "--root", str(root))
    assert r.returncode == 0 and r.stdout.strip() == "removed guestlink agent 0.1.0"
    r = cli("status", "--root", str(root))
    assert "not installed" in r.stdout


def test_cli_usage_errors(tmp_path):
    assert cli("install").returncode == 2
    r = cli("install", "x.qcow2", "--root", str(tmp_path))
    assert r.returncode == 2 and "exactly one of IMAGE or --root" in r.stderr
    r = cli("install", str(tmp_path / "missing.qcow2"))
    assert r.returncode == 65 and "no such image" in r.stderr
    r = cli("install", "--root", str(tmp_path), "--channel-names", "a,b,c")
    assert r.returncode == 2
