"""The receiving end's file handling, one for push and pull, agent and host: the hidden partial
file (found again for a resume, opened, or created afresh), the check that a source is unchanged,
and the commit step (fsync, attributes, rename into place, directory fsync).

Every operation is relative to a directory fd the caller holds (the agent walks to it without
following a swapped-in symlink; docs/security.md) and attributes are set on the file's own fd,
never by path. Stdlib-only, CPython >= 3.8.
"""

import os
import stat
from typing import Callable, NamedTuple, Optional

from ..protocol import codes
from ..protocol import transfer as T
from .engine import TransferError

_CREATE_ATTEMPTS = 3


def umask() -> int:
    """The process's umask. Read from /proc where the kernel shows it (>= 4.7): setting it to
    read it, as the fallback must, changes it for a moment under every other thread."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode() -> int:
    """The mode a new file gets without -p: as open(2) would give it."""
    return 0o666 & ~umask()


def unchanged_check(fd: int, size: Optional[int], mtime_ns: Optional[int],
                    message: str) -> Callable[[], None]:
    """A ``check`` for send_file: raises TransferError(CHANGED, ``message``) once the file open
    as ``fd`` no longer has the ``size`` and ``mtime_ns`` it was listed with (None: not known,
    e.g. a pipe, nothing to check)."""
    def check() -> None:
        if size is None:
            return
        st = os.fstat(fd)
        if st.st_size != size or st.st_mtime_ns != mtime_ns:
            raise TransferError(codes.CHANGED, message)
    return check


def trusted_partial(st: os.stat_result) -> bool:
    """Can this be our own partial file? Another user may have planted one under the name (it
    is predictable, so that the next transfer of the same target finds it to resume), or hard
    linked ours to read it later."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1


def resume_offset(dir_fd: int, partial: str, size: Optional[int]) -> int:
    """Where a --resume continues: after the verified prefix in our partial file ``partial`` in
    ``dir_fd`` (0 if there is none, or it is not ours)."""
    try:
        st = os.stat(partial, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return 0
    return T.resume_offset(st.st_size if trusted_partial(st) else None, size)


class PartialReplaced(Exception):
    """The partial file to resume is no longer the one that was found (swapped since)."""


def open_partial(dir_fd: int, partial: str, offset: int) -> int:
    """Open ``partial`` in ``dir_fd`` for writing from ``offset``: our own from a resume (checked
    again on the fd: raises PartialReplaced if it was swapped), or a new one, replacing any
    leftover (never written through). Raises OSError from the file system."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    if offset:
        fd = os.open(partial, flags, dir_fd=dir_fd)
        st = os.fstat(fd)
        if not (trusted_partial(st) and st.st_size >= offset):
            os.close(fd)
            raise PartialReplaced(partial)
    else:
        fd = _create(dir_fd, partial, flags)
    try:
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create(dir_fd: int, partial: str, flags: int) -> int:
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            return os.open(partial, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            if attempt == _CREATE_ATTEMPTS - 1:
                raise
        try:
            os.unlink(partial, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
    raise AssertionError("unreachable")


def drop_partial(dir_fd: int, partial: str) -> None:
    try:
        os.unlink(partial, dir_fd=dir_fd)
    except OSError:
        pass


class Attrs(NamedTuple):
    """What the commit step sets on a received file. ``mode`` is applied under ``mode_mask`` (a
    pull never takes setuid/setgid from the untrusted guest); the owner is set only when running
    as root."""

    mode: int
    mode_mask: int = 0o7777
    mtime_ns: Optional[int] = None
    uid: Optional[int] = None
    gid: Optional[int] = None


def kept_mode(st: Optional[os.stat_result]) -> int:
    """The mode of a received file without -p: that of the regular file it replaces, else the
    default. Another user's setuid/setgid bits are not carried over: the new file is ours (the
    agent's: root's), so ``conf`` pre-created as 04777 by a guest user would become a setuid root
    program."""
    if st is None or not stat.S_ISREG(st.st_mode):
        return default_mode()
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid():
        mode &= ~(stat.S_ISUID | stat.S_ISGID)
    return mode


def existing(dir_fd: int, name: str) -> Optional[os.stat_result]:
    """lstat of ``name`` in ``dir_fd``, None if there is nothing (or it cannot be seen)."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


def commit(fd: int, dir_fd: int, partial: str, name: str, attrs: Attrs,
           sync_dir: bool = True) -> None:
    """The one commit step of a received file: fsync it, set its attributes on the fd, rename
    ``partial`` to ``name`` within ``dir_fd`` (the directory it was received in, held open), and
    fsync that directory so the rename itself is durable (``sync_dir=False``: the caller does it
    once for many files, with sync_directory)."""
    os.fsync(fd)
    mode = attrs.mode & attrs.mode_mask
    if (attrs.uid is not None or attrs.gid is not None) and os.geteuid() == 0:
        os.fchown(fd, -1 if attrs.uid is None else attrs.uid, -1 if attrs.gid is None else attrs.gid)
    os.fchmod(fd, mode)  # after the chown, which clears setuid bits
    if attrs.mtime_ns is not None:
        os.utime(fd, ns=(attrs.mtime_ns, attrs.mtime_ns))
    os.replace(partial, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    if sync_dir:
        sync_directory(dir_fd)


def sync_directory(dir_fd: int) -> None:
    """fsync the directory ``dir_fd`` (a rename is recorded there, not in the file). A directory
    we may not read, or a file system that cannot fsync one (EINVAL), is left to the kernel."""
    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_directory(path: str) -> int:
    """A directory fd for the commit step on the host (the agent holds its own, walked to)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
