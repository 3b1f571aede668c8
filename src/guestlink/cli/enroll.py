"""``guestlink enroll DOMAIN`` / ``guestlink enroll --qga PATH --ctl PATH --data PATH``: install
guestlink's agent into a running VM through its qemu-guest-agent (the work is guestlink.enroll's;
this module is its command line: the channels of a libvirt domain, the transport, output)."""

import argparse
import asyncio
import os
import sys
from typing import Any, Dict, Optional

from ..exitcodes import EXIT_INTERRUPTED, EXIT_NOINPUT, EXIT_OK, VM, help_text
from ..protocol.safetext import printable
from .common import UsageError, add_channel_names, add_connect, exit_for, positive_seconds, print_json

DESCRIPTION = """\
Install guestlink's agent into a running VM through its qemu-guest-agent, start it and wait for
its first answer over the guestlink channels. What gets installed (zipapp, wrapper, config,
modules-load entry, systemd unit / sysv script / rc.local block, manifest) is exactly what
`guestlink image install` puts on a disk; `guestlink image status` reads either the same.

A libvirt domain lacking the guestlink channels gets them, in its persistent definition and
hot-plugged into the running domain (when the domain has no virtio-serial controller libvirt
cannot hot-plug one: the channels then appear after the next shutdown and start). Plain QEMU:
the qemu-ga socket and the guestlink ports must exist (--qga, --ctl, --data).

Before anything is written the guest is checked for python3 >= 3.8 and the virtio_console
driver. Running it again with the same agent changes nothing; a newer agent upgrades in place
and restarts (an edited config is kept); --remove stops the agent and undoes the install.
"""

#: seconds for qemu-ga to answer its first sync (a running one answers in milliseconds)
QGA_TIMEOUT = 10.0

EXAMPLES = """\
examples:
  guestlink enroll vm1
  guestlink enroll --json vm1
  guestlink enroll --qga /run/vm1-qga.sock --ctl /run/vm1-ctl.sock --data /run/vm1-data.sock
  guestlink enroll --remove vm1

"""


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("enroll", help="install the agent into a running VM through qemu-ga",
                       description=DESCRIPTION, epilog=EXAMPLES + help_text(VM),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("domain_arg", nargs="?", metavar="DOMAIN",
                   help="libvirt domain name or UUID (or --qga/--ctl/--data for plain QEMU)")
    add_connect(p, "libvirt URI", "-c")
    add_channel_names(p)
    p.add_argument("--qga", metavar="PATH",
                   help="plain QEMU: the host socket of the qemu-ga port (default: $GUESTLINK_QGA)")
    p.add_argument("--ctl", metavar="PATH",
                   help="plain QEMU: the control channel socket (default: $GUESTLINK_CTL)")
    p.add_argument("--data", metavar="PATH",
                   help="plain QEMU: the data channel socket (default: $GUESTLINK_DATA)")
    p.add_argument("--remove", action="store_true",
                   help="stop the agent and undo the install (the channels stay: guestlink "
                        "libvirt detach DOMAIN removes them)")
    p.add_argument("--agent", metavar="FILE",
                   help="the agent zipapp to install (default: this guestlink's own)")
    p.add_argument("--init", metavar="KIND",
                   help="how the agent starts: systemd, sysv or rc.local (default: detected)")
    p.add_argument("--socket-dir", metavar="DIR",
                   help="libvirt: put the channels' host sockets in DIR (default: libvirt's)")
    p.add_argument("--timeout", type=positive_seconds, default=60.0, metavar="S",
                   help="seconds to wait for the started agent's first answer (default 60)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


def _agent_bytes(path: Optional[str]) -> bytes:
    if not path:
        from ..bundle import build_bundle_bytes

        return build_bundle_bytes()
    from ..image.errors import ImageError

    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ImageError("cannot read %s: %s" % (path, exc.strerror), EXIT_NOINPUT) from None


def run(args: argparse.Namespace) -> int:
    """Run ``enroll``; return the exit status."""
    from ..host.errors import GuestlinkError
    from ..image.errors import ImageError
    from ..libvirt import LibvirtError

    def progress(line: str) -> None:
        if not args.quiet:
            sys.stderr.write("guestlink: %s\n" % printable(line))
            sys.stderr.flush()

    try:
        outcome = asyncio.run(_run(args, progress))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (UsageError, ImageError, GuestlinkError, LibvirtError, ValueError, OSError) as exc:
        return exit_for(exc)
    if args.json:
        print_json(outcome, pretty=True)
    else:
        print(printable(outcome["summary"]))
        for note in outcome.get("notes", ()):
            sys.stderr.write("guestlink: note: %s\n" % printable(note))
    return EXIT_OK


async def _run(args: argparse.Namespace, progress: Any) -> Dict[str, Any]:
    from .. import enroll as EN
    from .. import libvirt as L
    from ..host.qga import LibvirtTransport, SocketTransport

    domain = args.domain_arg
    qga_path = args.qga or (None if domain else os.environ.get("GUESTLINK_QGA"))
    if domain and (args.qga or args.ctl or args.data):
        raise UsageError("give either a libvirt domain or --qga/--ctl/--data, not both")
    pyz = _agent_bytes(args.agent)  # before anything is changed
    channels: Optional[Dict[str, Any]] = None
    ctl_name = data_name = None
    notes = []
    ping = True
    if domain:
        ctl_name, data_name = L.names_from_env(args.ctl_name, args.data_name)
        transport: Any = LibvirtTransport(domain, args.libvirt_uri)
        await transport.open(QGA_TIMEOUT)  # qemu-ga must answer before the domain is changed
        connect_kw: Dict[str, Any] = dict(domain=domain, uri=args.libvirt_uri,
                                          ctl_name=ctl_name, data_name=data_name)
        if not args.remove:
            progress("adding the guestlink channels to libvirt domain %s where missing" % domain)
            loop = asyncio.get_running_loop()
            attached, ping = await loop.run_in_executor(None, lambda: EN.add_channels(
                domain, args.libvirt_uri, ctl_name, data_name, args.socket_dir))
            channels = attached
            notes += attached.get("notes", [])  # ping False: reachable after a restart only
            # the names attach chose (given, recorded in the domain, or the defaults) go into the
            # agent's config: the agent looks its ports up by them
            ctl_name, data_name = attached["names"]
    else:
        if args.ctl_name or args.data_name or args.socket_dir:
            raise UsageError("--ctl-name/--data-name/--socket-dir are for a libvirt domain")
        ctl = args.ctl or os.environ.get("GUESTLINK_CTL")
        data = args.data or os.environ.get("GUESTLINK_DATA")
        if not qga_path or (not args.remove and not ctl):
            raise UsageError("no VM given: name a libvirt domain, or for plain QEMU give --qga "
                             "PATH (the qemu-ga socket) and --ctl PATH --data PATH")
        if ctl and not args.remove and not os.path.exists(ctl):
            # checked before anything is written: plain QEMU cannot get the port from here
            from ..host.errors import SocketNotFound

            raise SocketNotFound("no guestlink control socket %s: start the VM with the "
                                 "org.guestlink.ctl and org.guestlink.data ports (README: Using "
                                 "it); nothing was written" % ctl, ctl)
        transport = SocketTransport(qga_path)
        await transport.open(QGA_TIMEOUT)
        connect_kw = dict(ctl=ctl, data=data)
    try:
        qga = EN.QgaExec(transport)
        if args.remove:
            outcome = await EN.remove(qga, pyz, progress=progress)
            if domain:
                outcome.notes.append("the guestlink channels stay in libvirt domain %s (guestlink "
                                     "libvirt detach %s removes them)" % (domain, domain))
        else:
            outcome = await EN.enroll(qga, pyz, connect_kw, init=args.init, ctl_name=ctl_name,
                                      data_name=data_name,
                                      ping_timeout=args.timeout, progress=progress,
                                      channels=channels, wait=None if ping else _no_ping)
    finally:
        await transport.close()
    if not ping:
        outcome.summary += ("; it answers once the domain has been shut down and started again "
                            "(then the guestlink channels exist in the guest)")
    outcome.notes = notes + outcome.notes
    return outcome.as_dict()


async def _no_ping(connect_kw: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """The channels appear only after the domain is restarted: nothing to ping yet."""
    return {"version": None, "hostname": None, "ping_ms": None}

