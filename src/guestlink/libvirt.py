"""libvirt integration: channel XML, attaching channels to domains, addressing VMs by domain name.

The one entry point other code needs is :func:`resolve_domain`::

    ctl, data = resolve_domain("vm1")                    # name or UUID; URI as virsh
    ctl, data = resolve_domain("vm1", "qemu:///system")

It reads the domain's *live* XML, finds the two ``<channel type='unix'>`` elements by their target
names and returns the socket paths libvirt reports (never constructed: their location moved between
libvirt versions). Failures raise a :class:`LibvirtError` subclass with a one-line message.

Channel names, each chosen on its own (:func:`choose_names`): the ones given (``ctl_name=``,
``data_name=``; the CLI's ``--ctl-name``/``--data-name`` or $GUESTLINK_CTL_NAME/$GUESTLINK_DATA_NAME),
else the ones recorded in the domain's ``<metadata>`` (``<guestlink:channels ctl=... data=.../>``,
written by ``guestlink libvirt attach`` and printed by ``guestlink libvirt xml`` for custom names),
else ``org.guestlink.ctl`` / ``org.guestlink.data``.

A domain's qemu-guest-agent channel (target name ``org.qemu.guest_agent.0``, :data:`QGA_NAME`)
is found the same way (:attr:`DomainXML.qga_channel`), and each backend runs agent commands
(``agent_command``: ``virsh qemu-agent-command`` / libvirt-python's ``qemuAgentCommand``) for
guestlink.host.qga's fallback; their failures are :class:`GuestAgentError` subclasses.

libvirt is reached through libvirt-python when it is importable, else through the ``virsh``
command (``dumpxml``, ``list``, ``attach-device``...). Only XML is parsed, never virsh's tables.
``GUESTLINK_LIBVIRT_BACKEND=python|virsh`` forces one.

This module is host-only and imported lazily (the guest agent never imports it).
"""

import os
import re
import shlex
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple,
                    Union, overload)

from .host.errors import ConnectError
from .protocol.ports import CTL_NAME, CTL_NAME_ENV, DATA_NAME, DATA_NAME_ENV, names_given
from .protocol.safetext import printable

#: namespace of guestlink's element in a domain's <metadata>. Never change it: domains defined
#: with it must keep working (a new layout gets a new URI, read alongside this one).
METADATA_URI = "https://guestlink.invalid/xmlns/1"
#: the prefix libvirt gives that namespace (virsh metadata --key)
METADATA_KEY = "guestlink"
METADATA_TAG = "{%s}channels" % METADATA_URI
DEFAULT_PORTS = 16
#: user alias marking the virtio-serial controller that ``attach`` added (``detach`` removes only it)
CONTROLLER_ALIAS = "ua-guestlink-vser"
FALLBACK_URI = "qemu:///system"
#: the channel name qemu-guest-agent listens on (libvirt's and every distribution's default)
QGA_NAME = "org.qemu.guest_agent.0"
#: guestlink's default libvirt URI, before $LIBVIRT_DEFAULT_URI.
URI_ENV = "GUESTLINK_URI"
#: longest AF_UNIX path (sun_path is 108 bytes, NUL-terminated)
MAX_SOCKET_PATH = 107

ET.register_namespace(METADATA_KEY, METADATA_URI)  # serialise as guestlink:, not ns0:


# --- errors (each one line; the CLI maps them to exit codes) ---------------------------------

class LibvirtError(ConnectError):
    """Base: the VM could not be located through libvirt. A ConnectError, so a reconnecting client
    keeps retrying (e.g. while the domain restarts)."""


class LibvirtUnavailable(LibvirtError):
    """libvirt cannot be reached (no libvirt-python and no virsh, or the daemon does not answer)."""


class LibvirtPermissionDenied(LibvirtError):
    """libvirt refused access (authentication or ACL)."""


class DomainNotFound(LibvirtError):
    """No domain of that name or UUID."""


class DomainNotRunning(LibvirtError):
    """The domain exists but is not running (its channel sockets do not exist)."""


class NoChannels(LibvirtError):
    """The domain has no guestlink channels (or they are not unix sockets)."""


class AttachError(LibvirtError):
    """libvirt refused to add or remove a device."""


class GuestAgentError(LibvirtError):
    """libvirt could not run a qemu-guest-agent command."""


class GuestAgentNotConfigured(GuestAgentError):
    """The domain has no qemu-ga channel, or libvirt has not connected to it."""


class GuestAgentNotResponding(GuestAgentError):
    """libvirt reached the channel but qemu-ga did not answer in time."""


class GuestAgentCommandFailed(GuestAgentError):
    """qemu-ga answered with an error; ``desc`` is its text (from the guest: untrusted)."""

    def __init__(self, message: str, desc: str) -> None:
        GuestAgentError.__init__(self, message)
        self.desc = desc


_AGENT_FAILED = re.compile(r"unable to execute QEMU agent command '[^']*': (.*)$", re.S)


def agent_error(message: str, domain: str, unresponsive: bool = False,
                unconfigured: bool = False) -> Optional[GuestAgentError]:
    """The GuestAgentError for libvirt's error text about an agent command, or None."""
    low = message.lower()
    if unconfigured or "agent is not configured" in low or "agent is not connected" in low:
        return GuestAgentNotConfigured("libvirt domain %s: qemu-guest-agent is not available: %s"
                                       % (domain, message))
    if unresponsive or "agent is not responding" in low or "agent not responding" in low:
        return GuestAgentNotResponding("qemu-guest-agent of libvirt domain %s is not responding"
                                       % domain)
    m = _AGENT_FAILED.search(message)
    if m:
        return GuestAgentCommandFailed("qemu-ga: %s" % m.group(1), m.group(1))
    return None


def default_uri(uri: Optional[str] = None) -> str:
    """``uri``, else $GUESTLINK_URI, else $LIBVIRT_DEFAULT_URI, else ``qemu:///system`` (as virsh
    does, with guestlink's own variable first)."""
    return (uri or os.environ.get(URI_ENV) or os.environ.get("LIBVIRT_DEFAULT_URI")
            or FALLBACK_URI)


# --- XML generation ----------------------------------------------------------------------------

def controller_element(index: int = 0, ports: int = DEFAULT_PORTS,
                       alias: Optional[str] = None) -> ET.Element:
    el = ET.Element("controller", type="virtio-serial", index=str(index), ports=str(ports))
    if alias:
        ET.SubElement(el, "alias", name=alias)
    return el


def channel_element(name: str, port: int, controller: int = 0,
                    path: Optional[str] = None) -> ET.Element:
    """``<channel type='unix'>`` for virtio-serial port ``port`` (>= 1) named ``name``; without
    ``path`` libvirt picks the socket's place (``<source mode='bind'/>``)."""
    if port < 1:
        raise ValueError("virtio-serial port 0 is reserved for a console; ports start at 1")
    el = ET.Element("channel", type="unix")
    src = ET.SubElement(el, "source", mode="bind")
    if path:
        src.set("path", path)
    ET.SubElement(el, "target", type="virtio", name=name)
    ET.SubElement(el, "address", type="virtio-serial", controller=str(controller), bus="0",
                  port=str(port))
    return el


def to_string(el: ET.Element, indent: str = "") -> str:
    """``el`` as indented XML text (libvirt's single-quote style), each line prefixed by ``indent``."""
    el = ET.fromstring(ET.tostring(el))
    ET.indent(el, space="  ")
    el.tail = None
    text = ET.tostring(el, encoding="unicode")
    text = re.sub(r'(\s[\w:-]+)="([^"\']*)"', r"\1='\2'", text)  # libvirt's style
    text = text.replace(" />", "/>")
    return "\n".join(indent + line for line in text.splitlines())


def _socket_path(socket_dir: str, name: str) -> str:
    path = os.path.join(os.path.abspath(socket_dir), name)
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise ValueError("socket path %s is longer than %d bytes (AF_UNIX limit): use a shorter "
                         "--socket-dir" % (path, MAX_SOCKET_PATH))
    return path


def _check_names(ctl_name: str, data_name: str) -> None:
    for n in (ctl_name, data_name):
        # C0 controls and DEL: XML cannot carry most of them (the domain XML would not parse)
        if (not n or any(c.isspace() or c in "'\"<>&/" or c < " " or c == "\x7f" for c in n)
                or len(n) > 255):
            raise ValueError("invalid virtio-serial port name %r" % (n,))
    if ctl_name == data_name:
        raise ValueError("the control and data channels need different names")


def channel_elements(ctl_name: str = CTL_NAME, data_name: str = DATA_NAME,
                     socket_dir: Optional[str] = None, ports: int = DEFAULT_PORTS, index: int = 0,
                     alias: Optional[str] = None) -> List[ET.Element]:
    """[controller, ctl channel, data channel] elements, the channels on ports 1 and 2."""
    _check_names(ctl_name, data_name)
    if not 3 <= ports <= 31:
        raise ValueError("--ports must be between 3 and 31 (port 0 is a console's, 1 and 2 ours)")
    paths = [_socket_path(socket_dir, n) if socket_dir else None for n in (ctl_name, data_name)]
    return [controller_element(index, ports, alias),
            channel_element(ctl_name, 1, index, paths[0]),
            channel_element(data_name, 2, index, paths[1])]


def metadata_element(ctl_name: str, data_name: str, namespaced: bool = True) -> ET.Element:
    """guestlink's record of a domain's channel names, for its ``<metadata>``. libvirt's metadata
    API takes the element without namespace (it adds METADATA_URI with prefix METADATA_KEY)."""
    return ET.Element(METADATA_TAG if namespaced else "channels", ctl=ctl_name, data=data_name)


def channels_xml(ctl_name: str = CTL_NAME, data_name: str = DATA_NAME,
                 socket_dir: Optional[str] = None, ports: int = DEFAULT_PORTS, index: int = 0,
                 indent: str = "") -> str:
    """The text ``guestlink libvirt xml`` prints: paste it into the domain's ``<devices>``.

    With other names than the defaults it also holds, after a comment, a ``<metadata>`` element for
    the domain (directly under ``<domain>``) recording them, so that addressing the domain by name
    finds these channels without --ctl-name/--data-name."""
    els = channel_elements(ctl_name, data_name, socket_dir, ports, index)
    text = "\n".join(to_string(el, indent) for el in els) + "\n"
    if (ctl_name, data_name) == (CTL_NAME, DATA_NAME):
        return text  # the defaults need no record: the output stays one paste into <devices>
    # by hand: ElementTree would declare the namespace on <metadata>, and the line alone (to paste
    # into an existing <metadata>) must carry it
    record = to_string(metadata_element(ctl_name, data_name), indent + "  ")
    return (indent + "<!-- into the domain's <devices> (virsh edit DOMAIN): -->\n" + text + indent
            + "<!-- into the domain: directly under <domain> (if it has a <metadata> already, put "
              "the guestlink:channels line into it); it tells guestlink these channel names: -->\n"
            + indent + "<metadata>\n" + record + "\n" + indent + "</metadata>\n")


# --- XML parsing -------------------------------------------------------------------------------

@dataclass
class Channel:
    name: str
    type: Optional[str]            # the channel's type attribute ("unix" for ours)
    path: Optional[str]            # socket path (live XML: where libvirt placed it)
    state: Optional[str]           # "connected" / "disconnected" (live XML only), else None
    controller: Optional[int]
    port: Optional[int]
    element: Optional[ET.Element] = field(repr=False, compare=False, default=None)


@dataclass
class DomainXML:
    name: str
    uuid: str
    id: Optional[int]              # set only in the XML of a running domain
    channels: Dict[str, Channel]   # virtio channels by target name
    #: virtio-serial controllers: index -> (ports, alias)
    controllers: Dict[int, Tuple[int, Optional[str]]]
    used_ports: Dict[int, Set[int]]  # virtio-serial controller index -> port numbers taken
    root: Optional[ET.Element] = field(repr=False, compare=False, default=None)
    #: (ctl, data) names from guestlink's <metadata> element; None where it names none
    recorded: Tuple[Optional[str], Optional[str]] = (None, None)

    @property
    def running(self) -> bool:
        return self.id is not None and self.id >= 0

    @property
    def qga_channel(self) -> Optional[Channel]:
        """The qemu-guest-agent channel (target name :data:`QGA_NAME`), if the domain has one.
        Its ``state`` (live XML) is ``connected`` while qemu-ga has the port open."""
        return self.channels.get(QGA_NAME)


@overload
def _int(value: Any, default: int) -> int: ...
@overload
def _int(value: Any, default: None = None) -> Optional[int]: ...
def _int(value: Any, default: Optional[int] = None) -> Optional[int]:
    try:
        return int(value, 0) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        return default


def parse_domain_xml(text: str) -> DomainXML:
    """Parse a domain's XML (``virsh dumpxml``) into a :class:`DomainXML`."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise LibvirtError("libvirt returned malformed domain XML: %s" % exc)
    if root.tag != "domain":
        raise LibvirtError("libvirt returned XML that is not a domain (<%s>)" % root.tag)
    devices = root.find("devices")
    channels: Dict[str, Channel] = {}
    controllers: Dict[int, Tuple[int, Optional[str]]] = {}
    used: Dict[int, Set[int]] = {}
    if devices is not None:
        for ctl in devices.findall("controller"):
            if ctl.get("type") == "virtio-serial":
                index = _int(ctl.get("index"), 0)
                alias = ctl.find("alias")
                controllers[index] = (_int(ctl.get("ports"), 31),
                                      alias.get("name") if alias is not None else None)
                used.setdefault(index, set())
        for dev in devices:
            addr = dev.find("address")
            if addr is not None and addr.get("type") == "virtio-serial":
                index = _int(addr.get("controller"), 0)
                port = _int(addr.get("port"))
                if port is not None:
                    used.setdefault(index, set()).add(port)
        for ch in devices.findall("channel"):
            target = ch.find("target")
            target_name = target.get("name") if target is not None else None
            if target is None or target.get("type") != "virtio" or not target_name:
                continue
            src = ch.find("source")
            addr = ch.find("address")
            controller = port = None
            if addr is not None and addr.get("type") == "virtio-serial":
                controller, port = _int(addr.get("controller"), 0), _int(addr.get("port"))
            channels.setdefault(target_name, Channel(
                name=target_name, type=ch.get("type"),
                path=src.get("path") if src is not None else None, state=target.get("state"),
                controller=controller, port=port, element=ch))
    dom_id = _int(root.get("id"))
    return DomainXML(name=root.findtext("name", ""), uuid=root.findtext("uuid", ""), id=dom_id,
                     channels=channels, controllers=controllers, used_ports=used, root=root,
                     recorded=_recorded_names(root))


def _recorded_names(root: ET.Element) -> Tuple[Optional[str], Optional[str]]:
    record = root.find("metadata/" + METADATA_TAG)
    if record is None:
        return None, None
    return record.get("ctl") or None, record.get("data") or None


# --- which channel names ------------------------------------------------------------------------

GIVEN, RECORDED, DEFAULT = "given", "recorded in the domain's metadata", "the default"


class ChannelNames(NamedTuple):
    ctl: str
    data: str
    ctl_source: str     # GIVEN, RECORDED or DEFAULT
    data_source: str

    def describe(self) -> str:
        """'ctl X and data Y (SOURCE)', each name escaped: a domain's metadata supplies them."""
        if self.ctl_source == self.data_source:
            return "ctl %s and data %s (%s)" % (printable(self.ctl), printable(self.data),
                                                 self.ctl_source)
        return "ctl %s (%s) and data %s (%s)" % (printable(self.ctl), self.ctl_source,
                                                 printable(self.data), self.data_source)


def names_from_env(ctl_name: Optional[str] = None, data_name: Optional[str] = None,
                   environ: Optional[Mapping[str, str]] = None
                   ) -> Tuple[Optional[str], Optional[str]]:
    """The names given on a command line, else $GUESTLINK_CTL_NAME / $GUESTLINK_DATA_NAME; None
    where neither says (then the domain's metadata, then the defaults decide)."""
    return names_given(ctl_name, data_name, os.environ if environ is None else environ)


def choose_names(dom: Optional[DomainXML], ctl_name: Optional[str] = None,
                 data_name: Optional[str] = None) -> ChannelNames:
    """Each channel's name: the one given, else the one recorded in ``dom``'s metadata, else the
    default."""
    recorded = dom.recorded if dom is not None else (None, None)
    chosen = []
    for given, rec, default in ((ctl_name, recorded[0], CTL_NAME),
                                (data_name, recorded[1], DATA_NAME)):
        chosen.append((given, GIVEN) if given else (rec, RECORDED) if rec else (default, DEFAULT))
    return ChannelNames(chosen[0][0], chosen[1][0], chosen[0][1], chosen[1][1])


def attach_hint(domain: str, ctl_name: str = CTL_NAME, data_name: str = DATA_NAME) -> str:
    """The command that adds the channels to ``domain`` (names spelt out unless the defaults)."""
    names = ""
    if (ctl_name, data_name) != (CTL_NAME, DATA_NAME):
        names = " --ctl-name %s --data-name %s" % (shlex.quote(ctl_name), shlex.quote(data_name))
    return "guestlink libvirt attach %s%s --config (then restart the domain)" % (
        shlex.quote(domain), names)


def find_sockets(dom: DomainXML, ctl_name: Optional[str] = None,
                 data_name: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """(ctl_path, data_path or None) from a running domain's live XML, or raise.

    The names: as :func:`choose_names` (given, else recorded in the domain, else the defaults)."""
    name = printable(dom.name)
    if not dom.running:
        raise DomainNotRunning("libvirt domain %s is not running (start it: virsh start %s)"
                               % (name, printable(shlex.quote(dom.name))))
    names = choose_names(dom, ctl_name, data_name)
    ctl = dom.channels.get(names.ctl)
    if ctl is None:
        raise NoChannels(no_channel_message(dom, names))
    if ctl.type != "unix" or not ctl.path:
        raise NoChannels("libvirt domain %s: channel %s is not a unix socket (type %s); guestlink "
                         "needs <channel type='unix'> (see guestlink libvirt xml)"
                         % (name, printable(names.ctl), printable(repr(ctl.type))))
    data = dom.channels.get(names.data)
    data_path = data.path if data is not None and data.type == "unix" and data.path else None
    return ctl.path, data_path


def no_channel_message(dom: DomainXML, names: ChannelNames) -> str:
    """One line: the domain lacks the control channel; what was looked for, what it has, the fix."""
    have = ", ".join(printable(n) for n in dom.channels) or "none"
    text = ("libvirt domain %s has no guestlink channel %s (looked for %s; its virtio channels: "
            "%s); add them with: %s" % (printable(dom.name), printable(names.ctl), names.describe(),
                                        have, printable(attach_hint(dom.name, names.ctl,
                                                                    names.data))))
    if dom.channels:
        text += ", or name the ones it has with --ctl-name/--data-name"
    return text


# --- attach / detach plans (pure: XML in, device XML out) --------------------------------------

def plan_attach(dom: DomainXML, ctl_name: str = CTL_NAME, data_name: str = DATA_NAME,
                socket_dir: Optional[str] = None, ports: int = DEFAULT_PORTS) -> List[ET.Element]:
    """Device elements to add so that ``dom`` has both channels; [] if it already has them.

    Missing channels go on free ports (>= 1) of an existing virtio-serial controller; when none has
    room, a controller of our own (alias ``ua-guestlink-vser``) is added at the next free index."""
    _check_names(ctl_name, data_name)
    missing = [n for n in (ctl_name, data_name) if n not in dom.channels]
    if not missing:
        return []
    out: List[ET.Element] = []
    slot: Optional[Tuple[int, List[int]]] = None
    for index in sorted(dom.controllers):
        nports = dom.controllers[index][0]
        free = [p for p in range(1, nports) if p not in dom.used_ports.get(index, ())]
        if len(free) >= len(missing):
            slot = (index, free)
            break
    if slot is None:
        taken = set(dom.controllers) | set(dom.used_ports)
        index = max(taken) + 1 if taken else 0
        out.append(controller_element(index, ports, CONTROLLER_ALIAS))
        slot = (index, list(range(1, ports)))
    index, free = slot
    for name, port in zip(missing, free):
        path = _socket_path(socket_dir, name) if socket_dir else None
        out.append(channel_element(name, port, index, path))
    return out


def plan_detach(dom: DomainXML, ctl_name: str = CTL_NAME,
                data_name: str = DATA_NAME) -> List[ET.Element]:
    """Device elements to remove: our channels, and our controller if nothing else is on it."""
    out: List[ET.Element] = []
    removed: Set[Tuple[int, int]] = set()
    for name in (ctl_name, data_name):
        ch = dom.channels.get(name)
        if ch is not None:
            assert ch.element is not None  # parse_domain_xml keeps every channel's element
            out.append(_device_copy(ch.element))
            if ch.controller is not None and ch.port is not None:
                removed.add((ch.controller, ch.port))
    for index, (nports, alias) in sorted(dom.controllers.items()):
        if alias != CONTROLLER_ALIAS:
            continue
        others = {p for p in dom.used_ports.get(index, ()) if (index, p) not in removed}
        if not others:
            el = controller_element(index, nports, alias)
            out.append(el)
    return out


def _device_copy(el: ET.Element) -> ET.Element:
    """A channel element as libvirt wants it for detach (without live-only attributes)."""
    copy = ET.fromstring(ET.tostring(el))
    for sub in copy.iter():
        if sub.tag == "target":
            sub.attrib.pop("state", None)
    for alias in copy.findall("alias"):
        copy.remove(alias)
    copy.tail = None
    return copy


# --- backends ----------------------------------------------------------------------------------

_UUID = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")


class _Backend:
    """``uri``: the URI as given (messages name it); ``connect_uri``: the one libvirt is opened
    with (for an ssh URI, through the forwarded remote libvirt socket: guestlink.host.remote);
    ``hop``: that ssh hop, which also forwards the domain's channel sockets."""

    name = "?"

    def __init__(self, uri: Optional[str]) -> None:
        self.uri = default_uri(uri)
        self.connect_uri = self.uri
        self.hop: Any = None
        from .host import remote

        if remote.is_ssh_uri(self.uri):
            try:
                self.hop = remote.SshHop.parse(self.uri)
            except ValueError as exc:
                raise LibvirtUnavailable(str(exc)) from None
            self.connect_uri = self.hop.libvirt_uri()


class VirshBackend(_Backend):
    """Talks to libvirt through the ``virsh`` command (libvirt-clients)."""

    name = "virsh"

    def __init__(self, uri: Optional[str], virsh: str = "virsh") -> None:
        _Backend.__init__(self, uri)
        found = shutil.which(virsh)
        if not found:
            raise LibvirtUnavailable("neither libvirt-python nor virsh is installed (install "
                                     "libvirt-clients, or python3-libvirt)")
        self.virsh = found

    def _run(self, *args: str, domain: Optional[str] = None, timeout: float = 60) -> str:
        cmd = [self.virsh, "-q", "-c", self.connect_uri] + list(args)
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LibvirtUnavailable("libvirt at %s did not answer within %d s (virsh %s)"
                                     % (self.uri, timeout, args[0]))
        except OSError as exc:
            raise LibvirtUnavailable("cannot run virsh: %s" % (exc.strerror or exc))
        if r.returncode != 0:
            raise self._error(r.stderr.decode("utf-8", "replace"), domain)
        return r.stdout.decode("utf-8", "replace")

    def _error(self, stderr: str, domain: Optional[str]) -> LibvirtError:
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        text = " ".join(lines)
        low = text.lower()
        detail = lines[-1] if lines else "virsh failed"
        if detail.startswith("error: "):
            detail = detail[len("error: "):]
        if "domain not found" in low or "failed to get domain" in low:
            return DomainNotFound("no libvirt domain %r at %s" % (domain, self.uri))
        if "failed to connect to the hypervisor" in low or "failed to connect socket" in low:
            if "permission denied" in low:
                return LibvirtPermissionDenied("permission denied connecting to libvirt at %s: %s"
                                               % (self.uri, detail))
            return LibvirtUnavailable("libvirt is not reachable at %s: %s" % (self.uri, detail))
        if ("authentication" in low or "access denied" in low or "permission denied" in low
                or "read-only" in low):
            return LibvirtPermissionDenied("libvirt at %s refused access: %s" % (self.uri, detail))
        return LibvirtError("libvirt (%s): %s" % (self.uri, detail))

    def dumpxml(self, domain: str, inactive: bool = False) -> str:
        args = ["dumpxml", "--domain", domain] + (["--inactive"] if inactive else [])
        return self._run(*args, domain=domain)

    def list_uuids(self) -> List[str]:
        out = self._run("list", "--all", "--uuid")
        return [ln.strip() for ln in out.splitlines() if ln.strip()]

    def state(self, domain: str) -> str:
        return self._run("domstate", "--domain", domain, domain=domain).strip()

    def _change(self, domain: str, live: bool, config: bool, *args: str) -> None:
        flags = (["--live"] if live else []) + (["--config"] if config else [])
        try:
            self._run(*args, *flags, domain=domain)
        except (DomainNotFound, LibvirtUnavailable, LibvirtPermissionDenied):
            raise
        except LibvirtError as exc:
            raise AttachError(str(exc))

    def _device(self, verb: str, domain: str, xml: str, live: bool, config: bool) -> None:
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".xml", prefix="guestlink-") as f:
            f.write(xml)
            f.flush()
            self._change(domain, live, config, verb, "--domain", domain, "--file", f.name)

    def attach(self, domain: str, xml: str, live: bool, config: bool) -> None:
        self._device("attach-device", domain, xml, live, config)

    def detach(self, domain: str, xml: str, live: bool, config: bool) -> None:
        self._device("detach-device", domain, xml, live, config)

    def agent_command(self, domain: str, command: str, timeout: Optional[int]) -> str:
        """``virsh qemu-agent-command``: qemu-ga's reply as libvirt returns it (JSON text).
        ``timeout``: seconds for the agent (None: libvirt's default)."""
        args = ["qemu-agent-command", "--domain", domain]
        args += ["--timeout", str(timeout)] if timeout is not None else []
        try:
            return self._run(*args, command, domain=domain,
                             timeout=(timeout or 30) + 30)
        except (DomainNotFound, LibvirtUnavailable, LibvirtPermissionDenied):
            raise
        except LibvirtError as exc:
            raise agent_error(str(exc), domain) or exc

    def set_metadata(self, domain: str, xml: Optional[str], live: bool, config: bool) -> None:
        """Replace guestlink's <metadata> element (``xml`` without namespace); None removes it."""
        what = ["--set", xml, "--key", METADATA_KEY] if xml is not None else ["--remove"]
        self._change(domain, live, config, "metadata", "--domain", domain, "--uri", METADATA_URI,
                     *what)


class PythonBackend(_Backend):
    """Talks to libvirt through libvirt-python (``import libvirt``)."""

    name = "libvirt-python"

    def __init__(self, uri: Optional[str], module: Any = None) -> None:
        _Backend.__init__(self, uri)
        if module is None:
            import importlib

            module = importlib.import_module("libvirt")
        self.lv = module
        try:  # libvirt-python prints every error on stderr by default; we report them ourselves
            module.registerErrorHandler(lambda _ctx, _err: None, None)
        except AttributeError:
            pass
        self._conn: Any = None  # a virConnect once opened

    def _error(self, exc: Any, domain: Optional[str] = None) -> LibvirtError:
        lv = self.lv
        code = exc.get_error_code()
        msg = exc.get_error_message() or str(exc)
        if code == lv.VIR_ERR_NO_DOMAIN:
            return DomainNotFound("no libvirt domain %r at %s" % (domain, self.uri))
        if code in (lv.VIR_ERR_AUTH_FAILED, lv.VIR_ERR_ACCESS_DENIED,
                    getattr(lv, "VIR_ERR_AUTH_CANCELLED", -1)):
            return LibvirtPermissionDenied("libvirt at %s refused access: %s" % (self.uri, msg))
        if code in (lv.VIR_ERR_NO_CONNECT, lv.VIR_ERR_SYSTEM_ERROR, lv.VIR_ERR_RPC):
            return LibvirtUnavailable("libvirt is not reachable at %s: %s" % (self.uri, msg))
        return LibvirtError("libvirt (%s): %s" % (self.uri, msg))

    def conn(self) -> Any:
        if self._conn is None:
            try:
                self._conn = self.lv.open(self.connect_uri)
            except self.lv.libvirtError as exc:
                err = self._error(exc)
                if type(err) is LibvirtError:
                    err = LibvirtUnavailable("libvirt is not reachable at %s: %s"
                                             % (self.uri, exc.get_error_message() or exc))
                raise err from None
        return self._conn

    def _lookup(self, domain: str) -> Any:
        conn = self.conn()
        try:
            return conn.lookupByName(domain)
        except self.lv.libvirtError as exc:
            if exc.get_error_code() != self.lv.VIR_ERR_NO_DOMAIN:
                raise self._error(exc, domain) from None
        if not _UUID.match(domain):
            raise DomainNotFound("no libvirt domain %r at %s" % (domain, self.uri))
        try:
            return conn.lookupByUUIDString(domain)
        except self.lv.libvirtError:
            raise DomainNotFound("no libvirt domain %r at %s" % (domain, self.uri)) from None

    def dumpxml(self, domain: str, inactive: bool = False) -> str:
        dom = self._lookup(domain)
        try:
            return dom.XMLDesc(self.lv.VIR_DOMAIN_XML_INACTIVE if inactive else 0)
        except self.lv.libvirtError as exc:
            raise self._error(exc, domain) from None

    def list_uuids(self) -> List[str]:
        try:
            return [d.UUIDString() for d in self.conn().listAllDomains(0)]
        except self.lv.libvirtError as exc:
            raise self._error(exc) from None

    def state(self, domain: str) -> str:
        names = {1: "running", 2: "idle", 3: "paused", 4: "in shutdown", 5: "shut off",
                 6: "crashed", 7: "pmsuspended"}
        try:
            st = self._lookup(domain).state()[0]
        except self.lv.libvirtError as exc:
            raise self._error(exc, domain) from None
        return names.get(st, "no state")

    def _change(self, domain: str, live: bool, config: bool,
                call: Callable[[Any, int], object]) -> None:
        """``call(virDomain, flags)``, its errors mapped as a device change's."""
        lv = self.lv
        flags = (lv.VIR_DOMAIN_AFFECT_LIVE if live else 0) | (
            lv.VIR_DOMAIN_AFFECT_CONFIG if config else 0)
        dom = self._lookup(domain)
        try:
            call(dom, flags)
        except lv.libvirtError as exc:
            err = self._error(exc, domain)
            raise (AttachError(str(err)) if type(err) is LibvirtError else err) from None

    def _device(self, verb: str, domain: str, xml: str, live: bool, config: bool) -> None:
        self._change(domain, live, config, lambda dom, flags: getattr(dom, verb)(xml, flags))

    def attach(self, domain: str, xml: str, live: bool, config: bool) -> None:
        self._device("attachDeviceFlags", domain, xml, live, config)

    def detach(self, domain: str, xml: str, live: bool, config: bool) -> None:
        self._device("detachDeviceFlags", domain, xml, live, config)

    def agent_command(self, domain: str, command: str, timeout: Optional[int]) -> str:
        """libvirt_qemu.qemuAgentCommand: qemu-ga's reply (JSON text). ``timeout``: seconds
        (None: libvirt's default)."""
        import importlib

        lv = self.lv
        try:
            qemu = importlib.import_module("libvirt_qemu")
        except ImportError:
            raise LibvirtUnavailable("libvirt-python has no libvirt_qemu module (agent commands "
                                     "need it)") from None
        dom = self._lookup(domain)
        seconds = timeout if timeout is not None else getattr(
            qemu, "VIR_DOMAIN_QEMU_AGENT_COMMAND_DEFAULT", -1)
        try:
            reply = qemu.qemuAgentCommand(dom, command, seconds, 0)
        except lv.libvirtError as exc:
            code = exc.get_error_code()
            msg = exc.get_error_message() or str(exc)
            err = agent_error(
                msg, domain,
                unresponsive=code == getattr(lv, "VIR_ERR_AGENT_UNRESPONSIVE", -1),
                unconfigured=code == getattr(lv, "VIR_ERR_AGENT_UNSYNCED", -1))
            raise (err or self._error(exc, domain)) from None
        if not isinstance(reply, str):
            raise LibvirtError("libvirt returned a non-text agent reply")
        return reply

    def set_metadata(self, domain: str, xml: Optional[str], live: bool, config: bool) -> None:
        """Replace guestlink's <metadata> element (``xml`` without namespace); None removes it."""
        key = METADATA_KEY if xml is not None else None
        self._change(domain, live, config, lambda dom, flags: dom.setMetadata(
            self.lv.VIR_DOMAIN_METADATA_ELEMENT, xml, key, METADATA_URI, flags))


Backend = Union[VirshBackend, PythonBackend]


def backend(uri: Optional[str] = None) -> "Backend":
    """The backend for ``uri``: libvirt-python if importable, else virsh
    ($GUESTLINK_LIBVIRT_BACKEND=python|virsh forces one)."""
    forced = os.environ.get("GUESTLINK_LIBVIRT_BACKEND", "").strip().lower()
    if forced not in ("", "python", "virsh", "libvirt-python"):
        raise LibvirtUnavailable("GUESTLINK_LIBVIRT_BACKEND must be python or virsh, not %r" % forced)
    if forced != "virsh":
        try:
            return PythonBackend(uri)
        except ImportError:
            if forced:
                raise LibvirtUnavailable("GUESTLINK_LIBVIRT_BACKEND=python but libvirt-python is "
                                         "not importable") from None
    return VirshBackend(uri)


# --- the resolver ----------------------------------------------------------------------------

def resolve_domain(name: str, uri: Optional[str] = None, ctl_name: Optional[str] = None,
                   data_name: Optional[str] = None, *,
                   backend_: Optional["Backend"] = None) -> Tuple[str, Optional[str]]:
    """(ctl_path, data_path) of a running libvirt domain, by name or UUID, from its live XML.

    Channel names: ``ctl_name``/``data_name`` when given, else the ones recorded in the domain's
    metadata, else the defaults (:func:`choose_names`). ``data_path`` is None when the domain has
    only the control channel. Raises DomainNotFound, DomainNotRunning, NoChannels,
    LibvirtUnavailable or LibvirtPermissionDenied (all :class:`LibvirtError`, a ConnectError)."""
    if not name:
        raise ValueError("resolve_domain() needs a domain name or UUID")
    be = backend_ or backend(uri)
    dom = parse_domain_xml(be.dumpxml(name))
    ctl, data = find_sockets(dom, ctl_name, data_name)
    if be.hop is not None:  # paths on the remote hypervisor: forwarded over ssh
        return be.hop.channel_sockets(ctl, data)
    return ctl, data


def resolver(name: str, uri: Optional[str] = None, ctl_name: Optional[str] = None,
             data_name: Optional[str] = None) -> Callable[[], Tuple[str, Optional[str]]]:
    """A zero-argument callable returning (ctl, data) afresh for ``name``; the host client calls it
    before every (re)connection, so it follows the domain across restarts (new socket paths)."""
    def resolve() -> Tuple[str, Optional[str]]:
        return resolve_domain(name, uri, ctl_name, data_name)
    resolve.domain = name  # type: ignore[attr-defined]  # which domain, for a caller's messages
    return resolve


# --- attach / detach / list ------------------------------------------------------------------

def _affected(be: "Backend", domain: str, live: bool,
              config: bool) -> Tuple[List[Tuple[str, bool]], bool]:
    """Which XMLs to change: [(label, inactive?)] and whether live was implied. Without flags: the
    persistent config, plus the running domain when it runs."""
    running = parse_domain_xml(be.dumpxml(domain)).running
    implied = not live and not config
    if implied:
        live, config = running, True
    if live and not running:
        raise DomainNotRunning("libvirt domain %s is not running: --live needs a running domain"
                               % domain)
    out = []
    if config:
        out.append(("config", True))
    if live:
        out.append(("live", False))
    return out, implied


def _recorded_pair(dom: DomainXML) -> Tuple[str, str]:
    """The names guestlink's metadata in ``dom`` leads to (a name it lacks: the default)."""
    return dom.recorded[0] or CTL_NAME, dom.recorded[1] or DATA_NAME


def _metadata_change(dom: DomainXML, names: Tuple[str, str],
                     attaching: bool) -> Optional[Tuple[Optional[str], str]]:
    """What to do to guestlink's metadata in ``dom``: (xml, description) to set (``xml``) or remove
    (None) it, or None to leave it. Attaching records names that the metadata and defaults do not
    already lead to; detaching removes a record of exactly the names detached."""
    has_record = dom.recorded != (None, None)
    if attaching:
        if _recorded_pair(dom) == names:
            return None
        el = metadata_element(names[0], names[1], namespaced=False)
        return to_string(el), "metadata %s:channels ctl=%s data=%s" % (METADATA_KEY, *names)
    if has_record and _recorded_pair(dom) == names:
        return None, "metadata %s:channels" % METADATA_KEY
    return None


def _first_names(be: "Backend", domain: str, targets: Sequence[Tuple[str, bool]],
                 ctl_name: Optional[str], data_name: Optional[str]) -> Tuple[str, str]:
    """The names for attach/detach, chosen once from the first XML changed (the persistent config
    when it is), so that config and live get the same pair."""
    dom = parse_domain_xml(be.dumpxml(domain, inactive=targets[0][1]))
    names = choose_names(dom, ctl_name, data_name)
    return names.ctl, names.data


def attach(domain: str, uri: Optional[str] = None, *, live: bool = False, config: bool = False,
           ctl_name: Optional[str] = None, data_name: Optional[str] = None,
           socket_dir: Optional[str] = None, ports: int = DEFAULT_PORTS,
           backend_: Optional["Backend"] = None) -> Dict[str, List[str]]:
    """Add the controller/channels to ``domain`` where missing, and record their names in its
    metadata unless the defaults are theirs. Idempotent.

    Names: ``ctl_name``/``data_name``, else those recorded in the domain, else the defaults.
    Returns {"config"|"live": [what was added] ([] = already there), "notes": [str],
    "names": [ctl, data]}. libvirt cannot hot-plug a virtio-serial controller: a running domain
    without one gets the channels at its next start (an error with an explicit ``live=True``, a
    note otherwise)."""
    be = backend_ or backend(uri)
    result: Dict[str, List[str]] = {"notes": []}
    targets, implied = _affected(be, domain, live, config)
    names = _first_names(be, domain, targets, ctl_name, data_name)
    result["names"] = list(names)
    for label, inactive in targets:
        dom = parse_domain_xml(be.dumpxml(domain, inactive=inactive))
        plan = plan_attach(dom, names[0], names[1], socket_dir, ports)
        if not inactive and any(el.tag == "controller" for el in plan):
            msg = ("libvirt cannot hot-plug a virtio-serial controller into the running domain %s"
                   % domain)
            if not implied:
                raise AttachError(msg + ": use --config, then shut the domain down and start it")
            result["notes"].append(msg + "; the channels appear after it is shut down and started "
                                         "again (a guest reboot is not enough)")
            continue
        added = []
        for el in plan:
            be.attach(domain, to_string(el), live=not inactive, config=inactive)
            added.append(_describe(el))
        change = _metadata_change(dom, names, attaching=True)
        if change is not None:
            be.set_metadata(domain, change[0], live=not inactive, config=inactive)
            added.append(change[1])
        result[label] = added
    return result


def detach(domain: str, uri: Optional[str] = None, *, live: bool = False, config: bool = False,
           ctl_name: Optional[str] = None, data_name: Optional[str] = None,
           backend_: Optional["Backend"] = None) -> Dict[str, List[str]]:
    """Remove the channels (and the controller ``attach`` added, if nothing else uses it), and
    guestlink's metadata when it records these names. Names as for :func:`attach`."""
    be = backend_ or backend(uri)
    result: Dict[str, List[str]] = {"notes": []}
    targets, _ = _affected(be, domain, live, config)
    names = _first_names(be, domain, targets, ctl_name, data_name)
    result["names"] = list(names)
    for label, inactive in targets:
        dom = parse_domain_xml(be.dumpxml(domain, inactive=inactive))
        removed = []
        for el in plan_detach(dom, names[0], names[1]):
            if el.tag == "controller" and not inactive:
                continue  # libvirt cannot hot-unplug a virtio-serial controller; --config does it
            be.detach(domain, to_string(el), live=not inactive, config=inactive)
            removed.append(_describe(el))
        change = _metadata_change(dom, names, attaching=False)
        if change is not None:
            be.set_metadata(domain, change[0], live=not inactive, config=inactive)
            removed.append(change[1])
        result[label] = removed
    return result


def _describe(el: ET.Element) -> str:
    if el.tag == "controller":
        return "controller virtio-serial index %s" % el.get("index")
    target = el.find("target")
    addr = el.find("address")
    return "channel %s (controller %s port %s)" % (
        target.get("name") if target is not None else "?",
        addr.get("controller") if addr is not None else "?",
        addr.get("port") if addr is not None else "?")


@dataclass
class DomainEntry:
    """One row of ``guestlink list``."""

    name: str
    uuid: str
    id: Optional[int]
    state: str
    ctl: Optional[Channel]
    data: Optional[Channel]
    names: ChannelNames            # the channel names looked for in this domain


def list_domains(uri: Optional[str] = None, ctl_name: Optional[str] = None,
                 data_name: Optional[str] = None, *,
                 backend_: Optional["Backend"] = None) -> List[DomainEntry]:
    """Every domain (running first, by id; then the others by name) with its guestlink channels
    (names per domain as :func:`choose_names`)."""
    be = backend_ or backend(uri)
    rows = []
    for uuid in be.list_uuids():
        try:
            dom = parse_domain_xml(be.dumpxml(uuid))
            state = be.state(uuid)
        except DomainNotFound:  # undefined meanwhile
            continue
        names = choose_names(dom, ctl_name, data_name)
        rows.append(DomainEntry(name=dom.name, uuid=dom.uuid, id=dom.id if dom.running else None,
                                state=state, ctl=dom.channels.get(names.ctl),
                                data=dom.channels.get(names.data), names=names))
    rows.sort(key=lambda r: (r.id is None, r.id or 0, r.name))
    return rows


__all__ = ["CTL_NAME", "DATA_NAME", "CTL_NAME_ENV", "DATA_NAME_ENV", "METADATA_URI",
           "ChannelNames", "choose_names", "names_from_env", "metadata_element", "LibvirtError",
           "LibvirtUnavailable", "LibvirtPermissionDenied",
           "DomainNotFound", "DomainNotRunning", "NoChannels", "AttachError", "default_uri",
           "channels_xml", "channel_elements", "parse_domain_xml", "find_sockets", "plan_attach",
           "plan_detach", "backend", "resolve_domain", "resolver", "attach", "detach",
           "list_domains", "DomainEntry"]
