"""Build the base initramfs of the guestlink test VM from Debian packages.

The guest is assembled from the .deb files of the packages in GUEST_PACKAGES
(fetched with ``apt-get download`` into ``<cache>/debs`` and unpacked with
``dpkg-deb -x``), so it does not depend on what is installed on the host.
Only if a download fails is the package's installed copy on the host used
instead (``dpkg -L``), and the build says so.

The result, ``<cache>/base-<key>/{vmlinuz,initramfs.img,manifest.json}``, is
keyed by a hash of the package versions and of the test bed's build inputs
(this file, init.sh, power.sh), so it is rebuilt only when one of them changes.

The agent is *not* in the base: ``make_overlay()`` makes a small uncompressed
cpio archive that is appended per boot (Linux unpacks concatenated archives).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CACHE = REPO / ".cache" / "testvm"

KERNEL_META = "linux-image-cloud-amd64"
GUEST_PACKAGES = [
    # kernel: resolved from KERNEL_META to linux-image-<abi>-cloud-amd64
    "busybox-static",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "zlib1g",
    "libexpat1",
    "libssl3",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "libuuid1",
    "base-files",
]
# Debian's qemu-guest-agent (qemu-ga) and the libraries it needs: init.sh runs it when the VM has
# a virtserialport named org.qemu.guest_agent.0 (TestVM(qga=True)), as on the VMs people run today.
QGA_PACKAGES = [
    "qemu-guest-agent", "libglib2.0-0", "libpcre2-8-0", "libmount1", "libblkid1", "libselinux1",
    "liburing2", "libnuma1", "libudev1", "libgcc-s1",
]
QGA_BINARY = "usr/sbin/qemu-ga"
# Modules needed for virtio-serial; dependencies are added from the .ko files.
WANTED_MODULES = ["virtio_pci", "virtio_console"]

PYVER = "3.11"
MULTIARCH = "x86_64-linux-gnu"
HOSTNAME = "guestlink-testvm"

# Pruned from the guest's stdlib (top-level names under /usr/lib/python3.11).
PRUNE_STDLIB = {
    "test", "idlelib", "tkinter", "turtledemo", "turtle.py", "ensurepip", "lib2to3",
    "pydoc_data", "pydoc.py", "distutils", "venv", "sqlite3", "curses", "dbm",
    "config-3.11-x86_64-linux-gnu", "__phello__", "__hello__.py", "antigravity.py",
    "this.py", "EXTERNALLY-MANAGED", "LICENSE.txt", "_distutils_system_mod.py",
    "idle.py", "site-packages", "dist-packages", "__pycache__",
}
PRUNE_ANYWHERE = {"test", "tests", "__pycache__", "idle_test"}
# Extension modules not worth shipping (tests, curses/readline/dbm/sqlite, ...).
PRUNE_DYNLOAD = re.compile(
    r"^(_test\w*|_xx\w*|xxlimited\w*|_ctypes_test|_curses\w*|readline|_dbm|_gdbm|"
    r"_sqlite3|_tkinter|nis|ossaudiodev|_crypt|audioop)\."
)

# Fixed mtime for reproducible archives (stdlib .pyc use unchecked-hash mode).
EPOCH = 1700000000


class TestbedError(RuntimeError):
    """The test bed cannot be built or started (missing tool/package, ...)."""


def _log(msg: str) -> None:
    print(f"[testvm] {msg}", file=sys.stderr, flush=True)


def _run(cmd: List[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, **kw)
    except FileNotFoundError:
        raise TestbedError(f"{cmd[0]} not found: install Debian package "
                           f"{_TOOL_PACKAGES.get(cmd[0], '?')}") from None
    except subprocess.CalledProcessError as e:
        raise TestbedError(f"command failed: {' '.join(cmd)}\n{e.stderr.strip()}") from None


_TOOL_PACKAGES = {"apt-get": "apt", "apt-cache": "apt", "dpkg-deb": "dpkg", "dpkg": "dpkg",
                  "dpkg-query": "dpkg"}


# --------------------------------------------------------------------------
# Package resolution and download

def _policy(pkgs: List[str]) -> Dict[str, Dict[str, str]]:
    """{pkg: {"installed": v|None, "candidate": v|None}} from apt-cache policy."""
    out: Dict[str, Dict[str, str]] = {}
    try:
        text = _run(["apt-cache", "policy", *pkgs]).stdout
    except TestbedError:
        text = ""
    cur = None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            cur = line.rstrip(":").split(":")[0]
            out[cur] = {}
        elif cur and line.strip().startswith(("Installed:", "Candidate:")):
            k, v = line.strip().split(":", 1)
            v = v.strip()
            out[cur][k.lower()] = None if v == "(none)" else v
    return out


def _installed_version(pkg: str) -> Optional[str]:
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", pkg],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except FileNotFoundError:
        return None
    if r.returncode == 0 and "\t" in r.stdout:
        status, ver = r.stdout.split("\t", 1)
        if status.endswith(" installed"):
            return ver
    return None


def _kernel_package() -> str:
    """linux-image-<abi>-cloud-amd64, resolved from the metapackage."""
    env = os.environ.get("GUESTLINK_TESTVM_KERNEL_PKG")
    if env:
        return env
    cands: List[str] = []
    try:
        text = _run(["apt-cache", "depends", "--important", KERNEL_META]).stdout
        cands = re.findall(r"Depends:\s*(linux-image-\S+)", text)
    except TestbedError:
        pass
    if not cands:
        # fall back to the installed metapackage's dependency
        try:
            text = _run(["dpkg-query", "-W", "-f=${Depends}", KERNEL_META]).stdout
            cands = re.findall(r"(linux-image-[0-9]\S*?)(?:[\s,(]|$)", text)
        except TestbedError:
            pass
    if not cands:
        raise TestbedError(
            f"cannot resolve the guest kernel: Debian package {KERNEL_META} is unknown to apt "
            f"(run `apt-get update`, or `apt-get install {KERNEL_META}`)")
    return cands[0]


def resolve_versions() -> Dict[str, str]:
    """{package: version} of every package the guest is built from."""
    pkgs = [_kernel_package()] + GUEST_PACKAGES + QGA_PACKAGES
    pol = _policy(pkgs)
    versions = {}
    missing = []
    for p in pkgs:
        info = pol.get(p, {})
        v = info.get("candidate") or info.get("installed") or _installed_version(p)
        if not v:
            missing.append(p)
        else:
            versions[p] = v
    if missing:
        raise TestbedError(
            "Debian packages needed for the test VM are unknown to apt: "
            + ", ".join(missing) + " (run `apt-get update`; the kernel comes from "
            f"{KERNEL_META})")
    return versions


def _deb_path(debdir: Path, pkg: str, ver: str) -> Path:
    return debdir / f"{pkg}_{ver.replace(':', '%3a')}_amd64.deb"


def fetch_debs(versions: Mapping[str, str], debdir: Path) -> Dict[str, Union[Path, str]]:
    """Download the exact .debs; {pkg: path to .deb, or "host" if it must come from the host}."""
    debdir.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Union[Path, str]] = {}
    todo = []
    for p, v in versions.items():
        path = _deb_path(debdir, p, v)
        if path.exists():
            result[p] = path
        else:
            todo.append(p)
    if todo:
        _log(f"apt-get download {' '.join(todo)}")
        with tempfile.TemporaryDirectory(dir=debdir) as tmp:
            os.chmod(tmp, 0o755)
            # One call for all; if it fails, retry one by one to find the culprit.
            r = subprocess.run(["apt-get", "download", "-q", *[f"{p}={versions[p]}" for p in todo]],
                               cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if r.returncode != 0:
                for p in todo:
                    subprocess.run(["apt-get", "download", "-q", f"{p}={versions[p]}"], cwd=tmp,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for f in Path(tmp).glob("*.deb"):
                name = f.name.split("_", 1)[0]
                if name in versions:
                    os.replace(f, _deb_path(debdir, name, versions[name]))
        for p in todo:
            path = _deb_path(debdir, p, versions[p])
            if path.exists():
                result[p] = path
            elif _installed_version(p):
                _log(f"WARNING: could not download {p}={versions[p]}; using the host's installed copy")
                result[p] = "host"
            else:
                raise TestbedError(f"cannot download Debian package {p}={versions[p]} and it is not "
                                   f"installed on the host (apt-get output: {r.stdout.strip()[-500:]})")
    return result


def _unpack(sources: Mapping[str, Union[Path, str]], stage: Path) -> None:
    for pkg, src in sources.items():
        if src == "host":
            files = _run(["dpkg", "-L", pkg]).stdout.splitlines()
            for f in files:
                s = Path(f)
                if s.is_file() or s.is_symlink():
                    d = stage / f.lstrip("/")
                    d.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(s, d, follow_symlinks=False)
        else:
            _run(["dpkg-deb", "-x", str(src), str(stage)])


# --------------------------------------------------------------------------
# ELF and kernel-module helpers

def elf_needed(path: Path) -> List[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF file."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return []
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = []
    for i in range(e_shnum):
        off = e_shoff + i * e_shentsize
        sh_type, = struct.unpack_from("<I", data, off + 4)
        sh_offset, sh_size = struct.unpack_from("<QQ", data, off + 0x18)
        sh_link, = struct.unpack_from("<I", data, off + 0x28)
        sections.append((sh_type, sh_offset, sh_size, sh_link))
    needed = []
    for sh_type, off, size, link in sections:
        if sh_type != 6:  # SHT_DYNAMIC
            continue
        str_off = sections[link][1]
        for j in range(0, size, 16):
            tag, val = struct.unpack_from("<qQ", data, off + j)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", str_off + val)
                needed.append(data[str_off + val:end].decode())
    return needed


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc"], input=data, stdout=subprocess.PIPE, check=True).stdout
    if path.suffix == ".gz":
        return gzip.decompress(data)
    return data


def _module_deps(data: bytes) -> List[str]:
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    if not m or not m.group(1):
        return []
    return m.group(1).decode().split(",")


def _resolve_modules(moddir: Path, wanted: Iterable[str]) -> List[tuple]:
    """[(relpath without compression suffix, bytes)] in load order (deps first)."""
    index: Dict[str, Path] = {}
    for p in (moddir / "kernel").rglob("*.ko*"):
        name = p.name.split(".ko")[0].replace("-", "_")
        index[name] = p
    builtin = set()
    bf = moddir / "modules.builtin"
    if bf.exists():
        builtin = {Path(l.strip()).name.split(".ko")[0].replace("-", "_")
                   for l in bf.read_text().splitlines() if l.strip()}
    order: List[tuple] = []
    seen = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            if name in builtin:
                return
            raise TestbedError(f"kernel module {name} not found in {moddir}")
        data = _read_module(index[name])
        for dep in _module_deps(data):
            visit(dep)
        rel = str(index[name].relative_to(moddir))
        rel = re.sub(r"\.ko\.(xz|zst|gz)$", ".ko", rel)
        order.append((rel, data))

    for w in wanted:
        visit(w)
    return order


# Public names for other guest builders (testvm/diskimage.py): unpack .debs from fetch_debs(),
# resolve kernel modules with their dependencies.
unpack_debs = _unpack
resolve_modules = _resolve_modules


# --------------------------------------------------------------------------
# cpio (newc) writer

class CpioWriter:
    def __init__(self) -> None:
        self.parts: List[bytes] = []
        self.ino = 1000
        self.dirs: set = set()
        #: {path in the archive: (uid, gid)}; everything else belongs to root
        self.owners: Dict[str, Tuple[int, int]] = {}

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1,
               rdev: tuple = (0, 0)) -> None:
        name = name.lstrip("/")
        nameb = name.encode() + b"\0"
        self.ino += 1
        uid, gid = self.owners.get(name, (0, 0))
        hdr = "070701" + "".join(f"{x:08x}" for x in (
            self.ino, mode, uid, gid, nlink, EPOCH, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0))
        buf = hdr.encode() + nameb
        buf += b"\0" * (-len(buf) % 4)
        buf += data
        buf += b"\0" * (-len(buf) % 4)
        self.parts.append(buf)

    def mkdir(self, name: str, mode: int = 0o755) -> None:
        name = name.strip("/")
        if not name or name in self.dirs:
            return
        self.mkdir(os.path.dirname(name))
        self.dirs.add(name)
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.mkdir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.mkdir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.mkdir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def add_tree(self, root: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            if rel != ".":
                st = os.lstat(dirpath)
                self.mkdir(rel, stat.S_IMODE(st.st_mode))
            for n in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
                p = os.path.join(dirpath, n)
                name = os.path.normpath(os.path.join(rel, n))
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    self.symlink(name, os.readlink(p))
                elif stat.S_ISREG(st.st_mode):
                    with open(p, "rb") as f:
                        self.file(name, f.read(), stat.S_IMODE(st.st_mode))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        out = b"".join(self.parts)
        return out + b"\0" * (-len(out) % 512)


def make_overlay(files: Mapping[str, Union[bytes, str, os.PathLike]]) -> bytes:
    """An uncompressed cpio with {guest_path: bytes | host path}; appended to the base."""
    w = CpioWriter()
    for gpath, src in sorted(files.items()):
        if isinstance(src, (bytes, bytearray)):
            data, mode = bytes(src), 0o644
        else:
            p = Path(src)
            data = p.read_bytes()
            mode = 0o755 if os.access(p, os.X_OK) else 0o644
        if gpath.endswith((".sh",)) or gpath.startswith(("/usr/bin/", "/bin/", "/sbin/", "/usr/sbin/")):
            mode = 0o755
        w.file(gpath, data, mode)
    return w.finish()


# --------------------------------------------------------------------------
# Root filesystem assembly

def _find_lib(stage: Path, soname: str) -> Optional[Path]:
    for d in (f"lib/{MULTIARCH}", f"usr/lib/{MULTIARCH}", "lib64", "lib", "usr/lib"):
        p = stage / d / soname
        if p.exists():
            return p
    return None


def _copy_libs(stage: Path, root: Path, binaries: List[Path]) -> List[Path]:
    """Copy the shared-library closure of ``binaries``; return binaries whose libs are missing."""
    libdir = root / "lib" / MULTIARCH
    libdir.mkdir(parents=True, exist_ok=True)
    unresolved = []
    done: set = set()
    for b in binaries:
        queue = list(elf_needed(b))
        ok = True
        pending = []
        while queue:
            so = queue.pop()
            if so in done or so in pending:
                continue
            src = _find_lib(stage, so)
            if not src:
                ok = False
                break
            pending.append(so)
            queue.extend(elf_needed(src.resolve()))
        if not ok:
            unresolved.append(b)
            continue
        for so in pending:
            src = _find_lib(stage, so)
            shutil.copyfile(src.resolve(), libdir / so)
            os.chmod(libdir / so, 0o755)
            done.add(so)
    return unresolved


def _copy_stdlib(stage: Path, root: Path) -> None:
    src = stage / "usr/lib" / f"python{PYVER}"
    dst = root / "usr/lib" / f"python{PYVER}"

    def ignore(d: str, names: List[str]) -> List[str]:
        drop = [n for n in names if n in PRUNE_ANYWHERE]
        if Path(d) == src:
            drop += [n for n in names if n in PRUNE_STDLIB]
        if Path(d).name == "lib-dynload":
            drop += [n for n in names if PRUNE_DYNLOAD.match(n)]
        return drop

    shutil.copytree(src, dst, symlinks=True, ignore=ignore)
    # Debian's sitecustomize.py is a symlink into /etc/python3.11
    etc = stage / "etc" / f"python{PYVER}"
    if etc.is_dir():
        shutil.copytree(etc, root / "etc" / f"python{PYVER}", symlinks=True)


def _precompile(stage: Path, root: Path) -> str:
    """Compile the guest stdlib to .pyc (unchecked-hash); prefer the guest's own python."""
    target = root / "usr/lib" / f"python{PYVER}"
    args = ["-m", "compileall", "-q", "-j0", "--invalidation-mode", "unchecked-hash",
            "-s", str(root), "-p", "/", "-x", r"(lib2to3|/test/|bad\w*\.py)", str(target)]
    ld = stage / "lib64" / "ld-linux-x86-64.so.2"
    libpath = ":".join(str(stage / d) for d in (f"lib/{MULTIARCH}", f"usr/lib/{MULTIARCH}"))
    guest_py = [str(ld.resolve() if ld.exists() else ld), "--library-path", libpath,
                str(stage / "usr/bin" / f"python{PYVER}")]
    env = dict(os.environ, PYTHONHOME=str(root / "usr"), PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run(guest_py + ["-S"] + args, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    if r.returncode == 0:
        return "guest python"
    _log(f"compiling with the guest python failed ({r.stdout.strip()[-300:]}); trying host python")
    if sys.version_info[:2] == tuple(int(x) for x in PYVER.split(".")):
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        r = subprocess.run([sys.executable] + args, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if r.returncode == 0:
            return "host python"
    _log("WARNING: guest stdlib not precompiled (boots will be slower)")
    return "none"


#: The test guest's unprivileged user (etc/passwd below).
GUEST_USER, GUEST_UID, GUEST_GID = "guest", 1000, 1000

ETC_FILES = {
    "etc/hostname": HOSTNAME + "\n",
    "etc/hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost\n",
    # guest: the unprivileged user of the exec --user tests (home /home/guest, owned by it)
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
                  "guest:x:1000:1000:guest:/home/guest:/bin/sh\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\nguest:x:1000:\nusers:x:100:guest\n",
    "etc/shadow": "root::19000:0:99999:7:::\nguest:*:19000:0:99999:7:::\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
    "etc/profile": "export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8\n",
    "etc/os-release.fallback": 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
                               'VERSION_ID="12"\nVERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n',
}


def _assemble(stage: Path, root: Path, kver: str) -> dict:
    info: dict = {}
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "lib", "lib64", "etc/guestlink/handlers.d",
              "etc/guestlink-testvm", "proc", "sys", "dev", "run", "tmp", "var/tmp", "var/log",
              "var/lib", "root", "opt/guestlink", "mnt", "home/guest"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "var/tmp", 0o1777)
    os.symlink("/run", root / "var/run")

    # busybox + applet symlinks (the static binary runs on the host too)
    shutil.copy2(stage / "bin/busybox", root / "bin/busybox")
    applets = _run([str(stage / "bin/busybox"), "--list-full"]).stdout.split()
    for a in applets:
        p = root / a
        if not p.exists() and not p.is_symlink():
            p.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/bin/busybox", p)
    # poweroff & co: wrappers that work without an init system
    power = (HERE / "power.sh").read_bytes()
    for name in ("poweroff", "reboot", "halt", "shutdown"):
        for d in ("sbin", "usr/sbin"):
            p = root / d / name
            if p.exists() or p.is_symlink():
                p.unlink()
        (root / "sbin" / name).write_bytes(power)
        os.chmod(root / "sbin" / name, 0o755)
        os.symlink(f"/sbin/{name}", root / "usr/sbin" / name)

    # missing from Debian's busybox-static: pgrep/pkill (python), nohup
    shutil.copyfile(HERE / "pgrep.py", root / "usr/bin/pgrep")
    os.chmod(root / "usr/bin/pgrep", 0o755)
    os.symlink("pgrep", root / "usr/bin/pkill")
    if not (root / "usr/bin/nohup").exists():
        (root / "usr/bin/nohup").write_text("#!/bin/sh\ntrap '' HUP\nexec \"$@\"\n")
        os.chmod(root / "usr/bin/nohup", 0o755)

    # python
    pybin = stage / "usr/bin" / f"python{PYVER}"
    shutil.copy2(pybin, root / "usr/bin" / f"python{PYVER}")
    os.symlink(f"python{PYVER}", root / "usr/bin/python3")
    os.symlink(f"python{PYVER}", root / "usr/bin/python")
    _copy_stdlib(stage, root)
    dynload = root / "usr/lib" / f"python{PYVER}" / "lib-dynload"
    exts = sorted(dynload.glob("*.so"))
    bad = _copy_libs(stage, root, [root / "usr/bin" / f"python{PYVER}"])
    if bad:
        raise TestbedError("shared libraries for python are missing from the guest packages")
    dropped = _copy_libs(stage, root, exts)
    for b in dropped:
        b.unlink()
    info["dropped_extensions"] = [b.name.split(".")[0] for b in dropped]
    # dynamic loader
    ld = stage / "lib64" / "ld-linux-x86-64.so.2"
    shutil.copyfile(ld.resolve(), root / "lib" / MULTIARCH / "ld-linux-x86-64.so.2")
    os.chmod(root / "lib" / MULTIARCH / "ld-linux-x86-64.so.2", 0o755)
    os.symlink(f"/lib/{MULTIARCH}/ld-linux-x86-64.so.2", root / "lib64/ld-linux-x86-64.so.2")

    # qemu-guest-agent with its shared-library closure
    shutil.copy2(stage / QGA_BINARY, root / QGA_BINARY)
    if _copy_libs(stage, root, [root / QGA_BINARY]):
        raise TestbedError("shared libraries for qemu-ga are missing from the guest packages "
                           f"({', '.join(QGA_PACKAGES)})")
    (root / "etc/qemu").mkdir(parents=True, exist_ok=True)

    # kernel modules
    moddir = stage / "lib/modules" / kver
    mods = _resolve_modules(moddir, WANTED_MODULES)
    for rel, data in mods:
        p = root / "lib/modules" / kver / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "etc/guestlink-testvm/modules").write_text("".join(rel + "\n" for rel, _ in mods))
    info["modules"] = [Path(rel).name for rel, _ in mods]

    # /etc
    for name, text in ETC_FILES.items():
        if name == "etc/os-release.fallback":
            continue
        (root / name).write_text(text)
    os.chmod(root / "etc/shadow", 0o600)
    osrel = stage / "usr/lib/os-release"
    if osrel.exists():
        (root / "usr/lib").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(osrel, root / "usr/lib/os-release")
        os.symlink("../usr/lib/os-release", root / "etc/os-release")
    else:
        (root / "etc/os-release").write_text(ETC_FILES["etc/os-release.fallback"])
    if (stage / "etc/debian_version").exists():
        shutil.copyfile(stage / "etc/debian_version", root / "etc/debian_version")

    # /init
    shutil.copyfile(HERE / "init.sh", root / "init")
    os.chmod(root / "init", 0o755)

    info["precompiled_with"] = _precompile(stage, root)
    return info


# --------------------------------------------------------------------------
# Public API

@dataclass
class BaseImage:
    dir: Path
    kernel: Path
    initramfs: Path
    kernel_version: str
    manifest: dict


def _inputs_hash(versions: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for f in ("build.py", "init.sh", "power.sh", "pgrep.py"):
        h.update((HERE / f).read_bytes())
    h.update(json.dumps(sorted(versions.items())).encode())
    h.update(os.environ.get("GUESTLINK_TESTVM_COMPRESS", "none").encode())
    return h.hexdigest()[:16]


def _compress(raw: bytes) -> tuple:
    """Uncompressed by default: measured under TCG, unpacking a 40 MB raw cpio is
    ~0.5 s faster than zstd (10.6 MB) and faster still than gzip.
    GUESTLINK_TESTVM_COMPRESS=zstd|gzip picks a smaller, slower-booting image."""
    method = os.environ.get("GUESTLINK_TESTVM_COMPRESS", "none")
    if method == "zstd" and shutil.which("zstd"):
        r = subprocess.run(["zstd", "-q", "-19", "-T0", "-c"], input=raw, stdout=subprocess.PIPE)
        if r.returncode == 0:
            return r.stdout, "zstd"
    if method in ("gzip", "zstd"):
        return gzip.compress(raw, 9, mtime=0), "gzip"
    return raw, "none"


def build_base(cache_dir: Path, versions: Mapping[str, str], key: str) -> Path:
    t0 = time.monotonic()
    out = cache_dir / f"base-{key}"
    sources = fetch_debs(versions, cache_dir / "debs")
    kpkg = next(p for p in versions if p.startswith("linux-image-"))
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="build-") as tmp:
        stage, root = Path(tmp) / "stage", Path(tmp) / "root"
        stage.mkdir()
        root.mkdir()
        _log("unpacking packages")
        _unpack(sources, stage)
        kernels = sorted((stage / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise TestbedError(f"no /boot/vmlinuz-* in {kpkg}")
        kver = kernels[-1].name[len("vmlinuz-"):]
        _log(f"assembling root filesystem (kernel {kver})")
        info = _assemble(stage, root, kver)
        w = CpioWriter()
        w.owners["home/guest"] = (GUEST_UID, GUEST_GID)
        w.chardev("dev/console", 5, 1, 0o600)
        w.chardev("dev/null", 1, 3, 0o666)
        w.add_tree(root)
        raw = w.finish()
        comp, method = _compress(raw)
        comp += b"\0" * (-len(comp) % 4)  # next archive must start 4-byte aligned
        dst = Path(tmp) / "out"
        dst.mkdir()
        shutil.copyfile(kernels[-1], dst / "vmlinuz")
        (dst / "initramfs.img").write_bytes(comp)
        manifest = dict(key=key, kernel_version=kver, packages=dict(versions),
                        sources={p: ("host" if s == "host" else Path(s).name) for p, s in sources.items()},
                        compression=method, initramfs_size=len(comp), uncompressed_size=len(raw),
                        build_seconds=round(time.monotonic() - t0, 1), **info)
        (dst / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(dst, out)
    _log(f"built {out} ({len(comp) / 1e6:.1f} MB {method}, {len(raw) / 1e6:.1f} MB raw) "
         f"in {time.monotonic() - t0:.0f}s")
    return out


def _load(out: Path) -> BaseImage:
    m = json.loads((out / "manifest.json").read_text())
    return BaseImage(out, out / "vmlinuz", out / "initramfs.img", m["kernel_version"], m)


def ensure_base(cache_dir: Union[str, os.PathLike, None] = None) -> BaseImage:
    """Build the base image if needed, else reuse the cached one."""
    cache_dir = Path(cache_dir) if cache_dir else Path(os.environ.get("GUESTLINK_TESTVM_CACHE", DEFAULT_CACHE))
    cache_dir.mkdir(parents=True, exist_ok=True)
    for tool, pkg in (("dpkg-deb", "dpkg"), ("apt-get", "apt")):
        if not shutil.which(tool):
            raise TestbedError(f"{tool} not found: the test VM is built from Debian packages "
                               f"(install {pkg}; a Debian/Ubuntu host is required)")
    versions = resolve_versions()
    key = _inputs_hash(versions)
    out = cache_dir / f"base-{key}"
    with open(cache_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers: build once
        if not (out / "manifest.json").exists():
            build_base(cache_dir, versions, key)
            # drop older bases
            for old in cache_dir.glob("base-*"):
                if old != out and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
    return _load(out)
