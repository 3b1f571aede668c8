"""One guestlink client per VM at a time, with the others queued behind it.

QEMU's socket chardev serves a single client: a second connection to a VM's control socket sits
in the listen backlog, unanswered, until the first one closes. Without coordination a second
``guestlink`` command (a ``cp`` started while another runs) times out with "the agent did not
answer". So every :class:`~guestlink.host.client.Client` holds an advisory ``flock`` on a lock
file named after the control socket for as long as it is connected, and one that finds it held
waits its turn, telling its caller who holds it.

The lock files live in ``$XDG_RUNTIME_DIR/guestlink`` (else ``/tmp/guestlink-<uid>``, created
0700 and checked to be ours), so the queue is per host user. The kernel drops a ``flock`` when
its holder dies: there are no stale locks to clean up; a clean release removes the file.
"""

import asyncio
import fcntl
import hashlib
import os
import sys
from typing import Any, Callable, Optional

from . import errors as E
from .mastersock import private_dir

#: How often a waiting client retries the lock (seconds).
POLL_INTERVAL = 0.1
#: How long a waiter gives a new holder to describe itself before saying "another process".
DESCRIBE_GRACE = 1.0
#: Bytes of the holder description read from / written to a lock file.
MAX_HOLDER = 512


def lock_dir() -> str:
    """The directory for this user's lock files (:func:`guestlink.host.mastersock.private_dir`:
    created 0700 if missing, refused if not ours)."""
    return private_dir()


def lock_path(ctl: str) -> str:
    """The lock file of the VM whose control socket is ``ctl`` (the same for every alias)."""
    key = os.path.realpath(ctl)
    return os.path.join(lock_dir(), hashlib.sha256(key.encode()).hexdigest()[:24] + ".lock")


def describe_self() -> str:
    """What a waiting client is told about this process: pid and command line."""
    argv = list(sys.argv) or ["python"]
    name = os.path.basename(argv[0])
    if name == "__main__.py":  # python -m PACKAGE
        name = os.path.basename(os.path.dirname(argv[0])) or "python"
    elif name in ("-c", "-m", ""):
        name = "python"
    return "pid %d (%s)" % (os.getpid(), " ".join([name] + argv[1:])[:200])


class VMLock:
    """The advisory lock on one VM's control socket (see the module docstring)."""

    def __init__(self, ctl: str) -> None:
        self.ctl = ctl
        self.path = lock_path(ctl)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; returns whether it is now held."""
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not self._still_linked(fd):
                    os.close(fd)  # its holder removed it on release: lock the new file
                    continue
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            try:
                info = (describe_self() + "\n").encode()
                os.pwrite(fd, info, 0)  # then cut: a reader never sees it empty in between
                os.ftruncate(fd, len(info))
            except OSError:
                pass  # the description only informs waiters
        return True

    def _still_linked(self, fd: int) -> bool:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def holder(self, default: Optional[str] = "another guestlink process") -> Optional[str]:
        """Who holds the lock, as its holder described itself (best effort)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return default
        try:
            text = os.pread(fd, MAX_HOLDER, 0).decode("utf-8", "replace").strip()
        finally:
            os.close(fd)
        return text.splitlines()[0] if text else default

    async def acquire(self, timeout: Optional[float] = None,
                      on_wait: Optional[Callable[[str], Any]] = None) -> bool:
        """Wait for the lock. ``on_wait(holder)`` is called once if it has to wait; after
        ``timeout`` seconds (None: no limit) :class:`~guestlink.host.errors.VMInUse` is raised."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = None if timeout is None else started + timeout
        waited = False
        while not self.try_acquire():
            who = self.holder(None)
            if who is None and loop.time() - started < DESCRIBE_GRACE:
                # a holder describes itself just after it takes the lock: give it a moment
                await asyncio.sleep(0.01)
                continue
            who = who or "another guestlink process"
            if deadline is not None and loop.time() >= deadline:
                raise E.VMInUse("%s is in use by %s (guestlink serves one client per VM at a "
                                "time)" % (self.ctl, who), self.ctl)
            if not waited:
                waited = True
                if on_wait is not None:
                    on_wait(who)
            await asyncio.sleep(POLL_INTERVAL)
        return waited

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Removed while still locked, so lock files do not pile up; a waiter that locked
            # this unlinked file sees so in _still_linked and opens the path again.
            os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)
