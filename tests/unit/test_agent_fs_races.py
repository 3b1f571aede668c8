"""The agent's file operations against another guest user who swaps path components (issue 9).

Other users of the guest are untrusted: between the agent's policy check and its use of a path
they may rename a directory of theirs and put a symlink to somewhere else in its place. Instead
of racing threads, each test swaps the component at EVERY point between two of the agent's
system calls in turn (a profile hook counts the ``posix`` calls of the thread running the
operation and swaps right after the k-th; k = 1, 2, ... until the operation makes fewer calls):
whatever moment the attacker picks, nothing outside the policy roots may be read, written,
created, removed or have its attributes changed. A swap before the first call is the static
case: a symlink out of the roots that is already there.
"""
import os
import shutil
import stat
import sys
import threading
import types

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from guestlink.filecopy import engine as CE  # noqa: E402
from guestlink.agent.execs import OpError  # noqa: E402
from guestlink.protocol import Fields, ProtocolViolation, codes  # noqa: E402
from guestlink.protocol import transfer as T  # noqa: E402

# the `bed` fixture (a FileOps with a unix socket as its data port) is in conftest.py

NOBODY = 65534
MAX_CALLS = 400  # far more system calls than any one of these operations makes


def _call_count(op):
    """Run ``op`` once, unswapped: (its result, how many posix calls it made in this thread)."""
    n = [0]

    def prof(frame, event, arg):
        if event in ("c_return", "c_exception") and getattr(arg, "__module__", None) == "posix":
            n[0] += 1

    sys.setprofile(prof)
    try:
        out = op()
    finally:
        sys.setprofile(None)
    return out, n[0]


def _with_swap_after(k, op, swap):
    """Run ``op`` with ``swap()`` done right after its k-th posix call (before any, for k = 0)."""
    n = [0]
    if k == 0:
        swap()

    def prof(frame, event, arg):
        if event in ("c_return", "c_exception") and getattr(arg, "__module__", None) == "posix":
            n[0] += 1
            if n[0] == k:  # no events while a profile function runs: swap's own calls don't count
                swap()

    sys.setprofile(prof)
    try:
        return op()
    finally:
        sys.setprofile(None)


def each_swap_point(setup, op, swap, check):
    """For every k: a fresh ``setup()``, ``op()`` with the swap after its k-th call (an OpError is
    a fine outcome), then ``check(result or the OpError)``. Unswapped, ``op`` must succeed (else
    every refusal would pass for safety). Returns the number of points tried."""
    setup()
    fds = len(os.listdir("/proc/self/fd"))
    out, calls = _call_count(op)
    check(out)
    assert 0 < calls < MAX_CALLS, calls
    for k in range(calls + 1):
        setup()
        try:
            out = _with_swap_after(k, op, swap)
        except OpError as exc:
            out = exc
        check(out)
    assert len(os.listdir("/proc/self/fd")) == fds  # every directory walked to was let go
    return calls + 1


def swapper(component, outside):
    """The attacker's move: ``component`` (a directory of theirs) becomes a symlink to
    ``outside``."""
    def swap():
        if os.path.islink(component):
            return
        os.rename(component, component + ".aside")
        os.symlink(outside, component)
    return swap


class Tree:
    """``root`` holds ``inside`` (the policy root: ``inside/sub`` the attacker's directory) and
    ``outside`` (beyond the roots: its files have the same names as those in ``sub``)."""

    def __init__(self, base):
        self.base = base
        self.inside = os.path.join(base, "inside")
        self.sub = os.path.join(self.inside, "sub")
        self.outside = os.path.join(base, "outside")

    def make(self, files=(), dirs=()):
        for d in (self.inside, self.outside):
            if os.path.lexists(d):
                shutil.rmtree(d)
        for d in (self.sub, self.outside):
            os.makedirs(d)
            for name in dirs:
                os.mkdir(os.path.join(d, name))
                os.chmod(os.path.join(d, name), 0o700)
            for name in files:
                with open(os.path.join(d, name), "wb") as f:
                    f.write(("inside %s" % name if d == self.sub else "SECRET %s" % name).encode())
                os.chmod(os.path.join(d, name), 0o600)
                os.utime(os.path.join(d, name), ns=(10 ** 9, 10 ** 9))
        if os.path.lexists(self.sub + ".aside"):
            shutil.rmtree(self.sub + ".aside")

    def outside_state(self):
        """Everything the attacker wants to change: names, modes, owners, times, contents."""
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.outside):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                data = open(p, "rb").read() if stat.S_ISREG(st.st_mode) else None
                out[os.path.relpath(p, self.outside)] = (st.st_mode, st.st_uid, st.st_gid,
                                                         st.st_mtime_ns, data)
        return out


@pytest.fixture
def tree(bed):
    t = Tree(os.path.dirname(bed.target))
    bed.agent.config.write_roots = [t.inside]
    bed.agent.config.read_roots = [t.inside]
    return t


def _args(**kw):
    return Fields(kw, "args")


# -- (a) fs.setattr -------------------------------------------------------------------------------

@pytest.mark.parametrize("swapped", ["final", "parent"])
def test_setattr_never_changes_a_file_outside_the_roots(bed, tree, swapped):
    """HIGH 4: ``conf`` (just copied into alice's directory) is swapped for a symlink to a file
    beyond the write roots, or its parent for a symlink to a directory beyond them."""
    files = bed.files
    if swapped == "final":
        path = os.path.join(tree.sub, "conf")
        swap = swapper(path, os.path.join(tree.outside, "conf"))
    else:
        path = os.path.join(tree.sub, "conf")
        swap = swapper(tree.sub, tree.outside)
    before = {}

    def setup():
        tree.make(files=["conf"])
        before.clear()
        before.update(tree.outside_state())

    def op():
        return files.op_fs_setattr(1, _args(path=path, mode=0o4755, mtime_ns=5 * 10 ** 9,
                                            uid=NOBODY, gid=NOBODY))

    def check(out):
        assert tree.outside_state() == before

    each_swap_point(setup, op, swap, check)
    # unswapped, the file inside gets every attribute
    setup()
    assert op() == {}
    st = os.lstat(path)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (
        0o4755, NOBODY, NOBODY, 5 * 10 ** 9)


def test_setattr_on_a_symlink_changes_the_link_not_its_target(bed, tree):
    tree.make(files=["conf"])
    link = os.path.join(tree.sub, "link")
    os.symlink(os.path.join(tree.outside, "conf"), link)
    before = tree.outside_state()
    assert bed.files.op_fs_setattr(1, _args(path=link, mode=0o777, mtime_ns=7 * 10 ** 9,
                                            uid=NOBODY, gid=NOBODY)) == {}
    assert tree.outside_state() == before
    st = os.lstat(link)
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (NOBODY, NOBODY, 7 * 10 ** 9)


@pytest.mark.parametrize("field", ["uid", "gid"])
def test_setattr_refuses_an_id_a_chown_cannot_take(bed, tree, field):
    """2**32-1 is (uid_t)-1, "leave it", and a bigger one overflows: refused as a bad field."""
    tree.make(files=["conf"])
    path = os.path.join(tree.sub, "conf")
    before = os.lstat(path)
    for value in (2 ** 32 - 1, 2 ** 40):
        with pytest.raises(ProtocolViolation):
            bed.files.op_fs_setattr(1, _args(path=path, **{field: value}))
    after = os.lstat(path)
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)


def test_setattr_of_a_fifo_or_a_directory_works_without_opening_it_for_data(bed, tree):
    tree.make(dirs=["d"])
    fifo = os.path.join(tree.sub, "fifo")
    os.mkfifo(fifo, 0o600)  # opened for reading, it would block the agent's loop
    for path in (fifo, os.path.join(tree.sub, "d")):
        assert bed.files.op_fs_setattr(1, _args(path=path, mode=0o751, mtime_ns=3 * 10 ** 9)) == {}
        st = os.lstat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o751, 3 * 10 ** 9)


# -- (b) pull --------------------------------------------------------------------------------------

def _cancel(bed, rid):
    """Stop a transfer the host never joins, as the server does on CANCEL."""
    host, _ = bed.server.accept()  # the agent's data port connection: freed for the next one
    tr = bed.agent.session.transfers.pop(rid)
    bed.files.cancel(tr, "test", keep_partial=False)
    bed.files.finished(*bed.agent.results.get(timeout=20))
    host.close()
    assert bed.files.active is None


def test_pull_never_opens_a_file_outside_the_read_roots(bed, tree):
    path = os.path.join(tree.sub, "file")

    def op():
        return bed.files.op_transfer_open(2, _args(transfer=3, direction="pull", path=path))

    def check(out):
        if isinstance(out, OpError):
            return
        st = os.fstat(bed.agent.session.transfers[2].fd)
        _cancel(bed, 2)
        secret = os.stat(os.path.join(tree.outside, "file"))
        assert (st.st_dev, st.st_ino) != (secret.st_dev, secret.st_ino)

    assert each_swap_point(lambda: tree.make(files=["file"]), op,
                           swapper(tree.sub, tree.outside), check) > 5


def test_pull_through_a_symlink_to_a_directory_inside_the_roots_still_works(bed, tree):
    tree.make(files=["file"])
    os.symlink("sub", os.path.join(tree.inside, "alias"))
    bed.files.op_transfer_open(2, _args(transfer=3, direction="pull",
                                        path=os.path.join(tree.inside, "alias", "file")))
    tr = bed.agent.session.transfers[2]
    assert os.fstat(tr.fd).st_ino == os.stat(os.path.join(tree.sub, "file")).st_ino
    _cancel(bed, 2)
    os.symlink(tree.outside, os.path.join(tree.inside, "out"))  # a link out of the roots
    with pytest.raises(OpError) as exc:
        bed.files.op_transfer_open(4, _args(transfer=5, direction="pull",
                                            path=os.path.join(tree.inside, "out", "file")))
    assert exc.value.code == codes.DENIED and "read_roots" in str(exc.value)


def test_batch_pull_never_opens_a_file_outside_the_read_roots(bed, tree, tmp_path):
    """The batch is checked when it is opened and read later, in the worker: it first sends a
    file that fills the socket, the attacker swaps meanwhile, then the worker opens the second
    (outside, a file of the same size and time waits under the same name)."""
    tree.make(files=["file"])
    big = os.path.join(tree.inside, "big")
    with open(big, "wb") as f:
        f.write(b"\0" * (8 << 20))
    paths = [big, os.path.join(tree.sub, "file")]
    bed.files.op_transfer_open(2, _args(transfer=3, direction="pull", checksum="crc32", files=[
        {"path": p, "size": os.stat(p).st_size, "mtime_ns": os.stat(p).st_mtime_ns}
        for p in paths]))
    swapper(tree.sub, tree.outside)()
    host, _ = bed.server.accept()
    chan = CE.Channel(host.fileno(), threading.Event())
    chan.wait_hello(3, bed.agent.events[-1]["nonce"], "agent")
    out = []
    for i in range(2):
        dest = str(tmp_path / ("r%d" % i))
        fd = os.open(dest, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            CE.recv_file(chan, fd, T.batch_tid(3, i), "crc32")
        except CE.TransferError:
            break
        finally:
            os.close(fd)
            out.append(open(dest, "rb").read())
    else:
        chan.write_all([T.encode_ack(T.batch_tid(3, 1))])
    bed.files.finished(*bed.agent.results.get(timeout=20))
    host.close()
    assert b"SECRET" not in b"".join(out)
    # the agent checks the file again when it gets to it: now out of the roots
    kind, code, message, _ = bed.agent.replies[0]
    assert (kind, code) == ("error", codes.DENIED) and paths[1] in message, message


# -- (c) push --------------------------------------------------------------------------------------

def test_push_never_creates_its_temp_file_outside_the_write_roots(bed, tree):
    path = os.path.join(tree.sub, "dst")

    def op():
        return bed.files.op_transfer_open(2, _args(transfer=3, direction="push", path=path,
                                                   size=10, mtime_ns=1, checksum="crc32"))

    def check(out):
        assert os.listdir(tree.outside) == []  # before the cancel removes the temp file
        if not isinstance(out, OpError):
            _cancel(bed, 2)
        assert os.listdir(tree.outside) == []

    each_swap_point(tree.make, op, swapper(tree.sub, tree.outside), check)


def _push(bed, path, data, resume=False, mtime_ns=1):
    """A complete single-file push; returns the ready event."""
    bed.files.op_transfer_open(2, _args(transfer=3, direction="push", path=path, size=len(data),
                                        mtime_ns=mtime_ns, checksum="sha256", resume=resume))
    ev = bed.agent.events[-1]
    host, _ = bed.server.accept()
    chan = CE.Channel(host.fileno(), threading.Event())
    chan.wait_hello(3, ev["nonce"], "agent")
    chan.write_all([T.encode_hello(3, ev["nonce"], "host")])
    src = path + ".src"
    with open(src, "wb") as f:
        f.write(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        os.lseek(fd, ev["offset"], os.SEEK_SET)
        CE.send_file(chan, fd, 3, "sha256", ev["offset"], len(data))
    finally:
        os.close(fd)
        os.unlink(src)
    tr, result, err = bed.agent.results.get(timeout=20)
    bed.files.finished(tr, result, err)
    host.close()
    assert err is None, err
    return ev


def test_push_renames_into_the_directory_it_checked(bed, tree):
    """The final rename happens in the worker, long after the checks: a swap meanwhile must not
    move the file (nor its temp file) out of the roots."""
    tree.make()
    path = os.path.join(tree.sub, "dst")
    bed.files.op_transfer_open(2, _args(transfer=3, direction="push", path=path, size=5,
                                        mtime_ns=1, checksum="sha256"))
    ev = bed.agent.events[-1]
    swapper(tree.sub, tree.outside)()
    host, _ = bed.server.accept()
    chan = CE.Channel(host.fileno(), threading.Event())
    chan.wait_hello(3, ev["nonce"], "agent")
    chan.write_all([T.encode_hello(3, ev["nonce"], "host")])
    r, w = os.pipe()
    os.write(w, b"hello")
    os.close(w)
    try:
        CE.send_file(chan, r, 3, "sha256", 0, 5)
    finally:
        os.close(r)
    tr, result, err = bed.agent.results.get(timeout=20)
    bed.files.finished(tr, result, err)
    host.close()
    assert err is None, err
    assert os.listdir(tree.outside) == []
    assert open(os.path.join(tree.sub + ".aside", "dst"), "rb").read() == b"hello"


def test_push_checks_free_space_in_the_target_directory(bed, tree, monkeypatch):
    tree.make()
    seen = []
    real = os.fstatvfs

    def fstatvfs(fd):
        seen.append(os.fstat(fd).st_ino)
        vfs = real(fd)
        return types.SimpleNamespace(f_bavail=3, f_frsize=vfs.f_frsize)

    monkeypatch.setattr(os, "fstatvfs", fstatvfs)
    with pytest.raises(OpError) as exc:
        bed.files.op_transfer_open(2, _args(transfer=3, direction="push", size=1 << 30,
                                            path=os.path.join(tree.sub, "big"), mtime_ns=1))
    assert exc.value.code == codes.NO_SPACE and tree.sub in str(exc.value)
    assert seen == [os.stat(tree.sub).st_ino]
    assert os.listdir(tree.sub) == []


# -- (d) temp files planted by another user --------------------------------------------------------

def _plant(path, data, uid=NOBODY, link=False):
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, uid, uid)
    if link:
        os.link(path, path + ".hard")


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("planted", ["other user", "hard link", "symlink", "directory"])
def test_a_planted_temp_file_is_never_used(bed, tree, resume, planted):
    tree.make()
    path = os.path.join(tree.sub, "dst")
    data = b"the host's bytes " * 100
    partial = os.path.join(tree.sub, T.partial_name(path, len(data), 1, "sha256"))
    if planted == "other user":
        _plant(partial, data[:50])  # a plausible prefix: resuming from it would look right
    elif planted == "hard link":
        _plant(partial, data[:50], uid=os.geteuid(), link=True)
    elif planted == "symlink":
        os.symlink(os.path.join(tree.outside, "x"), partial)
    else:
        os.mkdir(partial)
    # the attacker keeps the planted file open, to read or change what the agent writes in it
    afd = os.open(partial, getattr(os, "O_PATH", os.O_RDONLY) | os.O_NOFOLLOW)
    try:
        planted_st = os.fstat(afd)
        try:
            ev = _push(bed, path, data, resume=resume)
        except OpError as exc:  # refusing is fine, as long as nothing was used
            assert planted == "directory", exc
            assert os.path.isdir(partial)
            return
        st = os.stat(path)
        assert ev["offset"] == 0
        assert open(path, "rb").read() == data
        assert (st.st_uid, st.st_nlink) == (os.geteuid(), 1)
        assert (st.st_dev, st.st_ino) != (planted_st.st_dev, planted_st.st_ino)
        assert os.fstat(afd).st_size == planted_st.st_size  # nothing written through it
        assert os.listdir(tree.outside) == []
    finally:
        os.close(afd)


def test_a_pushed_file_does_not_inherit_another_users_setuid_bit(bed, tree):
    """Without -p a pushed file keeps the mode of the file it replaces; but the new file is the
    agent's, so a guest user's 04777 ``tool`` would become a setuid root program."""
    tree.make()
    mine, theirs = os.path.join(tree.sub, "mine"), os.path.join(tree.sub, "theirs")
    for path, uid in ((mine, os.geteuid()), (theirs, NOBODY)):
        _plant(path, b"old", uid=uid)
        os.chmod(path, 0o4755)
        _push(bed, path, b"new program")
        assert open(path, "rb").read() == b"new program"
    assert stat.S_IMODE(os.stat(mine).st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(theirs).st_mode) == 0o755


def test_resume_continues_the_agents_own_partial_file(bed, tree):
    """The next push of the same target finds the partial file left by an interrupted one."""
    tree.make()
    path = os.path.join(tree.sub, "dst")
    data = os.urandom(3000)
    partial = os.path.join(tree.sub, T.partial_name(path, len(data), 1, "sha256"))
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data[:1000])
    os.close(fd)
    ev = _push(bed, path, data, resume=True)
    assert ev["offset"] == 1000
    assert open(path, "rb").read() == data and not os.path.lexists(partial)


# -- (e) fs.mkdir, fs.symlink, fs.remove, fs.stat, fs.list -----------------------------------------

@pytest.mark.parametrize("what", ["mkdir", "symlink", "remove"])
def test_fs_ops_with_a_swapped_component_stay_inside(bed, tree, what):
    path = os.path.join(tree.sub, "victim")
    op_name = {"mkdir": "op_fs_mkdir", "symlink": "op_fs_symlink", "remove": "op_fs_remove"}[what]
    args = {"mkdir": {"mode": 0o777}, "symlink": {"target": "/etc/passwd"}, "remove": {}}[what]
    before = {}

    def setup():
        tree.make(files=["victim"] if what == "remove" else ["other"])
        before.clear()
        before.update(tree.outside_state())

    def op():
        return getattr(bed.files, op_name)(1, _args(path=path, **args))

    def check(out):
        assert tree.outside_state() == before

    each_swap_point(setup, op, swapper(tree.sub, tree.outside), check)
    setup()
    op()
    inside = os.path.lexists(path)
    assert inside == (what != "remove")


def test_fs_stat_never_describes_a_file_outside_the_read_roots(bed, tree):
    path = os.path.join(tree.sub, "file")

    def setup():
        tree.make(files=["file"])
        with open(os.path.join(tree.outside, "file"), "ab") as f:
            f.write(b"x" * 1000)  # a size the inside file does not have

    def check(out):
        if not isinstance(out, OpError):
            assert out["size"] == len(b"inside file")

    each_swap_point(setup, lambda: bed.files.op_fs_stat(1, _args(path=path)),
                    swapper(tree.sub, tree.outside), check)


def test_fs_list_never_walks_into_a_directory_outside_the_read_roots(bed, tree):
    def setup():
        tree.make(files=["file"], dirs=["deeper"])
        for d in (tree.sub, tree.outside):
            with open(os.path.join(d, "deeper", "inner-%s" % os.path.basename(d)), "w") as f:
                f.write("x")

    def op():
        bed.files._listings.clear()
        return bed.files.op_fs_list(1, _args(path=tree.inside))

    def check(out):
        if not isinstance(out, OpError):
            names = [e["path"] for e in out["entries"]]
            assert not any("inner-outside" in n for n in names), names

    each_swap_point(setup, op, swapper(os.path.join(tree.sub, "deeper"),
                                       os.path.join(tree.outside, "deeper")), check)
    setup()
    assert [e["path"] for e in op()["entries"]] == [
        "sub", "sub/deeper", "sub/deeper/inner-sub", "sub/file"]


def test_paths_through_symlinks_inside_the_roots_keep_working(bed, tree):
    """Today's behaviour: a symlinked component is followed while it stays inside."""
    tree.make(files=["file"], dirs=["d"])
    os.symlink("sub", os.path.join(tree.inside, "alias"))
    os.symlink("../sub/d", os.path.join(tree.sub, "d-link"))
    alias = os.path.join(tree.inside, "alias")
    assert bed.files.op_fs_mkdir(1, _args(path=alias + "/d-link/new")) == {}
    assert os.path.isdir(os.path.join(tree.sub, "d", "new"))
    assert bed.files.op_fs_stat(1, _args(path=alias + "/file"))["size"] == len(b"inside file")
    assert bed.files.op_fs_stat(1, _args(path=alias, follow=False))["type"] == "symlink"
    assert bed.files.op_fs_symlink(1, _args(path=alias + "/ln", target="file")) == {}
    assert os.readlink(os.path.join(tree.sub, "ln")) == "file"
    assert bed.files.op_fs_remove(1, _args(path=alias + "/ln")) == {"removed": True}
    assert bed.files.op_fs_list(1, _args(path=alias + "/d"))["entries"][0]["path"] == "new"
    # a loop of links is an error, not a hang
    os.symlink("loop2", os.path.join(tree.inside, "loop1"))
    os.symlink("loop1", os.path.join(tree.inside, "loop2"))
    with pytest.raises(OpError) as exc:
        bed.files.op_fs_stat(1, _args(path=os.path.join(tree.inside, "loop1", "x")))
    assert "symbolic links" in str(exc.value)
    # the root itself may be named, and nothing outside it
    assert bed.files.op_fs_stat(1, _args(path=tree.inside))["type"] == "dir"
    assert bed.files.op_fs_mkdir(1, _args(path=tree.inside)) == {}
    os.symlink("../outside", os.path.join(tree.inside, "out"))
    for op, args in (("op_fs_stat", {"path": tree.outside + "/file"}),
                     ("op_fs_mkdir", {"path": tree.base + "/new"}),
                     ("op_fs_stat", {"path": tree.inside + "/out/file"}),
                     ("op_fs_mkdir", {"path": tree.inside + "/out/new"})):
        with pytest.raises(OpError) as exc:
            getattr(bed.files, op)(1, _args(**args))
        assert exc.value.code == codes.DENIED, (op, args)


def test_commit_sets_a_group_given_without_an_owner(tmp_path):
    from guestlink.filecopy import commit
    dfd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = commit.open_partial(dfd, ".part", 0)
        try:
            commit.commit(fd, dfd, ".part", "out", commit.Attrs(0o644, gid=NOBODY))
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    st = os.lstat(str(tmp_path / "out"))
    assert (st.st_uid, st.st_gid) == (os.geteuid(), NOBODY)
