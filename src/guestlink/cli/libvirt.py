"""``guestlink libvirt xml|attach|detach`` and ``guestlink list`` (see :mod:`guestlink.libvirt`).

guestlink.cli.app adds these parsers with :func:`add_parsers` and dispatches to :func:`run`.
"""

import argparse
import asyncio
import json
import sys
from typing import Any, Dict, List, Tuple

from .. import libvirt as L
from ..exitcodes import EXIT_OK
from ..protocol.safetext import printable
from .common import EPILOG, add_channel_names, add_connect, exit_for, positive_seconds

COMMANDS = ("libvirt", "list")


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    epilog = EPILOG
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("libvirt", help="libvirt integration: channel XML, attach/detach channels",
                       description="libvirt integration: print the channel XML, add or remove the "
                                   "guestlink channels of a domain", epilog=epilog,
                       formatter_class=fmt)
    lsub = p.add_subparsers(dest="libvirt_command", metavar="SUBCOMMAND")
    lsub.required = True

    x = lsub.add_parser("xml", help="print the virtio-serial controller and channel XML",
                        description="print a <controller type='virtio-serial'> and two "
                                    "<channel type='unix'> elements to paste into a domain's "
                                    "<devices> (virsh edit DOMAIN); with other channel names "
                                    "than the defaults, also a <metadata> element recording them "
                                    "for the domain")
    add_channel_names(x, recorded=False)
    x.add_argument("--socket-dir", metavar="DIR",
                   help="put the host sockets in DIR (default: libvirt places them)")
    x.add_argument("--ports", type=int, default=L.DEFAULT_PORTS, metavar="N",
                   help="ports on the controller (default %d)" % L.DEFAULT_PORTS)
    x.add_argument("--index", type=int, default=0, metavar="N",
                   help="the controller's index (default 0; use a free one if the domain already "
                        "has a virtio-serial controller, or use `guestlink libvirt attach`)")

    for name, text in (("attach", "add the guestlink controller/channels to a domain "
                                  "(idempotent)"),
                       ("detach", "remove the guestlink channels (and the controller attach added)")):
        a = lsub.add_parser(name, help=text, description=text + ". Without --live/--config: the "
                            "persistent config, plus the running domain if it runs.",
                            epilog=epilog, formatter_class=fmt)
        a.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
        add_connect(a, "libvirt URI", "-c")
        add_channel_names(a)
        a.add_argument("--config", action="store_true", help="change the persistent config")
        a.add_argument("--live", action="store_true", help="change the running domain")
        if name == "attach":
            a.add_argument("--socket-dir", metavar="DIR",
                           help="put the host sockets in DIR (default: libvirt places them)")
            a.add_argument("--ports", type=int, default=L.DEFAULT_PORTS, metavar="N",
                           help="ports of a controller that has to be added (default %d)"
                                % L.DEFAULT_PORTS)
        a.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("list", help="list libvirt domains, their guestlink channels and agents",
                       description="list libvirt domains (like virsh list) with the state of "
                                   "their guestlink control channel and, where the agent "
                                   "answers, its version and hostname", epilog=epilog,
                       formatter_class=fmt)
    add_connect(p, "libvirt URI", "-c")
    add_channel_names(p)
    p.add_argument("--all", action="store_true", help="also list domains that are not running")
    p.add_argument("--timeout", type=positive_seconds, default=3.0, metavar="S",
                   help="seconds to wait for each agent (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also print the socket paths and how libvirt is reached")


def run(args: argparse.Namespace) -> int:
    """Run ``libvirt ...`` or ``list``; return the exit status."""
    try:
        if args.command == "list":
            return asyncio.run(_list(args))
        if args.libvirt_command == "xml":
            return _xml(args)
        return _attach_detach(args)
    except (ValueError, L.LibvirtError) as exc:  # ValueError: an argument libvirt.py refused
        return exit_for(exc)


def _xml(args: argparse.Namespace) -> int:
    names = L.choose_names(None, *L.names_from_env(args.ctl_name, args.data_name))
    sys.stdout.write(L.channels_xml(names.ctl, names.data, args.socket_dir, args.ports,
                                    args.index))
    return EXIT_OK


def _attach_detach(args: argparse.Namespace) -> int:
    be = L.backend(args.libvirt_uri)
    ctl_name, data_name = L.names_from_env(args.ctl_name, args.data_name)
    kw = dict(live=args.live, config=args.config, ctl_name=ctl_name, data_name=data_name,
              backend_=be)
    verb = args.libvirt_command
    if verb == "attach":
        result = L.attach(args.domain, socket_dir=args.socket_dir, ports=args.ports, **kw)
    else:
        result = L.detach(args.domain, **kw)
    if args.json:
        out: Dict[str, Any] = dict(result)
        out["backend"] = be.name
        sys.stdout.write(json.dumps(out, sort_keys=True) + "\n")
    else:
        for label in ("config", "live"):
            if label not in result:
                continue
            done = result[label]
            what = "added" if verb == "attach" else "removed"
            if done:
                for d in done:
                    # d names a channel/metadata from the domain's XML: escaped like the rest
                    print(printable("%s (%s): %s %s" % (args.domain, label, what, d)))
            else:
                print("%s (%s): nothing to do (%s)" % (
                    args.domain, label, "already attached" if verb == "attach" else "not attached"))
        for note in result.get("notes", ()):
            sys.stderr.write("guestlink: note: %s\n" % printable(note))
    return EXIT_OK


async def _probe(entry: Any, timeout: float, hop: Any = None) -> Dict[str, Any]:
    """Ask a running domain's agent for its description; fills agent fields, never raises.
    ``hop``: the ssh hop of a qemu+ssh:// URI, whose hypervisor has the sockets (forwarded)."""
    from ..host import errors as E
    from ..host.client import connect

    if entry.ctl is None or not entry.ctl.path:
        return {"agent": None, "error": None}
    try:
        ctl, data = entry.ctl.path, entry.data.path if entry.data else None
        if hop is not None:  # the paths are the remote hypervisor's
            ctl, data = await asyncio.get_running_loop().run_in_executor(
                None, hop.channel_sockets, ctl, data)
        async with connect(ctl=ctl, data=data, timeout=timeout, reconnect=False,
                           via="guestlink") as vm:
            agent = vm.agent
            assert agent is not None  # connected: the handshake described the agent
            return {"agent": {"version": agent.version, "hostname": agent.hostname,
                              "protocol": agent.protocol}, "error": None}
    except E.GuestlinkError as exc:
        return {"agent": None, "error": str(exc)}
    except OSError as exc:
        return {"agent": None, "error": str(exc)}


async def _list(args: argparse.Namespace) -> int:
    be = L.backend(args.libvirt_uri)
    loop = asyncio.get_running_loop()
    names = L.names_from_env(args.ctl_name, args.data_name)
    rows = await loop.run_in_executor(None, lambda: L.list_domains(
        args.libvirt_uri, *names, backend_=be))
    if not args.all:
        rows = [r for r in rows if r.id is not None]
    probes = await asyncio.gather(*[
        _probe(r, args.timeout, be.hop) if r.id is not None else _none() for r in rows])
    out: List[Dict[str, Any]] = []
    for r, probe in zip(rows, probes):
        if r.ctl is None:
            channel = "none"
        elif r.id is None:
            channel = "-"
        else:
            channel = r.ctl.state or "unknown"
        out.append({
            "id": r.id, "name": r.name, "uuid": r.uuid, "state": r.state,
            "channel": channel,
            "ctl": r.ctl.path if r.ctl else None, "data": r.data.path if r.data else None,
            "ctl_name": r.names.ctl if r.names else None,
            "data_name": r.names.data if r.names else None,
            "data_channel": (r.data.state or "unknown") if r.data and r.id is not None else None,
            "agent_version": probe["agent"]["version"] if probe["agent"] else None,
            "hostname": probe["agent"]["hostname"] if probe["agent"] else None,
            "error": probe["error"],
        })
    if args.json:
        sys.stdout.write(json.dumps({"uri": be.uri, "backend": be.name, "domains": out},
                                    sort_keys=True) + "\n")
        return EXIT_OK
    header = ("Id", "Name", "State", "Channel", "Agent", "Hostname")
    table: List[Tuple[str, ...]] = [header]
    for d in out:  # the agent's version and hostname come from the guest: escaped
        table.append(tuple(printable(c) for c in (
            str(d["id"]) if d["id"] is not None else "-", d["name"], d["state"], d["channel"],
            d["agent_version"] or "-", d["hostname"] or "-")))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print(" " + "   ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("-" * (sum(widths) + 3 * (len(widths) - 1) + 2))
    if args.verbose:
        print("\nlibvirt: %s via %s" % (be.uri, be.name))
        for d in out:
            if d["ctl"]:
                print(printable("%s: ctl %s, data %s" % (d["name"], d["ctl"], d["data"] or "-")))
            if d["error"]:
                print(printable("%s: agent: %s" % (d["name"], d["error"])))
    return EXIT_OK


async def _none() -> Dict[str, Any]:
    return {"agent": None, "error": None}
