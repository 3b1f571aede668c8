"""guestlink doctor: each check's verdict and fix text, in small worlds built for it (fake `which`,
kernel trees in tmp_path, libvirt backends that fail in each way, real unix sockets), the report
and exit status, the CLI wiring, and the guestfs backend's appliance error.
(tests/vm/test_doctor_e2e.py runs the real CLI on this machine.)"""

import io
import json
import os
import socket
import zipfile

import pytest

from guestlink import cli, doctor
from guestlink import libvirt as L
from guestlink.image.backends import GuestfsBackend
from guestlink.image.disk import CommandFailed


def which_of(*present):
    return lambda name: "/usr/bin/" + name if name in present else None


# --- qemu ------------------------------------------------------------------------------------

def test_qemu_present():
    item = doctor.check_qemu(which_of("qemu-system-x86_64", "qemu-img"))
    assert item.ok and item.name == "qemu"
    assert item.detail == "/usr/bin/qemu-system-x86_64, /usr/bin/qemu-img"
    assert item.line() == "\u2713 qemu: /usr/bin/qemu-system-x86_64, /usr/bin/qemu-img"


def test_qemu_missing_names_what_and_the_packages():
    item = doctor.check_qemu(which_of("qemu-system-x86_64"))
    assert not item.ok
    assert item.detail == "not found: qemu-img"
    assert item.fix == "apt-get install qemu-system-x86 qemu-utils"
    assert item.line() == ("\u2717 qemu: not found: qemu-img; fix: apt-get install qemu-system-x86 "
                           "qemu-utils")


# --- libvirt ---------------------------------------------------------------------------------

class FakeBackend:
    name = "fake"

    def __init__(self, error=None, uuids=()):
        self.error, self.uuids = error, list(uuids)

    def __call__(self, uri):
        return self

    def list_uuids(self):
        if self.error:
            raise self.error
        return self.uuids


def test_libvirt_reachable_counts_domains():
    item = doctor.check_libvirt("test:///x", FakeBackend(uuids=["a", "b"]))
    assert item.ok
    assert item.detail == "test:///x answers (via fake, as uid %d, read-write): 2 domains" \
        % os.geteuid()


@pytest.mark.parametrize("error, fix_has", [
    (L.LibvirtPermissionDenied("permission denied connecting to libvirt at qemu:///system"),
     "add this user to the libvirt group"),
    (L.LibvirtUnavailable("neither libvirt-python nor virsh is installed (install ...)"),
     "apt-get install libvirt-clients"),
    (L.LibvirtUnavailable("libvirt is not reachable at qemu:///system: Failed to connect socket"),
     "start libvirtd (systemctl start libvirtd; without systemd: virtlogd -d && libvirtd -d)"),
    (L.LibvirtError("libvirt (qemu:///system): internal error"), "see libvirtd's log"),
])
def test_libvirt_failures_and_their_fixes(error, fix_has):
    item = doctor.check_libvirt(None, FakeBackend(error=error))
    assert not item.ok
    assert item.detail == str(error)
    assert fix_has in item.fix


# --- a domain's channel sockets ----------------------------------------------------------------

def listening(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen(4)
    return s


def test_probe_socket_verdicts(tmp_path):
    with listening(tmp_path / "up.sock"):
        assert doctor.probe_socket(str(tmp_path / "up.sock")) is None
    # the listener is gone, the file stays: what a crashed QEMU leaves
    assert doctor.probe_socket(str(tmp_path / "up.sock")) == \
        "%s: nobody listens on it (is the VM's QEMU running?)" % (tmp_path / "up.sock")
    (tmp_path / "plain").write_text("")
    assert doctor.probe_socket(str(tmp_path / "plain")) == "%s is not a socket" % (tmp_path / "plain")
    assert doctor.probe_socket(str(tmp_path / "nope")) == "%s does not exist" % (tmp_path / "nope")


def test_channels_ok_when_both_sockets_connect(tmp_path):
    ctl, data = str(tmp_path / "c.sock"), str(tmp_path / "d.sock")
    with listening(ctl), listening(data):
        item = doctor.check_channels("vm1", "test:///x", resolve=lambda *a: (ctl, data))
    assert item.ok and item.name == "channels vm1"
    assert item.detail == "control %s and data %s accept this user's connection" % (ctl, data)


def test_channels_passes_domain_uri_and_names_to_the_resolver():
    seen = []
    doctor.check_channels("vm1", "qemu:///session", ("gl.ctl", None),
                          resolve=lambda *a: seen.append(a) or ("/c", "/d"), probe=lambda p: None)
    assert seen == [("vm1", "qemu:///session", "gl.ctl", None)]


@pytest.mark.parametrize("error, fix", [
    (L.DomainNotFound("no libvirt domain 'vm1' at qemu:///system"),
     "check the name (virsh list --all) and --connect URI"),
    (L.DomainNotRunning("libvirt domain vm1 is not running"), "virsh start vm1"),
    (L.NoChannels("libvirt domain vm1 has no guestlink channel org.guestlink.ctl"),
     "guestlink libvirt attach vm1 --config, then restart the domain"),
    (L.LibvirtUnavailable("libvirt is not reachable at qemu:///system"), "see the libvirt item"),
])
def test_channels_lookup_failures(error, fix):
    def resolve(domain, uri, ctl_name, data_name):
        raise error

    item = doctor.check_channels("vm1", None, resolve=resolve)
    assert not item.ok
    assert item.detail == str(error)
    assert item.fix == fix


@pytest.mark.parametrize("problem, fix_has", [
    ("/c: permission denied (owner uid 64055 gid 64055, mode 755)", "--socket-dir DIR"),
    ("/c does not exist", "virsh destroy vm1; virsh start vm1"),
    ("/c: nobody listens on it (is the VM's QEMU running?)", "virsh destroy vm1; virsh start vm1"),
])
def test_channels_socket_problems(problem, fix_has):
    item = doctor.check_channels("vm1", None, resolve=lambda *a: ("/c", "/d"),
                                 probe=lambda p: problem if p == "/c" else None)
    assert not item.ok
    assert item.detail == problem
    assert fix_has in item.fix


def test_channels_without_a_data_channel():
    item = doctor.check_channels("vm1", None, resolve=lambda *a: ("/c", None),
                                 probe=lambda p: None)
    assert not item.ok
    assert item.detail == "no data channel (file transfers need it)"
    assert item.fix == "guestlink libvirt attach vm1 --config, then restart the domain"


# --- loop backend, libguestfs tools -------------------------------------------------------------

def test_loop_backend(tmp_path):
    fuse = tmp_path / "fuse"
    fuse.write_text("")
    item = doctor.check_loop_backend(which_of("qemu-storage-daemon", "fusermount3"), str(fuse))
    assert item.ok
    assert item.detail == "/usr/bin/qemu-storage-daemon, /usr/bin/fusermount3, %s" % fuse

    item = doctor.check_loop_backend(which_of("fusermount3"), str(tmp_path / "nofuse"))
    assert not item.ok
    assert item.detail == "missing: qemu-storage-daemon, %s" % (tmp_path / "nofuse")
    assert item.fix == ("apt-get install qemu-system-common; modprobe fuse (in a container: give it "
                        "--device /dev/fuse)")


def test_libguestfs_tools(tmp_path):
    fuse = tmp_path / "fuse"
    fuse.write_text("")
    assert doctor.check_libguestfs(which_of("guestfish"), str(fuse)).ok
    item = doctor.check_libguestfs(which_of(), str(fuse))
    assert not item.ok
    assert (item.detail, item.fix) == ("missing: guestfish", "apt-get install libguestfs-tools")


# --- the supermin kernel ----------------------------------------------------------------------

def bzimage(version):
    """The bytes of an x86 boot header with a version string, as supermin and file(1) read it."""
    data = bytearray(0x1000)
    data[514:518] = b"HdrS"
    data[518:520] = (0x20F).to_bytes(2, "little")
    data[526:528] = (0x300).to_bytes(2, "little")
    text = version.encode() + b" (debian-kernel@lists.debian.org) #1 SMP\0"
    data[0x500:0x500 + len(text)] = text
    return bytes(data)


class Tree:
    """/boot and /lib/modules in tmp_path."""

    def __init__(self, tmp_path):
        self.boot = tmp_path / "boot"
        self.mods = tmp_path / "lib/modules"
        self.boot.mkdir()
        self.mods.mkdir(parents=True)

    def kernel(self, version, modules=True, name=None):
        path = self.boot / (name or "vmlinuz-" + version)
        path.write_bytes(bzimage(version))
        if modules:
            (self.mods / version).mkdir(parents=True, exist_ok=True)
            (self.mods / version / "modules.dep").write_text("")
        return path

    def check(self, env=None, **kw):
        return doctor.check_supermin_kernel(env or {}, str(self.boot), str(self.mods), "x86_64",
                                            **kw)


def test_no_kernel_says_where_it_looked_and_how_to_fix(tmp_path):
    t = Tree(tmp_path)
    item = t.check()
    assert not item.ok
    assert item.detail == ("no kernel for supermin in %s with modules in %s (supermin builds the "
                           "libguestfs appliance from one; the running kernel %s is not there)"
                           % (t.boot, t.mods, os.uname().release))
    assert item.fix.startswith("apt-get install --no-install-recommends linux-image-cloud-amd64 ")
    assert "SUPERMIN_KERNEL" in item.fix and "SUPERMIN_MODULES" in item.fix


def test_boot_kernel_with_modules(tmp_path):
    t = Tree(tmp_path)
    k = t.kernel("6.1.0-57-cloud-amd64")
    item = t.check()
    assert item.ok
    assert item.detail == "%s (version 6.1.0-57-cloud-amd64, from %s) with modules %s" % (
        k, t.boot, t.mods / "6.1.0-57-cloud-amd64")


def test_boot_kernel_without_modules_is_not_used(tmp_path):
    """supermin skips a /boot kernel with no /lib/modules/VERSION/modules.dep."""
    t = Tree(tmp_path)
    t.kernel("6.1.0-57-cloud-amd64", modules=False)
    assert not t.check().ok


def test_newest_kernel_by_version_and_no_xen(tmp_path):
    t = Tree(tmp_path)
    t.kernel("6.1.0-9-amd64")
    newest = t.kernel("6.1.0-10-amd64")          # 10 > 9 as numbers, not as text
    t.kernel("6.1.0-99-xen-amd64")               # Xen kernels are never picked
    k = doctor.find_supermin_kernel({}, str(t.boot), str(t.mods), "x86_64")
    assert (k.kernel, k.version, k.source) == (str(newest), "6.1.0-10-amd64", str(t.boot))


def test_cpu_kernels_first_then_any(tmp_path):
    t = Tree(tmp_path)
    other = t.kernel("6.2.0-generic")            # no -amd64 suffix: only when none has one
    assert doctor.find_supermin_kernel({}, str(t.boot), str(t.mods), "x86_64").kernel == str(other)
    amd = t.kernel("6.1.0-1-amd64")
    assert doctor.find_supermin_kernel({}, str(t.boot), str(t.mods), "x86_64").kernel == str(amd)


def test_version_read_from_the_kernel_when_the_name_does_not_match(tmp_path):
    t = Tree(tmp_path)
    t.kernel("6.1.0-3-amd64", name="vmlinuz-custom-amd64")
    k = doctor.find_supermin_kernel({}, str(t.boot), str(t.mods), "x86_64")
    assert k.version == "6.1.0-3-amd64"


def test_lib_modules_vmlinuz_comes_before_boot(tmp_path):
    t = Tree(tmp_path)
    t.kernel("6.1.0-1-amd64")
    (t.mods / "6.5.0").mkdir()
    (t.mods / "6.5.0" / "vmlinuz").write_bytes(bzimage("6.5.0"))
    k = doctor.find_supermin_kernel({}, str(t.boot), str(t.mods), "x86_64")
    assert (k.kernel, k.version, k.source) == (str(t.mods / "6.5.0/vmlinuz"), "6.5.0", str(t.mods))


def test_supermin_env_vars(tmp_path):
    t = Tree(tmp_path)
    kernel = tmp_path / "my-vmlinuz"
    kernel.write_bytes(bzimage("6.9.1-test"))
    mods = tmp_path / "mods"
    mods.mkdir()
    item = t.check({"SUPERMIN_KERNEL": str(kernel), "SUPERMIN_MODULES": str(mods)})
    assert item.ok
    assert item.detail == "%s (version 6.9.1-test, from SUPERMIN_KERNEL) with modules %s" % (
        kernel, mods)

    item = t.check({"SUPERMIN_KERNEL": str(kernel), "SUPERMIN_MODULES": str(tmp_path / "none")})
    assert not item.ok
    assert item.detail.endswith("but its modules directory %s is missing or unreadable"
                                % (tmp_path / "none"))
    assert item.fix == "install the modules of kernel 6.9.1-test, or set SUPERMIN_MODULES"


def test_supermin_kernel_that_is_no_kernel_is_ignored(tmp_path):
    t = Tree(tmp_path)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel")
    item = t.check({"SUPERMIN_KERNEL": str(junk)})
    assert not item.ok
    assert item.detail.startswith("SUPERMIN_KERNEL=%s is not a readable kernel image (supermin "
                                  "ignores it); no kernel for supermin" % junk)
    good = t.kernel("6.1.0-57-cloud-amd64")
    k = doctor.find_supermin_kernel({"SUPERMIN_KERNEL": str(junk)}, str(t.boot), str(t.mods),
                                    "x86_64")
    assert k.kernel == str(good)


def test_unreadable_kernel(tmp_path):
    t = Tree(tmp_path)
    k = t.kernel("6.1.0-57-cloud-amd64")
    item = t.check(access=lambda path, mode: path != str(k))
    assert not item.ok
    assert item.detail.endswith("is not readable by uid %d" % os.geteuid())
    assert item.fix == ("chmod 0644 %s (some distributions install kernels 0600), or run as root"
                        % k)


def test_kernel_version_from_file(tmp_path):
    (tmp_path / "k").write_bytes(bzimage("6.1.0-57-cloud-amd64"))
    assert doctor.kernel_version_from_file(str(tmp_path / "k")) == "6.1.0-57-cloud-amd64"
    (tmp_path / "short").write_bytes(b"HdrS")
    assert doctor.kernel_version_from_file(str(tmp_path / "short")) is None
    assert doctor.kernel_version_from_file(str(tmp_path / "missing")) is None


# --- nbd ---------------------------------------------------------------------------------------

def test_nbd_loaded(tmp_path):
    (tmp_path / "nbd").mkdir()
    item = doctor.check_nbd_module(str(tmp_path), modinfo=lambda: pytest.fail("not needed"))
    assert item.ok and item.optional and item.detail == "loaded"


def test_nbd_available_and_missing(tmp_path):
    item = doctor.check_nbd_module(str(tmp_path), modinfo=lambda: (0, "/lib/modules/x/nbd.ko\n"))
    assert item.ok and item.detail.startswith("available for kernel ")
    item = doctor.check_nbd_module(
        str(tmp_path), modinfo=lambda: (1, "modinfo: ERROR: Module nbd not found.\n"))
    assert not item.ok and item.optional
    assert item.detail == ("kernel %s has no nbd module (modinfo nbd: modinfo: ERROR: Module nbd "
                           "not found.)" % os.uname().release)
    assert "--backend loop or guestfs" in item.fix
    assert item.line().startswith("\u2717 nbd-module (optional): kernel ")


# --- agent bundle -------------------------------------------------------------------------------

def test_agent_bundle_builds():
    item = doctor.check_agent_bundle()
    assert item.ok and item.detail.startswith("builds (")


def zipped(*names):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n in names:
            zf.writestr(n, "")
    return buf.getvalue()


@pytest.mark.parametrize("build, detail", [
    (lambda: b"garbage", "cannot build the agent bundle: File is not a zip file"),
    (lambda: zipped("__main__.py"), "the agent bundle lacks its entry point (1 files)"),
])
def test_agent_bundle_broken(build, detail):
    item = doctor.check_agent_bundle(build)
    assert not item.ok
    assert item.detail == detail
    assert item.fix == "reinstall guestlink (pip install --force-reinstall guestlink)"


# --- report, exit status, CLI -------------------------------------------------------------------

ITEMS = [doctor.Item("qemu", True, "found"),
         doctor.Item("nbd-module", False, "no nbd", "use loop", optional=True)]


def test_optional_failures_do_not_fail_the_run():
    assert doctor.exit_status(ITEMS) == 0
    assert doctor.exit_status(ITEMS + [doctor.Item("libvirt", False, "down", "start it")]) == 1


def test_report_text_and_json():
    out = io.StringIO()
    assert doctor.report(ITEMS, False, out) == 0
    assert out.getvalue() == ("\u2713 qemu: found\n"
                              "\u2717 nbd-module (optional): no nbd; fix: use loop\n")
    out = io.StringIO()
    doctor.report(ITEMS, True, out)
    assert json.loads(out.getvalue()) == [
        {"name": "qemu", "ok": True, "detail": "found", "fix": "", "optional": False},
        {"name": "nbd-module", "ok": False, "detail": "no nbd", "fix": "use loop",
         "optional": True}]


def test_report_on_an_ascii_terminal():
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    doctor.report(ITEMS, False, out)
    out.flush()
    assert out.buffer.getvalue().decode() == "ok qemu: found\nFAIL nbd-module (optional): no nbd; " \
                                             "fix: use loop\n"


def test_one_line_even_when_a_detail_has_several():
    assert doctor.Item("x", False, "a\nb", "c\n d").line() == "\u2717 x: a b; fix: c d"


def test_line_escapes_control_characters():
    # e.g. a version string read from a crafted /boot/vmlinuz-* header
    item = doctor.Item("k", True, "/boot/vmlinuz-x (version 6.1\x1b]0;pwned\x07)")
    assert item.line() == "\u2713 k: /boot/vmlinuz-x (version 6.1\\x1b]0;pwned\\x07)"


def test_cli_wiring(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(doctor, "run_checks", lambda *a: seen.append(a) or [
        doctor.Item("qemu", False, "not found: qemu-img", "apt-get install qemu-utils")])
    monkeypatch.setenv("GUESTLINK_DATA_NAME", "env.data")
    assert cli.main(["doctor", "--connect", "test:///default", "--ctl-name", "gl.ctl", "vm1"]) == 1
    assert seen == [("test:///default", "vm1", ("gl.ctl", "env.data"))]
    assert capsys.readouterr().out == ("\u2717 qemu: not found: qemu-img; fix: apt-get install "
                                       "qemu-utils\n")
    monkeypatch.delenv("GUESTLINK_DATA_NAME")
    assert cli.main(["doctor", "--json"]) == 1
    assert seen[-1] == (None, None, (None, None))
    assert json.loads(capsys.readouterr().out)[0]["name"] == "qemu"


# --- the guestfs backend's appliance error ------------------------------------------------------

def test_guestfs_appliance_error_says_why(tmp_path):
    """With no kernel for supermin, the error is doctor's verdict and fix, not `guestfish
    --remote=N failed`."""
    b = GuestfsBackend()
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bzimage("6.9.1-test"))
    b.env = {"SUPERMIN_KERNEL": str(kernel), "SUPERMIN_MODULES": str(tmp_path / "none")}
    b._last_error = CommandFailed(["guestfish", "--remote=4242", "--", "run"], 1, "")
    msg = str(b._appliance_failed())
    assert msg.startswith("the libguestfs appliance did not start: %s (version 6.9.1-test, from "
                          "SUPERMIN_KERNEL), but its modules directory %s is missing"
                          % (kernel, tmp_path / "none"))
    assert "fix: install the modules of kernel 6.9.1-test" in msg
    assert "run `guestlink doctor`" in msg and "--remote" not in msg and "\n" not in msg


def test_guestfs_appliance_error_with_a_kernel_quotes_libguestfs(tmp_path):
    b = GuestfsBackend()
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bzimage("6.9.1-test"))
    b.env = {"SUPERMIN_KERNEL": str(kernel), "SUPERMIN_MODULES": str(tmp_path)}
    b._last_error = CommandFailed(
        ["guestfish", "--remote=4242", "--", "run"], 1,
        "libguestfs: error: could not create appliance through libvirt.\nTry running qemu "
        "directly without libvirt\n")
    assert str(b._appliance_failed()) == (
        "the libguestfs appliance did not start: libguestfs: error: could not create appliance "
        "through libvirt. (run `guestlink doctor` for what this host lacks, libguestfs-test-tool "
        "for the appliance's own log)")
