"""Ways to get at a disk image's root filesystem as a host directory.

Every backend's ``open(info, stack, partition, log)`` returns the mounted root directory and puts
each undo step (unmount, detach a loop device, disconnect nbd, stop the FUSE export, stop the
libguestfs appliance, remove temp dirs) on the caller's ``contextlib.ExitStack`` *as soon as*
the step it undoes has happened, so any exit path (success, error, Ctrl-C) unwinds exactly what
was set up.

* ``nbd``: ``modprobe nbd``; ``qemu-nbd --connect``; mount the partition; needs root + nbd module.
* ``loop``: raw images directly; other formats exposed as a raw file by
  ``qemu-storage-daemon --export type=fuse`` (or, without it, a ``qemu-img convert`` round trip);
  ``losetup --offset --sizelimit`` on the root partition; mount. Needs root.
* ``guestfs``: one ``guestfish --listen`` appliance; probe the filesystems, mount the root in the
  appliance and expose it locally with ``mount-local``. Needs no root, needs /dev/fuse.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import ExitStack
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

from .disk import (CommandFailed, ImageInfo, Partition, Runner, SAFE_MOUNT, blockdev_options,
                   candidates, check_image, choose_partitions, describe_partition, image_info,
                   image_opts, looks_like_qcow2, mount_options)
from .errors import BackendUnavailable, ImageError, ImageInUse, NoRootFilesystem

AUTO_ORDER = ("nbd", "loop", "guestfs")

Log = Callable[[str], None]
#: The block device for a partition; registers its own cleanup on the ExitStack it is given.
DeviceFor = Callable[[Partition, ExitStack], str]


def _mounted(path: str) -> bool:
    """Is ``path`` a mount point (per /proc/self/mountinfo, which also sees file mounts)?"""
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == path:
                    return True
    except OSError:
        pass
    return False


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _wait(cond: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def _is_root(mnt: str) -> bool:
    return os.path.lexists(os.path.join(mnt, "etc/os-release"))


def _pid_alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Backend:
    name = "?"

    def __init__(self, runner: Optional[Runner] = None, log: Optional[Log] = None) -> None:
        self.runner = runner or Runner()
        self.log = log or (lambda line: None)
        self.succeeded = False  # set by the caller before closing the stack

    def probe(self, info: ImageInfo) -> List[str]:
        """What is missing for this backend on this machine ([] = looks usable)."""
        raise NotImplementedError

    def open(self, info: ImageInfo, stack: ExitStack, partition: Optional[int] = None,
             force: bool = False) -> Tuple[str, str]:
        """Mount the image's root filesystem; returns (mount point, description)."""
        raise NotImplementedError

    # helpers shared by the kernel-mount backends
    def _tempdir(self, stack: ExitStack) -> str:
        tmp = tempfile.mkdtemp(prefix="guestlink-image-")
        stack.callback(self._rmdir, tmp)
        return tmp

    @staticmethod
    def _rmdir(path: str) -> None:
        try:
            os.rmdir(path)  # never rmtree: a still-mounted guest must not be deleted
        except FileNotFoundError:
            pass

    def _mkdir(self, stack: ExitStack, path: str) -> str:
        os.mkdir(path, 0o700)
        stack.callback(self._rmdir, path)
        return path

    def _mount(self, stack: ExitStack, device: str, fstype: str, mnt: str,
               read_only: bool = False) -> None:
        self.runner.run(["mount", "-t", fstype, "-o", mount_options(fstype, read_only), device,
                         mnt])
        stack.callback(self._umount, mnt)

    def _umount(self, mnt: str) -> None:
        for _ in range(20):
            try:
                self.runner.run(["umount", mnt])
                return
            except CommandFailed as exc:
                if "not mounted" in exc.stderr:
                    return
                time.sleep(0.25)  # busy for a moment (e.g. a just-closed file)
        self.runner.run(["umount", "-l", mnt], check=False)

    def _root_helper(self, device_for: DeviceFor, data: str, size: Optional[int],
                     partition: Optional[int], stack: ExitStack, tmp: str,
                     read_only: bool = False) -> Tuple[str, str]:
        """Mount the candidate partitions of raw disk ``data`` one by one until one holds
        /etc/os-release; returns (mnt, description). ``device_for(partition)`` returns the block
        device for a partition (registering its own cleanup on the stack it is given)."""
        cands = candidates(data, size)
        usable = choose_partitions(cands, partition)
        mnt = self._mkdir(stack, os.path.join(tmp, "root"))
        tried: List[str] = []
        for part, fstype in usable:
            assert fstype is not None  # choose_partitions keeps Linux filesystems only
            sub = ExitStack()
            with sub:
                dev = device_for(part, sub)
                self._mount(sub, dev, fstype, mnt, read_only)
                if partition is not None or _is_root(mnt):
                    stack.enter_context(sub.pop_all())
                    return mnt, describe_partition(part, fstype)
                tried.append(describe_partition(part, fstype))
        raise NoRootFilesystem("no root filesystem (one holding /etc/os-release) in the image; "
                               "looked at %s; give --partition N" % ", ".join(tried))


# --- loop ----------------------------------------------------------------------------------

class LoopBackend(Backend):
    name = "loop"

    def probe(self, info: ImageInfo) -> List[str]:
        missing = []
        if os.geteuid() != 0:
            missing.append("root privileges (loop devices and mount)")
        for tool, pkg in (("losetup", "mount"), ("mount", "mount"), ("umount", "mount")):
            if not shutil.which(tool):
                missing.append("%s (Debian package %s)" % (tool, pkg))
        if not os.path.exists("/dev/loop-control"):
            missing.append("loop devices (/dev/loop-control; modprobe loop)")
        if info.format != "raw" and not self._qsd_ok() and not shutil.which("qemu-img"):
            missing.append("qemu-storage-daemon with /dev/fuse, or qemu-img, for %s images"
                           % info.format)
        return missing

    @staticmethod
    def _qsd_ok() -> bool:
        return bool(shutil.which("qemu-storage-daemon")) and os.path.exists("/dev/fuse")

    def open(self, info: ImageInfo, stack: ExitStack, partition: Optional[int] = None,
             force: bool = False) -> Tuple[str, str]:
        tmp = self._tempdir(stack)
        if info.format == "raw":
            data = info.path
        elif self._qsd_ok():
            data = self._fuse_export(info, stack, tmp, force)
        else:
            data = self._convert(info, stack, tmp)

        def device_for(part: Partition, sub: ExitStack) -> str:
            dev = self.runner.run(["losetup", "--find", "--show"]
                                  + (["--read-only"] if info.read_only else [])
                                  + ["--offset", str(part.start), "--sizelimit", str(part.size),
                                     data]).stdout.strip()
            sub.callback(self._detach, dev)
            return dev

        size = info.virtual_size
        mnt, desc = self._root_helper(device_for, data, size, partition, stack, tmp,
                                      info.read_only)
        how = "raw file" if info.format == "raw" else (
            "qemu-storage-daemon FUSE export" if data.endswith("export.raw") else "converted copy")
        return mnt, "%s via loop device (%s)" % (desc, how)

    def _detach(self, dev: str) -> None:
        for _ in range(20):
            proc = self.runner.run(["losetup", "--detach", dev], check=False)
            if proc.returncode == 0 or "No such device" in (proc.stderr or ""):
                return
            time.sleep(0.25)
        raise ImageError("cannot detach %s" % dev)

    def _fuse_export(self, info: ImageInfo, stack: ExitStack, tmp: str, force: bool) -> str:
        exp = os.path.join(tmp, "export.raw")
        open(exp, "w").close()
        def remove_export_file() -> None:
            if os.path.exists(exp) and not _mounted(exp):
                os.unlink(exp)

        stack.callback(remove_export_file)
        disk_node = blockdev_options(info, force)
        file_node = dict(disk_node.pop("file"), **{"node-name": "file0"})
        disk_node.update({"file": "file0", "node-name": "disk0"})
        cmd = ["qemu-storage-daemon",
               "--blockdev", json.dumps(file_node),
               "--blockdev", json.dumps(disk_node),
               "--export", json.dumps({"type": "fuse", "id": "exp0", "node-name": "disk0",
                                       "mountpoint": exp, "writable": not info.read_only})]
        errlog = open(os.path.join(tmp, "qsd.log"), "w+")
        def remove_errlog() -> None:
            errlog.close()
            os.unlink(errlog.name)

        stack.callback(remove_errlog)
        proc = self.runner.popen(cmd, stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog,
                                 start_new_session=True)
        stack.callback(self._stop_qsd, proc, exp)
        if not _wait(lambda: _mounted(exp) or proc.poll() is not None, 20):
            raise BackendUnavailable("qemu-storage-daemon did not export %s within 20 s" % info.path)
        if proc.poll() is not None:
            errlog.seek(0)
            err = errlog.read().strip()
            if "lock" in err:
                raise ImageInUse("%s is in use (a running VM holds its lock)" % info.path)
            raise BackendUnavailable("qemu-storage-daemon failed: %s" % (err.splitlines() or ["?"])[-1])
        self.log("exported %s (%s) as a raw file with qemu-storage-daemon (FUSE)"
                 % (info.path, info.format))
        return exp

    def _stop_qsd(self, proc: "subprocess.Popen[Any]", exp: str) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if _mounted(exp):
            for tool in ("fusermount3", "fusermount"):
                if shutil.which(tool):
                    self.runner.run([tool, "-u", exp], check=False)
                    break
            if _mounted(exp):
                self.runner.run(["umount", "-l", exp], check=False)

    def _convert(self, info: ImageInfo, stack: ExitStack, tmp: str) -> str:
        """Last resort without qemu-storage-daemon: convert to raw, convert back on success."""
        raw = os.path.join(tmp, "converted.raw")
        def remove_raw() -> None:
            if os.path.exists(raw):
                os.unlink(raw)

        stack.callback(remove_raw)
        if not info.read_only:
            # registered before the mount steps, so it runs after they are undone
            stack.callback(self._convert_back, info, raw, tmp)
        self.log("converting %s (%s) to a temporary raw copy (no qemu-storage-daemon)"
                 % (info.path, info.format))
        self.runner.run(["qemu-img", "convert", "--image-opts", image_opts(info), "-O", "raw",
                         raw])
        return raw

    def _convert_back(self, info: ImageInfo, raw: str, tmp: str) -> None:
        if not self.succeeded:
            return
        out = os.path.join(os.path.dirname(os.path.abspath(info.path)),
                           ".%s.guestlink-new" % os.path.basename(info.path))
        try:
            self.runner.run(["qemu-img", "convert", "-f", "raw", "-O", info.format, raw, out])
            os.replace(out, info.path)
        finally:
            if os.path.exists(out):
                os.unlink(out)


# --- nbd -----------------------------------------------------------------------------------

class NbdBackend(Backend):
    name = "nbd"

    def __init__(self, runner: Optional[Runner] = None, log: Optional[Log] = None,
                 dev_dir: str = "/dev", sys_dir: str = "/sys", wait_timeout: float = 10) -> None:
        Backend.__init__(self, runner, log)
        self.dev_dir = dev_dir
        self.sys_dir = sys_dir
        self.wait_timeout = wait_timeout

    def _module_present(self) -> bool:
        return (os.path.exists(os.path.join(self.dev_dir, "nbd0"))
                or os.path.isdir(os.path.join(self.sys_dir, "module/nbd")))

    def probe(self, info: ImageInfo) -> List[str]:
        missing = []
        if os.geteuid() != 0:
            missing.append("root privileges (qemu-nbd --connect and mount)")
        if not shutil.which("qemu-nbd"):
            missing.append("qemu-nbd (Debian package qemu-utils)")
        if not self._module_present():
            kver = os.uname().release
            have = any(os.path.exists(os.path.join("/lib/modules", kver, d, "nbd.ko" + s))
                       for d in ("kernel/drivers/block",) for s in ("", ".xz", ".zst", ".gz"))
            if not have:
                missing.append("the nbd kernel module (no /dev/nbd0, no nbd.ko for kernel %s)"
                               % kver)
        return missing

    def _size(self, name: str) -> int:
        try:
            with open(os.path.join(self.sys_dir, "block", name, "size")) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _free_device(self) -> str:
        for i in range(64):
            name = "nbd%d" % i
            if not os.path.exists(os.path.join(self.dev_dir, name)):
                break
            if os.path.exists(os.path.join(self.sys_dir, "block", name, "pid")):
                continue
            if self._size(name) == 0:
                return name
        raise BackendUnavailable("no free /dev/nbdN device")

    def open(self, info: ImageInfo, stack: ExitStack, partition: Optional[int] = None,
             force: bool = False) -> Tuple[str, str]:
        if not self._module_present():
            try:
                self.runner.run(["modprobe", "nbd", "max_part=16"])
            except (CommandFailed, BackendUnavailable) as exc:
                raise BackendUnavailable("modprobe nbd failed: %s" % exc)
            if not _wait(self._module_present, self.wait_timeout):
                raise BackendUnavailable("no /dev/nbd0 after modprobe nbd")
        tmp = self._tempdir(stack)
        name = self._free_device()
        dev = os.path.join(self.dev_dir, name)
        # --image-opts names the driver (the format) and turns the backing file off
        cmd = ["qemu-nbd", "--connect=" + dev] + (["--read-only"] if info.read_only else []) + [
            "--image-opts", image_opts(info, force)]
        try:
            self.runner.run(cmd)
        except CommandFailed as exc:
            if "lock" in exc.stderr.lower():
                raise ImageInUse("%s is in use (a running VM holds its lock)" % info.path)
            raise
        stack.callback(self._disconnect, dev)
        if not _wait(lambda: self._size(name) > 0, self.wait_timeout):
            raise ImageError("%s did not come up after qemu-nbd --connect" % dev)
        self.log("connected %s to %s" % (info.path, dev))

        def device_for(part: Partition, sub: ExitStack) -> str:
            if part.number == 0:
                return dev
            pdev = "%sp%d" % (dev, part.number)
            if not _wait(lambda: os.path.exists(pdev), self.wait_timeout):
                raise ImageError("%s did not appear (is the nbd module loaded with max_part?)"
                                 % pdev)
            return pdev

        mnt, desc = self._root_helper(device_for, dev, None, partition, stack, tmp,
                                      info.read_only)
        return mnt, "%s via %s" % (desc, dev)

    def _disconnect(self, dev: str) -> None:
        self.runner.run(["qemu-nbd", "--disconnect", dev], check=False)


# --- guestfs -------------------------------------------------------------------------------

def _kvm_usable() -> bool:
    if os.environ.get("LIBGUESTFS_BACKEND_SETTINGS"):
        return True  # the user decided
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
    except OSError:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return bool(re.search(r"\b(vmx|svm)\b", flags))
    except OSError:
        return True


class GuestfsBackend(Backend):
    name = "guestfs"

    def __init__(self, runner: Optional[Runner] = None, log: Optional[Log] = None) -> None:
        Backend.__init__(self, runner, log)
        self.pid: Optional[int] = None
        self._last_error: Optional[CommandFailed] = None
        self.env = dict(os.environ)

    def probe(self, info: ImageInfo) -> List[str]:
        missing = []
        if not shutil.which("guestfish"):
            missing.append("guestfish (Debian package libguestfs-tools)")
        if not os.path.exists("/dev/fuse"):
            missing.append("/dev/fuse (for mount-local)")
        if not (shutil.which("fusermount3") or shutil.which("fusermount")):
            missing.append("fusermount (Debian package fuse3)")
        return missing

    def _fish(self, *args: str, check: bool = True,
              timeout: float = 600) -> "subprocess.CompletedProcess[str]":
        assert self.pid is not None  # _start() came first
        return self.runner.run(["guestfish", "--remote=%d" % self.pid, "--"] + list(args),
                               check=check, env=self.env, timeout=timeout)

    def _start(self, info: ImageInfo, stack: ExitStack, tmp: str) -> bool:
        out_path = os.path.join(tmp, "listen.out")
        with open(out_path, "w+") as out:
            proc = self.runner.popen(
                ["guestfish", "--listen"] + (["--ro"] if info.read_only else [])
                + ["--format=" + info.format, "-a", info.path],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env,
                start_new_session=True)
            proc.wait(60)  # the parent prints GUESTFISH_PID=N and exits; the server stays
            out.seek(0)
            text = out.read()
        os.unlink(out_path)
        m = re.search(r"GUESTFISH_PID=(\d+)", text)
        if not m:
            raise BackendUnavailable("guestfish --listen failed: %s" % text.strip()[-300:])
        self.pid = int(m.group(1))
        stack.callback(self._stop_server)
        try:
            self._fish("run")
            return True
        except CommandFailed as exc:
            if "lock" in exc.stderr.lower():
                raise ImageInUse("%s is in use (a running VM holds its lock)" % info.path)
            self._last_error = exc
            return False

    def _appliance_failed(self) -> BackendUnavailable:
        """Why the appliance did not start, in one line. `guestfish --remote` reports only its
        exit status; the usual cause, supermin finding no kernel, is checked by doctor's rules."""
        from ..doctor import check_supermin_kernel

        kernel = check_supermin_kernel(env=self.env)
        if not kernel.ok:
            why = "%s; fix: %s" % (kernel.detail, kernel.fix)
        else:
            errors = [ln.strip() for ln in getattr(self._last_error, "stderr", "").splitlines()
                      if "error:" in ln]
            why = errors[-1] if errors else str(self._last_error)
        return BackendUnavailable("the libguestfs appliance did not start: %s (run `guestlink "
                                  "doctor` for what this host lacks, libguestfs-test-tool for "
                                  "the appliance's own log)" % why)

    def _stop_server(self) -> None:
        pid = self.pid
        if pid is None:
            return
        self._fish("exit", check=False, timeout=60)
        if not _wait(lambda: not _pid_alive(pid), 60, 0.1):
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        self.pid = None

    def open(self, info: ImageInfo, stack: ExitStack, partition: Optional[int] = None,
             force: bool = False) -> Tuple[str, str]:
        tmp = self._tempdir(stack)
        if not _kvm_usable():
            self.env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
            self.log("guestfs: KVM is not usable here; using TCG (LIBGUESTFS_BACKEND_SETTINGS="
                     "force_tcg)")
        t0 = time.monotonic()
        sub = ExitStack()
        with sub:
            ok = self._start(info, sub, tmp)
            if ok:
                stack.enter_context(sub.pop_all())
        if not ok:
            if self.env.get("LIBGUESTFS_BACKEND_SETTINGS"):
                raise self._appliance_failed()
            self.log("guestfs: appliance failed to start; retrying with TCG (force_tcg)")
            self.env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
            if not self._start(info, stack, tmp):
                raise self._appliance_failed()
        self.log("guestfs: appliance up in %.1f s" % (time.monotonic() - t0))
        fslist = self._fish("list-filesystems").stdout
        devices = []
        for line in fslist.splitlines():
            dev, _, fstype = line.partition(":")
            devices.append((dev.strip(), fstype.strip()))
        root_dev = self._find_root(devices, partition)
        self._fish("mount-ro" if info.read_only else "mount", root_dev, "/")
        stack.callback(self._fish, "umount-all", check=False)
        mnt = self._mkdir(stack, os.path.join(tmp, "root"))
        self._fish("mount-local", mnt, *(["readonly:true"] if info.read_only else []),
                   "options:" + ",".join(SAFE_MOUNT))
        assert self.pid is not None  # _start() set it
        run = self.runner.popen(["guestfish", "--remote=%d" % self.pid, "--", "mount-local-run"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=self.env, start_new_session=True)
        stack.callback(self._umount_local, mnt, run)
        if not _wait(lambda: _mounted(mnt) or run.poll() is not None, 30):
            raise ImageError("guestfs mount-local did not appear at %s" % mnt)
        if run.poll() is not None:
            raise ImageError("guestfs mount-local-run exited (status %s)" % run.returncode)
        fstype = dict(devices).get(root_dev, "?")
        return mnt, "%s, %s via libguestfs mount-local" % (root_dev, fstype)

    def _umount_local(self, mnt: str, run: "subprocess.Popen[Any]") -> None:
        if _mounted(mnt):
            tool = shutil.which("fusermount3") or shutil.which("fusermount") or "umount"
            cmd = [tool, "-u", mnt] if "fusermount" in tool else [tool, mnt]
            for _ in range(40):
                if self.runner.run(cmd, check=False).returncode == 0 or not _mounted(mnt):
                    break
                time.sleep(0.25)
        try:
            run.wait(60)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
            if _mounted(mnt):
                self.runner.run(["umount", "-l", mnt], check=False)

    def _find_root(self, devices: Sequence[Tuple[str, str]], partition: Optional[int]) -> str:
        def pnum(dev: str) -> int:
            m = re.search(r"(\d+)$", dev)
            return int(m.group(1)) if m and re.match(r"/dev/[sv]d[a-z]+\d+$", dev) else 0

        if partition is not None:
            for dev, _fstype in devices:
                if pnum(dev) == partition or (partition == 1 and pnum(dev) == 0
                                              and re.match(r"/dev/[sv]da$", dev)):
                    return dev
            raise ImageError("no partition %d in the image (found: %s)" % (
                partition, ", ".join("%s (%s)" % d for d in devices) or "nothing"), 65)
        tried = []
        for dev, fstype in devices:
            if fstype in ("swap", "unknown", ""):
                continue
            tried.append("%s (%s)" % (dev, fstype))
            if self._fish("mount-ro", dev, "/", check=False).returncode != 0:
                continue
            try:
                found = self._fish("exists", "/etc/os-release").stdout.strip() == "true" or \
                    self._fish("is-symlink", "/etc/os-release").stdout.strip() == "true"
            finally:
                self._fish("umount-all", check=False)
            if found:
                return dev
        raise NoRootFilesystem("no root filesystem (one holding /etc/os-release) in the image; "
                               "filesystems: %s; give --partition N" % (
                                   ", ".join("%s (%s)" % d for d in devices) or "none"))


BACKENDS: Dict[str, Type[Backend]] = {"nbd": NbdBackend, "loop": LoopBackend,
                                      "guestfs": GuestfsBackend}


def open_root(image: str, stack: ExitStack, backend: str = "auto", partition: Optional[int] = None,
              force: bool = False, log: Optional[Log] = None, runner: Optional[Runner] = None,
              factories: Optional[Mapping[str, Callable[..., Backend]]] = None,
              fmt: Optional[str] = None, read_only: bool = False,
              allow_backing: bool = False) -> Tuple[str, Backend, str]:
    """Open IMAGE's root filesystem as a directory; returns (root, backend object, description).

    The format is ``fmt`` or follows from the name (never probed). ``read_only`` opens it
    without writing and shares QEMU's lock (a running VM's disk can be read).

    ``auto`` tries nbd, loop, guestfs in that order: the first whose requirements are met and
    that opens the image wins; when none does, one error lists what each one lacks."""
    log = log or (lambda line: None)
    runner = runner or Runner()
    factories = factories or BACKENDS
    check_image(image, writable=not read_only)
    info = image_info(image, runner, force, fmt=fmt, read_only=read_only,
                      allow_backing=allow_backing)
    if fmt is None and info.format == "raw" and looks_like_qcow2(info.path):
        # a qcow2 named .img (cloud images are) would otherwise fail with no clue why
        log("note: %s starts with a qcow2 header but is read as raw (from its name); if it is a "
            "qcow2 image, give --format qcow2" % image)
    names = list(AUTO_ORDER) if backend == "auto" else [backend]
    problems = []
    for name in names:
        b = factories[name](runner=runner, log=log)
        missing = b.probe(info)
        if missing:
            problems.append("%s: needs %s" % (name, ", ".join(missing)))
            continue
        with ExitStack() as sub:
            try:
                root, desc = b.open(info, sub, partition, force)
            except BackendUnavailable as exc:
                if backend != "auto":
                    raise
                problems.append("%s: %s" % (name, exc))
                continue
            stack.enter_context(sub.pop_all())
        if backend == "auto":
            log("backend: %s (auto)" % name)
        return root, b, "%s: %s" % (info.format, desc)
    raise BackendUnavailable("no backend can open %s here: %s" % (image, "; ".join(problems)))
