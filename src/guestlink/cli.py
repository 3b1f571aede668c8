"""The ``guestlink`` command line (host side; ``guestlink agent ...`` runs the guest agent).

Every VM-facing command addresses the VM through :func:`resolve_target` (``--ctl``/``--data`` or
``GUESTLINK_CTL``/``GUESTLINK_DATA``); a later libvirt-domain resolver plugs in there. Failures
print one line ``guestlink: error: ...`` on stderr and exit with a code from :data:`EXIT_CODES`.
"""

import argparse
import asyncio
import base64
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Optional

from ._version import __version__
from .protocol.ports import CTL_NAME, DATA_NAME
from .protocol.safetext import printable

# --- exit codes (sysexits.h style): the one table ---------------------------------------------

EXIT_OK = 0
EXIT_USAGE = 2             # bad command line (EX_USAGE is 64, but argparse uses 2)
EXIT_NOHOST = 68           # EX_NOHOST: no libvirt domain of that name or UUID
EXIT_UNAVAILABLE = 69      # EX_UNAVAILABLE: control socket missing, nobody listening on it;
                           # libvirt domain not running; libvirt not reachable
EXIT_SOFTWARE = 70         # EX_SOFTWARE: any other error reported by the agent; an internal
                           # error (a bug: one line, see GUESTLINK_DEBUG)
EXIT_CANTCREAT = 73        # EX_CANTCREAT: a local output file cannot be written
EXIT_IOERR = 74            # EX_IOERR: connection lost, request not sent
EXIT_TEMPFAIL = 75         # EX_TEMPFAIL: the agent does not answer (handshake or request timeout),
                           # or another guestlink command kept the VM past --queue-timeout
EXIT_PROTOCOL = 76         # EX_PROTOCOL: protocol mismatch or malformed answer
EXIT_NOPERM = 77           # EX_NOPERM: denied by the agent's policy, or permission denied
EXIT_CONFIG = 78           # EX_CONFIG: the libvirt domain has no guestlink channels
EXIT_TIMEOUT = 124         # exec: the command ran past --timeout (as timeout(1))
EXIT_CANNOT_RUN = 126      # exec: the program exists but cannot be run (as the shell/env(1))
EXIT_NOT_FOUND = 127       # exec: the program does not exist (as the shell/env(1))
EXIT_INTERRUPTED = 130     # Ctrl-C (the running command is cancelled in the guest first)

EPILOG = """\
exit status:
    0  success (exec: the command's own exit status; killed by signal N: 128+N)
    2  usage error
   68  no libvirt domain of that name or UUID
   69  control socket missing, or nobody listening on it (is the VM running?);
       libvirt domain not running; libvirt not reachable
   70  other error reported by the agent, or an internal error (please report it)
   73  local output file cannot be written
   74  connection lost (outcome unknown) or request not sent
   75  the agent did not answer in time
   76  protocol mismatch or malformed answer from the agent
   77  denied by the agent's policy, or permission denied
   78  the libvirt domain has no guestlink channels (guestlink libvirt attach DOMAIN)
  124  exec: the command timed out (--timeout)
  126  exec: the program cannot be run in the guest
  127  exec: the program does not exist in the guest
  130  interrupted (Ctrl-C); a running command is cancelled in the guest (a second
       Ctrl-C quits without waiting for the guest)

environment:
  GUESTLINK_CTL, GUESTLINK_DATA   defaults for --ctl and --data
  GUESTLINK_DOMAIN                default libvirt domain (when no --ctl/$GUESTLINK_CTL)
  GUESTLINK_CTL_NAME, GUESTLINK_DATA_NAME
                                  defaults for --ctl-name and --data-name (a domain's
                                  channel names; else its guestlink metadata, else
                                  %s and %s)
  LIBVIRT_DEFAULT_URI             default for --connect (else qemu:///system)
  GUESTLINK_DEBUG=1               an internal error prints its traceback too
""" % (CTL_NAME, DATA_NAME)


def exit_code_for(exc, command=None):
    """The exit status for an exception (one table, first match wins)."""
    from .host import errors as E
    from . import libvirt as LV

    if command == "exec":
        if isinstance(exc, E.RemoteNotFound):
            return EXIT_NOT_FOUND
        if isinstance(exc, E.RemotePermissionDenied):
            return EXIT_CANNOT_RUN
    table = [
        (LV.DomainNotFound, EXIT_NOHOST),
        (LV.NoChannels, EXIT_CONFIG),
        (LV.LibvirtPermissionDenied, EXIT_NOPERM),
        (LV.AttachError, EXIT_SOFTWARE),
        (LV.LibvirtError, EXIT_UNAVAILABLE),
        (E.PermissionDenied, EXIT_NOPERM),
        (E.VMInUse, EXIT_TEMPFAIL),
        (E.ConnectError, EXIT_UNAVAILABLE),
        (E.AgentNotResponding, EXIT_TEMPFAIL),
        (E.RequestTimeout, EXIT_TEMPFAIL),
        (E.ProtocolError, EXIT_PROTOCOL),
        (E.ConnectionLost, EXIT_IOERR),
        (E.RequestNotSent, EXIT_IOERR),
        (E.CommandDenied, EXIT_NOPERM),
        (E.RemotePermissionDenied, EXIT_NOPERM),
        (E.RemoteError, EXIT_SOFTWARE),
        (E.GuestlinkError, EXIT_SOFTWARE),
    ]
    for cls, code in table:
        if isinstance(exc, cls):
            return code
    return EXIT_SOFTWARE


class UsageError(Exception):
    pass


def _fail(message):
    """The one error-printing path: messages quote the guest (error texts, names), so they are
    escaped; one line, always."""
    sys.stderr.write("guestlink: error: %s\n" % printable(message))


# --- VM addressing ----------------------------------------------------------------------------

@dataclass
class Target:
    """How to reach one VM's channels."""

    ctl: str
    data: Optional[str] = None
    domain: Optional[str] = None   # the libvirt domain the paths were read from
    uri: Optional[str] = None      # its libvirt URI (--connect; None: the default)
    # the domain's channel names as given (--ctl-name/$GUESTLINK_CTL_NAME...); None: its metadata's,
    # else the defaults (guestlink.libvirt.choose_names), read again on every reconnection
    ctl_name: Optional[str] = None
    data_name: Optional[str] = None


def resolve_target(args, domain=None):
    """Turn the VM-addressing options into a Target.

    A libvirt domain (``guestlink COMMAND DOMAIN``, ``--domain``, or ``domain=`` from a ``VM:PATH``
    argument; URI from ``--connect``) is resolved through its live XML
    (:func:`guestlink.libvirt.resolve_domain`); else ``--ctl``/``--data``, else
    $GUESTLINK_CTL/$GUESTLINK_DATA, else $GUESTLINK_DOMAIN. A domain's channel names: as given
    (``--ctl-name``/``--data-name``, else $GUESTLINK_CTL_NAME/$GUESTLINK_DATA_NAME), else recorded
    in its metadata, else the defaults.
    """
    uri = getattr(args, "libvirt_uri", None)
    ctl, data = getattr(args, "ctl", None), getattr(args, "data", None)
    given_names = getattr(args, "ctl_name", None) or getattr(args, "data_name", None)
    if domain is None:
        named = {d for d in (getattr(args, "domain", None), getattr(args, "domain_arg", None)) if d}
        if len(named) > 1:
            raise UsageError("two libvirt domains given: %s" % " and ".join(sorted(named)))
        domain = named.pop() if named else None
    if domain and (ctl or data):
        raise UsageError("give either a libvirt domain or --ctl/--data, not both")
    if not domain and not ctl and not os.environ.get("GUESTLINK_CTL"):
        domain = os.environ.get("GUESTLINK_DOMAIN") or None
    if domain:
        cache = args.__dict__.setdefault("_libvirt_targets", {})
        if (domain, uri) not in cache:
            from . import libvirt

            names = libvirt.names_from_env(getattr(args, "ctl_name", None),
                                           getattr(args, "data_name", None))
            c, d = libvirt.resolve_domain(domain, uri, *names)
            cache[(domain, uri)] = Target(ctl=c, data=d, domain=domain, uri=uri, ctl_name=names[0],
                                          data_name=names[1])
        return cache[(domain, uri)]
    if given_names:
        raise UsageError("--ctl-name/--data-name name a libvirt domain's channels: give a domain, "
                         "not --ctl/--data")
    ctl = ctl or os.environ.get("GUESTLINK_CTL")
    data = data or os.environ.get("GUESTLINK_DATA") or None
    if not ctl:
        raise UsageError("no VM given: name a libvirt domain (guestlink COMMAND DOMAIN or "
                         "--domain DOMAIN) or use --ctl PATH (or set GUESTLINK_CTL)")
    return Target(ctl=ctl, data=data)


# --- output helpers ----------------------------------------------------------------------------

def _text_fields(name, data):
    """JSON-friendly bytes: UTF-8 text (with replacement); plus NAME_base64 if not valid UTF-8."""
    try:
        return {name: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {name: data.decode("utf-8", "replace"),
                name + "_base64": base64.b64encode(data).decode("ascii")}


def _print_json(obj, pretty=False):
    sys.stdout.write(json.dumps(obj, indent=2 if pretty else None, sort_keys=True) + "\n")
    sys.stdout.flush()


def _parse_pairs(pairs, what):
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError("%s must be KEY=VALUE, not %r" % (what, pair))
        out[key] = value
    return out


# --- commands ---------------------------------------------------------------------------------

async def cmd_ping(vm, args):
    rtt = await vm.ping(timeout=args.timeout)
    if args.json:
        _print_json({"rtt": rtt, "hostname": vm.agent.hostname, "agent_version": vm.agent.version})
    else:
        print("pong from %s (agent %s): %.2f ms" % (printable(vm.agent.hostname or "?"),
                                                     printable(vm.agent.version), rtt * 1000))
    return EXIT_OK


async def cmd_info(vm, args):
    info = await vm.info(timeout=args.timeout)
    if args.json:
        _print_json(info)
        return EXIT_OK
    osr = info["os_release"]
    kernel = info["kernel"]
    lines = [
        ("hostname", info["hostname"]),
        ("os", osr.get("PRETTY_NAME") or " ".join(filter(None, [osr.get("ID"), osr.get("VERSION_ID")]))),
        ("kernel", " ".join(filter(None, [kernel["release"], kernel["machine"]]))),
        ("uptime", "%.0f s" % info["uptime"] if info["uptime"] is not None else "?"),
        ("agent", "%s (protocol %d, python %s)" % (info["agent_version"], info["protocol"],
                                                   info["python"] or "?")),
        ("boot id", info["boot_id"]),
        ("addresses", ", ".join("%s %s" % (a["interface"], a["address"]) for a in info["addresses"])),
        ("commands", " ".join(info["capabilities"])),
    ]
    for key, value in lines:
        print("%-10s %s" % (key + ":", printable(value)))  # every value comes from the guest
    return EXIT_OK


class _StdinPump:
    """Reads local stdin in a daemon thread (never blocks exit) and feeds the remote stdin."""

    def __init__(self, loop):
        self.queue = asyncio.Queue()
        self.loop = loop
        thread = threading.Thread(target=self._read, name="guestlink-stdin", daemon=True)
        thread.start()

    def _read(self):
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

    async def pump(self, proc):
        while True:
            data = await self.queue.get()
            if not data:
                await proc.close_stdin()
                return
            await proc.write(data)


def _forward_stdin(args):
    if args.stdin_mode == "never":
        return False
    try:
        is_tty = os.isatty(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):
        return False  # no usable stdin
    return args.stdin_mode == "always" or not is_tty


def _exec_status(result):
    if result.timed_out:
        return EXIT_TIMEOUT
    if result.signal:
        return 128 + result.signal
    return result.returncode & 0xFF


async def cmd_exec(vm, args):
    cmd, env = args.cmd, args.env_map
    forward = _forward_stdin(args)
    pump_task = None
    async with vm.exec(cmd, stdin=forward, timeout=args.timeout, env=env, cwd=args.cwd,
                       call_timeout=args.connect_timeout) as proc:
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
    if args.json:
        obj = {"returncode": result.returncode, "signal": result.signal,
               "timed_out": result.timed_out, "duration": result.duration,
               "stdout_truncated": result.stdout_truncated,
               "stderr_truncated": result.stderr_truncated}
        obj.update(_text_fields("stdout", result.stdout))
        obj.update(_text_fields("stderr", result.stderr))
        _print_json(obj)
    elif result.timed_out:
        print("guestlink: error: the command ran past --timeout %g s and was killed in the guest"
              % args.timeout, file=sys.stderr)
    if not args.json:
        _say_truncated(result)
    return _exec_status(result)


def _say_truncated(result):
    """Streamed output cut at the output limit must not pass for the whole output."""
    cut = [name for name, flag in (("stdout", result.stdout_truncated),
                                   ("stderr", result.stderr_truncated)) if flag]
    if cut:
        sys.stderr.write("guestlink: warning: the command's %s was cut at the output limit; the "
                         "rest was dropped\n" % " and ".join(cut))


async def cmd_send(vm, args):
    if args.message == "-":
        data = sys.stdin.buffer.read()
    else:
        data = args.message.encode("utf-8")
    try:
        delivered = await vm.publish(args.topic, data, timeout=args.timeout)
    except ValueError as exc:
        raise UsageError(str(exc))
    if args.json:
        _print_json({"delivered": delivered})
    else:
        print("delivered to %d subscriber%s" % (delivered, "" if delivered == 1 else "s"))
    return EXIT_OK


async def cmd_listen(vm, args):
    try:
        sub = vm.subscribe(args.topic)
    except ValueError as exc:
        raise UsageError(str(exc))
    count = 0
    async with sub:
        async for msg in sub:
            if args.json:
                obj = {"topic": msg.topic}
                obj.update(_text_fields("data", msg.data))
                _print_json(obj)
            else:
                out = sys.stdout.buffer
                out.write(msg.data if msg.data.endswith(b"\n") else msg.data + b"\n")
                out.flush()
            count += 1
            if args.count and count >= args.count:
                break
    return EXIT_OK


async def cmd_call(vm, args):
    try:
        result = await vm.call(args.op, args.call_args, timeout=args.timeout)
    except ValueError as exc:
        raise UsageError(str(exc))
    _print_json(result, pretty=not args.json)
    return EXIT_OK


async def cmd_shutdown(vm, args):
    await vm.shutdown(timeout=args.timeout)
    return EXIT_OK


async def cmd_reboot(vm, args):
    await vm.reboot(timeout=args.timeout)
    return EXIT_OK


def cmd_agent_bundle(args):
    from .bundle import write_bundle

    try:
        size = write_bundle(args.output)
    except OSError as exc:
        _fail("cannot write %s: %s" % (args.output, exc.strerror or exc))
        return EXIT_CANTCREAT
    sys.stderr.write("wrote %s (%d bytes)\n" % (args.output, size))
    return EXIT_OK


AGENT_SUBCOMMANDS = ("run", "send", "listen")


def run_agent(argv):
    """``guestlink agent ARGS``: ``guestlink.agent.cli.main(["run", *ARGS])``; ARGS that start with
    one of the agent's own subcommands (run, send, listen) are passed unchanged."""
    from .agent.cli import main as agent_main

    argv = list(argv)
    if not argv or argv[0] not in AGENT_SUBCOMMANDS:
        argv = ["run"] + argv
    return agent_main(argv)


# --- parser -----------------------------------------------------------------------------------

def _seconds(value, positive=False):
    """A --timeout-like option: a finite number of seconds up to the library's MAX_TIMEOUT (inf,
    nan and huge values are usage errors, not tracebacks or never-ending waits)."""
    from .host.client import MAX_TIMEOUT

    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % value)
    if not (0 < number if positive else 0 <= number) or not number <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError("must be a %snumber of seconds up to %d (about 24 days)"
                                         % ("positive " if positive else "", MAX_TIMEOUT))
    return number


def _positive(value):
    return _seconds(value, positive=True)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="guestlink",
        description="Messages, commands and files between a VM's host and its guest over "
                    "virtio-serial.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="guestlink " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    vm_opts = argparse.ArgumentParser(add_help=False)
    group = vm_opts.add_argument_group("VM")
    group.add_argument("--ctl", metavar="PATH",
                       help="the VM's control channel socket (default: $GUESTLINK_CTL)")
    group.add_argument("--data", metavar="PATH",
                       help="the VM's data channel socket (default: $GUESTLINK_DATA)")
    group.add_argument("--domain", metavar="DOMAIN",
                       help="a libvirt domain (name or UUID) instead of --ctl/--data "
                            "(default: $GUESTLINK_DOMAIN)")
    group.add_argument("--connect", metavar="URI", dest="libvirt_uri",
                       help="libvirt URI for --domain, as for virsh (default: "
                            "$LIBVIRT_DEFAULT_URI, else qemu:///system)")
    group.add_argument("--ctl-name", metavar="N",
                       help="the domain's control channel name (default: $GUESTLINK_CTL_NAME, else "
                            "the name in its guestlink metadata, else %s)" % CTL_NAME)
    group.add_argument("--data-name", metavar="N",
                       help="the domain's data channel name (default: $GUESTLINK_DATA_NAME, else "
                            "the name in its guestlink metadata, else %s)" % DATA_NAME)
    group.add_argument("--queue-timeout", type=_seconds, metavar="S",
                       help="a VM serves one guestlink command at a time: wait at most S seconds "
                            "for the one using it (default: until it finishes; 0: fail at once)")

    def domain_arg(p):
        p.add_argument("domain_arg", nargs="?", metavar="DOMAIN",
                       help="libvirt domain name or UUID (same as --domain)")
        return p

    def vm_command(name, help, timeout_help="seconds to connect and get an answer (default 10)",
                   json=True):
        p = sub.add_parser(name, help=help, description=help, parents=[vm_opts], epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if timeout_help:
            p.add_argument("--timeout", type=_positive, default=10.0, metavar="S", help=timeout_help)
        if json:
            p.add_argument("--json", action="store_true", help="print JSON")
        return p

    domain_arg(vm_command("ping", "check that the agent answers; print the round-trip time"))
    domain_arg(vm_command("info", "describe the guest (OS, kernel, addresses, agent)"))

    p = vm_command("exec", "run a command in the guest, streaming its output",
                   timeout_help="kill the command after S seconds (exit status 124)")
    p.set_defaults(timeout=None)
    p.add_argument("--connect-timeout", type=_positive, default=10.0, metavar="S",
                   help="seconds to connect and get the command started (default 10)")
    p.add_argument("--env", action="append", metavar="K=V", help="set an environment variable")
    p.add_argument("--cwd", metavar="DIR", help="working directory in the guest (default /)")
    p.add_argument("--shell", action="store_true",
                   help="run CMD... joined by spaces through /bin/sh -c")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("-i", "--stdin", dest="stdin_mode", action="store_const", const="always",
                      help="forward local stdin even when it is a terminal")
    mode.add_argument("-n", "--no-stdin", dest="stdin_mode", action="store_const", const="never",
                      help="do not forward local stdin (the command reads /dev/null)")
    p.set_defaults(stdin_mode="auto")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="[DOMAIN] -- CMD [ARG...]",
                   help="the command; local stdin is forwarded when it is not a terminal; one "
                        "word before -- names a libvirt domain (options go before it)")

    p = vm_command("send", "send a topic message to the guest's subscribers")
    p.add_argument("topic")
    p.add_argument("message", metavar="DATA|-", help="the message, or - to read it from stdin")

    p = vm_command("listen", "print the guest's messages on a topic",
                   timeout_help="seconds to connect (default 10)")
    p.add_argument("topic")
    p.add_argument("--count", type=int, default=0, metavar="N", help="exit after N messages")

    p = vm_command("call", "call a user-defined agent command; print its JSON result")
    p.add_argument("op")
    p.add_argument("--arg", action="append", metavar="K=V", help="a string argument")
    p.add_argument("--json-args", metavar="JSON", help="arguments as one JSON object")

    domain_arg(vm_command("shutdown", "power the guest off", json=False))
    domain_arg(vm_command("reboot", "reboot the guest", json=False))

    from . import cli_files
    cli_files.add_parsers(sub, vm_command)

    p = sub.add_parser("agent-bundle", help="write the guest agent as one executable file",
                       description="write the guest agent as one executable file (a zipapp "
                                   "needing only python3 >= 3.8 in the guest)")
    p.add_argument("-o", "--output", required=True, metavar="FILE")

    sub.add_parser("agent", help="run the guest agent (inside the guest): guestlink agent [ARGS]",
                   add_help=False)
    from .image import cli as image_cli

    image_cli.add_parser(sub)
    from . import libvirt_cli

    libvirt_cli.add_parsers(sub, EPILOG)
    from . import doctor

    doctor.add_parser(sub)
    return parser


COMMANDS = {
    "ping": cmd_ping, "info": cmd_info, "exec": cmd_exec, "send": cmd_send, "listen": cmd_listen,
    "call": cmd_call, "shutdown": cmd_shutdown, "reboot": cmd_reboot,
    "cp": lambda vm, args: _files().cmd_cp(vm, args, _print_json),
    "run": lambda vm, args: _files().cmd_run(vm, args, cmd_exec),
}


def _files():
    from . import cli_files
    return cli_files


def _check_args(args):
    """Refuse bad command lines before connecting (UsageError); normalise a few options."""
    if args.command in ("cp", "run"):
        _files().check_args(args, UsageError, _parse_pairs)
    if args.command == "exec" and "--" in args.argv[1:] and args.argv[0] != "--":
        if args.argv.index("--") != 1:
            raise UsageError("exec: only a libvirt domain may stand before --: guestlink exec "
                             "[OPTIONS] [DOMAIN] -- CMD [ARG...]")
        args.domain_arg, args.argv = args.argv[0], args.argv[1:]
    resolve_target(args)
    if args.command == "exec":
        command = list(args.argv)
        if command and command[0] == "--":
            command = command[1:]
        if not command:
            raise UsageError("exec needs a command: guestlink exec [OPTIONS] -- CMD [ARG...]")
        args.cmd = " ".join(command) if args.shell else command
        args.env_map = _parse_pairs(args.env, "--env") or None
    elif args.command == "call":
        call_args = {}
        if args.json_args:
            try:
                call_args = json.loads(args.json_args)
            except ValueError as exc:
                raise UsageError("--json-args is not valid JSON: %s" % exc)
            if not isinstance(call_args, dict):
                raise UsageError("--json-args must be a JSON object")
        call_args.update(_parse_pairs(args.arg, "--arg"))
        args.call_args = call_args


async def _run_vm_command(args):
    from .host import errors as E
    from .host.client import connect

    target = resolve_target(args)
    func = COMMANDS[args.command]
    connect_timeout = args.connect_timeout if args.command in ("exec", "run") else args.timeout
    # one-shot commands must not silently wait for a VM that went away; listen keeps listening
    reconnect = args.command == "listen"
    where = (dict(domain=target.domain, uri=target.uri, ctl_name=target.ctl_name,
                  data_name=target.data_name) if target.domain  # follows restarts
             else dict(ctl=target.ctl, data=target.data))
    try:
        async with connect(timeout=connect_timeout, reconnect=reconnect,
                           queue_timeout=args.queue_timeout, on_queue=_say_queued, **where) as vm:
            return await func(vm, args)
    except E.PermissionDenied as exc:
        if not target.domain:
            raise
        raise E.PermissionDenied(
            "%s (libvirt domain %s: libvirt made the socket for its qemu user; run as root, or "
            "attach the channels with --socket-dir DIR you can reach)" % (exc, target.domain),
            exc.path, exc.errno) from None


def _say_queued(holder):
    sys.stderr.write("guestlink: waiting for the VM: it is in use by %s\n" % printable(holder))
    sys.stderr.flush()


def _loop_error(loop, context):
    """asyncio's last resort (an exception no task awaited): one escaped line, no traceback."""
    from .agent.cli import debugging

    if debugging():
        loop.default_exception_handler(context)
        return
    exc = context.get("exception")
    what = "%s: %s" % (type(exc).__name__, exc) if exc is not None else context.get("message")
    sys.stderr.write("guestlink: warning: internal: %s\n" % printable(what))


async def _main_async(args):
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_loop_error)
    task = asyncio.current_task()
    interrupted = []

    def on_sigint():
        if interrupted:
            # a second Ctrl-C: the user will not wait for the clean-up (the guest confirming the
            # cancel, a transfer winding down); end now, whatever the event loop is doing
            os._exit(EXIT_INTERRUPTED)
        interrupted.append(True)
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


def main(argv=None):
    """The ``guestlink`` command: exit status per :data:`EXIT_CODES`; never a traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C outside a VM command's own handling (image, list, ...)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug, or guest data the library failed to turn into an error
        from .agent.cli import internal_error

        return internal_error("guestlink", exc)


def _main(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "agent":
        return run_agent(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "agent-bundle":
        return cmd_agent_bundle(args)
    if args.command == "doctor":
        from . import doctor

        return doctor.run(args)
    if args.command == "image":
        from .image import cli as image_cli

        return image_cli.run(args)
    from . import libvirt_cli

    if args.command in libvirt_cli.COMMANDS:
        return libvirt_cli.run(args)

    from .host import errors as E

    try:
        _check_args(args)
        return asyncio.run(_main_async(args))
    except UsageError as exc:
        _fail(str(exc))
        return EXIT_USAGE
    except E.GuestlinkError as exc:
        _fail(str(exc))
        return exit_code_for(exc, args.command)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # our stdout went away (e.g. piped into head): quiet, as other Unix tools are
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 128 + signal.SIGPIPE
    except OSError as exc:  # a local I/O failure (reading stdin, writing output)
        _fail(local_error(exc))
        return EXIT_IOERR


def local_error(exc):
    """One line for a local OSError, naming the file when there is one."""
    what = exc.strerror or str(exc)
    if exc.filename is not None and str(exc.filename) not in what:
        what = "%s: %s" % (exc.filename, what)
    return "local I/O error: %s" % what


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
