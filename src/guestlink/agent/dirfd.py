"""Paths walked to a directory fd that other users of the guest cannot race (docs/security.md).

The agent (root, as a rule) works on paths the host names, inside directories that other guest
users may write. Checking a path (``realpath``, ``islink``) and then using it by name leaves a
window in which such a user renames a component of theirs and puts a symlink in its place. Here
a path is walked from ``/`` one component at a time, each directory opened
``O_DIRECTORY|O_NOFOLLOW`` relative to the one before; a symlink met on the way is read and
resolved by this walk (at most MAX_HOPS of them), never by the kernel. The caller then works
relative to the directory it holds (``dir_fd=``), and checks the policy roots against the
directories the walk actually went through ((st_dev, st_ino) pairs), not against a string.
"""
import errno
import os
import stat
from typing import Iterable, List, Optional, Set, Tuple

MAX_HOPS = 40  # symlinks followed in one resolution: the kernel's own limit
# O_PATH (Linux): walking through a directory needs search permission only, as a path lookup does
DIR_FLAGS = getattr(os, "O_PATH", 0) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
Key = Tuple[int, int]


def key(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino)


def root_keys(roots: Iterable[str]) -> Set[Key]:
    """The (st_dev, st_ino) of each policy root that exists (a root may itself be a symlink)."""
    keys = set()
    for root in roots:
        try:
            keys.add(key(os.stat(root)))
        except OSError:
            pass
    return keys


def _parts(text: str) -> List[str]:
    """Path components still to walk, the next one last (a stack)."""
    return [p for p in reversed(text.split("/")) if p not in ("", ".")]


class Held:
    """The chain of directories from ``/`` to the one a walk reached, each held open.

    ``fd`` is the directory reached; ``keys`` the (st_dev, st_ino) of every directory on the way
    (a ``..`` in a symlink goes back along this chain, not to whatever the kernel would find)."""

    def __init__(self) -> None:
        fd = os.open("/", DIR_FLAGS)
        self.fds = [fd]
        self.names = [""]
        self.keys = [key(os.fstat(fd))]
        self.hops = 0
        self.lexical = "/"  # after a failed walk: where it was going, as a string
        self.entry_key: Optional[Key] = None  # set by a caller that allowed the entry itself

    @property
    def fd(self) -> int:
        return self.fds[-1]

    def path(self) -> str:
        return "/" + "/".join(self.names[1:])

    def inside(self, keys: Set[Key]) -> bool:
        return any(k in keys for k in self.keys)

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())

    def _down(self, name: str) -> None:
        fd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        try:
            self.keys.append(key(os.fstat(fd)))
        except BaseException:
            os.close(fd)
            raise
        self.fds.append(fd)
        self.names.append(name)

    def _up(self) -> None:
        if len(self.fds) > 1:
            os.close(self.fds.pop())
            self.names.pop()
            self.keys.pop()

    def _link(self, name: str) -> Optional[List[str]]:
        """The components ``name`` points to if it is a symlink (the walk moves to ``/`` for an
        absolute one), else None."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return None
        if not stat.S_ISLNK(st.st_mode):
            return None
        self.hops += 1
        if self.hops > MAX_HOPS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
        text = os.readlink(name, dir_fd=self.fd)
        if text.startswith("/"):
            while len(self.fds) > 1:
                self._up()
        return _parts(text)

    def walk(self, text: str, follow_last: bool = False) -> str:
        """Walk ``text`` (relative to the held directory, or absolute) and return its last
        component, its directory held; ``follow_last`` resolves a final symlink too. A path that
        ends on a directory (``/``, a link to ``..``) returns ``"."`` at ``/``, else the
        directory's name, its parent held."""
        todo = _parts(text)
        if text.startswith("/"):
            while len(self.fds) > 1:
                self._up()
        name = ""
        try:
            while todo:
                name = todo.pop()
                if name == "..":
                    self._up()
                    continue
                if not todo:
                    more = self._link(name) if follow_last else None
                    if more is None:
                        return name
                    todo = more
                    continue
                try:
                    self._down(name)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    more = self._link(name)
                    if more is None:
                        raise
                    todo.extend(more)
        except OSError:
            self.lexical = os.path.join(self.path(), name, *reversed(todo))
            raise
        if len(self.fds) == 1:
            return "."
        name = self.names[-1]
        self._up()
        return name

    def lstat(self, name: str) -> Optional[os.stat_result]:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
