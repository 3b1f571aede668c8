"""The Ansible collection guestlink.guestlink against real test VMs with real ansible-core.

* ansible-core's own shared ``connection`` integration target (from the ansible-core sdist on
  PyPI, downloaded once into .cache/ansible-sdist/ and extracted here into a temp directory),
  with pipelining off and on;
* tests/ansible/plugin.yml: empty and 64 MiB binary files with checksums, names that need
  quoting, ``~/`` as root and as another user, rc/stdout/stderr, a signal, binary output, become
  (su without and with a password, a wrong password), async, a task ``timeout:``,
  ``reset_connection``, a template;
* ``-f 4`` against two VMs, two ansible-playbook runs at once against one VM;
* the connection to a VM whose agent does not answer fails at once as UNREACHABLE.

* the libvirt inventory plugin against the test libvirtd through two URIs, one of them
  qemu+ssh:// to a real sshd on 127.0.0.1 (test_remote_e2e.py's fixture), and a playbook through
  each.

The collection is found the way a user's is: ansible-core scans ``sys.path`` for
``ansible_collections/`` and the editable install puts ``src/`` there (no
ANSIBLE_COLLECTIONS_PATH).
"""

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLAYBOOKS = REPO / "tests" / "ansible"
BIN = Path(sys.executable).parent
SDIST_CACHE = REPO / ".cache" / "ansible-sdist"
CONNECTION = "guestlink.guestlink.guestlink"
NAMES = ["dollar$x", "back`tick", "it's", 'say "hi"', "back\\slash", "with space", "-leading",
         "ünï汉语"]


def ansible_env(tmp, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANSIBLE_", "GUESTLINK_"))}
    env.update({
        "PATH": "%s:%s" % (BIN, env.get("PATH", "/usr/bin:/bin")),
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-local"),
        "ANSIBLE_HOME": str(tmp / "ansible-home"),  # no ~/.ansible/collections shadowing ours
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_HOST_KEY_CHECKING": "0",
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(args, tmp, timeout=600, cwd=None, **extra):
    r = subprocess.run([str(a) for a in args], env=ansible_env(tmp, **extra), cwd=cwd,
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout)
    return r


def show(r, n=6000):
    return "exit %s\n%s" % (r.returncode, r.stdout[-n:])


def inventory(path, *vms, group="vms", extra=""):
    lines = ["[%s]" % group]
    for i, vm in enumerate(vms, 1):
        lines.append("vm%d ansible_guestlink_ctl=%s ansible_guestlink_data=%s" % (
            i, vm.ctl_path, vm.data_path))
    lines += ["", "[%s:vars]" % group, "ansible_connection=%s" % CONNECTION,
              "ansible_python_interpreter=/usr/bin/python3", extra]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def vms(make_vm):
    """Two test VMs with the real agent (booted once for the module)."""
    return make_vm(), make_vm()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("ansible")


def sdist():
    """ansible-core's sdist of the installed version (downloaded once, cached in .cache/)."""
    import ansible.release

    version = ansible.release.__version__
    path = SDIST_CACHE / ("ansible_core-%s.tar.gz" % version)
    if not path.is_file():
        SDIST_CACHE.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                            "--no-deps", "ansible-core==%s" % version, "-d", str(SDIST_CACHE)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert r.returncode == 0 and path.is_file(), "pip download of the ansible-core sdist " \
            "failed:\n" + r.stdout[-3000:]
    return path


def extract_target(dest):
    """test/integration/targets/connection/ of the sdist, extracted into ``dest``."""
    prefix = None
    with tarfile.open(sdist()) as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/")
            if (parts[1:5] == ["test", "integration", "targets", "connection"] and m.isfile()
                    and ".." not in parts and not m.name.startswith("/")):
                prefix = "/".join(parts[:5])
                members.append(m)
        assert members, "no test/integration/targets/connection in the ansible-core sdist"
        # extraction filters came with Python 3.11.4 (Debian 12 has 3.11.2): the members are
        # already plain files below the target, without ".." or absolute names
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **safe)
    target = dest / prefix
    assert (target / "test.sh").is_file() and (target / "test_connection.yml").is_file()
    return target


@pytest.mark.parametrize("pipelining", [False, True], ids=["pipelining-off", "pipelining-on"])
def test_upstream_connection_target(vms, work, pipelining):
    tmp = work / ("upstream-%s" % pipelining)
    tmp.mkdir()
    target = extract_target(tmp / "src")
    inv = inventory(tmp / "inventory.ini", vms[0], group="guestlink",
                    extra="ansible_pipelining=%s" % pipelining)
    r = run(["bash", "./test.sh", "-vvv", "-e", "target_hosts=guestlink", "-e", "action_prefix=",
             "-e", "local_tmp=%s" % (tmp / "local"), "-e", "remote_tmp=/tmp/upstream-%s" % pipelining],
            tmp, cwd=target, INVENTORY=inv)
    assert r.returncode == 0, show(r)
    assert "SUCCESS: Connection vars not found" in r.stdout
    recaps = [ln for ln in r.stdout.splitlines() if ln.startswith("vm1 ") and "ok=" in ln]
    # test_connection.yml's recap (the reset_connection playbooks run only a meta task: no
    # recap line; test.sh's `set -e` fails on their exit status)
    assert recaps and "ok=13 " in recaps[0] and "failed=0" in recaps[0] and \
        "unreachable=0" in recaps[0], show(r)
    assert r.stdout.count("META: reset connection") >= 2, show(r)
    # the plugin really was used, and pipelining really was on or off: without it every module
    # is uploaded (PUT of an AnsiballZ file), with it only the copied file is
    puts = [ln for ln in r.stdout.splitlines() if ln.startswith("<vm1> PUT ")]
    modules = [ln for ln in puts if "AnsiballZ_" in ln]
    assert any("汉语" in ln for ln in puts), show(r)
    assert (len(modules) == 0) == pipelining, "\n".join(puts)
    assert "GUESTLINK CONNECTED" in r.stdout


def test_plugin_playbook(vms, work):
    tmp = work / "plugin"
    local = tmp / "local"
    (local / "names").mkdir(parents=True)
    (local / "back").mkdir()
    big = tmp / "big.bin"
    big.write_bytes(os.urandom(64 << 20))
    extra = {"local_dir": str(local), "big_file": str(big),
             "big_sha256": hashlib.sha256(big.read_bytes()).hexdigest(), "names": NAMES,
             "become_pass": "s3cret pass"}
    (tmp / "extra.json").write_text(json.dumps(extra))
    inv = inventory(tmp / "inventory.ini", vms[0], extra="ansible_pipelining=true")
    r = run([BIN / "ansible-playbook", "-i", inv, PLAYBOOKS / "plugin.yml", "-e",
             "@%s" % (tmp / "extra.json")], tmp)
    assert r.returncode == 0, show(r)
    recap = [ln for ln in r.stdout.splitlines() if ln.startswith("vm1 ") and "ok=" in ln]
    assert recap and "failed=0" in recap[-1] and "unreachable=0" in recap[-1], show(r)
    # every file came back byte for byte
    assert (local / "big.back").read_bytes() == big.read_bytes()
    for name in NAMES:
        assert (local / "back" / name).read_text() == "content of %s\n" % name
    assert (local / "empty.back").read_bytes() == b""


def test_forks_against_two_vms_and_two_playbooks_on_one(vms, work):
    tmp = work / "parallel"
    tmp.mkdir()
    inv = inventory(tmp / "inventory.ini", *vms, extra="ansible_pipelining=true")
    r = run([BIN / "ansible-playbook", "-f", "4", "-i", inv, PLAYBOOKS / "parallel.yml",
             "-e", "target=all", "-e", "tag=forks"], tmp)
    assert r.returncode == 0, show(r)
    for host in ("vm1", "vm2"):
        assert any(ln.startswith(host + " ") and "failed=0" in ln and "unreachable=0" in ln
                   for ln in r.stdout.splitlines()), show(r)
    # two playbooks at once against one VM: their workers queue on the VM's lock, none fails
    env = ansible_env(tmp)
    procs = [subprocess.Popen([str(BIN / "ansible-playbook"), "-f", "4", "-i", str(inv),
                               str(PLAYBOOKS / "parallel.yml"), "-e", "target=vm1", "-e",
                               "tag=run%d" % i], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (1, 2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-5000:]
        assert any(ln.startswith("vm1 ") and "failed=0" in ln for ln in out.splitlines()), out


def test_unreachable_fails_at_once(vms, work, tmp_path):
    tmp = work / "unreachable"
    tmp.mkdir()
    dead = tmp_path / "no-such-vm.sock"
    (tmp / "inventory.ini").write_text(
        "dead ansible_connection=%s ansible_guestlink_ctl=%s\n" % (CONNECTION, dead))
    start = time.monotonic()
    r = run([BIN / "ansible", "-i", tmp / "inventory.ini", "all", "-m", "ping"], tmp, timeout=120)
    took = time.monotonic() - start
    assert r.returncode == 4, show(r)  # 4: a host was unreachable
    assert "UNREACHABLE" in r.stdout and str(dead) in r.stdout, show(r)
    assert "Traceback" not in r.stdout
    assert took < 60, "an absent socket must not wait for a timeout (%.1f s)" % took


def test_connect_cost_is_milliseconds(vms, work):
    """Each task's worker connects afresh: -vvv reports each connect's cost (sanity bound only;
    the numbers are in benchmarks/bench_ansible.py)."""
    tmp = work / "cost"
    tmp.mkdir()
    inv = inventory(tmp / "inventory.ini", vms[0], extra="ansible_pipelining=true")
    r = run([BIN / "ansible", "-vvv", "-i", inv, "vm1", "-m", "raw", "-a", "true"], tmp)
    assert r.returncode == 0, show(r)
    costs = [float(ln.split(" in ")[-1].split()[0]) for ln in r.stdout.splitlines()
             if "GUESTLINK CONNECTED" in ln]
    assert costs and all(0 < c < 5000 for c in costs), costs



# --- the inventory plugin against the real test libvirtd, and a "remote" hypervisor -------------

from test_libvirt_e2e import domains, libvirtd  # noqa: E402,F401  (fixtures)
from test_remote_e2e import sshd  # noqa: E402,F401  (fixture: a real sshd on 127.0.0.1)


def plain(obj):
    """ansible-inventory's JSON with its {"__ansible_unsafe": value} wrappers taken off."""
    if isinstance(obj, dict):
        if set(obj) == {"__ansible_unsafe"}:
            return obj["__ansible_unsafe"]
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def fleet(domains):
    """A running domain with guestlink channels, a shut-off one, and one without channels."""
    up = domains.define("ans-up")
    off = domains.define("ans-off", start=False)
    bare = domains.define("ans-bare", channels=False, start=False)
    return up, off, bare


def test_inventory_plugin_two_hypervisors(fleet, sshd, work):
    """Two hypervisors: qemu:///system and qemu+ssh://root@127.0.0.1:PORT/system (a real sshd in
    front of the same test libvirtd, as test_remote_e2e.py does), so every domain exists on both:
    equal names are kept apart as NAME@LABEL, each with its own URI; groups by hypervisor and
    state; a domain without channels is not listed; a playbook runs on the VM through each
    hypervisor; the shut-off one is UNREACHABLE at once, saying why."""
    up, off, bare = fleet
    tmp = work / "inventory"
    tmp.mkdir()
    ssh_env = sshd["env"]
    src = tmp / "fleet.guestlink.yml"
    src.write_text(json.dumps({
        "plugin": "guestlink.guestlink.libvirt",
        "uris": ["qemu:///system", {"uri": sshd["uri"], "name": "hv2"}],
        "compose": {"ansible_python_interpreter": "'/usr/bin/python3'"},
    }))
    r = run([BIN / "ansible-inventory", "-i", src, "--list"], tmp, **ssh_env)
    assert r.returncode == 0, show(r)
    inv = plain(json.loads(r.stdout[r.stdout.index("{"):]))
    hostvars = inv["_meta"]["hostvars"]
    for name in (up, off):
        for label, uri in (("local", "qemu:///system"), ("hv2", sshd["uri"])):
            hv = hostvars["%s@%s" % (name, label)]
            assert hv["ansible_host"] == name and hv["ansible_guestlink_uri"] == uri
            assert hv["ansible_connection"] == CONNECTION
            assert hv["guestlink_hypervisor"] == label
        assert name not in hostvars
    assert not any(h.startswith(bare) for h in hostvars)
    members = {g: set(v.get("hosts", [])) for g, v in inv.items() if g != "_meta"}
    assert {up + "@local", up + "@hv2"} <= members["state_running"]
    assert {off + "@local", off + "@hv2"} <= members["state_shut_off"]
    assert {up + "@hv2", off + "@hv2"} <= members["hypervisor_hv2"]
    assert not members["hypervisor_hv2"] & {up + "@local", off + "@local"}

    # a playbook on the running VM through each hypervisor, selected by group: here both hosts
    # are the SAME VM, reached once directly and once through the ssh forward of its sockets.
    # One run per hypervisor, the local one first: a connection through the forward can outlive
    # its client on the hypervisor's side for a while (ssh half-closes the forwarded socket;
    # QEMU's chardev serves one connection), so the direct client after it may wait for the
    # data socket (seen once: "no progress on the data port for 60 s"). With two real
    # hypervisors they are two VMs and this does not arise; see the closing note of issue 13.
    for label in ("local", "hv2"):
        r = run([BIN / "ansible-playbook", "-i", src, PLAYBOOKS / "parallel.yml",
                 "-e", "target=state_running", "-e", "tag=inv-" + label,
                 "--limit", "%s@%s" % (up, label)], tmp, timeout=300, **ssh_env)
        assert r.returncode == 0, show(r)
        assert any(ln.startswith("%s@%s " % (up, label)) and "failed=0" in ln
                   and "unreachable=0" in ln for ln in r.stdout.splitlines()), show(r)

    start = time.monotonic()
    r = run([BIN / "ansible", "-i", src, off + "@local", "-m", "raw", "-a", "true"], tmp, **ssh_env)
    assert r.returncode == 4 and "UNREACHABLE" in r.stdout, show(r)
    assert "not running" in r.stdout and off in r.stdout, show(r)
    assert time.monotonic() - start < 60


def test_inventory_plugin_refuses_a_merge(fleet, sshd, work):
    tmp = work / "inventory-never"
    tmp.mkdir()
    src = tmp / "fleet.guestlink.yml"
    src.write_text(json.dumps({"plugin": "guestlink.guestlink.libvirt", "qualify": "never",
                               "uris": ["qemu:///system", sshd["uri"]]}))
    r = run([BIN / "ansible-inventory", "-i", src, "--list"], tmp,
            ANSIBLE_INVENTORY_UNPARSED_FAILED=1, **sshd["env"])
    assert r.returncode != 0 and "more than one hypervisor" in r.stdout, show(r)
