#!/usr/bin/env python3
"""One host process holding hundreds of agent sessions (issue 14, "Scale").

    .venv/bin/python benchmarks/bench_scale.py [--json] [--vms 200] [--rounds 10] [--idle 5]

N real agent processes (``python -m guestlink.agent run --ctl-device unix:PATH``) stand in for N
VMs. The agent *connects* to a unix socket in that mode, as the guest side of a virtio port, so a
relay process plays QEMU's chardevs: for VM i it listens on ``agent-i.sock`` (the agent's side)
and ``host-i.sock`` (the side a host connects to, as QEMU's ``server=on`` chardev socket), and
copies bytes between them. The relay is a process of its own so that its CPU and memory are not
counted in the holder's.

Measured, each in the same run:

1. **library**: one asyncio process (``hold`` below) ``guestlink.connect``s to all N sockets
   concurrently and pings every session concurrently, ``--rounds`` times (latency p50/p99 over
   all pings); then it idles while this process reads its ``/proc/PID`` for ``--idle`` seconds:
   CPU (utime+stime), context switches (voluntary and involuntary, all threads) and RSS, per
   idle session; then it pings all again (the sessions survived the idle time).
2. **master**: the same client, but through one control master (``master=True``): the master
   holds the N sessions; the figures are the master's.

A benchmark, not a test (tests/vm/test_master_scale.py asserts correctness and generous bounds
only): misses are printed as MISS and the exit status is 0 (1 if it could not run at all).
The module also holds the harness the test uses (:class:`Fleet`, :func:`run_holder`).
"""

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

P99_GOAL_MS = 50.0
#: An idle session costs no wakeups: over the whole idle window the holder may wake a few
#: times for its own reasons (none per session).
IDLE_WAKEUPS_GOAL = 2
#: Seconds between the last ping and the idle window (see run_holder).
IDLE_SETTLE = 1.5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def child_env() -> Dict[str, str]:
    """The environment for the agents, the relay and the holder: guestlink from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- /proc readings ---------------------------------------------------------------------------

def proc_sample(pid: int) -> Dict[str, float]:
    """CPU seconds (utime+stime), context switches (all threads) and RSS (KiB) of ``pid``."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15)
    voluntary = involuntary = 0
    run_ns = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                run_ns += int(f.read().split()[0])  # time on the CPU, ns (finer than ticks)
            with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        voluntary += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        involuntary += int(line.split()[1])
        except OSError:
            continue
    return {"time": time.monotonic(), "cpu_s": cpu, "run_ns": run_ns, "voluntary": voluntary,
            "involuntary": involuntary, "rss_kb": rss_kb(pid)}


def rss_kb(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def idle_cost(pid: int, seconds: float, sessions: int) -> Dict[str, Any]:
    """What ``pid`` spends while idle for ``seconds``: CPU (its threads' schedstat run time,
    ns), wakeups (context switches), per session."""
    a = proc_sample(pid)
    time.sleep(seconds)
    b = proc_sample(pid)
    dt = b["time"] - a["time"]
    cpu = (b["run_ns"] - a["run_ns"]) / 1e9
    wakeups = (b["voluntary"] - a["voluntary"]) + (b["involuntary"] - a["involuntary"])
    return {"seconds": round(dt, 2), "cpu_ms": cpu * 1000,
            "cpu_us_per_session_per_s": cpu * 1e6 / sessions / dt,
            "wakeups": wakeups, "voluntary": b["voluntary"] - a["voluntary"],
            "involuntary": b["involuntary"] - a["involuntary"], "rss_kb": b["rss_kb"]}


def percentile(values: Sequence[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def latency_summary(times_s: Sequence[float]) -> Dict[str, float]:
    ms = [t * 1000 for t in times_s]
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99), "max_ms": max(ms)}


# --- the relay: QEMU's chardevs for N stand-in VMs ---------------------------------------------

class _Chardev:
    """One VM's port: the agent's connection and the host's, bytes copied between them.

    As with a virtio port, what the agent writes while no host is connected is dropped; what a
    host writes before the agent is connected waits for it (the agent opens the port later).
    A second host connection while one is open is closed at once (QEMU serves one).
    """

    def __init__(self, index: int, announce: IO[str]) -> None:
        self.index = index
        self.announce = announce
        self.agent: Optional[asyncio.Transport] = None
        self.host: Optional[asyncio.Transport] = None
        self.pending: List[bytes] = []


class _AgentSide(asyncio.Protocol):
    def __init__(self, dev: _Chardev) -> None:
        self.dev = dev
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.dev.agent is not None:
            self.dev.agent.close()
        self.dev.agent = transport
        for chunk in self.dev.pending:
            transport.write(chunk)
        self.dev.pending.clear()
        self.dev.announce.write("agent %d\n" % self.dev.index)
        self.dev.announce.flush()

    def data_received(self, data: bytes) -> None:
        if self.dev.host is not None:
            self.dev.host.write(data)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self.dev.agent is self.transport:
            self.dev.agent = None


class _HostSide(asyncio.Protocol):
    def __init__(self, dev: _Chardev) -> None:
        self.dev = dev
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self.dev.host is not None:
            transport.close()
            return
        self.transport = transport
        self.dev.host = transport

    def data_received(self, data: bytes) -> None:
        if self.dev.agent is not None:
            self.dev.agent.write(data)
        else:
            self.dev.pending.append(data)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self.transport is not None and self.dev.host is self.transport:
            self.dev.host = None
            self.dev.pending.clear()


async def _relay_main(directory: Path, count: int) -> None:
    loop = asyncio.get_running_loop()
    for i in range(count):
        dev = _Chardev(i, sys.stdout)
        await loop.create_unix_server(lambda d=dev: _AgentSide(d), str(directory / ("agent-%d.sock" % i)))
        await loop.create_unix_server(lambda d=dev: _HostSide(d), str(directory / ("host-%d.sock" % i)))
    sys.stdout.write("listening\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


# --- the fleet: relay + N real agents ----------------------------------------------------------

class Fleet:
    """N real guestlink agents, each on its own relay chardev; ``host_path(i)`` is VM i's
    control socket (what QEMU's ``-chardev socket,server=on`` would be)."""

    def __init__(self, count: int, directory: Path, log_level: str = "warning") -> None:
        self.count = count
        self.dir = Path(directory)
        self.log_level = log_level
        self.relay: Optional[subprocess.Popen[str]] = None
        self.agents: List[subprocess.Popen[bytes]] = []
        self._log: Optional[IO[bytes]] = None

    def host_path(self, i: int) -> str:
        return str(self.dir / ("host-%d.sock" % i))

    def start(self, timeout: float = 300.0) -> "Fleet":
        raise_fd_limit()
        env = child_env()
        self.relay = subprocess.Popen(
            [sys.executable, __file__, "relay", str(self.dir), str(self.count)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=env,
            start_new_session=True)
        assert self.relay.stdout is not None
        if self.relay.stdout.readline().strip() != "listening":
            raise RuntimeError("the relay did not start (status %s)" % self.relay.poll())
        conf = self.dir / "agent.conf"
        conf.write_text("")
        (self.dir / "handlers").mkdir(exist_ok=True)
        self._log = open(self.dir / "agents.log", "ab")
        for i in range(self.count):
            self.agents.append(subprocess.Popen(
                [sys.executable, "-m", "guestlink.agent", "run", "--config", str(conf),
                 "--ctl-device", "unix:" + str(self.dir / ("agent-%d.sock" % i)),
                 "--socket", str(self.dir / ("local-%d.sock" % i)),
                 "--handlers-dir", str(self.dir / "handlers"), "--log-level", self.log_level],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, env=env,
                start_new_session=True))
        seen: set = set()
        deadline = time.monotonic() + timeout
        fd = self.relay.stdout.fileno()
        pending = b""
        while len(seen) < self.count:
            # the relay prints "agent I" for each connection; read its pipe with a timeout so
            # that agents that died (or never connect) fail the start instead of hanging it
            dead = [i for i, p in enumerate(self.agents) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError("%d of %d agents connected; exited: %s; log tail:\n%s" % (
                    len(seen), self.count, dead[:10], self.log_tail()))
            if not select.select([fd], [], [], 1.0)[0]:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("the relay exited (status %s)" % self.relay.poll())
            *lines, pending = (pending + chunk).split(b"\n")
            seen.update(int(line.split()[1]) for line in lines if line.startswith(b"agent "))
        return self

    def log_tail(self, size: int = 3000) -> str:
        try:
            return (self.dir / "agents.log").read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def agents_rss_kb(self) -> int:
        total = 0
        for p in self.agents:
            with contextlib.suppress(OSError):
                total += rss_kb(p.pid)
        return total

    def stop(self) -> None:
        for p in self.agents:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 20
        for p in self.agents:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.relay is not None and self.relay.poll() is None:
            self.relay.terminate()
            try:
                self.relay.wait(10)
            except subprocess.TimeoutExpired:
                self.relay.kill()
                self.relay.wait()
        if self._log is not None:
            self._log.close()


@contextlib.contextmanager
def fleet(count: int, directory: Optional[str] = None) -> Iterator[Fleet]:
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="glscale-"))
        f = Fleet(count, Path(directory))
        stack.callback(f.stop)
        yield f.start()


# --- the holder: one asyncio process with N sessions --------------------------------------------

async def _hold_main(paths: List[str], rounds: int, master: Optional[bool]) -> None:
    """Connect to every path concurrently, ping all concurrently ``rounds`` times, then obey
    lines on stdin: ``ping`` (one more round), ``quit``. Reports JSON lines on stdout."""
    import guestlink

    def report(obj: Dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    import guestlink.host.client  # noqa: F401  (its memory is not the sessions')

    kwargs: Dict[str, Any] = {} if master is None else {"master": master}
    rss0 = rss_kb(os.getpid())
    t0 = time.monotonic()
    clients = await asyncio.gather(*[guestlink.connect(ctl=p, timeout=120, **kwargs)
                                     for p in paths])
    connect_s = time.monotonic() - t0
    sessions = sorted({str(c.agent.session) if c.agent else "" for c in clients})
    report({"event": "connected", "seconds": connect_s, "rss_before_kb": rss0,
            "rss_after_kb": rss_kb(os.getpid()), "distinct_sessions": len(sessions)})

    async def one_round() -> List[float]:
        return list(await asyncio.gather(*[c.ping(timeout=120) for c in clients]))

    times: List[float] = []
    for _ in range(rounds):
        times += await one_round()
    report({"event": "pinged", "times": times, "rss_kb": rss_kb(os.getpid())})

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    report({"event": "idle"})
    while True:
        line = (await reader.readline()).decode().strip()
        if line == "ping":
            times = await one_round()
            report({"event": "pinged", "times": times, "rss_kb": rss_kb(os.getpid())})
            report({"event": "idle"})
        else:
            break
    await asyncio.gather(*[c.close() for c in clients])
    report({"event": "closed"})


class Holder:
    """The ``hold`` subprocess, driven line by line."""

    def __init__(self, paths: Sequence[str], rounds: int, master: Optional[bool],
                 directory: Path, extra_env: Optional[Dict[str, str]] = None) -> None:
        listing = directory / "holder-paths.txt"
        listing.write_text("\n".join(paths) + "\n")
        argv = [sys.executable, __file__, "hold", str(listing), "--rounds", str(rounds)]
        if master is not None:
            argv += ["--master", "1" if master else "0"]
        env = dict(extra_env) if extra_env else child_env()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def expect(self, event: str) -> Dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the holder exited (status %s) before %r" % (self.proc.wait(), event))
        obj: Dict[str, Any] = json.loads(line)
        if obj.get("event") != event:
            raise RuntimeError("the holder said %r, expected %r" % (obj, event))
        return obj

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.say("quit")
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_holder(f: Fleet, rounds: int, idle_seconds: float, master: Optional[bool] = None,
               idle_pid: Optional[int] = None,
               extra_env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Hold all of ``f``'s sessions in one holder process (through a master when ``master``);
    ping them, let them idle, measure the idle cost of ``idle_pid`` (default the holder; or
    ``find_idle_pid()`` called once connected, e.g. the master's pid), ping them again."""
    paths = [f.host_path(i) for i in range(f.count)]
    h = Holder(paths, rounds, master, f.dir, extra_env)
    try:
        connected = h.expect("connected")
        pinged = h.expect("pinged")
        h.expect("idle")
        pid = idle_pid or h.proc.pid
        # Settle first: a session's handshake leaves one SYNC resend timer (1 s, then it ends)
        # and a finished request its cancelled deadline; the window measures the steady state.
        time.sleep(IDLE_SETTLE)
        idle = idle_cost(pid, idle_seconds, f.count)
        before = proc_sample(pid)
        h.say("ping")
        after = h.expect("pinged")
        busy = proc_sample(pid)
        h.expect("idle")
        h.say("quit")
        h.expect("closed")
    finally:
        h.close()
    return {"sessions": f.count, "connect_seconds": connected["seconds"],
            "distinct_sessions": connected["distinct_sessions"],
            "holder_rss_before_kb": connected["rss_before_kb"],
            "holder_rss_connected_kb": connected["rss_after_kb"],
            "latency": latency_summary(pinged["times"]), "pings": len(pinged["times"]),
            "pings_after_idle": len(after["times"]),
            "latency_after_idle": latency_summary(after["times"]),
            "idle_pid": pid, "idle": idle,
            "cpu_us_per_ping": (busy["run_ns"] - before["run_ns"]) / 1000 / len(after["times"])}


# --- the benchmark -----------------------------------------------------------------------------

def log(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def master_env(directory: Path) -> Dict[str, str]:
    """The environment of a private master: its socket in ``directory``, on for every client."""
    env = child_env()
    env["GUESTLINK_MASTER_SOCKET"] = str(directory / "master.sock")
    env["GUESTLINK_MASTER"] = "1"
    return env


def guestlink_cli(env: Dict[str, str], *args: str, timeout: float = 60) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "guestlink"] + list(args), env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


def master_status(env: Dict[str, str]) -> Dict[str, Any]:
    """``guestlink master status --json`` of the master ``env`` points at."""
    r = guestlink_cli(env, "master", "status", "--json")
    data: Dict[str, Any] = json.loads(r.stdout) if r.stdout.strip() else {}
    if r.returncode != 0 or not data.get("running"):
        raise RuntimeError("no master: %s" % (r.stderr.strip() or r.stdout.strip()))
    return data


def start_master(env: Dict[str, str], persist: str = "10m") -> int:
    """``guestlink master serve --detach``; returns the master's pid."""
    r = guestlink_cli(env, "master", "serve", "--detach", "--persist", persist)
    if r.returncode != 0:
        raise RuntimeError("guestlink master serve --detach failed (%d): %s"
                           % (r.returncode, r.stderr.strip()))
    return int(master_status(env)["pid"])


def stop_master(env: Dict[str, str]) -> None:
    guestlink_cli(env, "master", "stop")


def run_through_master(f: Fleet, rounds: int, idle_seconds: float) -> Dict[str, Any]:
    """:func:`run_holder` through a private master started for it; the idle figures and the
    RSS per session are the master's."""
    runtime = Path(tempfile.mkdtemp(prefix="glscale-master-"))
    env = master_env(runtime)
    try:
        pid = start_master(env)
        time.sleep(0.3)
        rss0 = rss_kb(pid)
        res = run_holder(f, rounds, idle_seconds, master=True, idle_pid=pid, extra_env=env)
        res["master_pid"] = pid
        res["master_rss_before_kb"] = rss0
        res["master_rss_per_session_kb"] = (res["idle"]["rss_kb"] - rss0) / f.count
        res["master_vms_after_close"] = len(master_status(env).get("vms") or [])
        return res
    finally:
        stop_master(env)
        shutil.rmtree(runtime, ignore_errors=True)


def run_benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    res: Dict[str, Any] = {"vms": args.vms, "rounds": args.rounds, "idle_seconds": args.idle}
    with fleet(args.vms, args.workdir) as f:
        res["agents_rss_mb"] = f.agents_rss_kb() / 1024
        log(args, "%d agents connected to the relay; library holder" % args.vms)
        res["library"] = run_holder(f, args.rounds, args.idle, master=False)
        if not args.no_master:
            log(args, "through a control master")
            try:
                res["master"] = run_through_master(f, args.rounds, args.idle)
            except Exception as exc:
                res["master_error"] = "%s: %s" % (type(exc).__name__, exc)
    return res


def print_table(res: Dict[str, Any]) -> None:
    print("guestlink scale benchmark  (%s)" % res["date"])
    print("host: %s; %d stand-in VMs (real agents, unix-socket ports via a relay process; "
          "agents' RSS %.0f MiB in all)" % (res["host"], res["vms"], res["agents_rss_mb"]))
    print("%d rounds of every session pinged concurrently; idle window %g s" % (
        res["rounds"], res["idle_seconds"]))
    print()
    head = "%-34s %9s %9s %9s %9s %10s %11s %9s %9s %9s"
    print(head % ("holder", "connect", "p50", "p99", "max", "RSS", "RSS/sess", "CPU/ping",
                  "idle CPU", "wakeups"))
    base = None
    for key, name in (("library", "library, one asyncio process"),
                      ("master", "control master (figures: master)")):
        r = res.get(key)
        if r is None:
            if key == "master":
                print("%-34s %s" % (name, res.get("master_error", "not run")))
            continue
        lat, idle = r["latency"], r["idle"]
        if key == "library":
            per = (r["holder_rss_connected_kb"] - r["holder_rss_before_kb"]) / r["sessions"]
            rss = r["holder_rss_connected_kb"]
            base = r
        else:
            rss = idle["rss_kb"]
            per = r.get("master_rss_per_session_kb") or float("nan")
        print("%-34s %7.2f s %6.1f ms %6.1f ms %6.1f ms %7.1f MiB %8.1f KiB %6.0f µs %6.2f µs %9d"
              % (name, r["connect_seconds"], lat["p50_ms"], lat["p99_ms"], lat["max_ms"],
                 rss / 1024, per, r["cpu_us_per_ping"], idle["cpu_us_per_session_per_s"],
                 idle["wakeups"]))
    print("(latency: each ping's round trip, all %d sessions at once; CPU/ping: the holder's CPU "
          "per ping in a round; idle CPU: per idle session per second; wakeups: context switches "
          "of the holder over the idle window; CPU from /proc/PID/task/*/schedstat)" % res["vms"])
    print()
    print("%-44s %-14s %-10s %s" % ("metric", "value", "goal", "result"))
    for key in ("library", "master"):
        r = res.get(key)
        if r is None:
            continue
        p99 = r["latency"]["p99_ms"]
        print("%-44s %-14s %-10s %s" % ("%s: p99 of %d concurrent pings" % (key, res["vms"]),
                                        "%.1f ms" % p99, "< %g ms" % P99_GOAL_MS,
                                        "PASS" if p99 < P99_GOAL_MS else "MISS"))
        w = r["idle"]["wakeups"]
        print("%-44s %-14s %-10s %s" % ("%s: wakeups of %d idle sessions, %g s" % (
            key, res["vms"], r["idle"]["seconds"]), "%d" % w, "<= %d" % IDLE_WAKEUPS_GOAL,
            "PASS" if w <= IDLE_WAKEUPS_GOAL else "MISS"))
    if base and "master" in res:
        print("%-44s %-14s" % ("ratio master / library p99",
                               "%.2fx" % (res["master"]["latency"]["p99_ms"]
                                          / base["latency"]["p99_ms"])))


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["relay"]:
        raise_fd_limit()
        asyncio.run(_relay_main(Path(argv[1]), int(argv[2])))
        return 0
    if argv[:1] == ["hold"]:
        raise_fd_limit()
        hp = argparse.ArgumentParser()
        hp.add_argument("paths")
        hp.add_argument("--rounds", type=int, default=10)
        hp.add_argument("--master", choices=("0", "1"))
        ha = hp.parse_args(argv[1:])
        paths = Path(ha.paths).read_text().split()
        asyncio.run(_hold_main(paths, ha.rounds, None if ha.master is None else ha.master == "1"))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the results as JSON only")
    p.add_argument("--vms", type=int, default=200, help="stand-in VMs (default 200)")
    p.add_argument("--rounds", type=int, default=10,
                   help="rounds of all sessions pinged concurrently (default 10)")
    p.add_argument("--idle", type=float, default=5.0, help="idle window in s (default 5)")
    p.add_argument("--no-master", action="store_true", help="the library holder only")
    p.add_argument("--workdir", help="keep the sockets and the agents' log here")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.json:
        args.quiet = True
    t0 = time.monotonic()
    try:
        res = run_benchmark(args)
    except Exception as exc:
        print("bench_scale: could not run: %s: %s" % (type(exc).__name__, exc), file=sys.stderr)
        return 1
    res["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    res["host"] = "%d CPUs, load %.2f" % (os.cpu_count() or 0, os.getloadavg()[0])
    res["elapsed_seconds"] = round(time.monotonic() - t0, 1)
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
    else:
        print_table(res)
        print("\n(%.0f s in all)" % res["elapsed_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
