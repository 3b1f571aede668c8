"""``guestlink doctor``: what each guestlink feature needs on this host, one verdict per item.

Each check is a function returning one :class:`Item` (ok or not, what was found, and the fix when
not). Everything a check looks at comes in through parameters with the real host as default
(``which``, directories such as ``/boot`` and ``/lib/modules``, the environment, a libvirt
backend, a ``modinfo`` runner), so a unit test can give each verdict its own small world.

The same checks guard the test suite (tests/vm/conftest.py fails a test with an item's line) and
explain a libguestfs appliance that does not start (:func:`check_supermin_kernel`, from
guestlink.image.backends).
"""

import errno
import fnmatch
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import IO, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .exitcodes import EXIT_OK, EXIT_PROBLEMS
from .protocol.safetext import printable

Which = Callable[[str], Optional[str]]

#: The Debian fix for a missing supermin kernel: the cloud kernel is small, has the virtio drivers
#: the appliance needs, and installing it does not change which kernel the host boots unless a
#: boot loader is configured to pick it.
KERNEL_PACKAGE = "linux-image-cloud-amd64"
KERNEL_FIX = ("apt-get install --no-install-recommends %s (a kernel with its modules for the "
              "libguestfs appliance; the host need not boot it), or point SUPERMIN_KERNEL at a "
              "vmlinuz and SUPERMIN_MODULES at its /lib/modules/VERSION" % KERNEL_PACKAGE)


@dataclass
class Item:
    """One checked prerequisite. ``optional`` items are reported but do not fail the run."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    optional: bool = False

    def line(self, marks: Tuple[str, str] = ("\u2713", "\u2717")) -> str:
        """``✓ name: detail`` or ``✗ name: detail; fix: ...`` on one line, control characters
        escaped (details quote tool output, libvirt errors and a version read from a kernel
        file)."""
        label = self.name + (" (optional)" if self.optional else "")
        text = "%s %s: %s" % (marks[0] if self.ok else marks[1], label, self.detail)
        if not self.ok and self.fix:
            text += "; fix: " + self.fix
        return printable(" ".join(text.split()))


def _tools(which: Which, names: Iterable[str]) -> Tuple[List[str], List[str]]:
    found: List[str] = []
    missing: List[str] = []
    for name in names:
        path = which(name)
        (found if path else missing).append(path or name)
    return found, missing


# --- QEMU -------------------------------------------------------------------------------------

def check_qemu(which: Which = shutil.which) -> Item:
    found, missing = _tools(which, ("qemu-system-x86_64", "qemu-img"))
    if missing:
        return Item("qemu", False, "not found: %s" % ", ".join(missing),
                    "apt-get install qemu-system-x86 qemu-utils")
    return Item("qemu", True, ", ".join(found))


# --- libvirt ----------------------------------------------------------------------------------

def check_libvirt(uri: Optional[str] = None, backend: Optional[Callable] = None) -> Item:
    """Is libvirt reachable at ``uri`` with read-write rights (what attach and lookups need)?"""
    from . import libvirt as lv
    from .host import remote

    where = lv.default_uri(uri)
    try:
        be = (backend or lv.backend)(uri)
        n = len(be.list_uuids())
    except remote.RemoteHopError as exc:
        return Item("libvirt", False, str(exc), _hop_fix(where))
    except lv.LibvirtPermissionDenied as exc:
        return Item("libvirt", False, str(exc),
                    "run as root, or add this user to the libvirt group (adduser USER libvirt, "
                    "then log in again), or use --connect qemu:///session")
    except lv.LibvirtUnavailable as exc:
        if "neither libvirt-python nor virsh" in str(exc):
            fix = "apt-get install libvirt-clients (or python3-libvirt)"
        else:
            fix = ("start libvirtd (systemctl start libvirtd; without systemd: virtlogd -d && "
                   "libvirtd -d), or name the right one with --connect URI")
        return Item("libvirt", False, str(exc), fix)
    except lv.LibvirtError as exc:
        return Item("libvirt", False, str(exc), "see libvirtd's log; check the URI (--connect)")
    return Item("libvirt", True, "%s answers (via %s, as uid %d, read-write): %d domain%s"
                % (where, be.name, os.geteuid(), n, "" if n == 1 else "s"))


def _hop_fix(uri: str) -> str:
    """The fix for a failed ssh hop to the hypervisor of ``uri``."""
    from .host import remote

    try:
        hop = remote.SshHop.parse(uri)
    except ValueError:
        return "check the URI (--connect)"
    return ("check that `%s` works (keys, host key, port; guestlink uses your OpenSSH "
            "config and $%s) and that libvirtd runs there" % (
                hop.manual_command(), remote.SSH_CONFIG_ENV))


def probe_socket(path: str) -> Optional[str]:
    """None if this user can connect to the unix socket ``path``, else why not.

    Connecting is what guestlink does; a QEMU chardev serves one client and queues the rest, so
    a connection that is closed at once disturbs nobody."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "%s does not exist" % path
    except PermissionError:
        return "%s: permission denied (a directory on the way is not searchable)" % path
    if not stat.S_ISSOCK(st.st_mode):
        return "%s is not a socket" % path
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "%s: permission denied (owner uid %d gid %d, mode %o)" % (
                path, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
        if exc.errno == errno.ECONNREFUSED:
            return "%s: nobody listens on it (is the VM's QEMU running?)" % path
        if exc.errno == errno.EAGAIN:
            return None  # the backlog is full: someone listens, and we may connect
        return "%s: %s" % (path, exc.strerror or exc)
    finally:
        s.close()
    return None


def check_channels(domain: str, uri: Optional[str] = None,
                   names: Tuple[Optional[str], Optional[str]] = (None, None),
                   resolve: Optional[Callable[..., Tuple[str, Optional[str]]]] = None,
                   probe: Callable[[str], Optional[str]] = probe_socket) -> Item:
    """Does ``domain`` have the guestlink channels, and can this user connect to their sockets?
    ``names``: the channel names given (None: as guestlink.libvirt chooses them)."""
    from . import libvirt as lv

    from .host import remote

    name = "channels %s" % domain
    try:
        ctl, data = (resolve or lv.resolve_domain)(domain, uri, *names)
    except remote.RemoteHopError as exc:
        return Item(name, False, str(exc), _hop_fix(lv.default_uri(uri)))
    except lv.DomainNotFound as exc:
        return Item(name, False, str(exc), "check the name (virsh list --all) and --connect URI")
    except lv.DomainNotRunning as exc:
        return Item(name, False, str(exc), "virsh start %s" % domain)
    except lv.NoChannels as exc:
        return Item(name, False, str(exc),
                    "guestlink libvirt attach %s --config, then restart the domain" % domain)
    except lv.LibvirtError as exc:
        return Item(name, False, str(exc), "see the libvirt item")
    problems = [p for p in (probe(ctl), probe(data) if data else None) if p]
    if not data:
        problems.append("no data channel (file transfers need it)")
    if problems:
        if any("permission denied" in p for p in problems):
            fix = ("run as root, or attach the channels with --socket-dir DIR this user can "
                   "reach (guestlink libvirt attach %s --socket-dir DIR)" % domain)
        elif any("does not exist" in p or "nobody listens" in p for p in problems):
            fix = "restart the domain (virsh destroy %s; virsh start %s)" % (domain, domain)
        else:
            fix = "guestlink libvirt attach %s --config, then restart the domain" % domain
        return Item(name, False, "; ".join(problems), fix)
    return Item(name, True, "control %s and data %s accept this user's connection" % (ctl, data))


# --- image backends ---------------------------------------------------------------------------

def check_loop_backend(which: Which = shutil.which, dev_fuse: str = "/dev/fuse") -> Item:
    """qemu-storage-daemon's FUSE export, how the loop backend opens qcow2 images in place."""
    found, missing = _tools(which, ("qemu-storage-daemon", "fusermount3"))
    fixes = {"qemu-storage-daemon": "apt-get install qemu-system-common",
             "fusermount3": "apt-get install fuse3"}
    fix = [fixes[m] for m in missing]
    if not os.path.exists(dev_fuse):
        missing.append(dev_fuse)
        fix.append("modprobe fuse (in a container: give it --device /dev/fuse)")
    if missing:
        return Item("loop-backend", False, "missing: %s" % ", ".join(missing), "; ".join(fix))
    return Item("loop-backend", True, "%s, %s" % (", ".join(found), dev_fuse))


def check_libguestfs(which: Which = shutil.which, dev_fuse: str = "/dev/fuse") -> Item:
    """The guestfs backend's tools (the appliance's kernel is :func:`check_supermin_kernel`)."""
    found, missing = _tools(which, ("guestfish",))
    fix = ["apt-get install libguestfs-tools"] if missing else []
    if not os.path.exists(dev_fuse):
        missing.append(dev_fuse + " (for mount-local)")
        fix.append("modprobe fuse (in a container: give it --device /dev/fuse)")
    if missing:
        return Item("libguestfs", False, "missing: %s" % ", ".join(missing), "; ".join(fix))
    return Item("libguestfs", True, "%s, %s" % (found[0], dev_fuse))


@dataclass
class SuperminKernel:
    kernel: str
    version: str
    modules: str
    source: str      # how supermin finds it: SUPERMIN_KERNEL, /lib/modules or /boot


def _version_key(text: str) -> List[Tuple[int, object]]:
    """Orders like supermin's compare_version: digit runs as numbers, the rest as text."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", text)]


def kernel_version_from_file(path: str) -> Optional[str]:
    """The version string in an x86 bzImage header (what supermin and file(1) read), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
            if len(head) < 528 or head[514:518] != b"HdrS":
                return None
            if int.from_bytes(head[518:520], "little") < 0x1FF:
                return None
            f.seek(int.from_bytes(head[526:528], "little") + 0x200)
            raw = f.read(132)
    except OSError:
        return None
    m = re.match(rb"[^\0 \t\n]+", raw)
    return m.group(0).decode("ascii", "replace") if m and len(m.group(0)) < len(raw) else None


def _cpu_patterns(machine: str) -> List[str]:
    models = {"x86_64": ["amd64", "x86_64"], "amd64": ["amd64", "x86_64"],
              "aarch64": ["aarch64"], "ppc64le": ["powerpc64le"]}.get(machine, [machine])
    return ["vmlinu?-*-%s" % m for m in models]


def find_supermin_kernel(env: Mapping[str, str] = os.environ, boot: str = "/boot",
                         lib_modules: str = "/lib/modules",
                         machine: Optional[str] = None) -> Optional[SuperminKernel]:
    """The kernel supermin would pick for the libguestfs appliance, by its rules: $SUPERMIN_KERNEL
    (version from $SUPERMIN_KERNEL_VERSION or the file; ignored when unreadable), else the newest
    /lib/modules/*/vmlinuz, else the newest /boot/vmlinu?-* for this CPU (any, if none is) that
    is not a Xen kernel and has /lib/modules/VERSION/modules.dep. Modules: $SUPERMIN_MODULES, else
    /lib/modules/VERSION. None when supermin finds nothing."""
    def modules_for(version: str) -> str:
        return env.get("SUPERMIN_MODULES") or os.path.join(lib_modules, version)

    kernel = env.get("SUPERMIN_KERNEL")
    if kernel:
        version = env.get("SUPERMIN_KERNEL_VERSION") or kernel_version_from_file(kernel)
        if version:
            return SuperminKernel(kernel, version, modules_for(version), "SUPERMIN_KERNEL")
    try:
        versions = sorted(os.listdir(lib_modules), key=_version_key, reverse=True)
    except OSError:
        versions = []
    for version in versions:
        path = os.path.join(lib_modules, version, "vmlinuz")
        if os.path.exists(path):
            return SuperminKernel(path, version, modules_for(version), lib_modules)

    def modules_dep(version: str) -> bool:
        return os.path.isfile(os.path.join(lib_modules, version, "modules.dep"))

    def version_of(name: str) -> Optional[str]:
        if name.startswith(("vmlinuz-", "vmlinux-")) and modules_dep(name[8:]):
            return name[8:]
        return kernel_version_from_file(os.path.join(boot, name))

    try:
        names = os.listdir(boot)
    except OSError:
        names = []
    for patterns in (_cpu_patterns(machine or os.uname().machine), ["vmlinu?-*"]):
        picked = []
        for name in names:
            if "xen" in name or not any(fnmatch.fnmatchcase(name, p) for p in patterns):
                continue
            version = version_of(name)
            if version and modules_dep(version):
                picked.append((name, version))
        if picked:
            name, version = max(picked, key=lambda nv: _version_key(nv[0]))
            return SuperminKernel(os.path.join(boot, name), version, modules_for(version), boot)
    return None


def check_supermin_kernel(env: Mapping[str, str] = os.environ, boot: str = "/boot",
                          lib_modules: str = "/lib/modules", machine: Optional[str] = None,
                          access: Callable[[str, int], bool] = os.access) -> Item:
    """Can supermin build the libguestfs appliance, i.e. find a kernel and its modules that this
    user can read?"""
    name = "supermin-kernel"
    k = find_supermin_kernel(env, boot, lib_modules, machine)
    if k is None:
        ignored = ""
        if env.get("SUPERMIN_KERNEL"):
            ignored = "SUPERMIN_KERNEL=%s is not a readable kernel image (supermin ignores it); " \
                      % env["SUPERMIN_KERNEL"]
        return Item(name, False, "%sno kernel for supermin in %s with modules in %s (supermin "
                    "builds the libguestfs appliance from one; the running kernel %s is not "
                    "there)" % (ignored, boot, lib_modules, os.uname().release), KERNEL_FIX)
    where = "%s (version %s, from %s)" % (k.kernel, k.version, k.source)
    if not access(k.kernel, os.R_OK):
        return Item(name, False, "%s is not readable by uid %d" % (where, os.geteuid()),
                    "chmod 0644 %s (some distributions install kernels 0600), or run as root"
                    % k.kernel)
    if not os.path.isdir(k.modules) or not access(k.modules, os.R_OK | os.X_OK):
        return Item(name, False, "%s, but its modules directory %s is missing or unreadable"
                    % (where, k.modules),
                    "install the modules of kernel %s, or set SUPERMIN_MODULES" % k.version)
    return Item(name, True, "%s with modules %s" % (where, k.modules))


def check_nbd_module(sys_module: str = "/sys/module",
                     modinfo: Optional[Callable[[], Tuple[int, str]]] = None) -> Item:
    """The nbd kernel module (image --backend nbd). Optional: auto falls back to loop/guestfs."""
    name = "nbd-module"
    if os.path.isdir(os.path.join(sys_module, "nbd")):
        return Item(name, True, "loaded", optional=True)
    rc, out = (modinfo or _modinfo_nbd)()
    release = os.uname().release
    if rc == 0:
        return Item(name, True, "available for kernel %s (modprobe nbd loads it)" % release,
                    optional=True)
    lines = out.strip().splitlines()
    return Item(name, False, "kernel %s has no nbd module (modinfo nbd: %s)"
                % (release, lines[-1] if lines else "exit %d" % rc),
                "use image --backend loop or guestfs (auto does), or boot a kernel with nbd "
                "(CONFIG_BLK_DEV_NBD)", optional=True)


def _modinfo_nbd() -> Tuple[int, str]:
    tool = shutil.which("modinfo") or shutil.which("modinfo", path="/sbin:/usr/sbin")
    if not tool:
        return 127, "modinfo not found (apt-get install kmod)"
    r = subprocess.run([tool, "-F", "filename", "nbd"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return r.returncode, r.stdout


# --- the agent ---------------------------------------------------------------------------------

def check_agent_bundle(build: Optional[Callable[[], bytes]] = None) -> Item:
    """The guest agent zipapp builds (in memory) and has its entry point."""
    import io
    import zipfile

    from .bundle import build_bundle_bytes

    try:
        data = (build or build_bundle_bytes)()
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        return Item("agent-bundle", False, "cannot build the agent bundle: %s" % exc,
                    "reinstall guestlink (pip install --force-reinstall guestlink)")
    if "__main__.py" not in names or "guestlink/agent/cli.py" not in names:
        return Item("agent-bundle", False, "the agent bundle lacks its entry point (%d files)"
                    % len(names), "reinstall guestlink (pip install --force-reinstall guestlink)")
    return Item("agent-bundle", True, "builds (%d bytes, %d files)" % (len(data), len(names)))


# --- all of it ---------------------------------------------------------------------------------

#: The checks of this host alone, by item name (the test suite's fixtures call them by name).
HOST_CHECKS: Dict[str, Callable[[], Item]] = {
    "qemu": check_qemu, "loop-backend": check_loop_backend, "libguestfs": check_libguestfs,
    "supermin-kernel": check_supermin_kernel, "nbd-module": check_nbd_module,
    "agent-bundle": check_agent_bundle}


def run_checks(uri: Optional[str] = None, domain: Optional[str] = None,
               names: Tuple[Optional[str], Optional[str]] = (None, None)) -> List[Item]:
    """Every check, in the order printed."""
    items = [HOST_CHECKS["qemu"](), check_libvirt(uri)]
    if domain:
        items.append(check_channels(domain, uri, names))
    return items + [HOST_CHECKS[name]() for name in ("loop-backend", "libguestfs",
                                                      "supermin-kernel", "nbd-module",
                                                      "agent-bundle")]


def exit_status(items: Sequence[Item]) -> int:
    return EXIT_OK if all(i.ok or i.optional for i in items) else EXIT_PROBLEMS


def report(items: Sequence[Item], as_json: bool, out: Optional[IO[str]] = None) -> int:
    out = out or sys.stdout
    if as_json:
        out.write(json.dumps([asdict(i) for i in items], indent=2) + "\n")
    else:
        marks = ("\u2713", "\u2717")
        try:
            "".join(marks).encode(getattr(out, "encoding", None) or "utf-8")
        except (UnicodeEncodeError, LookupError):
            marks = ("ok", "FAIL")
        for item in items:
            out.write(item.line(marks) + "\n")
    return exit_status(items)
