#!/usr/bin/env python3
"""File transfer throughput of guestlink in the QEMU test VM, against the raw port and qemu-ga.

    PYTHONPATH=src python3 benchmarks/bench_transfer.py [--json] [--mib 64] [--rounds 3]

In one VM run, repeated ROUNDS times and interleaved (this host's rates swing by 2x between
otherwise identical runs, so every rate is measured in every round and reported as best and
median, and the ratios are taken best against best and median against median):

1. raw port MB/s both ways: the best plain reader/writer on the data port while the agent has it
   closed: an exec'd guest python doing ``readv`` into a reused 256 KiB buffer / ``write`` of
   1 MiB blocks, the host on a blocking socket;
2. the *raw copy* both ways, the baseline of the goals (issue 11): a guest python copying port
   -> tmpfs file (``readv`` into a reused 64 KiB buffer, ``write``, ``fsync``) and file -> port;
   the host sends from / drains into a blocking socket;
2b. a *plain checked copy* both ways (information): a single-threaded guest python that does the
   least a checked file transfer must do, without any protocol: port -> zlib.crc32 -> tmpfs file
   (host->guest) and tmpfs file -> zlib.crc32 -> port (guest->host), 512 KiB blocks;
3. guestlink push and pull of MIB MiB of random data (tmpfs in the guest), ``--checksum crc32``
   and the default (sha256); digests compared with the host's; for these and the raw copies,
   the host CPU (this process: user + system, all threads) per MB moved;

then once: the guest CPU's SHA-256 and CRC-32 rates (hashlib / zlib on 1 MiB buffers), and
qemu-ga ``guest-file-write`` / ``guest-file-read`` MB/s (Debian's qemu-guest-agent binary and its
shared-library closure, extracted from the .debs like testvm/build.py does, run in the guest on a
third port ``org.qemu.guest_agent.0``; 48 KiB base64 chunks as libvirt users do; 8 MiB).

A benchmark, not a test: misses are reported; exit status 0 (1 only if it could not run).
"""

import argparse
import asyncio
import base64
import hashlib
import json
import os
import socket
import sys
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import _common as C  # puts src/ and the repository root on sys.path

# qemu-ga's files, port and client live in _common (bench_ping uses them too).
from _common import QGA, QGA_PORT  # noqa: E402,F401

RAW_READER = r'''
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
print("open", flush=True)
n, total = 0, int(sys.argv[2])
buf = bytearray(256 * 1024); mv = memoryview(buf)
t = None
while n < total:
    k = os.readv(fd, [mv])
    if k and t is None: t = time.monotonic()
    n += k
print(n, time.monotonic() - t, flush=True)
'''

RAW_WRITER = r'''
import os, sys, time
time.sleep(0.5)
fd = os.open(sys.argv[1], os.O_WRONLY)
total = int(sys.argv[2]); block = os.urandom(1 << 20); n = 0
while n < total:
    n += os.write(fd, block[:min(len(block), total - n)])
'''

PLAIN_RECV = r'''
import os, sys, time, zlib
fd = os.open(sys.argv[1], os.O_RDONLY)
out = os.open(sys.argv[3], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
print("open", flush=True)
n, total, crc = 0, int(sys.argv[2]), 0
buf = bytearray(512 * 1024); mv = memoryview(buf)
t = None
while n < total:
    got, want = 0, min(len(buf), total - n)
    while got < want:
        k = os.readv(fd, [mv[got:want]])
        if k and t is None: t = time.monotonic()
        got += k
    crc = zlib.crc32(mv[:got], crc)
    os.write(out, mv[:got])
    n += got
os.fsync(out)
print(n, time.monotonic() - t, flush=True)
'''

PLAIN_SEND = r'''
import os, sys, time, zlib
time.sleep(0.5)
src = os.open(sys.argv[3], os.O_RDONLY)
fd = os.open(sys.argv[1], os.O_WRONLY)
total = int(sys.argv[2]); crc = 0; n = 0
buf = bytearray(512 * 1024); mv = memoryview(buf)
while n < total:
    k = os.readv(src, [mv])
    crc = zlib.crc32(mv[:k], crc)
    v = mv[:k]
    while v: v = v[os.write(fd, v):]
    n += k
'''

# The real job without any protocol (issue 11): port -> file and file -> port, the least a
# transfer must do; guestlink is measured against these (64 KiB reused buffer, fsync).
COPY_RECV = r'''
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
out = os.open(sys.argv[3], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
print("open", flush=True)
n, total = 0, int(sys.argv[2])
buf = bytearray(64 * 1024); mv = memoryview(buf)
t = None
while n < total:
    k = os.readv(fd, [mv[:min(len(buf), total - n)]])
    if k and t is None: t = time.monotonic()
    v = mv[:k]
    while v: v = v[os.write(out, v):]
    n += k
os.fsync(out)
print(n, time.monotonic() - t, flush=True)
'''

COPY_SEND = r'''
import os, sys, time
time.sleep(0.5)
src = os.open(sys.argv[3], os.O_RDONLY)
fd = os.open(sys.argv[1], os.O_WRONLY)
total = int(sys.argv[2]); n = 0
buf = bytearray(64 * 1024); mv = memoryview(buf)
while n < total:
    k = os.readv(src, [mv])
    v = mv[:k]
    while v: v = v[os.write(fd, v):]
    n += k
'''

HASHER = r'''
import hashlib, time, zlib, os
b = os.urandom(1 << 20); out = []
for name, fn in (("sha256", lambda: hashlib.sha256(b).digest()), ("crc32", lambda: zlib.crc32(b))):
    t = time.monotonic(); n = 0
    while time.monotonic() - t < 1.5: fn(); n += 1
    out.append("%s %f" % (name, n / (time.monotonic() - t)))
print(" ".join(out))
'''


def log(msg):
    sys.stderr.write("[bench] %s\n" % msg)
    sys.stderr.flush()


def qga_bench(vm, data):
    q = QGA(vm.port_path(QGA_PORT))
    q.sync()
    chunk = 48 * 1024
    t = time.monotonic()
    h = q.call("guest-file-open", path="/tmp/qga.bin", mode="w")
    for i in range(0, len(data), chunk):
        q.call("guest-file-write", handle=h, **{"buf-b64": base64.b64encode(data[i:i + chunk]).decode()})
    q.call("guest-file-close", handle=h)
    push = len(data) / (time.monotonic() - t) / 1e6
    t = time.monotonic()
    h = q.call("guest-file-open", path="/tmp/qga.bin", mode="r")
    got = []
    while True:
        r = q.call("guest-file-read", handle=h, count=1 << 20)
        got.append(base64.b64decode(r["buf-b64"]))
        if r.get("eof") or not r["count"]:
            break
    q.call("guest-file-close", handle=h)
    pull = len(data) / (time.monotonic() - t) / 1e6
    assert b"".join(got) == data
    return push, pull


async def _host_to_guest(c, vm, argv, data):
    """Start ``argv`` in the guest (it opens the data port and prints "open", then "N SECONDS"
    once it has read everything), send ``data`` from a blocking socket; returns MB/s."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(vm.data_path)
    try:
        proc = c.exec(argv, timeout=120)
        await proc.start()
        out_it = proc.output()
        first = await out_it.__anext__()  # "open": bytes written before that would be lost
        await asyncio.sleep(0.2)
        await asyncio.get_running_loop().run_in_executor(None, s.sendall, data)
        r = await proc.wait()
        if r.returncode != 0:
            raise RuntimeError("guest reader failed: %s" % r.stderr.decode(errors="replace")[-300:])
        n, secs = (first[1] + r.stdout).split()[1:3]  # wait() collected the rest
        return int(n) / float(secs) / 1e6
    finally:
        s.close()


async def _guest_to_host(c, vm, argv, size):
    """Start ``argv`` in the guest (it writes ``size`` bytes to the data port); returns the MB/s
    the host's blocking socket received them at (from the first byte)."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(vm.data_path)
    try:
        proc = c.exec(argv, timeout=120)
        await proc.start()

        def drain():
            buf = bytearray(1 << 20)
            n = 0
            t = None
            while n < size:
                k = s.recv_into(buf)
                if t is None:
                    t = time.monotonic()
                if not k:
                    break
                n += k
            return n / (time.monotonic() - t) / 1e6

        rate = await asyncio.get_running_loop().run_in_executor(None, drain)
        s.close()  # the guest program waits for the host to leave
        r = await proc.wait()
        if r.returncode != 0:
            raise RuntimeError("guest writer failed: %s" % r.stderr.decode(errors="replace")[-300:])
        return rate
    finally:
        s.close()


RATES = ("raw_h2g", "copy_h2g", "plain_h2g", "push_crc32", "push_sha256",
         "raw_g2h", "copy_g2h", "plain_g2h", "pull_crc32", "pull_sha256")
#: host CPU (this process: the library and its threads) per MB, for these rates
CPU_OF = ("copy_h2g", "push_crc32", "push_sha256", "copy_g2h", "pull_crc32", "pull_sha256")


def host_cpu():
    """This process's user + system CPU seconds (all threads)."""
    t = os.times()
    return t.user + t.system


async def measure(vm, mib, rounds, qga_ok):
    from guestlink.host import transfer as HT
    res = {k: [] for k in RATES}
    res.update({"cpu_" + k: [] for k in CPU_OF})
    size = mib << 20
    data = os.urandom(size)
    dev = C.DATA_PORT_DEVICE
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src.bin"
        src.write_bytes(data)
        want = hashlib.sha256(data).hexdigest()
        c = await C.connect(vm, timeout=60)
        log("connected")
        async with c:
            await C.put_file(c, "/tmp/rawr.py", RAW_READER)
            await C.put_file(c, "/tmp/raww.py", RAW_WRITER)
            await C.put_file(c, "/tmp/plainr.py", PLAIN_RECV)
            await C.put_file(c, "/tmp/plainw.py", PLAIN_SEND)
            await C.put_file(c, "/tmp/copyr.py", COPY_RECV)
            await C.put_file(c, "/tmp/copyw.py", COPY_SEND)

            async def free_data_socket():
                # QEMU's chardev serves one connection: the client's data link must let go
                HT._link(c).reset()
                await asyncio.sleep(0.3)

            for rnd in range(rounds):
                await free_data_socket()
                res["raw_h2g"].append(await _host_to_guest(
                    c, vm, ["python3", "/tmp/rawr.py", dev, str(size)], data))
                cpu = host_cpu()
                res["copy_h2g"].append(await _host_to_guest(
                    c, vm, ["python3", "/tmp/copyr.py", dev, str(size), "/tmp/plain.bin"], data))
                res["cpu_copy_h2g"].append((host_cpu() - cpu) * 1e3 / (size / 1e6))
                await c.call("fs.remove", {"path": "/tmp/plain.bin"})
                res["plain_h2g"].append(await _host_to_guest(
                    c, vm, ["python3", "/tmp/plainr.py", dev, str(size), "/tmp/plain.bin"], data))
                await c.call("fs.remove", {"path": "/tmp/plain.bin"})
                for algo in ("crc32", "sha256"):
                    cpu = host_cpu()
                    r = await c.push(str(src), "/tmp/bench.bin", checksum=algo)
                    res["cpu_push_" + algo].append((host_cpu() - cpu) * 1e3 / (size / 1e6))
                    if r.digest != (want if algo == "sha256" else "%08x" % zlib.crc32(data)):
                        raise RuntimeError("push %s: digest mismatch" % algo)
                    res["push_" + algo].append(size / r.seconds / 1e6)
                await free_data_socket()
                res["raw_g2h"].append(await _guest_to_host(
                    c, vm, ["python3", "/tmp/raww.py", dev, str(size)], size))
                cpu = host_cpu()
                res["copy_g2h"].append(await _guest_to_host(
                    c, vm, ["python3", "/tmp/copyw.py", dev, str(size), "/tmp/bench.bin"], size))
                res["cpu_copy_g2h"].append((host_cpu() - cpu) * 1e3 / (size / 1e6))
                res["plain_g2h"].append(await _guest_to_host(
                    c, vm, ["python3", "/tmp/plainw.py", dev, str(size), "/tmp/bench.bin"], size))
                for algo in ("crc32", "sha256"):
                    back = Path(tmp) / ("back-" + algo)
                    cpu = host_cpu()
                    r = await c.pull("/tmp/bench.bin", str(back), checksum=algo)
                    res["cpu_pull_" + algo].append((host_cpu() - cpu) * 1e3 / (size / 1e6))
                    res["pull_" + algo].append(size / r.seconds / 1e6)
                    if hashlib.sha256(back.read_bytes()).hexdigest() != want:
                        raise RuntimeError("pull %s: the data differs" % algo)
                    back.unlink()
                log("round %d: %s" % (rnd + 1, " ".join("%s %.0f" % (k, res[k][-1]) for k in RATES)))
            await c.call("fs.remove", {"path": "/tmp/bench.bin"})
            out = (await c.run(["python3", "-c", HASHER], check=True, timeout=60)).stdout.decode().split()
            res["guest_sha256"] = float(out[1])
            res["guest_crc32"] = float(out[3])
            log("hash rates %s" % out)
    if qga_ok:
        try:
            res["qga_push"], res["qga_pull"] = qga_bench(vm, data[:8 << 20])
        except Exception as exc:  # report, do not fail the whole benchmark
            res["qga_error"] = str(exc)
    return res


def summarize(res):
    """best / median of every per-round rate, and the goal ratios both ways."""
    best = {k: max(res[k]) for k in RATES}
    med = {k: statistics.median(res[k]) for k in RATES}
    sha = res["guest_sha256"]
    goals = [
        ("crc32 push / raw copy port->file", "push_crc32", lambda v: v["copy_h2g"], 0.9),
        ("crc32 pull / raw copy file->port", "pull_crc32", lambda v: v["copy_g2h"], 0.9),
        ("sha256 push / min(raw copy, guest sha256)", "push_sha256", lambda v: min(v["copy_h2g"], sha), 0.9),
        ("sha256 pull / min(raw copy, guest sha256)", "pull_sha256", lambda v: min(v["copy_g2h"], sha), 0.9),
        ("crc32 push / raw port h2g", "push_crc32", lambda v: v["raw_h2g"], None),
        ("crc32 pull / raw port g2h", "pull_crc32", lambda v: v["raw_g2h"], None),
        ("crc32 push / plain checked copy h2g", "push_crc32", lambda v: v["plain_h2g"], None),
        ("crc32 pull / plain checked copy g2h", "pull_crc32", lambda v: v["plain_g2h"], None),
    ]
    if "qga_push" in res:
        goals.append(("sha256 push / qemu-ga write", "push_sha256", lambda v: res["qga_push"], 30))
        goals.append(("sha256 pull / qemu-ga read", "pull_sha256", lambda v: res["qga_pull"], 20))
    ratios = []
    for name, key, base, goal in goals:
        ratios.append({"ratio": name, "goal": goal, "best": best[key] / base(best),
                       "median": med[key] / base(med)})
    return best, med, ratios


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (default 3)")
    ap.add_argument("--no-qga", action="store_true", help="skip the qemu-ga comparison")
    a = ap.parse_args()
    qga_note = None if not a.no_qga else "skipped (--no-qga)"
    extra = qga_note is None
    kw = dict(memory=1024, qga=extra)
    with C.booted_vm(**kw) as vm:
        if extra:
            try:  # the guest's init runs qemu-ga on its port
                C.wait_qga(vm, 60).sock.close()
            except Exception as exc:
                qga_note = "qemu-ga did not start: %r" % exc
                extra = False
        res = asyncio.run(measure(vm, a.mib, a.rounds, bool(extra)))
    if qga_note:
        res["qga_error"] = qga_note
    best, med, ratios = summarize(res)
    if a.json:
        print(json.dumps({"results": res, "best": best, "median": med, "ratios": ratios,
                          "host": C.host_facts()}, indent=2))
        return 0
    print("%d MiB per transfer, %d rounds, TCG guest; MB/s = 10^6 bytes/s" % (a.mib, a.rounds))
    print("  %-34s %8s %8s   %s" % ("rate", "best", "median", "every round"))
    labels = {"raw_h2g": "raw port host->guest", "copy_h2g": "raw copy port->file (guest)",
              "copy_g2h": "raw copy file->port (guest)", "plain_h2g": "plain checked copy host->guest",
              "push_crc32": "guestlink push --checksum crc32", "push_sha256": "guestlink push (sha256)",
              "raw_g2h": "raw port guest->host", "plain_g2h": "plain checked copy guest->host",
              "pull_crc32": "guestlink pull --checksum crc32", "pull_sha256": "guestlink pull (sha256)"}
    for k in RATES:
        cpu = res.get("cpu_" + k)
        print("  %-34s %8.1f %8.1f   %-22s%s" % (
            labels[k], best[k], med[k], " ".join("%.0f" % v for v in res[k]),
            "  host CPU %.2f ms/MB" % statistics.median(cpu) if cpu else ""))
    print("  %-34s %8.1f" % ("guest SHA-256 (hashlib, 1 MiB)", res["guest_sha256"]))
    print("  %-34s %8.1f" % ("guest CRC-32 (zlib, 1 MiB)", res["guest_crc32"]))
    for k, label in (("qga_push", "qemu-ga guest-file-write"), ("qga_pull", "qemu-ga guest-file-read")):
        if k in res:
            print("  %-34s %8.1f" % (label, res[k]))
    if "qga_error" in res:
        print("  qemu-ga: %s" % res["qga_error"])
    print("  %-44s %7s %7s  %s" % ("ratio", "best", "median", "goal"))
    for r in ratios:
        goal = r["goal"]
        verdict = "(info)" if goal is None else ">= %g  %s" % (
            goal, "ok" if r["best"] >= goal and r["median"] >= goal
            else "ok at best" if r["best"] >= goal else "MISS")
        print("  %-44s %7.2f %7.2f  %s" % (r["ratio"], r["best"], r["median"], verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
