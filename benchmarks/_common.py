"""Shared pieces for the benchmarks: boot a TestVM with the real agent, put files in the guest,
start detached guest programs, talk raw bytes over a virtio-serial port, small statistics.

Import it from a script in this directory (``from _common import ...``); importing it puts the
repository root (for ``testvm``) and ``src/`` (for ``guestlink``) on ``sys.path``.
"""

import asyncio
import contextlib
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import random
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "src", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import guestlink  # noqa: E402
from guestlink.bundle import write_bundle  # noqa: E402
from testvm import TestVM, ensure_base  # noqa: E402

AGENT_PATTERN = "guestlink-agent.pyz run"
DATA_PORT_DEVICE = "/dev/virtio-ports/org.guestlink.data"
GUEST_DIR = "/tmp/bench"


# --- the VM -----------------------------------------------------------------------------------

@contextlib.contextmanager
def booted_vm(workdir=None, **testvm_kwargs):
    """Build the agent bundle from src/, boot one TestVM running it, yield the started VM.

    ``workdir``: where the VM keeps its files (default: a temporary directory, removed after).
    Extra keyword arguments go to :class:`testvm.TestVM` (e.g. ``smp=``, ``memory=``).
    """
    ensure_base()  # build (or reuse) the base image before the boot clock starts
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="glbench-"))
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        pyz = workdir / "guestlink-agent.pyz"
        write_bundle(str(pyz))
        vm = TestVM(workdir / "vm", agent_pyz=pyz, **testvm_kwargs)
        vm.start()
        stack.callback(vm.stop)
        yield vm


async def connect(vm, timeout=30.0, **kwargs):
    """``guestlink.connect`` to the VM's agent, retrying while the agent is still starting."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await guestlink.connect(ctl=vm.ctl_path, data=vm.data_path,
                                           timeout=min(5.0, timeout), **kwargs)
        except guestlink.errors.GuestlinkError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


# --- guest programs ---------------------------------------------------------------------------

async def put_file(client, guest_path, data, mode=0o755):
    """Write ``data`` (bytes or str) to ``guest_path`` through the agent (exec + stdin)."""
    if isinstance(data, str):
        data = data.encode()
    await client.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod %o "$1"'
                      % mode, "sh", guest_path], input=data, check=True)


async def start_detached(client, argv, log="/dev/null"):
    """Start ``argv`` in the guest through the agent, detached from the agent's exec.

    It runs under busybox ``setsid`` (own session and process group, so the agent's killing of
    the exec's process group at the end of the host session does not reach it), with stdin
    /dev/null and stdout/stderr appended to ``log``. Returns its pid.
    """
    cmd = "setsid %s </dev/null >>%s 2>&1 & echo $!" % (
        " ".join(shlex.quote(a) for a in argv), shlex.quote(log))
    result = await client.run(["sh", "-c", cmd], check=True)
    return int(result.stdout.split()[-1])


async def start_guest_python(client, name, source, args=(), log=None):
    """Put ``source`` at /tmp/bench/NAME.py and start ``python3 -S -u`` on it, detached.

    Returns ``(pid, log_path)``.
    """
    path = "%s/%s.py" % (GUEST_DIR, name)
    log = log or "%s/%s.log" % (GUEST_DIR, name)
    await put_file(client, path, source, mode=0o644)
    pid = await start_detached(client, ["python3", "-S", "-u", path] + [str(a) for a in args],
                               log=log)
    return pid, log


async def read_guest_file(client, path):
    """The contents of a guest file (bytes), or None if it does not exist."""
    r = await client.run(["cat", path])
    return r.stdout if r.returncode == 0 else None


async def guest_cpu_ns(client, pid):
    """CPU time (ns) the guest task ``pid`` has run so far: the first field of
    /proc/PID/schedstat (the main thread only). None if unavailable."""
    r = await client.run(["cat", "/proc/%d/schedstat" % pid])
    try:
        return int(r.stdout.split()[0]) if r.returncode == 0 else None
    except (IndexError, ValueError):
        return None


async def agent_pid(client):
    """Pid of the running agent (``pgrep -o -f 'guestlink-agent.pyz run'`` in the guest)."""
    r = await client.run(["pgrep", "-o", "-f", AGENT_PATTERN], check=True)
    return int(r.stdout.split()[0])


# --- raw port program -------------------------------------------------------------------------

#: Guest program for raw virtio-serial baselines: ``python3 -S -u raw_port.py DEVICE MODE [N]``.
#: It opens DEVICE, writes ``READY\n`` (the write blocks until a host is connected), then:
#:   echo          read into one reused buffer, write back what was read (until the host leaves);
#:   sink N        read and discard N bytes, then write ``DONE N\n``;
#:   source N      write N bytes (zeros, 64 KiB writes), then wait for the host to leave.
#: A read() of 0 means no host is connected: before any data this is waited out (the host may
#: connect late); after data, it means the host left and the program exits.
RAW_PORT_PROGRAM = r'''
import os, sys, time
dev, mode = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 0
fd = os.open(dev, os.O_RDWR)
os.write(fd, b"READY\n")
buf = bytearray(65536)
mv = memoryview(buf)
read, write = os.readv, os.write
seen = False
deadline = time.monotonic() + 60
def wait_host():
    if seen or time.monotonic() > deadline:
        sys.exit(0)
    time.sleep(0.01)
if mode == "echo":
    bufs = [buf]
    while True:
        k = read(fd, bufs)
        if k == 0:
            wait_host()
            continue
        seen = True
        view = mv[:k]
        while view:
            view = view[write(fd, view):]
elif mode == "sink":
    bufs = [buf]
    left = n
    while left > 0:
        k = read(fd, bufs)
        if k == 0:
            wait_host()
            continue
        seen = True
        left -= k
    os.write(fd, b"DONE %d\n" % n)
    while read(fd, bufs) != 0:
        pass
elif mode == "source":
    left = n
    while left > 0:
        left -= write(fd, mv[:min(left, len(buf))])
    while os.read(fd, 65536) != b"":
        pass
else:
    sys.exit("unknown mode " + mode)
'''


class RawPort:
    """A blocking host-side connection to one of the VM's port sockets (no guestlink protocol)."""

    def __init__(self, path, timeout=30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buf = b""
        self.guest_pid = None  # set by start_raw_port

    def read_line(self, timeout=30.0):
        """Read up to and including the next ``\\n`` (bytes before it only)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no line from the guest on the raw port within %g s" % timeout)
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the raw port socket was closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def roundtrip_times(self, message, count):
        """Send ``message`` and read the same number of bytes back, ``count`` times.

        Returns the round-trip times in nanoseconds (time.perf_counter_ns).
        """
        if self._buf:
            raise RuntimeError("unexpected bytes pending on the raw port: %r" % self._buf[:64])
        sock = self.sock
        sock.settimeout(None)
        n = len(message)
        rbuf = bytearray(max(n, 65536))
        view = memoryview(rbuf)
        clock = time.perf_counter_ns
        times = []
        for _ in range(count):
            t0 = clock()
            sock.sendall(message)
            got = 0
            while got < n:
                k = sock.recv_into(view[got:], n - got)
                if not k:
                    raise ConnectionError("the raw port socket was closed")
                got += k
            times.append(clock() - t0)
            if rbuf[:n] != message:
                raise RuntimeError("echo returned different bytes")
        return times

    def close(self):
        self.sock.close()


async def start_raw_port(client, vm, mode="echo", n=None, port_path=None,
                         device=DATA_PORT_DEVICE, timeout=30.0):
    """Connect to the VM's data port socket, start RAW_PORT_PROGRAM on it in the guest, wait for
    its READY line; returns the :class:`RawPort`.

    The host connects *before* the guest program opens the device, and the host sends nothing
    until READY arrives (bytes written before the guest opened the port would be lost).
    """
    raw = RawPort(port_path or vm.data_path)
    try:
        args = [device, mode] + ([str(n)] if n is not None else [])
        raw.guest_pid, _ = await start_guest_python(client, "raw_port", RAW_PORT_PROGRAM, args)
        line = await asyncio.get_running_loop().run_in_executor(None, raw.read_line, timeout)
        if line != b"READY":
            raise RuntimeError("raw port program said %r instead of READY" % line)
    except BaseException:
        raw.close()
        raise
    return raw


# --- qemu-ga (Debian's qemu-guest-agent, in the test bed's base image) --------------------
# booted_vm(qga=True) adds its port org.qemu.guest_agent.0 (vm.qga_path); the guest's init runs
# qemu-ga on it.

QGA_PORT = "org.qemu.guest_agent.0"


class QGA:
    """A blocking client of qemu-ga on its port socket (JSON lines; 0xFF marks a resync)."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.buf = b""
        self.f = self.sock.makefile("rb")

    def call(self, cmd, **args):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            line = self.f.readline()
            if not line:
                raise ConnectionError("qemu-ga closed")
            obj = json.loads(line.lstrip(b"\xff"))
            if "error" in obj:
                raise RuntimeError(obj["error"])
            if "return" in obj:
                return obj["return"]

    def sync(self):
        n = random.randint(1, 1 << 30)
        self.sock.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited",
                                                "arguments": {"id": n}}).encode() + b"\n")
        while True:
            line = self.f.readline()
            if not line:
                raise ConnectionError("qemu-ga closed")
            # qemu-ga answers the 0xFF with a parse error, then 0xFF + the sync reply
            if line.startswith(b"\xff") and json.loads(line[1:]).get("return") == n:
                return


def wait_qga(vm, timeout=30.0):
    """Wait until qemu-ga answers a sync on ``vm.qga_path``; return a synced :class:`QGA`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            q = QGA(vm.qga_path)
            q.sock.settimeout(2.0)
            q.sync()
            q.sock.settimeout(None)
            return q
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# --- facts and statistics ---------------------------------------------------------------------

def percentile(values, p):
    """The p-th percentile (0..100) with linear interpolation."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize_ns(times_ns):
    """{n, median_us, p90_us, min_us, max_us, mean_us} of a list of nanosecond durations."""
    us = [t / 1000.0 for t in times_ns]
    return {"n": len(us), "median_us": statistics.median(us), "p90_us": percentile(us, 90),
            "min_us": min(us), "max_us": max(us), "mean_us": statistics.fmean(us)}


def host_facts():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cpus": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0], "python": platform.python_version(),
            "kernel": platform.release()}


def vm_facts(vm, info=None):
    """Machine facts of the test VM (+ the agent's info reply, if given)."""
    facts = {"accel": "tcg", "vcpus": vm.smp, "memory_mb": vm.memory,
             "boot_seconds": round(vm.boot_seconds, 2) if vm.boot_seconds else None}
    if info:
        facts.update({"guest_kernel": info["kernel"]["release"], "guest_python": info["python"],
                      "agent_version": info["agent_version"]})
    return facts


def dump_json(obj):
    return json.dumps(obj, indent=2, sort_keys=True)


# --- ssh into the guest (benchmark only): dropbear, virtio-net, user-mode networking ----------

#: Debian's dropbear (server and its key generator) and its libraries, from the cached .debs.
DROPBEAR_PKGS = ["dropbear-bin", "libcrypt1", "libtomcrypt1", "libtommath1", "libgmp10", "zlib1g"]
#: The guest's network driver: virtio_net (with failover, net_failover), from the guest kernel.
NET_MODULES = ["virtio_net"]
#: Where the overlay puts the network/sshd start script and the module list.
SSH_SETUP = "/opt/bench/ssh-setup.sh"
NET_MODULE_LIST = "/opt/bench/net-modules"

#: Run in the guest through the agent (``start_ssh``): load virtio_net, configure the interface
#: as QEMU's user-mode network expects (10.0.2.15/24, gateway 10.0.2.2), make an ed25519 host key
#: (fast, even under TCG) and start dropbear on port 22: public-key logins only (-s), root
#: allowed (the test bed has only root). Dropbear daemonizes itself (new session).
SSH_SETUP_SCRIPT = r'''
set -e
kver=$(uname -r)
for m in $(cat %(modules)s); do
    insmod /lib/modules/$kver/$m 2>/dev/null || true
done
dev=
for i in $(seq 50); do
    for d in /sys/class/net/*; do
        n=${d##*/}
        [ "$n" = lo ] || dev=$n
    done
    [ -n "$dev" ] && break
    sleep 0.1
done
[ -n "$dev" ] || { echo "no network interface after loading virtio_net" >&2; exit 1; }
ip link set lo up
ip link set "$dev" up
ip addr add 10.0.2.15/24 dev "$dev"
ip route add default via 10.0.2.2 || true
mkdir -p /etc/dropbear
chmod 700 /root/.ssh
[ -f /etc/dropbear/ed25519 ] || dropbearkey -t ed25519 -f /etc/dropbear/ed25519 >/dev/null 2>&1
dropbear -r /etc/dropbear/ed25519 -p 22 -s
echo "$dev"
''' % {"modules": NET_MODULE_LIST}


def dropbear_files():
    """{guest path: host path} for dropbear, dropbearkey and their libraries, or raise."""
    from testvm import build as B
    pol = B._policy(DROPBEAR_PKGS)
    versions = {p: v["candidate"] for p, v in pol.items() if v.get("candidate")}
    if "dropbear-bin" not in versions:
        raise RuntimeError("apt knows no dropbear-bin candidate")
    cache = REPO / ".cache" / "testvm" / "debs"
    stage = Path(tempfile.mkdtemp(prefix="dropbear-stage-"))
    B._unpack(B.fetch_debs(versions, cache), stage)
    B._unpack(B.fetch_debs({"libc6": B.resolve_versions()["libc6"]}, cache), stage)
    root = Path(tempfile.mkdtemp(prefix="dropbear-root-"))
    binaries = [stage / "usr" / "sbin" / "dropbear", stage / "usr" / "bin" / "dropbearkey"]
    if B._copy_libs(stage, root, binaries):
        raise RuntimeError("dropbear's shared libraries could not all be found")
    files = {"/usr/sbin/dropbear": str(binaries[0]), "/usr/bin/dropbearkey": str(binaries[1])}
    for lib in (root / "lib" / B.MULTIARCH).iterdir():
        files["/lib/%s/%s" % (B.MULTIARCH, lib.name)] = str(lib)
    return files


def net_module_files():
    """{guest path: bytes} of virtio_net and its dependencies from the guest kernel's package,
    plus the list (load order) the setup script insmods."""
    from testvm import build as B
    kpkg = B._kernel_package()
    versions = B.resolve_versions()
    cache = REPO / ".cache" / "testvm" / "debs"
    stage = Path(tempfile.mkdtemp(prefix="kmod-stage-"))
    try:
        B._unpack(B.fetch_debs({kpkg: versions[kpkg]}, cache), stage)
        moddirs = sorted((stage / "lib" / "modules").iterdir())
        if not moddirs:
            raise RuntimeError("no /lib/modules in %s" % kpkg)
        moddir = moddirs[0]
        files = {}
        order = []
        for rel, data in B.resolve_modules(moddir, NET_MODULES):
            files["/lib/modules/%s/%s" % (moddir.name, rel)] = bytes(data)
            order.append(rel)
    finally:
        import shutil
        shutil.rmtree(stage, ignore_errors=True)
    files[NET_MODULE_LIST] = ("\n".join(order) + "\n").encode()
    return files


def ssh_files(public_key):
    """Everything the benchmark's ssh comparison adds to the guest: dropbear, virtio_net, the
    setup script, and ``public_key`` (text of an ``id_ed25519.pub``) as root's authorized key."""
    files = dict(dropbear_files())
    files.update(net_module_files())
    files[SSH_SETUP] = SSH_SETUP_SCRIPT.encode()
    files["/root/.ssh/authorized_keys"] = public_key.encode() if isinstance(public_key, str) \
        else public_key
    return files


async def start_ssh(client):
    """Bring up the guest's network and dropbear (the overlay from ``ssh_files``); returns the
    interface name."""
    r = await client.run(["sh", SSH_SETUP], timeout=120)
    if r.returncode != 0:
        raise RuntimeError("guest ssh setup failed (%d): %s" % (
            r.returncode, (r.stderr or r.stdout).decode(errors="replace")[-1000:]))
    return r.stdout.decode().split()[-1]


def free_tcp_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_ssh_key(directory):
    """An ed25519 key pair for the benchmark (``ssh-keygen``); returns (private key path,
    public key text)."""
    import subprocess
    key = Path(directory) / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True,
                   stdin=subprocess.DEVNULL)
    return key, (Path(str(key) + ".pub")).read_text()


def ssh_argv(key, port, control_path=None):
    """``ssh`` options for the guest at 127.0.0.1:port (no host key checks: a throw-away guest);
    with ``control_path``, connections reuse the ControlMaster there."""
    argv = ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes"]
    if control_path:
        argv += ["-o", "ControlMaster=auto", "-o", "ControlPath=%s" % control_path,
                 "-o", "ControlPersist=600"]
    return argv + ["root@127.0.0.1"]


# --- libvirt (benchmark domains) ------------------------------------------------------------

LIBVIRT_URI = "qemu:///system"


def virsh(*args, check=True, timeout=60):
    import subprocess
    r = subprocess.run(["virsh", "-q", "-c", LIBVIRT_URI] + [str(a) for a in args],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError("virsh %s failed (%d): %s" % (" ".join(map(str, args)), r.returncode,
                                                         r.stderr.strip()))
    return r


def _sock_alive(path):
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
        return True
    except OSError:
        return False


def libvirt_answers():
    try:
        return virsh("version", check=False, timeout=20).returncode == 0
    except Exception:
        return False


def ensure_libvirtd(logdir=None):
    """Start virtlogd and libvirtd (as tests/vm/test_libvirt_e2e.py's fixture does) unless a
    libvirtd answers on qemu:///system. What it starts is left running: on a shared machine
    other runs may be using the daemon by the time this benchmark ends (and a test fixture that
    started it may stop it under us: so this is called again right before a domain is defined).
    """
    import subprocess
    if libvirt_answers():
        return
    logdir = Path(logdir or tempfile.mkdtemp(prefix="glbench-libvirtd-"))
    os.makedirs("/var/log/libvirt", exist_ok=True)
    for daemon, sock in (("virtlogd", "/run/libvirt/virtlogd-sock"),
                         ("libvirtd", "/run/libvirt/libvirt-sock")):
        if _sock_alive(sock):
            continue
        log = open(logdir / (daemon + ".log"), "ab")
        proc = subprocess.Popen([daemon], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while not _sock_alive(sock):
            if proc.poll() is not None and not _sock_alive(sock):
                break  # another run may have started it meanwhile: checked below
            if time.monotonic() > deadline:
                raise RuntimeError("%s did not start (status %s)" % (daemon, proc.poll()))
            time.sleep(0.1)
    deadline = time.monotonic() + 60
    while not libvirt_answers():
        if time.monotonic() > deadline:
            raise RuntimeError("libvirtd does not answer on %s" % LIBVIRT_URI)
        time.sleep(0.5)


DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='forbid'>{model}</model>
{features}
  </cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <serial type='file'><source path='{workdir}/console.log'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <controller type='virtio-serial' index='0' ports='16'/>
{channels}
{interface}
  </devices>
</domain>
"""

CHANNEL_XML = """    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='{name}'/>
      <address type='virtio-serial' controller='0' bus='0' port='{port}'/>
    </channel>"""

#: QEMU's user-mode network (slirp) on a virtio-net NIC; the port forward is added at run time
#: (HMP hostfwd_add), to 127.0.0.1 only.
USER_NET_XML = """    <interface type='user'>
      <model type='virtio'/>
    </interface>"""


@contextlib.contextmanager
def bench_domain(name, agent_pyz, extra_files=None, ports=(), network=False, agent_args=(),
                 memory=512, vcpus=2):
    """Define and start a transient-ish libvirt domain (destroyed and undefined at the end)
    booting the test guest under TCG, with the guestlink channels plus ``ports`` (e.g. qemu-ga's)
    and, with ``network``, a user-mode virtio NIC. Yields (name, workdir)."""
    import shutil
    from testvm import guest_files, kernel_cmdline, write_initrd
    from testvm.vm import QEMU, QEMU_CPU
    ensure_libvirtd()
    virsh("destroy", name, check=False)
    virsh("undefine", name, check=False)
    # qemu runs as libvirt-qemu: what it reads lives in a world-traversable directory
    workdir = Path(tempfile.mkdtemp(prefix="glbench-dom-", dir="/tmp"))
    workdir.chmod(0o755)
    try:
        base = write_initrd(workdir / "initrd.img", guest_files(agent_pyz, agent_args,
                                                               extra_files))
        shutil.copy(base.kernel, workdir / "vmlinuz")
        for f in ("initrd.img", "vmlinuz"):
            (workdir / f).chmod(0o644)
        names = ["org.guestlink.ctl", "org.guestlink.data"] + list(ports)
        xml = DOMAIN_XML.format(
            name=name, memory=memory, vcpus=vcpus, kernel=workdir / "vmlinuz",
            initrd=workdir / "initrd.img", cmdline=kernel_cmdline(len(names)),
            model=QEMU_CPU.split(",")[0],
            features="\n".join("    <feature policy='require' name='%s'/>" % f.lstrip("+")
                               for f in QEMU_CPU.split(",")[1:]),
            emulator=shutil.which(QEMU), workdir=workdir,
            channels="\n".join(CHANNEL_XML.format(name=n, port=i)
                               for i, n in enumerate(names, start=1)),
            interface=USER_NET_XML if network else "")
        (workdir / "domain.xml").write_text(xml)
        ensure_libvirtd()  # the write_initrd above takes seconds: check again
        virsh("define", workdir / "domain.xml")
        try:
            virsh("start", name)
            yield name, workdir
        finally:
            virsh("destroy", name, check=False)
            virsh("undefine", name, check=False)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def domain_hostfwd(name, host_port, guest_port=22):
    """Forward 127.0.0.1:host_port to the guest's guest_port on the domain's user-mode NIC."""
    r = virsh("qemu-monitor-command", name, "--hmp", "info network")
    netdev = None
    for line in r.stdout.splitlines():
        line = line.strip(" \\_")
        if line.startswith("hostnet") or ": index=" in line:
            netdev = line.split(":")[0].strip()
            if netdev.startswith("hostnet"):
                break
    if not netdev:
        raise RuntimeError("no user-mode netdev in `info network`: %s" % r.stdout)
    r = virsh("qemu-monitor-command", name, "--hmp",
              "hostfwd_add %s tcp:127.0.0.1:%d-:%d" % (netdev, host_port, guest_port))
    if r.stdout.strip():
        raise RuntimeError("hostfwd_add: %s" % r.stdout.strip())
