"""Host side of file transfer: ``Client.push`` / ``Client.pull`` (and ``-r`` trees).

One engine for both directions: :func:`_transfer_one` asks the agent over control
(``transfer.open``), waits for its EVENT ``ready``, then runs the shared copy engine
(``guestlink.filecopy.engine``: send_file for a push, recv_file for a pull) in a thread on the
data socket while the asyncio loop keeps serving the control channel; the agent's final reply
and the engine's own verification must agree. Transfers of one client are serialised by a lock
(queued per VM); the data socket is connected lazily, kept across transfers, and dropped after a
failed transfer (its stale bytes die with it; the DATA_HELLO nonce protects the next transfer
from whatever is still in flight).

Paths received from the guest (recursive pull) are untrusted: every name is checked with
``safe_relpath`` before anything is written, parents are verified with lstat (never a symlink),
files are created with O_NOFOLLOW and renamed into place.
"""

import asyncio
import errno
import os
import secrets
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from ..filecopy import engine as CE
from ..protocol import Fields, ProtocolViolation, codes
from ..protocol import messages as m
from ..protocol import transfer as T
from . import errors as E
from .client import wait_within

BUSY_RETRY = 15.0  # seconds to retry while the agent's data port is still busy
#: Mode bits a pull takes from the guest: never setuid/setgid (the guest is untrusted; a pull
#: with -p as root would otherwise plant a setuid-root file of the guest's choosing).
GUEST_MODE_BITS = 0o1777
#: Bounds on the guest's listing for a recursive pull (a hostile guest could page forever or
#: pad its entries): entries, pages (each ``fs.list`` reply is at most MAX_JSON_PAYLOAD; a page
#: must list at least one entry unless it is the last) and the bytes of names and link targets
#: kept. Each entry is reduced to its validated fields as it arrives; unknown keys are dropped.
MAX_TREE_ENTRIES = 1_000_000
MAX_TREE_PAGES = 20_000
MAX_TREE_BYTES = 64 << 20
PROGRESS_INTERVAL = 0.1
#: Bounds on what the guest may give as a time (ns), size, uid or gid: outside them the host's
#: os calls would raise OverflowError instead of doing something wrong.
MIN_NS, MAX_NS = -(1 << 63), (1 << 63) - 1
MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "no change"


@dataclass
class TransferResult:
    """Outcome of a push or pull (for a tree: totals over its files)."""

    source: str
    destination: str
    bytes: int = 0
    seconds: float = 0.0
    algorithm: str = T.DEFAULT_ALGORITHM
    digest: Optional[str] = None  # the last (or only) file's whole-file digest
    files: int = 0
    resumed_from: int = 0

    @property
    def rate(self):
        """MB/s (10**6 bytes per second)."""
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


class _DataLink:
    """The data socket of one client and the lock that queues its transfers."""

    def __init__(self, path):
        self.path = path
        self.lock = asyncio.Lock()
        self.sock = None

    def connect(self):
        if self.sock is None:
            if not self.path:
                raise E.ConnectError("file transfer needs the data channel socket (data=... / --data)")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(self.path)
            except FileNotFoundError as exc:
                s.close()
                raise E.SocketNotFound("data socket %s does not exist" % self.path, self.path,
                                       exc.errno) from None
            except OSError as exc:
                s.close()
                raise E.ConnectError("cannot connect to data socket %s: %s" % (
                    self.path, exc.strerror or exc), self.path, exc.errno) from None
            s.setblocking(False)
            self.sock = s
        return self.sock

    def reset(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _link(client):
    link = getattr(client, "_datalink", None)
    if link is None:
        link = client._datalink = _DataLink(client.data)
    return link


def _engine_error(exc):
    """A copy-engine TransferError raised on the host -> a guestlink exception."""
    if exc.code == codes.NO_SPACE:
        return OSError(errno.ENOSPC, "local disk full: %s" % exc)
    if exc.interrupted:
        return E.ConnectionLost("connection lost during the transfer: %s" % exc)
    return E.remote_error(exc.code, str(exc))


class _Progress:
    def __init__(self, loop, cb, total, base):
        self.loop, self.cb, self.total, self.last = loop, cb, total, 0.0
        self.base = base

    def __call__(self, pos):
        now = time.monotonic()
        if self.cb is not None and (now - self.last >= PROGRESS_INTERVAL or pos == self.total):
            self.last = now
            self.loop.call_soon_threadsafe(self.cb, pos, self.total)


def _violation(what: str, exc: ProtocolViolation) -> E.ProtocolError:
    from .client import _violation as violation  # one wording for every malformed reply
    return violation(what, exc)


def _reported_file(obj: Any, what: str) -> Tuple[int, str]:
    """(size, digest) of one file in the agent's final reply to a transfer, type-checked."""
    try:
        f = Fields(obj, what)
        return f.int("size", min=0, max=MAX_NS), f.str("digest", max_len=m.MAX_NAME)
    except ProtocolViolation as exc:
        raise _violation(what, exc) from None


def _verify_one(reply, result, args):
    nbytes, digest = result
    size, theirs = _reported_file(reply, "transfer reply")
    if theirs != digest or size != nbytes:
        raise E.ChecksumMismatch(codes.CHECKSUM_MISMATCH, "the agent reports %s %s (%d bytes), this "
                                 "side %s (%d bytes)" % (args.get("checksum"), theirs, size, digest,
                                                         nbytes))


async def _transfer_one(client, direction, args, engine, progress, total, timeout,
                        verify=_verify_one):
    """The one engine for both directions.

    ``args``: transfer.open arguments (without transfer/direction). ``engine(chan, tid, ready,
    progress)`` runs in a thread once the agent is ready and returns its result ((bytes, digest)
    for one file); ``verify(reply, result, args)`` checks it against the agent's reply. Returns
    (reply, ready, result, seconds).
    """
    from .client import _Call  # the client's request plumbing

    link = _link(client)
    loop = asyncio.get_running_loop()
    async with link.lock:
        deadline_busy = loop.time() + BUSY_RETRY
        while True:
            sock = link.connect()
            tid = secrets.randbelow(T.MAX_TID) + 1
            ready_fut = loop.create_future()

            def on_event(payload, fut=ready_fut):
                try:
                    ev = m.parse_event(payload)
                except ProtocolViolation as exc:
                    ev = exc
                if not fut.done():
                    fut.set_result(ev)

            call = _Call("transfer.open", on_event)
            req = dict(args, transfer=tid, direction=direction)
            await client._start_call(call, "transfer.open", req, ready_fut, client._deadline(timeout),
                                     "the agent did not get ready for the transfer in time")
            if call.future.done() and not ready_fut.done():
                exc = call.future.exception()
                if isinstance(exc, E.Busy) and loop.time() < deadline_busy:
                    await asyncio.sleep(0.1)  # the previous transfer is still winding down
                    continue
                if exc is not None:
                    raise exc
                raise E.ProtocolError("the agent finished transfer.open without getting ready")
            ev = ready_fut.result()
            if isinstance(ev, Exception) or ev.get("event") != "ready":
                client._forget(call, cancel=True)
                raise E.ProtocolError("unexpected transfer event from the agent")
            break
        try:
            f = Fields(ev, "ready event")
            ready = {"nonce": f.str("nonce", max_len=m.MAX_NONCE),
                     "offset": f.int("offset", min=0),
                     "size": f.int("size", default=None, min=0),
                     "mode": f.int("mode", default=None, min=0, max=0o7777),
                     "mtime_ns": f.int("mtime_ns", default=None, min=MIN_NS, max=MAX_NS),
                     "uid": f.int("uid", default=None, min=0, max=MAX_ID),
                     "gid": f.int("gid", default=None, min=0, max=MAX_ID),
                     "path": f.str("path", default=""),
                     "offsets": ev.get("offsets")}  # batch: checked by its caller
        except ProtocolViolation as exc:
            client._forget(call, cancel=True)
            raise E.ProtocolError("bad ready event: %s" % exc) from None
        cancel = threading.Event()
        chan = CE.Channel(sock.fileno(), cancel, what="the data socket")
        chan.idle_timeout = max(CE.IDLE_TIMEOUT, client.timeout or 0)
        prog = _Progress(loop, progress, total if total is not None else ready["size"], ready["offset"])
        started = time.monotonic()

        def run():
            chan.wait_hello(tid, ready["nonce"], "agent")
            return engine(chan, tid, ready, prog)

        engine_fut = asyncio.ensure_future(loop.run_in_executor(None, run))
        engine_fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        ok = False
        try:
            done, _ = await asyncio.wait([engine_fut, call.future], return_when=asyncio.FIRST_COMPLETED)
            if engine_fut not in done:
                # the agent answered first: normally an error (it stopped); stop our side too
                exc = call.future.exception() if not call.future.cancelled() else None
                if exc is not None:
                    cancel.set()
                    await asyncio.wait([engine_fut])
                    raise exc
                await asyncio.wait([engine_fut])
            try:
                result = engine_fut.result()
            except CE.TransferError as exc:
                # the agent's explanation is better, except when our own source changed during a
                # push (the agent only sees "more data than announced" or our sender's error)
                ours = direction == "push" and exc.code == codes.CHANGED
                if not ours and call.future.done() and call.future.exception() is not None:
                    raise call.future.exception()
                # a sender error (e.g. the agent refused) may still be on its way on control; and
                # the agent drops its temp file before it answers
                try:
                    await wait_within(asyncio.shield(call.future), 0.5)
                except E.GuestlinkError as exc2:
                    if not ours:
                        raise exc2 from None
                except asyncio.TimeoutError:
                    pass
                except asyncio.CancelledError:
                    if not call.future.cancelled():
                        raise  # ours (Ctrl-C), not the call's: never swallowed
                raise _engine_error(exc) from None
            payload = await client._await_reply(call, client._deadline(max(client.timeout or 0, 30.0)),
                                                "transfer.open")
            try:
                reply = m.parse_response(payload)
                Fields(reply, "transfer reply").str("path", default=None)
            except ProtocolViolation as exc:
                raise _violation("transfer reply", exc) from None
            verify(reply, result, args)
            ok = True
            return reply, ready, result, time.monotonic() - started
        except BaseException:
            cancel.set()
            if not call.future.done():
                client._forget(call, cancel=True)
            if not engine_fut.done():
                try:
                    await asyncio.shield(asyncio.wait([engine_fut]))
                except asyncio.CancelledError:
                    pass
            raise
        finally:
            if not ok:
                link.reset()


# --- single files --------------------------------------------------------------------------------

def _local_meta(fd):
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory (use -r)")
    regular = stat.S_ISREG(st.st_mode)
    return st, (st.st_size if regular else None)


async def push_file(client, local, remote, *, preserve=False, resume=False, checksum=T.DEFAULT_ALGORITHM,
                    progress=None, timeout=None, name=None, _test_corrupt=None):
    """Push one local file (or ``-`` = stdin) to the guest path ``remote``."""
    if checksum not in T.ALGORITHMS:
        raise ValueError("checksum must be one of %s" % ", ".join(T.ALGORITHMS))
    if local == "-":
        fd, own = sys.stdin.fileno(), False
    else:
        fd, own = os.open(local, os.O_RDONLY | os.O_CLOEXEC), True
    try:
        st, size = _local_meta(fd)
        args = {"path": remote, "checksum": checksum, "resume": bool(resume and size is not None),
                "preserve": preserve, "mode": stat.S_IMODE(st.st_mode) if size is not None else None,
                "name": name if name is not None else (os.path.basename(local) if local != "-" else None)}
        if size is not None:
            args.update(size=size, mtime_ns=st.st_mtime_ns)
            if preserve:
                args.update(uid=st.st_uid, gid=st.st_gid)
        if _test_corrupt is not None:
            args["test_corrupt"] = _test_corrupt
        args = {k: v for k, v in args.items() if v is not None}

        def engine(chan, tid, ready, prog):
            offset = ready["offset"]
            if offset > (size if size is not None and resume else 0):
                raise E.ProtocolError("bad ready event: field 'offset' (%d) is beyond what this "
                                      "side sends" % offset)
            if offset:
                os.lseek(fd, offset, os.SEEK_SET)
            chan.write_all([T.encode_hello(tid, ready["nonce"], "host")])

            def check():
                if size is None:
                    return
                now = os.fstat(fd)
                if now.st_size != st.st_size or now.st_mtime_ns != st.st_mtime_ns:
                    raise CE.TransferError(codes.CHANGED, "%s changed during the transfer" % local)
            try:
                return CE.send_file(chan, fd, tid, checksum, offset, size, progress=prog, check=check)
            except CE.TransferError as exc:
                if exc.code != codes.CHANGED:
                    raise
                if local not in str(exc):  # say which file
                    exc = CE.TransferError(codes.CHANGED, "%s changed during the transfer (%s)"
                                           % (local, exc))
                try:  # tell the agent why (it drops its temp file)
                    chan.write_all([T.encode_end_error(tid, exc.code, str(exc))])
                except CE.TransferError:
                    pass
                raise exc from None

        reply, ready, (nbytes, digest), seconds = await _transfer_one(
            client, "push", args, engine, progress, size, timeout)
        return TransferResult(local, reply.get("path", remote), nbytes, seconds, checksum, digest, 1,
                              ready["offset"])
    finally:
        if own:
            os.close(fd)


def _receive(chan: CE.Channel, fd: int, tid: int, checksum: str, offset: int, size: int,
             progress: Optional[Callable[[int], None]]) -> Tuple[int, str]:
    """recv_file for a pull: never more than the ``size`` the guest announced (recv_file refuses
    the excess; a frame too large for it is said to be more than announced, too)."""
    try:
        return CE.recv_file(chan, fd, tid, checksum, offset, size, progress=progress)
    except CE.TransferError as exc:
        if exc.code != codes.TOO_LARGE:
            raise
        raise CE.TransferError(exc.code, "%s (the guest announced %d bytes)" % (exc, size),
                               exc.interrupted) from None


def _open_partial(parent, name, offset):
    fd = os.open(os.path.join(parent, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    os.ftruncate(fd, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return fd


def _resume_from(parent: str, partial: str, size: int) -> int:
    """Where a --resume pull continues: after the verified prefix in the hidden partial file."""
    try:
        pst = os.lstat(os.path.join(parent, partial))
    except OSError:
        return 0
    return T.resume_offset(pst.st_size, size) if stat.S_ISREG(pst.st_mode) else 0


def _check_space(path: str, need: int) -> None:
    """Refuse a pull the host's file system cannot hold before anything is written. The guest's
    announced sizes are enforced, so ``need`` is the most the pull can write."""
    probe = path
    while not os.path.isdir(probe):  # what the pull creates goes below the nearest existing dir
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent
    try:
        vfs = os.statvfs(probe)
    except OSError:
        return
    if vfs.f_blocks == 0:  # a file system that reports no sizes (some network or FUSE ones)
        return
    # root may use the blocks reserved for it
    free = (vfs.f_bfree if os.geteuid() == 0 else vfs.f_bavail) * vfs.f_frsize
    if need > free:
        raise OSError(errno.ENOSPC, "not enough space on the host in %s: %d bytes needed, %d free"
                      % (probe, need, free))


def _fsync_dir(path: str) -> None:
    """Make renames into ``path`` durable: a rename is recorded in the directory, which the
    file's own fsync does not write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory (EINVAL): nothing more to do
        pass
    finally:
        os.close(fd)


def _stat_fields(rst: Any, path: str) -> Dict[str, Any]:
    """The agent's fs.stat reply for ``path``, every field type- and range-checked."""
    try:
        f = Fields(rst, "fs.stat reply")
        return {"type": f.str("type", max_len=16),
                "size": f.int("size", default=None, min=0, max=MAX_NS),
                "mode": f.int("mode", default=None, min=0, max=0o7777),
                "mtime_ns": f.int("mtime_ns", default=None, min=MIN_NS, max=MAX_NS),
                "uid": f.int("uid", default=None, min=0, max=MAX_ID),
                "gid": f.int("gid", default=None, min=0, max=MAX_ID)}
    except ProtocolViolation as exc:
        raise _violation("fs.stat reply for %r" % path, exc) from None


async def pull_file(client, remote, local, *, preserve=False, resume=False, checksum=T.DEFAULT_ALGORITHM,
                    progress=None, timeout=None, remote_stat=None, _test_corrupt=None):
    """Pull one guest file to ``local`` (a file path, an existing directory, or ``-`` = stdout).

    At most the size fs.stat announced is accepted (the agent refuses a file whose size changed
    since), and a pull that would not fit in the host's free space is refused before it starts."""
    if checksum not in T.ALGORITHMS:
        raise ValueError("checksum must be one of %s" % ", ".join(T.ALGORITHMS))
    rst = _stat_fields(remote_stat or await client.call("fs.stat", {"path": remote}, timeout=timeout),
                       remote)
    if rst["type"] == "dir":
        raise E.RemoteIsADirectory(codes.IS_A_DIRECTORY, "%s is a directory in the guest (use -r)" % remote)
    size, mtime_ns = rst["size"], rst["mtime_ns"]
    for key in ("size", "mtime_ns"):
        if rst[key] is None:  # the size bounds the pull; both name its resume file
            raise E.ProtocolError("malformed fs.stat reply for %r from the agent: no field %r"
                                  % (remote, key))
    to_stdout = local == "-"
    if to_stdout:
        fd, dest, partial, offset = sys.stdout.fileno(), "-", None, 0
        parent = None
    else:
        dest = os.path.abspath(local)
        if os.path.isdir(dest):
            dest = os.path.join(dest, os.path.basename(remote.rstrip("/")) or "file")
            if os.path.isdir(dest) and not os.path.islink(dest):
                raise IsADirectoryError(errno.EISDIR, "%s is a directory" % dest)
        parent = os.path.dirname(dest)
        if not os.path.isdir(parent):
            raise FileNotFoundError(errno.ENOENT, "local directory %s does not exist" % parent)
        partial = T.partial_name(dest, size, mtime_ns, checksum)
        offset = _resume_from(parent, partial, size) if resume else 0
        _check_space(parent, size - offset)
        fd = _open_partial(parent, partial, offset)
    args = {"path": remote, "checksum": checksum, "offset": offset, "size": size, "mtime_ns": mtime_ns}
    if _test_corrupt is not None:
        args["test_corrupt"] = _test_corrupt
    keep = False

    def engine(chan, tid, ready, prog):
        if ready["offset"] != offset or ready["size"] not in (None, size):
            raise E.ProtocolError("bad ready event: field 'offset' %d / 'size' %s where %d / %d "
                                  "was asked" % (ready["offset"], ready["size"], offset, size))
        nbytes, digest = _receive(chan, fd, tid, checksum, offset, size, prog)
        if not to_stdout:
            os.fsync(fd)
        chan.write_all([T.encode_ack(tid)])
        return nbytes, digest

    try:
        try:
            reply, ready, (nbytes, digest), seconds = await _transfer_one(
                client, "pull", args, engine, progress, size, timeout)
        except (E.ConnectionLost, E.RequestTimeout):
            keep = True  # interrupted: the verified prefix stays for --resume
            raise
        if not to_stdout:
            final = os.path.join(parent, partial)
            if preserve:
                if ready["uid"] is not None and os.geteuid() == 0:
                    os.fchown(fd, ready["uid"], ready["gid"] if ready["gid"] is not None else -1)
                if ready["mode"] is not None:
                    os.fchmod(fd, ready["mode"] & GUEST_MODE_BITS)
                if ready["mtime_ns"] is not None:
                    os.utime(fd, ns=(ready["mtime_ns"], ready["mtime_ns"]))
            else:
                try:
                    os.fchmod(fd, stat.S_IMODE(os.stat(dest).st_mode))
                except OSError:
                    mask = os.umask(0o022)
                    os.umask(mask)
                    os.fchmod(fd, 0o666 & ~mask)
            os.replace(final, dest)
            partial = None
            _fsync_dir(parent)
        return TransferResult(remote, dest, nbytes, seconds, checksum, digest, 1, ready["offset"])
    finally:
        if not to_stdout:
            os.close(fd)
            if partial is not None and not keep:
                try:
                    os.unlink(os.path.join(parent, partial))
                except OSError:
                    pass


# --- trees ---------------------------------------------------------------------------------------

def _join_remote(root, rel):
    return root.rstrip("/") + "/" + rel if root != "/" else "/" + rel


async def push_tree(client, local, remote, *, preserve=False, resume=False, checksum=T.DEFAULT_ALGORITHM,
                    progress=None, timeout=None):
    """``cp -r``: the directory ``local`` becomes ``remote`` (or ``remote/NAME`` if that is an
    existing directory). Symlinks are sent as symlinks (targets verbatim)."""
    local = os.path.abspath(local)
    try:
        rst = await client.call("fs.stat", {"path": remote}, timeout=timeout)
    except E.RemoteNotFound:
        rst = None
    root = _join_remote(remote, os.path.basename(local)) if rst and rst.get("type") == "dir" else remote
    total = TransferResult(local, root, algorithm=checksum)
    t0 = time.monotonic()
    dirs = []
    files = []  # (local path, guest path, lstat): sent in batches once every directory exists

    async def mkdir(path, st):
        await client.call("fs.mkdir", {"path": path, "mode": 0o700 | stat.S_IMODE(st.st_mode)},
                          timeout=timeout)
        dirs.append((path, st))

    await mkdir(root, os.stat(local))
    for dirpath, dirnames, filenames in os.walk(local):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, local)
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else rel_dir + "/" + name
            target = _join_remote(root, rel)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                await client.call("fs.symlink", {"path": target, "target": os.readlink(full)},
                                  timeout=timeout)
                if name in dirnames:
                    dirnames.remove(name)
            elif stat.S_ISDIR(st.st_mode):
                await mkdir(target, st)
            elif stat.S_ISREG(st.st_mode):
                files.append((full, target, st))
    grand_total = sum(st.st_size for _, _, st in files)
    for batch in _batches(files, preserve):
        nbytes, digest = await _push_batch(client, batch, preserve=preserve, resume=resume,
                                           checksum=checksum, progress=progress, timeout=timeout,
                                           base=total.bytes, grand_total=grand_total)
        total.bytes += nbytes
        total.files += len(batch)
        total.digest = digest
    for path, st in reversed(dirs):
        attrs = {"path": path, "mode": stat.S_IMODE(st.st_mode)}
        if preserve:
            attrs["mtime_ns"] = st.st_mtime_ns
        await client.call("fs.setattr", attrs, timeout=timeout)
    total.seconds = time.monotonic() - t0
    return total


def _batch_entry(target, st, preserve):
    entry = {"path": target, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "mode": stat.S_IMODE(st.st_mode)}
    if preserve:
        entry.update(uid=st.st_uid, gid=st.st_gid)
    return entry


def _batches(files, preserve, items=None):
    """Split ``files`` ([(_, guest path, lstat or None)]) into batches of at most T.MAX_BATCH files
    and T.BATCH_REQUEST_BYTES of request (a batch opens the agent's data port once for all its
    files); the batches hold ``items`` (default: ``files``) at the same positions."""
    batch, nbytes = [], 0
    for item, out in zip(files, items if items is not None else files):
        st = item[2]
        entry = _batch_entry(item[1], st, preserve) if st is not None else {
            "path": item[1], "size": 2 ** 63, "mtime_ns": -2 ** 63, "offset": 2 ** 63}
        size = len(m.dump_json(entry)) + 1
        if batch and (len(batch) >= T.MAX_BATCH or nbytes + size > T.BATCH_REQUEST_BYTES):
            yield batch
            batch, nbytes = [], 0
        batch.append(out)
        nbytes += size
    if batch:
        yield batch


def _batch_verifier(paths):
    """verify() for _transfer_one: the agent's reply lists each file of the batch (``paths``, the
    guest paths) with the size and digest this side sent or received."""
    def verify(reply, result, args):
        files = reply.get("files")
        if not isinstance(files, list) or len(files) != len(result):
            raise E.ProtocolError("the agent's reply does not list the batch's files")
        for entry, (nbytes, digest), path in zip(files, result, paths):
            size, theirs = _reported_file(entry, "file entry of the transfer reply")
            if theirs != digest or size != nbytes:
                raise E.ChecksumMismatch(codes.CHECKSUM_MISMATCH, "%s: the agent reports %s %s "
                                         "(%d bytes), this side %s (%d bytes)" % (
                                             path, args.get("checksum"), theirs, size, digest,
                                             nbytes))
    return verify


async def _push_batch(client, batch, *, preserve, resume, checksum, progress, timeout, base,
                      grand_total):
    """Push the files of one batch (``[(local, guest path, lstat)]``) in one transfer: the agent
    checks them all first, then receives them in turn on one opening of the data port.
    Returns (bytes, last digest)."""
    args = {"files": [_batch_entry(target, st, preserve) for _, target, st in batch],
            "checksum": checksum, "resume": bool(resume), "preserve": preserve}

    def engine(chan, tid, ready, prog):
        offsets = ready["offsets"]
        if (not isinstance(offsets, list) or len(offsets) != len(batch)
                or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o <= st.st_size
                           for o, (_, _, st) in zip(offsets, batch))):
            raise E.ProtocolError("bad offsets in the agent's ready event")
        chan.write_all([T.encode_hello(tid, ready["nonce"], "host")])
        done, sent = [], base
        for i, (local, _, st) in enumerate(batch):
            sub_tid = T.batch_tid(tid, i)
            fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                def check(fd=fd, st=st, local=local):
                    now = os.fstat(fd)
                    if now.st_size != st.st_size or now.st_mtime_ns != st.st_mtime_ns:
                        raise CE.TransferError(codes.CHANGED, "%s changed during the transfer"
                                               % local)
                try:
                    check()
                    os.lseek(fd, offsets[i], os.SEEK_SET)
                    nbytes, digest = CE.send_file(
                        chan, fd, sub_tid, checksum, offsets[i], st.st_size,
                        progress=lambda pos, at=sent: prog(at + pos), check=check)
                except CE.TransferError as exc:
                    if exc.code == codes.CHANGED:
                        try:  # tell the agent why (it drops its temp file)
                            chan.write_all([T.encode_end_error(sub_tid, exc.code, str(exc))])
                        except CE.TransferError:
                            pass
                    raise
            finally:
                os.close(fd)
            sent += st.st_size
            done.append((nbytes, digest))
        return done

    reply, ready, result, seconds = await _transfer_one(
        client, "push", args, engine, progress, grand_total, timeout,
        verify=_batch_verifier([target for _, target, _ in batch]))
    return sum(n for n, _ in result), result[-1][1]


async def _pull_batch(client, root, batch, *, preserve, resume, checksum, progress, timeout, base,
                      grand_total):
    """Pull the files of one batch (``[(parts, guest path, listing entry)]``) in one transfer: the
    agent sends them in turn on one opening of the data port; each is received into a temp file
    beside its destination, verified and renamed before the next (at most its listed size is
    accepted). Returns (bytes, last digest)."""
    plan = []
    for parts, path, e in batch:
        dest = _safe_parent(root, parts)
        partial = T.partial_name(dest, e.size, e.mtime_ns, checksum)
        offset = _resume_from(os.path.dirname(dest), partial, e.size) if resume else 0
        plan.append((parts, dest, partial, offset, e))
    args = {"files": [{"path": path, "size": e.size, "mtime_ns": e.mtime_ns, "offset": offset}
                      for (_, path, e), (_, _, _, offset, _) in zip(batch, plan)],
            "checksum": checksum}
    mask = os.umask(0o022)
    os.umask(mask)
    state = {"partial": None, "keep": False}

    def engine(chan, tid, ready, prog):
        done, received = [], base
        renamed_in = set()  # directories to fsync: once each, even if a later file fails
        try:
            for i, (parts, dest, partial, offset, e) in enumerate(plan):
                dest = _safe_parent(root, parts)  # again: nothing may have moved under us
                if os.path.islink(dest):
                    os.unlink(dest)  # never write through a link
                parent = os.path.dirname(dest)
                fd = _open_partial(parent, partial, offset)
                state["partial"] = os.path.join(parent, partial)
                try:
                    nbytes, digest = _receive(chan, fd, T.batch_tid(tid, i), checksum, offset,
                                              e.size, lambda pos, at=received: prog(at + pos))
                    os.fsync(fd)
                    _finish_pulled(fd, dest, e, preserve, mask)
                    os.replace(state["partial"], dest)
                    state["partial"] = None
                    renamed_in.add(parent)
                except CE.TransferError as exc:
                    state["keep"] = exc.interrupted  # the verified prefix stays for --resume
                    raise
                finally:
                    os.close(fd)
                received += e.size
                done.append((nbytes, digest))
        finally:
            for parent in sorted(renamed_in):
                _fsync_dir(parent)
        chan.write_all([T.encode_ack(T.batch_tid(tid, len(plan) - 1))])
        return done

    try:
        reply, ready, result, seconds = await _transfer_one(
            client, "pull", args, engine, progress, grand_total, timeout,
            verify=_batch_verifier([path for _, path, _ in batch]))
    except (E.ConnectionLost, E.RequestTimeout):
        state["keep"] = True
        raise
    finally:
        if state["partial"] is not None and not state["keep"]:
            try:
                os.unlink(state["partial"])
            except OSError:
                pass
    return sum(n for n, _ in result), result[-1][1]


def _finish_pulled(fd, dest, e, preserve, mask):
    """Owner, mode and mtime of a pulled file (from the guest's listing, never setuid/setgid)."""
    if preserve:
        if e.uid is not None and os.geteuid() == 0:
            os.fchown(fd, e.uid, e.gid if e.gid is not None else -1)
        if e.mode is not None:
            os.fchmod(fd, e.mode & GUEST_MODE_BITS)
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
    else:
        try:
            os.fchmod(fd, stat.S_IMODE(os.stat(dest).st_mode))
        except OSError:
            os.fchmod(fd, 0o666 & ~mask)


def _safe_parent(root, parts):
    """Verify every directory from ``root`` down to the entry's parent is a real directory (lstat,
    no symlinks): writing there cannot leave ``root``."""
    path = root
    for part in parts[:-1]:
        path = os.path.join(path, part)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise E.ProtocolError("refusing to write below %s: not a real directory" % path)
    return os.path.join(path, parts[-1])


class ListEntry(NamedTuple):
    """One entry of the guest's recursive listing, reduced to the validated fields the host uses
    (anything else the guest sent is dropped at once)."""

    path: str
    type: str
    size: Optional[int]
    mode: Optional[int]
    mtime_ns: Optional[int]
    uid: Optional[int]
    gid: Optional[int]
    target: Optional[str]


def _list_entry(obj: Any) -> ListEntry:
    f = Fields(obj, "listing entry")
    return ListEntry(f.str("path"), f.str("type", max_len=16),
                     f.int("size", default=None, min=0, max=MAX_NS),
                     f.int("mode", default=None, min=0, max=0o7777),
                     f.int("mtime_ns", default=None, min=MIN_NS, max=MAX_NS),
                     f.int("uid", default=None, min=0, max=MAX_ID),
                     f.int("gid", default=None, min=0, max=MAX_ID),
                     f.str("target", default=None))


async def list_tree(client, remote: str, timeout: Optional[float] = None,
                    op: str = "fs.list") -> List[ListEntry]:
    """The guest's recursive listing of ``remote``, page by page. Each entry is validated and
    reduced as its page arrives; ``next`` must be ``start`` + the page's entries (null on the
    last page, the only one that may be empty); MAX_TREE_ENTRIES, MAX_TREE_PAGES and
    MAX_TREE_BYTES (names and link targets) bound what the host keeps. Anything else is a
    ProtocolError."""
    entries: List[ListEntry] = []
    kept = 0
    start = 0
    pages = 0
    while True:
        page = await client.call(op, {"path": remote, "start": start}, timeout=timeout)
        pages += 1
        try:
            nxt = Fields(page, "%s reply" % op).int("next", default=None, min=0)
            items = page.get("entries")
            if not isinstance(items, list):
                raise ProtocolViolation("%s reply: field 'entries' must be a list" % op)
            if nxt is not None and not items:
                raise ProtocolViolation("%s reply: an empty page that is not the last" % op)
            if nxt is not None and nxt != start + len(items):
                raise ProtocolViolation("%s reply: field 'next' is %d after %d entries from %d"
                                        % (op, nxt, len(items), start))
            if len(entries) + len(items) > MAX_TREE_ENTRIES:
                raise ProtocolViolation("the listing exceeds %d entries" % MAX_TREE_ENTRIES)
            for item in items:
                entry = _list_entry(item)
                kept += len(entry.path) + len(entry.target or "")
                if kept > MAX_TREE_BYTES:
                    raise ProtocolViolation("the listing's names exceed %d bytes" % MAX_TREE_BYTES)
                entries.append(entry)
        except ProtocolViolation as exc:
            raise E.ProtocolError("the guest's listing of %s: %s" % (remote, exc)) from None
        del page, items  # the raw page (unknown keys and all) goes now, not with the next one
        if nxt is None:
            return entries
        if pages >= MAX_TREE_PAGES:
            raise E.ProtocolError("the guest's listing of %s takes more than %d pages" % (
                remote, MAX_TREE_PAGES))
        start = nxt


async def pull_tree(client, remote, local, *, preserve=False, resume=False, checksum=T.DEFAULT_ALGORITHM,
                    progress=None, timeout=None, _list_op="fs.list"):
    """``cp -r`` from the guest. Every name in the guest's listing is validated before anything
    is written; a listing naming ``..``, absolute paths or anything unsafe is refused whole, and
    so is a tree larger than the host's free space.

    Directories get the host's default mode (0777 & ~umask), or with ``preserve`` the guest's
    mode without setuid/setgid; existing directories keep theirs unless ``preserve``."""
    local = os.path.abspath(local)
    root = os.path.join(local, os.path.basename(remote.rstrip("/")) or "root") \
        if os.path.isdir(local) else local
    entries = await list_tree(client, remote, timeout, _list_op)
    plan = []
    seen = set()
    need = 0
    for e in entries:
        try:
            parts = T.safe_relpath(e.path)
        except ProtocolViolation as exc:
            raise E.ProtocolError("the guest's listing is unsafe: %s" % exc) from None
        rel = "/".join(parts)
        if rel in seen:
            raise E.ProtocolError("the guest's listing names %r twice" % rel)
        seen.add(rel)
        if e.type == "symlink" and e.target is None:
            raise E.ProtocolError("symlink %r without a target" % rel)
        if e.type == "file":
            if e.size is None or e.mtime_ns is None:
                raise E.ProtocolError("no size or mtime for %r in the guest's listing" % rel)
            need += e.size
            if resume:  # an estimate: the partial files hold what need not come again
                dest = os.path.join(root, *parts)
                need -= _resume_from(os.path.dirname(dest),
                                     T.partial_name(dest, e.size, e.mtime_ns, checksum), e.size)
        plan.append((parts, rel, e))
    _check_space(root, need)
    total = TransferResult(remote, root, algorithm=checksum)
    t0 = time.monotonic()
    os.makedirs(root, exist_ok=True)
    if os.path.islink(root) or not os.path.isdir(root):
        raise E.ProtocolError("%s is not a directory" % root)
    mask = os.umask(0o022)
    os.umask(mask)
    dirs = []  # (path, listing entry, created here)
    files = []  # (parts, guest path, listing entry): pulled in batches once every directory exists
    for parts, rel, e in plan:
        dest = _safe_parent(root, parts)
        if e.type == "dir":
            created = True
            try:
                os.mkdir(dest, 0o700)  # writable for the files to come; its mode is set last
            except FileExistsError:
                if os.path.islink(dest) or not os.path.isdir(dest):
                    raise E.ProtocolError("%s exists and is not a directory" % dest)
                created = False
            dirs.append((dest, e, created))
        elif e.type == "symlink":
            if os.path.lexists(dest):
                os.unlink(dest)
            os.symlink(e.target, dest)
        elif e.type == "file":
            files.append((parts, _join_remote(remote, rel), e))
    del plan, seen, entries
    grand_total = sum(e.size for _, _, e in files)
    for batch in _batches([(None, path, None) for _, path, _ in files], False, files):
        nbytes, digest = await _pull_batch(client, root, batch, preserve=preserve, resume=resume,
                                           checksum=checksum, progress=progress, timeout=timeout,
                                           base=total.bytes, grand_total=grand_total)
        total.bytes += nbytes
        total.files += len(batch)
        total.digest = digest
    for dest, e, created in reversed(dirs):
        if preserve:
            if e.mode is not None:
                os.chmod(dest, e.mode & GUEST_MODE_BITS)
            if e.mtime_ns is not None:
                os.utime(dest, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
        elif created:
            os.chmod(dest, 0o777 & ~mask)
    total.seconds = time.monotonic() - t0
    return total


async def push(client, local, remote, *, recursive=False, **kw):
    if recursive and local != "-" and os.path.isdir(local):
        return await push_tree(client, local, remote, **kw)
    if local != "-" and os.path.isdir(local):
        raise IsADirectoryError(errno.EISDIR, "%s is a directory (use -r)" % local)
    return await push_file(client, local, remote, **kw)


async def pull(client, remote, local, *, recursive=False, _list_op="fs.list", **kw):
    rst = _stat_fields(await client.call("fs.stat", {"path": remote}, timeout=kw.get("timeout")),
                       remote)
    if rst["type"] == "dir" or _list_op != "fs.list":
        if not recursive:
            raise E.RemoteIsADirectory(codes.IS_A_DIRECTORY, "%s is a directory in the guest "
                                       "(use -r)" % remote)
        return await pull_tree(client, remote, local, _list_op=_list_op, **kw)
    return await pull_file(client, remote, local, remote_stat=rst, **kw)
