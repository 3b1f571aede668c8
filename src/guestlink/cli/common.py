"""What every command group of the CLI shares: the one exit path (:func:`exit_code_for`,
:func:`fail`), VM addressing (:func:`resolve_target` and its options), argument types, JSON
output and the progress bar. Imports nothing of the command groups (they import this)."""

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, Iterable, Optional, TextIO, Union

from .. import exitcodes as X
from ..protocol.frames import Value
from ..protocol.ports import CTL_NAME, CTL_NAME_ENV, DATA_NAME, DATA_NAME_ENV, names_given
from ..protocol.safetext import printable

ENVIRONMENT = """\
environment:
  GUESTLINK_CTL, GUESTLINK_DATA   defaults for --ctl and --data
  GUESTLINK_DOMAIN                default libvirt domain (when no --ctl/$GUESTLINK_CTL)
  GUESTLINK_CTL_NAME, GUESTLINK_DATA_NAME
                                  defaults for --ctl-name and --data-name (a domain's
                                  channel names; else its guestlink metadata, else
                                  %s and %s)
  GUESTLINK_QGA                   default for --qga (a plain QEMU VM's qemu-ga socket)
  GUESTLINK_URI, LIBVIRT_DEFAULT_URI
                                  default for -c/--connect, in this order (else
                                  qemu:///system); qemu+ssh://[USER@]HOST[:PORT]/system
                                  reaches a remote hypervisor through ssh
  GUESTLINK_SSH_CONFIG            an ssh_config file for those ssh hops (ssh -F)
  GUESTLINK_MASTER=0              never use a guestlink master (docs/master.md)
  GUESTLINK_PERSIST               default for --persist
  GUESTLINK_DEBUG=1               an internal error prints its traceback too
""" % (CTL_NAME, DATA_NAME)

#: The help epilog of the top-level command, the VM commands, libvirt and list.
EPILOG = X.help_text(X.VM) + "\n" + ENVIRONMENT


class UsageError(Exception):
    """A command line refused before anything is done (exit 2)."""


# --- the one exit path ------------------------------------------------------------------------

def exit_code_for(exc: BaseException, command: Optional[str] = None) -> int:
    """The exit status for an error (one table, first match wins)."""
    from .. import libvirt as LV
    from ..host import errors as E
    from ..image.errors import ImageError

    if command == "exec":
        if isinstance(exc, E.RemoteNotFound):
            return X.EXIT_NOT_FOUND
        if isinstance(exc, E.RemotePermissionDenied):
            return X.EXIT_CANNOT_RUN
    if isinstance(exc, ImageError):
        return exc.exit_code
    table = [
        (UsageError, X.EXIT_USAGE),
        (LV.DomainNotFound, X.EXIT_NOHOST),
        (LV.NoChannels, X.EXIT_CONFIG),
        (LV.LibvirtPermissionDenied, X.EXIT_NOPERM),
        (LV.AttachError, X.EXIT_SOFTWARE),
        (LV.LibvirtError, X.EXIT_UNAVAILABLE),
        (E.PermissionDenied, X.EXIT_NOPERM),
        (E.VMInUse, X.EXIT_TEMPFAIL),
        (E.ConnectError, X.EXIT_UNAVAILABLE),
        (E.AgentNotResponding, X.EXIT_TEMPFAIL),
        (E.RequestTimeout, X.EXIT_TEMPFAIL),
        (E.ProtocolError, X.EXIT_PROTOCOL),
        (E.ConnectionLost, X.EXIT_IOERR),
        (E.RequestNotSent, X.EXIT_IOERR),
        (E.CommandDenied, X.EXIT_NOPERM),
        (E.RemotePermissionDenied, X.EXIT_NOPERM),
        (E.RemoteError, X.EXIT_SOFTWARE),
        (E.GuestlinkError, X.EXIT_SOFTWARE),
        (OSError, X.EXIT_IOERR),  # a local I/O failure (reading stdin, writing output)
        (ValueError, X.EXIT_USAGE),  # an argument the library refused (libvirt, list)
    ]
    for cls, code in table:
        if isinstance(exc, cls):
            return code
    return X.EXIT_SOFTWARE


def error_message(exc: BaseException) -> str:
    """The one line saying what went wrong (unescaped: :func:`fail` escapes)."""
    from ..host.errors import GuestlinkError

    if isinstance(exc, OSError) and not isinstance(exc, GuestlinkError):
        return local_error(exc)
    return str(exc)


def fail(message: str) -> None:
    """The one error-printing path: messages quote the guest (error texts, names), so they are
    escaped; one line, always."""
    sys.stderr.write("guestlink: error: %s\n" % printable(message))


def exit_for(exc: BaseException, command: Optional[str] = None) -> int:
    """The one exit path for an expected error: print its one line, return its exit status."""
    fail(error_message(exc))
    return exit_code_for(exc, command)


def local_error(exc: OSError) -> str:
    """One line for a local OSError, naming the file when there is one."""
    what = exc.strerror or str(exc)
    if exc.filename is not None and str(exc.filename) not in what:
        what = "%s: %s" % (exc.filename, what)
    return "local I/O error: %s" % what


# --- VM addressing ----------------------------------------------------------------------------

class Target(Value):
    """How to reach one VM's channels (a :class:`~guestlink.protocol.frames.Value`: immutable,
    compared by its fields)."""

    __slots__ = ("ctl", "data", "domain", "uri", "ctl_name", "data_name", "qga")
    ctl: Optional[str]         # None: only qemu-ga is to be used (--via qga), or a domain
    data: Optional[str]        # without guestlink channels (--via auto tries its qemu-ga)
    domain: Optional[str]      # the libvirt domain the paths were read from
    uri: Optional[str]         # its libvirt URI (--connect; None: the default)
    # the domain's channel names as given (--ctl-name/$GUESTLINK_CTL_NAME...); None: its metadata's,
    # else the defaults (guestlink.libvirt.choose_names), read again on every reconnection
    ctl_name: Optional[str]
    data_name: Optional[str]
    qga: Optional[str]         # a plain QEMU VM's qemu-ga socket (--qga, $GUESTLINK_QGA)

    def __init__(self, ctl: Optional[str], data: Optional[str] = None,
                 domain: Optional[str] = None, uri: Optional[str] = None,
                 ctl_name: Optional[str] = None, data_name: Optional[str] = None,
                 qga: Optional[str] = None) -> None:
        self._init(ctl, data, domain, uri, ctl_name, data_name, qga)


def resolve_target(args: argparse.Namespace, domain: Optional[str] = None,
                   lookup: bool = True) -> Target:
    """Turn the VM-addressing options into a Target.

    A libvirt domain (``guestlink COMMAND DOMAIN``, ``--domain``, or ``domain=`` from a ``VM:PATH``
    argument; URI from ``--connect``) is resolved through its live XML
    (:func:`guestlink.libvirt.resolve_domain`); else ``--ctl``/``--data``, else
    $GUESTLINK_CTL/$GUESTLINK_DATA, else $GUESTLINK_DOMAIN. A domain's channel names: as given
    (``--ctl-name``/``--data-name``, else $GUESTLINK_CTL_NAME/$GUESTLINK_DATA_NAME), else recorded
    in its metadata, else the defaults. With ``--via auto`` a domain without guestlink channels,
    and with ``--via qga`` any domain, gives ``ctl=None``: its qemu-ga is reached through
    libvirt. For plain QEMU, ``--qga PATH`` or $GUESTLINK_QGA is qemu-ga's socket.
    ``lookup=False``: a domain is not looked up (``ctl`` is empty; the guestlink master resolves
    it), everything else is checked as usual.
    """
    uri = getattr(args, "libvirt_uri", None)
    via = getattr(args, "via", "guestlink")
    ctl, data = getattr(args, "ctl", None), getattr(args, "data", None)
    given_names = getattr(args, "ctl_name", None) or getattr(args, "data_name", None)
    if domain is None:
        named = {d for d in (getattr(args, "domain", None), getattr(args, "domain_arg", None)) if d}
        if len(named) > 1:
            raise UsageError("two libvirt domains given: %s" % " and ".join(sorted(named)))
        domain = named.pop() if named else None
    if domain and (ctl or data):
        raise UsageError("give either a libvirt domain or --ctl/--data, not both")
    qga = getattr(args, "qga", None)
    if domain and qga:
        raise UsageError("--qga is a plain QEMU VM's qemu-ga socket; a libvirt domain's qemu-ga is "
                         "reached through libvirt")
    if not domain and not ctl and not os.environ.get("GUESTLINK_CTL"):
        domain = os.environ.get("GUESTLINK_DOMAIN") or None
    if domain and not lookup:  # the guestlink master looks the domain up (and caches it)
        given = names_given(getattr(args, "ctl_name", None), getattr(args, "data_name", None),
                            os.environ)
        return Target(ctl="", domain=domain, uri=uri, ctl_name=given[0], data_name=given[1])
    if domain:
        cache = args.__dict__.setdefault("_libvirt_targets", {})
        if (domain, uri) not in cache:
            from .. import libvirt

            names = libvirt.names_from_env(getattr(args, "ctl_name", None),
                                           getattr(args, "data_name", None))
            c: Optional[str] = None
            d: Optional[str] = None
            if via != "qga":
                try:
                    c, d = libvirt.resolve_domain(domain, uri, *names)
                except libvirt.NoChannels:
                    if via != "auto":
                        raise
            cache[(domain, uri)] = Target(ctl=c, data=d, domain=domain, uri=uri, ctl_name=names[0],
                                          data_name=names[1])
        target: Target = cache[(domain, uri)]
        return target
    if given_names:
        raise UsageError("--ctl-name/--data-name name a libvirt domain's channels: give a domain, "
                         "not --ctl/--data")
    ctl = ctl or os.environ.get("GUESTLINK_CTL")
    data = data or os.environ.get("GUESTLINK_DATA") or None
    if via == "guestlink":
        qga = None
    else:
        qga = qga or os.environ.get("GUESTLINK_QGA") or None
    if via == "qga":
        if not qga:
            raise UsageError("--via qga needs a libvirt domain, or --qga PATH (or GUESTLINK_QGA): "
                             "the qemu-ga socket of a plain QEMU VM")
        ctl = data = None
    if not ctl and not qga:
        raise UsageError("no VM given: name a libvirt domain (guestlink COMMAND DOMAIN or "
                         "--domain DOMAIN) or use --ctl PATH (or set GUESTLINK_CTL)")
    return Target(ctl=ctl, data=data, qga=qga)


# --- argument types and parsers ---------------------------------------------------------------

def seconds(value: str, positive: bool = False) -> float:
    """A --timeout-like option: a finite number of seconds up to the library's MAX_TIMEOUT (inf,
    nan and huge values are usage errors, not tracebacks or never-ending waits)."""
    from ..host.timing import MAX_TIMEOUT

    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % value)
    if not (0 < number if positive else 0 <= number) or not number <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError("must be a %snumber of seconds up to %d (about 24 days)"
                                         % ("positive " if positive else "", MAX_TIMEOUT))
    return number


def positive_seconds(value: str) -> float:
    return seconds(value, positive=True)


def parse_pairs(pairs: Optional[Iterable[str]], what: str) -> Dict[str, str]:
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError("%s must be KEY=VALUE, not %r" % (what, pair))
        out[key] = value
    return out


def add_connect(p: Union[argparse.ArgumentParser, "argparse._ArgumentGroup"], what: str,
                *flags: str) -> None:
    """``--connect URI`` (and ``flags``, e.g. ``-c``): the libvirt URI."""
    p.add_argument(*flags, "--connect", metavar="URI", dest="libvirt_uri",
                   help="%s, as for virsh; qemu+ssh://[USER@]HOST[:PORT]/system goes through ssh "
                        "(default: $GUESTLINK_URI, else $LIBVIRT_DEFAULT_URI, else qemu:///system)"
                        % what)


def add_channel_names(p: Union[argparse.ArgumentParser, "argparse._ArgumentGroup"],
                      recorded: bool = True) -> None:
    """``--ctl-name``/``--data-name``: a domain's channel names (``recorded``: else the names its
    guestlink metadata records), else the defaults."""
    where = "the name in its guestlink metadata, else " if recorded else ""
    for option, env, default, which in (("--ctl-name", CTL_NAME_ENV, CTL_NAME, "control"),
                                        ("--data-name", DATA_NAME_ENV, DATA_NAME, "data")):
        p.add_argument(option, metavar="N", help="the domain's %s channel name (default: $%s, else "
                       "%s%s)" % (which, env, where, default))


def vm_options() -> argparse.ArgumentParser:
    """The VM-addressing options, a parent parser of every VM command."""
    vm_opts = argparse.ArgumentParser(add_help=False)
    group = vm_opts.add_argument_group("VM")
    group.add_argument("--ctl", metavar="PATH",
                       help="the VM's control channel socket (default: $GUESTLINK_CTL)")
    group.add_argument("--data", metavar="PATH",
                       help="the VM's data channel socket (default: $GUESTLINK_DATA)")
    group.add_argument("--domain", metavar="DOMAIN",
                       help="a libvirt domain (name or UUID) instead of --ctl/--data "
                            "(default: $GUESTLINK_DOMAIN)")
    add_connect(group, "libvirt URI for --domain", "-c")
    add_channel_names(group)
    group.add_argument("--queue-timeout", type=seconds, metavar="S",
                       help="a VM serves one connection at a time (the master's, or one "
                            "command's without a master): wait at most S seconds for the one "
                            "using it (default: until it finishes; 0: fail at once)")
    group.add_argument("--persist", type=persist_duration, default=None, metavar="DURATION",
                       help="go through this user's guestlink master, starting one that stays "
                            "DURATION after its last client (default $GUESTLINK_PERSIST, else "
                            "60s; 0: only use one already running; $GUESTLINK_MASTER=0: never)")
    return vm_opts


def add_via(p: argparse.ArgumentParser) -> None:
    """``--via`` and ``--qga``: which agent a command uses (guestlink.host.qga, the fallback)."""
    group = p.add_argument_group("agent")
    group.add_argument("--via", choices=("auto", "guestlink", "qga"), default="auto",
                       help="guestlink's agent, qemu-guest-agent (slow; no streaming, output "
                            "capped at 16 MiB), or auto (default): guestlink's when it answers, "
                            "else qemu-ga")
    group.add_argument("--qga", metavar="PATH",
                       help="a plain QEMU VM's qemu-ga socket (org.qemu.guest_agent.0), for the "
                            "fallback (default: $GUESTLINK_QGA; a libvirt domain's is found "
                            "through libvirt)")


def qga_notice(client: Any, target: "Target") -> None:
    """The one stderr line saying that the slow path is in use, and how to leave it."""
    from ..libvirt import NoChannels

    reason = getattr(client, "fallback_reason", None)
    if isinstance(reason, NoChannels):
        reason = "libvirt domain %s has no guestlink channels" % target.domain
    why = ("guestlink's agent is not available: %s; " % reason) if reason is not None else ""
    if target.domain:
        enroll = "guestlink enroll %s" % target.domain
    else:  # plain QEMU: the guestlink ports must be on QEMU's command line already
        import shlex

        enroll = "guestlink enroll --qga %s --ctl %s --data %s" % (
            shlex.quote(target.qga or ""), shlex.quote(target.ctl or "CTL.sock"),
            shlex.quote(target.data or "DATA.sock"))
    sys.stderr.write("guestlink: note: %susing qemu-guest-agent (slow, output capped, no "
                     "streaming); install guestlink's agent with: %s\n"
                     % (printable(why), printable(enroll)))
    sys.stderr.flush()


def persist_duration(value: str) -> float:
    """--persist: 60, 60s, 5m, 1h, 0."""
    from ..host.mastersock import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


class VMParsers:
    """Adds VM commands to the top-level subparsers, each with the VM options and the epilog."""

    def __init__(self, sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
                 only: Optional[str] = None) -> None:
        self.sub = sub
        self.parent = vm_options()
        #: parse one command line: only this command's parser is built (see :meth:`wants`)
        self.only = only

    def wants(self, name: str) -> bool:
        """Whether this parse needs command ``name``'s parser (every one unless ``only``)."""
        return self.only is None or name == self.only

    def add(self, name: str, help: str,
            timeout_help: Optional[str] = "seconds to connect and get an answer (default 10)",
            json: bool = True, via: bool = False) -> argparse.ArgumentParser:
        """``via``: the command also works through qemu-guest-agent (--via, --qga)."""
        p = self.sub.add_parser(name, help=help, description=help, parents=[self.parent],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        if via:
            add_via(p)
        else:
            p.set_defaults(via="guestlink", qga=None)
        if timeout_help:
            p.add_argument("--timeout", type=positive_seconds, default=10.0, metavar="S",
                           help=timeout_help)
        if json:
            p.add_argument("--json", action="store_true", help="print JSON")
        return p


def domain_arg(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The optional positional DOMAIN of the VM commands that take no other positional."""
    p.add_argument("domain_arg", nargs="?", metavar="DOMAIN",
                   help="libvirt domain name or UUID (same as --domain)")
    return p


# --- output -----------------------------------------------------------------------------------

def text_fields(name: str, data: bytes) -> Dict[str, str]:
    """JSON-friendly bytes: UTF-8 text (with replacement); plus NAME_base64 if not valid UTF-8."""
    try:
        return {name: data.decode("utf-8")}
    except UnicodeDecodeError:
        import base64  # only here: not on a one-shot command's path

        return {name: data.decode("utf-8", "replace"),
                name + "_base64": base64.b64encode(data).decode("ascii")}


def print_json(obj: Any, pretty: bool = False) -> None:
    sys.stdout.write(json.dumps(obj, indent=2 if pretty else None, sort_keys=True) + "\n")
    sys.stdout.flush()


class ProgressBar:
    """A one-line progress bar on stderr (only used on a terminal)."""

    def __init__(self, label: str, stream: Optional[TextIO] = None) -> None:
        self.label = printable(label)  # drawn with our own escapes: the label's must not act
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.shown = False

    def __call__(self, done: int, total: Optional[int]) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = done / elapsed
        if total:
            pct = 100.0 * done / total
            eta = (total - done) / rate if rate > 0 else 0
            width = 24
            fill = int(width * done / total)
            line = "%s [%s%s] %5.1f%% %s/%s %6.1f MB/s ETA %d:%02d" % (
                self.label[-30:], "#" * fill, "." * (width - fill), pct, human_size(done),
                human_size(total), rate / 1e6, eta // 60, eta % 60)
        else:
            line = "%s %s %6.1f MB/s" % (self.label[-30:], human_size(done), rate / 1e6)
        self.stream.write("\r" + line[:120] + "\033[K")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
    raise AssertionError("unreachable")

