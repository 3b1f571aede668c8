"""Shared pieces for the benchmarks: boot a TestVM with the real agent, put files in the guest,
start detached guest programs, talk raw bytes over a virtio-serial port, small statistics.

Import it from a script in this directory (``from _common import ...``); importing it puts the
repository root (for ``testvm``) and ``src/`` (for ``guestlink``) on ``sys.path``.
"""

import asyncio
import contextlib
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import random
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "src", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import guestlink  # noqa: E402
from guestlink.bundle import write_bundle  # noqa: E402
from testvm import TestVM, ensure_base  # noqa: E402

AGENT_PATTERN = "guestlink-agent.pyz run"
DATA_PORT_DEVICE = "/dev/virtio-ports/org.guestlink.data"
GUEST_DIR = "/tmp/bench"


# --- the VM -----------------------------------------------------------------------------------

@contextlib.contextmanager
def booted_vm(workdir=None, **testvm_kwargs):
    """Build the agent bundle from src/, boot one TestVM running it, yield the started VM.

    ``workdir``: where the VM keeps its files (default: a temporary directory, removed after).
    Extra keyword arguments go to :class:`testvm.TestVM` (e.g. ``smp=``, ``memory=``).
    """
    ensure_base()  # build (or reuse) the base image before the boot clock starts
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="glbench-"))
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        pyz = workdir / "guestlink-agent.pyz"
        write_bundle(str(pyz))
        vm = TestVM(workdir / "vm", agent_pyz=pyz, **testvm_kwargs)
        vm.start()
        stack.callback(vm.stop)
        yield vm


async def connect(vm, timeout=30.0, **kwargs):
    """``guestlink.connect`` to the VM's agent, retrying while the agent is still starting."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await guestlink.connect(ctl=vm.ctl_path, data=vm.data_path,
                                           timeout=min(5.0, timeout), **kwargs)
        except guestlink.errors.GuestlinkError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


# --- guest programs ---------------------------------------------------------------------------

async def put_file(client, guest_path, data, mode=0o755):
    """Write ``data`` (bytes or str) to ``guest_path`` through the agent (exec + stdin)."""
    if isinstance(data, str):
        data = data.encode()
    await client.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod %o "$1"'
                      % mode, "sh", guest_path], input=data, check=True)


async def start_detached(client, argv, log="/dev/null"):
    """Start ``argv`` in the guest through the agent, detached from the agent's exec.

    It runs under busybox ``setsid`` (own session and process group, so the agent's killing of
    the exec's process group at the end of the host session does not reach it), with stdin
    /dev/null and stdout/stderr appended to ``log``. Returns its pid.
    """
    cmd = "setsid %s </dev/null >>%s 2>&1 & echo $!" % (
        " ".join(shlex.quote(a) for a in argv), shlex.quote(log))
    result = await client.run(["sh", "-c", cmd], check=True)
    return int(result.stdout.split()[-1])


async def start_guest_python(client, name, source, args=(), log=None):
    """Put ``source`` at /tmp/bench/NAME.py and start ``python3 -S -u`` on it, detached.

    Returns ``(pid, log_path)``.
    """
    path = "%s/%s.py" % (GUEST_DIR, name)
    log = log or "%s/%s.log" % (GUEST_DIR, name)
    await put_file(client, path, source, mode=0o644)
    pid = await start_detached(client, ["python3", "-S", "-u", path] + [str(a) for a in args],
                               log=log)
    return pid, log


async def read_guest_file(client, path):
    """The contents of a guest file (bytes), or None if it does not exist."""
    r = await client.run(["cat", path])
    return r.stdout if r.returncode == 0 else None


async def guest_cpu_ns(client, pid):
    """CPU time (ns) the guest task ``pid`` has run so far: the first field of
    /proc/PID/schedstat (the main thread only). None if unavailable."""
    r = await client.run(["cat", "/proc/%d/schedstat" % pid])
    try:
        return int(r.stdout.split()[0]) if r.returncode == 0 else None
    except (IndexError, ValueError):
        return None


async def agent_pid(client):
    """Pid of the running agent (``pgrep -o -f 'guestlink-agent.pyz run'`` in the guest)."""
    r = await client.run(["pgrep", "-o", "-f", AGENT_PATTERN], check=True)
    return int(r.stdout.split()[0])


# --- raw port program -------------------------------------------------------------------------

#: Guest program for raw virtio-serial baselines: ``python3 -S -u raw_port.py DEVICE MODE [N]``.
#: It opens DEVICE, writes ``READY\n`` (the write blocks until a host is connected), then:
#:   echo          read into one reused buffer, write back what was read (until the host leaves);
#:   sink N        read and discard N bytes, then write ``DONE N\n``;
#:   source N      write N bytes (zeros, 64 KiB writes), then wait for the host to leave.
#: A read() of 0 means no host is connected: before any data this is waited out (the host may
#: connect late); after data, it means the host left and the program exits.
RAW_PORT_PROGRAM = r'''
import os, sys, time
dev, mode = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 0
fd = os.open(dev, os.O_RDWR)
os.write(fd, b"READY\n")
buf = bytearray(65536)
mv = memoryview(buf)
read, write = os.readv, os.write
seen = False
deadline = time.monotonic() + 60
def wait_host():
    if seen or time.monotonic() > deadline:
        sys.exit(0)
    time.sleep(0.01)
if mode == "echo":
    bufs = [buf]
    while True:
        k = read(fd, bufs)
        if k == 0:
            wait_host()
            continue
        seen = True
        view = mv[:k]
        while view:
            view = view[write(fd, view):]
elif mode == "sink":
    bufs = [buf]
    left = n
    while left > 0:
        k = read(fd, bufs)
        if k == 0:
            wait_host()
            continue
        seen = True
        left -= k
    os.write(fd, b"DONE %d\n" % n)
    while read(fd, bufs) != 0:
        pass
elif mode == "source":
    left = n
    while left > 0:
        left -= write(fd, mv[:min(left, len(buf))])
    while os.read(fd, 65536) != b"":
        pass
else:
    sys.exit("unknown mode " + mode)
'''


class RawPort:
    """A blocking host-side connection to one of the VM's port sockets (no guestlink protocol)."""

    def __init__(self, path, timeout=30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buf = b""
        self.guest_pid = None  # set by start_raw_port

    def read_line(self, timeout=30.0):
        """Read up to and including the next ``\\n`` (bytes before it only)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no line from the guest on the raw port within %g s" % timeout)
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the raw port socket was closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def roundtrip_times(self, message, count):
        """Send ``message`` and read the same number of bytes back, ``count`` times.

        Returns the round-trip times in nanoseconds (time.perf_counter_ns).
        """
        if self._buf:
            raise RuntimeError("unexpected bytes pending on the raw port: %r" % self._buf[:64])
        sock = self.sock
        sock.settimeout(None)
        n = len(message)
        rbuf = bytearray(max(n, 65536))
        view = memoryview(rbuf)
        clock = time.perf_counter_ns
        times = []
        for _ in range(count):
            t0 = clock()
            sock.sendall(message)
            got = 0
            while got < n:
                k = sock.recv_into(view[got:], n - got)
                if not k:
                    raise ConnectionError("the raw port socket was closed")
                got += k
            times.append(clock() - t0)
            if rbuf[:n] != message:
                raise RuntimeError("echo returned different bytes")
        return times

    def close(self):
        self.sock.close()


async def start_raw_port(client, vm, mode="echo", n=None, port_path=None,
                         device=DATA_PORT_DEVICE, timeout=30.0):
    """Connect to the VM's data port socket, start RAW_PORT_PROGRAM on it in the guest, wait for
    its READY line; returns the :class:`RawPort`.

    The host connects *before* the guest program opens the device, and the host sends nothing
    until READY arrives (bytes written before the guest opened the port would be lost).
    """
    raw = RawPort(port_path or vm.data_path)
    try:
        args = [device, mode] + ([str(n)] if n is not None else [])
        raw.guest_pid, _ = await start_guest_python(client, "raw_port", RAW_PORT_PROGRAM, args)
        line = await asyncio.get_running_loop().run_in_executor(None, raw.read_line, timeout)
        if line != b"READY":
            raise RuntimeError("raw port program said %r instead of READY" % line)
    except BaseException:
        raw.close()
        raise
    return raw


# --- qemu-ga (Debian's qemu-guest-agent, in the test bed's base image) --------------------
# booted_vm(qga=True) adds its port org.qemu.guest_agent.0 (vm.qga_path); the guest's init runs
# qemu-ga on it.

QGA_PORT = "org.qemu.guest_agent.0"


class QGA:
    """A blocking client of qemu-ga on its port socket (JSON lines; 0xFF marks a resync)."""

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
                raise ConnectionError("qemu-ga closed")
            obj = json.loads(line.lstrip(b"\xff"))
            if "error" in obj:
                raise RuntimeError(obj["error"])
            if "return" in obj:
                return obj["return"]

    def sync(self):
        n = random.randint(1, 1 << 30)
        self.sock.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited",
                                                "arguments": {"id": n}}).encode() + b"\n")
        while True:
            line = self.f.readline()
            if not line:
                raise ConnectionError("qemu-ga closed")
            # qemu-ga answers the 0xFF with a parse error, then 0xFF + the sync reply
            if line.startswith(b"\xff") and json.loads(line[1:]).get("return") == n:
                return


def wait_qga(vm, timeout=30.0):
    """Wait until qemu-ga answers a sync on ``vm.qga_path``; return a synced :class:`QGA`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            q = QGA(vm.qga_path)
            q.sock.settimeout(2.0)
            q.sync()
            q.sock.settimeout(None)
            return q
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# --- facts and statistics ---------------------------------------------------------------------

def percentile(values, p):
    """The p-th percentile (0..100) with linear interpolation."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize_ns(times_ns):
    """{n, median_us, p90_us, min_us, max_us, mean_us} of a list of nanosecond durations."""
    us = [t / 1000.0 for t in times_ns]
    return {"n": len(us), "median_us": statistics.median(us), "p90_us": percentile(us, 90),
            "min_us": min(us), "max_us": max(us), "mean_us": statistics.fmean(us)}


def host_facts():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cpus": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0], "python": platform.python_version(),
            "kernel": platform.release()}


def vm_facts(vm, info=None):
    """Machine facts of the test VM (+ the agent's info reply, if given)."""
    facts = {"accel": "tcg", "vcpus": vm.smp, "memory_mb": vm.memory,
             "boot_seconds": round(vm.boot_seconds, 2) if vm.boot_seconds else None}
    if info:
        facts.update({"guest_kernel": info["kernel"]["release"], "guest_python": info["python"],
                      "agent_version": info["agent_version"]})
    return facts


def dump_json(obj):
    return json.dumps(obj, indent=2, sort_keys=True)
