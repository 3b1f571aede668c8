"""``guestlink agent-bundle`` (the guest agent as one file) and ``guestlink agent`` (run it)."""

import argparse
import sys
from typing import List

from ..exitcodes import EXIT_CANTCREAT, EXIT_OK
from .common import fail

#: ``guestlink agent ARGS`` passes ARGS that start with one of these unchanged.
AGENT_SUBCOMMANDS = ("run", "send", "listen", "install", "remove", "status")


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("agent-bundle", help="write the guest agent as one executable file",
                       description="write the guest agent as one executable file (a zipapp "
                                   "needing only python3 >= 3.8 in the guest)")
    p.add_argument("-o", "--output", required=True, metavar="FILE")

    # parsed by the agent's own command line (run_agent); listed here for --help
    sub.add_parser("agent", help="run the guest agent (inside the guest): guestlink agent [ARGS]",
                   add_help=False)


def cmd_agent_bundle(args: argparse.Namespace) -> int:
    from ..bundle import write_bundle

    try:
        size = write_bundle(args.output)
    except OSError as exc:
        fail("cannot write %s: %s" % (args.output, exc.strerror or exc))
        return EXIT_CANTCREAT
    sys.stderr.write("wrote %s (%d bytes)\n" % (args.output, size))
    return EXIT_OK


def run_agent(argv: List[str]) -> int:
    """``guestlink agent ARGS``: ``guestlink.agent.cli.main(["run", *ARGS])``; ARGS that start with
    one of the agent's own subcommands (run, send, listen, install, remove, status) are passed
    unchanged."""
    from ..agent.cli import main as agent_main

    argv = list(argv)
    if not argv or argv[0] not in AGENT_SUBCOMMANDS:
        argv = ["run"] + argv
    status: int = agent_main(argv)
    return status
