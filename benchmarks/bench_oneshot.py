#!/usr/bin/env python3
"""Whole-command time of one-shot guestlink commands, with and without a control master, against
ssh with ControlMaster and virsh's qemu-agent-command, into the same guest in the same run
(issue 14).

    .venv/bin/python benchmarks/bench_oneshot.py [--json] [--runs 30] [--concurrent-runs 20]

One libvirt domain (TCG, 2 vCPUs) boots the test guest with the guestlink channels, qemu-ga's
channel (Debian's qemu-guest-agent is in the test guest's base image; the guest's init starts it
on that port), and a user-mode virtio NIC with a port forward from 127.0.0.1 to the guest's
dropbear (benchmark overlay, _common.ssh_files). Each row is a whole process, started and
waited for from this process (wall time, ``time.perf_counter`` around ``subprocess.run``), the
rows interleaved round by round:

- ``guestlink exec DOMAIN -- true`` and ``guestlink ping DOMAIN`` through a running master
  (started once, ``guestlink master serve --detach``), and without one (``GUESTLINK_MASTER=0``:
  libvirt lookup, connect, handshake in the command);
- ``ssh ... true`` reusing an ssh ControlMaster, and a fresh ``ssh ... true`` (information);
- ``virsh qemu-agent-command DOMAIN '{"execute":"guest-ping"}'``;
- the library on a held connection (``await vm.ping()``), for reference.

In two phases, because a running master holds the VM (and its lock: direct clients would queue
behind it): first without a master (direct rows, ssh, virsh), then with one (master rows, ssh,
virsh); each master ratio uses the ssh/virsh figures of its own phase.

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
    """dropbear started in the guest through the agent (directly, no master); qemu-ga is started
    by the guest's init (its channel is in the domain), waited for with virsh below."""
    async with guestlink.connect(domain=DOMAIN, uri=C.LIBVIRT_URI, master=False,
                                 timeout=30) as vm:
        info = await vm.info()
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

    common = {
        "ssh_cm_true": (ssh_cm, None, None),
        "ssh_fresh_true": (ssh_fresh, None, None),
        "virsh_guest_ping": (virsh_ping, None, b'"return"'),
    }
    direct = {
        "gl_exec_direct": (gl + ["exec", DOMAIN, "--", "true"], direct_env, None),
        "gl_ping_direct": (gl + ["ping", DOMAIN], direct_env, b"pong"),
    }
    through_master = {
        "gl_exec_master": (gl + ["exec", DOMAIN, "--", "true"], master_env, None),
        "gl_ping_master": (gl + ["ping", DOMAIN], master_env, b"pong"),
    }
    # Two phases: a running master holds the VM (and its lock), so direct clients would queue
    # behind it; ssh and virsh are measured in both, interleaved with the guestlink rows.
    res["phases"] = {}
    log(args, "phase 1, no master: %d interleaved rounds" % args.runs)
    res["phases"]["no_master"] = measure_phase(args, dict(direct, **common))
    res["rows_held"] = summary(asyncio.run(held_ping_times(200)))
    res["phases"]["no_master"]["concurrent"] = measure_concurrent(args, {
        "gl_ping_direct": direct["gl_ping_direct"], "virsh_guest_ping": common["virsh_guest_ping"]})

    log(args, "phase 2, a guestlink master running: %d interleaved rounds" % args.runs)
    r = subprocess.run(gl + ["master", "serve", "--detach", "--persist", "10m"], env=master_env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError("guestlink master serve --detach failed: %s" % r.stderr)
    try:
        res["phases"]["master"] = measure_phase(args, dict(through_master, **common))
        status = json.loads(subprocess.run(gl + ["master", "status", "--json"], env=master_env,
                                           capture_output=True, text=True).stdout or "{}")
        res["master_status"] = {"pid": status.get("pid"), "vms": len(status.get("vms") or [])}
        res["phases"]["master"]["concurrent"] = measure_concurrent(args, {
            "gl_ping_master": through_master["gl_ping_master"],
            "virsh_guest_ping": common["virsh_guest_ping"]})
    finally:
        subprocess.run(gl + ["master", "stop"], env=master_env, stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=60)
        subprocess.run(["ssh", "-o", "ControlPath=%s" % cm_path, "-O", "exit", "x"],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30)

    pm = res["phases"]["master"]["rows"]
    res["ratio_exec_master_ssh_cm"] = pm["gl_exec_master"]["median_ms"] / pm["ssh_cm_true"]["median_ms"]
    res["ratio_ping_master_virsh"] = (pm["gl_ping_master"]["median_ms"]
                                      / pm["virsh_guest_ping"]["median_ms"])
    return res


def measure_phase(args, rows):
    """Two warm-ups of each row, then ``args.runs`` rounds, each running every row once."""
    for argv, env, expect in rows.values():  # page cache; the master's session to the VM
        for _ in range(2):
            timed(argv, env, expect)
    times = {k: [] for k in rows}
    for _ in range(args.runs):
        for name, (argv, env, expect) in rows.items():
            times[name].append(timed(argv, env, expect))
    return {"rows": {k: summary(v) for k, v in times.items()}}


def measure_concurrent(args, rows):
    """CONCURRENT clients at once, each running the row's command ``args.concurrent_runs``
    times: p50/p99 over all their commands, and the wall time."""
    log(args, "%d concurrent clients: %s" % (CONCURRENT, ", ".join(rows)))
    out = {}
    for name, (argv, env, expect) in rows.items():
        def client(_i, argv=argv, env=env, expect=expect):
            return [timed(argv, env, expect) for _ in range(args.concurrent_runs)]
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as pool:
            per = list(pool.map(client, range(CONCURRENT)))
        wall = time.perf_counter() - t0
        s = summary([t for p in per for t in p])
        s["wall_s"] = wall
        out[name] = s
    return out


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
    print("whole process, wall time; %d interleaved rounds per phase after 2 warm-ups; ratios "
          "against the same phase's ssh/virsh" % res["runs"])
    ms = res.get("master_status") or {}
    print("phase 2's master: pid %s holding %s VM session(s) (guestlink master status)" % (
        ms.get("pid"), ms.get("vms")))
    print()
    print("%-44s %9s %9s %9s  %8s %8s" % ("command", "median", "p90", "min", "/ssh CM", "/virsh"))
    order = ("gl_exec_master", "gl_exec_direct", "ssh_cm_true", "ssh_fresh_true",
             "gl_ping_master", "gl_ping_direct", "virsh_guest_ping")
    for phase, title in (("master", "-- phase 2: a guestlink master running"),
                         ("no_master", "-- phase 1: no master (GUESTLINK_MASTER=0)")):
        rw = res["phases"][phase]["rows"]
        ssh, virsh = rw["ssh_cm_true"]["median_ms"], rw["virsh_guest_ping"]["median_ms"]
        print(title)
        for key in order:
            if key in rw:
                s = rw[key]
                print("%-44s %6.1f ms %6.1f ms %6.1f ms  %7.2fx %7.2fx" % (
                    LABELS[key], s["median_ms"], s["p90_ms"], s["min_ms"], s["median_ms"] / ssh,
                    s["median_ms"] / virsh))
    h = res["rows_held"]
    print("%-44s %6.2f ms %6.2f ms %6.2f ms" % (LABELS["library_held_ping"], h["median_ms"],
                                               h["p90_ms"], h["min_ms"]))
    print()
    print("%d concurrent clients, %d commands each (whole processes):" % (
        res["concurrent_clients"], res["concurrent_runs"]))
    print("%-44s %9s %9s %9s %9s" % ("command", "p50", "p99", "max", "wall"))
    for phase in ("master", "no_master"):
        for key, s in res["phases"][phase]["concurrent"].items():
            print("%-44s %6.1f ms %6.1f ms %6.1f ms %7.2f s" % (
                LABELS[key] + (" (ph. 2)" if key == "virsh_guest_ping" and phase == "master"
                               else ""), s["median_ms"], s["p99_ms"], s["max_ms"], s["wall_s"]))
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
        log(args, "building the guest overlay: agent, dropbear, virtio_net")
        pyz = workdir / "guestlink-agent.pyz"
        write_bundle(str(pyz))
        args.key, pub = C.make_ssh_key(workdir)
        extra = C.ssh_files(pub)  # qemu-ga is in the base image
        C.ensure_base()
        C.ensure_libvirtd(workdir)
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
