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
import re
import secrets
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Set, Tuple, TypeVar

from ..filecopy import commit
from ..filecopy import engine as CE
from ..protocol import Fields, ProtocolViolation, codes
from ..protocol import messages as m
from ..protocol import transfer as T
from . import errors as E
from .session import Call
from .timing import wait_within
from .vmlock import VMLock

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
#: The agent's transfer nonce (docs/protocol.md: 128 random bits, hex): anything else could never
#: match its DATA_HELLO, and the host would wait for one until the idle timeout.
_NONCE_RE = re.compile(r"\A[0-9a-f]{32,}\Z")
#: What one transfer gives: (the agent's reply, its ready event, [(bytes, digest)] a file, seconds).
_Outcome = Tuple[Any, Dict[str, Any], List[Tuple[int, str]], float]
#: The copy engine's part of one transfer, run in a thread: (channel, tid, ready event, progress).
Engine = Callable[[CE.Channel, int, Dict[str, Any], Callable[[int], None]], List[Tuple[int, str]]]
_Item = TypeVar("_Item")
#: Checks a transfer's result against the agent's reply: (reply, result, request arguments).
_Verify = Callable[[Any, List[Tuple[int, str]], Dict[str, Any]], None]


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
    def rate(self) -> float:
        """MB/s (10**6 bytes per second)."""
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


#: The caller's progress callback: (bytes so far, total or None), called in the event loop.
Progress = Optional[Callable[[int, Optional[int]], None]]


class _DataLink:
    """The data socket of one client and the lock that queues its transfers."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self.lock = asyncio.Lock()
        self.sock: Optional[socket.socket] = None

    def connect(self) -> socket.socket:
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

    def reset(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _link(client: Any) -> _DataLink:
    link = client.datalink
    if link is None:
        link = client.datalink = _DataLink(client.data)
    return link


def _engine_error(exc: CE.TransferError) -> Exception:
    """A copy-engine TransferError raised on the host -> a guestlink exception."""
    if exc.code == codes.NO_SPACE:
        return OSError(errno.ENOSPC, "local disk full: %s" % exc)
    if exc.interrupted:
        return E.ConnectionLost("connection lost during the transfer: %s" % exc)
    return E.remote_error(exc.code, str(exc))


class _Progress:
    def __init__(self, loop: asyncio.AbstractEventLoop, cb: Progress, total: Optional[int],
                 base: int) -> None:
        self.loop, self.cb, self.total, self.last = loop, cb, total, 0.0
        self.base = base

    def __call__(self, pos: int) -> None:
        now = time.monotonic()
        if self.cb is not None and (now - self.last >= PROGRESS_INTERVAL or pos == self.total):
            self.last = now
            self.loop.call_soon_threadsafe(self.cb, pos, self.total)


def _ready_setter(fut: "asyncio.Future[Any]") -> Callable[[Any], None]:
    """The transfer.open call's event handler: its first event (or why it is malformed) resolves
    ``fut``, the future of this attempt only."""
    def on_event(payload: Any) -> None:
        ev: Any
        try:
            ev = m.parse_event(payload)
        except ProtocolViolation as exc:
            ev = exc
        if not fut.done():
            fut.set_result(ev)
    return on_event


def _shifted(progress: Callable[[int], None], at: int) -> Callable[[int], None]:
    """``progress`` for a file that starts ``at`` bytes into the transfer's total."""
    return lambda pos: progress(at + pos)


def _violation(what: str, exc: ProtocolViolation) -> E.ProtocolError:
    return E.malformed(what, exc)  # one wording for every malformed reply


def _reported_file(obj: Any, what: str) -> Tuple[int, str]:
    """(size, digest) of one file in the agent's final reply to a transfer, type-checked."""
    try:
        f = Fields(obj, what)
        return f.int("size", min=0, max=MAX_NS), f.str("digest", max_len=m.MAX_NAME)
    except ProtocolViolation as exc:
        raise _violation(what, exc) from None


async def _transfer_one(client: Any, direction: str, args: Dict[str, Any], engine: Engine,
                        progress: Progress, total: Optional[int], timeout: Optional[float],
                        verify: _Verify) -> _Outcome:
    """:func:`_transfer_in_turn`, queued with the other clients of a shared guestlink master:
    they share the control channel, but QEMU serves the data socket to one at a time, so each
    transfer holds the VM lock of the data socket (the same flock queue as direct clients) and
    disconnects from it when done."""
    session = client.session
    if not session.via_master or not client.data:
        return await _transfer_in_turn(client, direction, args, engine, progress, total, timeout,
                                       verify)
    turn = VMLock(client.data)
    await turn.acquire(None, None)
    try:
        return await _transfer_in_turn(client, direction, args, engine, progress, total, timeout,
                                       verify)
    finally:
        _link(client).reset()
        turn.release()


async def _transfer_in_turn(client: Any, direction: str, args: Dict[str, Any], engine: Engine,
                            progress: Progress, total: Optional[int], timeout: Optional[float],
                            verify: _Verify) -> _Outcome:
    """The one engine for both directions.

    ``args``: transfer.open arguments (without transfer/direction). ``engine(chan, tid, ready,
    progress)`` runs in a thread once the agent is ready and returns its result ((bytes, digest)
    for one file); ``verify(reply, result, args)`` checks it against the agent's reply. Returns
    (reply, ready, result, seconds).
    """

    link = _link(client)
    loop = asyncio.get_running_loop()
    async with link.lock:
        deadline_busy = loop.time() + BUSY_RETRY
        while True:
            sock = link.connect()
            tid = secrets.randbelow(T.MAX_TID) + 1
            ready_fut = loop.create_future()

            call = Call("transfer.open", _ready_setter(ready_fut))
            req = dict(args, transfer=tid, direction=direction)
            await client.session.start_call(call, "transfer.open", req, ready_fut,
                                            client.session.deadline(timeout),
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
                client.session.forget(call, cancel=True)
                raise E.ProtocolError("unexpected transfer event from the agent")
            break
        try:
            f = Fields(ev, "ready event")
            ready = {"nonce": f.str("nonce", max_len=m.MAX_NONCE, pattern=_NONCE_RE),
                     "offset": f.int("offset", min=0),
                     "size": f.int("size", default=None, min=0),
                     "mode": f.int("mode", default=None, min=0, max=0o7777),
                     "mtime_ns": f.int("mtime_ns", default=None, min=MIN_NS, max=MAX_NS),
                     "uid": f.int("uid", default=None, min=0, max=MAX_ID),
                     "gid": f.int("gid", default=None, min=0, max=MAX_ID),
                     "path": f.str("path", default=""),
                     "offsets": ev.get("offsets")}  # batch: checked by its caller
        except ProtocolViolation as exc:
            client.session.forget(call, cancel=True)
            raise E.ProtocolError("bad ready event: %s" % exc) from None
        cancel = threading.Event()
        chan = CE.Channel(sock.fileno(), cancel, what="the data socket")
        chan.idle_timeout = max(CE.IDLE_TIMEOUT, client.timeout or 0)
        prog = _Progress(loop, progress, total if total is not None else ready["size"], ready["offset"])
        started = time.monotonic()

        def run() -> List[Tuple[int, str]]:
            chan.wait_hello(tid, ready["nonce"], "agent")
            return engine(chan, tid, ready, prog)

        engine_fut = asyncio.ensure_future(loop.run_in_executor(None, run))
        engine_fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        ok = False
        try:
            done, _ = await asyncio.wait([engine_fut, call.future], return_when=asyncio.FIRST_COMPLETED)
            if engine_fut not in done:
                # the agent answered first: normally an error (it stopped); stop our side too
                failure = call.future.exception() if not call.future.cancelled() else None
                if failure is not None:
                    cancel.set()
                    await asyncio.wait([engine_fut])
                    raise failure
                await asyncio.wait([engine_fut])
            try:
                result = engine_fut.result()
            except CE.TransferError as exc:
                # the agent's explanation is better, except when our own source changed during a
                # push (the agent only sees "more data than announced" or our sender's error)
                ours = direction == "push" and exc.code == codes.CHANGED
                failure = call.future.exception() if call.future.done() else None
                if not ours and failure is not None:
                    raise failure
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
            final_deadline = client.session.deadline(max(client.timeout or 0, 30.0))
            payload = await client.session.await_reply(call, final_deadline, "transfer.open")
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
                client.session.forget(call, cancel=True)
            if not engine_fut.done():
                try:
                    await asyncio.shield(asyncio.wait([engine_fut]))
                except asyncio.CancelledError:
                    pass
            raise
        finally:
            if not ok:
                link.reset()


# --- files: a single file is a batch of one ------------------------------------------------------
#
# push_file/pull_file and the batches of push_tree/pull_tree run the same code: one request
# (the single-file wire form for push_file/pull_file, "files" for a tree's batch), one sender
# or receiver looping over the files, one verifier and one commit step (guestlink.filecopy).




def _verifier(paths: List[str], batch: bool) -> _Verify:
    """verify() for _transfer_one: the agent's reply gives each file's size and digest (a
    batch's in its list ``files``, a single file's at the top level), which must be what this
    side sent or received."""
    def verify(reply: Any, result: List[Tuple[int, str]], args: Dict[str, Any]) -> None:
        files = reply.get("files") if batch else [reply]
        if not isinstance(files, list) or len(files) != len(result):
            raise E.ProtocolError("the agent's reply does not list the batch's files")
        what = "file entry of the transfer reply" if batch else "transfer reply"
        for entry, (nbytes, digest), path in zip(files, result, paths):
            size, theirs = _reported_file(entry, what)
            if theirs != digest or size != nbytes:
                raise E.ChecksumMismatch(codes.CHECKSUM_MISMATCH, "%sthe agent reports %s %s (%d "
                                         "bytes), this side %s (%d bytes)" % (
                                             "%s: " % path if batch else "", args.get("checksum"),
                                             theirs, size, digest, nbytes))
    return verify


def _local_meta(fd: int) -> Tuple[os.stat_result, Optional[int]]:
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory (use -r)")
    regular = stat.S_ISREG(st.st_mode)
    return st, (st.st_size if regular else None)


class _Outgoing(NamedTuple):
    """One file of a push."""

    local: str
    st: os.stat_result  # as it was listed: it must not change while it is sent
    size: Optional[int]  # None: not a regular file (a pipe), sent to its end
    fd: Optional[int]  # open already (push_file, perhaps stdin), else opened in its turn


def _send(chan: CE.Channel, tid: int, src: _Outgoing, checksum: str, offset: int,
          progress: Callable[[int], None]) -> Tuple[int, str]:
    """Send one file from ``offset``; if it changes meanwhile, the agent learns why (it drops
    its temp file) and the error names it."""
    fd = src.fd if src.fd is not None else os.open(src.local, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        check = commit.unchanged_check(fd, src.size, src.st.st_mtime_ns,
                                       "%s changed during the transfer" % src.local)
        try:
            check()
            if offset:
                os.lseek(fd, offset, os.SEEK_SET)
            # threads=False: the host hashes and reads files far faster than the channel moves
            # them; a pipeline's hand-offs only cost CPU here (see CE.recv_file)
            return CE.send_file(chan, fd, tid, checksum, offset, src.size, progress=progress,
                                check=check, threads=False)
        except CE.TransferError as exc:
            if exc.code != codes.CHANGED:
                raise
            if src.local not in str(exc):  # say which file
                exc = CE.TransferError(codes.CHANGED, "%s changed during the transfer (%s)"
                                       % (src.local, exc))
            try:
                chan.write_all([T.encode_end_error(tid, exc.code, str(exc))])
            except CE.TransferError:
                pass
            raise exc from None
    finally:
        if src.fd is None:
            os.close(fd)


async def _push(client: Any, sources: List[_Outgoing], targets: List[str], args: Dict[str, Any], *,
                batch: bool, resume: bool, checksum: str, progress: Any, timeout: Optional[float],
                base: int, total: Optional[int]) -> _Outcome:
    """Push ``sources`` (to the guest paths ``targets``) in one transfer: returns (reply, ready
    event, [(bytes, digest)] a file, seconds)."""
    def engine(chan: CE.Channel, tid: int, ready: Dict[str, Any],
               prog: Callable[[int], None]) -> List[Tuple[int, str]]:
        if batch:
            offsets = ready["offsets"]
            if (not isinstance(offsets, list) or len(offsets) != len(sources)
                    or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o <= s.st.st_size
                               for o, s in zip(offsets, sources))):
                raise E.ProtocolError("bad offsets in the agent's ready event")
        else:
            offsets = [ready["offset"]]
            size = sources[0].size
            if offsets[0] > (size if size is not None and resume else 0):
                raise E.ProtocolError("bad ready event: field 'offset' (%d) is beyond what this "
                                      "side sends" % offsets[0])
        chan.write_all([T.encode_hello(tid, ready["nonce"], "host")])
        done, sent = [], base
        for i, (src, offset) in enumerate(zip(sources, offsets)):
            done.append(_send(chan, T.batch_tid(tid, i), src, checksum, offset,
                              _shifted(prog, sent)))
            sent += src.size or 0
        return done

    return await _transfer_one(client, "push", args, engine, progress, total, timeout,
                               verify=_verifier(targets, batch))


async def push_file(client: Any, local: str, remote: str, *, preserve: bool = False,
                    resume: bool = False, checksum: str = T.DEFAULT_ALGORITHM,
                    progress: Progress = None, timeout: Optional[float] = None,
                    name: Optional[str] = None, _test_corrupt: Optional[int] = None) -> TransferResult:
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
        reply, ready, result, seconds = await _push(
            client, [_Outgoing(local, st, size, fd)], [remote], args, batch=False, resume=resume,
            checksum=checksum, progress=progress, timeout=timeout, base=0, total=size)
        nbytes, digest = result[0]
        return TransferResult(local, reply.get("path", remote), nbytes, seconds, checksum, digest, 1,
                              ready["offset"])
    finally:
        if own:
            os.close(fd)


async def _push_batch(client: Any, batch: List[Tuple[str, str, os.stat_result]], *, preserve: bool,
                      resume: bool, checksum: str, progress: Progress, timeout: Optional[float],
                      base: int, grand_total: int) -> Tuple[int, str]:
    """Push the files of one batch (``[(local, guest path, lstat)]``) in one transfer: the agent
    checks them all first, then receives them in turn on one opening of the data port.
    Returns (bytes, last digest)."""
    args = {"files": [_batch_entry(target, st, preserve) for _, target, st in batch],
            "checksum": checksum, "resume": bool(resume), "preserve": preserve}
    reply, ready, result, seconds = await _push(
        client, [_Outgoing(local, st, st.st_size, None) for local, _, st in batch],
        [target for _, target, _ in batch], args, batch=True, resume=resume, checksum=checksum,
        progress=progress, timeout=timeout, base=base, total=grand_total)
    return sum(n for n, _ in result), result[-1][1]


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


def _receive(chan: CE.Channel, fd: int, tid: int, checksum: str, offset: int, size: int,
             progress: Optional[Callable[[int], None]]) -> Tuple[int, str]:
    """recv_file for a pull: never more than the ``size`` the guest announced (recv_file refuses
    the excess; a frame too large for it is said to be more than announced, too)."""
    try:
        # one thread: faster on the host; writeback: the fsync before the ack finds the file
        # mostly written (see CE.recv_file)
        return CE.recv_file(chan, fd, tid, checksum, offset, size, progress=progress,
                            threads=False, writeback=WRITEBACK)
    except CE.TransferError as exc:
        if exc.code != codes.TOO_LARGE:
            raise
        raise CE.TransferError(exc.code, "%s (the guest announced %d bytes)" % (exc, size),
                               exc.interrupted) from None


#: A pull starts the writeback of every this many bytes received (CE._start_writeback).
WRITEBACK = 8 << 20


class _Incoming(NamedTuple):
    """One file of a pull: received into ``partial`` beside ``dest`` (``dest`` "-": stdout)."""

    remote: str
    dest: str
    partial: Optional[str]
    offset: int
    size: int
    mtime_ns: int
    attrs: Any  # ListEntry-like (mode, mtime_ns, uid, gid) for the commit step; None: the ready event's
    parts: Optional[List[str]] = None  # a tree's file: its path below the root, checked again

    def request(self) -> Dict[str, Any]:
        return {"path": self.remote, "size": self.size, "mtime_ns": self.mtime_ns, "offset": self.offset}


def _resume_at(parent: str, partial: str, size: int) -> int:
    """commit.resume_offset by path (0 where the directory is not there yet)."""
    try:
        dfd = commit.open_directory(parent)
    except OSError:
        return 0
    try:
        return commit.resume_offset(dfd, partial, size)
    finally:
        os.close(dfd)


def _pulled_attrs(dfd: int, name: str, meta: Any, preserve: bool) -> commit.Attrs:
    """Owner, mode and mtime of a pulled file: with -p the guest's (never setuid/setgid), else
    the mode of the file it replaces or the default."""
    if not preserve:
        try:
            kept: Optional[os.stat_result] = os.stat(name, dir_fd=dfd)
        except OSError:
            kept = None
        return commit.Attrs(commit.kept_mode(kept))
    mode = meta.mode if meta.mode is not None else commit.kept_mode(None)
    return commit.Attrs(mode, GUEST_MODE_BITS, meta.mtime_ns, meta.uid, meta.gid)


class _Landing:
    """The file a pull is writing: its directory fd, temp file and fd (closed and, unless kept
    for --resume, removed if the pull fails)."""

    def __init__(self) -> None:
        self.dfd: Optional[int] = None
        self.fd: Optional[int] = None
        self.partial: Optional[str] = None
        self.keep = False

    def open(self, item: _Incoming, replace_link: bool) -> None:
        parent, name = os.path.split(item.dest)
        partial = item.partial or ""  # only stdout has none, and it is not opened
        self.dfd = dfd = commit.open_directory(parent)
        old = commit.existing(dfd, name)
        if replace_link and old is not None and stat.S_ISLNK(old.st_mode):
            os.unlink(name, dir_fd=dfd)  # never written through a link
        try:
            self.fd = commit.open_partial(dfd, partial, item.offset)
        except commit.PartialReplaced:
            raise E.ProtocolError("%s was replaced since the pull was planned"
                                  % os.path.join(parent, partial)) from None
        self.partial = partial

    def commit(self, item: _Incoming, meta: Any, preserve: bool, sync_dir: bool) -> None:
        assert self.fd is not None and self.dfd is not None and self.partial is not None  # open()
        name = os.path.basename(item.dest)
        commit.commit(self.fd, self.dfd, self.partial, name,
                      _pulled_attrs(self.dfd, name, meta, preserve), sync_dir=sync_dir)
        self.partial = None
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.dfd is not None:
            if self.partial is not None and not self.keep:
                commit.drop_partial(self.dfd, self.partial)
            self.partial = None
            os.close(self.dfd)
            self.dfd = None


def _sync_directories(paths: Set[str]) -> None:
    for path in sorted(paths):
        try:
            dfd = commit.open_directory(path)
        except OSError:
            continue
        try:
            commit.sync_directory(dfd)
        finally:
            os.close(dfd)


async def _pull(client: Any, items: List[_Incoming], args: Dict[str, Any], *, batch: bool,
                root: Optional[str], preserve: bool, checksum: str, progress: Any,
                timeout: Optional[float], base: int, total: int) -> _Outcome:
    """Pull ``items`` in one transfer, each received into its temp file and committed: a batch's
    files each before the next (a later failure leaves them), a single file once the agent's
    reply agrees. Returns (reply, ready event, [(bytes, digest)] a file, seconds)."""
    landing = _Landing()
    to_stdout = not batch and items[0].dest == "-"
    if not batch and not to_stdout:
        landing.open(items[0], replace_link=False)  # a local error stops it before it starts

    def engine(chan: CE.Channel, tid: int, ready: Dict[str, Any],
               prog: Callable[[int], None]) -> List[Tuple[int, str]]:
        if not batch and (ready["offset"] != items[0].offset or ready["size"] not in (None, items[0].size)):
            raise E.ProtocolError("bad ready event: field 'offset' %d / 'size' %s where %d / %d "
                                  "was asked" % (ready["offset"], ready["size"], items[0].offset,
                                                 items[0].size))
        done, received = [], base
        renamed_in: Set[str] = set()  # directories to fsync: once each, even if a later file fails
        try:
            for i, item in enumerate(items):
                if item.parts is not None and root is not None:
                    _safe_parent(root, item.parts)  # again: nothing may have moved under us
                if landing.fd is None and not to_stdout:
                    landing.open(item, replace_link=True)
                fd = sys.stdout.fileno() if to_stdout else landing.fd
                assert fd is not None  # opened just above
                try:
                    done.append(_receive(chan, fd, T.batch_tid(tid, i), checksum, item.offset,
                                         item.size, _shifted(prog, received)))
                except CE.TransferError as exc:
                    landing.keep = exc.interrupted  # the verified prefix stays for --resume
                    raise
                if batch:
                    landing.commit(item, item.attrs, preserve, sync_dir=False)
                    renamed_in.add(os.path.dirname(item.dest))
                elif not to_stdout:
                    os.fsync(fd)  # before the ack (committed once the reply agrees)
                received += item.size
        finally:
            _sync_directories(renamed_in)
        chan.write_all([T.encode_ack(T.batch_tid(tid, len(items) - 1))])
        return done

    try:
        try:
            reply, ready, result, seconds = await _transfer_one(
                client, "pull", args, engine, progress, total, timeout,
                verify=_verifier([item.remote for item in items], batch))
        except (E.ConnectionLost, E.RequestTimeout):
            landing.keep = True  # interrupted: the verified prefix stays for --resume
            raise
        if landing.fd is not None:
            landing.commit(items[0], _ReadyMeta.of(ready), preserve, sync_dir=True)
    finally:
        landing.close()
    return reply, ready, result, seconds


class _ReadyMeta(NamedTuple):
    """A single pull's attributes, from the agent's ready event."""

    mode: Optional[int]
    mtime_ns: Optional[int]
    uid: Optional[int]
    gid: Optional[int]

    @classmethod
    def of(cls, ready: Dict[str, Any]) -> "_ReadyMeta":
        return cls(ready["mode"], ready["mtime_ns"], ready["uid"], ready["gid"])


async def pull_file(client: Any, remote: str, local: str, *, preserve: bool = False,
                    resume: bool = False, checksum: str = T.DEFAULT_ALGORITHM,
                    progress: Progress = None, timeout: Optional[float] = None,
                    remote_stat: Any = None, _test_corrupt: Optional[int] = None) -> TransferResult:
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
    if local == "-":
        item = _Incoming(remote, "-", None, 0, size, mtime_ns, None)
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
        offset = _resume_at(parent, partial, size) if resume else 0
        _check_space(parent, size - offset)
        item = _Incoming(remote, dest, partial, offset, size, mtime_ns, None)
    args = dict(item.request(), checksum=checksum)
    if _test_corrupt is not None:
        args["test_corrupt"] = _test_corrupt
    reply, ready, result, seconds = await _pull(
        client, [item], args, batch=False, root=None, preserve=preserve, checksum=checksum,
        progress=progress, timeout=timeout, base=0, total=size)
    nbytes, digest = result[0]
    return TransferResult(remote, item.dest, nbytes, seconds, checksum, digest, 1, ready["offset"])


async def _pull_batch(client: Any, root: str, batch: List[_Incoming], *, preserve: bool,
                      checksum: str, progress: Progress, timeout: Optional[float], base: int,
                      grand_total: int) -> Tuple[int, str]:
    """Pull the files of one batch (``[_Incoming]``) in one transfer: the agent sends them in
    turn on one opening of the data port; each is received into a temp file beside its
    destination, verified and renamed before the next (at most its listed size is accepted).
    Returns (bytes, last digest)."""
    args = {"files": [item.request() for item in batch], "checksum": checksum}
    reply, ready, result, seconds = await _pull(
        client, batch, args, batch=True, root=root, preserve=preserve, checksum=checksum,
        progress=progress, timeout=timeout, base=base, total=grand_total)
    return sum(n for n, _ in result), result[-1][1]


# --- trees ---------------------------------------------------------------------------------------

def _join_remote(root: str, rel: str) -> str:
    return root.rstrip("/") + "/" + rel if root != "/" else "/" + rel


async def push_tree(client: Any, local: str, remote: str, *, preserve: bool = False,
                    resume: bool = False, checksum: str = T.DEFAULT_ALGORITHM,
                    progress: Progress = None, timeout: Optional[float] = None) -> TransferResult:
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

    async def mkdir(path: str, st: os.stat_result) -> None:
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
    for batch in _batches(files, lambda f: _batch_entry(f[1], f[2], preserve)):
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


def _batch_entry(target: str, st: os.stat_result, preserve: bool) -> Dict[str, Any]:
    entry = {"path": target, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "mode": stat.S_IMODE(st.st_mode)}
    if preserve:
        entry.update(uid=st.st_uid, gid=st.st_gid)
    return entry


def _batches(items: Iterable[_Item], request_entry: Callable[[_Item], Dict[str, Any]]
             ) -> Iterator[List[_Item]]:
    """Split ``items`` into batches of at most T.MAX_BATCH files and T.BATCH_REQUEST_BYTES of
    request (``request_entry(item)``: the item's entry in transfer.open's "files"): a batch opens
    the agent's data port once for all its files."""
    batch: List[_Item] = []
    nbytes = 0
    for item in items:
        size = len(m.dump_json(request_entry(item))) + 1
        if batch and (len(batch) >= T.MAX_BATCH or nbytes + size > T.BATCH_REQUEST_BYTES):
            yield batch
            batch, nbytes = [], 0
        batch.append(item)
        nbytes += size
    if batch:
        yield batch


def _safe_parent(root: str, parts: List[str]) -> str:
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


async def list_tree(client: Any, remote: str, timeout: Optional[float] = None,
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


async def pull_tree(client: Any, remote: str, local: str, *, preserve: bool = False,
                    resume: bool = False, checksum: str = T.DEFAULT_ALGORITHM,
                    progress: Progress = None, timeout: Optional[float] = None,
                    _list_op: str = "fs.list") -> TransferResult:
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
                need -= _resume_at(os.path.dirname(dest),
                                   T.partial_name(dest, e.size, e.mtime_ns, checksum), e.size)
        plan.append((parts, rel, e))
    _check_space(root, need)
    total = TransferResult(remote, root, algorithm=checksum)
    t0 = time.monotonic()
    os.makedirs(root, exist_ok=True)
    if os.path.islink(root) or not os.path.isdir(root):
        raise E.ProtocolError("%s is not a directory" % root)
    mask = commit.umask()
    dirs = []  # (path, listing entry, created here)
    files = []  # _Incoming: pulled in batches once every directory exists
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
            os.symlink(e.target or "", dest)  # (a symlink without a target was refused above)
        elif e.type == "file" and e.size is not None and e.mtime_ns is not None:  # (checked above)
            partial = T.partial_name(dest, e.size, e.mtime_ns, checksum)
            offset = _resume_at(os.path.dirname(dest), partial, e.size) if resume else 0
            files.append(_Incoming(_join_remote(remote, rel), dest, partial, offset, e.size,
                                   e.mtime_ns, e, parts))
    del plan, seen, entries
    grand_total = sum(item.size for item in files)
    for batch in _batches(files, _Incoming.request):
        nbytes, digest = await _pull_batch(client, root, batch, preserve=preserve,
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


async def push(client: Any, local: str, remote: str, *, recursive: bool = False,
               **kw: Any) -> TransferResult:
    if recursive and local != "-" and os.path.isdir(local):
        return await push_tree(client, local, remote, **kw)
    if local != "-" and os.path.isdir(local):
        raise IsADirectoryError(errno.EISDIR, "%s is a directory (use -r)" % local)
    return await push_file(client, local, remote, **kw)


async def pull(client: Any, remote: str, local: str, *, recursive: bool = False,
               _list_op: str = "fs.list", **kw: Any) -> TransferResult:
    rst = _stat_fields(await client.call("fs.stat", {"path": remote}, timeout=kw.get("timeout")),
                       remote)
    if rst["type"] == "dir" or _list_op != "fs.list":
        if not recursive:
            raise E.RemoteIsADirectory(codes.IS_A_DIRECTORY, "%s is a directory in the guest "
                                       "(use -r)" % remote)
        return await pull_tree(client, remote, local, _list_op=_list_op, **kw)
    return await pull_file(client, remote, local, remote_stat=rst, **kw)
