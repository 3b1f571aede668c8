"""File transfer and file-system ops of the agent (docs/protocol.md, *Data channel*).

Design: the loop thread validates a ``transfer.open`` request (policy roots, path, space,
permissions) synchronously, opens the data port (non-blocking, stale bytes drained), answers the
EVENT ``ready`` and starts ONE worker thread that runs the copy engine (``guestlink.filecopy.engine``) on the
port; the engine's own pipeline threads overlap port I/O, file I/O and hashing. The loop never
touches the data port while a worker owns it, so control stays responsive. The worker posts its
outcome back through the agent's result queue and self-pipe; the loop then closes the data port
and sends the final RESPONSE / ERROR. One transfer at a time (the port is one byte stream);
another ``transfer.open`` meanwhile gets ERROR ``busy`` (the host library queues per VM).
"""
import contextlib
import errno
import logging
import os
import queue
import secrets
import stat
import threading
import time
from typing import Any, Dict, Generator, Iterator, List, Optional, Tuple, Union

from ..protocol import Fields, ProtocolViolation, codes
from ..protocol import transfer as T
from ..filecopy import commit
from ..filecopy import engine as CE
from . import dirfd
from .execs import OpError
from .ports import PortAbsent, PortBusy, UnixPort, VirtioPort

log = logging.getLogger("guestlink.agent")

FILE_OPS = ("transfer.open", "fs.stat", "fs.list", "fs.mkdir", "fs.symlink", "fs.setattr",
            "fs.remove")
HOST_WAIT = 10.0  # seconds the worker waits for the host to connect to the data port
LIST_PAGE = 2000
MAX_LISTINGS = 4
LIST_DEPTH = 256  # directories deep: a walk holds one fd per level (RLIMIT_NOFILE is ~1024)
ACK_TIMEOUT = 30.0
ID_MAX = 2 ** 32 - 2  # the largest uid/gid: 2**32-1 is (uid_t)-1, "leave unchanged"


def _oserror(exc: OSError, what: str) -> OpError:
    return OpError(codes.errno_to_code(exc.errno or 0), "%s: %s" % (what, exc.strerror or exc))


def _path_arg(args: Fields, key: str = "path") -> str:
    path = args.str(key)
    if not path.startswith("/") or "\0" in path:
        raise OpError(codes.BAD_REQUEST, "%s must be an absolute guest path" % key)
    return os.path.normpath(path)


def _under(real: str, roots: List[str]) -> bool:
    for root in roots:
        r = os.path.realpath(root)
        if r == "/" or real == r or real.startswith(r + "/"):
            return True
    return False


def _describe(st: os.stat_result, target: Optional[str] = None) -> Dict[str, Any]:
    mode = st.st_mode
    kind = ("dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode)
            else "symlink" if stat.S_ISLNK(mode) else "other")
    out = {"type": kind, "size": st.st_size, "mode": stat.S_IMODE(mode), "mtime_ns": st.st_mtime_ns,
           "uid": st.st_uid, "gid": st.st_gid}
    if target is not None:
        out["target"] = target
    return out


_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _walk_tree(fd: int, root: str) -> Generator[Dict[str, Any], None, None]:
    """Yield the entries under the directory ``fd`` (``root``; the walk owns and closes the fd)
    described, with their relative ``path``, in pre-order, names sorted, symlinks not followed;
    entries that vanish meanwhile are skipped. Each directory is entered by its fd, never by a
    path another user could redirect meanwhile."""
    stack: List[Tuple[int, Iterator[str], str]] = []
    try:
        try:
            stack.append((fd, iter(sorted(os.listdir(fd))), ""))
        except OSError as exc:
            os.close(fd)
            raise _oserror(exc, root)
        while stack:
            dfd, names, rel = stack[-1]
            name = next(names, None)
            if name is None:
                os.close(stack.pop()[0])
                continue
            path = rel + "/" + name if rel else name
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                target = os.readlink(name, dir_fd=dfd) if stat.S_ISLNK(st.st_mode) else None
            except OSError:
                continue
            d = _describe(st, target)
            d["path"] = path
            yield d
            if not stat.S_ISDIR(st.st_mode):
                continue
            if len(stack) > LIST_DEPTH:
                raise OpError(codes.TOO_LARGE, "%s/%s: directories nested more than %d deep"
                              % (root, path, LIST_DEPTH))
            try:
                cfd = os.open(name, _LIST_FLAGS, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    continue  # gone or replaced since it was described
                raise _oserror(exc, os.path.join(root, path))
            try:
                if dirfd.key(os.fstat(cfd)) != dirfd.key(st):
                    os.close(cfd)  # another directory renamed into its place
                    continue
                children = iter(sorted(os.listdir(cfd)))
            except OSError as exc:
                os.close(cfd)
                raise _oserror(exc, os.path.join(root, path))
            stack.append((cfd, children, path))
    finally:
        for entry in stack:
            os.close(entry[0])


class Transfer:
    def __init__(self, manager: "FileOps", session: Any, rid: int, tid: int,
                 direction: str) -> None:
        self.manager = manager
        self.session = session
        self.rid = rid
        self.tid = tid
        self.direction = direction
        self.nonce = secrets.token_hex(16)
        self.cancel = threading.Event()
        self.keep_partial = False  # set when the host went away (resume later)
        self.discard = False  # set by a host CANCEL: the temp file goes, whatever the worker saw
        self.replied = False
        self.port: Any = None  # UnixPort or VirtioPort, while the transfer has it open
        self.started = time.monotonic()
        # the file in flight (set before the data port is used; None until then):
        self.final: Any = None  # its guest path (str)
        self.dir: Any = None  # push: dirfd.Held, the directory it is received in
        self.name: Any = None  # push: its name there (str)
        self.partial: Optional[str] = None  # push: the name of its temp file there
        self.fd: Any = None  # its open file (int)
        self.offset = 0
        self.size: Optional[int] = None
        self.algorithm = T.DEFAULT_ALGORITHM
        self.attrs: Dict[str, Any] = {}
        self.corrupt_at: Optional[int] = None
        # the files, in turn (a single file: a batch of one): push [{"final", "partial",
        # "offset", "size", "attrs"}], pull [{"final", "offset", "size", "mtime_ns"}]
        self.batch: List[Dict[str, Any]] = []
        self.single = True  # asked for as one file (its own request form), not "files"


class FileOps:
    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.config = agent.config
        self.active: Optional[Transfer] = None  # the Transfer owning the data port
        # One long-lived worker thread runs the transfers (one at a time: `active`): starting a
        # thread per transfer cost ~1 ms of a ~10 ms small-file copy under TCG.
        self._jobs: "queue.SimpleQueue[Transfer]" = queue.SimpleQueue()
        self._worker: Optional[threading.Thread] = None
        # (id(session), path, next start) -> (session, its fs.list walk)
        self._listings: Dict[Tuple[int, str, int], Tuple[Any, Any]] = {}

    # -- policy -----------------------------------------------------------------------------

    def _held(self, path: str, write: bool, follow_last: bool = False) -> Tuple[dirfd.Held, str]:
        """Walk ``path`` to its directory (held open) and last component, and check that the
        directory walked to is inside the policy roots (or that the entry is a root itself).
        Raises OpError(denied), or the OSError of the walk for the caller to word."""
        roots = self.config.write_roots if write else self.config.read_roots
        keys = dirfd.root_keys(roots)
        held = dirfd.Held()
        try:
            try:
                name = held.walk(path, follow_last)
            except OSError:
                # where the walk stopped decides which error the user sees: "denied" only when
                # the path could not be inside the roots, as with the realpath check before
                if held.inside(keys) or _under(held.lexical, roots):
                    raise
                raise self._denied(path, write)
            if held.inside(keys):
                return held, name
            st = held.lstat(name)
            if st is not None and dirfd.key(st) in keys:
                held.entry_key = dirfd.key(st)
                return held, name
            raise self._denied(path, write)
        except BaseException:
            held.close()
            raise

    def _denied(self, path: str, write: bool) -> OpError:
        if write:
            return OpError(codes.DENIED, "writing %s is denied by the agent's policy (write_roots = "
                           "%s)" % (path, " ".join(self.config.write_roots)))
        return OpError(codes.DENIED, "reading %s is denied by the agent's policy (read_roots = %s)"
                       % (path, " ".join(self.config.read_roots)))

    @contextlib.contextmanager
    def _at(self, path: str, write: bool, follow_last: bool = False
            ) -> Iterator[Tuple[dirfd.Held, str]]:
        """``_held`` for the duration of a ``with``; an OSError in it is reported on ``path``."""
        try:
            held, name = self._held(path, write, follow_last)
        except OSError as exc:
            raise _oserror(exc, path)
        try:
            yield held, name
        except OSError as exc:
            raise _oserror(exc, path)
        finally:
            held.close()

    def _opened_inside(self, held: dirfd.Held, fd: int, path: str, write: bool) -> None:
        """After opening the entry a root allowed (``_held``): is it still that root?"""
        if held.entry_key is not None and dirfd.key(os.fstat(fd)) != held.entry_key:
            os.close(fd)
            raise self._denied(path, write)

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, rid: int, op: str, args: Fields) -> Optional[Dict[str, Any]]:
        return getattr(self, "op_" + op.replace(".", "_"))(rid, args)

    # -- fs ops (quick, run in the loop) ---------------------------------------------------------
    # Each works relative to the directory its path was walked to (dirfd.Held), never by path.

    def op_fs_stat(self, rid: int, args: Fields) -> Dict[str, Any]:
        path = _path_arg(args)
        follow = args.bool("follow", default=True)
        with self._at(path, write=False, follow_last=follow) as (held, name):
            st = os.stat(name, dir_fd=held.fd, follow_symlinks=False)
            target = os.readlink(name, dir_fd=held.fd) if stat.S_ISLNK(st.st_mode) else None
        return _describe(st, target)

    def op_fs_list(self, rid: int, args: Fields) -> Dict[str, Any]:
        """Recursive listing, pre-order (a directory before its contents), symlinks not followed;
        paged: ``start`` index, at most LIST_PAGE entries, ``next`` index or null.

        The walk of the page that asked for ``next`` is kept (a few per agent), so the following
        page continues it instead of walking the tree again from the start."""
        path = _path_arg(args)
        start = args.int("start", default=0, min=0)
        session = self.agent.session
        kept = self._listings.pop((id(session), path, start), None)
        walk = kept[1] if kept is not None and kept[0] is session else None
        if kept is not None and walk is None:
            kept[1].close()
        if walk is None:
            walk = _walk_tree(self._open_list_root(path), path)
            for _ in zip(range(start), walk):
                pass
        entries = []
        for entry in walk:
            entries.append(entry)
            if len(entries) == LIST_PAGE:
                break
        if len(entries) < LIST_PAGE:
            walk.close()
            return {"entries": entries, "next": None}
        nxt = start + LIST_PAGE
        while len(self._listings) >= MAX_LISTINGS:
            self._listings.pop(next(iter(self._listings)))[1].close()  # the oldest: its fds go
        self._listings[(id(session), path, nxt)] = (session, walk)
        return {"entries": entries, "next": nxt}

    def _open_list_root(self, path: str) -> int:
        with self._at(path, write=False, follow_last=True) as (held, name):
            try:
                fd = os.open(name, _LIST_FLAGS, dir_fd=held.fd)
            except NotADirectoryError:
                raise OpError(codes.NOT_A_DIRECTORY, "%s is not a directory" % path)
            self._opened_inside(held, fd, path, write=False)
        return fd

    def op_fs_mkdir(self, rid: int, args: Fields) -> Dict[str, Any]:
        path = _path_arg(args)
        mode = args.int("mode", default=0o755, min=0, max=0o7777)
        with self._at(path, write=True) as (held, name):
            try:
                os.mkdir(name, mode, dir_fd=held.fd)
            except FileExistsError:
                st = held.lstat(name)
                if st is None or not stat.S_ISDIR(st.st_mode):
                    raise OpError(codes.EXISTS, "%s exists and is not a directory" % path)
        return {}

    def op_fs_symlink(self, rid: int, args: Fields) -> Dict[str, Any]:
        path = _path_arg(args)
        target = args.str("target")
        with self._at(path, write=True) as (held, name):
            if held.lstat(name) is not None:
                try:  # a directory, or a link to one, stays (and the symlink fails: exists)
                    keep = stat.S_ISDIR(os.stat(name, dir_fd=held.fd).st_mode)
                except OSError:
                    keep = False
                if not keep:
                    os.unlink(name, dir_fd=held.fd)
            os.symlink(target, name, dir_fd=held.fd)
        return {}

    def op_fs_setattr(self, rid: int, args: Fields) -> Dict[str, Any]:
        path = _path_arg(args)
        mode = args.int("mode", default=None, min=0, max=0o7777)
        mtime_ns = args.int("mtime_ns", default=None)
        uid = args.int("uid", default=None, min=0, max=ID_MAX)
        gid = args.int("gid", default=None, min=0, max=ID_MAX)
        with self._at(path, write=True) as (held, name):
            _set_attrs(held.fd, name, mode, mtime_ns, uid, gid)
        return {}

    def op_fs_remove(self, rid: int, args: Fields) -> Dict[str, Any]:
        path = _path_arg(args)
        try:
            with self._at(path, write=True) as (held, name):
                st = held.lstat(name)
                if st is None:
                    return {"removed": False}
                if stat.S_ISDIR(st.st_mode):
                    raise OpError(codes.IS_A_DIRECTORY, "%s is a directory" % path)
                os.unlink(name, dir_fd=held.fd)
        except OpError as exc:
            if exc.code == codes.NOT_FOUND:  # its directory is missing, or it just went
                return {"removed": False}
            raise
        return {"removed": True}

    # -- transfer.open ----------------------------------------------------------------------

    def op_transfer_open(self, rid: int, args: Fields) -> None:
        session = self.agent.session
        if self.active is not None:
            raise OpError(codes.BUSY, "the data port is busy with another transfer")
        direction = args.str("direction", max_len=8)
        if direction not in ("push", "pull"):
            raise OpError(codes.BAD_REQUEST, "direction must be push or pull")
        tid = args.int("transfer", min=1, max=T.MAX_TID)
        tr = Transfer(self, session, rid, tid, direction)
        tr.algorithm = args.str("checksum", default=T.DEFAULT_ALGORITHM, max_len=16)
        if tr.algorithm not in T.ALGORITHMS:
            raise OpError(codes.BAD_REQUEST, "checksum must be one of %s" % ", ".join(T.ALGORITHMS))
        corrupt = args.int("test_corrupt", default=None, min=0)
        if corrupt is not None and self.config.test_hooks:
            tr.corrupt_at = corrupt
        # a single file (the request's own "path") is a batch of one; the form of the request
        # decides only the form of the ready event, the reply and the errors
        tr.single = args.obj.get("files") is None
        try:
            if direction == "push":
                event = self._prepare_push(tr, args)
            else:
                event = self._prepare_pull(tr, args)
        except BaseException:
            self._release(tr)
            raise
        try:
            self._open_port(tr)
        except BaseException:
            self._cleanup_files(tr, failed=True)
            self._release(tr)
            raise
        self.active = tr
        session.transfers[rid] = tr
        event.update({"event": "ready", "transfer": tid, "nonce": tr.nonce})
        self.agent.send_event(rid, event)
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._run_jobs, name="guestlink-transfer",
                                            daemon=True)
            self._worker.start()
        self._jobs.put(tr)
        log.info("transfer %d (%s %s): started at offset %d", tid, direction, tr.final, tr.offset)
        return None

    def _prepare_push(self, tr: Transfer, args: Fields) -> Dict[str, Any]:
        """Check each file to receive now; they come in turn on one opening of the data port,
        transfer id ``tid + i`` for the i-th (docs/protocol.md). A single file's directory is
        held and its temp file opened now; a batch's are walked to again when their turn comes
        (holding a directory per file would take up to MAX_BATCH fds)."""
        resume = args.bool("resume", default=False)
        preserve = args.bool("preserve", default=False)
        optional = {"default": None} if tr.single else {}  # a single file may be a stream
        batch: List[Dict[str, Any]] = []
        need: Dict[int, int] = {}  # per file system (st_dev): bytes to write
        free: Dict[int, Tuple[str, Optional[int]]] = {}  # and a path there, its free space
        for f, path in self._file_entries(tr, args):
            try:
                size = f.int("size", min=0, **optional)
                mtime_ns = f.int("mtime_ns", **optional)
                attrs = {"mode": f.int("mode", default=None, min=0, max=0o7777),
                         "mtime_ns": mtime_ns if preserve else None,
                         "uid": f.int("uid", default=None, min=0, max=ID_MAX),
                         "gid": f.int("gid", default=None, min=0, max=ID_MAX), "preserve": preserve}
            except ProtocolViolation as exc:
                raise OpError(codes.BAD_REQUEST, str(exc))
            held, name = self._push_target(path)
            try:
                partial, offset = _push_partial(held, path, size, mtime_ns, tr.algorithm, resume)
                dev = held.keys[-1][0]
                if dev not in free:
                    free[dev] = (os.path.dirname(path), _free_space(held.fd))
            except BaseException:
                held.close()
                raise
            if tr.single:
                tr.dir, tr.name = held, name
            else:
                held.close()
            if size is not None:
                need[dev] = need.get(dev, 0) + size - offset
            batch.append({"final": path, "partial": partial, "offset": offset, "size": size,
                          "attrs": attrs})
        for dev, nbytes in need.items():
            _check_space(free[dev][0], nbytes, free[dev][1])
        tr.batch = batch
        tr.final, tr.offset = batch[0]["final"], batch[0]["offset"]
        if tr.single:
            tr.partial = batch[0]["partial"]
            tr.fd = _open_partial(tr.dir, tr.partial, tr.offset, tr.final)
            return {"path": tr.final, "offset": tr.offset}
        return {"path": tr.final, "offset": tr.offset, "offsets": [b["offset"] for b in batch]}

    def _file_entries(self, tr: Transfer, args: Fields) -> List[Tuple[Fields, str]]:
        """(fields, guest path) of each file of the request: its "files", or the request itself.
        A single push to a directory goes to the file ``name`` in it."""
        if not tr.single:
            return list(self._batch_entries(args))
        path = _path_arg(args)
        if tr.direction == "push" and os.path.isdir(path):
            # only picks the name: the walk checks the one picked
            name = args.str("name", default=None, max_len=255)
            if not name or "/" in name or name in (".", ".."):
                raise OpError(codes.IS_A_DIRECTORY, "%s is a directory" % path)
            path = os.path.join(path, name)
        return [(args, path)]

    def _batch_entries(self, args: Fields) -> Iterator[Tuple[Fields, str]]:
        files = args.obj.get("files")
        if not isinstance(files, list) or not 1 <= len(files) <= T.MAX_BATCH:
            raise OpError(codes.BAD_REQUEST, "files must be a list of 1 to %d files" % T.MAX_BATCH)
        seen = set()
        for i, obj in enumerate(files):
            try:
                f = Fields(obj, "files[%d]" % i)
                path = _path_arg(f)
            except ProtocolViolation as exc:
                raise OpError(codes.BAD_REQUEST, str(exc))
            if path in seen:
                raise OpError(codes.BAD_REQUEST, "%s is named twice" % path)
            seen.add(path)
            yield f, path

    def _prepare_pull(self, tr: Transfer, args: Fields) -> Dict[str, Any]:
        """Check each file to send now (policy, type, unchanged since the host examined it); they
        go in turn on one opening of the data port (docs/protocol.md). A single file stays open
        from now on; a batch's are opened again when their turn comes."""
        optional = {"default": None} if tr.single else {}  # a single file's are checks if given
        batch = []
        for f, path in self._file_entries(tr, args):
            try:
                size = f.int("size", min=0, **optional)
                mtime_ns = f.int("mtime_ns", **optional)
                offset = f.int("offset", default=0, min=0)
            except ProtocolViolation as exc:
                raise OpError(codes.BAD_REQUEST, str(exc))
            fd, st = self._open_source(path)
            try:
                if ((size is not None and size != st.st_size)
                        or (mtime_ns is not None and mtime_ns != st.st_mtime_ns)):
                    raise OpError(codes.CHANGED, "%s changed since it was examined" % path)
                if offset > st.st_size:
                    raise OpError(codes.CHANGED, "resume offset %d is beyond the end of %s"
                                  % (offset, path))
            except BaseException:
                os.close(fd)
                raise
            if tr.single:
                tr.fd = fd
                ready = _describe(st)
                ready.pop("type")
            else:
                os.close(fd)
            batch.append({"final": path, "offset": offset, "size": st.st_size,
                          "mtime_ns": st.st_mtime_ns})
        tr.batch = batch
        tr.final, tr.offset, tr.size = batch[0]["final"], batch[0]["offset"], batch[0]["size"]
        if tr.single:
            ready.update({"path": tr.final, "offset": tr.offset})
            return ready
        return {"path": tr.final, "offset": tr.offset}

    def _send_files(self, tr: Transfer, chan: CE.Channel) -> Dict[str, Any]:
        """Send the files in turn; the host acknowledges the last one. A file that cannot be
        read or changed ends the transfer with an error naming it (its DATA_END says why)."""
        done: List[Dict[str, Any]] = []
        for i, item in enumerate(tr.batch):
            tr.final, tr.offset, tr.size = item["final"], item["offset"], item["size"]
            sub = T.batch_tid(tr.tid, i)
            log.debug("transfer %d: file %d of %d, %s from offset %d", tr.tid, i + 1,
                      len(tr.batch), tr.final, tr.offset)
            opened = tr.fd is None  # a single file's is open since transfer.open, until the end
            try:
                if opened:
                    tr.fd = self._open_source(tr.final)[0]
                # as examined: checked before the first byte and after the last
                check = commit.unchanged_check(tr.fd, item["size"], item["mtime_ns"],
                                               "%s changed while it was being sent" % tr.final)
                check()
                os.lseek(tr.fd, tr.offset, os.SEEK_SET)
                size, digest = CE.send_file(chan, tr.fd, sub, tr.algorithm, tr.offset, tr.size,
                                            check=check, corrupt_at=tr.corrupt_at)
            except (OSError, OpError, CE.TransferError) as exc:
                err = _transfer_error(exc, tr.final)
                if not err.interrupted:
                    try:  # the host's receiver learns why on the data port too
                        chan.write_all([T.encode_end_error(sub, err.code, str(err))])
                    except CE.TransferError:
                        pass
                raise self._file_error(tr, exc, len(done))
            finally:
                if opened and tr.fd is not None:
                    os.close(tr.fd)
                    tr.fd = None
            done.append({"path": tr.final, "size": size, "digest": digest, "offset": tr.offset})
        chan.idle_timeout = ACK_TIMEOUT
        CE.wait_ack(chan, T.batch_tid(tr.tid, len(tr.batch) - 1))
        return self._result(tr, done)

    @staticmethod
    def _file_error(tr: Transfer, exc: Union[OSError, OpError, CE.TransferError],
                    ndone: int) -> Exception:
        """The error that ends a transfer at one of its files: a batch's names the file and
        counts the files done before it; a single file's is reported as it is (by _work)."""
        if tr.single:
            return exc
        err = _transfer_error(exc, tr.final)
        err.done = ndone
        return err

    @staticmethod
    def _result(tr: Transfer, done: List[Dict[str, Any]]) -> Dict[str, Any]:
        """The reply: totals (a single file's own), and for a batch each file's."""
        result = {"path": tr.batch[0]["final"], "size": sum(d["size"] for d in done),
                  "digest": done[-1]["digest"], "algorithm": tr.algorithm,
                  "offset": tr.batch[0]["offset"]}
        if not tr.single:
            result["files"] = done
        return result

    def _push_target(self, path: str) -> Tuple[dirfd.Held, str]:
        """Walk to the directory ``path`` is written in and check that it may be: (held, name)."""
        parent = os.path.dirname(path)
        try:
            held, name = self._held(path, write=True)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise OpError(codes.NOT_FOUND, "directory %s does not exist" % parent)
            if exc.errno == errno.ENOTDIR:
                raise OpError(codes.NOT_A_DIRECTORY, "%s is not a directory" % parent)
            raise _oserror(exc, parent)
        try:
            try:  # a link to a directory counts as one: the rename would replace the link
                isdir = stat.S_ISDIR(os.stat(name, dir_fd=held.fd).st_mode)
            except OSError:
                isdir = False
            if isdir:
                raise OpError(codes.IS_A_DIRECTORY, "%s is a directory" % path)
            if not os.access(".", os.W_OK | os.X_OK, dir_fd=held.fd):
                raise OpError(codes.PERMISSION_DENIED, "permission denied: cannot write in %s"
                              % parent)
        except BaseException:
            held.close()
            raise
        return held, name

    def _open_source(self, path: str) -> Tuple[int, os.stat_result]:
        """Open the regular file ``path`` to be read (policy checked): (fd, its stat)."""
        with self._at(path, write=False, follow_last=True) as (held, name):
            # O_NONBLOCK: a FIFO swapped in must not hang the agent in open()
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=held.fd)
            self._opened_inside(held, fd, path, write=False)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise OpError(codes.IS_A_DIRECTORY, "%s is a directory" % path)
            if not stat.S_ISREG(st.st_mode):
                raise OpError(codes.BAD_REQUEST, "%s is not a regular file" % path)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def _open_port(self, tr: Transfer) -> None:
        device = self.config.data_device
        port: Union[UnixPort, VirtioPort]
        if device.startswith("unix:"):
            port = UnixPort(device[5:])
        else:
            port = VirtioPort(self.config.data_name, device=device or None, modprobe=False)
        try:
            port.open()
        except PortAbsent as exc:
            raise OpError(codes.NOT_FOUND, "the data port is not available: %s" % exc)
        except PortBusy as exc:
            raise OpError(codes.BUSY, str(exc))
        except OSError as exc:
            raise _oserror(exc, "opening the data port")
        # drain stale bytes (an aborted earlier transfer); the hello scan drops any later ones
        buf = bytearray(65536)
        for _ in range(4096):
            try:
                if not port.read_into(buf):
                    break
            except (BlockingIOError, OSError):
                break
        tr.port = port

    # -- the worker -----------------------------------------------------------------------------

    def _run_jobs(self) -> None:
        while True:
            self._work(self._jobs.get())

    def _wait_host(self, tr: Transfer) -> None:
        deadline = time.monotonic() + HOST_WAIT
        while not tr.port.host_present():
            if tr.cancel.is_set():
                raise CE.cancelled()
            if time.monotonic() > deadline:
                raise CE.TransferError(codes.TIMEOUT, "the host did not connect to the data port",
                                       interrupted=True)
            time.sleep(0.02)

    def _work(self, tr: Transfer) -> None:
        result = None
        err = None
        try:
            self._wait_host(tr)
            chan = CE.Channel(tr.port.fd, tr.cancel, what="the data port")
            chan.write_all([T.encode_hello(tr.tid, tr.nonce, "agent")])
            if tr.direction == "push":
                chan.wait_hello(tr.tid, tr.nonce, "host")
                result = self._receive_files(tr, chan)
            else:
                result = self._send_files(tr, chan)
            result["seconds"] = round(time.monotonic() - tr.started, 6)
        except CE.TransferError as exc:
            err = exc
            if exc.interrupted:
                tr.keep_partial = True
            elif exc.code == codes.CHANGED and tr.final not in str(exc):  # say which file
                err = CE.TransferError(exc.code, "%s: %s" % (tr.final, exc))
        except (OSError, OpError) as exc:
            err = _transfer_error(exc, tr.final)
        except Exception as exc:  # a bug: report it, keep the agent alive
            log.exception("transfer %d failed", tr.tid)
            err = CE.TransferError(codes.INTERNAL, "internal error: %s" % exc)
        if tr.cancel.is_set() and err is None:
            pass  # finished just as it was cancelled: the result stands
        self._cleanup_files(tr, failed=err is not None)
        self.agent.post_result(("transfer",), (tr, result, err))

    def _receive_files(self, tr: Transfer, chan: CE.Channel) -> Dict[str, Any]:
        """Receive the files in turn, each into its temp file, verified and committed before the
        next: a failure names its file and ends the transfer; the files before it stay."""
        done: List[Dict[str, Any]] = []
        for i, item in enumerate(tr.batch):
            tr.final, tr.partial, tr.offset = item["final"], item["partial"], item["offset"]
            tr.size, tr.attrs = item["size"], item["attrs"]
            log.debug("transfer %d: file %d of %d, %s from offset %d", tr.tid, i + 1,
                      len(tr.batch), tr.final, tr.offset)
            try:
                if tr.fd is None:  # a single file's is open since transfer.open
                    self._release(tr)  # the directory of the file before
                    tr.dir, tr.name = self._push_target(tr.final)
                    tr.fd = _open_partial(tr.dir, tr.partial, tr.offset, tr.final)
                size, digest = CE.recv_file(chan, tr.fd, T.batch_tid(tr.tid, i), tr.algorithm,
                                            tr.offset, tr.size, corrupt_at=tr.corrupt_at)
            except (OSError, OpError, CE.TransferError) as exc:
                raise self._file_error(tr, exc, len(done))
            self._finish_push(tr)
            done.append({"path": tr.final, "size": size, "digest": digest, "offset": tr.offset})
        return self._result(tr, done)

    def _finish_push(self, tr: Transfer) -> None:
        fd, tr.fd = tr.fd, None
        a = tr.attrs
        preserve = a["preserve"]
        if a["mode"] is not None and preserve:
            mode = a["mode"]
        else:
            mode = commit.kept_mode(commit.existing(tr.dir.fd, tr.name))
        try:
            assert tr.partial is not None  # the file in flight has one
            commit.commit(fd, tr.dir.fd, tr.partial, tr.name, commit.Attrs(
                mode, mtime_ns=a["mtime_ns"], uid=a["uid"] if preserve else None,
                gid=a["gid"] if preserve else None))
        finally:
            os.close(fd)
        tr.partial = None

    def _cleanup_files(self, tr: Transfer, failed: bool) -> None:
        if tr.fd is not None:
            try:
                if tr.direction == "push" and tr.keep_partial:
                    os.fsync(tr.fd)
                os.close(tr.fd)
            except OSError:
                pass
            tr.fd = None
        if failed and (tr.discard or not tr.keep_partial):
            self._drop_partial(tr)

    @staticmethod
    def _drop_partial(tr: Transfer) -> None:
        if tr.direction == "push" and tr.partial and tr.dir is not None:
            commit.drop_partial(tr.dir.fd, tr.partial)

    @staticmethod
    def _release(tr: Transfer) -> None:
        if tr.dir is not None:
            tr.dir.close()
            tr.dir = None

    # -- loop side ----------------------------------------------------------------------------

    def finished(self, tr: Transfer, result: Optional[Dict[str, Any]],
                 err: Optional[CE.TransferError]) -> None:
        """In the loop: the worker is done; close the port and reply (unless already replied)."""
        if tr.port is not None:
            tr.port.close()
            tr.port = None
        if err is not None and tr.discard:
            # a CANCEL that came while the worker was failing for another reason (the host closes
            # its data socket right after cancelling: "the peer went away") still drops the file
            self._drop_partial(tr)
        self._release(tr)
        if self.active is tr:
            self.active = None
        agent = self.agent
        if tr.replied or agent.session is not tr.session or tr.session.transfers.get(tr.rid) is not tr:
            log.info("transfer %d ended after it was cancelled (%s)", tr.tid, err or "completed")
            return
        del tr.session.transfers[tr.rid]
        tr.replied = True
        if err is None:
            assert result is not None  # the worker gives one or the other
            log.info("transfer %d done: %d bytes, %s %s", tr.tid, result["size"], tr.algorithm,
                     result["digest"])
            agent.reply(tr.rid, result)
        else:
            log.warning("transfer %d failed: %s", tr.tid, err)
            details: Dict[str, Any] = {"interrupted": err.interrupted}
            if err.done is not None:
                details["done"] = err.done  # batch: files completed before this failure
            agent.error(tr.rid, err.code, str(err), details)

    def cancel(self, tr: Transfer, reason: str, keep_partial: bool) -> None:
        tr.keep_partial = keep_partial
        tr.discard = not keep_partial
        tr.cancel.set()
        tr.replied = True
        log.info("transfer %d cancelled (%s)", tr.tid, reason)


def _transfer_error(exc: Union[OSError, OpError, CE.TransferError], final: str) -> CE.TransferError:
    """An error of the worker (OSError, OpError or TransferError) as a TransferError naming
    ``final``."""
    if isinstance(exc, OSError):
        return CE.TransferError(codes.errno_to_code(exc.errno or 0), "%s: %s" % (
            final, exc.strerror or exc))
    interrupted = getattr(exc, "interrupted", False)
    if final in str(exc):
        return exc if isinstance(exc, CE.TransferError) else CE.TransferError(
            exc.code, str(exc), interrupted)
    return CE.TransferError(exc.code, "%s: %s" % (final, exc), interrupted)


def _push_partial(held: dirfd.Held, path: str, size: Optional[int], mtime_ns: Optional[int],
                  algorithm: str, resume: bool) -> Tuple[str, int]:
    """The name of the temp file for ``path`` (in ``held``) and the verified prefix it holds
    (0 unless resuming one of the agent's own)."""
    if size is not None and mtime_ns is not None:
        partial = T.partial_name(path, size, mtime_ns, algorithm)
    else:
        partial = "%s%s%s" % (T.PARTIAL_PREFIX, secrets.token_hex(12), T.PARTIAL_SUFFIX)
    return partial, (commit.resume_offset(held.fd, partial, size) if resume else 0)


def _open_partial(held: dirfd.Held, partial: str, offset: int, final: str) -> int:
    """commit.open_partial, its failures as OpErrors naming the temp file."""
    where = os.path.join(os.path.dirname(final), partial)
    try:
        return commit.open_partial(held.fd, partial, offset)
    except commit.PartialReplaced:
        raise OpError(codes.CHANGED, "%s was replaced since the transfer was opened" % where)
    except OSError as exc:
        raise _oserror(exc, where)


def _free_space(fd: int) -> Optional[int]:
    try:
        vfs = os.fstatvfs(fd)
    except OSError:
        return None
    return vfs.f_bavail * vfs.f_frsize


def _check_space(where: str, nbytes: int, free: Optional[int]) -> None:
    if free is not None and nbytes > free:
        raise OpError(codes.NO_SPACE, "not enough space in %s: %d bytes needed, %d free"
                      % (where, nbytes, free))


# regular files and directories are opened to set their attributes through the fd; opening one
# for reading has no side effect (O_NONBLOCK: a FIFO swapped in meanwhile does not block)
_ATTR_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_PATH = getattr(os, "O_PATH", 0)


def _set_attrs(dfd: int, name: str, mode: Optional[int], mtime_ns: Optional[int],
               uid: Optional[int], gid: Optional[int]) -> None:
    """Set the attributes of ``name`` in the directory ``dfd`` without following a symlink, even
    one swapped in meanwhile: every change is made on an fd opened O_NOFOLLOW, never by path. A
    symlink itself gets its owner and time (there is no mode of a link to set)."""
    ids = (-1 if uid is None else uid, -1 if gid is None else gid)
    chown = (uid is not None or gid is not None) and os.geteuid() == 0
    for _ in range(2):
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            if chown:
                os.chown(name, *ids, dir_fd=dfd, follow_symlinks=False)
            if mtime_ns is not None and os.utime in os.supports_follow_symlinks:
                os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=dfd, follow_symlinks=False)
            return
        fd = None
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            try:
                fd = os.open(name, _ATTR_FLAGS, dir_fd=dfd)
            except PermissionError:
                pass  # not readable by the agent (not root): by O_PATH below
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    continue  # swapped for a symlink since the stat: that is what is there
                raise
        target: Union[int, str] = -1 if fd is None else fd
        if fd is None and _O_PATH:
            # devices, FIFOs, sockets are not opened for I/O: an O_PATH fd is set through
            # /proc, which resolves to the very inode the fd holds
            fd = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            target = "/proc/self/fd/%d" % fd
        if fd is None:
            raise OSError(errno.EOPNOTSUPP, "cannot set the attributes of this file type here")
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):  # O_PATH|O_NOFOLLOW holds a swapped-in link
                continue
            if chown:
                os.chown(target, *ids)
            if mode is not None:
                os.chmod(target, mode)
            if mtime_ns is not None:
                os.utime(target, ns=(mtime_ns, mtime_ns))
            return
        finally:
            os.close(fd)
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
