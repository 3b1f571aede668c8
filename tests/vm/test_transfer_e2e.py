"""File transfer against the real agent in QEMU (issue 5)."""

import asyncio
import hashlib
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time

import pytest

from guestlink.host import errors as E
from guestlink.host import transfer as HT
from guestlink.host.client import connect
from guestlink.protocol.transfer import DEFAULT_CHUNK
from vmhelpers import cli_env, guest_sh, run, sha



async def guest_sha(c, path):
    r = await c.run(["sha256sum", path], check=True)
    return r.stdout.split()[0].decode()


@pytest.mark.parametrize("size", [0, 1, DEFAULT_CHUNK - 1, DEFAULT_CHUNK, DEFAULT_CHUNK + 1,
                                  2 * DEFAULT_CHUNK + 7])
def test_push_pull_sizes(vm, tmp_path, size):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(size))
    back = tmp_path / "back.bin"
    remote = "/tmp/sizes-%d.bin" % size

    async def go(c):
        r1 = await c.push(str(src), remote)
        gsha = await guest_sha(c, remote)
        r2 = await c.pull(remote, str(back))
        await c.call("fs.remove", {"path": remote})
        return r1, r2, gsha

    r1, r2, gsha = run(vm, go)
    assert r1.bytes == r2.bytes == size
    assert gsha == sha(src) == r1.digest == r2.digest == sha(back)
    assert back.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("checksum", ["sha256", "crc32"])
def test_64mib_push_pull(vm, tmp_path, checksum):
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    back = tmp_path / "big.back"

    async def go(c):
        await c.push(str(src), "/tmp/big.bin", checksum=checksum)
        gsha = await guest_sha(c, "/tmp/big.bin")
        await c.pull("/tmp/big.bin", str(back), checksum=checksum)
        await c.call("fs.remove", {"path": "/tmp/big.bin"})
        return gsha

    gsha = run(vm, go)
    assert gsha == sha(src) == sha(back)


def test_recursive_round_trip_preserves_mode_mtime_symlinks(vm, tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "a.txt").write_bytes(b"alpha\n")
    (tree / "sub" / "b.bin").write_bytes(os.urandom(DEFAULT_CHUNK + 3))
    (tree / "sub" / "deeper" / "empty").write_bytes(b"")
    os.symlink("sub/b.bin", tree / "link-to-b")
    os.symlink("/etc/hostname", tree / "abs-link")
    os.chmod(tree / "a.txt", 0o640)
    os.utime(tree / "a.txt", ns=(1_500_000_000_123_456_789, 1_500_000_000_123_456_789))
    os.chmod(tree / "sub", 0o750)
    os.utime(tree / "sub", ns=(1_400_000_000_000_000_000,) * 2)
    out = tmp_path / "out"

    async def go(c):
        await guest_sh(c, "rm -rf /tmp/rt && mkdir /tmp/rt")
        r = await c.push(str(tree), "/tmp/rt", recursive=True, preserve=True)
        listing = await guest_sh(c, "cd /tmp/rt/tree && ls -la . sub && readlink link-to-b && "
                                 "readlink abs-link && sha256sum sub/b.bin && stat -c '%a %Y' a.txt sub")
        r2 = await c.pull("/tmp/rt/tree", str(out), recursive=True, preserve=True)
        return r, r2, listing

    r, r2, listing = run(vm, go)
    assert r.files == 3 and r2.files == 3
    assert "sub/b.bin\n" in listing and hashlib.sha256((tree / "sub" / "b.bin").read_bytes()).hexdigest() in listing
    assert "640 1500000000" in listing and "750 1400000000" in listing
    for rel in ("a.txt", "sub/b.bin", "sub/deeper/empty"):
        assert (out / rel).read_bytes() == (tree / rel).read_bytes()
    assert os.readlink(out / "link-to-b") == "sub/b.bin"
    assert os.readlink(out / "abs-link") == "/etc/hostname"
    st = os.stat(out / "a.txt")
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == 1_500_000_000_123_456_789
    st = os.stat(out / "sub")
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_mtime_ns == 1_400_000_000_000_000_000


def test_preserve_keeps_the_owner_when_root(vm, tmp_path, run_cli):
    # scripts/test (= CI) runs as root: it installs its Debian packages with apt-get
    assert os.geteuid() == 0, "owner preservation is tested as root on the host"
    src = tmp_path / "owned"
    src.write_bytes(b"owned by 1234:2345")
    os.chown(src, 1234, 2345)
    r = run_cli("cp", "-p", str(src), ":/tmp/owned")
    assert r.returncode == 0, r.stderr
    r = run_cli("exec", "--", "sh", "-c", "stat -c '%u %g' /tmp/owned; chown 4321:5432 /tmp/owned")
    assert r.stdout.split() == ["1234", "2345"]
    r = run_cli("cp", "-p", ":/tmp/owned", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    st = os.stat(tmp_path / "back")
    assert (st.st_uid, st.st_gid) == (4321, 5432)
    r = run_cli("cp", ":/tmp/owned", str(tmp_path / "plain"))  # without -p: the host user's
    assert r.returncode == 0, r.stderr
    assert os.stat(tmp_path / "plain").st_uid == 0
    run_cli("exec", "--", "rm", "-f", "/tmp/owned")


def test_pull_never_takes_setuid_or_setgid_bits_from_the_guest(vm, tmp_path, run_cli):
    """The guest is untrusted: `cp -p` from it (as root here) must not plant setuid files."""
    setup = run_cli("exec", "--", "sh", "-c", "rm -rf /tmp/suid && mkdir -p /tmp/suid/d && "
                    "echo x > /tmp/suid/f && chmod 4755 /tmp/suid/f && chmod 2775 /tmp/suid/d")
    assert setup.returncode == 0, setup.stderr
    r = run_cli("cp", "-p", ":/tmp/suid/f", str(tmp_path / "f"))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o755
    r = run_cli("cp", "-r", "-p", ":/tmp/suid", str(tmp_path / "tree"))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "tree" / "f").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "tree" / "d").st_mode) == 0o775
    run_cli("exec", "--", "rm", "-rf", "/tmp/suid")


def test_errors_are_clear(vm, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(1 << 40)  # sparse: the guest must refuse it before any byte moves

    async def go(c):
        errs = {}
        for key, coro in [
            ("missing_dir", c.push(str(src), "/tmp/no/such/dir/f")),
            ("no_space", c.push(str(huge), "/tmp/huge")),
            ("pull_missing", c.pull("/tmp/does-not-exist", str(tmp_path / "x"))),
            ("pull_dir", c.pull("/tmp", str(tmp_path / "y"))),
        ]:
            try:
                await coro
            except E.GuestlinkError as exc:
                errs[key] = exc
        errs["ping"] = await c.ping()  # the connection is still fine
        leftovers = await guest_sh(c, "ls -a /tmp | grep guestlink- || true")
        return errs, leftovers

    errs, leftovers = run(vm, go)
    assert isinstance(errs["missing_dir"], E.RemoteNotFound)
    assert isinstance(errs["no_space"], E.RemoteNoSpace)
    assert isinstance(errs["pull_missing"], E.RemoteNotFound)
    assert isinstance(errs["pull_dir"], E.RemoteIsADirectory)
    assert leftovers.strip() == ""
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_errors_from_the_guest_file_system_are_clear_and_leave_nothing(vm, tmp_path, run_cli):
    """Read-only target, a directory in the way, and a disk that fills up mid-transfer (a push
    from stdin: no size announced, so the agent cannot refuse it up front)."""
    src = tmp_path / "f"
    src.write_bytes(b"x" * 1000)
    setup = run_cli("exec", "--", "sh", "-c",
                    "mkdir -p /mnt/ro /mnt/small /tmp/dirs/f && mount -t tmpfs -o ro tmpfs /mnt/ro"
                    " && mount -t tmpfs -o size=1m tmpfs /mnt/small")
    assert setup.returncode == 0, setup.stderr
    try:
        r = run_cli("cp", str(src), ":/mnt/ro/f")
        assert r.returncode == 77, r.stderr
        assert "permission denied" in r.stderr and len(r.stderr.splitlines()) == 1
        r = run_cli("cp", str(src), ":/tmp/dirs")  # /tmp/dirs/f is a directory
        assert r.returncode == 70, r.stderr
        assert "is a directory" in r.stderr and len(r.stderr.splitlines()) == 1
        full = subprocess.run([sys.executable, "-m", "guestlink", "cp", "-", ":/mnt/small/big"],
                              env=cli_env(vm), input=os.urandom(3 << 20), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60)
        err = full.stderr.decode()
        assert full.returncode == 70, err
        assert "no space left" in err and "Traceback" not in err and len(err.splitlines()) == 1
        left = run_cli("exec", "--", "sh", "-c", "ls -a /mnt/small /mnt/ro; df -k /mnt/small")
        assert left.returncode == 0
        names = left.stdout.split()
        assert "big" not in names and not any(n.startswith(".guestlink-") for n in names)
        assert run_cli("ping").returncode == 0
    finally:
        run_cli("exec", "--", "sh", "-c", "umount /mnt/ro /mnt/small; rm -rf /tmp/dirs")


def test_agent_restarted_mid_push_then_resume(vm, tmp_path):
    """The agent dies mid-transfer (the test bed's init restarts it); --resume continues from the
    verified prefix the dead agent left, and the digest still covers the whole file."""
    src = tmp_path / "restart.bin"
    with open(src, "wb") as f:
        for _ in range(48):
            f.write(os.urandom(1 << 20))

    async def interrupted():
        async with connect(ctl=vm.ctl_path, data=vm.data_path, timeout=10) as c:
            pid = int((await c.run(["pgrep", "-o", "-f", "guestlink-agent.pyz run"],
                                   check=True)).stdout.split()[0])
            far = asyncio.Event()
            push = asyncio.ensure_future(c.push(str(src), "/tmp/restart.bin", progress=lambda done, total:
                                                done >= 12 << 20 and far.set()))
            await asyncio.wait_for(far.wait(), 60)
            try:
                await c.run(["kill", "-9", str(pid)])
            except E.GuestlinkError:
                pass  # the agent died under the request
            with pytest.raises(E.GuestlinkError):
                await push
            return pid

    old_pid = asyncio.run(interrupted())

    async def resume():
        deadline = time.monotonic() + 30
        while True:
            try:
                c = await connect(ctl=vm.ctl_path, data=vm.data_path, timeout=5)
                break
            except E.GuestlinkError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        async with c:
            new_pid = int((await c.run(["pgrep", "-o", "-f", "guestlink-agent.pyz run"],
                                       check=True)).stdout.split()[0])
            r = await c.push(str(src), "/tmp/restart.bin", resume=True)
            gsha = await guest_sha(c, "/tmp/restart.bin")
            left = await guest_sh(c, "ls -a /tmp | grep guestlink- || true; rm -f /tmp/restart.bin")
            return new_pid, r, gsha, left

    new_pid, r, gsha, left = asyncio.run(resume())
    assert new_pid != old_pid
    assert r.resumed_from > 0 and r.bytes == 48 << 20
    assert r.digest == gsha == sha(src)
    assert left.strip() == ""


def test_ping_answered_during_large_push(vm, tmp_path):
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))

    async def go(c):
        task = asyncio.ensure_future(c.push(str(src), "/tmp/ping-big.bin"))
        rtts = []
        await asyncio.sleep(0.3)
        while not task.done():
            rtts.append(await c.ping())
            r = await c.run(["true"])  # exec works meanwhile too
            assert r.returncode == 0
            await asyncio.sleep(0.05)
        await task
        await c.call("fs.remove", {"path": "/tmp/ping-big.bin"})
        return rtts

    rtts = run(vm, go)
    assert rtts, "the push finished before a ping could be sent"
    assert max(rtts) < 1.0, rtts


def test_transfers_queue_per_vm(vm, tmp_path):
    files = []
    for i in range(3):
        p = tmp_path / ("q%d" % i)
        p.write_bytes(os.urandom(300_000 + i))
        files.append(p)

    async def go(c):
        await asyncio.gather(*[c.push(str(p), "/tmp/q%d" % i) for i, p in enumerate(files)])
        return [await guest_sha(c, "/tmp/q%d" % i) for i in range(3)]

    assert run(vm, go) == [sha(p) for p in files]


def test_concurrent_cli_commands_queue_per_vm(vm, tmp_path):
    """QEMU serves one client per VM: a second `guestlink` command waits for the first (and
    says for whom) instead of timing out; with --queue-timeout 0 it fails at once, clearly."""
    from guestlink.host.vmlock import VMLock
    srcs = []
    for i in range(2):
        p = tmp_path / ("c%d.bin" % i)
        with open(p, "wb") as f:
            for _ in range(48):
                f.write(os.urandom(1 << 20))
        srcs.append(p)

    def start_cp(i):
        return subprocess.Popen([sys.executable, "-m", "guestlink", "cp", str(srcs[i]),
                                 ":/tmp/conc%d.bin" % i], env=cli_env(vm), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for_holder(proc):
        """Until ``proc`` holds the VM (a client killed earlier may have left its lock file)."""
        deadline = time.monotonic() + 30
        while not (VMLock(vm.ctl_path).holder("") + " ").startswith("pid %d " % proc.pid):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.01)

    first = start_cp(0)
    wait_for_holder(first)
    second = start_cp(1)  # while the first is still sending its 48 MiB
    outs = [p.communicate(timeout=180) for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outs
    assert outs[0][1] == ""
    assert outs[1][1] == ("guestlink: waiting for the VM: it is in use by pid %d (guestlink cp %s "
                          ":/tmp/conc0.bin)\n" % (first.pid, srcs[0]))
    r = run(vm, lambda c: guest_sh(c, "sha256sum /tmp/conc0.bin /tmp/conc1.bin; "
                                      "rm -f /tmp/conc0.bin /tmp/conc1.bin"))
    assert [l.split()[0] for l in r.splitlines()] == [sha(p) for p in srcs]

    cp = subprocess.Popen([sys.executable, "-m", "guestlink", "cp", str(srcs[0]), ":/tmp/conc.bin"],
                          env=cli_env(vm), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        wait_for_holder(cp)
        r = subprocess.run([sys.executable, "-m", "guestlink", "ping", "--queue-timeout", "0"],
                           env=cli_env(vm), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=60)
        assert r.returncode == 75, r
        assert r.stderr == ("guestlink: error: %s is in use by pid %d (guestlink cp %s :/tmp/conc.bin)"
                            " (guestlink serves one client per VM at a time)\n"
                            % (vm.ctl_path, cp.pid, srcs[0]))
    finally:
        out = cp.communicate(timeout=180)
    assert cp.returncode == 0, out
    run(vm, lambda c: guest_sh(c, "rm -f /tmp/conc.bin"))


KILLER = r"""
import asyncio, sys
from guestlink.host.client import connect
async def main():
    async with connect(ctl=sys.argv[1], data=sys.argv[2]) as c:
        def cb(done, total):
            print(done, flush=True)
        way, src, dst = sys.argv[3:6]
        copy = c.push if way == "push" else c.pull
        await copy(src, dst, recursive=sys.argv[6:] == ["-r"], progress=cb)
asyncio.run(main())
"""


def _kill_at(vm, args, at):
    """Run KILLER (``args``: push|pull SRC DST [-r]) and SIGKILL it once ``at`` bytes are done."""
    proc = subprocess.Popen([sys.executable, "-c", KILLER, vm.ctl_path, vm.data_path] + args,
                            env=cli_env(vm), stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if int(line) >= at:
                break
        else:
            pytest.fail("the copy ended before it could be killed")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
    time.sleep(0.5)  # the agent notices the host went away


def test_kill_host_mid_push_then_resume(vm, tmp_path, run_cli):
    src = tmp_path / "resume.bin"
    with open(src, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    _kill_at(vm, ["push", str(src), "/tmp/resume.bin"], 16 << 20)
    r = run_cli("cp", "--resume", "--json", str(src), ":/tmp/resume.bin")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["resumed_from"] >= 8 << 20
    assert summary["bytes"] == 64 << 20
    assert summary["sha256"] == sha(src)

    async def check(c):
        return await guest_sha(c, "/tmp/resume.bin"), await guest_sh(
            c, "ls -a /tmp | grep guestlink- || true; rm -f /tmp/resume.bin")

    gsha, leftovers = run(vm, check)
    assert gsha == sha(src)
    assert leftovers.strip() == ""


def _many_files(root, n):
    """``n`` files of 0..4999 bytes under ``root`` in nested directories, plus one of 2 chunks."""
    rnd = random.Random(n)
    for i in range(n):
        d = root / ("d%d" % (i % 7)) / ("e%d" % (i % 3))
        d.mkdir(parents=True, exist_ok=True)
        (d / ("f%03d" % i)).write_bytes(os.urandom(rnd.randrange(5000)))
    (root / "big.bin").write_bytes(os.urandom(2 * DEFAULT_CHUNK + 11))
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_recursive_copy_of_many_files_goes_in_batches(vm, tmp_path):
    """300 files: two batches (256 + 45) each way, one opening of the data port per batch, every
    file intact, progress over the whole tree."""
    tree = tmp_path / "many"
    names = _many_files(tree, 300)
    total = sum((tree / n).stat().st_size for n in names)
    out = tmp_path / "out"
    seen = {"push": [], "pull": []}
    mark = len(vm.console_text())

    async def go(c):
        await guest_sh(c, "rm -rf /tmp/batch && mkdir /tmp/batch")
        r1 = await c.push(str(tree), "/tmp/batch", recursive=True,
                          progress=lambda done, tot: seen["push"].append((done, tot)))
        sums = await guest_sh(c, "cd /tmp/batch/many && find . -type f | sort | xargs sha256sum")
        r2 = await c.pull("/tmp/batch/many", str(out), recursive=True,
                          progress=lambda done, tot: seen["pull"].append((done, tot)))
        await guest_sh(c, "rm -rf /tmp/batch")
        return r1, r2, sums

    r1, r2, sums = run(vm, go, timeout=120)
    assert r1.files == r2.files == len(names) == 301 and r1.bytes == r2.bytes == total
    assert {l.split()[1][2:]: l.split()[0] for l in sums.splitlines()} == {
        n: sha(tree / n) for n in names}
    for n in names:
        assert (out / n).read_bytes() == (tree / n).read_bytes(), n
    for way in ("push", "pull"):
        done = [d for d, _ in seen[way]]
        assert done == sorted(done) and seen[way][-1] == (total, total), way
    log = vm.console_text()[mark:]
    assert len(re.findall(r"transfer \d+ \(push [^)]*\): started", log)) == 2
    assert len(re.findall(r"transfer \d+ \(pull [^)]*\): started", log)) == 2
    assert len(re.findall(r"transfer \d+: file \d+ of 256, ", log)) == 2 * 256



def test_kill_host_mid_batch_then_resume_both_ways(vm, tmp_path, run_cli):
    """A recursive copy killed inside a batch: the files before stay, the one in flight keeps its
    verified prefix, and `cp -r --resume` continues it from there (push and pull)."""
    tree = tmp_path / "kt"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_bytes(b"first\n")
    with open(tree / "m.bin", "wb") as f:
        for _ in range(48):
            f.write(os.urandom(1 << 20))
    (tree / "sub" / "z.txt").write_bytes(b"last\n")
    run_cli("exec", "--", "sh", "-c", "rm -rf /tmp/kt && mkdir /tmp/kt")
    mark = len(vm.console_text())
    _kill_at(vm, ["push", str(tree), "/tmp/kt", "-r"], 16 << 20)
    r = run_cli("exec", "--", "sh", "-c", "cd /tmp/kt/kt && cat a.txt && ls -a . sub")
    assert r.stdout.startswith("first\n") and ".guestlink-" in r.stdout and "z.txt" not in r.stdout
    r = run_cli("cp", "-r", "--resume", str(tree), ":/tmp/kt")
    assert r.returncode == 0, r.stderr
    resumed = re.findall(r"file 2 of 3, /tmp/kt/kt/m.bin from offset (\d+)", vm.console_text()[mark:])
    assert len(resumed) == 2 and int(resumed[0]) == 0 and int(resumed[1]) >= 8 << 20, resumed
    r = run_cli("exec", "--", "sh", "-c", "cd /tmp/kt/kt && sha256sum a.txt m.bin sub/z.txt && "
                                          "ls -aR | grep guestlink- || true")
    assert [l.split()[0] for l in r.stdout.splitlines()] == [
        sha(tree / n) for n in ("a.txt", "m.bin", "sub/z.txt")]

    back = tmp_path / "back"
    back.mkdir()
    _kill_at(vm, ["pull", "/tmp/kt/kt", str(back), "-r"], 16 << 20)
    partials = [p for p in (back / "kt").iterdir() if p.name.startswith(".guestlink-")]
    assert (back / "kt" / "a.txt").read_bytes() == b"first\n" and len(partials) == 1
    have = partials[0].stat().st_size
    assert have >= 8 << 20 and not (back / "kt" / "m.bin").exists()
    mark = len(vm.console_text())
    r = run_cli("cp", "-r", "--resume", ":/tmp/kt/kt", str(back))
    assert r.returncode == 0, r.stderr
    assert re.search(r"file 2 of 3, /tmp/kt/kt/m.bin from offset %d" % have,
                     vm.console_text()[mark:])
    for n in ("a.txt", "m.bin", "sub/z.txt"):
        assert sha(back / "kt" / n) == sha(tree / n), n
    assert [p.name for p in (back / "kt").iterdir() if p.name.startswith(".guestlink-")] == []
    run_cli("exec", "--", "rm", "-rf", "/tmp/kt")


def test_cli_cp_json_and_streams(vm, tmp_path, run_cli):
    src = tmp_path / "cli.bin"
    src.write_bytes(os.urandom(100_000))
    r = run_cli("cp", "--json", "-p", str(src), ":/tmp/cli.bin")
    assert r.returncode == 0, r.stderr
    push = json.loads(r.stdout)
    assert push["bytes"] == 100_000 and push["sha256"] == sha(src) and push["mb_per_s"] > 0
    assert r.stderr == ""  # not a TTY: no progress bar
    r = run_cli("cp", "--json", "--checksum", "blake2b", ":/tmp/cli.bin", str(tmp_path / "cli.back"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["digest"] == hashlib.blake2b(src.read_bytes()).hexdigest()
    assert (tmp_path / "cli.back").read_bytes() == src.read_bytes()
    env = cli_env(vm)
    out = subprocess.run([sys.executable, "-m", "guestlink", "cp", ":/tmp/cli.bin", "-"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert out.returncode == 0 and out.stdout == src.read_bytes()
    data = os.urandom(70_000)
    inp = subprocess.run([sys.executable, "-m", "guestlink", "cp", "-", ":/tmp/stdin.bin"], env=env,
                         input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert inp.returncode == 0, inp.stderr
    r = run_cli("exec", "--", "sha256sum", "/tmp/stdin.bin")
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    r = run_cli("cp", str(src), "relative/path")
    assert r.returncode == 2 and "exactly one" in r.stderr


def test_cli_cp_several_sources_like_scp(vm, tmp_path, run_cli):
    """`cp A B DIR :/dir/` and back: each source lands in the directory; one that fails is
    reported in one line, the others are still copied, the exit status is the failure's."""
    files = {}
    for name, size in (("one.bin", 70_000), ("two.bin", 1), ("three.bin", DEFAULT_CHUNK + 3)):
        files[name] = tmp_path / name
        files[name].write_bytes(os.urandom(size))
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "leaf").write_bytes(b"leaf")
    run_cli("exec", "--", "sh", "-c", "rm -rf /tmp/many && mkdir /tmp/many")
    missing = tmp_path / "missing.bin"
    r = run_cli("cp", "-r", "--json", str(files["one.bin"]), str(missing), str(files["two.bin"]),
                str(tree), str(files["three.bin"]), ":/tmp/many")
    assert r.returncode == 74, r.stderr
    assert r.stderr == "guestlink: error: local I/O error: %s: No such file or directory\n" % missing
    summary = json.loads(r.stdout)
    assert [c["destination"] for c in summary["copies"]] == [
        "/tmp/many/one.bin", "/tmp/many/two.bin", "/tmp/many/tree", "/tmp/many/three.bin"]
    assert summary["files"] == 4 and summary["errors"] == [
        {"source": str(missing), "error": "local I/O error: %s: No such file or directory" % missing}]
    r = run_cli("exec", "--", "sh", "-c", "cd /tmp/many && sha256sum one.bin two.bin three.bin "
                                          "tree/sub/leaf")
    assert [l.split()[0] for l in r.stdout.splitlines()] == [
        sha(files[n]) for n in ("one.bin", "two.bin", "three.bin")] + [sha(tree / "sub" / "leaf")]

    back = tmp_path / "back"
    back.mkdir()
    r = run_cli("cp", ":/tmp/many/one.bin", ":/tmp/many/nope", ":/tmp/many/three.bin", str(back))
    assert r.returncode == 70
    assert r.stderr == "guestlink: error: /tmp/many/nope: No such file or directory (not_found)\n"
    assert sorted(os.listdir(back)) == ["one.bin", "three.bin"]
    assert all(sha(back / n) == sha(files[n]) for n in ("one.bin", "three.bin"))
    r = run_cli("cp", str(files["one.bin"]), str(files["two.bin"]), ":/tmp/many/one.bin")
    assert r.returncode == 70 and r.stderr == (
        "guestlink: error: target /tmp/many/one.bin is not a directory in the guest (several "
        "sources) (not_a_directory)\n")
    run_cli("exec", "--", "rm", "-rf", "/tmp/many")


def _cli_with_tty_stderr(vm, args):
    """Run the CLI with stderr on a pseudo-terminal; returns (exit code, stdout, terminal text)."""
    import pty
    import threading
    master, slave = pty.openpty()
    seen = bytearray()

    def drain():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "guestlink"] + args, env=cli_env(vm),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                              timeout=120)
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    return proc.returncode, proc.stdout, seen.decode("utf-8", "replace")


def test_cli_cp_shows_progress_with_rate_and_eta_on_a_terminal(vm, tmp_path):
    src = tmp_path / "bar.bin"
    with open(src, "wb") as f:
        for _ in range(32):
            f.write(os.urandom(1 << 20))
    for args in (["cp", str(src), ":/tmp/bar.bin"], ["cp", ":/tmp/bar.bin", str(tmp_path / "back")]):
        rc, out, term = _cli_with_tty_stderr(vm, args)
        assert rc == 0, term
        assert out == b""
        lines = [l for l in term.replace("\r", "\n").split("\n") if "bar.bin" in l]
        assert lines, term
        last = lines[-1]
        assert "100.0%" in last and "32.0 MiB/32.0 MiB" in last
        assert "MB/s" in last and "ETA 0:00" in last
        assert "Traceback" not in term
    assert sha(tmp_path / "back") == sha(src)


def test_guestlink_run_script(vm, tmp_path, run_cli):
    script = tmp_path / "hello.sh"
    script.write_text('#!/bin/sh\necho "args: $1 $2"\necho "to stderr" >&2\nexit 7\n')
    r = run_cli("run", str(script), "one", "two words")
    assert r.returncode == 7, r.stderr
    assert r.stdout == "args: one two words\n"
    assert "to stderr" in r.stderr
    r = run_cli("exec", "--", "sh", "-c", "ls -a /tmp | grep guestlink-run || true")
    assert r.stdout.strip() == ""


# --- a VM with test hooks, a restricted policy and a hostile handler ------------------------------

HOSTILE = '''
def handle(args, ctx):
    kind = args.get("kind")
    if kind == "dotdot":
        return {"entries": [{"path": "ok.txt", "type": "file", "size": 3, "mtime_ns": 0},
                            {"path": "../escaped.txt", "type": "file", "size": 3, "mtime_ns": 0}],
                "next": None}
    if kind == "absolute":
        return {"entries": [{"path": "/tmp/abs.txt", "type": "file", "size": 3}], "next": None}
    if kind == "hugetime":  # os.utime on the host would raise OverflowError
        return {"entries": [{"path": "ok.txt", "type": "file", "size": 3, "mtime_ns": 2 ** 80}],
                "next": None}
    return {"entries": [{"path": "link", "type": "symlink", "target": args["outside"]},
                        {"path": "link/planted.txt", "type": "file", "size": 3, "mtime_ns": 0}],
            "next": None}
'''

CONF = """
[files]
test_hooks = true
write_roots = /tmp /var
read_roots = /tmp /etc
"""


@pytest.fixture(scope="module")
def hookvm(make_vm):
    return make_vm(extra_files={"/etc/guestlink/agent.conf": CONF.encode(),
                                "/etc/guestlink/handlers.d/evil.list.py": HOSTILE.encode()})


def test_corrupt_chunk_is_rejected_both_ways(hookvm, tmp_path):
    src = tmp_path / "c.bin"
    src.write_bytes(os.urandom(3 * DEFAULT_CHUNK))

    async def go(c):
        errs = []
        try:
            await HT.push_file(c, str(src), "/tmp/corrupt.bin", _test_corrupt=DEFAULT_CHUNK + 5)
        except E.ChecksumMismatch as exc:
            errs.append(exc)
        await c.push(str(src), "/tmp/good.bin")
        try:
            await HT.pull_file(c, "/tmp/good.bin", str(tmp_path / "pulled.bin"),
                               _test_corrupt=2 * DEFAULT_CHUNK + 1)
        except E.ChecksumMismatch as exc:
            errs.append(exc)
        listing = await guest_sh(c, "ls -a /tmp")
        return errs, listing

    errs, listing = run(hookvm, go)
    assert len(errs) == 2, errs
    assert "corrupt.bin" not in listing and ".guestlink-" not in listing
    assert "good.bin" in listing
    assert sorted(os.listdir(tmp_path)) == ["c.bin"]


def test_policy_roots(hookvm, tmp_path):
    src = tmp_path / "p"
    src.write_bytes(b"data")

    async def go(c):
        errs = []
        for coro in (c.push(str(src), "/root/p"), c.pull("/proc/version", str(tmp_path / "v"))):
            try:
                await coro
            except E.CommandDenied as exc:
                errs.append(str(exc))
        return errs

    errs = run(hookvm, go)
    assert len(errs) == 2 and "write_roots" in errs[0] and "read_roots" in errs[1]


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hugetime"])
def test_hostile_pull_writes_nothing_outside(hookvm, tmp_path, kind):
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()

    async def go(c):
        await guest_sh(c, "mkdir -p /tmp/hostile && echo hi > /tmp/hostile/ok.txt")
        real_call = c.call

        async def call(op, args=None, **kw):  # pass the outside dir to the hostile handler
            if op == "evil.list":
                args = dict(args, kind=kind, outside=str(outside))
            return await real_call(op, args, **kw)

        c.call = call
        with pytest.raises(E.ProtocolError):
            await HT.pull_tree(c, "/tmp/hostile", str(dest), _list_op="evil.list", preserve=True)

    run(hookvm, go)
    assert os.listdir(outside) == []
    assert not (tmp_path / "escaped.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["dest", "outside"]
