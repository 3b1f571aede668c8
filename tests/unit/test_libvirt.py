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
    assert L.attach("vm1", backend_=be) == {"config": [], "live": [], "notes": []}
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

    def open(self, uri):
        if self.open_error:
            raise self.libvirtError(self.open_error, "cannot connect")
        lv = self

        class Dom:
            def XMLDesc(self, flags):
                return LIVE

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
    for var in ("GUESTLINK_CTL", "GUESTLINK_DATA", "GUESTLINK_DOMAIN"):
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
    cli._check_args(args)
    assert args.cmd == ["uname", "-r"] and cli.resolve_target(args).domain == "vm1"
    args = parse("exec", "--domain", "vm1", "--", "ls", "-l")
    cli._check_args(args)
    assert args.cmd == ["ls", "-l"]
    with pytest.raises(cli.UsageError, match="only a libvirt domain"):
        cli._check_args(parse("exec", "a", "b", "--", "ls"))


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
