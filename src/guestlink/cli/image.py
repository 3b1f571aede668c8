"""``guestlink image install|status|remove``: the agent in a VM disk image, offline (the work is
guestlink.image's; this module is its command line)."""

import argparse
import json
import os
import signal
import sys
import time
from contextlib import ExitStack
from types import FrameType
from typing import Any, Callable, Dict, Optional

from ..exitcodes import EXIT_INTERRUPTED, EXIT_NOINPUT, EXIT_OK, EXIT_USAGE, IMAGE, help_text
from ..image.disk import FORMATS
from ..image.errors import ImageError
from ..image.tree import DEFAULT_CTL, DEFAULT_DATA, INIT_KINDS, Installer, Tree, status
from ..protocol.safetext import printable
from .common import exit_for

EPILOG = """\
backends (--backend auto tries them in this order and says which one it used):
  nbd      qemu-nbd + the nbd kernel module + mount (root)
  loop     raw images directly, other formats through a qemu-storage-daemon FUSE
           export (or a qemu-img convert round trip); losetup + mount (root)
  guestfs  libguestfs appliance (guestfish) + mount-local; no root needed

image format: --format, or from the name (.raw/.img: raw, .qcow2: qcow2); never guessed from
the contents, which the guest can forge. A qcow2 whose header names a backing or data file (a
host path) is refused unless --allow-backing-file; otherwise it is opened with no backing file.
The guest filesystem is mounted nodev,nosuid,noexec. status opens the image read-only and shares
QEMU's lock, so it works on a running VM's disk and changes nothing.

""" + help_text(IMAGE)


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Add ``image`` and its subcommands to the top-level subparsers."""
    p = sub.add_parser("image", help="install/update/remove the agent in a VM disk image (offline)",
                       description="Install, update, inspect or remove the guestlink agent in a "
                                   "VM disk image while the VM is off; it starts at the next boot.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    isub = p.add_subparsers(dest="image_command", metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("image", nargs="?", metavar="IMAGE", help="disk image (qcow2, raw, ...)")
    common.add_argument("--root", metavar="DIR",
                        help="an already-mounted guest root directory instead of IMAGE")
    common.add_argument("--backend", choices=("auto", "nbd", "guestfs", "loop"), default="auto")
    common.add_argument("--format", choices=FORMATS, metavar="FORMAT",
                        help="the image format (%s); default: from the name (.raw/.img: raw, "
                             ".qcow2: qcow2), never guessed from the contents" % ", ".join(FORMATS))
    common.add_argument("--allow-backing-file", action="store_true",
                        help="open a qcow2 whose header names a backing or data file (a host "
                             "path); only for images you trust")
    part = common.add_mutually_exclusive_group()
    part.add_argument("--partition", type=int, metavar="N",
                      help="the root filesystem's partition number (0 or 1: whole-disk filesystem)")
    part.add_argument("--root-auto", action="store_true",
                      help="find the partition holding /etc/os-release (the default)")
    common.add_argument("--force", action="store_true",
                        help="install/remove: open the image even if its QEMU lock says a VM is "
                             "using it (status always reads read-only, sharing the lock)")
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return isub.add_parser(name, help=help, description=help, parents=[common], epilog=EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)

    i = add("install", "install or upgrade the agent (idempotent), enabled at boot")
    i.add_argument("--channel-names", metavar="CTL[,DATA]",
                   help="virtio-serial port names for the agent config (default %s,%s)"
                        % (DEFAULT_CTL, DEFAULT_DATA))
    i.add_argument("--init", choices=("auto",) + INIT_KINDS, default="auto",
                   help="how the guest starts the agent (default: detected)")
    i.add_argument("--agent", metavar="PYZ",
                   help="agent zipapp to install (default: built from this guestlink)")
    add("status", "show the installed agent version, config and how it is started")
    add("remove", "undo exactly what install did")
    return p


def _fault_hook() -> Optional[Callable[[str], None]]:
    """Test hook: GUESTLINK_IMAGE_FAULT=STAGE[@sigint] fails (or Ctrl-C's) at STAGE."""
    spec = os.environ.get("GUESTLINK_IMAGE_FAULT")
    if not spec:
        return None
    stage, _, how = spec.partition("@")

    def fault(name: str) -> None:
        if name == stage:
            if how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)  # delivered as KeyboardInterrupt
                time.sleep(5)
            raise ImageError("injected failure at %s" % name)

    return fault


def _raise_interrupt(signum: int, frame: Optional[FrameType]) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Run ``image ACTION``; return the exit status."""
    if not args.image_command:
        sys.stderr.write("usage: guestlink image {install,status,remove} IMAGE|--root DIR\n")
        return EXIT_USAGE
    if bool(args.image) == bool(args.root):
        return exit_for(ImageError("give exactly one of IMAGE or --root DIR", EXIT_USAGE))
    quiet = args.quiet or False

    def log(line: str) -> None:
        if not quiet:
            sys.stderr.write("guestlink: %s\n" % line)
            sys.stderr.flush()

    old: Dict[signal.Signals, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            old[sig] = signal.signal(sig, _raise_interrupt)
        except (ValueError, OSError):
            pass
    stack = ExitStack()
    try:
        try:
            result = _run(args, stack, log)
        finally:
            # cleanup must not be cut short by a second Ctrl-C
            held: Dict[signal.Signals, Any] = {}
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                try:
                    held[sig] = signal.signal(sig, signal.SIG_IGN)
                except (ValueError, OSError):
                    pass
            try:
                stack.close()
            finally:
                for sig, h in held.items():
                    signal.signal(sig, h)
    except KeyboardInterrupt:
        sys.stderr.write("guestlink: interrupted; everything set up was undone\n")
        return EXIT_INTERRUPTED
    except ImageError as exc:
        return exit_for(exc)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    _print(args, result)
    return EXIT_OK


def _run(args: argparse.Namespace, stack: ExitStack, log: Callable[[str], None]) -> Dict[str, Any]:
    fault = _fault_hook()
    backend = None
    if args.root:
        root, where = args.root, "directory %s" % args.root
    else:
        from ..image.backends import open_root
        partition = args.partition
        # status reads only: a read-only open sharing QEMU's lock works on a running VM's disk
        root, backend, where = open_root(args.image, stack, args.backend, partition, args.force,
                                         log=log, fmt=args.format,
                                         read_only=args.image_command == "status",
                                         allow_backing=args.allow_backing_file)
        log("root filesystem: %s" % where)
        if fault:
            fault("opened")
    tree = Tree(root)
    inst = Installer(tree, log=log, fault=fault)
    if args.image_command == "install":
        if args.agent:
            try:
                with open(args.agent, "rb") as f:
                    pyz = f.read()
            except OSError as exc:
                raise ImageError("cannot read %s: %s" % (args.agent, exc.strerror), EXIT_NOINPUT)
        else:
            from ..bundle import build_bundle_bytes
            pyz = build_bundle_bytes()
        ctl: Optional[str] = None
        data: Optional[str] = None
        if args.channel_names:
            names = [n.strip() for n in args.channel_names.split(",")]
            if not 1 <= len(names) <= 2 or not all(names):
                raise ImageError("--channel-names wants CTL or CTL,DATA", EXIT_USAGE)
            ctl = names[0]
            data = names[1] if len(names) > 1 else None
        result = inst.install(pyz, None if args.init == "auto" else args.init, ctl, data)
        for note in result["notes"]:
            log(note)
    elif args.image_command == "remove":
        result = inst.remove()
        for note in result["notes"]:
            log(note)
    else:
        result = status(tree)
    if backend is not None:
        backend.succeeded = True
    result["target"] = args.image or args.root
    result["where"] = where
    if backend is not None:
        result["backend"] = backend.name
    return result


def _print(args: argparse.Namespace, result: Dict[str, Any]) -> None:
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
        return
    if args.image_command != "status":
        print(printable(result["summary"]))
        return
    # manifest fields and paths come from the image: escaped before they reach the terminal
    r = {k: printable(v) for k, v in result.items() if isinstance(v, str) or v is None}
    if not result["installed"]:
        print("guestlink agent: not installed in %s" % r["target"])
        if result.get("foreign_files"):
            print("  agent files not installed by guestlink image install: %s"
                  % ", ".join(result["foreign_files"]))
        return
    print("guestlink agent %s installed in %s" % (r["agent_version"], r["target"]))
    print("  root:       %s" % r["where"])
    print("  started by: %s" % r["init"])
    print("  config:     %s (ctl_name=%s, data_name=%s)%s" % (
        result["config"]["path"], r["ctl_name"], r["data_name"],
        " [modified since install]" if result["config"]["modified"] else ""))
    print("  installed:  %s%s" % (r.get("installed_at"), (
        " (upgraded from %s)" % r["previous_version"]) if result.get("previous_version")
        and result["previous_version"] != result["agent_version"] else ""))
    for f in result["files"]:
        print("  %-9s %-8s %s" % (f["state"], f["kind"], printable(f["path"])))
