"""File transfer robustness against the real agent in QEMU (issue 5): resume after the host was
killed mid-pull, Ctrl-C through the CLI, a source that changes during the transfer, and the
memory bound while moving 1 GiB.

All tests share one VM of their own (2 GiB of RAM, /tmp enlarged) so that big transfers fit.
While a CLI process runs, it holds the VM's control socket (one host client at a time), so
"the transfer is running" is observed on the host: the bytes the CLI has read (rchar in
/proc/PID/io: counts read, pread and sendfile alike) for a push, the growth of its
`.guestlink-*.part` file for a pull; for a guest-side change during a pull a small watcher
process in the guest follows the agent's rchar the same way.
"""

import asyncio
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib

import pytest

from guestlink.protocol.transfer import PARTIAL_PREFIX, PARTIAL_SUFFIX
from vmhelpers import cli_env, guest_sh, run, sha

MiB = 1 << 20
GiB = 1 << 30
EXIT_SOFTWARE = 70  # guestlink.exitcodes: any other error reported by the agent (here: changed)
EXIT_INTERRUPTED = 130


@pytest.fixture(scope="module")
def bigvm(make_vm):
    v = make_vm(memory=2048)
    # tmpfs defaults to half of RAM, just under 1 GiB: make room for the 1 GiB push
    run(v, lambda c: guest_sh(c, "mount -o remount,size=1600m /tmp"))
    return v


def start_cli(vm, *args, stdout=subprocess.PIPE):
    return subprocess.Popen([sys.executable, "-m", "guestlink"] + list(args), env=cli_env(vm),
                            stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE)


def run_cli(vm, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "guestlink"] + list(args), env=cli_env(vm),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


def partials(directory):
    return sorted(glob.glob(os.path.join(glob.escape(str(directory)),
                                         PARTIAL_PREFIX + "*" + PARTIAL_SUFFIX)))


def _proc_number(pid, name, key):
    """The number after ``key`` in /proc/PID/NAME, or 0 once the process is gone."""
    try:
        with open("/proc/%d/%s" % (pid, name)) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rchar(pid):
    """Bytes ``pid`` has read so far with read-like system calls (read, pread, sendfile...): a
    measure of how far a push has read its source, whatever way the copy engine reads it."""
    return _proc_number(pid, "io", "rchar:")


def partial_size(directory):
    for p in partials(directory):
        try:
            return os.stat(p).st_size
        except OSError:
            pass
    return None


def wait_for(proc, pred, what, timeout=60.0):
    """Poll ``pred()`` (every 2 ms) until it is true; fail if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail("the CLI ended (exit %s) before %s: %r %r" % (proc.returncode, what, out, err))
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for %s" % what)
        time.sleep(0.002)


def one_error_line(stderr):
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    lines = text.splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text and lines[0].startswith("guestlink: "), text
    return lines[0]


async def guest_partials(c, directory="/tmp"):
    out = await guest_sh(c, "ls -a %s | grep -F %s || true" % (directory, PARTIAL_PREFIX))
    return out.split()


async def check_agent_healthy(c, tmp_path, remote):
    """The agent answers, and a following transfer works (the data port was released)."""
    assert await c.ping() < 5.0
    src = tmp_path / "after.bin"
    src.write_bytes(os.urandom(3 * MiB + 11))
    back = tmp_path / "after.back"
    r = await c.push(str(src), remote)
    r2 = await c.pull(remote, str(back))
    await c.call("fs.remove", {"path": remote})
    assert r.digest == r2.digest == sha(src) == sha(back)
    back.unlink()
    src.unlink()


# --- 1. resume a pull after the host client was killed ------------------------------------------

PULL_KILLER = r"""
import asyncio, os, signal, sys
from guestlink.host import transfer as HT
from guestlink.host.client import connect
HT.PROGRESS_INTERVAL = 0  # a progress report for every chunk
async def main():
    async with connect(ctl=sys.argv[1], data=sys.argv[2]) as c:
        def cb(done, total):
            if done >= int(sys.argv[5]):
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind
        await c.pull(sys.argv[3], sys.argv[4], progress=cb)
asyncio.run(main())
"""


def test_kill_host_mid_pull_then_resume(bigvm, tmp_path):
    remote = "/tmp/pull-resume.bin"
    dest = tmp_path / "pulled.bin"

    async def make(c):
        await guest_sh(c, "head -c %d /dev/urandom > %s" % (64 * MiB, remote))
        r = await c.run(["sha256sum", remote], check=True)
        return r.stdout.split()[0].decode()

    gsha = run(bigvm, make)
    proc = subprocess.run([sys.executable, "-c", PULL_KILLER, bigvm.ctl_path, bigvm.data_path,
                           remote, str(dest), str(16 * MiB)], env=cli_env(bigvm),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # the killed client left its verified prefix next to DEST, nothing at DEST
    left = partials(tmp_path)
    assert len(left) == 1 and not dest.exists(), os.listdir(tmp_path)
    prefix = os.path.getsize(left[0])
    assert 8 * MiB <= prefix < 64 * MiB
    with open(left[0], "rb") as f:
        head = f.read(prefix)

    r = run_cli(bigvm, "cp", "--resume", "--json", ":" + remote, str(dest))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["resumed_from"] == prefix
    assert summary["bytes"] == 64 * MiB
    assert summary["sha256"] == gsha == sha(dest)
    with open(dest, "rb") as f:
        assert f.read(prefix) == head  # the kept prefix was used, not re-fetched differently
    assert sorted(os.listdir(tmp_path)) == ["pulled.bin"]  # no partial left next to DEST

    async def cleanup(c):
        await c.call("fs.remove", {"path": remote})
        return await guest_partials(c)

    assert run(bigvm, cleanup) == []


# --- 2. Ctrl-C through the CLI -----------------------------------------------------------------

def ctrl_c_cli(proc, ready, what):
    """Once ``ready()``, Ctrl-C the CLI ``proc``: it must exit 130 promptly with one line."""
    try:
        wait_for(proc, ready, what)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=30)
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "interrupt" in one_error_line(err)
    assert out == b""
    assert seconds < 3.0


def test_ctrl_c_during_push(bigvm, tmp_path):
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        f.truncate(512 * MiB)  # sparse: cheap to make; far more than moves before the Ctrl-C
    proc = start_cli(bigvm, "cp", str(src), ":/tmp/ctrlc-dst")
    ctrl_c_cli(proc, lambda: rchar(proc.pid) >= 32 * MiB, "the push read 32 MiB")

    async def check(c):
        exists = (await c.run(["test", "-e", "/tmp/ctrlc-dst"])).returncode == 0
        # Ctrl-C cancels the transfer (CANCEL): the agent removes its temp file (protocol.md,
        # "Temp files and resume"); its worker stops within ~0.2 s of the cancel
        deadline = time.monotonic() + 5
        while await guest_partials(c) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = await guest_partials(c)
        await check_agent_healthy(c, tmp_path, "/tmp/ctrlc-after.bin")
        return exists, left

    exists, left = run(bigvm, check)
    assert not exists
    assert left == []


def test_ctrl_c_during_pull(bigvm, tmp_path):
    remote = "/tmp/ctrlc-src.bin"
    dest = tmp_path / "dest.bin"
    run(bigvm, lambda c: guest_sh(c, "truncate -s 512M %s" % remote))
    proc = start_cli(bigvm, "cp", ":" + remote, str(dest))
    ctrl_c_cli(proc, lambda: (partial_size(tmp_path) or 0) >= 16 * MiB, "the pull wrote 16 MiB")
    # a cancelled pull keeps nothing: no DEST, no partial (only an interrupted one is kept)
    assert os.listdir(tmp_path) == []

    async def check(c):
        await c.call("fs.remove", {"path": remote})
        await check_agent_healthy(c, tmp_path, "/tmp/ctrlc-after.bin")
        return await guest_partials(c)

    assert run(bigvm, check) == []


# --- 3. the source changes during the transfer ---------------------------------------------------

@pytest.mark.parametrize("how", ["append", "overwrite"])
def test_push_source_changed_during_transfer(bigvm, tmp_path, how):
    src = tmp_path / "changing.bin"
    with open(src, "wb") as f:
        f.truncate(128 * MiB)
    proc = start_cli(bigvm, "cp", "--json", str(src), ":/tmp/changed-dst")
    try:
        wait_for(proc, lambda: rchar(proc.pid) >= 32 * MiB, "the push read 32 MiB")
        with open(src, "r+b") as f:
            if how == "append":
                f.seek(0, os.SEEK_END)
                f.write(b"x")  # the size grows: seen when the reader gets there
            else:
                f.write(b"x")  # an already sent byte: same size, only the mtime tells
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_SOFTWARE, err
    line = one_error_line(err)
    assert "%s changed during the transfer" % src in line and line.endswith("(changed)"), line
    assert out == b""

    async def check(c):
        exists = (await c.run(["test", "-e", "/tmp/changed-dst"])).returncode == 0
        return exists, await guest_partials(c)

    exists, left = run(bigvm, check)
    assert not exists
    assert left == []  # a changed source is not resumable: its partial is dropped


WATCHER = r"""
import os, sys, time
agent, path, threshold, log = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
armed = log + ".armed"
if os.fork():  # the exec returns once the watcher runs detached (own session, no pipes)
    while not os.path.exists(armed):
        time.sleep(0.01)
    os._exit(0)
os.setsid()
null = os.open("/dev/null", os.O_RDWR)
for i in (0, 1, 2):
    os.dup2(null, i)

def rchar():
    with open("/proc/%d/io" % agent) as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])

base = rchar()
open(armed, "w").close()
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    n = rchar() - base
    if n >= threshold:
        with open(path, "ab") as f:
            f.write(b"x")
        with open(log, "w") as f:
            f.write(str(n))
        sys.exit(0)
    time.sleep(0.001)
with open(log, "w") as f:
    f.write("timeout")
"""


def test_pull_source_changed_during_transfer(bigvm, tmp_path):
    remote = "/tmp/changing-src.bin"
    log = "/tmp/changing-watcher.log"
    dest = tmp_path / "dest.bin"
    size = 128 * MiB

    async def arm(c):
        await guest_sh(c, "rm -f %s %s.armed; truncate -s %d %s" % (log, log, size, remote))
        pid = int((await c.run(["pgrep", "-o", "-f", "guestlink-agent.pyz run"],
                               check=True)).stdout.split()[0])
        # appends to the file once the agent has read 32 MiB (runs on after this exec)
        await c.run(["python3", "-c", WATCHER, str(pid), remote, str(32 * MiB), log], check=True,
                    timeout=60)

    run(bigvm, arm)
    r = run_cli(bigvm, "cp", "--json", ":" + remote, str(dest))

    async def check(c):
        deadline = time.monotonic() + 10
        while (await c.run(["test", "-e", log])).returncode and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        watched = await guest_sh(c, "cat %s; echo; stat -c %%s %s; rm -f %s %s %s.armed" % (
            log, remote, remote, log, log))
        return watched.split()

    watched = run(bigvm, check)
    assert watched[1] == str(size + 1) and int(watched[0]) >= 32 * MiB, watched
    assert r.returncode == EXIT_SOFTWARE, r.stderr
    line = one_error_line(r.stderr)
    assert remote in line and line.endswith("(changed)"), line
    assert r.stdout == ""
    assert os.listdir(tmp_path) == []  # no DEST, no partial


# --- 4. memory bound while moving 1 GiB ---------------------------------------------------------

def _crc32_of_zeros(n):
    crc, zero = 0, bytes(MiB)
    for _ in range(n // MiB):
        crc = zlib.crc32(zero, crc)
    return crc


async def _agent_pid(c):
    return int((await c.run(["pgrep", "-o", "-f", "guestlink-agent.pyz run"], check=True))
               .stdout.split()[0])


async def _reset_peak(c, pid):
    await guest_sh(c, "echo 5 > /proc/%d/clear_refs" % pid)  # resets VmHWM


async def _peak_kib(c, pid):
    status = await guest_sh(c, "cat /proc/%d/status" % pid)
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


def _hwm_kib(pid):
    return _proc_number(pid, "status", "VmHWM:")  # 0: gone (or a zombie: no memory any more)


def _reap(proc, read_stdout, timeout=600):
    """Read the CLI's output (``read_stdout(stream)``) while sampling its peak RSS (VmHWM, every
    20 ms; it only grows), then reap it. Returns (output, peak KiB).

    Not ru_maxrss from wait4: Linux starts a child's maxrss at the RSS of the parent it was
    forked from (the whole pytest process), so that is only an upper bound."""
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _hwm_kib(proc.pid))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    watchdog = threading.Timer(timeout, proc.kill)  # a hung transfer fails instead of hanging
    watchdog.start()
    try:
        out = read_stdout(proc.stdout)
        err = proc.stderr.read()
        peak[0] = max(peak[0], _hwm_kib(proc.pid))
        done.set()
        sampler.join()
        proc.wait()
    finally:
        done.set()
        watchdog.cancel()
    assert proc.returncode == 0, err
    assert peak[0] > 0
    return out, peak[0]


def _crc_and_count(stream):
    crc, got = 0, 0
    buf = bytearray(MiB)
    while True:
        n = stream.readinto(buf)
        if not n:
            return "%08x" % crc, got
        crc = zlib.crc32(memoryview(buf)[:n], crc)
        got += n


def test_memory_bound_moving_1gib(bigvm, tmp_path):
    t0 = time.monotonic()
    src = tmp_path / "1g.bin"
    with open(src, "wb") as f:
        f.truncate(GiB)
    zero_crc = "%08x" % _crc32_of_zeros(GiB)

    async def before(c):
        pid = await _agent_pid(c)
        await _reset_peak(c, pid)
        return pid, await _peak_kib(c, pid)

    pid, base_kib = run(bigvm, before)
    try:
        # push 1 GiB through the real CLI
        proc = start_cli(bigvm, "cp", "--json", "--checksum", "crc32", str(src), ":/tmp/1g.bin")
        out, host_push_kib = _reap(proc, lambda stream: stream.read())
        push = json.loads(out)
        assert push["bytes"] == GiB and push["digest"] == zero_crc

        async def after_push(c):
            peak = await _peak_kib(c, pid)
            size = (await c.call("fs.stat", {"path": "/tmp/1g.bin"}))["size"]
            # the pull's source: a sparse 1 GiB file (frees the pushed one's memory first)
            await guest_sh(c, "rm -f /tmp/1g.bin; truncate -s 1G /tmp/1g-sparse.bin")
            await _reset_peak(c, pid)
            return peak, size

        agent_push_kib, size = run(bigvm, after_push)
        assert size == GiB

        # pull 1 GiB to stdout; the test checksums and counts what arrives
        proc = start_cli(bigvm, "cp", "--checksum", "crc32", ":/tmp/1g-sparse.bin", "-")
        (crc, got), host_pull_kib = _reap(proc, _crc_and_count)
        assert got == GiB and crc == zero_crc

        async def after_pull(c):
            return await _peak_kib(c, pid), await _agent_pid(c)

        agent_pull_kib, pid_after = run(bigvm, after_pull)
        assert pid_after == pid  # the same agent process all along
    finally:
        run(bigvm, lambda c: guest_sh(c, "rm -f /tmp/1g.bin /tmp/1g-sparse.bin"))
    seconds = time.monotonic() - t0
    print("\nRSS peaks (MiB): agent idle %.1f, push %.1f, pull %.1f; host CLI push %.1f, pull %.1f; "
          "push %.1f MB/s, %.1f s in all" % (base_kib / 1024, agent_push_kib / 1024,
                                             agent_pull_kib / 1024, host_push_kib / 1024,
                                             host_pull_kib / 1024, push["mb_per_s"], seconds))
    limit_kib = 50 * 1000 * 1000 // 1024  # 50 MB (issue 5), ru_maxrss and VmHWM are in KiB
    assert agent_push_kib < limit_kib and agent_pull_kib < limit_kib
    assert host_push_kib < limit_kib and host_pull_kib < limit_kib
