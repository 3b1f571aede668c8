"""One guestlink client per VM: the lock file, and clients queueing on it (fake agent)."""
import asyncio
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import guestlink  # noqa: E402
from guestlink.host import errors as E  # noqa: E402
from guestlink.host import vmlock  # noqa: E402
from guestlink.host.vmlock import VMLock  # noqa: E402
from test_host_fakeagent import FakeAgent, short_tmp  # noqa: E402

SRC = os.path.dirname(os.path.dirname(os.path.abspath(guestlink.__file__)))


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(d))
    return d


@pytest.fixture
def path(tmp_path):
    return os.path.join(short_tmp(tmp_path), "ctl.sock")


def test_second_holder_is_refused_until_the_first_releases(runtime, path):
    first, second = VMLock(path), VMLock(path)
    assert first.try_acquire() and first.held
    assert not second.try_acquire() and not second.held
    assert second.holder() == vmlock.describe_self()
    assert str(os.getpid()) in second.holder()
    first.release()
    assert not os.path.exists(first.path)  # a clean release leaves no file behind
    assert second.try_acquire()
    assert not first.try_acquire()
    second.release()


def test_aliases_of_one_socket_share_one_lock(runtime, tmp_path, path):
    open(path, "w").close()
    alias = tmp_path / "alias.sock"
    alias.symlink_to(path)
    a, b = VMLock(path), VMLock(str(alias))
    assert a.path == b.path and a.path.startswith(str(runtime / "guestlink"))
    assert a.try_acquire() and not b.try_acquire()
    a.release()
    assert VMLock(path + ".other").path != a.path


def test_a_waiter_on_a_released_and_removed_file_does_not_share_the_lock(runtime, path):
    """A waiter that opened the file before its holder removed it must not hold a lock that a
    third client, opening the path afresh, can hold too."""
    first = VMLock(path)
    assert first.try_acquire()
    stale_fd = os.open(first.path, os.O_RDWR)  # a waiter that opened the old file
    first.release()
    third = VMLock(path)
    assert third.try_acquire()
    waiter = VMLock(path)
    assert not waiter._still_linked(stale_fd)
    os.close(stale_fd)
    assert not waiter.try_acquire()
    third.release()


def test_lock_dir_that_others_could_write_is_refused(tmp_path, monkeypatch, path):
    runtime = tmp_path / "run"
    (runtime / "guestlink").mkdir(parents=True)
    os.chmod(runtime / "guestlink", 0o777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    with pytest.raises(E.ConnectError, match="refusing lock directory"):
        VMLock(path)


def test_lock_dir_falls_back_to_a_private_tmp_dir(monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    d = vmlock.lock_dir()
    assert d == "/tmp/guestlink-%d" % os.getuid()
    assert os.stat(d).st_mode & 0o777 == 0o700


def test_held_by_another_process_is_described_and_times_out(runtime, path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from guestlink.host.vmlock import VMLock; "
         "l = VMLock(sys.argv[1]); assert l.try_acquire(); print('held', flush=True); "
         "time.sleep(60)", path],
        env=dict(os.environ, PYTHONPATH=SRC), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        waits = []
        lock = VMLock(path)
        t0 = time.monotonic()
        with pytest.raises(E.VMInUse, match=r"in use by pid %d \(python " % holder.pid) as info:
            asyncio.run(lock.acquire(timeout=0.3, on_wait=waits.append))
        assert 0.3 <= time.monotonic() - t0 < 2
        assert info.value.path == path and isinstance(info.value, E.ConnectError)
        assert waits == ["pid %d (python %s)" % (holder.pid, path)]
        holder.kill()  # the kernel drops a dead holder's lock
        holder.wait()
        assert asyncio.run(lock.acquire(timeout=2)) is False and lock.held  # no wait
        lock.release()
    finally:
        holder.kill()
        holder.wait()


def test_second_client_waits_for_the_first_then_connects(runtime, path):
    async def main():
        async with FakeAgent(path) as agent:
            queued = []
            async with guestlink.connect(ctl=path, timeout=3) as first:
                second = guestlink.connect(ctl=path, timeout=3, on_queue=queued.append)
                task = asyncio.ensure_future(second.__aenter__())
                await asyncio.sleep(0.5)
                assert not task.done() and len(agent.conns) == 1  # waiting, not connecting
                assert queued == [vmlock.describe_self()]
                await first.ping()
            vm = await asyncio.wait_for(task, 3)  # the first one closed: the second goes on
            try:
                await vm.ping()
                assert len(agent.conns) == 2
            finally:
                await vm.close()
            # and with queue_timeout, a client gives up with VMInUse
            async with guestlink.connect(ctl=path, timeout=3):
                with pytest.raises(E.VMInUse, match="in use by pid %d" % os.getpid()):
                    await guestlink.connect(ctl=path, timeout=3, queue_timeout=0)
        return queued

    assert asyncio.run(asyncio.wait_for(main(), 20)) == [vmlock.describe_self()]
    assert os.listdir(runtime / "guestlink") == []


def test_a_waiter_names_a_holder_that_describes_itself_late(runtime, path):
    """Between a holder's flock and its description the file is empty: the waiter waits for the
    description (up to DESCRIBE_GRACE) rather than calling it "another guestlink process"."""
    import fcntl
    lock_file = vmlock.lock_path(path)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)

    async def main():
        waits = []
        waiter = asyncio.ensure_future(VMLock(path).acquire(timeout=0, on_wait=waits.append))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        os.pwrite(fd, b"pid 7 (guestlink cp a vm:/b)\n", 0)
        with pytest.raises(E.VMInUse, match=r"in use by pid 7 \(guestlink cp a vm:/b\)"):
            await waiter
        return waits

    try:
        assert asyncio.run(main()) == []  # queue_timeout 0: no waiting, so no on_wait call
    finally:
        os.close(fd)


def test_without_a_usable_lock_dir_a_client_still_connects(tmp_path, monkeypatch, path, caplog):
    runtime = tmp_path / "run"
    (runtime / "guestlink").mkdir(parents=True)
    os.chmod(runtime / "guestlink", 0o777)  # refused: others could plant lock files
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))

    async def main():
        async with FakeAgent(path):
            async with guestlink.connect(ctl=path, timeout=3) as vm:
                return await vm.ping()

    assert asyncio.run(asyncio.wait_for(main(), 10)) >= 0
    assert "not queueing with other clients of %s: refusing lock directory" % path in caplog.text


def test_a_runtime_dir_of_another_user_is_not_used(tmp_path, monkeypatch):
    """`sudo` may keep the invoking user's XDG_RUNTIME_DIR: root must not make files there."""
    assert os.getuid() == 0, "runs as root, as scripts/test does (to own a dir as another user)"
    theirs = tmp_path / "run-1000"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 1000, 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(theirs))
    assert vmlock.lock_dir() == "/tmp/guestlink-0"
    assert not (theirs / "guestlink").exists()
