"""``guestlink image install|status|remove``: the agent in a VM disk image, offline."""

import argparse
import json
import os
import signal
import sys
import time
from contextlib import ExitStack

from ..protocol.safetext import printable
from .disk import FORMATS
from .errors import EXIT_INTERRUPTED, ImageError
from .tree import DEFAULT_CTL, DEFAULT_DATA, INIT_KINDS, Installer, Tree, status

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

exit status:
    0  success
    2  usage error (also: the format cannot be told from the name; give --format)
   65  no root filesystem / unknown filesystem / unreadable image / damaged manifest
   69  no backend can run here (the message lists what each one lacks)
   70  other error
   73  the image or the guest filesystem is read-only or full (nothing was changed)
   75  the image is in use by a running VM (its QEMU lock is held); --force overrides
   77  permission denied
  130  interrupted (everything set up so far is undone)
"""


def add_parser(sub):
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

    def add(name, help):
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


def _fault_hook():
    """Test hook: GUESTLINK_IMAGE_FAULT=STAGE[@sigint] fails (or Ctrl-C's) at STAGE."""
    spec = os.environ.get("GUESTLINK_IMAGE_FAULT")
    if not spec:
        return None
    stage, _, how = spec.partition("@")

    def fault(name):
        if name == stage:
            if how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)  # delivered as KeyboardInterrupt
                time.sleep(5)
            raise ImageError("injected failure at %s" % name)

    return fault


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args):
    """Entry point from guestlink.cli; returns the exit status."""
    if not args.image_command:
        sys.stderr.write("usage: guestlink image {install,status,remove} IMAGE|--root DIR\n")
        return 2
    if bool(args.image) == bool(args.root):
        sys.stderr.write("guestlink: error: give exactly one of IMAGE or --root DIR\n")
        return 2
    quiet = args.quiet or False

    def log(line):
        if not quiet:
            sys.stderr.write("guestlink: %s\n" % line)
            sys.stderr.flush()

    old = {}
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
            held = {}
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
        sys.stderr.write("guestlink: error: %s\n" % exc)
        return exc.exit_code
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    _print(args, result)
    return 0


def _run(args, stack, log):
    fault = _fault_hook()
    backend = None
    if args.root:
        root, where = args.root, "directory %s" % args.root
    else:
        from .backends import open_root
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
                raise ImageError("cannot read %s: %s" % (args.agent, exc.strerror), 66)
        else:
            from ..bundle import build_bundle_bytes
            pyz = build_bundle_bytes()
        ctl = data = None
        if args.channel_names:
            names = [n.strip() for n in args.channel_names.split(",")]
            if not 1 <= len(names) <= 2 or not all(names):
                raise ImageError("--channel-names wants CTL or CTL,DATA", 2)
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


def _print(args, result):
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
