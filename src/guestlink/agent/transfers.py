"""File transfer and file-system ops of the agent (docs/protocol.md, *Data channel*).

Design: the loop thread validates a ``transfer.open`` request (policy roots, path, space,
permissions) synchronously, opens the data port (non-blocking, stale bytes drained), answers the
EVENT ``ready`` and starts ONE worker thread that runs the copy engine (``copyengine``) on the
port; the engine's own pipeline threads overlap port I/O, file I/O and hashing. The loop never
touches the data port while a worker owns it, so control stays responsive. The worker posts its
outcome back through the agent's result queue and self-pipe; the loop then closes the data port
and sends the final RESPONSE / ERROR. One transfer at a time (the port is one byte stream);
another ``transfer.open`` meanwhile gets ERROR ``busy`` (the host library queues per VM).
"""
import errno
import logging
import os
import queue
import secrets
import stat
import threading
import time

from ..protocol import Fields, ProtocolViolation, codes
from ..protocol import transfer as T
from . import copyengine as CE
from .execs import OpError
from .ports import PortAbsent, PortBusy, UnixPort, VirtioPort

log = logging.getLogger("guestlink.agent")

FILE_OPS = ("transfer.open", "fs.stat", "fs.list", "fs.mkdir", "fs.symlink", "fs.setattr",
            "fs.remove")
HOST_WAIT = 10.0  # seconds the worker waits for the host to connect to the data port
LIST_PAGE = 2000
MAX_LISTINGS = 4
ACK_TIMEOUT = 30.0


def _oserror(exc, what):
    return OpError(codes.errno_to_code(exc.errno), "%s: %s" % (what, exc.strerror or exc))


def _path_arg(args, key="path"):
    path = args.str(key)
    if not path.startswith("/") or "\0" in path:
        raise OpError(codes.BAD_REQUEST, "%s must be an absolute guest path" % key)
    return os.path.normpath(path)


def _under(real, roots):
    for root in roots:
        r = os.path.realpath(root)
        if r == "/" or real == r or real.startswith(r + "/"):
            return True
    return False


def _describe(st, target=None):
    mode = st.st_mode
    kind = ("dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode)
            else "symlink" if stat.S_ISLNK(mode) else "other")
    out = {"type": kind, "size": st.st_size, "mode": stat.S_IMODE(mode), "mtime_ns": st.st_mtime_ns,
           "uid": st.st_uid, "gid": st.st_gid}
    if target is not None:
        out["target"] = target
    return out


def _walk_tree(root):
    """Yield the entries under ``root`` (described, with their relative ``path``) in pre-order,
    names sorted, symlinks not followed; entries that vanish meanwhile are skipped."""
    def children(dirpath, rel):
        try:
            names = sorted(os.listdir(dirpath))
        except OSError as exc:
            raise _oserror(exc, dirpath)
        return iter([(os.path.join(dirpath, n), rel + "/" + n if rel else n) for n in names])

    stack = [children(root, "")]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        full, rel = item
        try:
            st = os.lstat(full)
            target = os.readlink(full) if stat.S_ISLNK(st.st_mode) else None
        except OSError:
            continue
        d = _describe(st, target)
        d["path"] = rel
        yield d
        if stat.S_ISDIR(st.st_mode):
            stack.append(children(full, rel))


class Transfer:
    def __init__(self, manager, session, rid, tid, direction):
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
        self.port = None
        self.started = time.monotonic()
        # push
        self.final = None
        self.partial = None
        self.fd = None
        self.offset = 0
        self.size = None
        self.algorithm = T.DEFAULT_ALGORITHM
        self.attrs = {}
        self.corrupt_at = None
        self.src_stat = None
        # several files in one transfer: push [{"final", "partial", "offset", "size", "attrs"}],
        # pull [{"final", "offset", "size", "mtime_ns"}]
        self.batch = None


class FileOps:
    def __init__(self, agent):
        self.agent = agent
        self.config = agent.config
        self.active = None  # the Transfer owning the data port
        # One long-lived worker thread runs the transfers (one at a time: `active`): starting a
        # thread per transfer cost ~1 ms of a ~10 ms small-file copy under TCG.
        self._jobs = queue.SimpleQueue()
        self._worker = None
        self._listings = {}  # (id(session), path, next start) -> (session, its fs.list walk)

    # -- policy -----------------------------------------------------------------------------

    def _check_read(self, path):
        real = os.path.realpath(path)
        if not _under(real, self.config.read_roots):
            raise OpError(codes.DENIED, "reading %s is denied by the agent's policy (read_roots = %s)"
                          % (path, " ".join(self.config.read_roots)))

    def _check_write(self, path):
        real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        if not _under(real, self.config.write_roots):
            raise OpError(codes.DENIED, "writing %s is denied by the agent's policy (write_roots = %s)"
                          % (path, " ".join(self.config.write_roots)))

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, rid, op, args):
        return getattr(self, "op_" + op.replace(".", "_"))(rid, args)

    # -- fs ops (quick, run in the loop) ---------------------------------------------------------

    def op_fs_stat(self, rid, args):
        path = _path_arg(args)
        self._check_read(path)
        follow = args.bool("follow", default=True)
        try:
            st = os.stat(path) if follow else os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
        except OSError as exc:
            raise _oserror(exc, path)
        return _describe(st, target)

    def op_fs_list(self, rid, args):
        """Recursive listing, pre-order (a directory before its contents), symlinks not followed;
        paged: ``start`` index, at most LIST_PAGE entries, ``next`` index or null.

        The walk of the page that asked for ``next`` is kept (a few per agent), so the following
        page continues it instead of walking the tree again from the start."""
        path = _path_arg(args)
        self._check_read(path)
        start = args.int("start", default=0, min=0)
        try:
            if not stat.S_ISDIR(os.stat(path).st_mode):
                raise OpError(codes.NOT_A_DIRECTORY, "%s is not a directory" % path)
        except OSError as exc:
            raise _oserror(exc, path)
        session = self.agent.session
        kept = self._listings.pop((id(session), path, start), None)
        walk = kept[1] if kept is not None and kept[0] is session else None
        if walk is None:
            walk = _walk_tree(path)
            for _ in zip(range(start), walk):
                pass
        entries = []
        for entry in walk:
            entries.append(entry)
            if len(entries) == LIST_PAGE:
                break
        if len(entries) < LIST_PAGE:
            return {"entries": entries, "next": None}
        nxt = start + LIST_PAGE
        while len(self._listings) >= MAX_LISTINGS:
            del self._listings[next(iter(self._listings))]  # the oldest
        self._listings[(id(session), path, nxt)] = (session, walk)
        return {"entries": entries, "next": nxt}

    def op_fs_mkdir(self, rid, args):
        path = _path_arg(args)
        self._check_write(path)
        mode = args.int("mode", default=0o755, min=0, max=0o7777)
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            if not os.path.isdir(path) or os.path.islink(path):
                raise OpError(codes.EXISTS, "%s exists and is not a directory" % path)
        except OSError as exc:
            raise _oserror(exc, path)
        return {}

    def op_fs_symlink(self, rid, args):
        path = _path_arg(args)
        self._check_write(path)
        target = args.str("target")
        try:
            if os.path.lexists(path) and not os.path.isdir(path):
                os.unlink(path)
            os.symlink(target, path)
        except OSError as exc:
            raise _oserror(exc, path)
        return {}

    def op_fs_setattr(self, rid, args):
        path = _path_arg(args)
        self._check_write(path)
        mode = args.int("mode", default=None, min=0, max=0o7777)
        mtime_ns = args.int("mtime_ns", default=None)
        uid = args.int("uid", default=None, min=0)
        gid = args.int("gid", default=None, min=0)
        try:
            _set_attrs(path, mode, mtime_ns, uid, gid, follow=False)
        except OSError as exc:
            raise _oserror(exc, path)
        return {}

    def op_fs_remove(self, rid, args):
        path = _path_arg(args)
        self._check_write(path)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                raise OpError(codes.IS_A_DIRECTORY, "%s is a directory" % path)
            os.unlink(path)
        except FileNotFoundError:
            return {"removed": False}
        except OSError as exc:
            raise _oserror(exc, path)
        return {"removed": True}

    # -- transfer.open ----------------------------------------------------------------------

    def op_transfer_open(self, rid, args):
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
        if direction == "push" and args.obj.get("files") is not None:
            event = self._prepare_push_batch(tr, args)
        elif args.obj.get("files") is not None:
            event = self._prepare_pull_batch(tr, args)
        elif direction == "push":
            event = self._prepare_push(tr, args)
        else:
            event = self._prepare_pull(tr, args)
        try:
            self._open_port(tr)
        except BaseException:
            self._cleanup_files(tr, failed=True)
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

    def _prepare_push(self, tr, args):
        path = _path_arg(args)
        name = args.str("name", default=None, max_len=255)
        size = args.int("size", default=None, min=0)
        resume = args.bool("resume", default=False)
        mtime_ns = args.int("mtime_ns", default=None)
        preserve = args.bool("preserve", default=False)
        tr.attrs = {"mode": args.int("mode", default=None, min=0, max=0o7777),
                    "mtime_ns": mtime_ns if preserve else None,
                    "uid": args.int("uid", default=None, min=0),
                    "gid": args.int("gid", default=None, min=0),
                    "preserve": preserve}
        if os.path.isdir(path):
            if not name or "/" in name or name in (".", ".."):
                raise OpError(codes.IS_A_DIRECTORY, "%s is a directory" % path)
            path = os.path.join(path, name)
        parent = self._push_target(path)
        tr.final = path
        tr.size = size
        tr.partial, tr.offset = self._push_partial(path, size, mtime_ns, tr.algorithm, resume)
        if size is not None:
            self._check_space(parent, size - tr.offset)
        tr.fd = self._open_partial(tr.partial, tr.offset)
        return {"path": path, "offset": tr.offset}

    def _prepare_push_batch(self, tr, args):
        """Several files in one transfer (``cp -r``): each checked now, received in turn on one
        opening of the data port, transfer id ``tid + i`` for the i-th (docs/protocol.md)."""
        resume = args.bool("resume", default=False)
        preserve = args.bool("preserve", default=False)
        batch, need = [], {}
        for f, path in self._batch_entries(args):
            try:
                size = f.int("size", min=0)
                mtime_ns = f.int("mtime_ns")
                attrs = {"mode": f.int("mode", default=None, min=0, max=0o7777),
                         "mtime_ns": mtime_ns if preserve else None,
                         "uid": f.int("uid", default=None, min=0),
                         "gid": f.int("gid", default=None, min=0), "preserve": preserve}
            except ProtocolViolation as exc:
                raise OpError(codes.BAD_REQUEST, str(exc))
            parent = self._push_target(path)
            partial, offset = self._push_partial(path, size, mtime_ns, tr.algorithm, resume)
            need[parent] = need.get(parent, 0) + size - offset
            batch.append({"final": path, "partial": partial, "offset": offset, "size": size,
                          "attrs": attrs})
        for parent, nbytes in need.items():
            self._check_space(parent, nbytes)
        tr.batch = batch
        tr.final = batch[0]["final"]
        return {"path": tr.final, "offset": batch[0]["offset"],
                "offsets": [b["offset"] for b in batch]}

    def _batch_entries(self, args):
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

    def _prepare_pull_batch(self, tr, args):
        """Several files in one pull (``cp -r``): each checked now (policy, type, unchanged since
        the listing), sent in turn on one opening of the data port (docs/protocol.md)."""
        batch = []
        for f, path in self._batch_entries(args):
            try:
                size = f.int("size", min=0)
                mtime_ns = f.int("mtime_ns")
                offset = f.int("offset", default=0, min=0)
            except ProtocolViolation as exc:
                raise OpError(codes.BAD_REQUEST, str(exc))
            self._check_read(path)
            try:
                st = os.stat(path)
            except OSError as exc:
                raise _oserror(exc, path)
            if not stat.S_ISREG(st.st_mode):
                raise OpError(codes.IS_A_DIRECTORY if stat.S_ISDIR(st.st_mode) else codes.BAD_REQUEST,
                              "%s is not a regular file" % path)
            if st.st_size != size or st.st_mtime_ns != mtime_ns:
                raise OpError(codes.CHANGED, "%s changed since it was examined" % path)
            if offset > size:
                raise OpError(codes.CHANGED, "resume offset %d is beyond the end of %s" % (offset, path))
            batch.append({"final": path, "offset": offset, "size": size, "mtime_ns": mtime_ns})
        tr.batch = batch
        tr.final, tr.offset = batch[0]["final"], batch[0]["offset"]
        return {"path": tr.final, "offset": tr.offset}

    def _send_batch(self, tr, chan):
        """Send the batch's files in turn; the host acknowledges the last one. A file that cannot
        be read or changed ends the batch with an error naming it (its DATA_END says why)."""
        done = []
        for i, item in enumerate(tr.batch):
            tr.final, tr.offset, tr.size = item["final"], item["offset"], item["size"]
            sub = T.batch_tid(tr.tid, i)
            log.debug("transfer %d: file %d of %d, %s from offset %d", tr.tid, i + 1,
                      len(tr.batch), tr.final, tr.offset)
            try:
                tr.fd = os.open(tr.final, os.O_RDONLY | os.O_CLOEXEC)

                def check(item=item):  # as listed, before the first byte and after the last
                    st = os.fstat(tr.fd)
                    if (st.st_size, st.st_mtime_ns) != (item["size"], item["mtime_ns"]):
                        raise CE.TransferError(codes.CHANGED, "%s changed while it was being sent"
                                               % tr.final)
                check()
                os.lseek(tr.fd, tr.offset, os.SEEK_SET)
                size, digest = CE.send_file(chan, tr.fd, sub, tr.algorithm, tr.offset, tr.size,
                                            check=check, corrupt_at=tr.corrupt_at)
            except (OSError, CE.TransferError) as exc:
                if isinstance(exc, OSError):
                    exc = CE.TransferError(codes.errno_to_code(exc.errno), "%s: %s" % (
                        tr.final, exc.strerror or exc))
                elif tr.final not in str(exc):
                    exc = CE.TransferError(exc.code, "%s: %s" % (tr.final, exc), exc.interrupted)
                if not exc.interrupted:
                    try:  # the host's receiver learns why on the data port too
                        chan.write_all([T.encode_end_error(sub, exc.code, str(exc))])
                    except CE.TransferError:
                        pass
                exc.done = len(done)
                raise exc
            finally:
                if tr.fd is not None:
                    os.close(tr.fd)
                    tr.fd = None
            done.append({"path": tr.final, "size": size, "digest": digest, "offset": tr.offset})
        chan.idle_timeout = ACK_TIMEOUT
        CE.wait_ack(chan, T.batch_tid(tr.tid, len(tr.batch) - 1))
        return {"path": tr.batch[0]["final"], "size": sum(d["size"] for d in done),
                "digest": done[-1]["digest"], "algorithm": tr.algorithm,
                "offset": tr.batch[0]["offset"], "files": done}

    def _push_target(self, path):
        """Check that ``path`` may be written as a file; returns its parent directory."""
        if os.path.isdir(path):
            raise OpError(codes.IS_A_DIRECTORY, "%s is a directory" % path)
        self._check_write(path)
        parent = os.path.dirname(path)
        try:
            pst = os.stat(parent)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise OpError(codes.NOT_FOUND, "directory %s does not exist" % parent)
            raise _oserror(exc, parent)
        if not stat.S_ISDIR(pst.st_mode):
            raise OpError(codes.NOT_A_DIRECTORY, "%s is not a directory" % parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OpError(codes.PERMISSION_DENIED, "permission denied: cannot write in %s" % parent)
        return parent

    @staticmethod
    def _push_partial(path, size, mtime_ns, algorithm, resume):
        """The temp file for ``path`` and the verified prefix it holds (0 unless resuming)."""
        parent = os.path.dirname(path)
        if size is not None and mtime_ns is not None:
            partial = os.path.join(parent, T.partial_name(path, size, mtime_ns, algorithm))
        else:
            partial = os.path.join(parent, "%s%s%s" % (T.PARTIAL_PREFIX, secrets.token_hex(12),
                                                       T.PARTIAL_SUFFIX))
        have = None
        if resume:
            try:
                pst = os.lstat(partial)
                if stat.S_ISREG(pst.st_mode):
                    have = pst.st_size
            except OSError:
                pass
        return partial, T.resume_offset(have, size)

    @staticmethod
    def _check_space(parent, nbytes):
        try:
            vfs = os.statvfs(parent)
            free = vfs.f_bavail * vfs.f_frsize
        except OSError:
            return
        if nbytes > free:
            raise OpError(codes.NO_SPACE, "not enough space in %s: %d bytes needed, %d free"
                          % (parent, nbytes, free))

    @staticmethod
    def _open_partial(partial, offset):
        try:
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise _oserror(exc, partial)
        try:
            os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
        except OSError as exc:
            os.close(fd)
            raise _oserror(exc, partial)
        return fd

    def _prepare_pull(self, tr, args):
        path = _path_arg(args)
        self._check_read(path)
        offset = args.int("offset", default=0, min=0)
        expect_size = args.int("size", default=None, min=0)
        expect_mtime = args.int("mtime_ns", default=None)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EISDIR:
                raise OpError(codes.IS_A_DIRECTORY, "%s is a directory" % path)
            raise _oserror(exc, path)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise OpError(codes.IS_A_DIRECTORY, "%s is a directory" % path)
            if not stat.S_ISREG(st.st_mode):
                raise OpError(codes.BAD_REQUEST, "%s is not a regular file" % path)
            if ((expect_size is not None and expect_size != st.st_size)
                    or (expect_mtime is not None and expect_mtime != st.st_mtime_ns)):
                raise OpError(codes.CHANGED, "%s changed since it was examined" % path)
            if offset > st.st_size:
                raise OpError(codes.CHANGED, "resume offset %d is beyond the end of %s" % (offset, path))
            os.lseek(fd, offset, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        tr.fd, tr.final, tr.offset, tr.size, tr.src_stat = fd, path, offset, st.st_size, st
        d = _describe(st)
        d.pop("type")
        d.update({"path": path, "offset": offset})
        return d

    def _open_port(self, tr):
        device = self.config.data_device
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

    def _run_jobs(self):
        while True:
            self._work(self._jobs.get())

    def _wait_host(self, tr):
        deadline = time.monotonic() + HOST_WAIT
        while not tr.port.host_present():
            if tr.cancel.is_set():
                raise CE.cancelled()
            if time.monotonic() > deadline:
                raise CE.TransferError(codes.TIMEOUT, "the host did not connect to the data port",
                                       interrupted=True)
            time.sleep(0.02)

    def _work(self, tr):
        result = None
        err = None
        try:
            self._wait_host(tr)
            chan = CE.Channel(tr.port.fd, tr.cancel, what="the data port")
            chan.write_all([T.encode_hello(tr.tid, tr.nonce, "agent")])
            if tr.batch is not None and tr.direction == "push":
                chan.wait_hello(tr.tid, tr.nonce, "host")
                result = self._recv_batch(tr, chan)
            elif tr.batch is not None:
                result = self._send_batch(tr, chan)
            elif tr.direction == "push":
                chan.wait_hello(tr.tid, tr.nonce, "host")
                size, digest = CE.recv_file(chan, tr.fd, tr.tid, tr.algorithm, tr.offset, tr.size,
                                            corrupt_at=tr.corrupt_at)
                self._finish_push(tr)
            else:
                st0 = tr.src_stat

                def check():
                    st = os.fstat(tr.fd)
                    if st.st_size != st0.st_size or st.st_mtime_ns != st0.st_mtime_ns:
                        raise CE.TransferError(codes.CHANGED, "%s changed while it was being sent"
                                               % tr.final)

                size, digest = CE.send_file(chan, tr.fd, tr.tid, tr.algorithm, tr.offset, tr.size,
                                            check=check, corrupt_at=tr.corrupt_at)
                chan.idle_timeout = ACK_TIMEOUT
                CE.wait_ack(chan, tr.tid)
            if result is None:
                result = {"path": tr.final, "size": size, "digest": digest,
                          "algorithm": tr.algorithm, "offset": tr.offset}
            result["seconds"] = round(time.monotonic() - tr.started, 6)
        except CE.TransferError as exc:
            err = exc
            if exc.interrupted:
                tr.keep_partial = True
            elif exc.code == codes.CHANGED and tr.final not in str(exc):  # say which file
                err = CE.TransferError(exc.code, "%s: %s" % (tr.final, exc))
        except OSError as exc:
            err = CE.TransferError(codes.errno_to_code(exc.errno), "%s: %s" % (
                tr.final, exc.strerror or exc))
        except Exception as exc:  # a bug: report it, keep the agent alive
            log.exception("transfer %d failed", tr.tid)
            err = CE.TransferError(codes.INTERNAL, "internal error: %s" % exc)
        if tr.cancel.is_set() and err is None:
            pass  # finished just as it was cancelled: the result stands
        self._cleanup_files(tr, failed=err is not None)
        self.agent.post_result(("transfer",), (tr, result, err))

    def _recv_batch(self, tr, chan):
        """Receive the batch's files in turn, each as a single push (temp file, verify, rename).
        A failure names its file and ends the batch; the files before it stay."""
        done = []
        for i, item in enumerate(tr.batch):
            tr.final, tr.partial, tr.offset = item["final"], item["partial"], item["offset"]
            tr.size, tr.attrs = item["size"], item["attrs"]
            log.debug("transfer %d: file %d of %d, %s from offset %d", tr.tid, i + 1,
                      len(tr.batch), tr.final, tr.offset)
            tr.fd = self._open_partial(tr.partial, tr.offset)
            try:
                size, digest = CE.recv_file(chan, tr.fd, T.batch_tid(tr.tid, i), tr.algorithm,
                                            tr.offset, tr.size, corrupt_at=tr.corrupt_at)
            except CE.TransferError as exc:
                if tr.final not in str(exc):
                    exc = CE.TransferError(exc.code, "%s: %s" % (tr.final, exc), exc.interrupted)
                exc.done = len(done)
                raise exc
            self._finish_push(tr)
            done.append({"path": tr.final, "size": size, "digest": digest, "offset": tr.offset})
        return {"path": tr.batch[0]["final"], "size": sum(d["size"] for d in done),
                "digest": done[-1]["digest"], "algorithm": tr.algorithm,
                "offset": tr.batch[0]["offset"], "files": done}

    def _finish_push(self, tr):
        fd, tr.fd = tr.fd, None
        try:
            os.fsync(fd)
            a = tr.attrs
            if a["mode"] is not None and a["preserve"]:
                mode = a["mode"]
            else:
                try:
                    mode = stat.S_IMODE(os.stat(tr.final).st_mode)
                except OSError:
                    mode = 0o666 & ~_umask()
            os.fchmod(fd, mode)
            if a["preserve"] and os.geteuid() == 0 and a["uid"] is not None:
                os.fchown(fd, a["uid"], a["gid"] if a["gid"] is not None else -1)
                os.fchmod(fd, mode)  # chown clears setuid bits
            if a["mtime_ns"] is not None:
                os.utime(fd, ns=(a["mtime_ns"], a["mtime_ns"]))
        finally:
            os.close(fd)
        os.replace(tr.partial, tr.final)
        tr.partial = None
        try:
            dfd = os.open(os.path.dirname(tr.final), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass

    def _cleanup_files(self, tr, failed):
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
    def _drop_partial(tr):
        if tr.direction == "push" and tr.partial:
            try:
                os.unlink(tr.partial)
            except OSError:
                pass

    # -- loop side ----------------------------------------------------------------------------

    def finished(self, tr, result, err):
        """In the loop: the worker is done; close the port and reply (unless already replied)."""
        if tr.port is not None:
            tr.port.close()
            tr.port = None
        if err is not None and tr.discard:
            # a CANCEL that came while the worker was failing for another reason (the host closes
            # its data socket right after cancelling: "the peer went away") still drops the file
            self._drop_partial(tr)
        if self.active is tr:
            self.active = None
        agent = self.agent
        if tr.replied or agent.session is not tr.session or tr.session.transfers.get(tr.rid) is not tr:
            log.info("transfer %d ended after it was cancelled (%s)", tr.tid, err or "completed")
            return
        del tr.session.transfers[tr.rid]
        tr.replied = True
        if err is None:
            log.info("transfer %d done: %d bytes, %s %s", tr.tid, result["size"], tr.algorithm,
                     result["digest"])
            agent.reply(tr.rid, result)
        else:
            log.warning("transfer %d failed: %s", tr.tid, err)
            details = {"interrupted": err.interrupted}
            if getattr(err, "done", None) is not None:
                details["done"] = err.done  # batch: files completed before this failure
            agent.error(tr.rid, err.code, str(err), details)

    def cancel(self, tr, reason, keep_partial):
        tr.keep_partial = keep_partial
        tr.discard = not keep_partial
        tr.cancel.set()
        tr.replied = True
        log.info("transfer %d cancelled (%s)", tr.tid, reason)


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _set_attrs(path, mode, mtime_ns, uid, gid, follow):
    if (uid is not None or gid is not None) and os.geteuid() == 0:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid, follow_symlinks=follow)
    is_link = os.path.islink(path)
    if mode is not None and not is_link:
        os.chmod(path, mode)
    if mtime_ns is not None:
        if is_link and os.utime not in os.supports_follow_symlinks:
            return
        os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=follow)
