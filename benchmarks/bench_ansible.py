#!/usr/bin/env python3
"""The same Ansible playbook through community.libvirt's ``libvirt_qemu`` connection (qemu-ga)
and through ``guestlink.guestlink.guestlink``, against one libvirt domain in one run (issue 13).

The domain boots the test guest (testvm) under the test libvirtd (started here if qemu:///system
does not answer) with guestlink's two channels and qemu-ga's ``org.qemu.guest_agent.0``; Debian's
qemu-guest-agent is in the test guest's base image and the guest's init starts it on that port.
The playbook: 20 ``command`` tasks, ``copy`` of 1 MiB and 64 MiB, ``fetch`` of 64 MiB, a
``template``. Each task's wall time is taken by a small callback plugin (task start to result).
Runs: libvirt_qemu (it has no pipelining), guestlink without and with pipelining.

Goals: >= 3x faster per command task, >= 20x on the 64 MiB copy and fetch (guestlink with
pipelining vs libvirt_qemu). A missed goal prints MISS; exit 1 only when it could not run.

Needs the ``bench`` extra (ansible with community.libvirt, libvirt-python; the latter builds from
source with libvirt-dev and pkg-config from testvm/debian-packages.txt): when missing it is
installed into this Python's environment with ``pip install -e .[bench]`` (said on stderr).

    flock /tmp/guestlink-bench.lock /work/vmslot .venv/bin/python benchmarks/bench_ansible.py
"""

import argparse
import asyncio
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

sys.path.insert(0, str(C.REPO / "tests" / "vm"))

URI = "qemu:///system"
NAME = "guestlink-bench-ansible"
QGA_CHANNEL = ("<channel type='unix'><source mode='bind'/>"
               "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>")
COMMANDS = 20
GOAL_COMMAND, GOAL_BULK = 3.0, 20.0

CALLBACK = '''
import json, os, time
from ansible.plugins.callback import CallbackBase

class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "bench_timer"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.start, self.rows = {}, []

    def v2_playbook_on_task_start(self, task, is_conditional):
        self.start[task._uuid] = (task.get_name(), time.monotonic())

    def _done(self, result, status):
        name, t0 = self.start.get(result._task._uuid, (result._task.get_name(), None))
        self.rows.append({"task": name, "status": status,
                          "seconds": None if t0 is None else time.monotonic() - t0,
                          "msg": str(result._result.get("msg", ""))[:500]})

    def v2_runner_on_ok(self, result):
        self._done(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._done(result, "failed")

    def v2_runner_on_unreachable(self, result):
        self._done(result, "unreachable")

    def v2_playbook_on_stats(self, stats):
        with open(os.environ["BENCH_TIMES"], "w") as f:
            json.dump(self.rows, f)
'''


def log(msg):
    print("bench_ansible: " + msg, file=sys.stderr, flush=True)


def _has_community_libvirt():
    # a look at sys.path, not an import: ansible_collections must first be imported through
    # ansible-core's collection finder (else "collection metadata was not loaded")
    return any(os.path.isdir(os.path.join(p, "ansible_collections", "community", "libvirt"))
               for p in sys.path if p)


def ensure_bench_extra():
    have = all(importlib.util.find_spec(m) for m in ("ansible", "libvirt"))
    if have and _has_community_libvirt():
        return
    log("installing the bench extra (ansible with community.libvirt, libvirt-python) into %s: "
        "pip install -e .[bench]" % sys.prefix)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "%s[bench]" % C.REPO])
    if r.returncode != 0:
        raise SystemExit("bench_ansible: pip install -e .[bench] failed (libvirt-python needs "
                         "libvirt-dev and pkg-config: scripts/setup installs them)")


def playbook(path, files):
    tasks = [{"name": "setup", "file": {"path": "/tmp/bench-ansible", "state": "directory"}}]
    tasks += [{"name": "command %02d" % i, "command": "echo %d" % i} for i in range(1, COMMANDS + 1)]
    tasks += [
        {"name": "copy 1 MiB", "copy": {"src": str(files["1m"]), "dest": "/tmp/bench-ansible/1m"}},
        {"name": "copy 64 MiB", "copy": {"src": str(files["64m"]), "dest": "/tmp/bench-ansible/64m"}},
        {"name": "fetch 64 MiB", "fetch": {"src": "/tmp/bench-ansible/64m", "flat": True,
                                           "dest": str(files["back"]), "validate_checksum": True}},
        {"name": "template", "template": {"src": str(files["tmpl"]), "dest": "/tmp/bench-ansible/t"}},
        {"name": "cleanup", "file": {"path": "/tmp/bench-ansible", "state": "absent"}},
    ]
    path.write_text(json.dumps([{"hosts": "bench", "gather_facts": False, "tasks": tasks}], indent=1))


def run_playbook(work, label, hostvars, pb):
    inv = work / ("%s.ini" % label)
    inv.write_text("[bench]\n%s %s\n" % (NAME, " ".join("%s=%s" % kv for kv in hostvars.items())))
    times = work / ("%s.json" % label)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "GUESTLINK_"))}
    env.update({"PATH": "%s:%s" % (Path(sys.executable).parent, env.get("PATH", "/usr/bin:/bin")),
                "ANSIBLE_CALLBACK_PLUGINS": str(work / "callbacks"),
                "ANSIBLE_CALLBACKS_ENABLED": "bench_timer", "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_LOCAL_TEMP": str(work / "ansible-local"),
                "ANSIBLE_HOME": str(work / "ansible-home"), "BENCH_TIMES": str(times)})
    log("playbook through %s ..." % label)
    start = time.monotonic()
    r = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inv), str(pb)],
                       env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    total = time.monotonic() - start
    (work / ("%s.log" % label)).write_text(r.stdout)
    rows = json.loads(times.read_text()) if times.exists() else []
    failed = [row for row in rows if row["status"] != "ok"]
    log("  %s: exit %d, %.1f s%s" % (label, r.returncode, total,
                                      ", failed: %s" % failed[:3] if failed else ""))
    return {"exit": r.returncode, "total_s": total, "tasks": {row["task"]: row for row in rows},
            "tail": r.stdout[-2000:] if r.returncode else ""}


def connect_costs(work, hostvars, count=5):
    """Each task's worker connects afresh: the plugin's own -vvv line gives each connect's cost
    (libvirt look-up of the domain's sockets + socket + handshake), over ``count`` ad-hoc runs."""
    inv = work / "connect.ini"
    inv.write_text("[bench]\n%s %s\n" % (NAME, " ".join("%s=%s" % kv for kv in hostvars.items())))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "GUESTLINK_"))}
    env.update({"ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(work / "ansible-local"),
                "ANSIBLE_HOME": str(work / "ansible-home")})
    costs, walls = [], []
    for _ in range(count):
        start = time.monotonic()
        r = subprocess.run([str(Path(sys.executable).parent / "ansible"), "-vvv", "-i", str(inv),
                            "bench", "-m", "raw", "-a", "true"], env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        walls.append(time.monotonic() - start)
        costs += [float(ln.rsplit(" in ", 1)[1].split()[0]) for ln in r.stdout.splitlines()
                  if "GUESTLINK CONNECTED" in ln]
    return {"connect_ms_median": statistics.median(costs) if costs else None,
            "connect_ms_max": max(costs) if costs else None, "samples": len(costs),
            "adhoc_raw_wall_s_median": statistics.median(walls)}


_LOADER = []


def plugin_level(hostvars, files, work, count=COMMANDS):
    """The connection plugins alone, driven through ansible-core's public plugin loader as a task's
    worker drives them (a new connection per command), without the guest's module Python that
    dominates a module task under TCG: ``count`` x (connect, exec_command("echo hi"), close), then
    put_file of 1 MiB and 64 MiB and fetch_file of 64 MiB (verified)."""
    from ansible.playbook.play_context import PlayContext
    from ansible.plugins.loader import connection_loader, init_plugin_loader

    if not _LOADER:
        init_plugin_loader()
        _LOADER.append(True)
    name = hostvars["ansible_connection"]
    varopts = dict(hostvars, inventory_hostname=NAME)

    def conn():
        pc = PlayContext()
        pc.remote_addr = NAME  # as the task executor sets it (libvirt_qemu reads it)
        c = connection_loader.get(name, pc, None)
        c.set_options(var_options=varopts)
        return c

    execs = []
    for _ in range(count):
        start = time.monotonic()
        c = conn()
        rc, out, err = c.exec_command("echo hi")
        c.close()
        execs.append(time.monotonic() - start)
        if rc != 0 or out.strip() != b"hi":
            raise RuntimeError("%s: exec_command gave %r %r %r" % (name, rc, out, err))
    res = {"exec_median_s": statistics.median(execs), "exec_min_s": min(execs)}
    back = work / ("%s.plugin-back" % name.rsplit(".", 1)[-1])
    for key, src, mib in (("put 1 MiB", files["1m"], 1), ("put 64 MiB", files["64m"], 64)):
        c = conn()
        start = time.monotonic()
        c.put_file(str(src), "/tmp/plugin-%d" % mib)
        res[key] = time.monotonic() - start
        c.close()
    c = conn()
    start = time.monotonic()
    c.fetch_file("/tmp/plugin-64", str(back))
    res["fetch 64 MiB"] = time.monotonic() - start
    c.exec_command("rm -f /tmp/plugin-1 /tmp/plugin-64")
    c.close()
    res["fetch_verified"] = (hashlib.sha256(back.read_bytes()).digest()
                             == hashlib.sha256(files["64m"].read_bytes()).digest())
    back.unlink()
    return res


def summarize(run):
    tasks = run["tasks"]
    cmds = [tasks[k]["seconds"] for k in tasks if k.startswith("command ") and
            tasks[k]["status"] == "ok"]
    out = {"command_median_s": statistics.median(cmds) if cmds else None,
           "command_count": len(cmds)}
    for k, mib in (("copy 1 MiB", 1), ("copy 64 MiB", 64), ("fetch 64 MiB", 64), ("template", 0)):
        row = tasks.get(k)
        ok = row is not None and row["status"] == "ok"
        out[k] = {"seconds": row["seconds"] if ok else None,
                  "mb_per_s": (mib * 1.048576 / row["seconds"]) if ok and mib else None,
                  "error": None if ok else (row["msg"] if row else "not run")}
    return out


def libvirtd_up():
    """Start virtlogd and libvirtd as tests/vm/test_libvirt_e2e.py's fixture does, unless
    qemu:///system answers. Returns the started processes (to stop at the end)."""
    from test_libvirt_e2e import _answers, _sock_alive

    if _answers():
        return []
    started = []
    os.makedirs("/var/log/libvirt", exist_ok=True)
    for daemon, sock in (("virtlogd", "/run/libvirt/virtlogd-sock"),
                         ("libvirtd", "/run/libvirt/libvirt-sock")):
        if os.path.exists(sock) and _sock_alive(sock):
            continue
        started.append(subprocess.Popen([daemon], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True))
    deadline = time.monotonic() + 60
    while not _answers():
        if time.monotonic() > deadline:
            raise SystemExit("bench_ansible: libvirtd did not answer on %s" % URI)
        time.sleep(0.5)
    return started


def define_domain(work):
    from guestlink.bundle import write_bundle
    from test_libvirt_e2e import domain_xml, gl, split_paste, virsh
    from testvm import guest_files, write_initrd

    virsh("destroy", NAME, check=False)
    virsh("undefine", NAME, check=False)
    pyz = work / "guestlink-agent.pyz"
    write_bundle(str(pyz))
    base = write_initrd(work / "initrd.img", guest_files(pyz))
    shutil.copy(base.kernel, work / "vmlinuz")
    for f in ("initrd.img", "vmlinuz"):
        (work / f).chmod(0o644)
    r = gl("libvirt", "xml")
    assert r.returncode == 0, r.stderr
    chans, metadata = split_paste(r.stdout)
    # domain_xml's command line says guestlink.nports=2; the guest's init waits for that many
    # named ports before linking /dev/virtio-ports/* and starting qemu-ga on its port (if there):
    # the third port (qemu-ga's) must be counted too (the later guestlink.nports= word wins).
    xml = domain_xml(NAME, work, work / "vmlinuz", work / "initrd.img",
                     chans + "\n" + QGA_CHANNEL, metadata, append="guestlink.nports=3")
    (work / "domain.xml").write_text(xml)
    virsh("define", str(work / "domain.xml"))
    virsh("start", NAME)


async def wait_guestlink_agent():
    """Wait until guestlink's agent answers through libvirt (qemu-ga is started by the guest's
    init, not through the agent: ``wait_qga`` waits for it)."""
    from guestlink.host.client import connect

    deadline = time.monotonic() + 120
    while True:
        try:
            async with connect(domain=NAME, uri=URI, timeout=10) as vm:
                await vm.ping()
                return
        except Exception as exc:  # still booting
            if time.monotonic() > deadline:
                raise SystemExit("bench_ansible: the guestlink agent did not answer: %s" % exc)
            await asyncio.sleep(1)


def wait_qga():
    from test_libvirt_e2e import virsh

    deadline = time.monotonic() + 60
    while virsh("qemu-agent-command", NAME, '{"execute":"guest-ping"}', check=False).returncode:
        if time.monotonic() > deadline:
            raise SystemExit("bench_ansible: qemu-ga did not answer through libvirt")
        time.sleep(1)


def ratio(slow, fast):
    return slow / fast if slow and fast else None


def fmt(x, spec="%.2f"):
    return spec % x if x is not None else "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print JSON only")
    ap.add_argument("--workdir", help="keep the files here (default: a temp dir, removed)")
    args = ap.parse_args()
    ensure_bench_extra()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gl-bench-ansible-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # QEMU runs as libvirt-qemu and reads the kernel and initrd from here
    (work / "callbacks").mkdir(exist_ok=True)
    (work / "callbacks" / "bench_timer.py").write_text(CALLBACK)
    files = {"1m": work / "1m.bin", "64m": work / "64m.bin", "back": work / "64m.back",
             "tmpl": work / "t.j2"}
    files["1m"].write_bytes(os.urandom(1 << 20))
    files["64m"].write_bytes(os.urandom(64 << 20))
    files["tmpl"].write_text("{{ inventory_hostname }} {{ ansible_connection }}\n")
    pb = work / "playbook.json"
    playbook(pb, files)
    started = libvirtd_up()
    result = {"host": C.host_facts(), "commands": COMMANDS}
    try:
        log("booting %s under %s (guestlink agent + qemu-ga)" % (NAME, URI))
        define_domain(work)
        asyncio.run(wait_guestlink_agent())
        wait_qga()
        common = {"ansible_python_interpreter": "/usr/bin/python3",
                  "ansible_remote_tmp": "/tmp/.ansible-remote", "ansible_host": NAME}
        runs = {
            "libvirt_qemu": dict(common, ansible_connection="community.libvirt.libvirt_qemu",
                                 ansible_libvirt_uri=URI),
            "guestlink": dict(common, ansible_connection="guestlink.guestlink.guestlink",
                              ansible_guestlink_uri=URI, ansible_pipelining="false"),
            "guestlink_pipelining": dict(common, ansible_connection="guestlink.guestlink.guestlink",
                                         ansible_guestlink_uri=URI, ansible_pipelining="true"),
        }
        log("connect cost (ansible -vvv -m raw, 5 runs)")
        result["connect"] = connect_costs(work, runs["guestlink_pipelining"])
        for label in ("libvirt_qemu", "guestlink"):
            log("connection plugin alone: %s" % label)
            try:
                result["plugin_" + label] = plugin_level(runs[label], files, work)
            except Exception as exc:
                result["plugin_" + label] = {"error": "%s: %s" % (type(exc).__name__, exc)}
        for label, hostvars in runs.items():
            if files["back"].exists():
                files["back"].unlink()
            raw = run_playbook(work, label, hostvars, pb)
            summary = summarize(raw)
            fetched = files["back"].exists() and (
                hashlib.sha256(files["back"].read_bytes()).digest()
                == hashlib.sha256(files["64m"].read_bytes()).digest())
            result[label] = dict(summary, exit=raw["exit"], total_s=raw["total_s"],
                                 fetch_verified=fetched, log_tail=raw["tail"])
    finally:
        try:
            from test_libvirt_e2e import virsh
            virsh("destroy", NAME, check=False)
            virsh("undefine", NAME, check=False)
        finally:
            for p in started:
                p.terminate()
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)

    base, gl_ = result["libvirt_qemu"], result["guestlink_pipelining"]
    result["ratios"] = {
        "command": ratio(base["command_median_s"], gl_["command_median_s"]),
        "copy 1 MiB": ratio(base["copy 1 MiB"]["seconds"], gl_["copy 1 MiB"]["seconds"]),
        "copy 64 MiB": ratio(base["copy 64 MiB"]["seconds"], gl_["copy 64 MiB"]["seconds"]),
        "fetch 64 MiB": ratio(base["fetch 64 MiB"]["seconds"], gl_["fetch 64 MiB"]["seconds"]),
        "template": ratio(base["template"]["seconds"], gl_["template"]["seconds"]),
    }
    if args.json:
        print(C.dump_json(result))
        return 0
    g0 = result["guestlink"]
    print("Ansible playbook, one VM (TCG), per task: libvirt_qemu (qemu-ga) vs guestlink")
    print("%-22s %14s %14s %16s %10s" % ("task", "libvirt_qemu", "guestlink", "guestlink+pipe",
                                          "ratio"))
    print("%-22s %13ss %13ss %15ss %9sx" % (
        "command (median of %d)" % COMMANDS, fmt(base["command_median_s"]),
        fmt(g0["command_median_s"]), fmt(gl_["command_median_s"]),
        fmt(result["ratios"]["command"], "%.1f")))
    def cell(run, k):
        row = run[k]
        if row["seconds"] is None:
            return "FAIL"
        return "%.2fs" % row["seconds"] + (" %.1fMB/s" % row["mb_per_s"] if row["mb_per_s"] else "")

    for k in ("copy 1 MiB", "copy 64 MiB", "fetch 64 MiB", "template"):
        print("%-22s %14s %14s %16s %9sx" % (k, cell(base, k), cell(g0, k), cell(gl_, k),
                                             fmt(result["ratios"][k], "%.1f")))
    print("%-22s %13.1fs %13.1fs %15.1fs" % ("whole playbook", base["total_s"], g0["total_s"],
                                              gl_["total_s"]))
    pq, pg = result["plugin_libvirt_qemu"], result["plugin_guestlink"]
    print()
    print("Connection plugin alone (ansible-core plugin loader, no module Python in the guest):")
    print("%-34s %14s %14s %8s" % ("operation", "libvirt_qemu", "guestlink", "ratio"))
    if "error" in pq or "error" in pg:
        print("  error: %s" % (pq.get("error") or pg.get("error")))
    else:
        print("%-34s %13.3fs %13.3fs %7.1fx" % (
            "connect+exec+close (median of %d)" % COMMANDS, pq["exec_median_s"],
            pg["exec_median_s"], pq["exec_median_s"] / pg["exec_median_s"]))
        for k, mib in (("put 1 MiB", 1), ("put 64 MiB", 64), ("fetch 64 MiB", 64)):
            print("%-34s %6.2fs %5.1fMB/s %6.2fs %5.1fMB/s %6.1fx" % (
                k, pq[k], mib * 1.048576 / pq[k], pg[k], mib * 1.048576 / pg[k], pq[k] / pg[k]))
        result["ratios"]["plugin exec"] = pq["exec_median_s"] / pg["exec_median_s"]
        for k in ("put 1 MiB", "put 64 MiB", "fetch 64 MiB"):
            result["ratios"]["plugin " + k] = pq[k] / pg[k]
        print("fetch verified (sha256): libvirt_qemu %s, guestlink %s" % (
            pq["fetch_verified"], pg["fetch_verified"]))
    print()
    c = result["connect"]
    print("guestlink connect per task (libvirt look-up + socket + handshake): median %s ms, "
          "max %s ms (%d connects)" % (fmt(c["connect_ms_median"], "%.1f"),
                                       fmt(c["connect_ms_max"], "%.1f"), c["samples"]))
    for name, goal in (("command", GOAL_COMMAND), ("copy 64 MiB", GOAL_BULK),
                       ("fetch 64 MiB", GOAL_BULK), ("plugin exec", GOAL_COMMAND),
                       ("plugin put 64 MiB", GOAL_BULK), ("plugin fetch 64 MiB", GOAL_BULK)):
        got = result["ratios"].get(name)
        print("goal %-19s >= %4.0fx: %s" % (name, goal, "PASS" if got and got >= goal else
                                              "MISS (%s)" % fmt(got, "%.1fx")))
    for label in ("libvirt_qemu", "guestlink", "guestlink_pipelining"):
        if result[label]["exit"]:
            print("%s: ansible-playbook exit %d\n%s" % (label, result[label]["exit"],
                                                         result[label]["log_tail"]))
    print(C.dump_json({k: result[k] for k in ("ratios",)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
