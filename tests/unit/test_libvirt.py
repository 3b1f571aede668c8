"""guestlink.libvirt without a libvirtd: XML generation, live-XML parsing, attach/detach plans and
their idempotence, virsh error mapping, CLI addressing. (tests/vm/test_libvirt_e2e.py runs the same
code against a real libvirtd.)"""

import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from guestlink import cli
from guestlink import libvirt as L

DATA = Path(__file__).parent / "data"
LIVE = (DATA / "libvirt-live-domain.xml").read_text()


def domain(devices, running=True, name="vm1"):
    return ("<domain type='qemu'%s><name>%s</name><uuid>6f1c0d0e-0000-4000-8000-000000000001</uuid>"
            "<devices>%s</devices></domain>" % (" id='7'" if running else "", name, devices))


# --- XML generation -------------------------------------------------------------------------

def test_channels_xml_default():
    text = L.channels_xml()
    root = ET.fromstring("<devices>%s</devices>" % text)
    (ctrl,) = root.findall("controller")
    assert ctrl.attrib == {"type": "virtio-serial", "index": "0", "ports": "16"}
    chans = root.findall("channel")
    assert [c.get("type") for c in chans] == ["unix", "unix"]
    assert [c.find("target").get("name") for c in chans] == [L.CTL_NAME, L.DATA_NAME]
    assert [c.find("target").get("type") for c in chans] == ["virtio", "virtio"]
    assert [c.find("address").get("port") for c in chans] == ["1", "2"]  # never port 0
    assert {c.find("address").get("controller") for c in chans} == {"0"}
    for c in chans:  # libvirt places the socket
        assert c.find("source").attrib == {"mode": "bind"}
    assert "'" in text and '"' not in text  # libvirt's quoting style


def test_channels_xml_options(tmp_path):
    text = L.channels_xml("a.ctl", "a.data", socket_dir=str(tmp_path), ports=8, index=2)
    root = ET.fromstring("<devices>%s</devices>" % text)
    assert root.find("controller").get("ports") == "8"
    assert root.find("controller").get("index") == "2"
    paths = [c.find("source").get("path") for c in root.findall("channel")]
    assert paths == [str(tmp_path / "a.ctl"), str(tmp_path / "a.data")]
    assert {c.find("address").get("controller") for c in root.findall("channel")} == {"2"}


@pytest.mark.parametrize("kwargs, what", [
    (dict(ctl_name="same", data_name="same"), "different names"),
    (dict(ctl_name="bad name"), "invalid"),
    (dict(ctl_name="x'y"), "invalid"),
    (dict(ports=2), "between 3 and 31"),
    (dict(ports=32), "between 3 and 31"),
    (dict(socket_dir="/" + "d" * 120), "AF_UNIX"),
])
def test_channels_xml_refuses(kwargs, what):
    with pytest.raises(ValueError, match=what):
        L.channels_xml(**kwargs)


def test_channel_port_zero_refused():
    with pytest.raises(ValueError, match="reserved for a console"):
        L.channel_element("x", 0)


def test_cli_libvirt_xml(capsys, tmp_path):
    assert cli.main(["libvirt", "xml", "--socket-dir", str(tmp_path), "--ports", "4"]) == 0
    out = capsys.readouterr().out
    root = ET.fromstring("<devices>%s</devices>" % out)
    assert root.find("controller").get("ports") == "4"
    assert root.findall("channel")[0].find("source").get("path") == str(tmp_path / L.CTL_NAME)
    assert cli.main(["libvirt", "xml", "--ctl-name", "a", "--data-name", "a"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different names" in err


# --- parsing live XML ---------------------------------------------------------------------------

def test_parse_live_xml_sample():
    dom = L.parse_domain_xml(LIVE)
    assert dom.name == "gl-exp" and dom.running and dom.id == 4
    ctl = dom.channels[L.CTL_NAME]
    assert ctl.state == "connected" and (ctl.controller, ctl.port) == (0, 1)
    assert dom.channels[L.DATA_NAME].state == "disconnected"
    assert dom.controllers == {0: (16, "virtio-serial0")}
    assert L.find_sockets(dom) == (
        "/var/lib/libvirt/qemu/channel/target/domain-4-gl-exp/org.guestlink.ctl",
        "/var/lib/libvirt/qemu/channel/target/domain-4-gl-exp/org.guestlink.data")


def test_find_sockets_errors():
    chans = ("<channel type='unix'><source mode='bind' path='/s/ctl'/>"
             "<target type='virtio' name='org.guestlink.ctl'/></channel>")
    with pytest.raises(L.DomainNotRunning, match="not running"):
        L.find_sockets(L.parse_domain_xml(domain(chans, running=False)))
    with pytest.raises(L.NoChannels, match="guestlink libvirt attach vm1"):
        L.find_sockets(L.parse_domain_xml(domain("")))
    pty = ("<channel type='pty'><target type='virtio' name='org.guestlink.ctl'/></channel>")
    with pytest.raises(L.NoChannels, match="not a unix socket"):
        L.find_sockets(L.parse_domain_xml(domain(pty)))
    # ctl without data: data is None (file transfer will say so), ctl still usable
    assert L.find_sockets(L.parse_domain_xml(domain(chans))) == ("/s/ctl", None)


def test_parse_refuses_garbage():
    with pytest.raises(L.LibvirtError, match="malformed"):
        L.parse_domain_xml("<domain")
    with pytest.raises(L.LibvirtError, match="not a domain"):
        L.parse_domain_xml("<network/>")


# --- attach / detach plans ------------------------------------------------------------------------

QEMU_GA = ("<controller type='virtio-serial' index='0'/>"
           "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>"
           "<address type='virtio-serial' controller='0' bus='0' port='1'/></channel>")


def _addr(el):
    a = el.find("address")
    return int(a.get("controller")), int(a.get("port"))


def test_plan_attach_empty_domain():
    plan = L.plan_attach(L.parse_domain_xml(domain("")))
    assert [el.tag for el in plan] == ["controller", "channel", "channel"]
    assert plan[0].get("index") == "0" and plan[0].find("alias").get("name") == L.CONTROLLER_ALIAS
    assert [_addr(el) for el in plan[1:]] == [(0, 1), (0, 2)]


def test_plan_attach_reuses_existing_controller_free_ports():
    plan = L.plan_attach(L.parse_domain_xml(domain(QEMU_GA)))
    assert [el.tag for el in plan] == ["channel", "channel"]  # default controller has 31 ports
    assert [_addr(el) for el in plan] == [(0, 2), (0, 3)]


def test_plan_attach_full_controller_gets_a_new_one():
    full = QEMU_GA.replace("index='0'", "index='0' ports='3'") + (
        "<channel type='unix'><target type='virtio' name='other'/>"
        "<address type='virtio-serial' controller='0' bus='0' port='2'/></channel>")
    plan = L.plan_attach(L.parse_domain_xml(domain(full)))
    assert [el.tag for el in plan] == ["controller", "channel", "channel"]
    assert plan[0].get("index") == "1"
    assert [_addr(el) for el in plan[1:]] == [(1, 1), (1, 2)]


def test_plan_attach_only_missing_channel_and_complete_is_noop():
    assert L.plan_attach(L.parse_domain_xml(LIVE)) == []
    half = ("<controller type='virtio-serial' index='0' ports='16'/>"
            "<channel type='unix'><target type='virtio' name='org.guestlink.ctl'/>"
            "<address type='virtio-serial' controller='0' bus='0' port='1'/></channel>")
    plan = L.plan_attach(L.parse_domain_xml(domain(half)))
    assert [(el.tag, el.find("target").get("name")) for el in plan] == [("channel", L.DATA_NAME)]
    assert _addr(plan[0]) == (0, 2)


class FakeBackend:
    """A domain kept as XML, persistent config and (when running) live state apart: attach/detach
    edit them as libvirt would; a virtio-serial controller cannot be hot-plugged."""

    name = "fake"

    def __init__(self, xml, running=False):
        self.config = ET.fromstring(xml)
        self.live = ET.fromstring(xml) if running else None
        if running:
            self.live.set("id", "3")
        self.calls = []

    def dumpxml(self, dom, inactive=False):
        root = self.config if inactive or self.live is None else self.live
        return ET.tostring(root, encoding="unicode")

    def _roots(self, live, config):
        return [r for r, on in ((self.live, live), (self.config, config)) if on]

    def attach(self, dom, xml, live, config):
        self.calls.append(("attach", xml, live, config))
        el = ET.fromstring(xml)
        if live and el.tag == "controller":
            raise L.AttachError("'virtio-serial' controller cannot be hot plugged.")
        for root in self._roots(live, config):
            root.find("devices").append(ET.fromstring(xml))

    def detach(self, dom, xml, live, config):
        self.calls.append(("detach", xml, live, config))
        want = ET.fromstring(xml)
        for root in self._roots(live, config):
            devices = root.find("devices")
            for el in devices:
                if el.tag == want.tag and (
                        (el.tag == "channel" and el.find("target").get("name")
                         == want.find("target").get("name"))
                        or (el.tag == "controller" and el.get("index") == want.get("index")
                            and el.get("type") == want.get("type"))):
                    devices.remove(el)
                    break
            else:
                raise AssertionError("nothing matches %s" % xml)

    def set_metadata(self, dom, xml, live, config):
        """As virDomainSetMetadata: one element per namespace, replaced; xml None removes it."""
        self.calls.append(("metadata", xml, live, config))
        for root in self._roots(live, config):
            metadata = root.find("metadata")
            if metadata is None:
                metadata = ET.SubElement(root, "metadata")
            for old in metadata.findall(L.METADATA_TAG):
                metadata.remove(old)
            if xml is not None:
                el = ET.fromstring(xml)
                el.tag = "{%s}%s" % (L.METADATA_URI, el.tag)
                metadata.append(el)


def test_attach_is_idempotent_and_detach_undoes_it():
    be = FakeBackend(domain(QEMU_GA, running=False))
    first = L.attach("vm1", config=True, backend_=be)
    assert len(first["config"]) == 2 and all(c[3] and not c[2] for c in be.calls)
    n = len(be.calls)
    second = L.attach("vm1", config=True, backend_=be)
    assert second["config"] == [] and len(be.calls) == n  # nothing changed
    dom = L.parse_domain_xml(be.dumpxml("vm1"))
    assert set(dom.channels) == {"org.qemu.guest_agent.0", L.CTL_NAME, L.DATA_NAME}
    removed = L.detach("vm1", config=True, backend_=be)
    assert len(removed["config"]) == 2  # the user's controller stays (it carries qemu-ga)
    dom = L.parse_domain_xml(be.dumpxml("vm1"))
    assert set(dom.channels) == {"org.qemu.guest_agent.0"} and 0 in dom.controllers
    assert L.detach("vm1", config=True, backend_=be)["config"] == []


def test_detach_removes_only_our_controller():
    be = FakeBackend(domain("", running=False))
    assert len(L.attach("vm1", backend_=be)["config"]) == 3  # default: config (not running)
    assert L.parse_domain_xml(be.dumpxml("vm1")).controllers == {0: (16, L.CONTROLLER_ALIAS)}
    assert len(L.detach("vm1", backend_=be)["config"]) == 3
    assert L.parse_domain_xml(be.dumpxml("vm1")).controllers == {}


def test_attach_running_without_controller():
    be = FakeBackend(domain("", running=False), running=True)
    result = L.attach("vm1", backend_=be)  # default: config + live; live cannot hot-plug
    assert len(result["config"]) == 3 and "live" not in result
    assert "shut down and started again" in result["notes"][0]
    assert L.parse_domain_xml(be.dumpxml("vm1")).channels == {}  # live unchanged
    # a running domain that has a controller gets the channels live too
    be = FakeBackend(domain(QEMU_GA, running=False), running=True)
    result = L.attach("vm1", backend_=be)
    assert len(result["config"]) == 2 and len(result["live"]) == 2 and not result["notes"]
    assert L.CTL_NAME in L.parse_domain_xml(be.dumpxml("vm1")).channels
    assert L.attach("vm1", backend_=be) == {"config": [], "live": [], "notes": [],
                                            "names": [L.CTL_NAME, L.DATA_NAME]}
    be2 = FakeBackend(domain("", running=False), running=True)
    with pytest.raises(L.AttachError, match="cannot hot-plug"):
        L.attach("vm1", live=True, backend_=be2)
    with pytest.raises(L.DomainNotRunning):
        L.attach("vm1", live=True, backend_=FakeBackend(domain("", running=False)))


def test_detach_plan_strips_live_only_attributes():
    plan = L.plan_detach(L.parse_domain_xml(LIVE))
    assert [el.tag for el in plan] == ["channel", "channel"]  # controller 0 is not ours
    text = L.to_string(plan[0])
    assert "state=" not in text and "<alias" not in text


# --- virsh backend: error mapping ------------------------------------------------------------------

def fake_virsh(tmp_path, stderr, rc=1, stdout=""):
    path = tmp_path / "virsh"
    path.write_text("#!/bin/sh\nprintf '%%s' '%s'\nprintf '%%s\\n' '%s' >&2\nexit %d\n"
                    % (stdout, stderr, rc))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return L.VirshBackend("qemu:///system", virsh=str(path))


@pytest.mark.parametrize("stderr, cls", [
    ("error: failed to get domain 'x'", L.DomainNotFound),
    ("error: Domain not found: no domain with matching name 'x'", L.DomainNotFound),
    ("error: failed to connect to the hypervisor\nerror: Failed to connect socket to "
     "'/var/run/libvirt/libvirt-sock': No such file or directory", L.LibvirtUnavailable),
    ("error: failed to connect to the hypervisor\nerror: Failed to connect socket to "
     "'/var/run/libvirt/libvirt-sock': Permission denied", L.LibvirtPermissionDenied),
    ("error: authentication failed: access denied", L.LibvirtPermissionDenied),
    ("error: something else", L.LibvirtError),
])
def test_virsh_errors(tmp_path, stderr, cls):
    be = fake_virsh(tmp_path, stderr)
    with pytest.raises(cls) as info:
        be.dumpxml("x")
    assert type(info.value) is cls
    assert "\n" not in str(info.value)


def test_virsh_dumpxml_and_resolve(tmp_path):
    be = fake_virsh(tmp_path, "", rc=0, stdout=LIVE.replace("'", '"'))
    assert L.resolve_domain("gl-exp", backend_=be)[0].endswith("domain-4-gl-exp/org.guestlink.ctl")


def test_backend_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("GUESTLINK_LIBVIRT_BACKEND", "virsh")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(L.LibvirtUnavailable, match="install"):
        L.backend()  # no virsh on PATH
    fake_virsh(tmp_path, "")
    assert L.backend("test:///default").name == "virsh"
    assert L.backend("test:///default").uri == "test:///default"
    monkeypatch.setenv("GUESTLINK_LIBVIRT_BACKEND", "bogus")
    with pytest.raises(L.LibvirtUnavailable):
        L.backend()


def test_default_uri(monkeypatch):
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    assert L.default_uri() == "qemu:///system"
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu:///session")
    assert L.default_uri() == "qemu:///session"
    assert L.default_uri("test:///default") == "test:///default"


# --- libvirt-python backend with a stand-in module --------------------------------------------------

class FakeLibvirt:
    VIR_ERR_NO_DOMAIN, VIR_ERR_AUTH_FAILED, VIR_ERR_ACCESS_DENIED = 42, 45, 55
    VIR_ERR_NO_CONNECT, VIR_ERR_SYSTEM_ERROR, VIR_ERR_RPC = 5, 38, 39
    VIR_DOMAIN_XML_INACTIVE, VIR_DOMAIN_AFFECT_LIVE, VIR_DOMAIN_AFFECT_CONFIG = 2, 1, 2
    VIR_DOMAIN_METADATA_ELEMENT = 2

    class libvirtError(Exception):
        def __init__(self, code, msg):
            Exception.__init__(self, msg)
            self.code = code

        def get_error_code(self):
            return self.code

        def get_error_message(self):
            return str(self)

    def __init__(self, open_error=None):
        self.open_error = open_error
        self.metadata_calls = []

    def open(self, uri):
        if self.open_error:
            raise self.libvirtError(self.open_error, "cannot connect")
        lv = self

        class Dom:
            def XMLDesc(self, flags):
                return LIVE

            def setMetadata(self, kind, xml, key, uri, flags):
                lv.metadata_calls.append((kind, xml, key, uri, flags))

        class Conn:
            def lookupByName(self, name):
                if name == "gl-exp":
                    return Dom()
                raise lv.libvirtError(lv.VIR_ERR_NO_DOMAIN, "no domain")

            def lookupByUUIDString(self, uuid):
                if uuid == "bf75bf72-ae54-4a02-9fe7-c53aaff84a1e":
                    return Dom()
                raise lv.libvirtError(lv.VIR_ERR_NO_DOMAIN, "no domain")

        return Conn()


def test_python_backend():
    be = L.PythonBackend("qemu:///system", module=FakeLibvirt())
    assert L.resolve_domain("gl-exp", backend_=be)[1].endswith("org.guestlink.data")
    assert L.resolve_domain("bf75bf72-ae54-4a02-9fe7-c53aaff84a1e", backend_=be)
    with pytest.raises(L.DomainNotFound):
        L.resolve_domain("nope", backend_=be)
    for code, cls in ((FakeLibvirt.VIR_ERR_SYSTEM_ERROR, L.LibvirtUnavailable),
                      (FakeLibvirt.VIR_ERR_AUTH_FAILED, L.LibvirtPermissionDenied)):
        with pytest.raises(cls):
            L.PythonBackend("qemu:///system", module=FakeLibvirt(code)).dumpxml("gl-exp")


# --- CLI addressing ---------------------------------------------------------------------------------

@pytest.fixture
def no_env(monkeypatch):
    for var in ("GUESTLINK_CTL", "GUESTLINK_DATA", "GUESTLINK_DOMAIN", L.CTL_NAME_ENV,
                L.DATA_NAME_ENV):
        monkeypatch.delenv(var, raising=False)


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_resolve_target_by_domain(monkeypatch, no_env):
    seen = []

    def fake_resolve(name, uri=None, *a):
        seen.append((name, uri))
        return "/s/%s.ctl" % name, "/s/%s.data" % name

    monkeypatch.setattr(L, "resolve_domain", fake_resolve)
    args = parse("ping", "vm1")
    t = cli.resolve_target(args)
    assert (t.ctl, t.data, t.domain, t.uri) == ("/s/vm1.ctl", "/s/vm1.data", "vm1", None)
    cli.resolve_target(args)
    assert seen == [("vm1", None)]  # resolved once per command line
    t = cli.resolve_target(parse("info", "--domain", "vm2", "--connect", "qemu:///session"))
    assert (t.domain, t.uri) == ("vm2", "qemu:///session")
    # cp's VM:PATH: resolve_target(args, domain=VM)
    t = cli.resolve_target(parse("ping"), domain="vm3")
    assert t.ctl == "/s/vm3.ctl"
    monkeypatch.setenv("GUESTLINK_DOMAIN", "vm4")
    assert cli.resolve_target(parse("ping")).domain == "vm4"
    monkeypatch.setenv("GUESTLINK_CTL", "/x/ctl")  # an explicit socket wins over GUESTLINK_DOMAIN
    assert cli.resolve_target(parse("ping")) == cli.Target("/x/ctl")
    assert cli.resolve_target(parse("ping", "vm5")).domain == "vm5"


def test_resolve_target_conflicts(no_env):
    with pytest.raises(cli.UsageError, match="not both"):
        cli.resolve_target(parse("ping", "vm1", "--ctl", "/x"))
    with pytest.raises(cli.UsageError, match="two libvirt domains"):
        cli.resolve_target(parse("ping", "vm1", "--domain", "vm2"))
    with pytest.raises(cli.UsageError, match="libvirt domain"):
        cli.resolve_target(parse("ping"))


def test_exec_domain_before_dashdash(monkeypatch, no_env):
    monkeypatch.setattr(L, "resolve_domain", lambda name, uri=None, *a: ("/s/c", "/s/d"))
    args = parse("exec", "vm1", "--", "uname", "-r")
    cli.check_args(args)
    assert args.cmd == ["uname", "-r"] and cli.resolve_target(args).domain == "vm1"
    args = parse("exec", "--domain", "vm1", "--", "ls", "-l")
    cli.check_args(args)
    assert args.cmd == ["ls", "-l"]
    with pytest.raises(cli.UsageError, match="only a libvirt domain"):
        cli.check_args(parse("exec", "a", "b", "--", "ls"))


@pytest.mark.parametrize("exc, code", [
    (L.DomainNotFound("x"), cli.EXIT_NOHOST),
    (L.DomainNotRunning("x"), cli.EXIT_UNAVAILABLE),
    (L.NoChannels("x"), cli.EXIT_CONFIG),
    (L.LibvirtUnavailable("x"), cli.EXIT_UNAVAILABLE),
    (L.LibvirtPermissionDenied("x"), cli.EXIT_NOPERM),
    (L.AttachError("x"), cli.EXIT_SOFTWARE),
])
def test_exit_codes(exc, code):
    assert cli.exit_code_for(exc) == code
    assert cli.exit_code_for(exc, "exec") == code


def test_cli_domain_error_is_one_line(monkeypatch, capsys, no_env):
    def missing(name, uri=None, *a):
        raise L.DomainNotFound("no libvirt domain %r at qemu:///system" % name)

    monkeypatch.setattr(L, "resolve_domain", missing)
    assert cli.main(["ping", "ghost"]) == cli.EXIT_NOHOST
    err = capsys.readouterr().err
    assert err == "guestlink: error: no libvirt domain 'ghost' at qemu:///system\n"


def test_connect_domain_uses_resolver(monkeypatch, tmp_path):
    import asyncio

    from guestlink.host import errors as E
    from guestlink.host.client import connect

    calls = []

    def fake_resolve(name, uri=None, *a):
        calls.append(name)
        return str(tmp_path / "no.sock"), None

    monkeypatch.setattr(L, "resolve_domain", fake_resolve)

    async def go():
        async with connect(domain="vm1", timeout=1, reconnect=False):
            pass

    with pytest.raises(E.SocketNotFound, match="no.sock"):
        asyncio.run(go())
    assert calls == ["vm1"]
    with pytest.raises(ValueError, match="not both"):
        connect(ctl="/x", domain="vm1")


# --- custom channel names: recorded in <metadata>, chosen given > recorded > default --------------

CUSTOM = ("<controller type='virtio-serial' index='0' ports='16'/>"
          "<channel type='unix'><source mode='bind' path='/s/gl.ctl'/>"
          "<target type='virtio' name='gl.ctl' state='connected'/>"
          "<address type='virtio-serial' controller='0' bus='0' port='1'/></channel>"
          "<channel type='unix'><source mode='bind' path='/s/gl.data'/>"
          "<target type='virtio' name='gl.data'/>"
          "<address type='virtio-serial' controller='0' bus='0' port='2'/></channel>")


def with_metadata(xml, record):
    """``xml`` (a domain) with ``record`` pasted into a new <metadata> under <domain>."""
    return xml.replace("<devices>", "<metadata>%s</metadata><devices>" % record, 1)


def test_channels_xml_custom_names_prints_the_metadata_record():
    text = L.channels_xml("gl.ctl", "gl.data")
    root = ET.fromstring("<paste>%s</paste>" % text)
    assert [el.tag for el in root] == ["controller", "channel", "channel", "metadata"]
    assert [c.find("target").get("name") for c in root.findall("channel")] == ["gl.ctl", "gl.data"]
    (record,) = list(root.find("metadata"))
    assert record.tag == "{https://guestlink.invalid/xmlns/1}channels"
    assert record.attrib == {"ctl": "gl.ctl", "data": "gl.data"}
    # the record line alone carries its namespace (to paste into an existing <metadata>)
    line = next(ln for ln in text.splitlines() if ln.startswith("  <guestlink:channels"))
    assert ET.fromstring(line.strip()).tag == record.tag
    # pasted as the comments say, the domain reads back the names
    devices = "".join(ET.tostring(el, encoding="unicode") for el in root if el.tag != "metadata")
    xml = with_metadata(domain(devices), ET.tostring(record, encoding="unicode"))
    assert L.parse_domain_xml(xml).recorded == ("gl.ctl", "gl.data")
    # the defaults need no record: one paste into <devices>, as before
    default = L.channels_xml()
    assert "metadata" not in default and "<!--" not in default


def test_recorded_names_partial_and_absent():
    assert L.parse_domain_xml(domain(CUSTOM)).recorded == (None, None)
    partial = with_metadata(domain(CUSTOM), "<g:channels xmlns:g='%s' ctl='gl.ctl'/>"
                            % L.METADATA_URI)
    assert L.parse_domain_xml(partial).recorded == ("gl.ctl", None)
    other_ns = with_metadata(domain(CUSTOM), "<g:channels xmlns:g='urn:other' ctl='x' data='y'/>")
    assert L.parse_domain_xml(other_ns).recorded == (None, None)


def test_choose_names_precedence():
    recorded = L.parse_domain_xml(with_metadata(domain(CUSTOM), L.to_string(
        L.metadata_element("gl.ctl", "gl.data"))))
    bare = L.parse_domain_xml(domain(CUSTOM))
    assert L.choose_names(bare) == (L.CTL_NAME, L.DATA_NAME, L.DEFAULT, L.DEFAULT)
    assert L.choose_names(None) == (L.CTL_NAME, L.DATA_NAME, L.DEFAULT, L.DEFAULT)
    assert L.choose_names(recorded) == ("gl.ctl", "gl.data", L.RECORDED, L.RECORDED)
    assert L.choose_names(recorded, "x.ctl", "x.data") == ("x.ctl", "x.data", L.GIVEN, L.GIVEN)
    assert L.choose_names(recorded, "x.ctl") == ("x.ctl", "gl.data", L.GIVEN, L.RECORDED)
    assert L.choose_names(bare, None, "x.data") == (L.CTL_NAME, "x.data", L.DEFAULT, L.GIVEN)
    env = {L.CTL_NAME_ENV: "e.ctl", L.DATA_NAME_ENV: "e.data"}
    assert L.names_from_env(environ=env) == ("e.ctl", "e.data")
    assert L.names_from_env("o.ctl", None, environ=env) == ("o.ctl", "e.data")  # option wins
    assert L.names_from_env(environ={L.CTL_NAME_ENV: ""}) == (None, None)


def test_find_sockets_by_recorded_or_given_names():
    xml = with_metadata(domain(CUSTOM), L.to_string(L.metadata_element("gl.ctl", "gl.data")))
    assert L.find_sockets(L.parse_domain_xml(xml)) == ("/s/gl.ctl", "/s/gl.data")
    bare = L.parse_domain_xml(domain(CUSTOM))
    assert L.find_sockets(bare, "gl.ctl", "gl.data") == ("/s/gl.ctl", "/s/gl.data")
    assert L.find_sockets(bare, "gl.ctl") == ("/s/gl.ctl", None)  # no org.guestlink.data


def test_no_channel_error_names_what_it_looked_for_and_what_there_is():
    with pytest.raises(L.NoChannels) as info:
        L.find_sockets(L.parse_domain_xml(domain(CUSTOM)))
    assert str(info.value) == (
        "libvirt domain vm1 has no guestlink channel org.guestlink.ctl (looked for ctl "
        "org.guestlink.ctl and data org.guestlink.data (the default); its virtio channels: gl.ctl, "
        "gl.data); add them with: guestlink libvirt attach vm1 --config (then restart the "
        "domain), or name the ones it has with --ctl-name/--data-name")
    stale = with_metadata(domain(CUSTOM), L.to_string(L.metadata_element("old.ctl", "gl.data")))
    with pytest.raises(L.NoChannels) as info:
        L.find_sockets(L.parse_domain_xml(stale), None, "given.data")
    assert ("looked for ctl old.ctl (recorded in the domain's metadata) and data given.data "
            "(given)" in str(info.value))
    assert ("guestlink libvirt attach vm1 --ctl-name old.ctl --data-name given.data --config"
            in str(info.value))
    with pytest.raises(L.NoChannels) as info:
        L.find_sockets(L.parse_domain_xml(domain("")), "a.ctl", "a.data")
    assert "its virtio channels: none); add them with" in str(info.value)
    assert str(info.value).endswith("(then restart the domain)")


def test_no_channel_error_escapes_domain_controlled_text():
    # XML 1.0 admits no C0 control but newlines, C1 controls (CSI) and bidi overrides
    evil = ("<channel type='unix'><source mode='bind' path='/s/x'/>"
            "<target type='virtio' name='x&#x9b;2J&#10;'/></channel>")
    record = "<g:channels xmlns:g='%s' ctl='c&#x9b;1m' data='d'/>" % L.METADATA_URI
    xml = with_metadata(domain(evil, name="vm&#x202e;1"), record)
    with pytest.raises(L.NoChannels) as info:
        L.find_sockets(L.parse_domain_xml(xml))
    msg = str(info.value)
    assert msg.isprintable() and "\n" not in msg and "\u202e" not in msg
    assert "vm\\u202e1" in msg and "x\\x9b2J\\x0a" in msg and "ctl c\\x9b1m" in msg
    with pytest.raises(L.DomainNotRunning) as info:
        L.find_sockets(L.parse_domain_xml(domain("", running=False, name="vm&#x9b;x")))
    assert str(info.value).isprintable() and "vm\\x9bx" in str(info.value)


def test_attach_records_custom_names_and_detach_removes_them():
    be = FakeBackend(domain("", running=False))
    result = L.attach("vm1", config=True, ctl_name="gl.ctl", data_name="gl.data", backend_=be)
    assert result["names"] == ["gl.ctl", "gl.data"]
    assert result["config"][-1] == "metadata guestlink:channels ctl=gl.ctl data=gl.data"
    assert [c[0] for c in be.calls] == ["attach"] * 3 + ["metadata"]
    assert be.calls[-1][1:] == ("<channels ctl='gl.ctl' data='gl.data'/>", False, True)
    dom = L.parse_domain_xml(be.dumpxml("vm1"))
    assert dom.recorded == ("gl.ctl", "gl.data") and set(dom.channels) == {"gl.ctl", "gl.data"}
    # again without names: the recorded ones are used, nothing to do
    n = len(be.calls)
    assert L.attach("vm1", config=True, backend_=be)["config"] == []
    assert len(be.calls) == n
    # detach without names: the recorded pair goes, with its record and our controller
    removed = L.detach("vm1", config=True, backend_=be)
    assert removed["names"] == ["gl.ctl", "gl.data"]
    assert removed["config"][-1] == "metadata guestlink:channels"
    dom = L.parse_domain_xml(be.dumpxml("vm1"))
    assert dom.recorded == (None, None) and dom.channels == {} and dom.controllers == {}


def test_attach_default_names_records_nothing_but_replaces_another_record():
    be = FakeBackend(domain("", running=False))
    L.attach("vm1", config=True, backend_=be)
    assert "metadata" not in [c[0] for c in be.calls]
    be = FakeBackend(with_metadata(domain("", running=False), L.to_string(
        L.metadata_element("gl.ctl", "gl.data"))))
    result = L.attach("vm1", config=True, ctl_name=L.CTL_NAME, data_name=L.DATA_NAME, backend_=be)
    assert result["config"][-1] == "metadata guestlink:channels ctl=%s data=%s" % (
        L.CTL_NAME, L.DATA_NAME)
    assert L.parse_domain_xml(be.dumpxml("vm1")).recorded == (L.CTL_NAME, L.DATA_NAME)
    # detaching other names than recorded leaves the record alone
    assert "metadata" not in " ".join(
        L.detach("vm1", config=True, ctl_name="x", data_name="y", backend_=be)["config"])


def test_attach_running_domain_records_live_too():
    be = FakeBackend(domain(QEMU_GA, running=False), running=True)
    result = L.attach("vm1", ctl_name="gl.ctl", data_name="gl.data", backend_=be)
    assert result["live"][-1] == result["config"][-1] == (
        "metadata guestlink:channels ctl=gl.ctl data=gl.data")
    live = L.parse_domain_xml(be.dumpxml("vm1"))
    assert live.running and live.recorded == ("gl.ctl", "gl.data")


def test_virsh_set_metadata_command_line(tmp_path):
    log = tmp_path / "args"
    path = tmp_path / "virsh"
    path.write_text("#!/bin/sh\nprintf '%%s\\n' \"$@\" >> %s\n" % log)
    path.chmod(0o755)
    be = L.VirshBackend("qemu:///system", virsh=str(path))
    be.set_metadata("vm1", "<channels ctl='a' data='b'/>", live=True, config=True)
    be.set_metadata("vm1", None, live=False, config=True)
    args = log.read_text().splitlines()
    first = ["-q", "-c", "qemu:///system", "metadata", "--domain", "vm1", "--uri",
             L.METADATA_URI, "--set", "<channels ctl='a' data='b'/>", "--key", "guestlink",
             "--live", "--config"]
    second = ["-q", "-c", "qemu:///system", "metadata", "--domain", "vm1", "--uri",
              L.METADATA_URI, "--remove", "--config"]
    assert args == first + second
    with pytest.raises(L.AttachError, match="metadata not supported"):
        fake_virsh(tmp_path, "error: metadata not supported").set_metadata("vm1", None, True, False)


def test_python_backend_set_metadata():
    lv = FakeLibvirt()
    be = L.PythonBackend("qemu:///system", module=lv)
    be.set_metadata("gl-exp", "<channels ctl='a' data='b'/>", live=True, config=True)
    be.set_metadata("gl-exp", None, live=False, config=True)
    assert lv.metadata_calls == [
        (2, "<channels ctl='a' data='b'/>", "guestlink", L.METADATA_URI, 3),
        (2, None, None, L.METADATA_URI, 2)]


def test_list_domains_uses_each_domains_names():
    class Two:
        xmls = {"u1": with_metadata(domain(CUSTOM, name="custom"), L.to_string(
                    L.metadata_element("gl.ctl", "gl.data"))),
                "u2": domain(CUSTOM, name="plain")}

        def list_uuids(self):
            return list(self.xmls)

        def dumpxml(self, uuid, inactive=False):
            return self.xmls[uuid]

        def state(self, uuid):
            return "running"

    rows = {r.name: r for r in L.list_domains(backend_=Two())}
    assert rows["custom"].ctl.path == "/s/gl.ctl" and rows["custom"].names.ctl_source == L.RECORDED
    assert rows["plain"].ctl is None and rows["plain"].names.ctl == L.CTL_NAME
    rows = {r.name: r for r in L.list_domains(None, "gl.ctl", None, backend_=Two())}
    assert rows["plain"].ctl.path == "/s/gl.ctl" and rows["plain"].data is None


def test_cli_names_reach_the_resolver(monkeypatch, no_env):
    seen = []

    def fake_resolve(name, uri=None, ctl_name=None, data_name=None):
        seen.append((name, ctl_name, data_name))
        return "/s/c", "/s/d"

    monkeypatch.setattr(L, "resolve_domain", fake_resolve)
    for argv in (["ping"], ["info"], ["send", "t", "x"], ["listen", "t"], ["call", "op"],
                 ["shutdown"], ["reboot"], ["exec"], ["run", "s"], ["cp", "a", ":/b"]):
        args = parse(*(argv[:1] + ["--domain", "vm1", "--ctl-name", "gl.ctl", "--data-name",
                                   "gl.data"] + argv[1:]))
        t = cli.resolve_target(args)
        assert (t.ctl_name, t.data_name) == ("gl.ctl", "gl.data"), argv
    assert set(seen) == {("vm1", "gl.ctl", "gl.data")}
    seen.clear()
    assert cli.resolve_target(parse("ping", "vm1")).ctl_name is None  # metadata/defaults decide
    monkeypatch.setenv(L.CTL_NAME_ENV, "env.ctl")
    monkeypatch.setenv(L.DATA_NAME_ENV, "env.data")
    cli.resolve_target(parse("ping", "vm1"))
    cli.resolve_target(parse("ping", "vm1", "--ctl-name", "opt.ctl"))
    assert seen == [("vm1", None, None), ("vm1", "env.ctl", "env.data"),
                    ("vm1", "opt.ctl", "env.data")]
    with pytest.raises(cli.UsageError, match="give a domain, not --ctl"):
        cli.resolve_target(parse("ping", "--ctl", "/x", "--ctl-name", "a"))
    # the environment defaults do not get in the way of --ctl
    assert cli.resolve_target(parse("ping", "--ctl", "/x")) == cli.Target("/x")
    # send's message is not the data socket
    assert cli.resolve_target(parse("send", "--ctl", "/x", "t", "msg")) == cli.Target("/x")


def test_cli_passes_names_to_connect(monkeypatch, no_env):
    from guestlink.host import client

    monkeypatch.setattr(L, "resolve_domain", lambda name, uri=None, *a: ("/s/c", "/s/d"))
    seen = {}

    def fake_connect(**kw):
        seen.update(kw)
        raise L.NoChannels("stop here")

    monkeypatch.setattr(client, "connect", fake_connect)
    assert cli.main(["ping", "vm1", "--ctl-name", "gl.ctl"]) == cli.EXIT_CONFIG
    assert (seen["domain"], seen["ctl_name"], seen["data_name"]) == ("vm1", "gl.ctl", None)


def test_cli_libvirt_xml_names_from_env(monkeypatch, capsys, no_env):
    monkeypatch.setenv(L.CTL_NAME_ENV, "e.ctl")
    monkeypatch.setenv(L.DATA_NAME_ENV, "e.data")
    assert cli.main(["libvirt", "xml", "--data-name", "o.data"]) == 0
    root = ET.fromstring("<paste>%s</paste>" % capsys.readouterr().out)
    assert [c.find("target").get("name") for c in root.findall("channel")] == ["e.ctl", "o.data"]
    assert root.find("metadata")[0].attrib == {"ctl": "e.ctl", "data": "o.data"}


def test_cli_attach_json_reports_names(monkeypatch, capsys, no_env):
    be = FakeBackend(domain("", running=False))
    monkeypatch.setattr(L, "backend", lambda uri=None: be)
    assert cli.main(["libvirt", "attach", "vm1", "--ctl-name", "gl.ctl", "--data-name", "gl.data",
                     "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["names"] == ["gl.ctl", "gl.data"] and len(out["config"]) == 4
    assert cli.main(["libvirt", "detach", "vm1"]) == 0  # names from the record
    text = capsys.readouterr().out
    assert "removed channel gl.ctl" in text and "removed metadata guestlink:channels" in text
    assert L.parse_domain_xml(be.dumpxml("vm1")).channels == {}


def test_connect_domain_passes_names(monkeypatch, tmp_path):
    import asyncio

    import guestlink.sync
    from guestlink.host import errors as E
    from guestlink.host.client import connect

    calls = []

    def fake_resolve(name, uri=None, ctl_name=None, data_name=None):
        calls.append((name, uri, ctl_name, data_name))
        return str(tmp_path / "no.sock"), None

    monkeypatch.setattr(L, "resolve_domain", fake_resolve)

    async def go():
        async with connect(domain="vm1", ctl_name="gl.ctl", data_name="gl.data", timeout=1,
                           reconnect=False):
            pass

    with pytest.raises(E.SocketNotFound):
        asyncio.run(go())
    with pytest.raises(E.SocketNotFound):
        guestlink.sync.connect(domain="vm2", uri="test:///x", ctl_name="c", timeout=1,
                               reconnect=False)
    assert calls == [("vm1", None, "gl.ctl", "gl.data"), ("vm2", "test:///x", "c", None)]
    with pytest.raises(ValueError, match="need domain="):
        connect(ctl="/x", ctl_name="gl.ctl")


def test_cli_attach_detach_text_escapes_names_from_the_domain(monkeypatch, capsys, no_env):
    be = FakeBackend(domain("", running=False))
    monkeypatch.setattr(L, "backend", lambda uri=None: be)
    assert cli.main(["libvirt", "attach", "vm1", "--ctl-name", "gl\u202e\x9b2J.ctl"]) == 0
    out = capsys.readouterr().out
    assert "added channel gl\\u202e\\x9b2J.ctl" in out and "\u202e" not in out
    assert cli.main(["libvirt", "detach", "vm1"]) == 0  # the name now comes from the domain XML
    out = capsys.readouterr().out
    assert "removed channel gl\\u202e\\x9b2J.ctl" in out and "\x9b" not in out


def test_cli_attach_refuses_a_control_character_in_a_name(monkeypatch, capsys, no_env):
    be = FakeBackend(domain("", running=False))
    monkeypatch.setattr(L, "backend", lambda uri=None: be)
    assert cli.main(["libvirt", "attach", "vm1", "--ctl-name", "gl\x1b]0;x\x07.ctl"]) == cli.EXIT_USAGE
    assert "invalid virtio-serial port name" in capsys.readouterr().err
