#!/usr/bin/env python3
"""What enrolling buys: exec round trip and 16 MiB push/pull via guestlink, via the qemu-ga
fallback, and via bare ``virsh qemu-agent-command`` driving the same qemu-ga operations.

Two VM runs, each comparison inside one VM:

1. **libvirt domain** (the test guest under a real libvirtd, TCG) with guestlink's channels, its
   agent and a qemu-ga channel: guestlink (by domain name) vs the fallback through libvirt
   (``connect(domain, via="qga")``; virsh backend) vs a plain loop of ``virsh
   qemu-agent-command`` (guest-exec + guest-exec-status polling; guest-file-open/write/read/close,
   the same chunk sizes, no checksum, no rename).
2. **plain QEMU** (testvm.TestVM with qemu-ga on its port): guestlink vs the fallback on qemu-ga's
   raw socket.

The plain physical job beside them: the host running ``true`` itself, and a host-local copy of the
same 16 MiB (page cache). Prints a table with ratios (x = times slower than guestlink).

    flock /tmp/guestlink-bench.lock /work/vmslot .venv/bin/python benchmarks/bench_qga.py
    [--mib 16] [--execs 10] [--no-libvirt] [--json]
"""

import argparse
import asyncio
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import _common as C  # puts src/ and the repository root on sys.path

import guestlink  # noqa: E402
from guestlink import libvirt as LV  # noqa: E402
from guestlink.bundle import write_bundle  # noqa: E402
from guestlink.host.qga import guest as G  # noqa: E402
from guestlink.host.qga.transport import MAX_REQUEST_VIRSH  # noqa: E402
from testvm import guest_files, kernel_cmdline, write_initrd  # noqa: E402
from testvm.vm import QEMU, QEMU_CPU  # noqa: E402

URI = "qemu:///system"
DOMAIN = "guestlink-bench-qga"


def log(msg):
    sys.stderr.write("[bench_qga] %s\n" % msg)
    sys.stderr.flush()


# --- the plain physical job -----------------------------------------------------------------------

def physical(data, execs):
    times = []
    for _ in range(execs):
        t = time.perf_counter()
        subprocess.run(["true"], check=True)
        times.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "a"), os.path.join(d, "b")
        with open(src, "wb") as f:
            f.write(data)
        t = time.perf_counter()
        shutil.copyfile(src, dst)
        copy = time.perf_counter() - t
    return {"exec": statistics.median(times), "push": copy, "pull": copy}


# --- guestlink and the fallback: the library ---------------------------------------------------

async def measure_client(vm, payload, execs, guest_path):
    """exec round trip (median of ``execs`` runs of true), push and pull of ``payload``."""
    times = []
    await vm.run(["true"], check=True)  # warm-up
    for _ in range(execs):
        t = time.perf_counter()
        await vm.run(["true"], check=True)
        times.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as d:
        src, back = os.path.join(d, "src"), os.path.join(d, "back")
        with open(src, "wb") as f:
            f.write(payload)
        t = time.perf_counter()
        await vm.push(src, guest_path)
        push = time.perf_counter() - t
        t = time.perf_counter()
        await vm.pull(guest_path, back)
        pull = time.perf_counter() - t
        with open(back, "rb") as f:
            assert f.read() == payload
    await vm.run(["rm", "-f", guest_path])
    return {"exec": statistics.median(times), "push": push, "pull": pull}


async def with_client(payload, execs, guest_path, **connect_kw):
    async with guestlink.connect(timeout=120, **connect_kw) as vm:
        log("measuring via %s" % vm.via)
        return await measure_client(vm, payload, execs, guest_path)


# --- bare virsh qemu-agent-command ---------------------------------------------------------------

def virsh_agent(cmd, args=None):
    msg = {"execute": cmd}
    if args:
        msg["arguments"] = args
    r = subprocess.run(["virsh", "-q", "-c", URI, "qemu-agent-command", DOMAIN, json.dumps(msg)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    return json.loads(r.stdout)["return"]


def virsh_exec(argv):
    pid = virsh_agent("guest-exec", {"path": argv[0], "arg": argv[1:],
                                     "capture-output": True})["pid"]
    pause = G.POLL_FIRST
    while True:
        st = virsh_agent("guest-exec-status", {"pid": pid})
        if st["exited"]:
            return st
        time.sleep(pause)
        pause = min(G.POLL_MAX, pause * G.POLL_GROWTH)


def measure_virsh(data, execs, guest_path):
    times = []
    virsh_exec(["true"])  # warm-up
    for _ in range(execs):
        t = time.perf_counter()
        virsh_exec(["true"])
        times.append(time.perf_counter() - t)
    chunk = (MAX_REQUEST_VIRSH - 256) // 4 * 3  # the largest that fits one virsh argument
    t = time.perf_counter()
    h = virsh_agent("guest-file-open", {"path": guest_path, "mode": "w"})
    for i in range(0, len(data), chunk):
        virsh_agent("guest-file-write", {"handle": h, "buf-b64": base64.b64encode(
            data[i:i + chunk]).decode()})
    virsh_agent("guest-file-close", {"handle": h})
    push = time.perf_counter() - t
    t = time.perf_counter()
    h = virsh_agent("guest-file-open", {"path": guest_path, "mode": "r"})
    got = []
    while True:
        r = virsh_agent("guest-file-read", {"handle": h, "count": G.CHUNK})
        got.append(base64.b64decode(r["buf-b64"]))
        if r["eof"] or not r["count"]:
            break
    virsh_agent("guest-file-close", {"handle": h})
    pull = time.perf_counter() - t
    assert b"".join(got) == data
    virsh_exec(["rm", "-f", guest_path])
    return {"exec": statistics.median(times), "push": push, "pull": pull}


# --- libvirtd and the domain -----------------------------------------------------------------------

def _virsh(*args, check=True):
    return subprocess.run(["virsh", "-q", "-c", URI] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, check=check)


def ensure_libvirtd():
    """Start virtlogd and libvirtd (as the tests do) unless libvirt answers; -> what was started."""
    if _virsh("version", check=False).returncode == 0:
        return []
    started = []
    for daemon, sock in (("virtlogd", "/run/libvirt/virtlogd-sock"),
                         ("libvirtd", "/run/libvirt/libvirt-sock")):
        started.append(subprocess.Popen([daemon], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True))
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            if time.monotonic() > deadline:
                raise RuntimeError("%s did not start" % daemon)
            time.sleep(0.1)
    deadline = time.monotonic() + 60
    while _virsh("version", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("libvirtd does not answer")
        time.sleep(0.5)
    return started


def domain_xml(workdir, kernel, initrd):
    devices = [LV.to_string(el, "    ") for el in LV.channel_elements()]
    devices.append(LV.to_string(LV.channel_element(LV.QGA_NAME, 3), "    "))
    features = "".join("<feature policy='require' name='%s'/>" % f.lstrip("+")
                       for f in QEMU_CPU.split(",")[1:])
    return """<domain type='qemu'>
  <name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='MiB'>1024</memory><vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline></os>
  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>{model}</model>
    {features}</cpu>
  <on_poweroff>destroy</on_poweroff><on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <serial type='file'><source path='{workdir}/console.log'/></serial>
    <controller type='usb' model='none'/><memballoon model='none'/>
{devices}
  </devices>
</domain>
""".format(name=DOMAIN, uuid=uuid.uuid4(), kernel=kernel, initrd=initrd,
           cmdline=kernel_cmdline(3), model=QEMU_CPU.split(",")[0],
           features=features, emulator=shutil.which(QEMU), workdir=workdir,
           devices="".join(devices))


def libvirt_run(data, execs):
    started = ensure_libvirtd()
    d = tempfile.mkdtemp(prefix="gl-bench-qga-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        pyz = os.path.join(d, "guestlink-agent.pyz")
        write_bundle(pyz)
        base = write_initrd(os.path.join(d, "initrd.img"),
                            guest_files(pyz, ["--log-level", "warning"]))
        shutil.copy(base.kernel, os.path.join(d, "vmlinuz"))
        for f in ("initrd.img", "vmlinuz"):
            os.chmod(os.path.join(d, f), 0o644)
        xml = os.path.join(d, "domain.xml")
        with open(xml, "w") as f:
            f.write(domain_xml(d, os.path.join(d, "vmlinuz"), os.path.join(d, "initrd.img")))
        _virsh("destroy", DOMAIN, check=False)
        _virsh("undefine", DOMAIN, check=False)
        _virsh("define", xml)
        _virsh("start", DOMAIN)
        try:
            deadline = time.monotonic() + 180
            while True:  # qemu-ga and guestlink's agent both up
                try:
                    virsh_agent("guest-ping")
                    break
                except subprocess.CalledProcessError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
            env_backend = os.environ.get("GUESTLINK_LIBVIRT_BACKEND")
            os.environ["GUESTLINK_LIBVIRT_BACKEND"] = "virsh"
            try:
                res = {
                    "guestlink": asyncio.run(with_client(data, execs, "/tmp/gl.bin",
                                                         domain=DOMAIN, via="guestlink")),
                    "qga fallback (libvirt)": asyncio.run(with_client(
                        data, execs, "/tmp/qf.bin", domain=DOMAIN, via="qga")),
                }
            finally:
                if env_backend is None:
                    os.environ.pop("GUESTLINK_LIBVIRT_BACKEND")
            log("measuring bare virsh qemu-agent-command")
            res["virsh qemu-agent-command"] = measure_virsh(data, execs, "/tmp/v.bin")
            return res
        finally:
            _virsh("destroy", DOMAIN, check=False)
            _virsh("undefine", DOMAIN, check=False)
    finally:
        shutil.rmtree(d, ignore_errors=True)
        for p in reversed(started):
            p.terminate()
            p.wait(20)


def plain_run(data, execs):
    with C.booted_vm(qga=True, memory=1024, agent_args=["--log-level", "warning"]) as vm:
        C.wait_qga(vm, 60).sock.close()

        async def main():
            await (await C.connect(vm, timeout=60)).close()  # the agent is up
            return {
                "guestlink": await with_client(data, execs, "/tmp/gl.bin", ctl=vm.ctl_path,
                                               data=vm.data_path, via="guestlink"),
                "qga fallback (socket)": await with_client(data, execs, "/tmp/qf.bin",
                                                           qga=vm.qga_path, via="qga"),
            }
        return asyncio.run(main())


def table(title, res, phys, mib):
    print("\n%s" % title)
    print("  %-28s %18s %18s %18s" % ("", "exec round trip", "push %d MiB" % mib,
                                      "pull %d MiB" % mib))
    gl = res["guestlink"]
    rows = [("host itself (physical)", phys)] + list(res.items())
    for name, r in rows:
        cells = []
        for k in ("exec", "push", "pull"):
            v = r[k]
            text = "%.1f ms" % (v * 1e3) if k == "exec" else "%.1f MB/s" % (mib * 1.048576 / v)
            if name == "guestlink":
                cells.append("%s %5.1fxP" % (text, v / phys[k]))
            elif r is phys:
                cells.append(text)
            else:
                cells.append("%s %5.1fx" % (text, v / gl[k]))
        print("  %-28s %18s %18s %18s" % ((name,) + tuple(cells)))
    print("  (x: time relative to guestlink in the same VM; xP: guestlink's time relative to the "
          "host doing the job itself; MB = 10^6 bytes)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--execs", type=int, default=10)
    ap.add_argument("--no-libvirt", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    data = os.urandom(a.mib << 20)
    C.ensure_base()
    out = {"host": C.host_facts(), "mib": a.mib, "execs": a.execs,
           "physical": physical(data, a.execs)}
    log("plain QEMU run")
    out["plain"] = plain_run(data, a.execs)
    if not a.no_libvirt:
        log("libvirt domain run")
        try:
            out["libvirt"] = libvirt_run(data, a.execs)
        except Exception as exc:
            out["libvirt_error"] = "%s: %s" % (type(exc).__name__, exc)
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    print("bench_qga: %d MiB, exec = median of %d runs of `true`, TCG guest, host %s"
          % (a.mib, a.execs, out["host"]["cpu"]))
    table("plain QEMU: guestlink vs the qemu-ga fallback on qemu-ga's socket", out["plain"],
          out["physical"], a.mib)
    if "libvirt" in out:
        table("libvirt domain: guestlink vs the fallback through libvirt vs bare virsh",
              out["libvirt"], out["physical"], a.mib)
    elif "libvirt_error" in out:
        print("\nlibvirt run failed: %s" % out["libvirt_error"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
