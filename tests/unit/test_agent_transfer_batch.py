"""Batch transfers (``cp -r``: several files on one opening of the data port), agent side, with a
unix socket as the data port and the real copy engine as the host, no VM."""
import hashlib
import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from guestlink.filecopy import engine as CE  # noqa: E402
from guestlink.agent.execs import OpError  # noqa: E402
from guestlink.protocol import Fields, codes  # noqa: E402
from guestlink.protocol import transfer as T  # noqa: E402


def _open(bed, entries, tid=0xFFFFFFFE, **extra):
    args = dict({"transfer": tid, "direction": "push", "checksum": "sha256", "files": entries},
                **extra)
    bed.files.op_transfer_open(1, Fields(args, "args"))
    return bed.agent.events[-1]


def _host_send(bed, tid, nonce, payloads, fail_at=None):
    """The host's side: hello, then each file with its batch transfer id."""
    host, _ = bed.server.accept()
    chan = CE.Channel(host.fileno(), threading.Event())
    chan.wait_hello(tid, nonce, "agent")
    chan.write_all([T.encode_hello(tid, nonce, "host")])
    sent = []
    for i, data in enumerate(payloads):
        sub = T.batch_tid(tid, i)
        if i == fail_at:
            chan.write_all([T.encode_end_error(sub, codes.CHANGED, "source changed")])
            break
        src = os.path.join(os.path.dirname(bed.target), "src%d" % i)
        with open(src, "wb") as f:
            f.write(data)
        fd = os.open(src, os.O_RDONLY)
        try:
            sent.append(CE.send_file(chan, fd, sub, "sha256", 0, len(data)))
        finally:
            os.close(fd)
    return host, sent


def test_batch_push_receives_every_file_on_one_opening(bed):
    payloads = [os.urandom(n) for n in (0, 1, T.DEFAULT_CHUNK + 5, 3000)]
    entries = [{"path": "%s/f%d" % (bed.target, i), "size": len(p), "mtime_ns": 10 ** 18 + i,
                "mode": 0o640} for i, p in enumerate(payloads)]
    ev = _open(bed, entries, preserve=True)
    assert ev["event"] == "ready" and ev["offsets"] == [0, 0, 0, 0]
    # tids wrap past 0xFFFFFFFF without ever being 0
    assert [T.batch_tid(0xFFFFFFFE, i) for i in range(4)] == [0xFFFFFFFE, 0xFFFFFFFF, 1, 2]
    host, sent = _host_send(bed, 0xFFFFFFFE, ev["nonce"], payloads)
    tr, result, err = bed.agent.results.get(timeout=20)
    bed.files.finished(tr, result, err)
    host.close()
    assert err is None
    assert [f["digest"] for f in result["files"]] == [hashlib.sha256(p).hexdigest() for p in payloads]
    assert [(f["size"], f["digest"]) for f in result["files"]] == sent
    for i, p in enumerate(payloads):
        path = "%s/f%d" % (bed.target, i)
        assert open(path, "rb").read() == p
        assert os.stat(path).st_mode & 0o777 == 0o640  # -p: mode and mtime as sent
        assert os.stat(path).st_mtime_ns == 10 ** 18 + i
    assert sorted(os.listdir(bed.target)) == ["f0", "f1", "f2", "f3"]  # no temp files
    assert bed.agent.replies[0][0] == "ok" and bed.files.active is None


def test_batch_push_failure_names_the_file_keeps_those_before_and_drops_its_temp(bed):
    payloads = [b"first", b"second", b"third"]
    entries = [{"path": "%s/g%d" % (bed.target, i), "size": len(p), "mtime_ns": 1}
               for i, p in enumerate(payloads)]
    ev = _open(bed, entries, tid=77)
    host, _ = _host_send(bed, 77, ev["nonce"], payloads, fail_at=1)
    tr, result, err = bed.agent.results.get(timeout=20)
    bed.files.finished(tr, result, err)
    host.close()
    kind, code, message, details = bed.agent.replies[0]
    assert (kind, code) == ("error", codes.CHANGED)
    assert message.startswith("%s/g1: " % bed.target) and details == {"interrupted": False, "done": 1}
    assert os.listdir(bed.target) == ["g0"] and open(bed.target + "/g0", "rb").read() == b"first"


@pytest.mark.parametrize("entries,message", [
    ([], "files must be a list of 1 to %d files" % T.MAX_BATCH),
    ([{"path": "/x", "size": 1, "mtime_ns": 1}] * (T.MAX_BATCH + 1),
     "files must be a list of 1 to %d files" % T.MAX_BATCH),
    ([{"path": "relative", "size": 1, "mtime_ns": 1}], "path must be an absolute guest path"),
    ([{"path": "/f", "size": -1, "mtime_ns": 1}], "files[0]: field 'size' must be an integer in"),
    ([{"path": "/f", "mtime_ns": 1}], "files[0]: missing field 'size'"),
    (["/f"], "files[0] must be an object"),
])
def test_batch_push_requests_are_validated(bed, entries, message):
    with pytest.raises(OpError) as exc:
        _open(bed, entries)
    assert exc.value.code == codes.BAD_REQUEST and message in str(exc.value)
    assert bed.files.active is None and os.listdir(bed.target) == []


def test_batch_push_checks_every_file_before_taking_any(bed):
    ok = {"path": bed.target + "/ok", "size": 1, "mtime_ns": 1}
    for bad, code in (({"path": "/etc/outside", "size": 1, "mtime_ns": 1}, codes.DENIED),
                      ({"path": bed.target + "/no/such/dir/f", "size": 1, "mtime_ns": 1},
                       codes.NOT_FOUND),
                      ({"path": bed.target + "/ok", "size": 2, "mtime_ns": 1}, codes.BAD_REQUEST)):
        with pytest.raises(OpError) as exc:
            _open(bed, [ok, bad])
        assert exc.value.code == code, exc.value
        assert os.listdir(bed.target) == [] and bed.files.active is None


def _host_receive(bed, tid, nonce, n, dest_dir):
    host, _ = bed.server.accept()
    chan = CE.Channel(host.fileno(), threading.Event())
    chan.wait_hello(tid, nonce, "agent")
    got, error = [], None
    for i in range(n):
        fd = os.open(os.path.join(dest_dir, "r%d" % i), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            got.append(CE.recv_file(chan, fd, T.batch_tid(tid, i), "crc32"))
        except CE.TransferError as exc:
            error = exc
            break
        finally:
            os.close(fd)
    else:
        chan.write_all([T.encode_ack(T.batch_tid(tid, n - 1))])
    return host, got, error


def _pull_entries(paths):
    return [{"path": p, "size": os.stat(p).st_size, "mtime_ns": os.stat(p).st_mtime_ns}
            for p in paths]


def _pull_batch(bed, paths, tid, out, after_open=None):
    """Pull ``paths`` as one batch into ``out``/r0, r1, ... -> (received (size, digest) per file,
    the host's error, the agent's result, the agent's error)."""
    bed.agent.config.read_roots = [bed.target]
    ev = _open(bed, _pull_entries(paths), tid=tid, direction="pull", checksum="crc32")
    if after_open is not None:
        after_open()
    out.mkdir()
    host, got, error = _host_receive(bed, tid, ev["nonce"], len(paths), str(out))
    tr, result, err = bed.agent.results.get(timeout=20)
    bed.files.finished(tr, result, err)
    host.close()
    return got, error, result, err


def test_batch_pull_sends_every_file_on_one_opening(bed, tmp_path):
    payloads = [b"", os.urandom(T.DEFAULT_CHUNK * 2 + 1), b"z"]
    paths = []
    for i, p in enumerate(payloads):
        paths.append("%s/p%d" % (bed.target, i))
        with open(paths[-1], "wb") as f:
            f.write(p)
    out = tmp_path / "out"
    got, error, result, err = _pull_batch(bed, paths, 5, out)
    assert err is None and error is None
    assert [(f["path"], f["size"], f["digest"]) for f in result["files"]] == [
        (p, n, d) for p, (n, d) in zip(paths, got)]
    assert [(out / ("r%d" % i)).read_bytes() for i in range(3)] == payloads
    assert bed.agent.replies[0][0] == "ok" and bed.files.active is None


def test_batch_pull_of_a_file_that_changes_names_it_and_says_so_on_the_data_port(bed, tmp_path):
    paths = []
    for i, size in enumerate((8 << 20, 1000, 1000)):  # the first fills the socket: the agent
        paths.append("%s/c%d" % (bed.target, i))       # waits in it until the host reads
        with open(paths[-1], "wb") as f:
            f.write(os.urandom(size))

    def change_the_second():  # after the agent's checks, before it sends
        with open(paths[1], "ab") as f:
            f.write(b"more")

    got, error, result, err = _pull_batch(bed, paths, 9, tmp_path / "out",
                                          after_open=change_the_second)
    assert len(got) == 1 and error.code == codes.CHANGED and paths[1] in str(error)
    kind, code, message, details = bed.agent.replies[0]
    assert (kind, code) == ("error", codes.CHANGED) and paths[1] in message
    assert details == {"interrupted": False, "done": 1}


def test_batch_pull_checks_every_file_before_sending_any(bed):
    for name in ("ok", "other"):
        with open(os.path.join(bed.target, name), "wb") as f:
            f.write(b"x")
    os.mkdir(os.path.join(bed.target, "dir"))
    bed.agent.config.read_roots = [bed.target]
    good, other = _pull_entries([bed.target + "/ok", bed.target + "/other"])
    for bad, code in ((dict(good, path="/etc/hostname"), codes.DENIED),
                      (dict(other, size=2), codes.CHANGED),
                      (dict(good, path=bed.target + "/dir"), codes.IS_A_DIRECTORY),
                      (dict(good, path=bed.target + "/missing"), codes.NOT_FOUND),
                      (dict(other, offset=5), codes.CHANGED),
                      (good, codes.BAD_REQUEST)):  # named twice
        with pytest.raises(OpError) as exc:
            _open(bed, [good, bad], direction="pull")
        assert exc.value.code == code, (bad, exc.value)
        assert bed.files.active is None and bed.agent.events == []
