"""The VM commands: ping, info, exec, send, listen, call, shutdown, reboot.

Each ``cmd_*`` runs against a connected client (``vm``) and returns the exit status; the
connection, Ctrl-C and errors are guestlink.cli.app's.
"""

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Dict, Optional, Union

from ..exitcodes import EXIT_OK, EXIT_TIMEOUT
from ..protocol.safetext import printable
from .common import (UsageError, VMParsers, domain_arg, parse_pairs, positive_seconds, print_json,
                     text_fields)

if TYPE_CHECKING:  # the host library (and asyncio) are imported when a command needs them:
    # not for --help, nor on the lean path through the master (guestlink.cli.lean)
    import asyncio

    from ..host import Client, CompletedProcess
    from ..host.client import AnyClient
    from ..protocol.ops import ExecResult


def add_parsers(parsers: VMParsers) -> None:
    # a one-shot command builds only its own parser (parsers.wants): the others cost more than
    # the parse itself
    for name, help in (("ping", "check that the agent answers; print the round-trip time"),
                       ("info", "describe the guest (OS, kernel, addresses, agent)")):
        if parsers.wants(name):
            domain_arg(parsers.add(name, help, via=True))

    if parsers.wants("exec"):
        p = parsers.add("exec", "run a command in the guest, streaming its output",
                        timeout_help="kill the command after S seconds (exit status 124)",
                        via=True)
        p.set_defaults(timeout=None)
        p.add_argument("--connect-timeout", type=positive_seconds, default=10.0, metavar="S",
                       help="seconds to connect and get the command started (default 10)")
        p.add_argument("--env", action="append", metavar="K=V",
                       help="set an environment variable (repeatable; on top of the login-like "
                            "HOME, USER, LOGNAME, SHELL, PATH, LANG of the user the command runs "
                            "as)")
        p.add_argument("--cwd", metavar="DIR", help="working directory in the guest (default /)")
        p.add_argument("-u", "--user", metavar="NAME",
                       help="run as this guest user, with their groups and environment (the agent "
                            "must run as root; default: the agent's user)")
        p.add_argument("--shell", action="store_true",
                       help="run CMD... joined by spaces through /bin/sh -c")
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("-i", "--stdin", dest="stdin_mode", action="store_const", const="always",
                          help="forward local stdin even when it is a terminal")
        mode.add_argument("-n", "--no-stdin", dest="stdin_mode", action="store_const",
                          const="never", help="do not forward local stdin (the command reads "
                                              "/dev/null)")
        p.set_defaults(stdin_mode="auto")
        p.add_argument("argv", nargs=argparse.REMAINDER, metavar="[DOMAIN] -- CMD [ARG...]",
                       help="the command; local stdin is forwarded when it is not a terminal; one "
                            "word before -- names a libvirt domain (options go before it)")

    if parsers.wants("send"):
        p = parsers.add("send", "send a topic message to the guest's subscribers")
        p.add_argument("topic")
        p.add_argument("message", metavar="DATA|-", help="the message, or - to read it from stdin")

    if parsers.wants("listen"):
        p = parsers.add("listen", "print the guest's messages on a topic",
                        timeout_help="seconds to connect (default 10)")
        p.add_argument("topic")
        p.add_argument("--count", type=int, default=0, metavar="N", help="exit after N messages")

    if parsers.wants("call"):
        p = parsers.add("call", "call a user-defined agent command; print its JSON result")
        p.add_argument("op")
        p.add_argument("--arg", action="append", metavar="K=V", help="a string argument")
        p.add_argument("--json-args", metavar="JSON", help="arguments as one JSON object")

    for name, help in (("shutdown", "power the guest off"), ("reboot", "reboot the guest")):
        if parsers.wants(name):
            domain_arg(parsers.add(name, help, json=False))


def check_exec_domain(args: argparse.Namespace) -> None:
    """``exec [OPTIONS] DOMAIN -- CMD``: the word before -- is the domain (before resolving)."""
    if "--" in args.argv[1:] and args.argv[0] != "--":
        if args.argv.index("--") != 1:
            raise UsageError("exec: only a libvirt domain may stand before --: guestlink exec "
                             "[OPTIONS] [DOMAIN] -- CMD [ARG...]")
        args.domain_arg, args.argv = args.argv[0], args.argv[1:]


def check_args(args: argparse.Namespace) -> None:
    """Refuse a bad exec or call command line before connecting; normalise its options."""
    if args.command == "exec":
        command = list(args.argv)
        if command and command[0] == "--":
            command = command[1:]
        if not command:
            raise UsageError("exec needs a command: guestlink exec [OPTIONS] -- CMD [ARG...]")
        args.cmd = " ".join(command) if args.shell else command
        args.env_map = parse_pairs(args.env, "--env") or None
        from ..host.options import ExecOptions, exec_request

        try:  # the agent's checks of --env/--cwd/--user, before connecting
            exec_request(args.cmd, ExecOptions(env=args.env_map, cwd=args.cwd, user=args.user))
        except (ValueError, TypeError) as exc:
            raise UsageError("exec: %s" % exc)
    elif args.command == "call":
        call_args: Dict[str, Any] = {}
        if args.json_args:
            try:
                call_args = json.loads(args.json_args)
            except ValueError as exc:
                raise UsageError("--json-args is not valid JSON: %s" % exc)
            if not isinstance(call_args, dict):
                raise UsageError("--json-args must be a JSON object")
        call_args.update(parse_pairs(args.arg, "--arg"))
        args.call_args = call_args


async def cmd_ping(vm: "AnyClient", args: argparse.Namespace) -> int:
    rtt = await vm.ping(timeout=args.timeout)
    agent = vm.agent
    assert agent is not None  # connected: the handshake described the agent
    if args.json:
        print_json({"rtt": rtt, "hostname": agent.hostname, "agent_version": agent.version,
                    "via": vm.via})
    else:
        name = "agent" if vm.via == "guestlink" else "qemu-ga"
        print("pong from %s (%s %s): %.2f ms" % (printable(agent.hostname or "?"), name,
                                                printable(agent.version), rtt * 1000))
    return EXIT_OK


async def cmd_info(vm: "AnyClient", args: argparse.Namespace) -> int:
    info = await vm.info(timeout=args.timeout)
    if args.json:
        print_json(info)
        return EXIT_OK
    osr = info["os_release"]
    kernel = info["kernel"]
    lines = [
        ("hostname", info["hostname"]),
        ("os", osr.get("PRETTY_NAME") or " ".join(filter(None, [osr.get("ID"), osr.get("VERSION_ID")]))),
        ("kernel", " ".join(filter(None, [kernel["release"], kernel["machine"]]))),
        ("uptime", "%.0f s" % info["uptime"] if info["uptime"] is not None else "?"),
        ("agent", "%s (protocol %d, python %s)" % (info["agent_version"], info["protocol"],
                                                   info["python"] or "?")
         if info["via"] == "guestlink" else info["agent_version"]),
        ("boot id", info["boot_id"]),
        ("addresses", ", ".join("%s %s" % (a["interface"], a["address"]) for a in info["addresses"])),
        ("commands", " ".join(info["capabilities"])),
    ]
    if info["via"] != "guestlink":
        lines.append(("via", "qemu-guest-agent (slow; guestlink enroll installs guestlink's agent)"))
    for key, value in lines:
        print("%-10s %s" % (key + ":", printable(value)))  # every value comes from the guest
    return EXIT_OK


class _StdinPump:
    """Reads local stdin in a daemon thread (never blocks exit) and feeds the remote stdin."""

    def __init__(self, loop: "asyncio.AbstractEventLoop") -> None:
        import asyncio
        import threading

        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.loop = loop
        thread = threading.Thread(target=self._read, name="guestlink-stdin", daemon=True)
        thread.start()

    def _read(self) -> None:
        try:
            fd = sys.stdin.fileno()
            while True:
                data = os.read(fd, 65536)
                self.loop.call_soon_threadsafe(self.queue.put_nowait, data)
                if not data:
                    return
        except (OSError, ValueError, RuntimeError):  # closed stdin, or the loop is gone
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, b"")
            except RuntimeError:
                pass

    async def pump(self, proc: Any) -> None:
        while True:
            data = await self.queue.get()
            if not data:
                await proc.close_stdin()
                return
            await proc.write(data)


def forward_stdin(args: argparse.Namespace) -> bool:
    if args.stdin_mode == "never":
        return False
    try:
        is_tty = os.isatty(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):
        return False  # no usable stdin
    return bool(args.stdin_mode == "always" or not is_tty)


def exec_status(result: Union["CompletedProcess", "ExecResult"]) -> int:
    if result.timed_out:
        return EXIT_TIMEOUT
    if result.signal:
        return 128 + int(result.signal)
    return int(result.returncode) & 0xFF


async def cmd_exec(vm: "AnyClient", args: argparse.Namespace) -> int:
    """Run ``args.cmd`` in the guest (also how ``run`` runs its script)."""
    cmd, env = args.cmd, args.env_map
    forward = forward_stdin(args)
    import asyncio

    pump_task: Optional[asyncio.Future[None]] = None
    async with vm.exec(cmd, stdin=forward, timeout=args.timeout, env=env, cwd=args.cwd,
                       call_timeout=args.connect_timeout,
                       user=getattr(args, "user", None)) as proc:
        if forward:
            pump_task = asyncio.ensure_future(_StdinPump(asyncio.get_running_loop()).pump(proc))
        try:
            if not args.json:
                async for stream, data in proc.output():
                    out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
                    out.write(data)
                    out.flush()
            result = await proc.wait()
        finally:
            if pump_task is not None:
                pump_task.cancel()
    return exec_report(result, args, result.stdout, result.stderr, via=vm.via)


def exec_report(result: Union["CompletedProcess", "ExecResult"], args: argparse.Namespace,
                stdout: bytes = b"", stderr: bytes = b"", via: str = "guestlink") -> int:
    """The end of an exec (both paths): the JSON result, or the timeout and truncation notes
    after the streamed output; -> the exit status."""
    if args.json:
        obj: Dict[str, Any] = {"returncode": result.returncode, "signal": result.signal,
                               "timed_out": result.timed_out, "duration": result.duration,
                               "stdout_truncated": result.stdout_truncated,
                               "stderr_truncated": result.stderr_truncated}
        obj.update(text_fields("stdout", stdout))
        obj.update(text_fields("stderr", stderr))
        print_json(obj)
    elif result.timed_out:
        print("guestlink: error: the command ran past --timeout %g s and was killed in the guest"
              % args.timeout, file=sys.stderr)
    if not args.json:
        say_truncated(result, via)
    return exec_status(result)


def say_truncated(result: Union["CompletedProcess", "ExecResult"], via: str = "guestlink") -> None:
    """Streamed output cut at the output limit must not pass for the whole output."""
    cut = [name for name, flag in (("stdout", result.stdout_truncated),
                                   ("stderr", result.stderr_truncated)) if flag]
    if cut:
        limit = "the output limit" if via == "guestlink" else "qemu-ga's 16 MiB output cap"
        sys.stderr.write("guestlink: warning: the command's %s was cut at %s; the rest was "
                         "dropped\n" % (" and ".join(cut), limit))


async def cmd_send(vm: "Client", args: argparse.Namespace) -> int:
    if args.message == "-":
        data = sys.stdin.buffer.read()
    else:
        data = args.message.encode("utf-8")
    try:
        delivered = await vm.publish(args.topic, data, timeout=args.timeout)
    except ValueError as exc:
        raise UsageError(str(exc))
    if args.json:
        print_json({"delivered": delivered})
    else:
        print("delivered to %d subscriber%s" % (delivered, "" if delivered == 1 else "s"))
    return EXIT_OK


async def cmd_listen(vm: "Client", args: argparse.Namespace) -> int:
    try:
        sub = vm.subscribe(args.topic)
    except ValueError as exc:
        raise UsageError(str(exc))
    count = 0
    async with sub:
        async for msg in sub:
            if args.json:
                obj = {"topic": msg.topic}
                obj.update(text_fields("data", msg.data))
                print_json(obj)
            else:
                out = sys.stdout.buffer
                out.write(msg.data if msg.data.endswith(b"\n") else msg.data + b"\n")
                out.flush()
            count += 1
            if args.count and count >= args.count:
                break
    return EXIT_OK


async def cmd_call(vm: "Client", args: argparse.Namespace) -> int:
    try:
        result = await vm.call(args.op, args.call_args, timeout=args.timeout)
    except ValueError as exc:
        raise UsageError(str(exc))
    print_json(result, pretty=not args.json)
    return EXIT_OK


async def cmd_shutdown(vm: "Client", args: argparse.Namespace) -> int:
    await vm.shutdown(timeout=args.timeout)
    return EXIT_OK


async def cmd_reboot(vm: "Client", args: argparse.Namespace) -> int:
    await vm.reboot(timeout=args.timeout)
    return EXIT_OK
