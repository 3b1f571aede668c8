"""``guestlink cp`` and ``guestlink run`` (the file transfer commands).

``cp SRC... DST``: exactly one side names the guest, scp-style: ``:PATH`` (the VM comes from
--ctl/--data, $GUESTLINK_CTL/DATA or --domain) or ``VM:PATH`` (a libvirt domain, resolved by
common.resolve_target). ``-`` is stdin (push) or stdout (pull). A colon after a slash is part of a
local path (``./a:b``). Several sources (all on one side) go into DST, which must then be an
existing directory; as with scp and cp, a source that fails is reported and the others are
still copied. ``run`` delivers a script with the same push and runs it as ``exec`` does.
"""

import argparse
import asyncio
import os
import secrets
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from ..exitcodes import EXIT_OK
from ..protocol.safetext import printable
from .common import (ProgressBar, UsageError, VMParsers, error_message, exit_code_for, fail,
                     parse_pairs, positive_seconds, print_json)
from .vm import cmd_exec

if TYPE_CHECKING:  # the host library is imported when a command runs, not for --help
    from ..host.client import AnyClient

CHECKSUMS = ("sha256", "blake2b", "crc32")


class Spec:
    """One SRC or DST argument: its text, whether it names the guest, the path, the domain."""

    def __init__(self, text: str, remote: bool, path: str, domain: Optional[str] = None) -> None:
        self.text, self.remote, self.path, self.domain = text, remote, path, domain

    @property
    def local_side(self) -> bool:
        return not self.remote


def parse_spec(text: str) -> Spec:
    if text == "-" or not text:
        return Spec(text, False, text)
    idx = text.find(":")
    if idx == 0:
        return Spec(text, True, text[1:])
    if idx > 0 and "/" not in text[:idx]:
        return Spec(text, True, text[idx + 1:], text[:idx])
    return Spec(text, False, text)


def add_parsers(parsers: VMParsers) -> None:
    p = parsers.add("cp", "copy files between the host and the guest (scp-like: :PATH or VM:PATH "
                         "names the guest side; several SRCs go into the directory DST)", via=True)
    p.add_argument("src", nargs="+", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("-r", "--recursive", action="store_true", help="copy directories recursively "
                   "(symlinks are copied as symlinks)")
    p.add_argument("-p", "--preserve", action="store_true", help="preserve mode and mtime (and "
                   "owner when the receiving side runs as root)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted copy from its "
                   "last verified byte")
    p.add_argument("--checksum", choices=CHECKSUMS, default="sha256",
                   help="whole-file digest (default sha256; crc32 for slow guest CPUs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = parsers.add("run", "copy a local script into the guest, run it with ARGS, stream its "
                          "output, remove it; exits with its status",
                   timeout_help="kill the script after S seconds (exit status 124)", via=True)
    p.set_defaults(timeout=None, stdin_mode="auto", shell=False)
    p.add_argument("--connect-timeout", type=positive_seconds, default=10.0, metavar="S",
                   help="seconds to connect and get the script started (default 10)")
    p.add_argument("--env", action="append", metavar="K=V", help="set an environment variable")
    p.add_argument("--cwd", metavar="DIR", help="working directory in the guest (default /)")
    p.add_argument("--dir", default="/tmp", metavar="DIR",
                   help="guest directory for the script (default /tmp)")
    p.add_argument("script", metavar="SCRIPT")
    p.add_argument("script_args", nargs="...", metavar="ARG")


def check_args(args: argparse.Namespace) -> None:
    """Refuse a bad cp or run command line before connecting (before resolve_target, which
    learns the domain of a ``VM:PATH`` here)."""
    if args.command == "cp":
        srcs, dst = [parse_spec(a) for a in args.src], parse_spec(args.dst)
        if len(srcs) == 1 and srcs[0].remote == dst.remote:
            raise UsageError("cp: exactly one of SRC and DST must name the guest (:PATH or VM:PATH)")
        if any(s.remote == dst.remote for s in srcs):
            raise UsageError("cp: the sources must all be on one side and DST on the other "
                             "(:PATH or VM:PATH names the guest)")
        remotes = srcs if dst.local_side else [dst]
        for remote in remotes:
            if not remote.path.startswith("/"):
                raise UsageError("cp: the guest path must be absolute, not %r" % remote.path)
        if len({r.domain for r in remotes}) > 1:
            raise UsageError("cp: the guest paths name different VMs (%s)"
                             % ", ".join(sorted({r.domain or "the default VM" for r in remotes})))
        domains = {r.domain for r in remotes if r.domain}
        if getattr(args, "domain_arg", None):
            domains.add(args.domain_arg)
        if len(domains) > 1:
            raise UsageError("two libvirt domains given")
        if domains:
            args.domain_arg = domains.pop()
        args.direction = "pull" if dst.local_side else "push"
        # (local, remote) per source
        args.copies = [(dst.path, s.path) if dst.local_side else (s.path, dst.path) for s in srcs]
        args.local, args.remote = args.copies[0]
        args.labels = [s.text for s in srcs]
        if len(srcs) > 1:
            if any(s.path == "-" for s in srcs) or dst.path == "-":
                raise UsageError("cp: - (stdin/stdout) takes a single source")
            if dst.local_side and not os.path.isdir(dst.path):
                raise UsageError("cp: target %r is not a directory (several sources)" % dst.path)
        if "-" in (args.local, args.remote) and args.recursive:
            raise UsageError("cp: -r cannot stream through - (stdin/stdout)")
    elif args.command == "run":
        if not os.path.isfile(args.script):
            raise UsageError("run: %s is not a file" % args.script)
        args.env_map = parse_pairs(args.env, "--env") or None


async def cmd_cp(vm: "AnyClient", args: argparse.Namespace) -> int:
    if len(args.copies) == 1:
        result = await _copy_one(vm, args, args.local, args.remote, args.labels[0])
        if args.json:
            print_json(_result_json(result))
        return EXIT_OK
    return await _copy_many(vm, args)


async def _copy_many(vm: "AnyClient", args: argparse.Namespace) -> int:
    """Several sources into one directory: each is copied as if alone; one that fails is
    reported (one line) and the rest still go; the exit status is the first failure's."""
    from ..host import errors as E
    from ..protocol import codes

    if args.direction == "push":
        target = args.copies[0][1]
        try:
            st = await vm.call("fs.stat", {"path": target}, timeout=args.timeout)
        except E.RemoteNotFound:
            st = None
        if st is None or st.get("type") != "dir":
            raise E.RemoteNotADirectory(codes.NOT_A_DIRECTORY, "target %s is not a directory in the guest "
                                        "(several sources)" % target)
    status = EXIT_OK
    results: List[Any] = []
    errors: List[Dict[str, str]] = []
    for (local, remote), label in zip(args.copies, args.labels):
        try:
            results.append(await _copy_one(vm, args, local, remote, label))
        except (E.GuestlinkError, OSError) as exc:
            message = error_message(exc)
            path = remote if args.direction == "pull" else local
            fail(message if path in message else "%s: %s" % (label, message))
            errors.append({"source": label, "error": message})
            status = status or exit_code_for(exc, "cp")
    if args.json:
        seconds = sum(r.seconds for r in results)
        nbytes = sum(r.bytes for r in results)
        print_json({"copies": [_result_json(r) for r in results], "errors": errors,
                    "files": sum(r.files for r in results), "bytes": nbytes,
                    "seconds": round(seconds, 6),
                    "mb_per_s": round(nbytes / seconds / 1e6 if seconds > 0 else 0.0, 3)})
    return status


def _result_json(result: Any) -> Dict[str, Any]:
    obj = {"source": result.source, "destination": result.destination, "bytes": result.bytes,
           "seconds": round(result.seconds, 6), "mb_per_s": round(result.rate, 3),
           "algorithm": result.algorithm, "digest": result.digest, "files": result.files,
           "resumed_from": result.resumed_from}
    if result.algorithm == "sha256":
        obj["sha256"] = result.digest
    if getattr(result, "verified", True) is False:  # through qemu-ga, a guest without sha256sum
        obj["verified"] = False
    return obj


async def _copy_one(vm: "AnyClient", args: argparse.Namespace, local: str, remote: str,
                    label: str) -> Any:
    bar = None
    try:
        tty = os.isatty(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        tty = False
    if tty and not args.json and not args.quiet and not (args.direction == "pull" and local == "-"
                                                         and os.isatty(sys.stdout.fileno())):
        bar = ProgressBar(os.path.basename(label.rstrip("/")) or label)
    kw = dict(recursive=args.recursive, preserve=args.preserve, resume=args.resume,
              checksum=args.checksum, progress=bar, timeout=args.timeout)
    if args.direction == "pull" and local == "-":
        sys.stdout.flush()
    try:
        try:
            try:
                if args.direction == "push":
                    result = await vm.push(local, remote, **kw)
                else:
                    result = await vm.pull(remote, local, **kw)
            except ValueError as exc:  # an option this path cannot do (qemu-ga: -r, -p, --resume)
                raise UsageError("cp: %s" % exc) from None
            if getattr(result, "verified", True) is False:
                sys.stderr.write("guestlink: warning: %s: not verified end to end: the guest has "
                                 "neither sha256sum nor python3\n" % printable(label))
            return result
        finally:
            if bar is not None:
                bar.close()
    except asyncio.CancelledError:  # Ctrl-C (app._main_async exits 130): say what became of it
        if args.recursive or len(args.copies) > 1:
            what = "files already copied stay"
        elif args.direction == "pull" and local == "-":
            what = "the output so far is incomplete"
        else:
            what = "its partial data was removed"
        sys.stderr.write("guestlink: interrupted: the copy was cancelled (%s); run it again to "
                         "copy, --resume cannot continue a cancelled copy\n" % what)
        raise


async def cmd_run(vm: "AnyClient", args: argparse.Namespace) -> int:
    name = os.path.basename(args.script) or "script"
    remote = "%s/.guestlink-run-%s-%s" % (args.dir.rstrip("/"), secrets.token_hex(6), name)
    await vm.push(args.script, remote, timeout=args.connect_timeout)
    try:
        await vm.call("fs.setattr", {"path": remote, "mode": 0o700}, timeout=args.connect_timeout)
        args.cmd = [remote] + list(args.script_args)
        return await cmd_exec(vm, args)
    finally:
        try:
            await asyncio.shield(vm.call("fs.remove", {"path": remote}, timeout=args.connect_timeout))
        except Exception:
            pass
