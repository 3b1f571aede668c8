#!/usr/bin/python3 -S
"""Minimal pgrep / pkill for the test VM (Debian's busybox-static has neither).

pgrep [-f] [-x] [-l] [-a] [-n] [-o] PATTERN
pkill [-f] [-x] [-n] [-o] [-SIGNAL | -s SIGNAL] PATTERN
PATTERN is a Python (≈ extended) regex; exit status 0 if something matched,
1 if nothing did, 2 on usage errors. Like procps, only its own process is
excluded.
"""
import os
import re
import signal
import sys


def usage(msg):
    print(f"{os.path.basename(sys.argv[0])}: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_signal(s):
    if s.isdigit():
        return int(s)
    name = s.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return getattr(signal, name)
    except AttributeError:
        usage(f"unknown signal {s}")


def main():
    kill = os.path.basename(sys.argv[0]) == "pkill"
    full = exact = lng = allargs = newest = oldest = False
    sig = signal.SIGTERM
    args = sys.argv[1:]
    pattern = None
    while args:
        a = args.pop(0)
        if a == "--":
            break
        if a in ("-s", "--signal") and kill:
            if not args:
                usage("missing signal")
            sig = parse_signal(args.pop(0))
        elif kill and len(a) > 1 and a[0] == "-" and (a[1].isupper() or a[1].isdigit()):
            sig = parse_signal(a[1:])
        elif a.startswith("-") and len(a) > 1:
            for c in a[1:]:
                if c == "f":
                    full = True
                elif c == "x":
                    exact = True
                elif c == "l":
                    lng = True
                elif c == "a":
                    allargs = True
                elif c == "n":
                    newest = True
                elif c == "o":
                    oldest = True
                else:
                    usage(f"unsupported option -{c}")
        else:
            pattern = a
            break
    if pattern is None:
        if args:
            pattern = args.pop(0)
        else:
            usage("no pattern")
    rx = re.compile(pattern)
    me = os.getpid()
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/comm", "rb") as f:
                comm = f.read().decode(errors="replace").rstrip("\n")
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmdline = f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
            start = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[19])
        except (OSError, ValueError, IndexError):
            continue
        subject = (cmdline or comm) if full else comm
        m = rx.fullmatch(subject) if exact else rx.search(subject)
        if m:
            found.append((start, int(d), comm, cmdline or comm))
    if newest and found:
        found = [max(found)]
    elif oldest and found:
        found = [min(found)]
    found.sort(key=lambda t: t[1])
    for _, pid, comm, cmdline in found:
        if kill:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        elif allargs:
            print(pid, cmdline)
        elif lng:
            print(pid, comm)
        else:
            print(pid)
    sys.exit(0 if found else 1)


main()
