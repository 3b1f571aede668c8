"""``guestlink-agent``: a thin argparse front end (run / send / listen).

Exit codes: 0 ok; 1 error; 2 the agent is not running (its socket is missing or refuses);
3 no host is connected; 64 usage error; 70 internal error (a bug: one line, no traceback unless
GUESTLINK_DEBUG=1); 78 configuration error.
"""
import argparse
import base64
import json
import logging
import os
import sys
import time
import traceback
from typing import Dict, NoReturn, Optional, Sequence

from .. import _version
from ..protocol.safetext import printable
from . import client as _client
from .config import DEFAULT_CONFIG_PATH, LOG_LEVELS, Config, ConfigError, load_config

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
        return cmd_listen(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return internal_error(PROG, exc)
