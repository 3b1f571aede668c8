"""guestlink image against hostile disk images: the format is never probed, backing and data
files named by an image header are never opened, untrusted filesystems are mounted
nodev,nosuid,noexec, crafted partition tables cost bounded work, and ``image status`` reads a
disk without writing it (read-only, QEMU force-share), even while a VM holds it.

The "real" tests run the real qemu-img / qemu-storage-daemon / losetup / mount (root needed);
the command-line tests use a recording runner.
"""

import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from typing import Iterator, List, Optional

import pytest

from guestlink.image.backends import GuestfsBackend, LoopBackend
from guestlink.image.disk import (CommandFailed, ImageInfo, Runner, candidates, image_info,
                                  image_opts, partitions)
from guestlink.image.errors import ImageError
from test_image import ext4_at, nbd_setup

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 1 << 20


# --- helpers -------------------------------------------------------------------------------

def need(*tools: str, root: bool = False) -> None:
    """These tests use the real tools: a machine without them fails with what is missing."""
    lacking = [t for t in tools if not shutil.which(t)]
    if root and os.geteuid() != 0:
        lacking.append("root privileges (losetup/mount)")
    if lacking:
        pytest.fail("this test needs %s (scripts/setup installs them)" % ", ".join(lacking),
                    pytrace=False)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
    return subprocess.run([sys.executable, "-m", "guestlink", "image"] + [str(a) for a in args],
                          env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def ext4_disk(tmp_path, name: str = "fs.raw", size: str = "8M"):
    """A raw disk whose whole is an ext4 root filesystem (/etc/os-release)."""
    need("mkfs.ext4")
    tree = tmp_path / ("tree-" + name)
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text("ID=test\n")
    img = tmp_path / name
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(img), size], check=True)
    return img


def qcow2_with_backing(tmp_path, backing: str, name: str = "evil.qcow2"):
    need("qemu-img")
    img = tmp_path / name
    # -u: qemu-img must not open the backing file while we build the trap
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw",
                    str(img), "16M"], check=True)
    return img


def qcow2_with_data_file(tmp_path, data_file, name: str = "evil-data.qcow2"):
    """A qcow2 whose header names an external data file; ``data_file`` becomes a FIFO."""
    need("qemu-img")
    img = tmp_path / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=%s" % data_file,
                    str(img), "16M"], check=True)
    os.unlink(data_file)
    os.mkfifo(data_file)
    return img


def forged_raw(tmp_path, qcow2, name: str):
    """What a guest can do to its own raw disk: write a qcow2's metadata at offset 0."""
    img = tmp_path / name
    with open(img, "wb") as f:
        f.write(qcow2.read_bytes())
        f.truncate(16 * MIB)
    return img


class FifoWatch:
    """Reports whether anything opened the FIFO for reading: while a reader has it open, a
    non-blocking writer's open succeeds (else ENXIO). The writer is closed at once, so a tool
    that did open it sees EOF instead of hanging for ever."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.opened = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
            else:
                self.opened = True
                os.close(fd)
            time.sleep(0.01)

    def __enter__(self) -> "FifoWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail (instead of looping for minutes) when the block takes longer than ``seconds``."""
    def expired(signum, frame):
        raise AssertionError("took longer than %s s" % seconds)

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def mount_options(mnt: str) -> List[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == os.path.realpath(mnt):
                return fields[5].split(",")
    raise AssertionError("%s is not mounted" % mnt)


# --- HIGH 1: the format is never probed, backing/data files are never opened --------------------

def test_raw_disk_with_a_forged_qcow2_header_is_read_as_raw(tmp_path):
    """The attack: a guest writes a qcow2 header naming a host file into its raw disk. Read as
    raw (from the .img name), the host file is never opened."""
    need("qemu-img", "qemu-storage-daemon", "losetup", root=True)
    fifo = tmp_path / "host-canary"
    os.mkfifo(fifo)
    img = forged_raw(tmp_path, qcow2_with_backing(tmp_path, str(fifo)), "guest-disk.img")
    with FifoWatch(fifo) as watch:
        r = cli("status", img, "--backend", "loop", timeout=60)
    assert not watch.opened, "a tool opened the backing file the forged header names"
    assert r.returncode == 65 and "no Linux filesystem" in r.stderr, r.stderr
    assert "starts with a qcow2 header but is read as raw (from its name)" in r.stderr
    # the same with an explicit --format raw on a name that says nothing
    other = tmp_path / "guest-disk"
    shutil.copyfile(img, other)
    with FifoWatch(fifo) as watch:
        r = cli("install", other, "--format", "raw", "--backend", "loop", timeout=60)
    assert not watch.opened
    assert r.returncode == 65 and "no Linux filesystem" in r.stderr, r.stderr


def test_raw_disk_with_a_forged_data_file_header_is_read_as_raw(tmp_path):
    need("qemu-img", "qemu-storage-daemon", "losetup", root=True)
    fifo = tmp_path / "host-data"
    img = forged_raw(tmp_path, qcow2_with_data_file(tmp_path, str(fifo)), "guest-disk.raw")
    with FifoWatch(fifo) as watch:
        r = cli("status", img, "--backend", "loop", timeout=60)
    assert not watch.opened
    assert r.returncode == 65 and "no Linux filesystem" in r.stderr, r.stderr


@pytest.mark.parametrize("command", ["status", "install", "remove"])
def test_qcow2_naming_a_backing_file_is_refused(tmp_path, command):
    need("qemu-img", "qemu-storage-daemon", "losetup", root=True)
    fifo = tmp_path / "host-canary"
    os.mkfifo(fifo)
    img = qcow2_with_backing(tmp_path, str(fifo))
    before = sha(img)
    with FifoWatch(fifo) as watch:
        r = cli(command, img, "--backend", "loop", timeout=60)
    assert not watch.opened
    assert r.returncode == 65, r.stderr
    assert "backing file %s" % fifo in r.stderr and "--allow-backing-file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert sha(img) == before


def test_qcow2_naming_a_data_file_is_refused(tmp_path):
    need("qemu-img", "qemu-storage-daemon", "losetup", root=True)
    fifo = tmp_path / "host-data"
    img = qcow2_with_data_file(tmp_path, str(fifo))
    with FifoWatch(fifo) as watch:
        r = cli("status", img, "--format", "qcow2", "--backend", "loop", timeout=60)
    assert not watch.opened
    assert r.returncode == 65 and "data file %s" % fifo in r.stderr, r.stderr


@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize("how", ["fuse", "convert"])
def test_loop_opens_qcow2_without_its_backing_file_even_unchecked(tmp_path, monkeypatch, how,
                                                                    read_only):
    """Defence in depth: a header the qemu-img info check did not see still pulls in no host
    file, because the image is opened with the backing file turned off."""
    need("qemu-img", "qemu-storage-daemon", "losetup", root=True)
    fifo = tmp_path / "host-canary"
    os.mkfifo(fifo)
    img = qcow2_with_backing(tmp_path, str(fifo))
    if how == "convert":
        monkeypatch.setattr(LoopBackend, "_qsd_ok", staticmethod(lambda: False))
    info = ImageInfo(str(img), "qcow2", 16 * MIB, read_only=read_only)  # no image_info check
    with FifoWatch(fifo) as watch:
        with pytest.raises(ImageError, match="no Linux filesystem"):
            with ExitStack() as stack, within(60):
                LoopBackend().open(info, stack)
    assert not watch.opened


def test_qemu_nbd_accepts_the_image_opts_and_skips_the_backing_file(tmp_path):
    """The options given to qemu-nbd --connect, tried on a unix socket (no nbd module needed)."""
    need("qemu-img", "qemu-nbd", "qemu-io")
    fifo = tmp_path / "host-canary"
    os.mkfifo(fifo)
    img = qcow2_with_backing(tmp_path, str(fifo), "evil,name.qcow2")
    sock = tmp_path / "nbd.sock"
    for read_only in (False, True):
        info = ImageInfo(str(img), "qcow2", 16 * MIB, read_only=read_only)
        with FifoWatch(fifo) as watch:
            server = subprocess.Popen(["qemu-nbd", "-k", str(sock)]
                                      + (["--read-only"] if read_only else [])
                                      + ["--image-opts", image_opts(info)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                deadline = time.monotonic() + 20
                while not sock.exists():
                    assert server.poll() is None, server.stdout.read()
                    assert time.monotonic() < deadline, "qemu-nbd did not start"
                    time.sleep(0.05)
                r = subprocess.run(["qemu-io", "-r", "-f", "raw", "nbd+unix:///?socket=%s" % sock,
                                    "-c", "read -v 0 16"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, timeout=20)
                assert r.returncode == 0 and "read 16/16 bytes" in r.stdout, r.stdout
            finally:
                server.terminate()
                server.wait(10)
        assert not watch.opened


def test_allow_backing_file_opens_a_trusted_backing_chain(tmp_path):
    need("qemu-img", "qemu-storage-daemon", "losetup", root=True)
    base = ext4_disk(tmp_path, "base.raw")
    img = qcow2_with_backing(tmp_path, str(base), "overlay.qcow2")
    r = cli("status", img, "--backend", "loop", "--allow-backing-file", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["installed"] is False


def test_a_name_without_a_known_extension_needs_format(tmp_path):
    img = tmp_path / "vm-disk"
    img.write_bytes(b"\0" * MIB)
    r = cli("status", img)
    assert r.returncode == 2, r.stderr
    assert "--format" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("status", img, "--format", "vmdk")
    assert r.returncode == 2  # formats that can name other host files are not offered


class Recorder(Runner):
    """The real runner, recording every command line."""

    def __init__(self) -> None:
        self.calls: List[List[str]] = []

    def run(self, cmd, **kw):
        self.calls.append(list(cmd))
        return Runner.run(self, cmd, **kw)

    def popen(self, cmd, **kw):
        self.calls.append(list(cmd))
        return Runner.popen(self, cmd, **kw)


def test_qemu_img_info_gets_the_format_and_an_absolute_path(tmp_path, monkeypatch):
    need("qemu-img")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "json:{}.raw").write_bytes(b"\0" * MIB)
    rec = Recorder()
    info = image_info("json:{}.raw", rec, fmt="raw")
    assert (info.format, info.virtual_size) == ("raw", MIB)
    assert info.path == str(tmp_path / "json:{}.raw")
    assert rec.calls == [["qemu-img", "info", "-f", "raw", "--output=json",
                          str(tmp_path / "json:{}.raw")]]
    rec.calls.clear()
    image_info("json:{}.raw", rec, fmt="raw", read_only=True)
    assert "-U" in rec.calls[0]  # shared: a running VM's lock does not stop a reader


# --- safe mounts ----------------------------------------------------------------------------

class FakeLoopRunner:
    def __init__(self) -> None:
        self.calls: List[List[str]] = []

    def run(self, cmd, check=True, env=None, timeout=None, input=None):
        self.calls.append(list(cmd))
        if cmd[0] == "losetup" and "--find" in cmd:
            return subprocess.CompletedProcess(cmd, 0, "/dev/loop99\n", "")
        if cmd[0] == "mount":
            mnt = cmd[-1]
            os.makedirs(os.path.join(mnt, "etc"))
            open(os.path.join(mnt, "etc/os-release"), "w").close()
        if cmd[0] == "umount":
            os.unlink(os.path.join(cmd[-1], "etc/os-release"))
            os.rmdir(os.path.join(cmd[-1], "etc"))
        return subprocess.CompletedProcess(cmd, 0, "", "")


def whole_ext4(path) -> None:
    buf = bytearray(2 * MIB)
    ext4_at(buf, 0)
    with open(path, "wb") as f:
        f.write(buf)


@pytest.mark.parametrize("read_only", [False, True])
def test_loop_mounts_nodev_nosuid_noexec_and_read_only_for_status(tmp_path, read_only):
    img = tmp_path / "d.raw"
    whole_ext4(img)
    runner = FakeLoopRunner()
    info = ImageInfo(str(img), "raw", 2 * MIB, read_only=read_only)
    with ExitStack() as stack:
        LoopBackend(runner=runner).open(info, stack)
    losetup = [c for c in runner.calls if c[0] == "losetup" and "--find" in c][0]
    mount = [c for c in runner.calls if c[0] == "mount"][0]
    opts = mount[mount.index("-o") + 1].split(",")
    assert {"nodev", "nosuid", "noexec"} <= set(opts)
    if read_only:
        assert "--read-only" in losetup and {"ro", "noload"} <= set(opts)
    else:
        assert "--read-only" not in losetup and "ro" not in opts


@pytest.mark.parametrize("read_only", [False, True])
def test_nbd_opens_without_backing_file_and_mounts_safely(tmp_path, read_only):
    backend, runner, dev = nbd_setup(tmp_path)
    info = ImageInfo("/images/a,b.qcow2", "qcow2", 16 * MIB, read_only=read_only)
    with ExitStack() as stack:
        backend.open(info, stack)
    connect = runner.calls[1]
    assert connect[:2] == ["qemu-nbd", "--connect=" + dev]
    opts = connect[connect.index("--image-opts") + 1]
    # the format is explicit, no backing file is opened, a comma in the path stays in the path
    items = re.split(r"(?<!,),(?!,)", opts)
    assert items[0] == "driver=qcow2" and "backing=" in items
    assert "file.filename=/images/a,,b.qcow2" in items
    for mount in [c for c in runner.calls if c[0] == "mount"]:
        mopts = mount[mount.index("-o") + 1].split(",")
        assert {"nodev", "nosuid", "noexec"} <= set(mopts)
        assert ("ro" in mopts) == read_only
    assert ("--read-only" in connect) == read_only
    if read_only:
        assert {"read-only=on", "force-share=on"} <= set(items)


class FakeGuestfish:
    def __init__(self) -> None:
        self.calls: List[List[str]] = []

    def popen(self, cmd, **kw):
        self.calls.append(list(cmd))
        if "--listen" in cmd:
            kw["stdout"].write("GUESTFISH_PID=%d; export GUESTFISH_PID\n" % os.getpid())
            kw["stdout"].flush()
            return subprocess.Popen(["true"])
        return subprocess.Popen(["sleep", "30"])

    def run(self, cmd, check=True, env=None, timeout=None, input=None):
        self.calls.append(list(cmd))
        out = ""
        if cmd[-1] == "list-filesystems":
            out = "/dev/sda1: ext4\n"
        elif cmd[-2:] == ["exists", "/etc/os-release"]:
            out = "true\n"
        return subprocess.CompletedProcess(cmd, 0, out, "")


@pytest.mark.parametrize("read_only", [False, True])
def test_guestfs_gets_the_format_and_read_only(tmp_path, read_only, monkeypatch):
    runner = FakeGuestfish()
    backend = GuestfsBackend(runner=runner)
    monkeypatch.setattr("guestlink.image.backends._mounted", lambda p: "guestlink-image-" in p)
    monkeypatch.setattr(GuestfsBackend, "_stop_server", lambda self: None)
    monkeypatch.setattr(GuestfsBackend, "_umount_local", lambda self, mnt, run: run.kill())
    info = ImageInfo("/images/vm.raw", "raw", 2 * MIB, read_only=read_only)
    with ExitStack() as stack:
        backend.open(info, stack)
    listen = runner.calls[0]
    assert "--format=raw" in listen and listen[-2:] == ["-a", "/images/vm.raw"]
    fish = [c[3:] for c in runner.calls if len(c) > 3 and c[1].startswith("--remote=")]
    local = [c for c in fish if c[0] == "mount-local"][0]
    assert ("--ro" in listen) == read_only
    assert ["mount-ro" if read_only else "mount", "/dev/sda1", "/"] in fish
    assert ("readonly:true" in local) == read_only
    assert "options:nodev,nosuid,noexec" in local


def test_a_real_loop_mount_has_the_safe_options(tmp_path):
    need("losetup", "mount", "mkfs.ext4", root=True)
    img = ext4_disk(tmp_path)
    for read_only in (False, True):
        with ExitStack() as stack:
            info = ImageInfo(str(img), "raw", os.path.getsize(img), read_only=read_only)
            mnt, desc = LoopBackend().open(info, stack)
            opts = mount_options(mnt)
            assert {"nodev", "nosuid", "noexec"} <= set(opts), opts
            assert ("ro" in opts) == read_only, opts


# --- GPT and MBR bounds ---------------------------------------------------------------------

def protective_mbr(size: int) -> bytearray:
    disk = bytearray(size)
    struct.pack_into("<B3sB3sII", disk, 446, 0, b"\0\0\0", 0xEE, b"\0\0\0", 1, size // 512 - 1)
    disk[510:512] = b"\x55\xaa"
    disk[512:520] = b"EFI PART"
    return disk


@pytest.mark.parametrize("lba,count,esize", [
    (2, 2 ** 32 - 1, 2 ** 31),     # minutes of looping / GBs in the old code
    (2, 2 ** 32 - 1, 128),
    (2, 1025, 128),                 # more entries than any real table
    (2, 128, 100),                  # entry size not a multiple of 8 / below 128
    (2, 128, 8192),                 # entry size above 4096
    (2 ** 40, 128, 128),            # table beyond the end of the disk
])
def test_crafted_gpt_header_is_rejected_quickly(lba, count, esize):
    disk = protective_mbr(4 * MIB)
    struct.pack_into("<QII", disk, 512 + 72, lba, count, esize)
    with within(2):
        with pytest.raises(ImageError, match="GPT") as e:
            candidates(io.BytesIO(bytes(disk)), len(disk))
    assert e.value.exit_code == 65


def test_gpt_entries_outside_the_disk_are_ignored():
    disk = protective_mbr(4 * MIB)
    struct.pack_into("<QII", disk, 512 + 72, 2, 128, 128)
    for i, (first, last) in enumerate([(2048, 6143), (6000, 2 ** 63), (100, 50)]):
        e = 1024 + 128 * i
        disk[e:e + 16] = bytes(range(1 + i, 17 + i))
        struct.pack_into("<QQ", disk, e + 32, first, last)
    parts = partitions(io.BytesIO(bytes(disk)), len(disk))
    assert [(p.number, p.start, p.size) for p in parts] == [(1, 2048 * 512, 4096 * 512)]


class CountingFile(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        io.BytesIO.__init__(self, data)
        self.reads = 0

    def read(self, size: Optional[int] = -1) -> bytes:
        self.reads += 1
        return io.BytesIO.read(self, size)


def ebr(disk: bytearray, lba: int, first: Optional[tuple], nxt: Optional[int]) -> None:
    off = lba * 512
    if first:
        struct.pack_into("<B3sB3sII", disk, off + 446, 0, b"\0\0\0", 0x83, b"\0\0\0", *first)
    if nxt is not None:
        struct.pack_into("<B3sB3sII", disk, off + 462, 0, b"\0\0\0", 0x05, b"\0\0\0", nxt, 8)
    disk[off + 510:off + 512] = b"\x55\xaa"


def extended_disk(n_ebrs: int, with_partitions: bool) -> bytearray:
    disk = bytearray(8 * MIB)
    struct.pack_into("<B3sB3sII", disk, 446, 0, b"\0\0\0", 0x05, b"\0\0\0", 2048, 8192)
    disk[510:512] = b"\x55\xaa"
    for i in range(n_ebrs):
        ebr(disk, 2048 + i, (1, 1) if with_partitions else None,
            i + 1 if i + 1 < n_ebrs else None)
    return disk


def test_extended_partition_chain_hops_are_bounded():
    disk = extended_disk(3000, with_partitions=False)  # empty EBRs chained: no partitions
    f = CountingFile(bytes(disk))
    assert partitions(f, len(disk)) == []
    assert f.reads <= 110, "%d sectors read to walk an EBR chain" % f.reads
    disk = extended_disk(300, with_partitions=True)
    parts = partitions(io.BytesIO(bytes(disk)), len(disk))
    assert len(parts) <= 100 and parts[0].number == 5


def test_extended_partition_loop_ends():
    disk = extended_disk(2, with_partitions=True)
    ebr(disk, 2049, (1, 1), 0)  # the second EBR links back to the first
    with within(2):
        parts = partitions(io.BytesIO(bytes(disk)), len(disk))
    assert [p.number for p in parts] == [5, 6]


def test_extended_partition_link_outside_the_disk_ends_the_chain():
    disk = extended_disk(1, with_partitions=True)
    ebr(disk, 2048, (1, 1), 2 ** 31)
    parts = partitions(io.BytesIO(bytes(disk)), len(disk))
    assert [p.number for p in parts] == [5]


# --- issue 10 item 4: status reads without writing ---------------------------------------------

def test_status_on_a_read_only_image_file(tmp_path):
    need("losetup", "mount", root=True)
    img = ext4_disk(tmp_path)
    os.chmod(img, 0o444)
    before = sha(img)
    r = cli("status", img, "--backend", "loop", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["installed"] is False
    assert sha(img) == before
    r = cli("install", img, "--backend", "loop")
    assert r.returncode == 73 and "read-only" in r.stderr


def test_status_reads_an_image_a_running_qemu_holds_and_changes_nothing(tmp_path):
    """qemu-storage-daemon stands in for a running VM: it holds the image's write lock."""
    need("qemu-img", "qemu-storage-daemon", "losetup", root=True)
    raw = ext4_disk(tmp_path, size="16M")
    img = tmp_path / "busy.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(img)], check=True)
    holder = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", json.dumps({"driver": "file", "filename": str(img), "node-name": "f"}),
         "--blockdev", json.dumps({"driver": "qcow2", "file": "f", "node-name": "d"}),
         "--nbd-server", json.dumps({"addr": {"type": "unix",
                                              "path": str(tmp_path / "nbd.sock")}}),
         "--export", json.dumps({"type": "nbd", "id": "e", "node-name": "d", "writable": True})],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "nbd.sock").exists():
            assert holder.poll() is None, holder.stdout.read()
            assert time.monotonic() < deadline, "qemu-storage-daemon did not start"
            time.sleep(0.05)
        before = sha(img)
        r = cli("install", img, "--backend", "loop")
        assert r.returncode == 75 and "in use" in r.stderr, r.stderr
        r = cli("status", img, "--backend", "loop", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["installed"] is False
        assert sha(img) == before
        assert holder.poll() is None
    finally:
        holder.terminate()
        holder.wait(10)


def test_a_tools_message_quoting_the_image_is_escaped():
    err = CommandFailed(["qemu-img", "info"], 1, "qemu-img: Could not open '\x1b]0;owned\x07'\n")
    assert "\x1b" not in str(err) and "\x07" not in str(err)
    assert str(err) == "qemu-img info failed (exit 1): qemu-img: Could not open '\\x1b]0;owned\\x07'"
