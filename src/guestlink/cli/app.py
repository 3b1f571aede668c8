"""The ``guestlink`` command: the parser of every command group, dispatch, Ctrl-C, the last resort.

Every VM-facing command addresses the VM through common.resolve_target (``--ctl``/``--data``,
``GUESTLINK_CTL``/``GUESTLINK_DATA`` or a libvirt domain). Failures print one line
``guestlink: error: ...`` on stderr and exit with a status from guestlink.exitcodes
(common.exit_for). The command groups are imported here and import nothing of this module.
"""

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, List, Optional, Sequence

from .._version import __version__
from ..exitcodes import EXIT_INTERRUPTED, EXIT_USAGE
from ..protocol.safetext import printable
from . import lean, vm
from .common import EPILOG, UsageError, VMParsers, exit_for, qga_notice, resolve_target

if TYPE_CHECKING:  # asyncio and the other command groups are imported when needed: a one-shot
    import asyncio  # command through the master (guestlink.cli.lean) imports neither

async def _cmd_cp(client: Any, args: argparse.Namespace) -> int:
    from . import files

    return await files.cmd_cp(client, args)


async def _cmd_run(client: Any, args: argparse.Namespace) -> int:
    from . import files

    return await files.cmd_run(client, args)


#: The commands that run against a connected VM: name -> coroutine (client, args) -> exit status.
COMMANDS: Dict[str, Callable[[Any, argparse.Namespace], Awaitable[int]]] = {
    "ping": vm.cmd_ping, "info": vm.cmd_info, "exec": vm.cmd_exec, "send": vm.cmd_send,
    "listen": vm.cmd_listen, "call": vm.cmd_call, "shutdown": vm.cmd_shutdown,
    "reboot": vm.cmd_reboot, "cp": _cmd_cp, "run": _cmd_run,
}
#: The commands :mod:`.vm` parses (cp and run are :mod:`.files`').
VM_COMMANDS = ("ping", "info", "exec", "send", "listen", "call", "shutdown", "reboot")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``command`` one of :mod:`.vm`'s, only theirs (the same
    parsers: a one-shot command need not import the other groups to parse its arguments)."""
    parser = argparse.ArgumentParser(
        prog="guestlink",
        description="Messages, commands and files between a VM's host and its guest over "
                    "virtio-serial.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="guestlink " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command in VM_COMMANDS:
        vm.add_parsers(VMParsers(sub, only=command))
        return parser
    vm_parsers = VMParsers(sub)
    vm.add_parsers(vm_parsers)
    from . import agent, doctor, enroll, files, image, libvirt, master

    files.add_parsers(vm_parsers)
    agent.add_parsers(sub)
    image.add_parser(sub)
    enroll.add_parser(sub)
    libvirt.add_parsers(sub)
    doctor.add_parser(sub)
    master.add_parsers(sub)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad command lines before connecting (UsageError); normalise a few options."""
    if args.command in ("cp", "run"):
        from . import files

        files.check_args(args)
    if args.command == "exec":
        vm.check_exec_domain(args)
    resolve_target(args, lookup=False)
    vm.check_args(args)


async def _run_vm_command(args: argparse.Namespace) -> int:
    from ..host import errors as E
    from ..host.client import connect

    target = resolve_target(args)
    func = COMMANDS[args.command]
    connect_timeout = args.connect_timeout if args.command in ("exec", "run") else args.timeout
    # one-shot commands must not silently wait for a VM that went away; listen keeps listening
    reconnect = args.command == "listen"
    where: Dict[str, Any] = (
        dict(domain=target.domain, uri=target.uri, ctl_name=target.ctl_name,
             data_name=target.data_name) if target.domain  # follows restarts
        else dict(ctl=target.ctl, data=target.data, qga=target.qga))
    try:
        async with connect(timeout=connect_timeout, reconnect=reconnect,
                           queue_timeout=args.queue_timeout, on_queue=_say_queued, via=args.via,
                           **master_args(args), **where) as client:
            if client.via == "qga":
                qga_notice(client, target)
            return await func(client, args)
    except E.PermissionDenied as exc:
        if not target.domain:
            raise
        raise E.PermissionDenied(
            "%s (libvirt domain %s: libvirt made the socket for its qemu user; run as root, or "
            "attach the channels with --socket-dir DIR you can reach)" % (exc, target.domain),
            exc.path, exc.errno) from None


def master_args(args: argparse.Namespace) -> Dict[str, Any]:
    """connect()'s master= and persist= for a VM command's --persist (docs/master.md): start a
    master unless --persist 0 (then only use a running one); $GUESTLINK_MASTER=0: never."""
    persist = args.persist
    return {"master": None if persist == 0 else True, "persist": persist}


def _say_queued(holder: str) -> None:
    sys.stderr.write("guestlink: waiting for the VM: it is in use by %s\n" % printable(holder))
    sys.stderr.flush()


def _loop_error(loop: "asyncio.AbstractEventLoop", context: Dict[str, Any]) -> None:
    """asyncio's last resort (an exception no task awaited): one escaped line, no traceback."""
    from ..agent.cli import debugging

    if debugging():
        loop.default_exception_handler(context)
        return
    exc = context.get("exception")
    what = "%s: %s" % (type(exc).__name__, exc) if exc is not None else context.get("message")
    sys.stderr.write("guestlink: warning: internal: %s\n" % printable(what))


async def _main_async(args: argparse.Namespace) -> int:
    import asyncio
    import signal  # here, as asyncio: the lean path needs neither

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_loop_error)
    task = asyncio.current_task()
    interrupted: List[bool] = []

    def on_sigint() -> None:
        if interrupted:
            # a second Ctrl-C: the user will not wait for the clean-up (the guest confirming the
            # cancel, a transfer winding down); end now, whatever the event loop is doing
            os._exit(EXIT_INTERRUPTED)
        interrupted.append(True)
        if task is not None:
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals
        pass
    try:
        status = await _run_vm_command(args)
        # interrupted, yet the command completed: Ctrl-C still means 130 (the work may be partial)
        return EXIT_INTERRUPTED if interrupted else status
    except asyncio.CancelledError:
        if interrupted:
            return EXIT_INTERRUPTED
        raise
    finally:
        try:
            loop.remove_signal_handler(signal.SIGINT)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
        if interrupted:  # still while asyncio.run and the interpreter wind down (thread joins)
            signal.signal(signal.SIGINT, lambda signum, frame: os._exit(EXIT_INTERRUPTED))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``guestlink`` command: exit status per guestlink.exitcodes; never a traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C outside a VM command's own handling (image, list, ...)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug, or guest data the library failed to turn into an error
        from ..agent.cli import internal_error

        status: int = internal_error("guestlink", exc)
        return status


def _main(argv: Optional[Sequence[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "agent":
        from . import agent

        return agent.run_agent(argv[1:])
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command not in VM_COMMANDS:
        from . import agent, doctor, enroll, image, libvirt, master

        if args.command == "agent-bundle":
            return agent.cmd_agent_bundle(args)
        if args.command == "doctor":
            return doctor.run(args)
        if args.command == "image":
            return image.run(args)
        if args.command == "enroll":
            return enroll.run(args)
        if args.command in libvirt.COMMANDS:
            return libvirt.run(args)
        if args.command in master.COMMANDS:
            return master.run(args)

    from ..host.errors import GuestlinkError

    try:
        check_args(args)
        if args.command in lean.LEAN and args.via != "qga":
            status = lean.run(args, master_args(args))
            if status is not None:
                return status
        import asyncio

        return asyncio.run(_main_async(args))
    except (UsageError, GuestlinkError) as exc:
        return exit_for(exc, args.command)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # our stdout went away (e.g. piped into head): quiet, as other Unix tools are
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        import signal

        return 128 + signal.SIGPIPE
    except OSError as exc:  # a local I/O failure (reading stdin, writing output)
        return exit_for(exc)
