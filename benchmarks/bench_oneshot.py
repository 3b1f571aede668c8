#!/usr/bin/env python3
"""Whole-command time of one-shot guestlink commands, with and without a control master, against
ssh with ControlMaster and virsh's qemu-agent-command, into the same guest in the same run
(issue 14).

    .venv/bin/python benchmarks/bench_oneshot.py [--json] [--runs 30] [--concurrent-runs 20]

One libvirt domain (TCG, 2 vCPUs) boots the test guest with the guestlink channels, qemu-ga's
channel (Debian's qemu-guest-agent, as bench_ping), and a user-mode virtio NIC with a port
forward from 127.0.0.1 to the guest's dropbear (benchmark overlay, _common.ssh_files). Each
row is a whole process, started and waited for from this process (wall time,
``time.perf_counter`` around ``subprocess.run``), the rows interleaved round by round:

- ``guestlink exec DOMAIN -- true`` and ``guestlink ping DOMAIN`` through a running master
  (started once, ``guestlink master serve --detach``), and without one (``GUESTLINK_MASTER=0``:
  libvirt lookup, connect, handshake in the command);
- ``ssh ... true`` reusing an ssh ControlMaster, and a fresh ``ssh ... true`` (information);
- ``virsh qemu-agent-command DOMAIN '{"execute":"guest-ping"}'``;
- the library on a held connection (``await vm.ping()``), for reference.

Then 8 concurrent clients, each running ``guestlink ping DOMAIN`` ``--concurrent-runs`` times
(with the master, without, and virsh's ping): p50/p99 of all their commands.

Goals: with a master, exec <= 1.2x ssh-with-ControlMaster and ping <= 2x virsh (medians).
A benchmark, not a test: misses are MISS, exit status 0 (1 only if it could not run).
"""

import argparse
import asyncio
import concurrent.futures
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C  # puts src/ and the repository root on sys.path
import guestlink
from guestlink.bundle import write_bundle

DOMAIN = "guestlink-bench-oneshot"
EXEC_GOAL = 1.2   # guestlink exec (master) / ssh with ControlMaster
PING_GOAL = 2.0   # guestlink ping DOMAIN (master) / virsh qemu-agent-command guest-ping
CONCURRENT = 8
VIRSH_PING = '{"execute":"guest-ping"}'


def log(args, msg):
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def guestlink_argv():
    """The installed console script next to this interpreter (what a user runs), else -m."""
    script = Path(sys.executable).parent / "guestlink"
    return [str(script)] if script.exists() else [sys.executable, "-m", "guestlink"]


def base_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTLINK_")}
    env["PYTHONPATH"] = os.pathsep.join([str(C.REPO / "src")] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["LIBVIRT_DEFAULT_URI"] = C.LIBVIRT_URI
    return env


def timed(argv, env=None, expect=None):
    """Run ``argv`` to completion; its wall time in seconds. Raises if it fails (or its
    stdout lacks ``expect``)."""
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=120)
    dt = time.perf_counter() - t0
    if r.returncode != 0 or (expect is not None and expect not in r.stdout):
        raise RuntimeError("%s failed (%d): %s %s" % (" ".join(argv[:4]), r.returncode,
                                                     r.stdout[-300:], r.stderr[-500:]))
    return dt


def retry(fn, seconds, what):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except Exception as exc:
            if time.monotonic() > deadline:
                raise RuntimeError("%s: still failing after %g s: %s" % (what, seconds, exc))
            time.sleep(0.5)


def summary(times_s):
    ms = [t * 1000 for t in times_s]
    return {"n": len(ms), "median_ms": statistics.median(ms), "p90_ms": C.percentile(ms, 90),
            "p99_ms": C.percentile(ms, 99), "min_ms": min(ms), "max_ms": max(ms)}


async def held_ping_times(count):
    times = []
    async with guestlink.connect(domain=DOMAIN, uri=C.LIBVIRT_URI, master=False,
                                 timeout=30) as vm:
        for _ in range(20):
            await vm.ping()
        for _ in range(count):
            t0 = time.perf_counter()
            await vm.ping()
            times.append(time.perf_counter() - t0)
    return times


async def prepare_guest(args):
    """qemu-ga and dropbear started in the guest through the agent (directly, no master)."""
    async with guestlink.connect(domain=DOMAIN, uri=C.LIBVIRT_URI, master=False,
                                 timeout=30) as vm:
        info = await vm.info()
        await C.start_qga(vm)
        dev = await C.start_ssh(vm)
        return info, dev


def run(args, workdir):
    res = {"runs": args.runs, "concurrent_clients": CONCURRENT,
           "concurrent_runs": args.concurrent_runs}
    gl = guestlink_argv()
    direct_env = dict(base_env(), GUESTLINK_MASTER="0")
    master_env = dict(base_env(), GUESTLINK_MASTER="1",
                      GUESTLINK_MASTER_SOCKET=str(workdir / "master" / "master.sock"))
    (workdir / "master").mkdir(mode=0o700)

    log(args, "waiting for the agent")
    retry(lambda: timed(gl + ["ping", DOMAIN], direct_env), 120, "guestlink ping (agent up)")
    info, dev = asyncio.run(prepare_guest(args))
    res["guest"] = {"kernel": info["kernel"]["release"], "python": info["python"],
                    "agent": info["agent_version"], "nic": dev}

    port = C.free_tcp_port()
    C.domain_hostfwd(DOMAIN, port)
    key = args.key
    cm_path = str(workdir / "ssh-cm.sock")
    ssh_cm = C.ssh_argv(key, port, cm_path) + ["true"]
    ssh_fresh = C.ssh_argv(key, port) + ["true"]
    log(args, "ssh into the guest (dropbear on %s, 127.0.0.1:%d)" % (dev, port))
    retry(lambda: timed(ssh_fresh), 90, "ssh into the guest")
    timed(ssh_cm)  # starts the ControlMaster (ControlPersist keeps it)
    virsh_ping = ["virsh", "-c", C.LIBVIRT_URI, "qemu-agent-command", DOMAIN, VIRSH_PING]
    retry(lambda: timed(virsh_ping, expect=b'"return"'), 60, "virsh qemu-agent-command")

    log(args, "starting a guestlink master")
    r = subprocess.run(gl + ["master", "serve", "--detach", "--persist", "10m"], env=master_env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError("guestlink master serve --detach failed: %s" % r.stderr)
    try:
        rows = {
            "gl_exec_master": (gl + ["exec", DOMAIN, "--", "true"], master_env, None),
            "gl_exec_direct": (gl + ["exec", DOMAIN, "--", "true"], direct_env, None),
            "gl_ping_master": (gl + ["ping", DOMAIN], master_env, b"pong"),
            "gl_ping_direct": (gl + ["ping", DOMAIN], direct_env, b"pong"),
            "ssh_cm_true": (ssh_cm, None, None),
            "ssh_fresh_true": (ssh_fresh, None, None),
            "virsh_guest_ping": (virsh_ping, None, b'"return"'),
        }
        for argv, env, expect in rows.values():  # warm-up: page cache, the master's session
            for _ in range(2):
                timed(argv, env, expect)
        status = json.loads(subprocess.run(gl + ["master", "status", "--json"], env=master_env,
                                           capture_output=True, text=True).stdout or "{}")
        res["master_status"] = {"pid": status.get("pid"), "vms": len(status.get("vms") or [])}
        times = {k: [] for k in rows}
        log(args, "%d interleaved rounds of %d commands" % (args.runs, len(rows)))
        for _ in range(args.runs):
            for name, (argv, env, expect) in rows.items():
                times[name].append(timed(argv, env, expect))
        res["rows"] = {k: summary(v) for k, v in times.items()}
        res["rows"]["library_held_ping"] = summary(asyncio.run(held_ping_times(200)))

        log(args, "%d concurrent clients" % CONCURRENT)
        conc = {"gl_ping_master": rows["gl_ping_master"],
                "gl_ping_direct": rows["gl_ping_direct"],
                "virsh_guest_ping": rows["virsh_guest_ping"]}
        res["concurrent"] = {}
        for name, (argv, env, expect) in conc.items():
            def client(_i, argv=argv, env=env, expect=expect):
                return [timed(argv, env, expect) for _ in range(args.concurrent_runs)]
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as pool:
                per = list(pool.map(client, range(CONCURRENT)))
            wall = time.perf_counter() - t0
            s = summary([t for p in per for t in p])
            s["wall_s"] = wall
            res["concurrent"][name] = s
    finally:
        subprocess.run(gl + ["master", "stop"], env=master_env, stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=60)
        subprocess.run(["ssh", "-o", "ControlPath=%s" % cm_path, "-O", "exit", "x"],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30)

    rw = res["rows"]
    res["ratio_exec_master_ssh_cm"] = rw["gl_exec_master"]["median_ms"] / rw["ssh_cm_true"]["median_ms"]
    res["ratio_ping_master_virsh"] = (rw["gl_ping_master"]["median_ms"]
                                      / rw["virsh_guest_ping"]["median_ms"])
    return res


LABELS = {
    "gl_exec_master": "guestlink exec DOM -- true, master",
    "gl_exec_direct": "guestlink exec DOM -- true, no master",
    "ssh_cm_true": "ssh true, ControlMaster reused",
    "ssh_fresh_true": "ssh true, fresh connection (info)",
    "gl_ping_master": "guestlink ping DOM, master",
    "gl_ping_direct": "guestlink ping DOM, no master",
    "virsh_guest_ping": "virsh qemu-agent-command guest-ping",
    "library_held_ping": "library await vm.ping(), held (info)",
}


def print_table(res):
    print("guestlink one-shot command benchmark  (%s)" % res["date"])
    g = res["guest"]
    print("guest: libvirt domain, QEMU TCG, 2 vCPUs, 512 MiB; kernel %s, python %s, agent %s; "
          "ssh: dropbear over user-mode virtio-net (%s)" % (g["kernel"], g["python"], g["agent"],
                                                            g["nic"]))
    print("host: %s, %d CPUs, load %.2f at start, python %s" % (
        res["host"]["cpu"], res["host"]["cpus"], res["host"]["loadavg_1m"], res["host"]["python"]))
    print("whole process, wall time; %d interleaved runs per row after 2 warm-ups" % res["runs"])
    print()
    rw = res["rows"]
    ssh, virsh = rw["ssh_cm_true"]["median_ms"], rw["virsh_guest_ping"]["median_ms"]
    print("%-42s %9s %9s %9s  %9s %9s" % ("command", "median", "p90", "min", "/ssh CM", "/virsh"))
    for key in ("gl_exec_master", "gl_exec_direct", "ssh_cm_true", "ssh_fresh_true",
                "gl_ping_master", "gl_ping_direct", "virsh_guest_ping", "library_held_ping"):
        s = rw[key]
        print("%-42s %6.1f ms %6.1f ms %6.1f ms  %8.2fx %8.2fx" % (
            LABELS[key], s["median_ms"], s["p90_ms"], s["min_ms"], s["median_ms"] / ssh,
            s["median_ms"] / virsh))
    print()
    print("%d concurrent clients, %d commands each:" % (res["concurrent_clients"],
                                                         res["concurrent_runs"]))
    print("%-42s %9s %9s %9s %9s" % ("command", "p50", "p99", "max", "wall"))
    for key, s in res["concurrent"].items():
        print("%-42s %6.1f ms %6.1f ms %6.1f ms %7.2f s" % (LABELS[key], s["median_ms"],
                                                         s["p99_ms"], s["max_ms"], s["wall_s"]))
    print()
    print("%-46s %-10s %-8s %s" % ("goal", "value", "goal", "result"))
    e, p = res["ratio_exec_master_ssh_cm"], res["ratio_ping_master_virsh"]
    print("%-46s %-10s %-8s %s" % ("exec -- true with master / ssh ControlMaster", "%.2fx" % e,
                                   "<= %.1fx" % EXEC_GOAL, "PASS" if e <= EXEC_GOAL else "MISS"))
    print("%-46s %-10s %-8s %s" % ("ping DOMAIN with master / virsh guest-ping", "%.2fx" % p,
                                   "<= %.1fx" % PING_GOAL, "PASS" if p <= PING_GOAL else "MISS"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the results as JSON only")
    p.add_argument("--runs", type=int, default=30, help="runs per row (default 30, >= 20)")
    p.add_argument("--concurrent-runs", type=int, default=20,
                   help="commands per concurrent client (default 20)")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.json:
        args.quiet = True
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="glbench-oneshot-"))
    try:
        log(args, "building the guest overlay: agent, qemu-ga, dropbear, virtio_net")
        pyz = workdir / "guestlink-agent.pyz"
        write_bundle(str(pyz))
        args.key, pub = C.make_ssh_key(workdir)
        extra = dict(C.qga_files())
        extra.update(C.ssh_files(pub))
        C.ensure_base()
        with C.libvirtd_running(workdir):
            log(args, "booting the libvirt domain %s" % DOMAIN)
            with C.bench_domain(DOMAIN, pyz, extra_files=extra, ports=[C.QGA_PORT], network=True,
                                agent_args=["--log-level", "info"]):
                res = run(args, workdir)
    except Exception as exc:
        print("bench_oneshot: could not run: %s: %s" % (type(exc).__name__, exc), file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    res["host"] = C.host_facts()
    res["elapsed_seconds"] = round(time.monotonic() - t0, 1)
    if args.json:
        print(C.dump_json(res))
    else:
        print_table(res)
        print("\n(%.0f s in all)" % res["elapsed_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
