"""The host's file transfer against a hostile guest: a fake agent over the real unix sockets
(control and data) sends crafted listings, stat replies, ready events, data and final replies.

Whatever the guest sends, the host keeps its memory bounded, ends, writes nothing it was not
announced, and raises only errors from the documented tree (host/errors.py)."""
import asyncio
import errno
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
import tracemalloc

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import guestlink  # noqa: E402
from guestlink.host import errors as E  # noqa: E402
from guestlink.host import transfer as HT  # noqa: E402
from guestlink.protocol import messages as m  # noqa: E402
from guestlink.protocol import transfer as T  # noqa: E402
from test_host_fakeagent import FakeAgent, short_tmp  # noqa: E402

NONCE = "ab" * 16


def run(coro, limit=30):
    return asyncio.run(asyncio.wait_for(coro, limit))


class HostileAgent(FakeAgent):
    """FakeAgent plus the data port (``<ctl>.data``) and a scripted pull sender."""

    def __init__(self, path, **knobs):
        FakeAgent.__init__(self, path, **knobs)
        self.data_path = self.path + ".data"
        self.listener = None
        self.data_sock = None

    async def start(self):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.data_path)
        self.listener.listen(4)
        self.listener.setblocking(False)
        return await FakeAgent.start(self)

    async def stop(self):
        await FakeAgent.stop(self)
        for sock in (self.data_sock, self.listener):
            if sock is not None:
                sock.close()
        if os.path.exists(self.data_path):
            os.unlink(self.data_path)

    async def data(self) -> socket.socket:
        if self.data_sock is None:
            sock, _ = await asyncio.get_running_loop().sock_accept(self.listener)
            sock.setblocking(False)
            self.data_sock = sock
        return self.data_sock

    async def send_files(self, conn, id_, args, contents, ready=None, chunk=T.DEFAULT_CHUNK):
        """Play the sending side of a pull: ready event, DATA_HELLO, each file's DATA frames and
        DATA_END (sub-transfer ids for a batch), then wait for the host's acknowledgement.
        Returns [(size, digest)] per file, or None when the host hung up."""
        tid = args.int("transfer")
        algorithm = args.str("checksum")
        event = {"event": "ready", "transfer": tid, "nonce": NONCE, "offset": 0}
        event.update(ready or {})
        conn.send(m.encode_event(id_, event))
        loop = asyncio.get_running_loop()
        sock = await self.data()
        batch = args.obj.get("files") is not None
        done = []
        try:
            await loop.sock_sendall(sock, T.encode_hello(tid, NONCE, "agent"))
            for i, data in enumerate(contents):
                sub = T.batch_tid(tid, i) if batch else tid
                digest = T.new_digest(algorithm)
                for off in range(0, len(data), chunk):
                    piece = data[off:off + chunk]
                    digest.update(piece)
                    await loop.sock_sendall(sock, b"".join(
                        bytes(p) for p in T.data_parts(sub, off, piece)))
                await loop.sock_sendall(sock, T.encode_end(sub, len(data), algorithm,
                                                           digest.hexdigest()))
                done.append((len(data), digest.hexdigest()))
            ack = T.encode_ack(T.batch_tid(tid, len(contents) - 1) if batch else tid)
            got = b""
            while len(got) < len(ack):
                more = await loop.sock_recv(sock, len(ack) - len(got))
                if not more:
                    raise ConnectionResetError
                got += more
        except OSError:
            self.data_sock = None
            sock.close()
            return None
        return done


def reply_for(args, done):
    """The agent's final reply to a pull (single or batch)."""
    algorithm = args.str("checksum")
    if args.obj.get("files") is not None:
        files = [{"path": f["path"], "size": n, "digest": d, "offset": 0}
                 for f, (n, d) in zip(args.obj["files"], done)]
        return {"path": files[0]["path"], "size": sum(n for n, _ in done), "digest": done[-1][1],
                "algorithm": algorithm, "offset": 0, "files": files}
    return {"path": args.str("path"), "size": done[0][0], "digest": done[0][1],
            "algorithm": algorithm, "offset": 0}


def stat_reply(kind="file", size=3, **extra):
    out = {"type": kind, "size": size, "mode": 0o644, "mtime_ns": 1_000_000_000, "uid": 0,
           "gid": 0}
    out.update(extra)
    return out


@pytest.fixture
def ctl(tmp_path):
    return os.path.join(short_tmp(tmp_path), "ctl.sock")


@pytest.fixture
def dl(tmp_path):
    """The host's destination directory (apart from the sockets, which may be in tmp_path)."""
    d = tmp_path / "dl"
    d.mkdir()
    return d


def connect(ctl):
    return guestlink.connect(ctl=ctl, data=ctl + ".data", timeout=5)


def pages_handler(page_for):
    """An fs.list handler from ``page_for(start) -> reply``; the fs.stat of the root is a dir."""
    async def fs_list(conn, id_, args):
        return page_for(args.int("start", default=0))
    return fs_list


async def dir_stat(conn, id_, args):
    return stat_reply("dir", 4096, mode=0o755)


def pull_tree_with(ctl, dest, handlers, **kw):
    async def main():
        async with HostileAgent(ctl, handlers=handlers) as agent:
            async with connect(ctl) as vm:
                try:
                    return await vm.pull("/tree", str(dest), recursive=True, **kw), agent
                except (E.GuestlinkError, OSError) as exc:
                    return exc, agent
    return run(main())


# --- (a)-(c) the listing ----------------------------------------------------------------------

def test_listing_entries_with_junk_keys_do_not_pile_up_in_host_memory(ctl, tmp_path):
    """One entry per page, each carrying 250 KiB of junk under an unknown key: the host keeps
    only the entry's validated fields (before: every page's junk stayed, 200 pages = 50 MiB)."""
    pages = 200
    junk = "x" * (250 * 1024)

    def page(start):
        entry = {"path": "d%03d" % start, "type": "dir", "mode": 0o755, "mtime_ns": 0,
                 "junk": junk}
        return {"entries": [entry], "next": start + 1 if start + 1 < pages else None}

    tracemalloc.start()
    try:
        result, agent = pull_tree_with(ctl, tmp_path / "dest",
                                       {"fs.stat": dir_stat, "fs.list": pages_handler(page)})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(result, HT.TransferResult), result
    assert len(os.listdir(tmp_path / "dest")) == pages
    # a few pages in flight at most (before: all 200 pages, 49 MiB)
    assert peak < 8 << 20, "host memory peaked at %d KiB" % (peak >> 10)


def test_listing_bytes_are_bounded(ctl, tmp_path, monkeypatch):
    """Long (valid) names count against the retained-bytes bound: a clear error, not more RAM."""
    monkeypatch.setattr(HT, "MAX_TREE_BYTES", 100_000)

    def page(start):
        return {"entries": [{"path": "%05d%s" % (start + i, "n" * 200), "type": "dir"}
                            for i in range(100)], "next": start + 100}

    result, agent = pull_tree_with(ctl, tmp_path / "dest",
                                   {"fs.stat": dir_stat, "fs.list": pages_handler(page)})
    assert isinstance(result, E.ProtocolError) and "bytes" in str(result), result
    assert len([r for r in agent.requests if r[0] == "fs.list"]) == 5
    assert not (tmp_path / "dest").exists()


def test_listing_pages_are_bounded(ctl, tmp_path, monkeypatch):
    monkeypatch.setattr(HT, "MAX_TREE_PAGES", 30)
    result, agent = pull_tree_with(ctl, tmp_path / "dest", {
        "fs.stat": dir_stat,
        "fs.list": pages_handler(lambda s: {"entries": [{"path": "d%d" % s, "type": "dir"}],
                                            "next": s + 1})})
    assert isinstance(result, E.ProtocolError) and "30 pages" in str(result), result
    assert len([r for r in agent.requests if r[0] == "fs.list"]) == 30


def test_empty_pages_that_never_end_are_refused_at_once(ctl, tmp_path):
    """Empty pages with next = start + 1 used to be followed forever."""
    t0 = time.monotonic()
    result, agent = pull_tree_with(ctl, tmp_path / "dest", {
        "fs.stat": dir_stat,
        "fs.list": pages_handler(lambda s: {"entries": [], "next": s + 1})})
    assert time.monotonic() - t0 < 10
    assert isinstance(result, E.ProtocolError) and "empty page" in str(result), result
    assert len([r for r in agent.requests if r[0] == "fs.list"]) == 1


@pytest.mark.parametrize("skew", [+3, -1, "x", 1.5])
def test_next_must_follow_the_entries_given(ctl, tmp_path, skew):
    def page(start):
        if start >= 4:
            return {"entries": [{"path": "late%d" % start, "type": "dir"}], "next": None}
        nxt = start + 2 + skew if isinstance(skew, int) else skew
        return {"entries": [{"path": "d%d" % (start + i), "type": "dir"} for i in range(2)],
                "next": nxt}

    result, agent = pull_tree_with(ctl, tmp_path / "dest",
                                   {"fs.stat": dir_stat, "fs.list": pages_handler(page)})
    assert isinstance(result, E.ProtocolError) and "next" in str(result), result
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("entry", [
    {"path": "f", "type": "file", "size": "3", "mtime_ns": 0},
    {"path": "f", "type": "file", "size": 3, "mtime_ns": 2 ** 80},
    {"path": "f", "type": "file", "size": 3, "mtime_ns": 0, "mode": "0644"},
    {"path": "f", "type": "file", "size": 3, "mtime_ns": 0, "uid": -5},
    {"path": 7, "type": "dir"},
    {"path": "d", "type": ["dir"]},
    {"path": "l", "type": "symlink", "target": 5},
    {"path": "l", "type": "symlink", "target": "t" * 5000},
    "not an object",
])
def test_bad_listing_entries_are_protocol_errors(ctl, tmp_path, entry):
    result, agent = pull_tree_with(ctl, tmp_path / "dest", {
        "fs.stat": dir_stat,
        "fs.list": pages_handler(lambda s: {"entries": [entry], "next": None})})
    assert isinstance(result, E.ProtocolError), result
    assert not (tmp_path / "dest").exists()


# --- (d) wrongly typed fields: fs.stat, ready event, final reply ---------------------------------

def pull_file_with(ctl, dest, stat=None, ready=None, reply=None, contents=(b"abc",), chunk=None):
    """Pull /f with a scripted fs.stat, ready event additions and final reply changes."""
    async def fs_stat(conn, id_, args):
        return stat if stat is not None else stat_reply(size=len(contents[0]))

    async def transfer_open(conn, id_, args):
        agent.opened.append(dict(args.obj))
        kw = {"chunk": chunk} if chunk else {}
        done = await conn.agent.send_files(conn, id_, args, list(contents), ready, **kw)
        if done is None:
            return None  # the host hung up: it has already given up on this reply
        out = reply_for(args, done)
        out.update(reply or {})
        return out

    agent = HostileAgent(ctl, handlers={"fs.stat": fs_stat, "transfer.open": transfer_open})
    agent.opened = []

    async def main():
        async with agent:
            async with connect(ctl) as vm:
                try:
                    return await vm.pull("/f", str(dest))
                except (E.GuestlinkError, OSError) as exc:
                    return exc
    return run(main()), agent


def test_a_well_behaved_pull_works(ctl, dl):
    result, agent = pull_file_with(ctl, dl / "out", contents=(b"hello",))
    assert isinstance(result, HT.TransferResult), result
    assert (dl / "out").read_bytes() == b"hello" and result.bytes == 5
    assert os.listdir(dl) == ["out"]


@pytest.mark.parametrize("where,field,value", [
    ("stat", "size", "3"),
    ("stat", "size", -1),
    ("stat", "size", None),
    ("stat", "mtime_ns", 1.5),
    ("stat", "type", 5),
    ("stat", "mode", "0644"),
    ("stat", "uid", True),
    ("ready", "size", "3"),
    ("ready", "size", 4),
    ("ready", "offset", 2),
    ("ready", "mtime_ns", 2 ** 70),
    ("ready", "mode", "rw"),
    ("reply", "size", "3"),
    ("reply", "digest", 5),
    ("reply", "digest", None),
    ("reply", "path", ["x"]),
])
def test_wrongly_typed_fields_from_the_guest_are_protocol_errors(ctl, dl, where, field, value):
    stat = stat_reply(size=3)
    if where == "stat":
        stat[field] = value
    result, agent = pull_file_with(ctl, dl / "out", stat=stat,
                                   ready={field: value} if where == "ready" else None,
                                   reply={field: value} if where == "reply" else None)
    assert isinstance(result, E.ProtocolError), result
    assert field in str(result)
    assert os.listdir(dl) == []


# --- (e) the announced size is enforced -----------------------------------------------------------

@pytest.mark.parametrize("chunk", [1024, T.DEFAULT_CHUNK])
def test_a_pull_gets_no_more_than_announced(ctl, dl, chunk):
    """fs.stat says 3 bytes, the ready event says nothing, the guest sends 1 MiB: the host
    stops, says so and leaves nothing behind (before: it wrote the whole MiB)."""
    result, agent = pull_file_with(ctl, dl / "out", stat=stat_reply(size=3),
                                   contents=(os.urandom(1 << 20),), chunk=chunk)
    assert isinstance(result, E.GuestlinkError), result
    assert "announced 3 bytes" in str(result)
    assert os.listdir(dl) == []


def test_a_tree_pull_gets_no_more_than_listed(ctl, tmp_path):
    async def fs_list(conn, id_, args):
        return {"entries": [{"path": "f", "type": "file", "size": 3, "mtime_ns": 0}], "next": None}

    async def transfer_open(conn, id_, args):
        await conn.agent.send_files(conn, id_, args, [os.urandom(1 << 20)], chunk=1024)

    dest = tmp_path / "dest"
    result, agent = pull_tree_with(ctl, dest, {"fs.stat": dir_stat, "fs.list": fs_list,
                                               "transfer.open": transfer_open})
    assert isinstance(result, E.GuestlinkError) and "announced 3 bytes" in str(result), result
    assert os.listdir(dest) == []


# --- (f) free space on the host ---------------------------------------------------------------

@pytest.fixture
def small_fs():
    """A 1 MiB tmpfs (this suite runs as root, as the host CLI does)."""
    assert os.geteuid() == 0, "this test mounts a tmpfs: run it as root"
    d = tempfile.mkdtemp(prefix="gl-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", d], check=True)
        os.rmdir(d)


def test_a_pull_larger_than_the_free_space_is_refused_before_it_starts(ctl, small_fs):
    result, agent = pull_file_with(ctl, os.path.join(small_fs, "big"),
                                   stat=stat_reply(size=4 << 20), contents=(b"x" * (4 << 20),))
    assert isinstance(result, OSError) and result.errno == errno.ENOSPC, result
    assert "%d bytes needed, %d free" % (4 << 20, 1 << 20) in str(result)
    assert agent.opened == []  # refused before the transfer was opened
    assert os.listdir(small_fs) == []


def test_a_tree_pull_larger_than_the_free_space_is_refused_before_it_starts(ctl, small_fs):
    async def fs_list(conn, id_, args):
        return {"entries": [{"path": "sub", "type": "dir"}] + [
            {"path": "sub/f%d" % i, "type": "file", "size": 600 << 10, "mtime_ns": 0}
            for i in range(2)], "next": None}

    exc, agent = pull_tree_with(ctl, small_fs, {"fs.stat": dir_stat, "fs.list": fs_list})
    assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC, exc
    assert "%d bytes needed" % (1200 << 10) in str(exc)
    assert [r[0] for r in agent.requests] == ["fs.stat", "fs.list"]
    assert os.listdir(small_fs) == []


# --- (g) directory modes --------------------------------------------------------------------

def _tree_of_dirs(ctl, dest, modes, preserve):
    def page(start):
        return {"entries": [{"path": "d%o" % mode, "type": "dir", "mode": mode, "mtime_ns": 0}
                            for mode in modes], "next": None}
    old = os.umask(0o027)
    try:
        result, agent = pull_tree_with(ctl, dest, {"fs.stat": dir_stat,
                                                   "fs.list": pages_handler(page)},
                                       preserve=preserve)
    finally:
        os.umask(old)
    assert isinstance(result, HT.TransferResult), result
    return {mode: stat.S_IMODE(os.stat(os.path.join(dest, "d%o" % mode)).st_mode)
            for mode in modes}


def test_pulled_directories_get_the_host_default_mode_without_p(ctl, tmp_path):
    got = _tree_of_dirs(ctl, tmp_path / "dest", [0o777, 0o1777, 0o2775, 0o500], preserve=False)
    assert got == {0o777: 0o750, 0o1777: 0o750, 0o2775: 0o750, 0o500: 0o750}


def test_pulled_directories_with_p_take_guest_modes_without_setuid_setgid(ctl, tmp_path):
    got = _tree_of_dirs(ctl, tmp_path / "dest", [0o1777, 0o6775, 0o500], preserve=True)
    assert got == {0o1777: 0o1777, 0o6775: 0o775, 0o500: 0o500}


# --- (h) durability: the directory is fsynced after the rename --------------------------------

def _record_fsyncs(monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", stat.S_ISDIR(st.st_mode), st.st_ino))
        return real_fsync(fd)

    def replace(src, dst, *a, **kw):
        real_replace(src, dst, *a, **kw)
        if kw.get("dst_dir_fd") is not None:  # renamed within a held directory fd
            events.append(("replace", os.fstat(kw["dst_dir_fd"]).st_ino))
        else:
            events.append(("replace", os.stat(os.path.dirname(os.path.abspath(dst))).st_ino))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _dir_fsynced_after_rename(events):
    """Every rename is followed by an fsync of the directory it renamed in."""
    renames = [i for i, ev in enumerate(events) if ev[0] == "replace"]
    assert renames, events
    for i in renames:
        if ("fsync", True, events[i][1]) not in events[i + 1:]:
            return False
    return True


def test_a_pulled_file_is_durable_in_its_directory(ctl, dl, monkeypatch):
    events = _record_fsyncs(monkeypatch)
    result, agent = pull_file_with(ctl, dl / "out", contents=(b"hello",))
    assert isinstance(result, HT.TransferResult), result
    assert _dir_fsynced_after_rename(events), events


def test_tree_pulled_files_are_durable_in_their_directories(ctl, tmp_path, monkeypatch):
    events = _record_fsyncs(monkeypatch)
    files = {"a": b"one", "sub/b": b"two!"}

    async def fs_list(conn, id_, args):
        return {"entries": [{"path": "a", "type": "file", "size": 3, "mtime_ns": 0},
                            {"path": "sub", "type": "dir"},
                            {"path": "sub/b", "type": "file", "size": 4, "mtime_ns": 0}],
                "next": None}

    async def transfer_open(conn, id_, args):
        contents = [files[f["path"][len("/tree/"):]] for f in args.obj["files"]]
        done = await conn.agent.send_files(conn, id_, args, contents)
        return reply_for(args, done) if done is not None else None

    result, agent = pull_tree_with(ctl, tmp_path / "dest", {
        "fs.stat": dir_stat, "fs.list": fs_list, "transfer.open": transfer_open})
    assert isinstance(result, HT.TransferResult), result
    assert result.files == 2
    assert (tmp_path / "dest" / "sub" / "b").read_bytes() == b"two!"
    assert _dir_fsynced_after_rename(events), events


# --- push: the agent's ready event cannot move the host's reading position ----------------------

@pytest.mark.parametrize("resume", [False, True])
def test_a_push_ready_offset_beyond_what_the_host_sends_is_a_protocol_error(ctl, tmp_path, resume):
    src = tmp_path / "src"
    src.write_bytes(b"abc")

    async def transfer_open(conn, id_, args):
        await conn.agent.send_files(conn, id_, args, [], ready={"offset": 10})

    async def main():
        async with HostileAgent(ctl, handlers={"transfer.open": transfer_open}):
            async with connect(ctl) as vm:
                with pytest.raises(E.ProtocolError, match="offset"):
                    await vm.push(str(src), "/f", resume=resume)
    run(main())
