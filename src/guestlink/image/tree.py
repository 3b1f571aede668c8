"""Install, upgrade, inspect and remove the agent in a guest root tree (a mounted directory).

Everything here works on a plain directory, so every backend (nbd, loop, guestfs through
mount-local) and ``--root DIR`` share one code path.

The tree is untrusted: the image may plant symlinks, device nodes or FIFOs anywhere, including at
the names this installer uses. So no guest path is ever handed to the host kernel whole. Every path
is resolved inside the root one component at a time on directory fds opened ``O_NOFOLLOW``; a
symlink is read and interpreted by :class:`Tree` itself (an absolute target means the guest's
``/``), so ``/etc/rc.local -> /etc/rc.d/rc.local`` stays in the guest and a link to ``/etc/shadow``
names the guest's file. Files are created ``O_EXCL|O_NOFOLLOW`` relative to their directory fd,
and renamed, linked, unlinked and removed relative to directory fds (none of which follow a final
symlink). Reads accept regular files only, checked with ``lstat`` before opening (a device or FIFO
is never opened) and again with ``fstat``, and are capped in size.

What install created or changed is recorded in :data:`MANIFEST` so that remove undoes exactly
that: files it created are deleted, files it replaced are restored from hard-link backups, its
block is cut out of ``/etc/rc.local``, directories it created are removed when empty, and a
config file the user has edited since is kept. The manifest comes from the image too: every field
is validated before use.
"""

import contextlib
import errno
import hashlib
import io
import json
import os
import posixpath
import re
import signal
import stat
import struct
import time
import types
import zipfile
import zlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from ..protocol.safetext import printable
from .errors import EXIT_DATAERR, BadGuestFile, ImageError, NoRootFilesystem, NoSpace, ReadOnly

MANIFEST = "/var/lib/guestlink/install.json"
BACKUP_DIR = "/var/lib/guestlink/backup"
AGENT_PYZ = "/usr/local/lib/guestlink/guestlink-agent.pyz"
WRAPPER = "/usr/local/sbin/guestlink-agent"
CONFIG = "/etc/guestlink/agent.conf"
MODULES_CONF = "/etc/modules-load.d/guestlink.conf"
SYSTEMD_UNIT = "/etc/systemd/system/guestlink-agent.service"
SYSTEMD_WANTS = "/etc/systemd/system/multi-user.target.wants/guestlink-agent.service"
SYSV_SCRIPT = "/etc/init.d/guestlink-agent"
RCLOCAL_SCRIPT = "/usr/local/lib/guestlink/guestlink-agent.init"
RC_LOCAL = "/etc/rc.local"
INIT_KINDS = ("systemd", "sysv", "rc.local")
ENTRY_KINDS = ("file", "config", "symlink", "block")
DEFAULT_CTL = "org.guestlink.ctl"
DEFAULT_DATA = "org.guestlink.data"
BLOCK_BEGIN = "# >>> guestlink agent (managed by guestlink image install; remove with guestlink image remove)"
BLOCK_END = "# <<< guestlink agent"
RC_LOCAL_SKELETON = "#!/bin/sh\n\nexit 0\n"
_TMP_SUFFIX = ".guestlink-tmp"
SPACE_MARGIN = 256 * 1024

# Size caps for what is read from the image (the real files are a few KiB; the agent ~100 KiB).
MAX_TEXT = 256 * 1024             # the manifest, rc.local
MAX_BUILTIN = 8 * 1024 * 1024     # a kernel's modules.builtin (~100 KiB for distribution kernels)
MAX_FILE = 8 * 1024 * 1024        # the installed agent and any installed file that is hashed
MAX_VERSION_FILE = 64 * 1024      # guestlink/_version.py inside an agent zipapp
MAX_LINK_HOPS = 40                # as the kernel's own limit
MAX_ENTRIES = 1000                # manifest entries / created_dirs (install writes about a dozen)
_CHUNK = 64 * 1024

# O_PATH: walking needs search permission only (guestfs runs unprivileged), as a path lookup
_WALK_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# errnos meaning "nothing usable there" for a query (exists, lstat, hash)
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pyz_version(data: bytes) -> Optional[str]:
    """The agent version inside a zipapp (``guestlink/_version.py``), or None.

    ``data`` may come from the image (``image status``): the version file is inflated only when
    its declared size is small (zipfile never returns more than the declared size)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            info = zf.getinfo("guestlink/_version.py")
            if info.file_size > MAX_VERSION_FILE:
                return None
            text = zf.read(info).decode("utf-8", "replace")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, KeyError, OSError, EOFError, ValueError,
            RuntimeError, NotImplementedError, zlib.error, struct.error):
        # any flavour of "this is not a readable guestlink zipapp"
        return None
    m = re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", text)
    return m.group(1) if m else None


def _os_error(exc: OSError, what: str) -> ImageError:
    """Map an OSError while working on the guest tree to a clear ImageError."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace("the guest filesystem is full (%s): nothing was changed" % what)
    if exc.errno == errno.EROFS:
        return ReadOnly("the guest filesystem is read-only (%s): nothing was changed" % what)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ImageError("permission denied (%s): %s" % (what, exc.strerror), 77)
    where = " at %s" % printable(exc.filename) if isinstance(exc.filename, str) else ""
    return ImageError("%s: %s%s" % (what, exc.strerror or exc, where))


# --- generated files -----------------------------------------------------------------------

def wrapper_text() -> str:
    return """#!/bin/sh
# guestlink agent launcher; installed by `guestlink image install`, removed by `guestlink image remove`.
for py in /usr/bin/python3 /usr/local/bin/python3 /bin/python3; do
    [ -x "$py" ] && exec "$py" %(pyz)s "$@"
done
exec python3 %(pyz)s "$@"
""" % {"pyz": AGENT_PYZ}


def config_text(ctl_name: str, data_name: str) -> str:
    return """# guestlink agent configuration (keys: see the guestlink-agent README).
# Written by `guestlink image install`. Edit freely: an upgrade keeps a file you have changed.

[agent]
ctl_name = %s
data_name = %s

[policy]
# fnmatch patterns of operations; deny wins. Example: deny = exec, reboot
allow = *
deny =
""" % (ctl_name, data_name)


def modules_text(modules: Iterable[str]) -> str:
    return ("# virtio-serial for the guestlink agent; written by `guestlink image install`.\n"
            + "".join(m + "\n" for m in modules))


def systemd_unit_text() -> str:
    return """[Unit]
Description=guestlink guest agent
Documentation=https://github.com/guestlink/guestlink
After=systemd-modules-load.service local-fs.target
Wants=systemd-modules-load.service

[Service]
Type=simple
ExecStart=%s run
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
""" % WRAPPER


def init_script_text() -> str:
    return """#!/bin/sh
### BEGIN INIT INFO
# Provides:          guestlink-agent
# Required-Start:    $local_fs
# Required-Stop:     $local_fs
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: guestlink guest agent
### END INIT INFO
# Installed by `guestlink image install`; `guestlink image remove` deletes it.
# start: loads the virtio modules, then runs the agent in a respawn loop (2 s pause).
AGENT=%(wrapper)s
PIDFILE=/run/guestlink-agent.pid
LOG=${GUESTLINK_AGENT_LOG:-/var/log/guestlink-agent.log}

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

case "$1" in
start)
    if running; then echo "guestlink-agent: already running"; exit 0; fi
    for m in $(sed 's/#.*//' %(modules)s 2>/dev/null); do modprobe "$m" 2>/dev/null; done
    (
        trap 'kill "$child" 2>/dev/null; exit 0' TERM INT
        while :; do
            "$AGENT" run </dev/null >>"$LOG" 2>&1 &
            child=$!
            wait "$child"
            sleep 2
        done
    ) </dev/null >/dev/null 2>&1 &
    echo $! > "$PIDFILE"
    echo "guestlink-agent: started"
    ;;
stop)
    if running; then kill "$(cat "$PIDFILE")"; fi
    rm -f "$PIDFILE"
    ;;
restart)
    "$0" stop
    "$0" start
    ;;
status)
    if running; then echo "guestlink-agent: running"; else echo "guestlink-agent: stopped"; exit 3; fi
    ;;
*)
    echo "usage: $0 start|stop|restart|status" >&2
    exit 2
    ;;
esac
exit 0
""" % {"wrapper": WRAPPER, "modules": MODULES_CONF}


def service_commands(init: str, action: str) -> List[List[str]]:
    """The commands that start, restart or stop the installed agent in a running guest, per init
    kind (``guestlink-agent install --start`` / ``remove --stop`` run them, e.g. for ``guestlink
    enroll``). systemd re-reads its units first: install or remove has just changed them."""
    if action not in ("start", "restart", "stop"):
        raise ValueError("unknown service action %r" % action)
    if init == "systemd":
        unit = posixpath.basename(SYSTEMD_UNIT)
        return [["systemctl", "daemon-reload"], ["systemctl", action, unit]]
    if init == "sysv":
        return [[SYSV_SCRIPT, action]]
    if init == "rc.local":
        return [[RCLOCAL_SCRIPT, action]]
    raise ValueError("unknown init kind %r" % init)


def rc_local_block() -> str:
    return "%s\n%s start\n%s\n" % (BLOCK_BEGIN, RCLOCAL_SCRIPT, BLOCK_END)


def strip_block(text: str) -> Tuple[str, bool]:
    """``text`` without our block; (text, found)."""
    pattern = re.compile(re.escape(BLOCK_BEGIN) + r"\n.*?" + re.escape(BLOCK_END) + r"\n?", re.S)
    new, n = pattern.subn("", text, count=1)
    return new, bool(n)


def insert_block(text: str) -> str:
    """Put our block before a final ``exit 0`` (rc.local's usual last line), else at the end."""
    block = rc_local_block()
    lines = text.splitlines(True)
    idx = len(lines)
    for i in range(len(lines) - 1, -1, -1):
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            continue
        if re.match(r"^exit(\s+0)?\s*$", stripped):
            idx = i
        break
    head = "".join(lines[:idx])
    if head and not head.endswith("\n"):
        head += "\n"
    return head + block + "".join(lines[idx:])


# --- the guest tree ------------------------------------------------------------------------

def _parts(path: str) -> List[str]:
    return [p for p in path.split("/") if p and p != "."]


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _check_regular(st: os.stat_result, gpath: str, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise BadGuestFile("%s in the guest is not a regular file (%s)"
                           % (printable(gpath), _file_kind(st.st_mode)))
    if st.st_size > limit:
        raise BadGuestFile("%s in the guest is too large (%d bytes; at most %d expected)"
                           % (printable(gpath), st.st_size, limit))


class Tree:
    """A guest root directory; guest paths ("/etc/x") are resolved within it, on fds.

    Queries (:meth:`lstat`, :meth:`exists`, ...) answer None/False for a path that is missing,
    loops or runs through a non-directory; reads and writes raise OSError (or
    :class:`BadGuestFile` for something that is not a small regular file)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise ImageError("not a directory: %s" % root, EXIT_DATAERR)

    # -- resolution ------------------------------------------------------------------------

    def _open_root(self) -> int:
        return os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def _walk(self, gpath: str, follow: bool) -> Tuple[int, str, str]:
        """(dirfd, name, canonical guest path) for ``gpath``; the caller closes dirfd.

        Symlinks in the parent directories are followed inside the root, the last component's
        too with ``follow``; ``..`` never climbs above the root. The root fd is opened per call
        (no fd outlives an operation: a backend unmounts the root afterwards)."""
        todo = _parts(gpath)
        todo.reverse()
        names: List[str] = []
        fd = self._open_root()
        hops = 0
        try:
            while todo:
                part = todo.pop()
                if part == "..":
                    if names:
                        parent = os.open("..", _WALK_FLAGS, dir_fd=fd)
                        os.close(fd)
                        fd = parent
                        names.pop()
                    continue
                last = not todo
                try:
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    if last:
                        return fd, part, "/" + "/".join(names + [part])
                    raise
                if stat.S_ISLNK(st.st_mode) and (follow or not last):
                    hops += 1
                    if hops > MAX_LINK_HOPS:
                        raise OSError(errno.ELOOP, "too many levels of symbolic links in the guest",
                                      gpath)
                    target = os.readlink(part, dir_fd=fd)
                    todo.extend(reversed(_parts(target)))
                    if target.startswith("/"):
                        top = self._open_root()
                        os.close(fd)
                        fd = top
                        names = []
                    continue
                if last:
                    return fd, part, "/" + "/".join(names + [part])
                if not stat.S_ISDIR(st.st_mode):
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), gpath)
                sub = os.open(part, _WALK_FLAGS, dir_fd=fd)  # O_NOFOLLOW: no swapped-in link
                os.close(fd)
                fd = sub
                names.append(part)
            return fd, ".", "/" + "/".join(names)  # the root, or a directory reached by ".."
        except BaseException:
            os.close(fd)
            raise

    @contextlib.contextmanager
    def at(self, gpath: str, follow: bool = False) -> Iterator[Tuple[int, str, str]]:
        """``with tree.at(p) as (dirfd, name, canonical):`` for an ``*at`` system call."""
        fd, name, canonical = self._walk(gpath, follow)
        try:
            yield fd, name, canonical
        finally:
            os.close(fd)

    def resolve(self, gpath: str, follow: bool = False) -> str:
        """The canonical guest path (no symlink in its directories; nor at its end with
        ``follow``)."""
        with self.at(gpath, follow) as (_, _, canonical):
            return canonical

    # -- queries ---------------------------------------------------------------------------

    def lstat(self, gpath: str, follow: bool = False) -> Optional[os.stat_result]:
        try:
            with self.at(gpath, follow) as (fd, name, _):
                return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in _ABSENT:
                return None
            raise

    def lexists(self, gpath: str) -> bool:
        return self.lstat(gpath) is not None

    def exists(self, gpath: str) -> bool:
        return self.lstat(gpath, follow=True) is not None

    def isdir(self, gpath: str) -> bool:
        st = self.lstat(gpath, follow=True)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def readlink(self, gpath: str) -> Optional[str]:
        """The target of the symlink at ``gpath``; None if it is not a symlink."""
        try:
            with self.at(gpath) as (fd, name, _):
                return os.readlink(name, dir_fd=fd)
        except OSError as exc:
            if exc.errno in _ABSENT + (errno.EINVAL,):
                return None
            raise

    def listdir(self, gdir: str) -> List[str]:
        with self.at(gdir, follow=True) as (fd, name, _):
            dfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            try:
                return sorted(os.listdir(dfd))
            finally:
                os.close(dfd)

    def is_linux_root(self) -> bool:
        return self.lexists("/etc/os-release") or self.lexists("/usr/lib/os-release")

    # -- reads -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _open_regular(self, gpath: str, limit: int,
                      follow: bool) -> Iterator[Tuple[int, os.stat_result]]:
        """An fd on the regular file at ``gpath`` of at most ``limit`` bytes. Its type is checked
        before opening (a device or FIFO is never opened) and again on the fd."""
        with self.at(gpath, follow) as (dfd, name, _):
            _check_regular(os.stat(name, dir_fd=dfd, follow_symlinks=False), gpath, limit)
            fd = os.open(name, _READ_FLAGS, dir_fd=dfd)
        try:
            st = os.fstat(fd)
            _check_regular(st, gpath, limit)
            yield fd, st
        finally:
            os.close(fd)

    @staticmethod
    def _chunks(fd: int, gpath: str, limit: int) -> Iterator[bytes]:
        total = 0
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                return
            total += len(chunk)
            if total > limit:  # grew after fstat
                raise BadGuestFile("%s in the guest is too large (more than %d bytes)"
                                   % (printable(gpath), limit))
            yield chunk

    def read_file(self, gpath: str, limit: int,
                  follow: bool = True) -> Tuple[bytes, os.stat_result]:
        """(content, stat) of a regular file of at most ``limit`` bytes; FileNotFoundError when
        missing, BadGuestFile for anything else there."""
        with self._open_regular(gpath, limit, follow) as (fd, st):
            return b"".join(self._chunks(fd, gpath, limit)), st

    def read(self, gpath: str, limit: int, follow: bool = True) -> bytes:
        return self.read_file(gpath, limit, follow)[0]

    def read_or_none(self, gpath: str, limit: int) -> Optional[bytes]:
        try:
            return self.read(gpath, limit)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def file_sha256(self, gpath: str, limit: int = MAX_FILE, follow: bool = False) -> Optional[str]:
        """The sha256 of the regular file at ``gpath``; None when there is none, or it is larger
        than ``limit`` (so it cannot be one that install wrote)."""
        try:
            with self._open_regular(gpath, limit, follow) as (fd, _):
                h = hashlib.sha256()
                for chunk in self._chunks(fd, gpath, limit):
                    h.update(chunk)
                return h.hexdigest()
        except BadGuestFile:
            return None
        except OSError as exc:
            if exc.errno in _ABSENT:
                return None
            raise

    # -- writes (the last component is never followed) ---------------------------------------

    def create(self, gpath: str, data: bytes, mode: int) -> None:
        """A new regular file at ``gpath`` with ``data`` and ``mode``, synced. Whatever is at that
        name (a stale temp file, or something the image planted) is unlinked first, never
        opened."""
        with self.at(gpath) as (dfd, name, _):
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                pass
            fd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=dfd)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)

    def symlink(self, target: str, gpath: str) -> None:
        with self.at(gpath) as (dfd, name, _):
            os.symlink(target, name, dir_fd=dfd)

    def unlink(self, gpath: str) -> None:
        with self.at(gpath) as (dfd, name, _):
            os.unlink(name, dir_fd=dfd)

    def mkdir(self, gpath: str, mode: int = 0o755) -> None:
        """Create the directory ``gpath`` names; a dangling symlink there: its target."""
        with self.at(gpath, follow=True) as (dfd, name, _):
            os.mkdir(name, mode, dir_fd=dfd)
            # What lands in the image must not depend on the installing user's umask.
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=dfd)
            try:
                os.fchmod(fd, mode)
            finally:
                os.close(fd)

    def rmdir(self, gpath: str) -> None:
        with self.at(gpath, follow=True) as (dfd, name, _):
            os.rmdir(name, dir_fd=dfd)

    def rename(self, src: str, dst: str) -> None:
        with self.at(src) as (sfd, sname, _), self.at(dst) as (dfd, dname, _):
            os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)

    def link(self, src: str, dst: str) -> None:
        with self.at(src) as (sfd, sname, _), self.at(dst) as (dfd, dname, _):
            os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)


def detect_init(tree: Tree) -> Tuple[str, str]:
    """(kind, reason): how this guest starts services."""
    try:
        init = tree.resolve("/sbin/init", follow=True)
    except OSError:
        init = ""
    if posixpath.basename(init) == "systemd" and tree.exists(init):
        return "systemd", "/sbin/init is systemd"
    if not tree.lexists("/sbin/init"):
        for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd"):
            if tree.exists(p):
                return "systemd", "%s exists (no /sbin/init)" % p
    rc_dirs = [d for d in ("/etc/rc2.d", "/etc/rc3.d", "/etc/rc5.d") if tree.isdir(d)]
    if tree.isdir("/etc/init.d") and rc_dirs:
        return "sysv", "/etc/init.d and %s exist" % rc_dirs[0]
    if tree.exists(RC_LOCAL):
        return "rc.local", "%s exists" % RC_LOCAL
    return "rc.local", "no systemd and no sysv runlevel directories found"


def virtio_modules(tree: Tree) -> List[str]:
    """Modules for /etc/modules-load.d: virtio_console, plus virtio_pci unless every kernel in
    the image has it built in (or it has no kernel modules at all, when both are listed). An
    unreadable, oversized or non-regular modules.builtin counts as "not built in"."""
    mods = ["virtio_console"]
    try:
        kernels = tree.listdir("/lib/modules")
    except OSError:
        kernels = []
    builtin_everywhere = bool(kernels)
    for k in kernels:
        try:
            text = tree.read("/lib/modules/%s/modules.builtin" % k, MAX_BUILTIN).decode(
                "utf-8", "replace")
            names = {posixpath.basename(l.strip()).split(".ko")[0].replace("-", "_")
                     for l in text.splitlines()}
        except (OSError, BadGuestFile):
            names = set()
        if "virtio_pci" not in names:
            builtin_everywhere = False
    if not builtin_everywhere:
        mods.insert(0, "virtio_pci")
    return mods


# --- the manifest (read from the image: validated field by field) ----------------------------

_SHA256_RE = re.compile(r"\A[0-9a-f]{64}\Z")


def _damaged(why: str) -> ImageError:
    return ImageError("%s in the guest is damaged (%s); remove it by hand to reinstall"
                      % (MANIFEST, printable(why)), EXIT_DATAERR)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _guest_path(value: Any, what: str) -> str:
    """``value`` if it is an absolute, normalized guest path other than ``/``."""
    if not (isinstance(value, str) and value.startswith("/") and not value.startswith("//")
            and value != "/" and "\0" not in value and len(value) <= 4096
            and posixpath.normpath(value) == value):
        raise _damaged("%s is not an absolute normalized path: %s" % (what, _shown(value)))
    return value


def _optional(man: Dict[str, Any], key: str, check: Callable[[Any], bool], what: str,
              where: str = "") -> None:
    value = man.get(key)
    if value is not None and not check(value):
        raise _damaged("%s%s is not %s: %s" % (where, key, what, _shown(value)))


def _short_str(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 256


def _channel_name(value: Any) -> bool:
    # it is written into the agent config: one printable line
    return _short_str(value) and bool(value) and value.isprintable()


def _mode(value: Any) -> bool:
    return type(value) is int and 0 <= value <= 0o7777


def _validate_entry(e: Any, i: int) -> None:
    if not isinstance(e, dict):
        raise _damaged("entry %d is not an object" % i)
    path = _guest_path(e.get("path"), "entry %d path" % i)
    kind = e.get("kind")
    if kind not in ENTRY_KINDS:
        raise _damaged("entry %d kind is not one of %s: %s"
                       % (i, ", ".join(ENTRY_KINDS), _shown(kind)))
    where = "entry %d " % i
    _optional(e, "sha256", lambda v: isinstance(v, str) and bool(_SHA256_RE.match(v)),
              "a sha256 hex digest", where)
    if kind == "symlink" and not (isinstance(e.get("target"), str) and e["target"]
                                  and "\0" not in e["target"] and len(e["target"]) <= 4096):
        raise _damaged("entry %d target is not a link target: %s" % (i, _shown(e.get("target"))))
    _optional(e, "backup", lambda v: v == BACKUP_DIR + path, "%s%s" % (BACKUP_DIR, path), where)
    for key in ("kept_existing", "created"):
        _optional(e, key, lambda v: isinstance(v, bool), "true or false", where)
    _optional(e, "mode_before", _mode, "a file mode", where)


def validate_manifest(man: Any) -> Dict[str, Any]:
    """``man`` (parsed install.json) if every field install and remove use is well formed;
    otherwise an ImageError naming the first bad field."""
    if not isinstance(man, dict):
        raise _damaged("not a JSON object")
    if "format" in man and not (type(man["format"]) is int and man["format"] == 1):
        raise _damaged("unknown format %s" % _shown(man["format"]))
    for key in ("agent_version", "previous_version", "installed_at"):
        _optional(man, key, _short_str, "a string")
    for key in ("ctl_name", "data_name"):
        _optional(man, key, _channel_name, "a channel name")
    _optional(man, "init", lambda v: v in INIT_KINDS, "one of " + ", ".join(INIT_KINDS))
    entries = man.get("entries")
    if not isinstance(entries, list) or len(entries) > MAX_ENTRIES:
        raise _damaged("no list of entries")
    for i, e in enumerate(entries):
        _validate_entry(e, i)
    dirs = man.get("created_dirs", [])
    if not isinstance(dirs, list) or len(dirs) > MAX_ENTRIES:
        raise _damaged("created_dirs is not a list")
    for d in dirs:
        _guest_path(d, "created_dirs")
    return man


def _no_constant(name: str) -> Any:
    raise ValueError("non-standard JSON constant %s" % name)


def read_manifest(tree: Tree) -> Optional[Dict[str, Any]]:
    """The validated manifest, or None when there is none."""
    data = tree.read_or_none(MANIFEST, MAX_TEXT)
    if data is None:
        return None
    try:
        man = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested JSON
        raise _damaged(str(exc))
    return validate_manifest(man)


def _plan(tree: Tree, pyz: bytes, init: str, ctl_name: str,
          data_name: str) -> List[Dict[str, Any]]:
    """The desired entries: dicts with path, kind and content/target."""
    entries: List[Dict[str, Any]] = [
        {"path": AGENT_PYZ, "kind": "file", "content": pyz, "mode": 0o755},
        {"path": WRAPPER, "kind": "file", "content": wrapper_text().encode(), "mode": 0o755},
        {"path": CONFIG, "kind": "config", "content": config_text(ctl_name, data_name).encode(),
         "mode": 0o644},
        {"path": MODULES_CONF, "kind": "file",
         "content": modules_text(virtio_modules(tree)).encode(), "mode": 0o644},
    ]
    if init == "systemd":
        entries += [
            {"path": SYSTEMD_UNIT, "kind": "file", "content": systemd_unit_text().encode(),
             "mode": 0o644},
            {"path": SYSTEMD_WANTS, "kind": "symlink", "target": SYSTEMD_UNIT},
        ]
    elif init == "sysv":
        entries.append({"path": SYSV_SCRIPT, "kind": "file", "content": init_script_text().encode(),
                        "mode": 0o755})
        for level in "2345":
            if tree.isdir("/etc/rc%s.d" % level):
                entries.append({"path": "/etc/rc%s.d/S01guestlink-agent" % level,
                                "kind": "symlink", "target": "../init.d/guestlink-agent"})
        for level in "016":
            if tree.isdir("/etc/rc%s.d" % level):
                entries.append({"path": "/etc/rc%s.d/K01guestlink-agent" % level,
                                "kind": "symlink", "target": "../init.d/guestlink-agent"})
    elif init == "rc.local":
        entries += [
            {"path": RCLOCAL_SCRIPT, "kind": "file", "content": init_script_text().encode(),
             "mode": 0o755},
            {"path": RC_LOCAL, "kind": "block"},
        ]
    else:
        raise ImageError("unknown init kind %r (use one of %s)" % (init, ", ".join(INIT_KINDS)), 2)
    return entries


def _same_install(old: Dict[str, Any], new: Dict[str, Any]) -> bool:
    """True when manifest ``new`` records what ``old`` does (install dates aside)."""
    def key(man: Dict[str, Any]) -> Any:
        entries = sorted(json.dumps(e, sort_keys=True) for e in man.get("entries", []))
        return [man.get(k) for k in ("format", "agent_version", "init", "ctl_name", "data_name",
                                     "created_dirs")] + [entries]
    return key(old) == key(new)


class _DeferSigint:
    """Hold Ctrl-C while the commit renames run, so the manifest always matches the tree."""

    def __enter__(self) -> "_DeferSigint":
        self.pending = False
        self.old: Any = None  # the previous handler: a callable, SIG_DFL/SIG_IGN or None
        try:
            self.old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            pass
        return self

    def _handler(self, signum: int, frame: Optional[types.FrameType]) -> None:
        self.pending = True

    def __exit__(self, *exc: Any) -> None:
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        if self.pending and exc[0] is None:
            raise KeyboardInterrupt


class Installer:
    """One install/remove run on a Tree. ``log`` receives human-readable lines."""

    def __init__(self, tree: Tree, log: Optional[Callable[[str], None]] = None,
                 fault: Optional[Callable[[str], None]] = None) -> None:
        self.tree = tree
        self.log = log or (lambda line: None)
        self.fault = fault  # tests: callable(stage_name) that may raise
        self.created_dirs: List[str] = []
        self.staged: List[str] = []

    def _fault(self, name: str) -> None:
        if self.fault:
            self.fault(name)

    # -- low level -------------------------------------------------------------------------

    def _makedirs(self, gdir: str) -> None:
        """Create the guest directory and missing parents; record the ones created."""
        cur = ""
        for part in _parts(gdir):
            cur += "/" + part
            st = self.tree.lstat(cur, follow=True)
            if st is not None and stat.S_ISDIR(st.st_mode):
                continue
            if st is not None:
                raise ImageError("cannot create directory %s in the guest: a file is in the way"
                                 % printable(cur))
            self.tree.mkdir(cur)
            self.created_dirs.append(cur)

    def _stage_bytes(self, gpath: str, data: bytes, mode: int) -> str:
        """Write ``data`` next to ``gpath`` under a temp name; returns that (canonical) name."""
        self._makedirs(posixpath.dirname(gpath))
        tmp = self.tree.resolve(gpath) + _TMP_SUFFIX
        self.staged.append(tmp)
        self.tree.create(tmp, data, mode)
        return tmp

    def _stage_symlink(self, gpath: str, target: str) -> str:
        self._makedirs(posixpath.dirname(gpath))
        tmp = self.tree.resolve(gpath) + _TMP_SUFFIX
        self.staged.append(tmp)
        try:
            self.tree.unlink(tmp)  # stale or planted: unlink never follows
        except FileNotFoundError:
            pass
        self.tree.symlink(target, tmp)
        return tmp

    def _replace(self, gpath: str, data: bytes, mode: int) -> None:
        """Replace the file at (canonical) ``gpath`` atomically."""
        tmp = self._stage_bytes(gpath, data, mode)
        self.tree.rename(tmp, gpath)
        self.staged.remove(tmp)

    def _rollback_staging(self) -> None:
        for tmp in reversed(self.staged):
            try:
                self.tree.unlink(tmp)
            except OSError:
                pass
        for gdir in reversed(self.created_dirs):
            try:
                self.tree.rmdir(gdir)
            except OSError:
                pass
        self.staged = []
        self.created_dirs = []

    def _current_sha(self, gpath: str) -> Optional[str]:
        """sha256 of the regular file at ``gpath`` (not through a link); None if there is none
        or it is too large to be one install wrote."""
        return self.tree.file_sha256(gpath)

    # -- install ---------------------------------------------------------------------------

    def install(self, pyz: bytes, init: Optional[str] = None, ctl_name: Optional[str] = None,
                data_name: Optional[str] = None) -> Dict[str, Any]:
        """Install or upgrade. Returns a result dict (also what ``--json`` prints)."""
        try:
            return self._install(pyz, init, ctl_name, data_name)
        except OSError as exc:  # while reading the guest, before anything was staged
            raise _os_error(exc, "reading the guest")

    def _install(self, pyz: bytes, init: Optional[str], ctl_name: Optional[str],
                 data_name: Optional[str]) -> Dict[str, Any]:
        tree = self.tree
        if not tree.is_linux_root():
            raise NoRootFilesystem("%s does not look like a Linux root filesystem (no "
                                   "/etc/os-release)" % tree.root)
        version = pyz_version(pyz)
        if version is None:
            raise ImageError("the agent bundle is not a guestlink zipapp (no guestlink/_version.py)")
        old = read_manifest(tree)
        old_entries = {e["path"]: e for e in (old or {}).get("entries", [])}
        if init is None:
            init, reason = detect_init(tree)
            self.log("init system: %s (%s)" % (init, reason))
        else:
            self.log("init system: %s (--init)" % init)
        ctl_name = ctl_name or (old or {}).get("ctl_name") or DEFAULT_CTL
        data_name = data_name or (old or {}).get("data_name") or DEFAULT_DATA
        desired = _plan(tree, pyz, init, ctl_name, data_name)
        if not tree.exists("/usr/bin/python3") and not tree.exists("/usr/local/bin/python3"):
            self.log("warning: no python3 in the guest (/usr/bin/python3): the agent needs "
                     "python3 >= 3.8 to run")

        # decide what to do per entry
        actions = []  # (entry, manifest_record, staged_kind)
        records = []
        notes = []
        for d in desired:
            path, kind = d["path"], d["kind"]
            prev: Any = old_entries.get(path)  # None when not ours; `ours` implies a dict
            ours = prev is not None and prev.get("kind") == kind and not prev.get("kept_existing")
            cur_st = tree.lstat(path)
            present = cur_st is not None
            rec = {"path": path, "kind": kind}
            if kind in ("file", "config"):
                rec["sha256"] = sha256(d["content"])
                if kind == "config":
                    cur = self._current_sha(path)
                    if present and not ours:
                        rec.update(sha256=cur, kept_existing=True)
                        notes.append("kept the existing %s (not written by guestlink)" % path)
                        records.append(rec)
                        continue
                    if present and ours and cur != prev.get("sha256"):
                        rec["sha256"] = prev.get("sha256")
                        notes.append("kept %s: modified since install%s" % (
                            path, "" if cur is None else " (new defaults not applied)"))
                        records.append(rec)
                        continue
                if cur_st is not None and ours and self._current_sha(path) == rec["sha256"] \
                        and stat.S_IMODE(cur_st.st_mode) == d["mode"]:
                    records.append(dict(prev, **rec))
                    continue
                if ours and prev.get("backup"):
                    rec["backup"] = prev["backup"]
                actions.append((d, rec, present and not ours))
            elif kind == "symlink":
                rec["target"] = d["target"]
                if present and tree.readlink(path) == d["target"] and (
                        ours or prev is None):
                    if prev is None:
                        # identical link made by someone else: adopt nothing, just leave it
                        rec["kept_existing"] = True
                    else:
                        rec = dict(prev, **rec)
                    records.append(rec)
                    continue
                if ours and prev.get("backup"):
                    rec["backup"] = prev["backup"]
                actions.append((d, rec, present and not ours))
            elif kind == "block":
                final = tree.resolve(path, follow=True)
                try:
                    data, rc_st = tree.read_file(final, MAX_TEXT, follow=False)
                    exists = True
                except FileNotFoundError:
                    data, rc_st, exists = b"", None, False
                text = data.decode("utf-8", "surrogateescape")
                stripped, had = strip_block(text)
                new = insert_block(stripped if exists else RC_LOCAL_SKELETON)
                mode = stat.S_IMODE(rc_st.st_mode) if rc_st is not None else 0o755
                if ours:
                    rec["created"] = prev.get("created", False)
                    rec["mode_before"] = prev.get("mode_before")
                else:
                    rec["created"] = not exists
                    rec["mode_before"] = mode if exists else None
                if exists and had and new == text and mode & 0o111:
                    records.append(rec)
                    continue
                d = dict(d, content=new.encode("utf-8", "surrogateescape"), mode=mode | 0o755,
                         final=final)
                actions.append((d, rec, False))
        stale = [e for p, e in old_entries.items() if p not in {d["path"] for d in desired}]
        if old and old.get("init") and old.get("init") != init:
            notes.append("start method changed from %s to %s" % (old["init"], init))

        # space: everything staged at once, plus a margin
        need = sum(len(d.get("content", b"")) for d, _, _ in actions) + SPACE_MARGIN
        try:
            st = os.statvfs(tree.root)
            free = st.f_bavail * st.f_frsize
            if st.f_blocks and free < need:
                raise NoSpace("the guest filesystem is full: %d KiB free, %d KiB needed; nothing "
                              "was changed" % (free // 1024, need // 1024))
        except OSError:
            pass

        # stage
        self._fault("before-stage")
        try:
            staged = []
            for d, rec, backup in actions:
                if d["kind"] == "symlink":
                    tmp = self._stage_symlink(d["path"], d["target"])
                else:
                    tmp = self._stage_bytes(d.get("final", d["path"]), d["content"], d["mode"])
                if backup:
                    self._makedirs(posixpath.dirname(BACKUP_DIR + d["path"]))
                staged.append((d, rec, backup, tmp))
                self._fault("staged:" + d["path"])
            self._makedirs(posixpath.dirname(MANIFEST))
        except OSError as exc:
            self._rollback_staging()
            raise _os_error(exc, "writing into the guest")
        except BaseException:
            self._rollback_staging()
            raise

        # commit: renames only (no new space); Ctrl-C waits until the manifest is written
        prev_version = (old or {}).get("agent_version")
        with _DeferSigint():
            try:
                for d, rec, backup, tmp in staged:
                    final = d.get("final", d["path"])
                    if backup:
                        bk = BACKUP_DIR + d["path"]
                        if tree.lexists(bk):
                            tree.unlink(bk)
                        final_st = tree.lstat(final)
                        if final_st is None or not stat.S_ISREG(final_st.st_mode):
                            tree.rename(final, bk)
                        else:
                            tree.link(final, bk)
                        rec["backup"] = bk
                    tree.rename(tmp, final)
                    records.append(rec)
                self.staged = []
                for e in stale:
                    self._undo(e, notes)
                    self._fault("stale-undone")
                created = list((old or {}).get("created_dirs", []))
                created += [c for c in self.created_dirs if c not in created]
                manifest = {
                    "format": 1,
                    "agent_version": version,
                    "previous_version": prev_version,
                    "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "init": init,
                    "ctl_name": ctl_name,
                    "data_name": data_name,
                    "entries": records,
                    "created_dirs": created,
                }
                # a run that changed nothing leaves the manifest alone too (its date included):
                # a second install or enroll of the same agent changes nothing in the guest
                if old is None or staged or stale or not _same_install(old, manifest):
                    self._write_manifest(manifest)
            except OSError as exc:
                self._rollback_staging()
                raise _os_error(exc, "committing the install")
        if prev_version is None:
            summary = "installed guestlink agent %s" % version
        elif prev_version == version:
            summary = "guestlink agent %s already installed%s" % (
                version, "; updated its files" if actions or stale else "; nothing to do")
        else:
            summary = "upgraded guestlink agent %s -> %s" % (prev_version, version)
        return {"action": "install", "version": version, "previous_version": prev_version,
                "init": init, "changed": [d["path"] for d, _, _ in actions] + [
                    e["path"] for e in stale], "notes": notes, "summary": summary,
                "ctl_name": ctl_name, "data_name": data_name}

    def _write_manifest(self, manifest: Dict[str, Any]) -> None:
        data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        self._replace(MANIFEST, data, 0o644)

    # -- remove ----------------------------------------------------------------------------

    def _undo(self, e: Dict[str, Any], notes: List[str]) -> None:
        tree = self.tree
        path, kind = e["path"], e["kind"]
        if e.get("kept_existing"):
            return
        if kind == "block":
            final = tree.resolve(path, follow=True)
            try:
                data, rc_st = tree.read_file(final, MAX_TEXT, follow=False)
            except FileNotFoundError:
                return
            new, had = strip_block(data.decode("utf-8", "surrogateescape"))
            if e.get("created") and new.strip() in ("", RC_LOCAL_SKELETON.strip(), "#!/bin/sh"):
                tree.unlink(final)
                return
            if had:
                mode = e.get("mode_before")
                self._replace(final, new.encode("utf-8", "surrogateescape"),
                              mode if mode is not None else stat.S_IMODE(rc_st.st_mode))
            return
        st = tree.lstat(path)
        if kind == "config" and st is not None and self._current_sha(path) != e.get("sha256"):
            notes.append("kept %s: modified since install" % printable(path))
            return
        if kind == "symlink" and st is not None and stat.S_ISLNK(st.st_mode) \
                and tree.readlink(path) != e.get("target"):
            notes.append("kept %s: changed since install" % printable(path))
            return
        if st is not None:
            tree.unlink(path)
        if e.get("backup") and tree.lexists(e["backup"]):
            tree.rename(e["backup"], path)

    def remove(self) -> Dict[str, Any]:
        try:
            return self._remove()
        except OSError as exc:
            raise _os_error(exc, "removing from the guest")

    def _remove(self) -> Dict[str, Any]:
        tree = self.tree
        man = read_manifest(tree)
        if man is None:
            found = [p for p in (AGENT_PYZ, WRAPPER, SYSTEMD_UNIT, SYSV_SCRIPT) if tree.lexists(p)]
            if found:
                raise ImageError("no %s in the guest, but %s exist: not installed by "
                                 "`guestlink image install`; nothing removed"
                                 % (MANIFEST, ", ".join(found)), EXIT_DATAERR)
            return {"action": "remove", "removed": False, "version": None, "notes": [],
                    "summary": "guestlink agent is not installed; nothing to do"}
        notes: List[str] = []
        with _DeferSigint():
            for e in reversed(man["entries"]):
                self._undo(e, notes)
                self._fault("undone:" + e["path"])
            tree.unlink(MANIFEST)
            for gdir in reversed(man.get("created_dirs", [])):
                try:
                    tree.rmdir(gdir)
                except FileNotFoundError:
                    pass
                except OSError:
                    if tree.isdir(gdir):
                        notes.append("kept directory %s: not empty" % printable(gdir))
        return {"action": "remove", "removed": True, "version": man.get("agent_version"),
                "notes": notes,
                "summary": "removed guestlink agent %s" % printable(man.get("agent_version"))}


# --- status --------------------------------------------------------------------------------

def status(tree: Tree) -> Dict[str, Any]:
    """What is installed (dict; also the ``--json`` output of ``image status``)."""
    try:
        return _status(tree)
    except OSError as exc:
        raise _os_error(exc, "reading the guest")


def _entry_state(tree: Tree, e: Dict[str, Any]) -> str:
    path, kind = e["path"], e["kind"]
    st = tree.lstat(path, follow=kind == "block")
    if st is None:
        return "missing"
    if kind in ("file", "config"):
        return "present" if tree.file_sha256(path) == e.get("sha256") else "modified"
    if kind == "symlink":
        return "present" if tree.readlink(path) == e.get("target") else "modified"
    text = tree.read(path, MAX_TEXT).decode("utf-8", "surrogateescape")
    return "present" if strip_block(text)[1] else "missing"


def _status(tree: Tree) -> Dict[str, Any]:
    man = read_manifest(tree)
    try:
        pyz = tree.read_or_none(AGENT_PYZ, MAX_FILE)
    except BadGuestFile:  # a FIFO, device or huge file there: no version to show
        pyz = None
    except OSError as exc:
        if exc.errno not in _ABSENT:
            raise
        pyz = None
    out: Dict[str, Any] = {"installed": man is not None,
                           "agent_version": pyz_version(pyz) if pyz else None,
                           "manifest": MANIFEST if man else None}
    if man is None:
        out["init"] = None
        out["foreign_files"] = [p for p in (AGENT_PYZ, WRAPPER, SYSTEMD_UNIT, SYSV_SCRIPT)
                                if tree.lexists(p)]
        return out
    out.update(manifest_version=man.get("agent_version"), init=man.get("init"),
               installed_at=man.get("installed_at"), previous_version=man.get("previous_version"),
               ctl_name=man.get("ctl_name"), data_name=man.get("data_name"))
    files = []
    for e in man["entries"]:
        state = _entry_state(tree, e)
        if e.get("kept_existing"):
            state += " (not ours)"
        files.append({"path": e["path"], "kind": e["kind"], "state": state})
    out["files"] = files
    out["config"] = {"path": CONFIG, "ctl_name": man.get("ctl_name"),
                     "data_name": man.get("data_name"),
                     "modified": any(f["path"] == CONFIG and f["state"].startswith("modified")
                                     for f in files)}
    return out
