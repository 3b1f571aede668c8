#!/usr/bin/env python3
"""Ping latency and idle wakeups of the real guestlink agent in the QEMU test VM.

    .venv/bin/python benchmarks/bench_ping.py [--json] [--count 500] [--idle-seconds 10]
    PYTHONPATH=src python3 benchmarks/bench_ping.py

In one VM run (see benchmarks/README.md):

1. guestlink ping round trip: sequential ``await vm.ping()``, median and p90;
2. raw echo baseline over the same kind of port (the data port, which the agent keeps closed):
   a minimal python3 echo program in the guest, a blocking host socket, messages the size of a
   guestlink ping REQUEST frame; also the same echo driven from an asyncio host (information);
3. ratio guestlink / raw (medians), goal <= 1.3x; qemu-ga's ``guest-ping`` on its own port
   ``org.qemu.guest_agent.0`` (Debian's qemu-ga, after a ``guest-sync-delimited`` resync, from a
   blocking host socket) and the ratio guestlink / qemu-ga, goal < 1 (faster than qemu-ga);
4. the agent's context switches per second (voluntary + involuntary, all its threads) with no
   host connected (goal <= 1/s) and with a host connected but idle (information).

A benchmark, not a test: misses are reported and the exit status is 0 (1 only if it could not
run at all).
"""

import argparse
import asyncio
import datetime
import json
import sys
import time

import _common as C  # puts src/ and the repository root on sys.path
from guestlink.protocol import messages

RATIO_GOAL = 1.3
QGA_GOAL = 1.0  # guestlink's ping must be faster than qemu-ga's guest-ping
WAKEUPS_GOAL = 1.0

#: Guest sampler: ``wakeups.py PID SETTLE DURATION OUT``. Sleeps SETTLE s, then reads the
#: context-switch counters of PID (main thread, and the sum over /proc/PID/task/*) every second
#: for DURATION s and writes JSON to OUT (atomically). It never touches the agent itself.
SAMPLER_PROGRAM = r'''
import json, os, sys, time
pid, settle, duration, out = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]

def counters(path):
    vol = nonvol = 0
    with open(path) as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                vol = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                nonvol = int(line.split()[1])
    return vol, nonvol

def sample():
    t = time.monotonic()
    main = counters("/proc/%d/status" % pid)
    total = [0, 0]
    tasks = os.listdir("/proc/%d/task" % pid)
    for tid in tasks:
        try:
            v, n = counters("/proc/%d/task/%s/status" % (pid, tid))
        except OSError:
            continue
        total[0] += v
        total[1] += n
    return [t, main[0], main[1], total[0], total[1], len(tasks)]

result = {"pid": pid, "settle": settle, "duration": duration, "samples": []}
try:
    time.sleep(settle)
    start = time.monotonic()
    while True:
        result["samples"].append(sample())
        left = start + duration - time.monotonic()
        if left <= 0.001:
            break
        time.sleep(min(1.0, left))
except Exception as exc:
    result["error"] = "%s: %s" % (type(exc).__name__, exc)
with open(out + ".tmp", "w") as f:
    json.dump(result, f)
os.rename(out + ".tmp", out)
'''


def log(args, msg):
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def cpu_us(before, after, count, overhead=0):
    """{"guest_cpu_us": per round trip} from two guest CPU readings (ns), if available."""
    if before is None or after is None:
        return {"guest_cpu_us": None}
    return {"guest_cpu_us": max(0, after - before - overhead) / count / 1000}


def wakeup_rates(raw):
    """Per-second rates from a sampler result."""
    if raw.get("error") or len(raw.get("samples", ())) < 2:
        return {"error": raw.get("error") or "too few samples", "raw": raw}
    first, last = raw["samples"][0], raw["samples"][-1]
    dt = last[0] - first[0]
    per_sec = [(b[3] + b[4] - a[3] - a[4]) / (b[0] - a[0])
               for a, b in zip(raw["samples"], raw["samples"][1:])]
    return {
        "seconds": round(dt, 2),
        "per_second": (last[3] + last[4] - first[3] - first[4]) / dt,
        "voluntary_per_second": (last[3] - first[3]) / dt,
        "nonvoluntary_per_second": (last[4] - first[4]) / dt,
        "main_thread_per_second": (last[1] + last[2] - first[1] - first[2]) / dt,
        "threads": last[5],
        "per_interval": [round(x, 2) for x in per_sec],
    }


async def measure_wakeups(client, vm, args, connected):
    """Start the sampler through the agent; with connected=False disconnect meanwhile.

    Returns (rates, client) — the client is a new connection when it was closed.
    """
    pid = await C.agent_pid(client)
    out = "%s/wakeups-%s.json" % (C.GUEST_DIR, "connected" if connected else "idle")
    await client.run(["rm", "-f", out])
    settle = args.settle
    await C.start_guest_python(client, "wakeups", SAMPLER_PROGRAM,
                               [pid, settle, args.idle_seconds, out])
    t0 = time.monotonic()
    if not connected:
        await client.close()
    await asyncio.sleep(settle + args.idle_seconds + 0.3)
    if not connected:
        client = await C.connect(vm)
    while True:
        data = await C.read_guest_file(client, out)
        if data is not None:
            break
        if time.monotonic() - t0 > settle + args.idle_seconds + 15:
            raise RuntimeError("the wakeup sampler wrote no result to %s" % out)
        await asyncio.sleep(0.2)
    rates = wakeup_rates(json.loads(data))
    rates["agent_pid"] = pid
    new_pid = await C.agent_pid(client)
    if new_pid != pid:
        rates["error"] = "the agent restarted during the measurement (pid %d -> %d)" % (pid, new_pid)
    return rates, client


QGA_PING = b'{"execute":"guest-ping"}\n'


def qga_ping_times(q, count):
    """``count`` sequential qemu-ga ``guest-ping`` round trips on its port socket (ns each).

    The request is sent as one precomputed line and the reply (``{"return": {}}``) read up to its
    newline from the blocking socket: the host side does no more than the raw echo's.
    """
    sock = q.sock
    sock.settimeout(None)
    clock = time.perf_counter_ns
    times = []
    for _ in range(count):
        t0 = clock()
        sock.sendall(QGA_PING)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("qemu-ga closed its port")
            data += chunk
        times.append(clock() - t0)
        if b'"return"' not in data:
            raise RuntimeError("qemu-ga answered guest-ping with %r" % data[:200])
    return times


async def measure_qga(client, vm, args):
    """qemu-ga guest-ping in the same VM (it was started on its own port at boot)."""
    loop = asyncio.get_running_loop()
    r = await client.run(["pgrep", "-o", "qemu-ga"])
    if r.returncode != 0:
        raise RuntimeError("qemu-ga is not running in the guest")
    pid = int(r.stdout.split()[0])
    q = await loop.run_in_executor(None, C.QGA, str(vm.port_path(C.QGA_PORT)))
    try:
        # guest-sync-delimited: qemu-ga may hold a partial line from an earlier client
        await loop.run_in_executor(None, q.sync)
        await loop.run_in_executor(None, qga_ping_times, q, args.warmup)
        g0 = await C.guest_cpu_ns(client, pid)
        h0 = time.process_time_ns()
        times = await loop.run_in_executor(None, qga_ping_times, q, args.count)
        h1 = time.process_time_ns()
        g1 = await C.guest_cpu_ns(client, pid)
    finally:
        q.sock.close()
    res = C.summarize_ns(times)
    res.update(cpu_us(g0, g1, args.count), host_cpu_us=(h1 - h0) / args.count / 1000)
    return res


async def run(vm, args):
    result = {}
    client = await C.connect(vm)
    try:
        if args.qga_note is None:
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, lambda: C.wait_qga(vm, 60).sock.close())
            except Exception as exc:
                args.qga_note = "qemu-ga did not start: %s: %s" % (type(exc).__name__, exc)
        info = await client.info()
        result["machine"] = {"vm": C.vm_facts(vm, info), "host": C.host_facts()}
        frame = messages.encode_request(1, "ping")
        result["message_bytes"] = len(frame)
        result["count"], result["warmup"] = args.count, args.warmup

        # 1. guestlink ping
        log(args, "ping: %d warm-up + %d timed" % (args.warmup, args.count))
        for _ in range(args.warmup):
            await client.ping()
        clock = time.perf_counter_ns
        agent = await C.agent_pid(client)
        g0 = await C.guest_cpu_ns(client, agent)
        h0 = time.process_time_ns()
        times = []
        for _ in range(args.count):
            t0 = clock()
            await client.ping()
            times.append(clock() - t0)
        h1 = time.process_time_ns()
        g1 = await C.guest_cpu_ns(client, agent)
        g2 = await C.guest_cpu_ns(client, agent)  # g2 - g1: the cost of one reading, subtracted
        result["guestlink_ping"] = C.summarize_ns(times)
        result["guestlink_ping"].update(cpu_us(g0, g1, args.count, g2 - g1 if g2 else 0),
                                        host_cpu_us=(h1 - h0) / args.count / 1000)

        # 2. raw echo on the data port, same VM run
        log(args, "raw echo on %s" % C.DATA_PORT_DEVICE)
        raw = await C.start_raw_port(client, vm, "echo")
        try:
            raw.roundtrip_times(frame, args.warmup)
            e0 = await C.guest_cpu_ns(client, raw.guest_pid)
            h0 = time.process_time_ns()
            times = raw.roundtrip_times(frame, args.count)
            h1 = time.process_time_ns()
            e1 = await C.guest_cpu_ns(client, raw.guest_pid)
            result["raw_echo"] = C.summarize_ns(times)
            result["raw_echo"].update(cpu_us(e0, e1, args.count),
                                      host_cpu_us=(h1 - h0) / args.count / 1000)
            # The same echo from an asyncio host, to separate host-side asyncio cost.
            reader, writer = await asyncio.open_unix_connection(sock=raw.sock)
            times = []
            for i in range(args.warmup + args.count):
                if i == args.warmup:
                    e0 = await C.guest_cpu_ns(client, raw.guest_pid)
                    h0 = time.process_time_ns()
                t0 = clock()
                writer.write(frame)
                await writer.drain()
                await reader.readexactly(len(frame))
                if i >= args.warmup:
                    times.append(clock() - t0)
            h1 = time.process_time_ns()
            e1 = await C.guest_cpu_ns(client, raw.guest_pid)
            result["raw_echo_asyncio"] = C.summarize_ns(times)
            result["raw_echo_asyncio"].update(cpu_us(e0, e1, args.count),
                                              host_cpu_us=(h1 - h0) / args.count / 1000)
            writer.close()
        finally:
            raw.close()

        g, r = result["guestlink_ping"], result["raw_echo"]
        ratio = g["median_us"] / r["median_us"]
        result["ratio"] = {"median": ratio, "p90": g["p90_us"] / r["p90_us"], "goal": RATIO_GOAL,
                           "pass": ratio <= RATIO_GOAL}

        # 3. qemu-ga guest-ping, same VM run
        if args.qga_note is None:
            log(args, "qemu-ga guest-ping on %s" % C.QGA_PORT)
            try:
                result["qga_ping"] = await measure_qga(client, vm, args)
            except Exception as exc:
                args.qga_note = "qemu-ga guest-ping failed: %s: %s" % (type(exc).__name__, exc)
        if "qga_ping" in result:
            q = result["qga_ping"]
            ratio = g["median_us"] / q["median_us"]
            result["ratio_qga"] = {"median": ratio, "p90": g["p90_us"] / q["p90_us"],
                                   "goal": QGA_GOAL, "pass": ratio < QGA_GOAL}
        else:
            result["qga_error"] = args.qga_note

        # 4. idle wakeups: host connected but idle (information), then no host (goal)
        log(args, "agent wakeups, host connected and idle (%g s)" % args.idle_seconds)
        result["wakeups_connected_idle"], client = await measure_wakeups(client, vm, args, True)
        log(args, "agent wakeups, no host connected (%g s)" % args.idle_seconds)
        w, client = await measure_wakeups(client, vm, args, False)
        w["goal"] = WAKEUPS_GOAL
        w["pass"] = "per_second" in w and "error" not in w and w["per_second"] <= WAKEUPS_GOAL
        result["wakeups_no_host"] = w
    finally:
        await client.close()
    return result


def fmt_rate(w):
    if "per_second" not in w:
        return "error: %s" % w.get("error")
    s = "%.2f /s" % w["per_second"]
    return s + ("  [%s]" % w["error"] if "error" in w else "")


def print_table(res):
    vm, host = res["machine"]["vm"], res["machine"]["host"]
    print("guestlink ping benchmark  (%s)" % res["date"])
    print("machine: QEMU %s, %d vCPUs, %d MiB; guest kernel %s, python %s, agent %s"
          % (vm["accel"].upper(), vm["vcpus"], vm["memory_mb"], vm.get("guest_kernel"),
             vm.get("guest_python"), vm.get("agent_version")))
    print("host:    %s, %d CPUs, load %.2f (1 min, at start), python %s; VM booted in %s s"
          % (host["cpu"], host["cpus"], host["loadavg_1m"], host["python"], vm["boot_seconds"]))
    print("round trips: %d sequential after %d warm-up, %d-byte message (ping REQUEST frame)"
          % (res["count"], res["warmup"], res["message_bytes"]))
    print()
    rows = [("guestlink  await vm.ping()", res["guestlink_ping"]),
            ("raw echo   data port, blocking host", res["raw_echo"]),
            ("raw echo   data port, asyncio host (info)", res["raw_echo_asyncio"])]
    if "qga_ping" in res:
        rows.insert(1, ("qemu-ga    guest-ping, blocking host", res["qga_ping"]))
    print("%-42s %10s %10s %10s %11s %10s" % ("round trip", "median", "p90", "min",
                                             "guest CPU", "host CPU"))
    for name, s in rows:
        gc = s.get("guest_cpu_us")
        print("%-42s %7.0f µs %7.0f µs %7.0f µs %8s µs %7.0f µs"
              % (name, s["median_us"], s["p90_us"], s["min_us"],
                 "-" if gc is None else "%.0f" % gc, s["host_cpu_us"]))
    print("(guest CPU: the agent's / qemu-ga's / echo program's CPU time per round trip,"
          " /proc/PID/schedstat; host CPU: this process's)")
    print()
    ratio = res["ratio"]
    w, wc = res["wakeups_no_host"], res["wakeups_connected_idle"]
    print("%-44s %-22s %-10s %s" % ("metric", "value", "goal", "result"))
    print("%-44s %-22s %-10s %s" % ("ratio guestlink / raw (median)",
                                    "%.2fx  (p90 %.2fx)" % (ratio["median"], ratio["p90"]),
                                    "<= %.1fx" % ratio["goal"],
                                    "PASS" if ratio["pass"] else "MISS"))
    if "ratio_qga" in res:
        rq = res["ratio_qga"]
        print("%-44s %-22s %-10s %s" % ("ratio guestlink / qemu-ga guest-ping (median)",
                                        "%.2fx  (p90 %.2fx)" % (rq["median"], rq["p90"]),
                                        "< %.1fx" % rq["goal"], "PASS" if rq["pass"] else "MISS"))
    else:
        print("qemu-ga: %s" % res.get("qga_error"))
    print("%-44s %-22s %-10s %s" % ("agent wakeups, no host connected", fmt_rate(w),
                                    "<= %g /s" % w["goal"], "PASS" if w["pass"] else "MISS"))
    print("%-44s %-22s %-10s %s" % ("agent wakeups, host connected, idle", fmt_rate(wc), "-",
                                    "(info)"))
    for name, x in (("no host", w), ("host idle", wc)):
        if "per_interval" in x:
            print("  %-10s voluntary %.2f /s, involuntary %.2f /s, %d thread(s); per second: %s"
                  % (name, x["voluntary_per_second"], x["nonvoluntary_per_second"], x["threads"],
                     " ".join("%g" % v for v in x["per_interval"])))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the results as JSON only")
    p.add_argument("--count", type=int, default=500, help="timed round trips (default 500)")
    p.add_argument("--warmup", type=int, default=50, help="warm-up round trips (default 50)")
    p.add_argument("--idle-seconds", type=float, default=10.0,
                   help="length of each wakeup measurement (default 10)")
    p.add_argument("--settle", type=float, default=1.5,
                   help="pause before a wakeup measurement starts (default 1.5 s)")
    p.add_argument("--smp", type=int, default=2, help="vCPUs (default 2, as the test bed)")
    p.add_argument("--log-level", default="info",
                   help="the agent's log level (default info, its production default; the test "
                        "bed's debug logs every request to the serial console)")
    p.add_argument("--workdir", help="keep the VM's files here (default: a temporary directory)")
    p.add_argument("--no-qga", action="store_true", help="skip the qemu-ga guest-ping comparison")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    args = p.parse_args(argv)
    if args.json:
        args.quiet = True

    t0 = time.monotonic()
    args.qga_note = None
    if args.no_qga:
        args.qga_note = "skipped (--no-qga)"
    kw = dict(qga=args.qga_note is None)
    try:
        log(args, "booting the test VM")
        with C.booted_vm(args.workdir, smp=args.smp,
                         agent_args=["--log-level", args.log_level], **kw) as vm:
            res = asyncio.run(run(vm, args))
    except Exception as exc:
        print("bench_ping: could not run: %s: %s" % (type(exc).__name__, exc), file=sys.stderr)
        return 1
    res["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    res["agent_log_level"] = args.log_level
    res["elapsed_seconds"] = round(time.monotonic() - t0, 1)
    if args.json:
        print(C.dump_json(res))
    else:
        print_table(res)
        print("\n(%.0f s in all)" % res["elapsed_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
