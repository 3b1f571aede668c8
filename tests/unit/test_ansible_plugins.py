"""The Ansible collection without a VM: it ships in the wheel, ansible-core finds it on sys.path
(no ANSIBLE_COLLECTIONS_PATH), its documentation is valid, and options resolve in the documented
order (the end-to-end behaviour is tests/vm/test_ansible_e2e.py's)."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONN = "guestlink.guestlink.guestlink"
INV = "guestlink.guestlink.libvirt"


def clean_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "GUESTLINK_",
                                                                      "LIBVIRT_"))}
    env.update(ANSIBLE_HOME=str(tmp_path / "ansible-home"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"))
    env.update(extra)
    return env


def test_wheel_contains_the_collection(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                        str(tmp_path), str(REPO)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
    (wheel,) = tmp_path.glob("guestlink-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    base = "ansible_collections/guestlink/guestlink/"
    for f in ("galaxy.yml", "meta/runtime.yml", "plugins/connection/guestlink.py",
              "plugins/inventory/libvirt.py"):
        assert base + f in names, sorted(n for n in names if n.startswith("ansible_"))


@pytest.mark.parametrize("kind,name", [("connection", CONN), ("inventory", INV)])
def test_ansible_doc_finds_the_plugins_on_sys_path(tmp_path, kind, name):
    r = subprocess.run([str(BIN / "ansible-doc"), "-t", kind, "--json", name],
                       env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)[name]["doc"]
    options = doc["options"]
    if kind == "connection":
        for opt in ("remote_addr", "uri", "ctl_path", "data_path", "timeout", "command_timeout",
                    "queue_timeout", "pipelining", "remote_user"):
            assert opt in options, opt
        assert [v["name"] for v in options["pipelining"]["vars"]][0] == "ansible_pipelining"
    else:
        for opt in ("uris", "qualify", "running_only", "compose", "keyed_groups"):
            assert opt in options, opt


@pytest.fixture(scope="module", autouse=True)
def _collection_loader():
    """What ansible's CLIs do first: install the collection finder (it scans sys.path)."""
    from ansible.plugins.loader import init_plugin_loader

    init_plugin_loader()


def _resolve(var_options, env):
    """The connection plugin's options as ansible-core resolves them (public plugin loader)."""
    from ansible.playbook.play_context import PlayContext
    from ansible.plugins.loader import connection_loader

    old = dict(os.environ)
    for k in [k for k in os.environ if k.startswith(("ANSIBLE_", "GUESTLINK_", "LIBVIRT_"))]:
        del os.environ[k]
    os.environ.update(env)
    try:
        conn = connection_loader.get(CONN, PlayContext(), None)
        assert conn is not None, "ansible-core did not find %s on sys.path" % CONN
        conn.set_options(var_options=var_options)
        return {k: conn.get_option(k) for k in ("uri", "remote_addr", "timeout", "pipelining",
                                                "ctl_path", "queue_timeout")}
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_option_precedence():
    both_vars = {"inventory_hostname": "web1@hv2", "ansible_host": "web1",
                 "ansible_libvirt_uri": "qemu:///libvirt-var",
                 "ansible_guestlink_uri": "qemu:///guestlink-var", "ansible_pipelining": True}
    got = _resolve(both_vars, {"GUESTLINK_URI": "qemu:///gl-env",
                               "LIBVIRT_DEFAULT_URI": "qemu:///lv-env"})
    assert got["uri"] == "qemu:///guestlink-var"      # guestlink's var beats libvirt's, vars beat env
    assert got["remote_addr"] == "web1"               # ansible_host beats inventory_hostname
    assert got["pipelining"] is True and got["ctl_path"] is None
    got = _resolve({"ansible_libvirt_uri": "qemu:///libvirt-var"}, {"GUESTLINK_URI": "qemu:///gl-env"})
    assert got["uri"] == "qemu:///libvirt-var"
    got = _resolve({}, {"GUESTLINK_URI": "qemu:///gl-env", "LIBVIRT_DEFAULT_URI": "qemu:///lv-env"})
    assert got["uri"] == "qemu:///gl-env"             # GUESTLINK_URI beats LIBVIRT_DEFAULT_URI
    got = _resolve({}, {"LIBVIRT_DEFAULT_URI": "qemu:///lv-env"})
    assert got["uri"] == "qemu:///lv-env"
    assert got["timeout"] == 10 and got["queue_timeout"] == 1800


def test_inventory_labels():
    from ansible.plugins.loader import inventory_loader

    plugin = inventory_loader.get(INV)
    assert plugin is not None
    mod = sys.modules[type(plugin).__module__]
    assert mod._label("qemu:///system") == "local"
    assert mod._label("qemu+ssh://root@hv2.example/system") == "hv2.example"
    assert mod._label("qemu+unix:///system?socket=/run/x.sock") == "local"
