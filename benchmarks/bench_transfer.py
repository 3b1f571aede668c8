#!/usr/bin/env python3
"""File transfer throughput of guestlink in the QEMU test VM, against the raw port and qemu-ga.

    PYTHONPATH=src python3 benchmarks/bench_transfer.py [--json] [--mib 64]

In one VM run:

1. guestlink push and pull of MIB MiB of random data (tmpfs in the guest), default checksum
   (sha256) and ``--checksum crc32``; digests compared with the host's;
2. raw port MB/s both ways: the best plain reader/writer on the data port while the agent has it
   closed — an exec'd guest python doing ``readinto`` a reused 256 KiB buffer / ``write`` of
   1 MiB blocks, the host on a blocking socket;
3. the guest CPU's SHA-256 and CRC-32 rates (hashlib / zlib on 1 MiB buffers);
4. qemu-ga ``guest-file-write`` / ``guest-file-read`` MB/s: Debian's qemu-guest-agent binary and
   its shared-library closure (extracted from the .debs like testvm/build.py does) are put in the
   guest and run on a third port ``org.qemu.guest_agent.0``; 48 KiB base64 chunks as libvirt users do;
5. ratios vs the goals of issue 5.

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
import tempfile
import time
from pathlib import Path

import _common as C  # puts src/ and the repository root on sys.path

QGA_PORT = "org.qemu.guest_agent.0"
QGA_PKGS = ["qemu-guest-agent", "libglib2.0-0", "libpcre2-8-0", "libmount1", "libblkid1",
            "libselinux1", "libffi8", "zlib1g", "liburing2", "libnuma1", "libudev1", "libgcc-s1"]

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


def qga_files():
    """{guest path: host path} for qemu-ga and its libraries, or raise with the reason."""
    from testvm import build as B
    pol = B._policy(QGA_PKGS)
    versions = {p: v["candidate"] for p, v in pol.items() if v.get("candidate")}
    if "qemu-guest-agent" not in versions:
        raise RuntimeError("apt knows no qemu-guest-agent candidate")
    debs = B.fetch_debs(versions, C.REPO / ".cache" / "testvm" / "debs")
    stage = Path(tempfile.mkdtemp(prefix="qga-stage-"))
    B._unpack(debs, stage)
    for libc in B.fetch_debs({"libc6": B.resolve_versions()["libc6"]}, C.REPO / ".cache" / "testvm" / "debs").values():
        B._unpack({"libc6": libc}, stage)
    root = Path(tempfile.mkdtemp(prefix="qga-root-"))
    binary = stage / "usr" / "sbin" / "qemu-ga"
    if B._copy_libs(stage, root, [binary]):
        raise RuntimeError("qemu-ga's shared libraries could not all be found")
    files = {"/usr/sbin/qemu-ga": str(binary)}
    for lib in (root / "lib" / B.MULTIARCH).iterdir():
        files["/lib/%s/%s" % (B.MULTIARCH, lib.name)] = str(lib)
    return files


class QGA:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.buf = b""
        self.f = self.sock.makefile("rb")

    def call(self, cmd, **args):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError("qemu-ga closed")
            obj = json.loads(line.lstrip(b"\xff"))
            if "error" in obj:
                raise RuntimeError(obj["error"])
            if "return" in obj:
                return obj["return"]

    def sync(self):
        import random
        n = random.randint(1, 1 << 30)
        self.sock.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited",
                                                "arguments": {"id": n}}).encode() + b"\n")
        while True:
            line = self.f.readline().lstrip(b"\xff")
            if line.strip() and json.loads(line).get("return") == n:
                return


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


async def measure(vm, mib, qga_ok):
    res = {}
    size = mib << 20
    data = os.urandom(size)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src.bin"
        src.write_bytes(data)
        want = hashlib.sha256(data).hexdigest()
        c = await C.connect(vm, timeout=60)
        log("connected")
        async with c:
            for algo in ("sha256", "crc32"):
                r = await c.push(str(src), "/tmp/bench.bin", checksum=algo)
                res["push_" + algo] = size / r.seconds / 1e6
                log("push %s %.1f MB/s" % (algo, res["push_" + algo]))
                back = Path(tmp) / ("back-" + algo)
                r = await c.pull("/tmp/bench.bin", str(back), checksum=algo)
                res["pull_" + algo] = size / r.seconds / 1e6
                assert hashlib.sha256(back.read_bytes()).hexdigest() == want
                back.unlink()
            await c.call("fs.remove", {"path": "/tmp/bench.bin"})
            out = (await c.run(["python3", "-c", HASHER], check=True, timeout=60)).stdout.decode().split()
            res["guest_sha256"] = float(out[1])
            res["guest_crc32"] = float(out[3])
            log("hash rates %s" % out)
            dev = C.DATA_PORT_DEVICE
            # QEMU's chardev serves one connection: drop the client's data socket first
            from guestlink.host import transfer as HT
            HT._link(c).reset()
            await asyncio.sleep(0.3)
            # raw host -> guest
            await C.put_file(c, "/tmp/rawr.py", RAW_READER)
            await C.put_file(c, "/tmp/raww.py", RAW_WRITER)
            proc = c.exec(["python3", "/tmp/rawr.py", dev, str(size)], timeout=120)
            await proc.start()
            s = socket.socket(socket.AF_UNIX)
            s.connect(vm.data_path)
            out_it = proc.output()
            first = await out_it.__anext__()  # "open": bytes written before that would be lost
            await asyncio.sleep(0.2)
            await asyncio.get_running_loop().run_in_executor(None, s.sendall, data)
            r = await proc.wait()
            n, secs = (first[1] + r.stdout).split()[1:3]  # wait() collected the rest
            res["raw_h2g"] = int(n) / float(secs) / 1e6
            s.close()
            # raw guest -> host
            s = socket.socket(socket.AF_UNIX)
            s.connect(vm.data_path)
            proc = c.exec(["python3", "/tmp/raww.py", dev, str(size)], timeout=120)
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

            res["raw_g2h"] = await asyncio.get_running_loop().run_in_executor(None, drain)
            await proc.wait()
            s.close()
    if qga_ok:
        try:
            res["qga_push"], res["qga_pull"] = qga_bench(vm, data[:8 << 20])
        except Exception as exc:  # report, do not fail the whole benchmark
            res["qga_error"] = str(exc)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--no-qga", action="store_true", help="skip the qemu-ga comparison")
    a = ap.parse_args()
    extra, qga_note = {}, None
    try:
        if a.no_qga:
            raise RuntimeError("skipped (--no-qga)")
        extra = qga_files()
    except Exception as exc:
        qga_note = "qemu-ga not available: %s" % exc
    kw = dict(extra_files=extra, extra_ports=[QGA_PORT], memory=1024) if extra else dict(memory=1024)
    if extra:
        kw["append"] = ""
    with C.booted_vm(**kw) as vm:
        if extra:
            # qemu-ga runs detached in the guest on its port
            async def start():
                c = await C.connect(vm, timeout=60)
                async with c:
                    await C.start_detached(c, ["/usr/sbin/qemu-ga", "-m", "virtio-serial", "-p",
                                               "/dev/virtio-ports/" + QGA_PORT, "-t", "/tmp"])
                    await asyncio.sleep(1.0)
            try:
                asyncio.run(asyncio.wait_for(start(), 60))
            except Exception as exc:
                qga_note = "qemu-ga did not start: %r" % exc
                extra = {}
        res = asyncio.run(measure(vm, a.mib, bool(extra)))
    if qga_note:
        res["qga_error"] = qga_note
    raw_min_h2g = min(res["raw_h2g"], res["guest_sha256"])
    raw_min_g2h = min(res["raw_g2h"], res["guest_sha256"])
    ratios = {
        "crc32 push / raw h2g (goal >= 0.9)": res["push_crc32"] / res["raw_h2g"],
        "crc32 pull / raw g2h (goal >= 0.9)": res["pull_crc32"] / res["raw_g2h"],
        "sha256 push / min(raw, sha256) (goal >= 0.9)": res["push_sha256"] / raw_min_h2g,
        "sha256 pull / min(raw, sha256) (goal >= 0.9)": res["pull_sha256"] / raw_min_g2h,
    }
    if "qga_push" in res:
        ratios["push / qemu-ga write (goal >= 30)"] = res["push_sha256"] / res["qga_push"]
        ratios["pull / qemu-ga read (goal >= 20)"] = res["pull_sha256"] / res["qga_pull"]
    if a.json:
        print(json.dumps({"results": res, "ratios": ratios}, indent=2))
        return 0
    print("%d MiB, TCG guest; MB/s = 10^6 bytes/s" % a.mib)
    for k in ("push_sha256", "pull_sha256", "push_crc32", "pull_crc32", "raw_h2g", "raw_g2h",
              "guest_sha256", "guest_crc32", "qga_push", "qga_pull"):
        if k in res:
            print("  %-14s %9.1f MB/s" % (k, res[k]))
    if "qga_error" in res:
        print("  qemu-ga: %s" % res["qga_error"])
    for k, v in ratios.items():
        goal = float(k.rsplit(">= ", 1)[1].rstrip(")"))
        print("  %-48s %7.2f  %s" % (k, v, "ok" if v >= goal else "MISS"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
