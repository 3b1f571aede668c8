"""The control port behind one small interface, so the loop does not care what it is.

* ``VirtioPort``: a virtio-serial character device found by its port name (the real thing). The
  file stays open while no host is connected; the device then reports POLLHUP and read() returns 0.
* ``UnixPort``: for development and unit tests, ``unix:/path`` — a unix stream socket the agent
  connects to, playing the host side of the channel. EOF or ECONNREFUSED means "no host".
"""
import errno
import glob
import logging
import os
import select
import shutil
import socket
import subprocess
from typing import Optional, Sequence, Union

from .config import Config

log = logging.getLogger("guestlink.agent")

Buffer = Union[bytes, bytearray, memoryview]
WritableBuffer = Union[bytearray, memoryview]


class PortAbsent(Exception):
    """The port does not exist (yet) or nobody listens on it; try again later."""


class PortBusy(Exception):
    """Another process holds the port open."""


class Port:
    """Interface. ``open()`` sets ``fd``; the rest works on it."""

    #: True when "no host" is detected by polling an open fd for POLLHUP (virtio);
    #: False when it shows as EOF and the port must be reopened (unix socket).
    polls_for_host = False
    #: Seconds between attempts to open an absent port.
    retry_interval = 1.0
    fd: Optional[int] = None

    def open(self) -> int:
        raise NotImplementedError

    def read_into(self, buf: WritableBuffer) -> int:
        """Read into ``buf``; returns the byte count, 0 when no host is connected / EOF.

        Raises BlockingIOError when nothing is readable.
        """
        raise NotImplementedError

    def writev(self, buffers: Sequence[Buffer]) -> int:
        raise NotImplementedError

    def host_present(self) -> bool:
        """A zero-timeout check whether a host is connected (no POLLHUP)."""
        return True

    def replaced(self) -> bool:
        """True when the open device no longer is the port (unplugged); the agent reopens it."""
        return False

    def close(self) -> None:
        raise NotImplementedError


class VirtioPort(Port):
    polls_for_host = True
    retry_interval = 3.0

    def __init__(self, name: str, device: Optional[str] = None,
                 sys_root: str = "/sys/class/virtio-ports", dev_root: str = "/dev",
                 modprobe: bool = True) -> None:
        self.name = name
        self.device = device  # explicit path: skip the lookup by name
        self.sys_root = sys_root
        self.dev_root = dev_root
        self._modprobe = modprobe
        self._missing_logged = False
        self.path: Optional[str] = None

    def __str__(self) -> str:
        return "control port %s%s" % (self.name, " (%s)" % self.path if self.path else "")

    def find(self) -> Optional[str]:
        """The device path of the port named ``self.name``, or None."""
        if self.device:
            return self.device if os.path.exists(self.device) else None
        link = os.path.join(self.dev_root, "virtio-ports", self.name)
        if os.path.exists(link) and self._sysfs_name(os.path.realpath(link)) in (None, self.name):
            return link  # (a link left over from a port that was unplugged names another port)
        for name_file in sorted(glob.glob(os.path.join(self.sys_root, "*", "name"))):
            try:
                with open(name_file, encoding="utf-8", errors="replace") as f:
                    if f.read().strip() != self.name:
                        continue
            except OSError:
                continue
            path = os.path.join(self.dev_root, os.path.basename(os.path.dirname(name_file)))
            if os.path.exists(path):
                return path
        return None

    def _sysfs_name(self, device_path: str) -> Optional[str]:
        """The port name sysfs gives for a device node, or None when sysfs does not say."""
        try:
            with open(os.path.join(self.sys_root, os.path.basename(device_path), "name"),
                      encoding="utf-8", errors="replace") as f:
                return f.read().strip()
        except OSError:
            return None

    def replaced(self) -> bool:
        """True when the open device is no longer the port of this name (unplugged, or unplugged
        and plugged again as a new device node): the agent must reopen it by name."""
        if self.fd is None:
            return False
        path = self.find()
        if path is None:
            return True
        try:
            now, held = os.stat(path), os.fstat(self.fd)
        except OSError:
            return True
        return (now.st_dev, now.st_ino, now.st_rdev) != (held.st_dev, held.st_ino, held.st_rdev)

    def _load_modules(self) -> None:
        modprobe = shutil.which("modprobe") or next(
            (p for p in ("/sbin/modprobe", "/usr/sbin/modprobe") if os.path.exists(p)), None)
        if not modprobe:
            return
        for module in ("virtio_pci", "virtio_console"):
            try:
                proc = subprocess.run([modprobe, module], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=10)
                if proc.returncode:
                    log.debug("modprobe %s failed: %s", module, proc.stderr.decode(errors="replace").strip())
            except (OSError, subprocess.SubprocessError) as exc:
                log.debug("modprobe %s failed: %s", module, exc)

    def open(self) -> int:
        path = self.find()
        if path is None and self._modprobe and not self.device:
            self._modprobe = False  # only once per agent lifetime
            self._load_modules()
            path = self.find()
        if path is None:
            if self.device:
                msg = "control port device %s does not exist" % self.device
            else:
                msg = ("control port %s not found: no %s/*/name says so; is the virtio-serial "
                       "channel configured?" % (self.name, self.sys_root))
            if not self._missing_logged:
                log.error("%s (retrying every %g s)", msg, self.retry_interval)
                self._missing_logged = True
            else:
                log.debug("%s", msg)
            raise PortAbsent(msg)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise PortBusy("%s (%s) is busy: another process has it open (a second "
                               "guestlink-agent, or qemu-guest-agent on the wrong port?)" % (self.name, path))
            if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
                raise PortAbsent("%s: %s" % (path, exc.strerror))
            raise
        self._missing_logged = False
        self.path = path
        self.fd = fd
        return fd

    def read_into(self, buf: WritableBuffer) -> int:
        assert self.fd is not None  # open() came first
        return os.readv(self.fd, [buf])

    def writev(self, buffers: Sequence[Buffer]) -> int:
        assert self.fd is not None
        return os.writev(self.fd, buffers)

    def host_present(self) -> bool:
        assert self.fd is not None
        p = select.poll()
        p.register(self.fd, select.POLLIN | select.POLLOUT)
        for _, revents in p.poll(0):
            if revents & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                return False
        return True

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            finally:
                self.fd = None


class UnixPort(Port):
    polls_for_host = False
    retry_interval = 1.0

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: Optional[socket.socket] = None

    def __str__(self) -> str:
        return "control port unix:%s" % self.path

    def open(self) -> int:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(2.0)
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise PortAbsent("unix:%s: %s" % (self.path, exc.strerror or exc))
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        return self.fd

    def read_into(self, buf: WritableBuffer) -> int:
        assert self.sock is not None  # open() came first
        try:
            return self.sock.recv_into(buf)
        except ConnectionResetError:
            return 0

    def writev(self, buffers: Sequence[Buffer]) -> int:
        assert self.sock is not None
        return self.sock.sendmsg(buffers)

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None
                self.fd = None


def make_port(config: Config) -> Port:
    device = config.ctl_device
    if device.startswith("unix:"):
        return UnixPort(device[len("unix:"):])
    return VirtioPort(config.ctl_name, device=device or None)
