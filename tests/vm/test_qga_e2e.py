"""The qemu-ga fallback end to end: Debian's real qemu-guest-agent in the test guest, reached
through its raw socket (plain QEMU) and through a real libvirtd domain (virsh qemu-agent-command).

VMs (module-scoped, one boot each): ``plain`` is a VM as people run it before enrolling (qemu-ga,
no guestlink channels, no agent); ``both`` has guestlink's agent and qemu-ga; ``noqga`` has the
qemu-ga port but no qemu-ga running; the libvirt domain has only a qemu-ga channel.
"""

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import guestlink
from guestlink.host import errors as E
from test_libvirt_e2e import Domains, domain_xml, libvirtd, virsh  # noqa: F401  (fixture)
from vmhelpers import clean_env

REPO = Path(__file__).resolve().parents[2]
NOTE = "using qemu-guest-agent"


def gl(*args, env=None, input=None, timeout=180):
    """The real CLI, with only the GUESTLINK_* variables given in ``env``."""
    e = clean_env()
    e["PYTHONPATH"] = str(REPO / "src")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "guestlink"] + [str(a) for a in args], env=e,
                          input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout)


def notes(r):
    return [ln for ln in r.stderr.decode().splitlines() if NOTE in ln]


@pytest.fixture(scope="module")
def plain(make_vm):
    return make_vm(agent_pyz=None, qga=True, guestlink_ports=False)


@pytest.fixture(scope="module")
def both(make_vm):
    return make_vm(qga=True)


@pytest.fixture(scope="module")
def qenv(plain):
    return {"GUESTLINK_QGA": plain.qga_path}


def _wait_qga(path, timeout=60):
    async def main():
        async with guestlink.connect(qga=path, via="qga", timeout=timeout) as vm:
            return await vm.ping()
    return asyncio.run(main())


# --- plain QEMU, the raw socket ----------------------------------------------------------------

def test_ping_and_info_through_the_raw_socket(plain, qenv):
    _wait_qga(plain.qga_path)
    r = gl("ping", env=qenv)
    assert r.returncode == 0, r.stderr
    assert b"pong from guestlink-testvm (qemu-ga 7." in r.stdout
    assert len(notes(r)) == 1 and "guestlink enroll" in notes(r)[0]
    r = gl("info", "--json", env=qenv)
    info = json.loads(r.stdout)
    assert info["via"] == "qga" and info["hostname"] == "guestlink-testvm"
    assert info["kernel"]["machine"] == "x86_64" and info["agent_version"].startswith("qemu-ga ")
    # guestlink's channel given but absent: the note says why qemu-ga is used
    r = gl("ping", "--ctl", str(Path(plain.qga_path).parent / "ctl.sock"), env=qenv)
    assert r.returncode == 0 and "does not exist" in notes(r)[0]


def test_exec_stdin_exit_code_signal_timeout(plain, qenv):
    r = gl("exec", "--", "sh", "-c", "tr a-z A-Z; echo err >&2; exit 3", env=qenv,
           input=b"hello qemu-ga\n")
    assert (r.returncode, r.stdout) == (3, b"HELLO QEMU-GA\n"), r.stderr
    assert b"err\n" in r.stderr
    r = gl("exec", "-n", "--", "sh", "-c", "kill -TERM $$", env=qenv)
    assert r.returncode == 128 + 15
    r = gl("exec", "-n", "--timeout", "2", "--", "sleep", "60", env=qenv)
    assert r.returncode == 124 and b"--timeout" in r.stderr
    r = gl("exec", "-n", "--", "/no/such/program", env=qenv)
    assert r.returncode == 127 and r.stderr.count(b"guestlink: error:") == 1
    r = gl("exec", "-n", "--json", "--", "sh", "-c", "printf out; exit 4", env=qenv)
    obj = json.loads(r.stdout)
    assert (r.returncode, obj["stdout"], obj["returncode"]) == (4, "out", 4)


def test_the_output_cap_is_said_not_silently_applied(plain, qenv):
    r = gl("exec", "-n", "--", "head", "-c", str(16 * 1024 * 1024 + 4096), "/dev/zero", env=qenv)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == 16 * 1024 * 1024
    assert b"cut at qemu-ga's 16 MiB output cap" in r.stderr


def test_cp_both_ways_and_run(plain, qenv, tmp_path):
    src = tmp_path / "src.bin"
    data = os.urandom(1536 * 1024 + 7)
    src.write_bytes(data)
    r = gl("cp", src, ":/tmp/dst.bin", env=qenv)
    assert r.returncode == 0, r.stderr
    assert len(notes(r)) == 1
    r = gl("exec", "-n", "--", "sha256sum", "/tmp/dst.bin", env=qenv)
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    r = gl("exec", "-n", "--", "ls", "-a", "/tmp", env=qenv)
    assert b".part" not in r.stdout  # the temporary name was renamed away
    back = tmp_path / "back.bin"
    r = gl("cp", "--json", ":/tmp/dst.bin", back, env=qenv)
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == data
    assert json.loads(r.stdout)["sha256"] == hashlib.sha256(data).hexdigest()
    r = gl("cp", ":/tmp/absent", tmp_path / "x", env=qenv)
    assert r.returncode == 70 and b"No such file" in r.stderr and not (tmp_path / "x").exists()
    script = tmp_path / "s.sh"
    script.write_text('echo "args: $*"; exit 6\n')
    r = gl("run", script, "a", "b c", env=qenv)
    assert (r.returncode, r.stdout) == (6, b"args: a b c\n"), r.stderr


def test_library_push_pull_progress_and_exec_timeout(plain, tmp_path):
    data = os.urandom(2 * 1024 * 1024 + 3)
    (tmp_path / "f").write_bytes(data)
    seen = []

    async def main():
        async with guestlink.connect(qga=plain.qga_path, timeout=30) as vm:
            assert vm.via == "qga"
            res = await vm.push(tmp_path / "f", "/tmp/lib.bin",
                                progress=lambda d, t: seen.append((d, t)))
            assert res.verified and res.bytes == len(data)
            res = await vm.pull("/tmp/lib.bin", tmp_path / "g")
            assert res.digest == hashlib.sha256(data).hexdigest()
            with pytest.raises(E.CommandTimedOut):
                await vm.run(["sleep", "60"], timeout=1)
            r = await vm.run(["cat"], input=b"x" * 100000)
            assert r.stdout == b"x" * 100000
    asyncio.run(main())
    assert (tmp_path / "g").read_bytes() == data
    assert seen[-1] == (len(data), len(data)) and len(seen) >= 3


def test_via_guestlink_on_a_guest_without_it_fails_clearly(plain, qenv):
    r = gl("ping", "--via", "guestlink", "--ctl", str(Path(plain.qga_path).parent / "ctl.sock"),
           env=qenv)
    assert r.returncode == 69
    err = r.stderr.decode()
    assert err.startswith("guestlink: error: ") and err.count("\n") == 1 and NOTE not in err


# --- a guest with both agents -------------------------------------------------------------------

def test_via_qga_on_a_guest_that_has_both(both):
    env = {"GUESTLINK_CTL": both.ctl_path, "GUESTLINK_DATA": both.data_path,
           "GUESTLINK_QGA": both.qga_path}
    _wait_qga(both.qga_path)
    r = gl("ping", "--via", "guestlink", "--timeout", "60", env=env)  # the agent is up
    assert r.returncode == 0, r.stderr
    r = gl("info", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["via"] == "guestlink", r.stderr
    assert not notes(r)
    r = gl("info", "--json", "--via", "qga", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["via"] == "qga", r.stderr
    assert len(notes(r)) == 1
    r = gl("exec", "--via", "qga", "--", "cat", env=env, input=b"both")
    assert (r.returncode, r.stdout) == (0, b"both")
    # guestlink's agent stopped (init's respawn loop told to wait): auto falls back, and says why
    r = gl("exec", "-n", "--via", "qga", "--", "sh", "-c",
           "touch /run/guestlink-stopping; kill $(cat /run/guestlink-agent.pid)", env=env)
    assert r.returncode == 0, r.stderr
    r = gl("ping", env=env)
    assert r.returncode == 0 and b"(qemu-ga 7." in r.stdout, r.stderr
    assert len(notes(r)) == 1 and "did not answer" in notes(r)[0]


# --- qemu-ga absent --------------------------------------------------------------------------------

def test_qemu_ga_absent_is_a_clear_error(make_vm):
    vm = make_vm(agent_pyz=None, qga=True, guestlink_ports=False, append="guestlink.noqga=1")
    vm.wait_for_console("qemu-ga disabled")
    r = gl("ping", "--timeout", "3", env={"GUESTLINK_QGA": vm.qga_path})
    assert r.returncode == 75
    assert b"qemu-ga did not answer" in r.stderr and b"qemu-guest-agent installed" in r.stderr
    vm.stop()
    r = gl("ping", "--via", "qga")
    assert r.returncode == 2 and b"--qga PATH" in r.stderr


# --- a libvirt domain: virsh qemu-agent-command --------------------------------------------------

QGA_CHANNEL = """    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>"""


@pytest.fixture(scope="module")
def qga_domain(libvirtd, testvm_base):  # noqa: F811  (libvirtd is the imported fixture)
    doms = Domains(None)
    name = "guestlink-e2e-qga"
    workdir = doms.dir / "qga"
    workdir.mkdir(mode=0o755)
    xml = domain_xml(name, workdir, doms.dir / "vmlinuz", doms.dir / "initrd.img", QGA_CHANNEL,
                     append="guestlink.nports=1")
    (workdir / "domain.xml").write_text(xml)
    virsh("define", str(workdir / "domain.xml"))
    doms.names.append(name)
    virsh("start", name)
    yield name
    doms.close()


def _wait_domain_qga(name, timeout=120):
    import time
    deadline = time.monotonic() + timeout
    while True:
        r = virsh("qemu-agent-command", name, '{"execute":"guest-ping"}', check=False)
        if r.returncode == 0:
            return
        assert time.monotonic() < deadline, r.stderr
        time.sleep(1)


def test_domain_without_channels_falls_back_through_libvirt(qga_domain, tmp_path):
    _wait_domain_qga(qga_domain)
    env = {"GUESTLINK_LIBVIRT_BACKEND": "virsh"}
    r = gl("ping", qga_domain, env=env)
    assert r.returncode == 0, r.stderr
    note = notes(r)
    assert len(note) == 1 and "guestlink enroll %s" % qga_domain in note[0]
    assert "has no guestlink channels" in note[0]
    r = gl("info", "--json", qga_domain, env=env)
    assert json.loads(r.stdout)["via"] == "qga"
    r = gl("exec", qga_domain, "--", "sh", "-c", "cat; exit 9", env=env, input=b"via libvirt")
    assert (r.returncode, r.stdout) == (9, b"via libvirt"), r.stderr
    data = os.urandom(300 * 1024 + 5)  # several 90 KiB chunks: virsh takes one argv word each
    (tmp_path / "a").write_bytes(data)
    r = gl("cp", tmp_path / "a", "%s:/tmp/a" % qga_domain, env=env)
    assert r.returncode == 0, r.stderr
    r = gl("cp", "%s:/tmp/a" % qga_domain, tmp_path / "b", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b").read_bytes() == data
    r = gl("ping", "--via", "guestlink", qga_domain, env=env)
    assert r.returncode == 78 and not notes(r)  # no guestlink channels (EXIT_CONFIG)


def test_library_through_libvirt(qga_domain):
    _wait_domain_qga(qga_domain)

    async def main():
        async with guestlink.connect(domain=qga_domain, timeout=30) as vm:
            assert vm.via == "qga"
            r = await vm.run(["uname", "-m"], check=True)
            assert r.stdout == b"x86_64\n"
            info = await vm.info()
            assert info["via"] == "qga" and info["hostname"] == "guestlink-testvm"
    asyncio.run(main())
