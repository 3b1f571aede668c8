"""``guestlink doctor``: the command line of guestlink.doctor's checks."""

import argparse

from .. import doctor
from ..exitcodes import DOCTOR, help_text
from .common import add_channel_names, add_connect


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "doctor", help="check what guestlink's features need on this host",
        description="check what guestlink's features need on this host: QEMU, libvirt and the "
                    "user's rights on it, a domain's channel sockets, the image backends "
                    "(qemu-storage-daemon + FUSE, libguestfs and a kernel for its appliance, the "
                    "nbd module) and the agent bundle; one line per item with the fix",
        epilog=help_text(DOCTOR), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("domain", nargs="?", metavar="DOMAIN",
                   help="also check this libvirt domain's channel sockets")
    add_connect(p, "libvirt URI", "-c")
    add_channel_names(p)
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {name, ok, detail, fix, optional}")


def run(args: argparse.Namespace) -> int:
    from ..libvirt import names_from_env

    names = names_from_env(args.ctl_name, args.data_name)
    return doctor.report(doctor.run_checks(args.libvirt_uri, args.domain, names), args.json)
