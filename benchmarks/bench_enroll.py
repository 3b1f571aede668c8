#!/usr/bin/env python3
"""Time from ``guestlink enroll`` to the first guestlink ping, and each of its steps.

    .venv/bin/python benchmarks/bench_enroll.py [--json] [--rounds 3]

One TestVM (TCG, 2 vCPUs) with Debian's qemu-ga on ``org.qemu.guest_agent.0``, the guestlink
ports, and no guestlink agent running. Each round runs the real CLI as a user would
(``python3 -m guestlink enroll --json --qga ... --ctl ... --data ...``, plain QEMU):

1. **enroll**: wall time of the command (CLI start, building the zipapp, qemu-ga sync, probe,
   copy through guest-file-write, SHA-256 check and install in the guest, start, the first ping
   over guestlink) and the steps it reports (``steps`` in its JSON);
2. **re-enroll** (same agent: nothing copied, nothing changed);
3. **remove** (``enroll --remove``: the agent stopped and the install undone), which makes the
   next round a fresh enroll again.

A benchmark, not a test: the exit status is 0 unless it could not run at all.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import _common as C  # puts src/ and the repository root on sys.path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "src")] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "guestlink"] + list(args), env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - t
    if r.returncode != 0:
        raise RuntimeError("guestlink %s failed (%d): %s" % (" ".join(args), r.returncode,
                                                             r.stderr.strip()))
    return seconds, r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="JSON only")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()

    def say(msg):
        if not args.quiet:
            print("bench_enroll: %s" % msg, file=sys.stderr, flush=True)

    C.ensure_base()
    import tempfile

    from testvm import TestVM

    with tempfile.TemporaryDirectory(prefix="glbench-enroll-") as tmp:
        vm = TestVM(os.path.join(tmp, "vm"), agent_pyz=None, qga=True)
        vm.start()
        try:
            C.wait_qga(vm)
            where = ["--qga", vm.qga_path, "--ctl", vm.ctl_path, "--data", vm.data_path]
            rounds = []
            for i in range(args.rounds):
                say("round %d: enroll" % (i + 1))
                wall, out = cli("enroll", "--json", *where)
                first = json.loads(out)
                assert first["action"] == "installed", first["action"]
                wall_again, out = cli("enroll", "--json", *where)
                again = json.loads(out)
                assert again["action"] == "unchanged", again["action"]
                wall_remove, out = cli("enroll", "--remove", "--json", *where)
                rounds.append({"enroll_s": wall, "enroll_steps": first["steps"],
                               "reenroll_s": wall_again, "reenroll_steps": again["steps"],
                               "remove_s": wall_remove, "remove_steps": json.loads(out)["steps"]})
            facts = C.vm_facts(vm)
        finally:
            vm.stop()

    def med(key, sub=None):
        vals = [r[key][sub] for r in rounds if sub in r[key]] if sub else [r[key] for r in rounds]
        return round(statistics.median(vals), 3) if vals else None

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": C.host_facts(), "vm": facts, "rounds": rounds,
        "median": {
            "enroll_to_first_ping_s": med("enroll_s"),
            "enroll_steps_s": {k: med("enroll_steps", k) for k in
                               ("probe", "copy", "run", "first_ping", "total")},
            "reenroll_s": med("reenroll_s"),
            "remove_s": med("remove_s"),
        },
    }
    if args.json:
        print(C.dump_json(report))
        return 0
    m = report["median"]
    print("guestlink enroll (plain QEMU, qemu-ga socket), median of %d rounds, TCG guest:"
          % len(rounds))
    print("  enroll -> first guestlink ping (CLI wall) %7.2f s" % m["enroll_to_first_ping_s"])
    for k, v in m["enroll_steps_s"].items():
        print("    %-12s %7.3f s" % (k, v))
    print("  re-enroll (nothing changed)                %7.2f s" % m["reenroll_s"])
    print("  enroll --remove                            %7.2f s" % m["remove_s"])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # a benchmark that cannot run says why in one line
        print("bench_enroll: cannot run: %s" % exc, file=sys.stderr)
        sys.exit(1)
