"""Disk images without mounting: format/lock checks (qemu-img), partition tables, filesystem magic.

Partition tables are read here (MBR with logical partitions, GPT) instead of relying on
``losetup -P`` / udev, so partitions work the same in containers without udev.
"""

import json
import os
import stat
import struct
import subprocess
from dataclasses import dataclass
from typing import IO, Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

from ..exitcodes import EXIT_USAGE
from ..protocol.safetext import printable
from .errors import EXIT_DATAERR, ImageError, ImageInUse, ReadOnly, BackendUnavailable

SECTOR = 512

# Formats guestlink opens. Left out on purpose: vmdk (descriptors name extent files on the host)
# and qed (backing files); each format here is opened with its driver named explicitly.
FORMATS = ("raw", "qcow2", "vdi", "vhdx", "vpc")
# Formats whose header can name a backing file; they are opened with "backing": null.
BACKING_FORMATS = ("qcow2",)
# A name may stand in for --format; the contents never do (the guest writes them).
EXTENSION_FORMATS = {".raw": "raw", ".img": "raw", ".qcow2": "qcow2"}
# Mount options for a filesystem the guest controls: its device nodes, setuid files and
# programs must never act on the host.
SAFE_MOUNT = ("nodev", "nosuid", "noexec")
# Read-only mounts must not replay a journal (that writes the device, and a read-only loop or
# nbd device refuses it).
NO_REPLAY = {"ext4": "noload", "ext3": "noload", "xfs": "norecovery",
             "btrfs": "rescue=nologreplay"}  # kernel >= 5.9; 6.x refuses plain "nologreplay"


class Runner:
    """Runs commands; tests replace it with a fake that records the command lines."""

    def run(self, cmd: Sequence[str], check: bool = True, env: Optional[Mapping[str, str]] = None,
            timeout: Optional[float] = None,
            input: Optional[str] = None) -> "subprocess.CompletedProcess[str]":
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env, timeout=timeout, input=input)
        except FileNotFoundError:
            raise BackendUnavailable("%s not found" % cmd[0])
        if check and proc.returncode != 0:
            raise CommandFailed(cmd, proc.returncode, proc.stderr)
        return proc

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> "subprocess.Popen[Any]":
        return subprocess.Popen(cmd, **kwargs)


class CommandFailed(ImageError):
    def __init__(self, cmd: Sequence[str], returncode: int, stderr: Optional[str]) -> None:
        msg = (stderr or "").strip().splitlines()
        # a tool's message can quote the image (a backing file name the guest wrote)
        ImageError.__init__(self, "%s failed (exit %s)%s" % (
            " ".join(cmd[:2]), returncode, (": " + printable(msg[-1])) if msg else ""))
        self.cmd = cmd
        self.returncode = returncode
        self.stderr = stderr or ""


@dataclass
class ImageInfo:
    path: str                    # absolute: never read by QEMU as "json:", "nbd:", "file:"
    format: str                  # from --format or the file name, never probed
    virtual_size: int
    read_only: bool = False      # ``image status``: read-only open, QEMU lock shared
    allow_backing: bool = False  # --allow-backing-file: the user trusts the backing chain


def image_format(path: str, fmt: Optional[str] = None) -> str:
    """The image's format from ``--format`` or its name. Never from its contents: a guest can
    write a qcow2 header naming host files into its own raw disk."""
    if fmt:
        if fmt not in FORMATS:
            raise ImageError("unsupported --format %s (supported: %s)"
                             % (printable(fmt), ", ".join(FORMATS)), EXIT_USAGE)
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext in EXTENSION_FORMATS:
        return EXTENSION_FORMATS[ext]
    raise ImageError("cannot tell the format of %s from its name (.raw, .img, .qcow2): give "
                     "--format %s" % (printable(path), "|".join(FORMATS)), EXIT_USAGE)


def check_image(path: str, writable: bool = True) -> None:
    """Refuse what is no image, and (``writable``) images we could not write back to
    (read-only file, read-only host filesystem)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError("no such image: %s" % printable(path), EXIT_DATAERR)
    except OSError as exc:
        raise ImageError("cannot access %s: %s" % (printable(path), exc.strerror), EXIT_DATAERR)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ImageError("not a disk image file: %s" % printable(path), EXIT_DATAERR)
    if writable and not st.st_mode & 0o222:
        raise ReadOnly("the image is read-only (mode %o): %s; nothing was changed"
                       % (st.st_mode & 0o777, printable(path)))
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK)
        os.close(fd)
    except OSError as exc:
        if not writable:
            raise ImageError("cannot read %s: %s" % (printable(path), exc.strerror),
                             EXIT_DATAERR)
        raise ReadOnly("the image cannot be opened for writing (%s): %s; nothing was changed"
                       % (exc.strerror, printable(path)))


def image_info(path: str, runner: "Runner", force: bool = False, fmt: Optional[str] = None,
               read_only: bool = False, allow_backing: bool = False) -> ImageInfo:
    """Size (and a check of the header) from ``qemu-img info -f FORMAT``: the format is given,
    never probed. Without ``force`` or ``read_only``, QEMU's image lock is honoured: an image
    that a running VM has open is refused (ImageInUse). A header naming a backing file or an
    external data file (host paths!) is refused unless ``allow_backing``."""
    fmt = image_format(path, fmt)
    path = os.path.abspath(path)
    cmd = ["qemu-img", "info", "-f", fmt, "--output=json"] + (
        ["-U"] if force or read_only else []) + [path]
    shown = printable(path)
    try:
        proc = runner.run(cmd)
    except BackendUnavailable:
        raise BackendUnavailable("qemu-img not found: install Debian package qemu-utils")
    except CommandFailed as exc:
        if "lock" in exc.stderr.lower():
            raise ImageInUse("%s is in use (a running VM holds its lock): stop the VM first, "
                             "or use --force if you know it is not running" % shown)
        raise ImageError("cannot read %s as %s: %s" % (
            shown, fmt, printable(exc.stderr.strip().splitlines()[-1]) if exc.stderr.strip()
            else exc), EXIT_DATAERR)
    try:
        info = json.loads(proc.stdout)
        size = int(info["virtual-size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ImageError("unexpected qemu-img info output for %s: %s" % (shown, exc))
    if not allow_backing:
        for what, name in _external_files(info):
            raise ImageError("%s (%s) names a %s %s on this host; refusing to open it (it may "
                             "be a host file or disk the image wants to read or write); pass "
                             "--allow-backing-file if you trust this image"
                             % (shown, fmt, what, printable(name)), EXIT_DATAERR)
    return ImageInfo(path, fmt, size, read_only=read_only, allow_backing=allow_backing)


def looks_like_qcow2(path: str) -> bool:
    """Does the file start with qcow2's magic? Only ever used for a hint, never to pick the
    format."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"QFI\xfb"
    except OSError:
        return False


def _external_files(info: Dict[str, Any]) -> List[Tuple[str, str]]:
    """[(what, host path)] that ``qemu-img info`` says the image header names."""
    out = []
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing:
        out.append(("backing file", str(backing)))
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    if isinstance(data, dict) and data.get("data-file"):
        out.append(("data file", str(data["data-file"])))
    return out


def _qemu_opt(value: object) -> str:
    if value is None:
        return ""  # "backing=": no backing file (the key=value spelling of null)
    if value is True or value is False:
        return "on" if value else "off"
    return str(value).replace(",", ",,")  # a comma in a path must not start another option


def blockdev_options(info: ImageInfo, force: bool = False) -> Dict[str, Any]:
    """QAPI BlockdevOptions for the image, as nested dicts: driver named, no backing file
    (even one the header check missed), read-only with the lock shared for ``info.read_only``,
    QEMU locking off for ``force``."""
    file: Dict[str, Any] = {"driver": "file", "filename": info.path}
    node: Dict[str, Any] = {"driver": info.format, "file": file}
    if info.format in BACKING_FORMATS and not info.allow_backing:
        node["backing"] = None
    if info.read_only:
        for n in (node, file):
            n["read-only"] = True
            n["force-share"] = True
    elif force:
        file["locking"] = "off"
    return node


def image_opts(info: ImageInfo, force: bool = False) -> str:
    """:func:`blockdev_options` in the ``--image-opts`` key=value syntax of qemu-nbd/qemu-img."""
    def flat(d: Dict[str, Any], prefix: str) -> List[str]:
        out = []
        for k, v in d.items():
            if isinstance(v, dict):
                out += flat(v, prefix + k + ".")
            else:
                out.append("%s%s=%s" % (prefix, k, _qemu_opt(v)))
        return out

    return ",".join(flat(blockdev_options(info, force), ""))


def mount_options(fstype: Optional[str], read_only: bool) -> str:
    opts = list(SAFE_MOUNT)
    if read_only:
        opts.append("ro")
        if fstype in NO_REPLAY:
            opts.append(NO_REPLAY[fstype])
    return ",".join(opts)


# --- partitions and filesystems ------------------------------------------------------------

@dataclass
class Partition:
    number: int           # 1-based (MBR logical partitions start at 5); 0 = whole disk
    start: int            # bytes
    size: int             # bytes
    type: str = ""        # MBR type byte as hex, or GPT type GUID


def _read(f: IO[bytes], offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _guid(raw: bytes) -> str:
    a, b, c = struct.unpack_from("<IHH", raw)
    return "%08x-%04x-%04x-%s-%s" % (a, b, c, raw[8:10].hex(), raw[10:16].hex())


# Bounds on what a (crafted) partition table makes us read: the Linux kernel gives up on an
# extended-partition chain after 100 hops; real GPTs have 128 entries of 128 bytes.
MAX_EBR_HOPS = 100
MAX_GPT_ENTRIES = 1024
GPT_ENTRY_SIZES = range(128, 4096 + 1, 8)


def partitions(f: IO[bytes], disk_size: int) -> List[Partition]:
    """The partitions of the disk open as binary file ``f`` ([] when there is no table).
    Partitions that do not lie inside the disk are left out."""
    mbr = _read(f, 0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return []
    entries = [struct.unpack_from("<B3sB3sII", mbr, 446 + 16 * i) for i in range(4)]
    if any(e[2] == 0xEE for e in entries):
        return _gpt(f, disk_size)
    if _fs_type_at(f, 0):  # a filesystem boot sector (FAT) also ends in 55 AA
        return []
    out = []
    for i, (_, _, ptype, _, lba, count) in enumerate(entries):
        if ptype == 0 or count == 0:
            continue
        if ptype in (0x05, 0x0F, 0x85):
            out += _logical(f, lba, disk_size)
            continue
        out.append(Partition(i + 1, lba * SECTOR, count * SECTOR, "%02x" % ptype))
    return [p for p in out if _inside(p, disk_size)]


def _inside(p: Partition, disk_size: int) -> bool:
    return p.size > 0 and p.start + p.size <= disk_size


def _logical(f: IO[bytes], ext_lba: int, disk_size: int) -> List[Partition]:
    out: List[Partition] = []
    seen: Set[int] = set()
    number, ebr_lba = 5, ext_lba
    while ebr_lba not in seen and len(seen) < MAX_EBR_HOPS and ebr_lba * SECTOR < disk_size:
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


def _gpt(f: IO[bytes], disk_size: int) -> List[Partition]:
    hdr = _read(f, SECTOR, 92)
    if hdr[:8] != b"EFI PART":
        return []
    entries_lba, count, esize = struct.unpack_from("<QII", hdr, 72)
    if count > MAX_GPT_ENTRIES or esize not in GPT_ENTRY_SIZES \
            or entries_lba * SECTOR + count * esize > disk_size:
        raise ImageError("the image's GPT header is damaged or crafted (%d entries of %d bytes "
                         "at sector %d of a %d-byte disk)" % (count, esize, entries_lba, disk_size),
                         EXIT_DATAERR)
    table = _read(f, entries_lba * SECTOR, count * esize)
    out = []
    for i in range(count):
        e = table[i * esize:(i + 1) * esize]
        if len(e) < 56 or e[:16] == b"\0" * 16:
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        p = Partition(i + 1, first * SECTOR, (last - first + 1) * SECTOR, _guid(e[:16]))
        if _inside(p, disk_size):
            out.append(p)
    return out


def _fs_type_at(f: IO[bytes], offset: int) -> Optional[str]:
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

#: A partition and the filesystem type found in it (None: not recognised).
Candidate = Tuple[Partition, Optional[str]]


def candidates(path_or_file: Union[str, bytes, "os.PathLike[str]", IO[bytes]],
               disk_size: Optional[int] = None) -> List[Candidate]:
    """[(Partition, fs type or None)] for a raw disk (file or block device): the partitions, or
    the whole disk (number 0) when it holds a filesystem directly."""
    f: IO[bytes]
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


def choose_partitions(cands: Sequence[Candidate],
                      partition: Optional[int] = None) -> List[Candidate]:
    """The candidates worth trying (Linux filesystems), or just ``partition``. Raises a clear
    error when there is nothing to try."""
    def describe() -> str:
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
    usable: List[Candidate] = [(p, t) for p, t in cands if t in LINUX_FILESYSTEMS]
    if not usable:
        raise ImageError("no Linux filesystem in the image (found: %s; supported: %s)"
                         % (describe(), ", ".join(LINUX_FILESYSTEMS)), EXIT_DATAERR)
    return usable


def describe_partition(p: Partition, t: Optional[str]) -> str:
    return "%s, %s" % ("whole disk" if p.number == 0 else "partition %d" % p.number, t)
