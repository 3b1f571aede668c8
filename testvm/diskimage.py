"""A bootable qcow2 disk for the guestlink test VM, and DiskVM to boot it.

The disk is the test bed's own guest (the base initramfs unpacked: busybox, python3, /etc, the
virtio modules) turned into a small "sysv" Linux: busybox init reads /etc/inittab, runs
/etc/init.d/rcS, which loads /etc/modules-load.d/*.conf with modprobe, loads virtio_console for a
virtio console device (as udev's coldplug would), starts Debian's qemu-guest-agent (from the base
image) when the VM has the port org.qemu.guest_agent.0 (``DiskVM(..., qga=True)``), starts
/etc/rc2.d/S* scripts and runs /etc/rc.local — the way a Debian sysvinit guest starts services. Nothing of
the test bed's /init (which starts the agent itself) is left, so an agent only runs if
something installed it into the disk (``guestlink image install``).

Layout (MBR): partition 1 = 4 MiB with no filesystem (so the root has to be *found*),
partition 2 = ext4 root (``mkfs.ext4 -d``, no mounting). Boot: the test bed's kernel plus a tiny
initramfs (busybox + virtio_pci/virtio_blk) that mounts /dev/vda2 and switch_roots to /sbin/init.

    disk = ensure_disk()                       # cached in <cache>/disk-<key>/
    shutil.copy(disk.qcow2, my_copy)
    with DiskVM(workdir, my_copy, disk) as vm: ...   # a TestVM: ctl_path, wait_ready, ...
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Union

from .build import (DEFAULT_CACHE, CpioWriter, TestbedError, ensure_base, fetch_debs,
                    resolve_modules, resolve_versions, unpack_debs)
from .vm import TestVM

HERE = Path(__file__).resolve().parent
ROOT_PARTITION = 2
FS_MB = 192
PART1_MB = 4
BOOT_MODULES = ["virtio_pci", "virtio_blk"]
GUEST_MODULES = ["virtio_pci", "virtio_console", "virtio_blk"]

INITTAB = """\
# busybox init (sysv style) of the guestlink test disk
::sysinit:/etc/init.d/rcS
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
"""

RCS = """\
#!/bin/sh
# System start of the guestlink test disk: what a small sysvinit distribution does.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
export GUESTLINK_AGENT_LOG=/dev/console   # init scripts that honour it log to the serial console
say() { echo "guestlink-testvm: $*"; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -o remount,rw /
hostname -F /etc/hostname
ip link set lo up 2>/dev/null
# /etc/modules-load.d (systemd-modules-load / Debian kmod do this)
for f in /etc/modules-load.d/*.conf; do
    [ -f "$f" ] || continue
    for m in $(sed 's/#.*//' "$f"); do modprobe "$m" && say "modprobe $m" || say "modprobe $m failed"; done
done
# like udev's coldplug: a virtio console device gets its driver (modalias virtio:d00000003...)
for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device" 2>/dev/null)" = 0x0003 ] && modprobe virtio_console 2>/dev/null
done
# like udev settle: give named virtio ports a moment to appear
n=${NPORTS:-0}
for w in $(cat /proc/cmdline); do case "$w" in guestlink.nports=*) n="${w#guestlink.nports=}";; esac; done
# no virtio_console driver (nothing loaded it, e.g. the agent was removed): no port can appear
[ -d /sys/bus/virtio/drivers/virtio_console ] || n=0
i=0
while [ "$n" -gt 0 ] && [ "$(cat /sys/class/virtio-ports/*/name 2>/dev/null | wc -l)" -lt "$n" ] && [ $i -lt 50 ]; do
    sleep 0.1; i=$((i + 1))
done
# Debian's qemu-guest-agent, started (as its udev rule does) when the port org.qemu.guest_agent.0
# exists; no udev here, so the port is found by name in sysfs (after the settle wait above)
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && QGA_DEV=/dev/${p##*/}
done
if [ -n "$QGA_DEV" ] && [ -x /usr/sbin/qemu-ga ]; then
    mkdir -p /run/qemu-ga
    (
        while :; do /usr/sbin/qemu-ga -m virtio-serial -p "$QGA_DEV" -t /run/qemu-ga; sleep 0.5; done
    ) </dev/null >/dev/console 2>&1 &
    say "qemu-ga started on $QGA_DEV"
fi
# runlevel 2 start scripts, then rc.local
for s in /etc/rc2.d/S*; do
    [ -x "$s" ] && { say "starting $s"; "$s" start; }
done
if [ -x /etc/rc.local ]; then
    say "running /etc/rc.local"
    /etc/rc.local
fi
read -r up _ < /proc/uptime
say "ready (uptime ${up}s)"
"""

BOOT_INIT = """\
#!/bin/sh
# initramfs of the guestlink test disk: load virtio_blk, mount root=, switch_root to /sbin/init
export PATH=/bin
echo "guestlink-testvm: init started (initramfs)"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules); do insmod "/lib/modules/$m"; done
root=
for w in $(cat /proc/cmdline); do case "$w" in root=*) root="${w#root=}";; esac; done
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p /newroot
if ! mount -t ext4 -o rw "$root" /newroot; then
    echo "guestlink-testvm: cannot mount root $root"
    sleep 2
    poweroff -f
fi
echo "guestlink-testvm: root $root mounted"
umount /proc /sys /dev
exec switch_root /newroot /sbin/init
"""


@dataclass
class DiskImage:
    dir: Path
    qcow2: Path          # pristine disk: copy it before use
    initrd: Path         # boot initramfs (virtio_blk + switch_root)
    kernel: Path
    root_partition: int
    append: str          # kernel command line for DiskVM


# --------------------------------------------------------------------------
# cpio reader (the base initramfs is an uncompressed newc archive)

def extract_cpio(data: bytes, dest: Path) -> None:
    """Unpack a newc cpio archive (dirs, files, symlinks; device nodes skipped)."""
    off = 0
    while off + 110 <= len(data):
        if data[off:off + 6] != b"070701":
            raise TestbedError("not a newc cpio archive at offset %d" % off)
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = f[1], f[6], f[11]
        name = data[off + 110: off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off: off + filesize]
        off += filesize
        off += -off % 4
        if name == "TRAILER!!!":
            break
        path = dest / name
        if stat.S_ISDIR(mode):
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, stat.S_IMODE(mode))
        elif stat.S_ISLNK(mode):
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink() or path.exists():
                path.unlink()
            os.symlink(body.decode(), path)
        elif stat.S_ISREG(mode):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
            os.chmod(path, stat.S_IMODE(mode))


def _mbr(parts: List[tuple]) -> bytes:
    """A 512-byte MBR with partitions [(type, start_lba, sectors)]."""
    mbr = bytearray(512)
    struct.pack_into("<I", mbr, 440, 0x676C6B31)  # disk signature
    for i, (ptype, start, count) in enumerate(parts):
        struct.pack_into("<B3sB3sII", mbr, 446 + 16 * i, 0x80 if i == ROOT_PARTITION - 1 else 0,
                         b"\xfe\xff\xff", ptype, b"\xfe\xff\xff", start, count)
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def _run(cmd: List[str]) -> None:
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except FileNotFoundError:
        raise TestbedError(f"{cmd[0]} not found (Debian packages e2fsprogs, qemu-utils)") from None
    if r.returncode != 0:
        raise TestbedError(f"{' '.join(cmd)} failed: {r.stdout.strip()[-500:]}")


def _modules_dep(moddir: Path, names: List[str]) -> tuple:
    """[(rel, bytes)] of names + deps, and a modules.dep text (busybox modprobe reads it)."""
    allmods = {}
    lines = []
    for name in names:
        order = resolve_modules(moddir, [name])
        for rel, data in order:
            allmods[rel] = data
        rels = [rel for rel, _ in order]
        lines.append("%s: %s" % (rels[-1], " ".join(reversed(rels[:-1]))))
    for rel in allmods:
        if not any(l.startswith(rel + ":") for l in lines):
            order = resolve_modules(moddir, [Path(rel).name.split(".ko")[0]])
            rels = [r for r, _ in order]
            lines.append("%s: %s" % (rel, " ".join(reversed(rels[:-1]))))
    return list(allmods.items()), "".join(l.rstrip() + "\n" for l in lines)


def build_disk(out: Path, cache_dir: Path) -> None:
    base = ensure_base(cache_dir)
    kver = base.kernel_version
    versions = resolve_versions()
    kpkg = next(p for p in versions if p.startswith("linux-image-"))
    busybox = {"busybox-static": versions["busybox-static"]}
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="disk-build-") as tmp:
        tmp = Path(tmp)
        stage, root, boot = tmp / "stage", tmp / "root", tmp / "boot"
        for d in (stage, root, boot):
            d.mkdir()
        unpack_debs(fetch_debs({kpkg: versions[kpkg], **busybox}, cache_dir / "debs"), stage)
        moddir = stage / "lib/modules" / kver

        # root filesystem: the base guest, with a sysv-style init instead of the test bed's /init
        extract_cpio(base.initramfs.read_bytes(), root)
        for p in ("init", "etc/guestlink-testvm/modules", "etc/guestlink/agent-args"):
            if (root / p).exists():
                (root / p).unlink()
        mods, dep = _modules_dep(moddir, GUEST_MODULES)
        for rel, data in mods:
            (root / "lib/modules" / kver / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "lib/modules" / kver / rel).write_bytes(data)
        (root / "lib/modules" / kver / "modules.dep").write_text(dep)
        (root / "lib/modules" / kver / "modules.builtin").write_text("")
        (root / "etc/inittab").write_text(INITTAB)
        (root / "etc/fstab").write_text(f"/dev/vda{ROOT_PARTITION} / ext4 rw 0 1\n")
        for d in ("etc/init.d", "etc/rc0.d", "etc/rc1.d", "etc/rc2.d", "etc/rc6.d",
                  "etc/modules-load.d", "usr/local/sbin", "usr/local/lib", "var/log"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "etc/init.d/rcS").write_text(RCS)
        os.chmod(root / "etc/init.d/rcS", 0o755)
        (root / "sbin/init").unlink()
        os.symlink("/bin/busybox", root / "sbin/init")

        # filesystem, then disk = MBR + partition 1 (empty) + partition 2 (the ext4)
        fs = tmp / "root.ext4"
        _run(["mkfs.ext4", "-q", "-F", "-L", "guestroot", "-E", "root_owner=0:0",
              "-d", str(root), str(fs), f"{FS_MB}M"])
        start2 = 2048 + PART1_MB * 2048
        raw = tmp / "disk.raw"
        with open(raw, "wb") as f:
            f.write(_mbr([(0x83, 2048, PART1_MB * 2048), (0x83, start2, FS_MB * 2048)]))
            f.seek(start2 * 512)
            with open(fs, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
            f.truncate((start2 + FS_MB * 2048) * 512)
        dst = tmp / "out"
        dst.mkdir()
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(dst / "disk.qcow2")])

        # boot initramfs
        w = CpioWriter()
        w.chardev("dev/console", 5, 1, 0o600)
        w.file("bin/busybox", (stage / "bin/busybox").read_bytes(), 0o755)
        for a in ("sh", "mount", "umount", "insmod", "switch_root", "sleep", "mkdir", "cat",
                  "poweroff", "echo"):
            w.symlink(f"bin/{a}", "busybox")
        names = []
        for rel, data in resolve_modules(moddir, BOOT_MODULES):
            w.file(f"lib/modules/{Path(rel).name}", data)
            names.append(Path(rel).name)
        w.file("modules", "".join(n + "\n" for n in names).encode())
        w.file("init", BOOT_INIT.encode(), 0o755)
        for d in ("proc", "sys", "newroot"):
            w.mkdir(d)
        (dst / "initrd-disk.img").write_bytes(w.finish())
        if out.exists():
            shutil.rmtree(out)
        os.replace(dst, out)


def _key(base_key: str) -> str:
    h = hashlib.sha256()
    h.update((HERE / "diskimage.py").read_bytes())
    h.update(base_key.encode())
    return h.hexdigest()[:16]


def ensure_disk(cache_dir: Union[str, os.PathLike, None] = None) -> DiskImage:
    """Build (or reuse) the pristine test disk; cached next to the base image."""
    cache_dir = Path(cache_dir) if cache_dir else Path(os.environ.get("GUESTLINK_TESTVM_CACHE",
                                                                      DEFAULT_CACHE))
    cache_dir.mkdir(parents=True, exist_ok=True)
    base = ensure_base(cache_dir)
    out = cache_dir / f"disk-{_key(base.manifest['key'])}"
    with open(cache_dir / "disk.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "disk.qcow2").exists():
            build_disk(out, cache_dir)
            for old in cache_dir.glob("disk-*"):
                if old != out and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
    return DiskImage(out, out / "disk.qcow2", out / "initrd-disk.img", base.kernel,
                     ROOT_PARTITION, f"root=/dev/vda{ROOT_PARTITION} rw")


class DiskVM(TestVM):
    """A TestVM that boots from a disk image (the test bed's kernel, DiskImage's initramfs).

    Nothing is added to the guest per boot: whatever the disk holds runs. init prints the same
    ``guestlink-testvm: ready`` line at the end of rcS, so start()/wait_ready() work as usual."""

    __test__ = False

    def __init__(self, workdir, disk_path, disk: DiskImage, **kwargs):
        kwargs.setdefault("agent_pyz", None)
        kwargs["append"] = " ".join(x for x in (disk.append, kwargs.get("append", "")) if x)
        super().__init__(workdir, **kwargs)
        self.disk_path = Path(disk_path).resolve()
        self.disk = disk

    def qemu_command(self, kernel: Path, initrd: Path) -> List[str]:
        cmd = super().qemu_command(kernel, initrd)
        cmd[cmd.index("-initrd") + 1] = str(self.disk.initrd)
        fmt = "qcow2" if self.disk_path.suffix == ".qcow2" else "raw"
        cmd += ["-drive", f"file={self.disk_path},if=virtio,format={fmt}"]
        return cmd
