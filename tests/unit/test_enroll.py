"""guestlink enroll without a VM: the orchestration (guestlink.enroll) against a "guest" that is a
local directory (the real bootstrap, the real zipapp and its real installer run as local
processes; only the paths are moved under a temp root), the checks of what the guest prints, the
refusals before anything is written, and the in-guest commands (guestlink-agent install/remove,
guestlink.image.bootstrap). The real thing, through qemu-ga into a QEMU guest, is
tests/vm/test_enroll_e2e.py."""

import asyncio
import hashlib
import json
import os
import subprocess
import sys

import pytest

from guestlink import enroll as EN
from guestlink.bundle import build_bundle_bytes
from guestlink.image import bootstrap
from guestlink.host.qga.transport import qga_error
from guestlink.image import tree as T
from test_image import patched_bundle, snapshot

PYZ = build_bundle_bytes()
SHA = hashlib.sha256(PYZ).hexdigest()


class LocalGuest(EN.GuestExec):
    """A guest whose root is ``root`` on this machine: guest-exec runs local processes with the
    installer pointed at ``root`` (``--root``), guest-file-write writes local files."""

    def __init__(self, root, fail_exec=None, reply=None):
        self.root = str(root)
        self.calls = []
        self.writes = []
        self.fail_exec = fail_exec      # exception raised by run()
        self.reply = reply              # fixed ExecOutput for every run()

    def _argv(self, argv):
        out = [sys.executable if a == "python3" else self.root + a if a == T.AGENT_PYZ else a
               for a in argv]
        for verb in ("install", "remove"):
            if verb in out[2:]:
                out += ["--root", self.root]
        if out[3:4] == ["probe"]:
            out[-1] = "0"  # this machine's kernel is not the guest's: see run()
        return out

    async def run(self, argv, timeout):
        self.calls.append(list(argv))
        if self.fail_exec:
            raise self.fail_exec
        if self.reply:
            return self.reply
        proc = await asyncio.create_subprocess_exec(
            *self._argv(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        if argv[3:4] == ["probe"]:  # the guest's kernel has the driver this machine may lack
            out = json.dumps(dict(json.loads(out), virtio_console="module")).encode()
        return EN.ExecOutput(proc.returncode, out, err)

    async def write_file(self, path, data):
        self.writes.append(path)
        with open(path, "wb") as f:
            f.write(data)


async def answered(connect_kw, timeout):
    return {"version": "x", "hostname": "h", "ping_ms": 1.0}


def make_guest_root(tmp_path):
    root = tmp_path / "guest"
    for d in ("etc/init.d", "etc/rc2.d", "usr/bin"):
        (root / d).mkdir(parents=True)
    (root / "etc/os-release").write_text("ID=debian\n")
    return root


def run_enroll(guest, pyz=PYZ, **kw):
    return asyncio.run(EN.enroll(guest, pyz, {}, wait=answered, **kw))


def test_enroll_installs_what_image_install_installs(tmp_path):
    root = make_guest_root(tmp_path)
    guest = LocalGuest(root)
    lines = []
    out = run_enroll(guest, progress=lines.append)
    assert out.action == "installed" and out.version == T.pyz_version(PYZ)
    assert out.init == "sysv" and T.SYSV_SCRIPT in out.changed
    assert guest.writes and guest.writes[0].endswith("/guestlink-agent.pyz")
    assert any("copying the agent" in line for line in lines)
    # the private directory is gone again
    assert not os.path.exists(os.path.dirname(guest.writes[0]))
    # the same files and manifest as `image install` on a twin tree
    twin = make_guest_root(tmp_path / "twin")
    T.Installer(T.Tree(str(twin))).install(PYZ)
    ours, theirs = T.status(T.Tree(str(root))), T.status(T.Tree(str(twin)))
    for r in (ours, theirs):
        r.pop("installed_at")
    assert ours == theirs and ours["installed"] and ours["agent_version"] == out.version
    a, b = snapshot(root), snapshot(twin)
    a.pop("var/lib/guestlink/install.json"), b.pop("var/lib/guestlink/install.json")
    assert a == b


def test_enroll_again_changes_nothing_and_copies_nothing(tmp_path):
    root = make_guest_root(tmp_path)
    run_enroll(LocalGuest(root))
    before = snapshot(root)
    guest = LocalGuest(root)
    out = run_enroll(guest)
    assert out.action == "unchanged" and out.changed == []
    assert out.summary == "already enrolled (version %s), nothing changed" % out.version
    assert guest.writes == []  # no copy: the installed agent's own installer ran
    assert snapshot(root) == before  # the manifest's date included


def test_enroll_newer_version_upgrades_and_keeps_an_edited_config(tmp_path):
    root = make_guest_root(tmp_path)
    run_enroll(LocalGuest(root))
    conf = root / T.CONFIG.lstrip("/")
    conf.write_text(conf.read_text() + "# mine\n")
    out = run_enroll(LocalGuest(root), pyz=patched_bundle("9.9.9"))
    assert out.action == "upgraded" and out.previous_version == T.pyz_version(PYZ)
    assert out.version == "9.9.9" and T.AGENT_PYZ in out.changed
    assert conf.read_text().endswith("# mine\n")
    assert any("modified since install" in n for n in out.notes)
    assert T.status(T.Tree(str(root)))["agent_version"] == "9.9.9"


def test_remove_undoes_the_enroll(tmp_path):
    root = make_guest_root(tmp_path)
    pristine = snapshot(root)
    run_enroll(LocalGuest(root))
    out = asyncio.run(EN.remove(LocalGuest(root), PYZ))
    assert out.action == "removed" and out.version == T.pyz_version(PYZ)
    assert snapshot(root) == pristine
    again = asyncio.run(EN.remove(LocalGuest(root), PYZ))
    assert again.action == "absent" and snapshot(root) == pristine


# --- refusals before anything is written ------------------------------------------------------

@pytest.mark.parametrize("guest, words", [
    (LocalGuest("/nonexistent", fail_exec=qga_error("guest-exec", {
        "class": "GenericError",
        "desc": "Failed to execute child process \u201cpython3\u201d (No such file or directory)"})),
     "has no python3"),
    (LocalGuest("/nonexistent", reply=EN.ExecOutput(127, b"", b"sh: python3: not found\x1b[2J")),
     "no usable python3 (`python3` exited with status 127"),
    (LocalGuest("/nonexistent", reply=EN.ExecOutput(0, json.dumps({
        "python": "3.6.9", "executable": "/usr/bin/python3", "virtio_console": "module",
        "installed_sha256": None, "tmpdir": None}).encode(), b"")),
     "python3 is 3.6.9"),
    (LocalGuest("/nonexistent", reply=EN.ExecOutput(0, json.dumps({
        "python": "3.11.2", "executable": "/usr/bin/python3", "virtio_console": None,
        "installed_sha256": None, "tmpdir": None}).encode(), b"")),
     "no virtio_console driver"),
])
def test_a_guest_that_cannot_run_the_agent_is_refused_before_any_write(guest, words):
    with pytest.raises(EN.GuestRefused) as info:
        run_enroll(guest)
    message = str(info.value)
    assert words in message and "nothing was written" in message
    assert "\x1b" not in message
    assert info.value.exit_code == EN.EXIT_CONFIG
    assert guest.writes == [] and len(guest.calls) == 1  # the probe only


def test_the_real_probe_reports_this_python_and_makes_no_directory_when_up_to_date(tmp_path):
    pyz = tmp_path / "agent.pyz"
    pyz.write_bytes(PYZ)
    out = subprocess.run([sys.executable, "-c", EN.bootstrap_source(), "probe", str(pyz), SHA,
                          "0"], capture_output=True, check=True)
    facts = EN.parse_probe(EN.ExecOutput(0, out.stdout, out.stderr))
    assert facts.python == "%d.%d.%d" % sys.version_info[:3]
    assert facts.installed_sha256 == SHA and facts.tmpdir is None
    out = subprocess.run([sys.executable, "-c", EN.bootstrap_source(), "probe",
                          str(tmp_path / "none"), SHA, "0"], capture_output=True, check=True)
    facts = EN.parse_probe(EN.ExecOutput(0, out.stdout, out.stderr))
    try:
        assert facts.installed_sha256 is None and facts.tmpdir
        assert os.stat(facts.tmpdir).st_mode & 0o777 == 0o700
    finally:
        os.rmdir(facts.tmpdir)


def test_bootstrap_run_refuses_a_zipapp_with_the_wrong_digest(tmp_path):
    d = tmp_path / (bootstrap.PREFIX + "x")
    d.mkdir()
    pyz = d / "guestlink-agent.pyz"
    pyz.write_bytes(PYZ[:-1] + bytes([PYZ[-1] ^ 1]))  # one bit changed on the way
    marker = tmp_path / "ran"
    out = subprocess.run([sys.executable, "-c", EN.bootstrap_source(), "run", str(pyz), SHA,
                          "install", "--root", str(marker)], capture_output=True)
    assert out.returncode == 65 and not marker.exists()
    with pytest.raises(EN.EnrollError, match="damaged on the way"):
        EN.parse_result(EN.ExecOutput(out.returncode, out.stdout, out.stderr), "install")


def test_bootstrap_cleanup_removes_only_its_own_directories(tmp_path):
    other = tmp_path / "precious"
    other.mkdir()
    ours = tmp_path / (bootstrap.PREFIX + "abc")
    ours.mkdir()
    for d in (other, ours):
        subprocess.run([sys.executable, "-c", EN.bootstrap_source(), "cleanup", str(d)],
                       check=True, capture_output=True)
    assert other.is_dir() and not ours.exists()


# --- hostile replies ----------------------------------------------------------------------------

GOOD_PROBE = {"python": "3.11.2", "executable": "/usr/bin/python3", "virtio_console": "loaded",
              "installed_sha256": None, "tmpdir": "/tmp/guestlink-enroll-ab_12"}


@pytest.mark.parametrize("change", [
    {"python": "3.11"}, {"python": 3.11}, {"executable": "python3"},
    {"executable": "/usr/bin/py\nthon3"}, {"virtio_console": "maybe"},
    {"installed_sha256": "0" * 63}, {"tmpdir": "/etc"}, {"tmpdir": "/tmp/guestlink-enroll-x/../.."},
    {"tmpdir": "/tmp/../etc/guestlink-enroll-x"}, {"tmpdir": "/tmp/guestlink-enroll-x\n"},
])
def test_a_malformed_probe_is_refused(change):
    reply = json.dumps(dict(GOOD_PROBE, **change)).encode()
    with pytest.raises(EN.EnrollError, match="malformed probe result") as info:
        EN.parse_probe(EN.ExecOutput(0, reply, b""))
    assert info.value.exit_code == 65 and "\n" not in str(info.value)


@pytest.mark.parametrize("stdout, words", [
    (b"x" * (EN.MAX_REPLY + 1), "more than"),
    (b"Traceback\x1b]0;pwned\x07", "no JSON result"),
    (b"[1, 2]", "no JSON object"),
    (b'{"action": "install", "summary": "s", "notes": [], "version": "1", "changed": "all", '
     b'"init": "sysv", "previous_version": null}', "field changed"),
    (b'{"action": "remove", "summary": "s", "notes": [], "version": "1", "removed": true}',
     "field action"),
    (b'{"error": "no space\x1b[31m", "exit_code": 73}', "no space"),
    (b'{"error": "x", "exit_code": 9999}', "failed: x"),
])
def test_hostile_installer_output_becomes_one_clean_error(stdout, words):
    with pytest.raises(EN.EnrollError) as info:
        EN.parse_result(EN.ExecOutput(0, stdout, b""), "install")
    message = str(info.value)
    assert words in message
    assert "\x1b" not in message and "\x07" not in message and len(message) < 400
    assert 1 <= info.value.exit_code <= 125


def test_a_failed_copy_removes_the_private_directory(tmp_path):
    root = make_guest_root(tmp_path)

    class Failing(LocalGuest):
        async def write_file(self, path, data):
            self.writes.append(path)
            raise OSError("guest-file-write failed")

    guest = Failing(root)
    with pytest.raises(OSError):
        run_enroll(guest)
    assert guest.calls[-1][3] == "cleanup"
    assert not os.path.exists(os.path.dirname(guest.writes[0]))
    assert not (root / "var").exists()


# --- the in-guest commands ---------------------------------------------------------------------

def test_agent_install_checks_the_digest_and_reports_errors_as_json(tmp_path):
    root = make_guest_root(tmp_path)
    pyz = tmp_path / "agent.pyz"
    pyz.write_bytes(PYZ)
    out = subprocess.run([sys.executable, str(pyz), "install", "--root", str(root), "--json",
                          "--sha256", "0" * 64], capture_output=True, text=True)
    assert out.returncode == 65 and json.loads(out.stdout)["exit_code"] == 65
    assert "damaged in transit" in json.loads(out.stdout)["error"]
    assert not (root / "var").exists()
    out = subprocess.run([sys.executable, str(pyz), "install", "--root", str(root), "--json",
                          "--sha256", SHA, "--start"], capture_output=True, text=True)
    result = json.loads(out.stdout)
    assert out.returncode == 0 and result["sha256"] == SHA and result["init"] == "sysv"
    assert result["service"]["command"] is None  # --root is not /: nothing is started
    out = subprocess.run([sys.executable, str(pyz), "status", "--root", str(root)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("guestlink agent %s installed (sysv)" % T.pyz_version(PYZ))


def test_service_commands_per_init_kind():
    assert T.service_commands("systemd", "restart")[-1] == [
        "systemctl", "restart", "guestlink-agent.service"]
    assert T.service_commands("sysv", "stop") == [[T.SYSV_SCRIPT, "stop"]]
    assert T.service_commands("rc.local", "start") == [[T.RCLOCAL_SCRIPT, "start"]]
    with pytest.raises(ValueError):
        T.service_commands("upstart", "start")


def test_an_older_agent_is_reported_as_a_downgrade(tmp_path):
    root = make_guest_root(tmp_path)
    run_enroll(LocalGuest(root), pyz=patched_bundle("9.9.9"))
    out = run_enroll(LocalGuest(root))
    assert out.action == "downgraded" and out.previous_version == "9.9.9"
    assert out.summary.startswith("downgraded guestlink agent 9.9.9 -> ")


# --- channels (libvirt), the command line ----------------------------------------------------------

def test_channels_are_hot_plugged_next_to_qemu_ga_or_left_for_the_next_boot():
    from test_libvirt import QEMU_GA, FakeBackend, domain

    from guestlink import libvirt as L

    be = FakeBackend(domain(QEMU_GA, running=False), running=True)
    result, live = EN.add_channels("vm1", None, None, None, backend_=be)
    assert live and len(result["live"]) == 2 and len(result["config"]) == 2
    assert L.CTL_NAME in L.parse_domain_xml(be.dumpxml("vm1")).channels
    be = FakeBackend(domain("", running=False), running=True)  # no virtio-serial controller
    result, live = EN.add_channels("vm1", None, None, None, backend_=be)
    assert not live and len(result["config"]) == 3
    assert "shut down and started again" in result["notes"][0]


@pytest.mark.parametrize("argv, words", [
    (["enroll"], "no VM given"),
    (["enroll", "vm1", "--qga", "/x.sock"], "either a libvirt domain or --qga"),
    (["enroll", "--qga", "/x.sock", "--ctl-name", "n", "--ctl", "/c.sock"], "for a libvirt domain"),
])
def test_enroll_usage_errors_are_one_line(argv, words, capsys, monkeypatch):
    from guestlink.cli.app import main

    for name in ("GUESTLINK_QGA", "GUESTLINK_CTL", "GUESTLINK_DATA"):
        monkeypatch.delenv(name, raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and err.startswith("guestlink: error: ")


def test_enroll_without_a_qemu_ga_socket_names_it(tmp_path, capsys):
    from guestlink.cli.app import main

    assert main(["enroll", "--qga", str(tmp_path / "q.sock"), "--ctl", str(tmp_path / "c")]) == 69
    err = capsys.readouterr().err
    assert "no guestlink control socket" in err and "nothing was written" in err
    sock = tmp_path / "qga.sock"
    (tmp_path / "c.sock").write_bytes(b"")
    assert main(["enroll", "--qga", str(sock), "--ctl", str(tmp_path / "c.sock")]) == 69
    err = capsys.readouterr().err
    assert "no qemu-ga socket %s" % sock in err and "org.qemu.guest_agent.0" in err
    assert err.count("\n") == 1


def test_guestlink_agent_remove_is_the_agents_own_remove(tmp_path, capsys):
    """`guestlink agent install|status|remove` (in a guest with guestlink installed) run the
    same installer as the zipapp's `guestlink-agent install|status|remove`."""
    from guestlink.cli.app import main

    root = make_guest_root(tmp_path)
    pyz = tmp_path / "agent.pyz"
    pyz.write_bytes(PYZ)
    assert main(["agent", "install", "--root", str(root), "--pyz", str(pyz), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "install"
    assert main(["agent", "status", "--root", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["installed"] is True
    assert main(["agent", "remove", "--root", str(root)]) == 0
    assert capsys.readouterr().out.startswith("removed guestlink agent")
    assert not (root / "var/lib/guestlink").exists()
    assert main(["agent", "install", "--root", str(root)]) == 64  # not a zipapp: --pyz needed
    assert "give --pyz FILE" in capsys.readouterr().err
