"""The lean one-shot path: ``ping``, ``info``, ``exec``, ``call`` and ``send`` through the
guestlink master, without asyncio (docs/master.md, *The lean one-shot path*).

The master holds the VM's session and its libvirt lookup, so a command only connects to the
master's socket, attaches, and makes its one exchange with the blocking
:class:`guestlink.host.masterclient.Link`. ping/info/call/send run the very ``cmd_*`` coroutines of
:mod:`.vm` on it (:func:`~guestlink.host.masterclient.drive`); exec streams its output here and
ends as :func:`.vm.exec_report`. :func:`run` returns None when there is no master to use: the
caller then takes the asyncio path (which connects directly).
"""

import argparse
import sys
from typing import Any, Callable, Dict, List, Optional

from . import vm
from .common import resolve_target

#: The commands this path serves.
COMMANDS: Dict[str, Callable[[Any, argparse.Namespace], Any]] = {
    "ping": vm.cmd_ping, "info": vm.cmd_info, "call": vm.cmd_call, "send": vm.cmd_send,
}
LEAN = tuple(COMMANDS) + ("exec",)


def run(args: argparse.Namespace, master: Dict[str, Any]) -> Optional[int]:
    """Run the command through the master -> its exit status, or None (no master to use)."""
    from ..host import mastersock as MS
    from ..host.masterclient import drive, open_link

    pol = MS.policy(master["master"], master["persist"])
    if not pol.use:
        return None
    target = resolve_target(args, lookup=False)
    timeout = args.connect_timeout if args.command == "exec" else args.timeout
    attach = MS.attach_args(target.ctl or None, target.data, domain=target.domain,
                            uri=target.uri, ctl_name=target.ctl_name,
                            data_name=target.data_name, timeout=timeout,
                            queue_timeout=args.queue_timeout, messages=False)
    try:
        link = open_link(pol, attach, timeout)
    except Exception as exc:
        from ..host.errors import qga_may_help

        if getattr(args, "via", "guestlink") == "auto" and qga_may_help(exc):
            return None  # the asyncio path tries guestlink's agent, then qemu-ga
        raise
    if link is None:
        return None
    with link:
        if args.command == "exec":
            return _exec(link, args)
        status: int = drive(COMMANDS[args.command](link, args))
        return status


def _exec(link: Any, args: argparse.Namespace) -> int:
    from ..host.options import (DEFAULT_OUTPUT_LIMIT, EXEC_KILL_GRACE, ExecOptions,
                                check_exec_agent, exec_request)
    from ..host.timing import DEFAULT_TIMEOUT

    forward = vm.forward_stdin(args)
    request = exec_request(args.cmd, ExecOptions(stdin=forward, timeout=args.timeout,
                                                 env=args.env_map, cwd=args.cwd,
                                                 user=getattr(args, "user", None)))
    check_exec_agent(request, link.agent)
    limit = DEFAULT_OUTPUT_LIMIT
    received = {1: 0, 2: 0}
    cut = {1: False, 2: False}
    kept: Dict[int, List[bytes]] = {1: [], 2: []}

    def output(stream: int, data: bytes) -> None:
        room = max(0, limit - received[stream])
        if len(data) > room:  # the agent enforces the limit too; a guest is not trusted to
            cut[stream] = True
            data = data[:room]
        if not data:
            return
        received[stream] += len(data)
        if args.json:
            kept[stream].append(data)
        else:
            out = sys.stdout.buffer if stream == 1 else sys.stderr.buffer
            out.write(data)
            out.flush()

    wait = None if args.timeout is None else args.timeout + EXEC_KILL_GRACE + DEFAULT_TIMEOUT
    result = link.exec(request, output, sys.stdin.fileno() if forward else None,
                       args.connect_timeout, wait)
    if result.signal is None and result.returncode < 0:
        result = result.replace(signal=-result.returncode)
    result = result.replace(stdout_truncated=result.stdout_truncated or cut[1],
                            stderr_truncated=result.stderr_truncated or cut[2])
    return vm.exec_report(result, args, b"".join(kept[1]), b"".join(kept[2]))
