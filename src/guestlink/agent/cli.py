"""``guestlink-agent``: a thin argparse front end (run / send / listen / install / remove / status).

``install``, ``remove`` and ``status`` run the installer of ``guestlink image``
(guestlink.image.tree, bundled into the zipapp) on the running guest's own root: the same files,
the same manifest, the same undo. ``guestlink enroll`` runs them through qemu-guest-agent; in the
guest, ``python3 guestlink-agent.pyz install --start`` does the same by hand. They print the
installer's result (``--json``: one JSON object; an error as ``{"error", "exit_code"}``).

Exit codes: 0 ok; 1 error; 2 the agent is not running (its socket is missing or refuses);
3 no host is connected; 64 usage error; install/remove/status: the exit status of
``guestlink image`` (guestlink.exitcodes: 65 not a Linux root or a damaged manifest, 73 read-only or
full, 77 permission denied, ...); 70 internal error (a bug: one line, no traceback unless
GUESTLINK_DEBUG=1); 78 configuration error.
"""
import argparse
import base64
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from typing import Any, Dict, List, NoReturn, Optional, Sequence

from .. import _version
from ..protocol.safetext import printable
from . import client as _client
from .config import DEFAULT_CONFIG_PATH, LOG_LEVELS, Config, ConfigError, load_config

#: what a service command may print into the result (the rest is cut)
MAX_SERVICE_OUTPUT = 4096
SERVICE_TIMEOUT = 60.0

PROG = "guestlink-agent"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NO_AGENT = _client.EXIT_NO_AGENT
EXIT_NO_HOST = _client.EXIT_NO_HOST
EXIT_USAGE = 64
EXIT_INTERNAL = 70  # EX_SOFTWARE
EXIT_CONFIG = 78


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        sys.stderr.write("%s: error: %s\n" % (self.prog, message))
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="The guestlink guest agent: answers the host over "
                     "virtio-serial and relays topic messages for guest programs.")
    parser.add_argument("--version", action="version", version="%s %s" % (PROG, _version.__version__))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent (in the foreground)",
                         description="Run the agent in the foreground; logs go to stderr.")
    run.add_argument("--config", metavar="FILE",
                     help="INI config file (default %s; missing = defaults)" % DEFAULT_CONFIG_PATH)
    run.add_argument("--ctl-name", metavar="N", help="control port name (default org.guestlink.ctl)")
    run.add_argument("--data-name", metavar="N", help="data port name (default org.guestlink.data)")
    run.add_argument("--ctl-device", metavar="PATH",
                     help="control port device path instead of the lookup by name; "
                          "unix:PATH connects to a unix socket (development/tests)")
    run.add_argument("--socket", metavar="PATH", help="local socket (default /run/guestlink/agent.sock)")
    run.add_argument("--handlers-dir", metavar="DIR",
                     help="user handlers directory (default /etc/guestlink/handlers.d)")
    run.add_argument("--allow", metavar="OP,...", help="allowed op patterns (default *)")
    run.add_argument("--deny", metavar="OP,...", help="denied op patterns (deny wins)")
    run.add_argument("--log-level", choices=LOG_LEVELS, type=str.lower, help="default info")

    send = sub.add_parser("send", help="send a topic message to the host",
                          description="Send one topic message to the host through the running agent.")
    send.add_argument("topic", metavar="TOPIC")
    send.add_argument("data", metavar="DATA", nargs="?", default=None,
                      help="message text; - or omitted reads stdin")
    send.add_argument("--socket", metavar="PATH", help="the agent's local socket")
    send.add_argument("--wait", metavar="SECONDS", type=float, default=0.0,
                      help="wait up to SECONDS for a host to be connected (default: fail at once)")

    listen = sub.add_parser("listen", help="print topic messages from the host",
                            description="Subscribe to topics and print the host's messages.")
    listen.add_argument("topics", metavar="TOPIC", nargs="+")
    listen.add_argument("--count", metavar="N", type=int, default=0,
                        help="exit after N messages (default: run until interrupted)")
    listen.add_argument("--json", action="store_true",
                        help='one JSON object per line: {"topic", "data"} (or "data_base64" when '
                             'the data is not UTF-8)')
    listen.add_argument("--socket", metavar="PATH", help="the agent's local socket")

    inst = sub.add_parser("install", help="install or upgrade this agent in this guest",
                          description="Install (or upgrade in place) this zipapp as the guest's "
                                      "agent, started at boot: the files and manifest of "
                                      "`guestlink image install`.")
    inst.add_argument("--pyz", metavar="FILE",
                      help="the agent zipapp to install (default: the one running)")
    inst.add_argument("--sha256", metavar="HEX",
                      help="refuse unless the zipapp's SHA-256 is HEX (checked on the bytes read)")
    inst.add_argument("--init", metavar="KIND",
                      help="how it starts: systemd, sysv or rc.local (default: detected)")
    inst.add_argument("--ctl-name", metavar="N", help="control port name (default: kept, or "
                                                      "org.guestlink.ctl)")
    inst.add_argument("--data-name", metavar="N", help="data port name (default: kept, or "
                                                       "org.guestlink.data)")
    inst.add_argument("--start", action="store_true",
                      help="then start the agent now (restart it when something changed)")
    rem = sub.add_parser("remove", help="undo what install did",
                         description="Remove the agent installed by install or `guestlink image "
                                     "install`, restoring what it replaced.")
    rem.add_argument("--stop", action="store_true", help="stop the running agent first")
    stat_ = sub.add_parser("status", help="what install put in this guest",
                           description="Show the installed agent's version, files and config.")
    for p in (inst, rem, stat_):
        p.add_argument("--root", metavar="DIR", default="/",
                       help="the guest root directory (default /)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def debugging() -> bool:
    """GUESTLINK_DEBUG=1: internal errors show their tracebacks."""
    return os.environ.get("GUESTLINK_DEBUG", "") not in ("", "0")


def internal_error(prog: str, exc: BaseException) -> int:
    """The last resort of both CLIs (this one and the host's ``guestlink``): an unexpected
    exception becomes one escaped line and EXIT_INTERNAL, never a traceback on the operator's
    terminal (its text may come from the other side); GUESTLINK_DEBUG=1 adds the traceback."""
    if debugging():
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    summary = printable("%s: %s" % (type(exc).__name__, exc) if str(exc) else type(exc).__name__)
    if len(summary) > 300:
        summary = summary[:297] + "..."
    try:
        sys.stderr.write("%s: internal error: %s; please report it\n" % (prog, summary))
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # stderr is gone: the exit status still says it
    return EXIT_INTERNAL


def fail(message: str, code: int) -> int:
    sys.stderr.write("%s: %s\n" % (PROG, message))
    return code


def setup_logging(level: str) -> None:
    root = logging.getLogger("guestlink")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    root.propagate = False


def cmd_run(args: argparse.Namespace) -> int:
    overrides: Dict[str, Optional[str]] = {
        "ctl_name": args.ctl_name, "data_name": args.data_name, "ctl_device": args.ctl_device,
        "socket": args.socket, "handlers_dir": args.handlers_dir, "allow": args.allow,
        "deny": args.deny, "log_level": args.log_level,
    }
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        return fail(str(exc), EXIT_CONFIG)
    setup_logging(config.log_level)
    from .server import Agent  # imported here: send/listen stay light

    if config.config_path:
        logging.getLogger("guestlink.agent").info("configuration from %s", config.config_path)
    return Agent(config).run()


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    try:
        return load_config(None).socket
    except ConfigError:
        return Config().socket


def cmd_send(args: argparse.Namespace) -> int:
    from ..protocol.messages import MAX_MESSAGE_DATA, ProtocolViolation, check_topic

    try:
        check_topic(args.topic)
    except ProtocolViolation as exc:
        return fail(str(exc), EXIT_USAGE)
    if args.data is None or args.data == "-":
        raw = sys.stdin.buffer.read(MAX_MESSAGE_DATA + 1)
    else:
        raw = os.fsencode(args.data)
    if len(raw) > MAX_MESSAGE_DATA:
        return fail("message data exceeds the %d-byte limit" % MAX_MESSAGE_DATA, EXIT_USAGE)
    deadline = time.monotonic() + max(0.0, args.wait)
    try:
        with _client.AgentClient(_socket_path(args)) as c:
            while True:
                try:
                    c.send(args.topic, raw)
                    return EXIT_OK
                except _client.ClientError as exc:
                    if exc.exit_code != EXIT_NO_HOST or time.monotonic() >= deadline:
                        raise
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    except _client.ClientError as exc:
        if exc.exit_code == EXIT_NO_HOST:
            return fail("no host is connected", EXIT_NO_HOST)
        return fail(str(exc), exc.exit_code)


def cmd_listen(args: argparse.Namespace) -> int:
    from ..protocol.messages import ProtocolViolation, check_topic

    if args.count < 0:
        return fail("--count must be >= 0", EXIT_USAGE)
    try:
        for t in args.topics:
            check_topic(t)
    except ProtocolViolation as exc:
        return fail(str(exc), EXIT_USAGE)
    out = sys.stdout.buffer
    received = 0
    try:
        with _client.AgentClient(_socket_path(args)) as c:
            c.subscribe(args.topics)
            for topic, data in c.messages():
                if args.json:
                    obj = {"topic": topic}
                    try:
                        obj["data"] = data.decode("utf-8")
                    except UnicodeDecodeError:
                        obj["data_base64"] = base64.b64encode(data).decode("ascii")
                    out.write(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")
                else:
                    out.write(data if data.endswith(b"\n") else data + b"\n")
                out.flush()
                received += 1
                if args.count and received >= args.count:
                    return EXIT_OK
    except _client.ClientError as exc:
        return fail(str(exc), exc.exit_code)
    except BrokenPipeError:
        try:
            sys.stdout = None
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        except OSError:
            pass
        return EXIT_OK
    return EXIT_OK


def running_zipapp() -> Optional[str]:
    """The path of the zipapp this code runs from, or None (run from a source tree)."""
    archive = getattr(globals().get("__loader__"), "archive", None)
    return archive if isinstance(archive, str) else None


def _service(init: str, action: str, root: str) -> Dict[str, Any]:
    """Run the init system's start/restart/stop of the agent; {"command", "exit_code", "output"}.

    Only on the live root: for another root (an image mounted in the guest) nothing runs."""
    from ..image.tree import service_commands

    if os.path.realpath(root) != "/":
        return {"command": None, "exit_code": 0, "output": "not run: --root is not /"}
    out = b""
    argv: List[str] = []
    code = 0
    for argv in service_commands(init, action):
        try:
            # stdout/stderr to a pipe we read whole: the started agent's respawn loop redirects
            # its own, so it holds none of them (qemu-ga's guest-exec waits for both to close)
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=SERVICE_TIMEOUT)
            code, out = proc.returncode, out + proc.stdout
        except (OSError, subprocess.SubprocessError) as exc:
            code, out = 127, out + str(exc).encode()
        if code != 0:
            break
    text = out.decode("utf-8", "replace").strip()
    return {"command": argv, "exit_code": code, "output": text[-MAX_SERVICE_OUTPUT:]}


def _install_action(args: argparse.Namespace, inst: Any) -> Dict[str, Any]:
    import hashlib

    from ..exitcodes import EXIT_DATAERR, EXIT_NOINPUT
    from ..image.errors import ImageError
    from ..image.tree import MAX_FILE

    path = args.pyz or running_zipapp()
    if path is None:
        raise ImageError("not run from a zipapp: give --pyz FILE", EXIT_USAGE)
    try:
        with open(path, "rb") as f:
            pyz = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise ImageError("cannot read %s: %s" % (printable(path), exc.strerror), EXIT_NOINPUT)
    if len(pyz) > MAX_FILE:
        raise ImageError("%s is larger than %d bytes" % (printable(path), MAX_FILE), EXIT_DATAERR)
    digest = hashlib.sha256(pyz).hexdigest()
    if args.sha256 and digest != args.sha256.lower():
        raise ImageError("%s has SHA-256 %s, not %s: damaged in transit; nothing installed"
                         % (printable(path), digest, printable(args.sha256)), EXIT_DATAERR)
    result: Dict[str, Any] = inst.install(pyz, args.init, args.ctl_name, args.data_name)
    result["sha256"] = digest
    if args.start:
        action = "restart" if result["changed"] else "start"
        result["service"] = svc = _service(result["init"], action, args.root)
        if svc["exit_code"] != 0:
            raise ImageError("installed, but `%s` failed (exit %d): %s" % (
                " ".join(svc["command"]), svc["exit_code"], printable(svc["output"][-300:])))
    return result


def cmd_image(args: argparse.Namespace) -> int:
    """install / remove / status on the guest's own root, with the installer of guestlink.image."""
    from ..image.errors import ImageError
    from ..image.tree import Installer, Tree, read_manifest, status

    def log(line: str) -> None:
        sys.stderr.write("%s: %s\n" % (PROG, printable(line)))

    try:
        tree = Tree(args.root)
        inst = Installer(tree, log=log)
        if args.command == "install":
            result = _install_action(args, inst)
        elif args.command == "remove":
            stopped = None
            if args.stop:
                man = read_manifest(tree)
                if man is not None and man.get("init"):
                    stopped = _service(man["init"], "stop", args.root)
            result = inst.remove()
            result["service"] = stopped
        else:
            result = status(tree)
    except ImageError as exc:
        if args.json:
            sys.stdout.write(json.dumps({"error": str(exc), "exit_code": exc.exit_code}) + "\n")
        return fail(str(exc), exc.exit_code)
    if args.json:
        sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    elif args.command == "status":
        sys.stdout.write("%s\n" % ("guestlink agent %s installed (%s)" % (
            printable(result.get("agent_version")), printable(result.get("init")))
            if result["installed"] else "guestlink agent: not installed"))
    else:
        for note in result.get("notes", ()):
            log(note)
        sys.stdout.write(printable(result["summary"]) + "\n")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "send":
            return cmd_send(args)
        if args.command in ("install", "remove", "status"):
            return cmd_image(args)
        return cmd_listen(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return internal_error(PROG, exc)
