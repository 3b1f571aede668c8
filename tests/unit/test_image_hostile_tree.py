"""A hostile guest tree against `guestlink image`: planted links, devices, FIFOs, huge files and
crafted manifests must never reach the host, hang, exhaust memory or end in a traceback.

Every command runs through the real CLI (``--root DIR``) in a subprocess with a memory limit and
a timeout, so a regression fails here instead of eating the machine or hanging the suite.
Links point at canary files under tmp_path, never at real host files.
"""

import io
import json
import os
import resource
import stat
import subprocess
import sys
import tracemalloc
import zipfile

import pytest

from test_image import REPO, make_root, pyz, snapshot  # noqa: F401 (pyz is a fixture)

from guestlink.image import tree as T
from guestlink.image.errors import ImageError

CANARY_TEXT = b"precious host data\n"
CANARY_MODE = 0o600
TEMP = T._TMP_SUFFIX
MEMORY_LIMIT = 1 << 30  # a MemoryError under this limit is the regression, not an OOM kill


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
    return subprocess.run([sys.executable, "-m", "guestlink", "image"] + list(args), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout, preexec_fn=_limit_memory)


def assert_one_line_error(r: subprocess.CompletedProcess, code: int = 65) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("guestlink: error:")]
    assert len(errors) == 1, r.stderr


def canary(tmp_path) -> str:
    host = tmp_path / "host"
    host.mkdir(exist_ok=True)
    path = host / "canary"
    path.write_bytes(CANARY_TEXT)
    os.chmod(path, CANARY_MODE)
    return str(path)


def assert_canary_untouched(path: str) -> None:
    with open(path, "rb") as f:
        assert f.read() == CANARY_TEXT
    assert stat.S_IMODE(os.lstat(path).st_mode) == CANARY_MODE


def plant(root, gpath: str):
    """The host path of guest path ``gpath`` (its parent directories are created)."""
    p = root / gpath.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def assert_regular_with(root, gpath: str, expected: bytes) -> None:
    p = root / gpath.lstrip("/")
    st = os.lstat(p)
    assert stat.S_ISREG(st.st_mode), "%s is not a regular file" % gpath
    assert p.read_bytes() == expected


# --- staged temp names ---------------------------------------------------------------------------

STAGED_FILES = [T.CONFIG, T.AGENT_PYZ, T.WRAPPER, T.MODULES_CONF, T.SYSV_SCRIPT, T.MANIFEST]


@pytest.mark.parametrize("gpath", STAGED_FILES)
def test_symlink_at_a_temp_name_never_writes_the_host_file(tmp_path, pyz, gpath):
    root = make_root(tmp_path / "img", "sysv")
    target = canary(tmp_path)
    os.symlink(target, plant(root, gpath + TEMP))
    r = run_cli("install", "--root", str(root), "-q")
    assert r.returncode == 0, r.stderr
    assert_canary_untouched(target)
    if gpath == T.AGENT_PYZ:
        assert_regular_with(root, gpath, pyz)
    assert stat.S_ISREG(os.lstat(root / gpath.lstrip("/")).st_mode)
    assert not os.path.lexists(root / (gpath + TEMP).lstrip("/"))


@pytest.mark.parametrize("gpath", [T.CONFIG, T.MANIFEST, T.RC_LOCAL])
def test_symlink_to_a_missing_host_path_creates_nothing_on_the_host(tmp_path, gpath):
    root = make_root(tmp_path / "img", "none")
    missing = tmp_path / "host" / "created-by-install"
    missing.parent.mkdir()
    os.symlink(str(missing), plant(root, gpath + TEMP))
    r = run_cli("install", "--root", str(root), "-q", "--init", "rc.local")
    assert r.returncode == 0, r.stderr
    assert not os.path.lexists(missing)
    assert list(missing.parent.iterdir()) == []


def test_fifo_at_a_temp_name_is_not_opened(tmp_path):
    root = make_root(tmp_path / "img", "sysv")
    os.mkfifo(plant(root, T.CONFIG + TEMP))
    r = run_cli("install", "--root", str(root), "-q", timeout=60)  # old code: blocks forever
    assert r.returncode == 0, r.stderr
    assert b"[agent]" in (root / T.CONFIG.lstrip("/")).read_bytes()
    assert stat.S_ISREG(os.lstat(root / T.CONFIG.lstrip("/")).st_mode)


def test_device_node_at_a_temp_name_is_not_written(tmp_path):
    root = make_root(tmp_path / "img", "sysv")
    # 1:3 is /dev/null: harmless if a regression writes it, still visible as a char device
    os.mknod(plant(root, T.CONFIG + TEMP), stat.S_IFCHR | 0o600, os.makedev(1, 3))
    r = run_cli("install", "--root", str(root), "-q")
    assert r.returncode == 0, r.stderr
    conf = root / T.CONFIG.lstrip("/")
    assert stat.S_ISREG(os.lstat(conf).st_mode), "the planted device became the config"
    assert b"[agent]" in conf.read_bytes()


def test_remove_never_writes_rc_local_through_a_planted_temp_link(tmp_path):
    original = "#!/bin/sh\necho mine\nexit 0\n"
    root = make_root(tmp_path / "img", "none", rc_local=original)
    assert run_cli("install", "--root", str(root), "-q").returncode == 0
    target = canary(tmp_path)
    os.symlink(target, root / ("etc/rc.local" + TEMP))
    r = run_cli("remove", "--root", str(root), "-q")
    assert r.returncode == 0, r.stderr
    assert_canary_untouched(target)
    assert (root / "etc/rc.local").read_text() == original
    assert stat.S_IMODE(os.lstat(root / "etc/rc.local").st_mode) == 0o644


def test_remove_never_unlinks_or_restores_through_links(tmp_path, pyz):
    """A backup or a file that became a link to the host by the time of remove: remove works on
    the names inside the guest only."""
    root = make_root(tmp_path / "img", "sysv")
    (root / "usr/local/sbin").mkdir(parents=True)
    (root / "usr/local/sbin/guestlink-agent").write_text("#!/bin/sh\necho mine\n")
    assert run_cli("install", "--root", str(root), "-q").returncode == 0
    target = canary(tmp_path)
    backup = root / ("var/lib/guestlink/backup" + T.WRAPPER)
    backup.unlink()
    os.symlink(target, backup)  # the backup is now an absolute link out of the guest
    r = run_cli("remove", "--root", str(root), "-q")
    assert r.returncode == 0, r.stderr
    assert_canary_untouched(target)
    restored = root / T.WRAPPER.lstrip("/")
    assert os.path.islink(restored) and os.readlink(restored) == target  # the link, not the file


def test_symlinked_directories_pointing_outside_stay_inside_the_root(tmp_path, pyz):
    root = make_root(tmp_path / "img", "sysv")
    outside = tmp_path / "host" / "etc-guestlink"
    outside.mkdir(parents=True)
    (root / str(outside).lstrip("/")).mkdir(parents=True)
    os.symlink(str(outside), root / "etc/guestlink")
    backup_out = tmp_path / "host" / "backup"
    backup_out.mkdir()
    (root / "var/lib").mkdir(parents=True)
    os.symlink(str(backup_out), root / "var/lib/guestlink")
    r = run_cli("install", "--root", str(root), "-q")
    assert r.returncode == 0, r.stderr
    assert list(outside.iterdir()) == [] and list(backup_out.iterdir()) == []
    assert (root / str(outside).lstrip("/") / "agent.conf").is_file()
    assert (root / str(backup_out).lstrip("/") / "install.json").is_file()
    assert run_cli("remove", "--root", str(root), "-q").returncode == 0
    assert not (root / str(outside).lstrip("/") / "agent.conf").exists()


# --- reads of the image tree ------------------------------------------------------------------

def test_modules_builtin_linked_to_dev_zero_is_not_read(tmp_path):
    root = make_root(tmp_path / "img", "sysv")
    os.symlink("/dev/zero", plant(root, "/lib/modules/6.1.0/modules.builtin"))
    r = run_cli("install", "--root", str(root), "-q", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "virtio_pci" in (root / T.MODULES_CONF.lstrip("/")).read_text()


def test_modules_builtin_device_node_is_not_opened(tmp_path):
    root = make_root(tmp_path / "img", "sysv")
    os.mknod(plant(root, "/lib/modules/6.1.0/modules.builtin"), stat.S_IFCHR | 0o600,
             os.makedev(1, 5))  # /dev/zero
    r = run_cli("install", "--root", str(root), "-q", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "virtio_pci" in (root / T.MODULES_CONF.lstrip("/")).read_text()


def test_kernel_directory_linked_out_of_the_root_reads_the_guest_not_the_host(tmp_path):
    root = make_root(tmp_path / "img", "sysv")
    host_kernel = tmp_path / "host" / "6.1.0"
    host_kernel.mkdir(parents=True)
    (host_kernel / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    (root / "lib/modules").mkdir(parents=True)
    os.symlink(str(host_kernel), root / "lib/modules/6.1.0")
    assert T.virtio_modules(T.Tree(str(root))) == ["virtio_pci", "virtio_console"]


def test_oversized_modules_builtin_is_ignored(tmp_path):
    root = make_root(tmp_path / "img", "sysv")
    builtin = plant(root, "/lib/modules/6.1.0/modules.builtin")
    builtin.write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    os.truncate(builtin, 8 << 30)
    assert T.virtio_modules(T.Tree(str(root))) == ["virtio_pci", "virtio_console"]


def test_sparse_8gib_config_is_bounded(tmp_path):
    root = make_root(tmp_path / "img", "sysv")
    conf = plant(root, T.CONFIG)
    conf.write_text("[agent]\n")
    os.truncate(conf, 8 << 30)
    r = run_cli("install", "--root", str(root), "-q", "--json")
    assert r.returncode == 0, r.stderr
    assert any("kept the existing /etc/guestlink/agent.conf" in n
               for n in json.loads(r.stdout)["notes"])
    assert os.stat(conf).st_size == 8 << 30
    r = run_cli("status", "--root", str(root), "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""


def test_our_config_grown_to_8gib_is_reported_modified_and_kept(tmp_path):
    root = make_root(tmp_path / "img", "sysv")
    assert run_cli("install", "--root", str(root), "-q").returncode == 0
    conf = root / T.CONFIG.lstrip("/")
    os.truncate(conf, 8 << 30)
    r = run_cli("status", "--root", str(root), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["modified"] is True
    r = run_cli("remove", "--root", str(root), "--json")
    assert r.returncode == 0, r.stderr
    assert any("kept /etc/guestlink/agent.conf" in n for n in json.loads(r.stdout)["notes"])


@pytest.mark.parametrize("gpath", [T.CONFIG, T.AGENT_PYZ])
def test_fifo_in_place_of_an_installed_file_does_not_hang_status(tmp_path, gpath):
    root = make_root(tmp_path / "img", "sysv")
    assert run_cli("install", "--root", str(root), "-q").returncode == 0
    p = root / gpath.lstrip("/")
    p.unlink()
    os.mkfifo(p)
    r = run_cli("status", "--root", str(root), "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert [f["state"] for f in st["files"] if f["path"] == gpath] == ["modified"]


def test_fifo_manifest_is_a_one_line_error(tmp_path):
    root = make_root(tmp_path / "img", "sysv")
    os.mkfifo(plant(root, T.MANIFEST))
    for cmd in ("status", "install", "remove"):
        r = run_cli(cmd, "--root", str(root), "-q", timeout=60)
        assert_one_line_error(r)
        assert "not a regular file" in r.stderr


def test_huge_manifest_is_a_one_line_error(tmp_path):
    root = make_root(tmp_path / "img", "sysv")
    man = plant(root, T.MANIFEST)
    man.write_text('{"entries": []}')
    os.truncate(man, 8 << 30)
    r = run_cli("status", "--root", str(root), "-q")
    assert_one_line_error(r)
    assert "too large" in r.stderr


def test_agent_bundle_with_a_zip_bomb_version_file_is_not_inflated():
    """``image status`` reads the version from the agent found in the image."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("guestlink/_version.py", b"#" * (64 << 20) + b'\n__version__ = "6.6.6"\n')
    tracemalloc.start()
    try:
        assert T.pyz_version(buf.getvalue()) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, "inflated %d bytes" % peak


# --- crafted manifests --------------------------------------------------------------------------

GOOD_FILE = {"path": T.WRAPPER, "kind": "file", "sha256": "0" * 64}
CRAFTED = {
    "entry-not-a-dict": {"entries": [1]},
    "path-not-a-string": {"entries": [{"path": 5, "kind": "file"}]},
    "path-missing": {"entries": [{"kind": "file"}]},
    "relative-path": {"entries": [{"path": "etc/hostname", "kind": "file"}]},
    "dotdot-path": {"entries": [{"path": "/etc/../etc/hostname", "kind": "file"}]},
    "unknown-kind": {"entries": [dict(GOOD_FILE, kind="device")]},
    "bad-sha": {"entries": [dict(GOOD_FILE, sha256=["x"])]},
    "mode-out-of-range": {"entries": [{"path": "/etc/rc.local", "kind": "block",
                                       "mode_before": 99999999999999999999}]},
    "mode-a-string": {"entries": [{"path": "/etc/rc.local", "kind": "block", "mode_before": "x"}]},
    "backup-elsewhere": {"entries": [dict(GOOD_FILE, backup="/etc/shadow")]},
    "created-dirs-not-a-list": {"entries": [], "created_dirs": 5},
    "created-dir-relative": {"entries": [], "created_dirs": ["etc"]},
    "version-not-a-string": {"entries": [], "agent_version": {"a": 1}},
    "ctl-name-a-list": {"entries": [], "ctl_name": ["x"]},
    "init-unknown": {"entries": [], "init": "upstart"},
    "symlink-target-not-a-string": {"entries": [{"path": "/etc/x", "kind": "symlink",
                                                 "target": 7}]},
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
@pytest.mark.parametrize("cmd", ["status", "install", "remove"])
def test_crafted_manifest_is_one_line_error(tmp_path, name, cmd):
    root = make_root(tmp_path / "img", "none")
    (root / "etc/hostname").write_text("guest\n")
    (root / "etc/rc.local").write_text("#!/bin/sh\nexit 0\n")
    plant(root, T.MANIFEST).write_text(json.dumps(CRAFTED[name]))
    before = snapshot(root)
    r = run_cli(cmd, "--root", str(root), "-q")
    assert_one_line_error(r)
    assert T.MANIFEST in r.stderr
    assert snapshot(root) == before


@pytest.mark.parametrize("text", ["[" * 10000 + "]" * 10000,
                                  '{"entries": [], "x": ' + '{"a": ' * 10000 + "1" + "}" * 10001,
                                  '{"entries": [], "agent_version": NaN}'])
def test_deeply_nested_or_non_standard_manifest_is_one_line_error(tmp_path, text):
    root = make_root(tmp_path / "img", "sysv")
    plant(root, T.MANIFEST).write_text(text)
    for cmd in ("status", "install", "remove"):
        assert_one_line_error(run_cli(cmd, "--root", str(root), "-q"))


def test_manifest_validation_accepts_what_install_writes(tmp_path, pyz):
    root = make_root(tmp_path / "img", "none", rc_local="#!/bin/sh\nexit 0\n")
    (root / "usr/local/sbin").mkdir(parents=True)
    (root / "usr/local/sbin/guestlink-agent").write_text("mine\n")
    T.Installer(T.Tree(str(root))).install(pyz)
    man = T.read_manifest(T.Tree(str(root)))
    assert {e["kind"] for e in man["entries"]} == {"file", "config", "block"}
    assert any(e.get("backup") == T.BACKUP_DIR + T.WRAPPER for e in man["entries"])
    with pytest.raises(ImageError, match="damaged"):
        T.validate_manifest(dict(man, entries=man["entries"] + [{"path": "/x/", "kind": "file"}]))


def test_rc_local_that_is_a_directory_is_a_clean_error(tmp_path):
    root = make_root(tmp_path / "img", "none")
    (root / "etc/rc.local").mkdir()
    r = run_cli("install", "--root", str(root), "-q", "--init", "rc.local")
    assert_one_line_error(r)
    assert "/etc/rc.local" in r.stderr and "not a regular file" in r.stderr
    assert (root / "etc/rc.local").is_dir()


def test_rc_local_replaced_by_a_directory_before_remove_is_a_clean_error(tmp_path):
    root = make_root(tmp_path / "img", "none", rc_local="#!/bin/sh\nexit 0\n")
    assert run_cli("install", "--root", str(root), "-q").returncode == 0
    (root / "etc/rc.local").unlink()
    (root / "etc/rc.local").mkdir()
    for cmd in ("remove", "status"):
        r = run_cli(cmd, "--root", str(root), "-q")
        assert_one_line_error(r)
        assert "/etc/rc.local" in r.stderr


# --- printing -------------------------------------------------------------------------------------

def test_status_escapes_manifest_fields(tmp_path):
    root = make_root(tmp_path / "img", "sysv")
    assert run_cli("install", "--root", str(root), "-q").returncode == 0
    man_path = root / T.MANIFEST.lstrip("/")
    man = json.loads(man_path.read_text())
    man.update(previous_version="0.0\x1b]0;pwned\x07", installed_at="now\u202e\x1b[2J")
    man["entries"].append({"path": "/etc/x\x1b[2J", "kind": "symlink", "target": "y"})
    man_path.write_text(json.dumps(man))
    r = run_cli("status", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\u202e" not in r.stdout
    assert "\\x1b]0;pwned\\x07" in r.stdout and "now\\u202e\\x1b[2J" in r.stdout
    assert "/etc/x\\x1b[2J" in r.stdout


def test_symlink_loop_at_the_agent_does_not_break_status(tmp_path):
    root = make_root(tmp_path / "img", "sysv")
    assert run_cli("install", "--root", str(root), "-q").returncode == 0
    pyz_path = root / T.AGENT_PYZ.lstrip("/")
    pyz_path.unlink()
    os.symlink(T.AGENT_PYZ, pyz_path)  # points at itself
    r = run_cli("status", "--root", str(root), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["agent_version"] is None
    assert [f["state"] for f in st["files"] if f["path"] == T.AGENT_PYZ] == ["modified"]


def test_symlink_loop_in_a_directory_is_a_one_line_error(tmp_path):
    root = make_root(tmp_path / "img", "sysv")
    os.symlink("/etc/guestlink", root / "etc/guestlink")
    before = snapshot(root)
    r = run_cli("install", "--root", str(root), "-q")
    assert_one_line_error(r, 70)
    assert "symbolic links" in r.stderr
    assert snapshot(root) == before


def test_directories_install_creates_do_not_depend_on_the_umask(tmp_path, pyz):
    """What install leaves in the image does not depend on the installing user's umask: its
    directories are 0755 (a umask of 077 made them 0700), its files have their planned modes."""
    root = make_root(tmp_path / "img", "sysv")
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
    r = subprocess.run(["sh", "-c", 'umask 077; exec "$@"', "sh", sys.executable, "-m",
                        "guestlink", "image", "install", "--root", str(root), "-q"],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    for gdir in ("/etc/guestlink", "/usr/local/lib/guestlink", "/var/lib/guestlink"):
        mode = stat.S_IMODE(os.lstat(root / gdir.lstrip("/")).st_mode)
        assert mode == 0o755, "%s is %o" % (gdir, mode)
    assert stat.S_IMODE(os.lstat(root / T.CONFIG.lstrip("/")).st_mode) == 0o644
