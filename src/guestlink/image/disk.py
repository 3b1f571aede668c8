"""Disk images without mounting: format/lock checks (qemu-img), partition tables, filesystem magic.

Partition tables are read here (MBR with logical partitions, GPT) instead of relying on
``losetup -P`` / udev, so partitions work the same in containers without udev.
"""

import json
import os
import struct
import subprocess
from dataclasses import dataclass

from .errors import EXIT_DATAERR, ImageError, ImageInUse, ReadOnly, BackendUnavailable

SECTOR = 512


class Runner:
    """Runs commands; tests replace it with a fake that records the command lines."""

    def run(self, cmd, check=True, env=None, timeout=None, input=None):
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env, timeout=timeout, input=input)
        except FileNotFoundError:
            raise BackendUnavailable("%s not found" % cmd[0])
        if check and proc.returncode != 0:
            raise CommandFailed(cmd, proc.returncode, proc.stderr)
        return proc

    def popen(self, cmd, **kwargs):
        return subprocess.Popen(cmd, **kwargs)


class CommandFailed(ImageError):
    def __init__(self, cmd, returncode, stderr):
        msg = (stderr or "").strip().splitlines()
        ImageError.__init__(self, "%s failed (exit %s)%s" % (
            " ".join(cmd[:2]), returncode, (": " + msg[-1]) if msg else ""))
        self.cmd = cmd
        self.returncode = returncode
        self.stderr = stderr or ""


@dataclass
class ImageInfo:
    path: str
    format: str
    virtual_size: int


def check_writable(path):
    """Refuse images we could not write back to (read-only file, read-only host filesystem)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError("no such image: %s" % path, EXIT_DATAERR)
    except OSError as exc:
        raise ImageError("cannot access %s: %s" % (path, exc.strerror), EXIT_DATAERR)
    if not (os.path.isfile(path) or os.path.exists(path) and _is_block(st)):
        raise ImageError("not a disk image file: %s" % path, EXIT_DATAERR)
    if not st.st_mode & 0o222:
        raise ReadOnly("the image is read-only (mode %o): %s; nothing was changed"
                       % (st.st_mode & 0o777, path))
    try:
        fd = os.open(path, os.O_RDWR)
        os.close(fd)
    except OSError as exc:
        raise ReadOnly("the image cannot be opened for writing (%s): %s; nothing was changed"
                       % (exc.strerror, path))


def _is_block(st):
    import stat as _stat
    return _stat.S_ISBLK(st.st_mode)


def image_info(path, runner, force=False):
    """Format and size from ``qemu-img info``. Without ``force``, QEMU's image lock is honoured:
    an image that a running VM has open is refused (ImageInUse)."""
    cmd = ["qemu-img", "info", "--output=json"] + (["-U"] if force else []) + [path]
    try:
        proc = runner.run(cmd)
    except BackendUnavailable:
        raise BackendUnavailable("qemu-img not found: install Debian package qemu-utils")
    except CommandFailed as exc:
        if "lock" in exc.stderr.lower():
            raise ImageInUse("%s is in use (a running VM holds its lock): stop the VM first, "
                             "or use --force if you know it is not running" % path)
        raise ImageError("cannot read %s: %s" % (path, exc.stderr.strip().splitlines()[-1]
                                                 if exc.stderr.strip() else exc), EXIT_DATAERR)
    try:
        info = json.loads(proc.stdout)
        return ImageInfo(path, info["format"], int(info["virtual-size"]))
    except (ValueError, KeyError) as exc:
        raise ImageError("unexpected qemu-img info output for %s: %s" % (path, exc))


# --- partitions and filesystems ------------------------------------------------------------

@dataclass
class Partition:
    number: int           # 1-based (MBR logical partitions start at 5); 0 = whole disk
    start: int            # bytes
    size: int             # bytes
    type: str = ""        # MBR type byte as hex, or GPT type GUID


def _read(f, offset, size):
    f.seek(offset)
    return f.read(size)


def _guid(raw):
    a, b, c = struct.unpack_from("<IHH", raw)
    return "%08x-%04x-%04x-%s-%s" % (a, b, c, raw[8:10].hex(), raw[10:16].hex())


def partitions(f, disk_size):
    """The partitions of the disk open as binary file ``f`` ([] when there is no table)."""
    mbr = _read(f, 0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return []
    entries = [struct.unpack_from("<B3sB3sII", mbr, 446 + 16 * i) for i in range(4)]
    if any(e[2] == 0xEE for e in entries):
        return _gpt(f)
    if _fs_type_at(f, 0):  # a filesystem boot sector (FAT) also ends in 55 AA
        return []
    out = []
    for i, (_, _, ptype, _, lba, count) in enumerate(entries):
        if ptype == 0 or count == 0:
            continue
        if ptype in (0x05, 0x0F, 0x85):
            out += _logical(f, lba)
            continue
        out.append(Partition(i + 1, lba * SECTOR, count * SECTOR, "%02x" % ptype))
    return out


def _logical(f, ext_lba):
    out, number, ebr_lba, seen = [], 5, ext_lba, set()
    while ebr_lba not in seen and len(out) < 128:
        seen.add(ebr_lba)
        ebr = _read(f, ebr_lba * SECTOR, SECTOR)
        if len(ebr) < SECTOR or ebr[510:512] != b"\x55\xaa":
            break
        e1 = struct.unpack_from("<B3sB3sII", ebr, 446)
        e2 = struct.unpack_from("<B3sB3sII", ebr, 462)
        if e1[2] and e1[5]:
            out.append(Partition(number, (ebr_lba + e1[4]) * SECTOR, e1[5] * SECTOR, "%02x" % e1[2]))
            number += 1
        if not e2[2] or not e2[5]:
            break
        ebr_lba = ext_lba + e2[4]
    return out


def _gpt(f):
    hdr = _read(f, SECTOR, 92)
    if hdr[:8] != b"EFI PART":
        return []
    entries_lba, count, esize = struct.unpack_from("<QII", hdr, 72)
    table = _read(f, entries_lba * SECTOR, count * esize)
    out = []
    for i in range(count):
        e = table[i * esize:(i + 1) * esize]
        if len(e) < 56 or e[:16] == b"\0" * 16:
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        out.append(Partition(i + 1, first * SECTOR, (last - first + 1) * SECTOR, _guid(e[:16])))
    return out


def _fs_type_at(f, offset):
    """Filesystem type from its superblock magic at byte ``offset``, or None."""
    head = _read(f, offset, 70 * 1024)
    if len(head) >= 1082 and head[1080:1082] == b"\x53\xef":
        compat, incompat = struct.unpack_from("<II", head, 1024 + 0x5C)
        if incompat & 0x2C0 or incompat & 0x40:  # extents / 64bit / flex_bg
            return "ext4"
        return "ext3" if compat & 0x4 else "ext2"
    if head[:4] == b"XFSB":
        return "xfs"
    if len(head) >= 65536 + 72 and head[65536 + 64:65536 + 72] == b"_BHRfS_M":
        return "btrfs"
    if head[3:11] in (b"mkfs.fat", b"MSDOS5.0", b"MSWIN4.1") or head[82:87] == b"FAT32" \
            or head[54:59] in (b"FAT12", b"FAT16"):
        return "vfat"
    if len(head) >= 4096 and head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap"
    if head[:4] == b"hsqs":
        return "squashfs"
    return None


LINUX_FILESYSTEMS = ("ext4", "ext3", "ext2", "xfs", "btrfs")


def fs_type(f, offset):
    return _fs_type_at(f, offset)


def candidates(path_or_file, disk_size=None):
    """[(Partition, fs type or None)] for a raw disk (file or block device): the partitions, or
    the whole disk (number 0) when it holds a filesystem directly."""
    if isinstance(path_or_file, (str, bytes, os.PathLike)):
        with open(path_or_file, "rb") as f:
            return candidates(f, disk_size)
    f = path_or_file
    if disk_size is None:
        f.seek(0, os.SEEK_END)
        disk_size = f.tell()
    whole = _fs_type_at(f, 0)
    if whole:
        return [(Partition(0, 0, disk_size, ""), whole)]
    return [(p, _fs_type_at(f, p.start)) for p in partitions(f, disk_size)]


def choose_partitions(cands, partition=None):
    """The candidates worth trying (Linux filesystems), or just ``partition``. Raises a clear
    error when there is nothing to try."""
    def describe():
        return ", ".join("%s (%s)" % ("whole disk" if p.number == 0 else "partition %d" % p.number,
                                       t or "unknown filesystem") for p, t in cands) or \
            "no partition table and no filesystem"

    if partition is not None:
        for p, t in cands:
            if p.number == partition or (partition == 1 and p.number == 0):
                if t not in LINUX_FILESYSTEMS:
                    raise ImageError("partition %d holds %s, not a Linux root filesystem "
                                     "(supported: %s)" % (partition, t or "an unknown filesystem",
                                                          ", ".join(LINUX_FILESYSTEMS)),
                                     EXIT_DATAERR)
                return [(p, t)]
        raise ImageError("no partition %d in the image (found: %s)" % (partition, describe()),
                         EXIT_DATAERR)
    usable = [(p, t) for p, t in cands if t in LINUX_FILESYSTEMS]
    if not usable:
        raise ImageError("no Linux filesystem in the image (found: %s; supported: %s)"
                         % (describe(), ", ".join(LINUX_FILESYSTEMS)), EXIT_DATAERR)
    return usable


def describe_partition(p, t):
    return "%s, %s" % ("whole disk" if p.number == 0 else "partition %d" % p.number, t)
