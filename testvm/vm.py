"""Boot the guestlink test VM under QEMU (TCG) and talk to it from the host.

    with TestVM(tmpdir, agent_pyz="guestlink-agent.pyz") as vm:
        sock = socket.socket(socket.AF_UNIX); sock.connect(vm.ctl_path)
        ...

Ports (virtio-serial-pci controller, QEMU side = unix socket server, wait=off):
  nr=1 org.guestlink.ctl   -> vm.ctl_path
  nr=2 org.guestlink.data  -> vm.data_path
  nr=3.. extra_ports       -> vm.port_path(name)
  next   org.qemu.guest_agent.0 (TestVM(qga=True)) -> vm.qga_path; init.sh runs Debian's
         qemu-ga on it (kernel switch guestlink.noqga=1: the port without qemu-ga)

TestVM(guestlink_ports=False) leaves out ctl and data (a VM as people run it before enrolling);
the other ports then start at nr=1.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

from .build import TestbedError, ensure_base, make_overlay

QEMU = os.environ.get("GUESTLINK_TESTVM_QEMU", "qemu-system-x86_64")
CTL_PORT = "org.guestlink.ctl"
DATA_PORT = "org.guestlink.data"
#: the port name qemu-guest-agent (and libvirt) use
QGA_PORT = "org.qemu.guest_agent.0"
AGENT_GUEST_PATH = "/opt/guestlink/guestlink-agent.pyz"
READY_LINE = "guestlink-testvm: ready"
#: init's first console line (testvm/init.sh, the disk image's initramfs)
INIT_LINE = "guestlink-testvm: init started"
#: a TCG boot reaches init in 2-5 s; this long without it is a hung kernel
USERSPACE_TIMEOUT = 60.0
# Kernel command line: quiet serial console; skip slow legacy probing under TCG.
BASE_APPEND = ("console=ttyS0 quiet panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd "
               "tsc=reliable no_timer_check cryptomgr.notests random.trust_cpu=on")

#: -cpu for the guest: RDRAND (with random.trust_cpu=on) avoids an entropy stall at boot
QEMU_CPU = "qemu64,+rdrand"

_live: "weakref.WeakSet[TestVM]" = weakref.WeakSet()


class _KernelHang(Exception):
    """The guest kernel never started init (nothing from userspace on the console)."""


def kernel_cmdline(nports: int, append: str = "") -> str:
    """The guest's kernel command line (BASE_APPEND, the number of named ports init waits for)."""
    return " ".join(x for x in (BASE_APPEND, f"guestlink.nports={nports}", append) if x)


def guest_files(agent_pyz: Union[str, os.PathLike, None] = None, agent_args: Sequence[str] = (),
                extra_files: Optional[Mapping[str, Union[bytes, str, os.PathLike]]] = None) -> dict:
    """{guest_path: bytes | host_path} for make_overlay: the agent, its args file, extra files."""
    files: dict = {}
    if agent_pyz:
        if not Path(agent_pyz).is_file():
            raise TestbedError(f"agent zipapp not found: {agent_pyz}")
        files[AGENT_GUEST_PATH] = Path(agent_pyz)
    if agent_args:
        files["/etc/guestlink/agent-args"] = "".join(a + "\n" for a in agent_args).encode()
    for k, v in (extra_files or {}).items():
        files["/" + k.lstrip("/")] = v
    return files


def write_initrd(dest: Union[str, os.PathLike], files: Mapping, cache_dir=None):
    """Write the base initramfs plus an overlay of ``files`` (see guest_files) to ``dest``;
    return the BaseImage (``.kernel`` is the matching kernel). Used by TestVM and by tests that
    boot the guest some other way (e.g. under libvirt)."""
    base = ensure_base(cache_dir)
    with open(dest, "wb") as f:
        with open(base.initramfs, "rb") as b:
            shutil.copyfileobj(b, f)
        f.write(make_overlay(files))
    return base


@atexit.register
def _stop_all() -> None:
    for vm in list(_live):
        try:
            vm.stop(timeout=2)
        except Exception:
            pass


def _pdeathsig() -> None:  # pragma: no cover - runs in the child
    # QEMU dies with the process that started it (e.g. a killed pytest).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class QMPError(RuntimeError):
    pass


class TestVM:
    """One QEMU guest: Debian cloud kernel + busybox + python3 initramfs + the agent."""

    __test__ = False  # not a pytest test class
    #: seconds to wait for init's first line before calling the kernel hung
    userspace_timeout = USERSPACE_TIMEOUT

    def __init__(self, workdir: Union[str, os.PathLike],
                 agent_pyz: Union[str, os.PathLike, None] = None,
                 extra_files: Optional[Mapping[str, Union[bytes, str, os.PathLike]]] = None,
                 extra_ports: Sequence[str] = (),
                 memory: int = 512,
                 append: str = "",
                 agent_args: Sequence[str] = (),
                 smp: int = 2,
                 no_reboot: bool = False,
                 cache_dir: Union[str, os.PathLike, None] = None,
                 qga: bool = False,
                 guestlink_ports: bool = True):
        """
        workdir     -- directory for the initrd, console log, QEMU log and sockets
        agent_pyz   -- host path of the agent zipapp (None: boot without an agent)
        extra_files -- {guest_path: bytes | host_path} added to the guest (per boot)
        extra_ports -- names of additional virtserialports (nr=3, 4, ...)
        append      -- extra kernel command line (e.g. "guestlink.noagent=1")
        agent_args  -- extra arguments for `guestlink-agent.pyz run` (one per element)
        no_reboot   -- a guest `reboot` makes QEMU exit (default: the guest reboots)
        qga         -- add the port org.qemu.guest_agent.0 (vm.qga_path); init runs qemu-ga on it
        guestlink_ports -- add org.guestlink.ctl and .data (False: a VM not yet enrolled)
        """
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.agent_pyz = Path(agent_pyz) if agent_pyz else None
        self.extra_files = dict(extra_files or {})
        self.extra_ports = list(extra_ports)
        self.memory = memory
        self.append = append
        self.agent_args = list(agent_args)
        self.smp = smp
        self.no_reboot = no_reboot
        self.cache_dir = cache_dir
        self.proc: Optional[subprocess.Popen] = None
        self.boot_seconds: Optional[float] = None
        self.hung_boots: List[str] = []
        self._t_start = 0.0
        self._qemu_log = None
        # AF_UNIX paths are limited to 107 bytes: use a short dir if needed.
        self._sockdir_tmp = None
        if len(str(self.workdir)) > 60:
            self._sockdir_tmp = tempfile.mkdtemp(prefix="glvm-", dir="/tmp")
            self.sockdir = Path(self._sockdir_tmp)
        else:
            self.sockdir = self.workdir
        self.qga = qga
        self.guestlink_ports = guestlink_ports
        names = (([CTL_PORT, DATA_PORT] if guestlink_ports else []) + self.extra_ports
                 + ([QGA_PORT] if qga else []))
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate port names: {names}")
        self._ports: Dict[str, Path] = {}
        for i, name in enumerate(names):
            short = {CTL_PORT: "ctl", DATA_PORT: "data", QGA_PORT: "qga"}.get(name) or f"port{i + 1}"
            self._ports[name] = self.sockdir / f"{short}.sock"
        self.qmp_path = self.sockdir / "qmp.sock"

    # ------------------------------------------------------------------ paths
    @property
    def ctl_path(self) -> str:
        return self.port_path(CTL_PORT)

    @property
    def data_path(self) -> str:
        return self.port_path(DATA_PORT)

    @property
    def qga_path(self) -> str:
        """Host socket of the qemu-ga port (TestVM(qga=True))."""
        return self.port_path(QGA_PORT)

    def port_path(self, name: str) -> str:
        try:
            return str(self._ports[name])
        except KeyError:
            raise KeyError(f"no virtserialport named {name!r} (have {list(self._ports)})") from None

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.workdir / "qemu.log"

    # ---------------------------------------------------------------- lifecycle
    def _overlay_files(self) -> dict:
        return guest_files(self.agent_pyz, self.agent_args, self.extra_files)

    def qemu_command(self, kernel: Path, initrd: Path) -> List[str]:
        append = kernel_cmdline(len(self._ports), self.append)
        cmd = [QEMU, "-accel", "tcg", "-nodefaults", "-no-user-config", "-display", "none",
               "-machine", "pc", "-cpu", QEMU_CPU, "-smp", str(self.smp), "-m", str(self.memory),
               "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
               "-chardev", f"file,id=con0,path={self.console_log}",
               "-serial", "chardev:con0",
               "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
               "-device", "virtio-serial-pci,id=vser0"]
        for nr, (name, path) in enumerate(self._ports.items(), start=1):
            cmd += ["-chardev", f"socket,id=port{nr},path={path},server=on,wait=off",
                    "-device", f"virtserialport,bus=vser0.0,nr={nr},chardev=port{nr},name={name},id=vport{nr}"]
        if self.no_reboot:
            cmd.append("-no-reboot")
        return cmd

    def start(self, wait: bool = True, timeout: float = 120,
              retry_hung_kernel: int = 1) -> "TestVM":
        """Boot the VM. With wait=True, return once init printed its ready line
        (virtio ports set up; the agent is being started). A kernel that prints nothing from
        init within userspace_timeout s is reported on stderr and booted again, at most
        retry_hung_kernel times (recorded in self.hung_boots)."""
        if self.proc is not None:
            raise RuntimeError("VM already started")
        if not shutil.which(QEMU):
            raise TestbedError(f"{QEMU} not found: install Debian package qemu-system-x86")
        self.sockdir.mkdir(mode=0o700, exist_ok=True)
        initrd = self.workdir / "initrd.img"
        base = write_initrd(initrd, self._overlay_files(), self.cache_dir)
        for p in list(self._ports.values()) + [self.qmp_path]:
            if p.exists() or p.is_symlink():
                p.unlink()
        self.console_log.write_bytes(b"")
        cmd = self.qemu_command(base.kernel, initrd)
        (self.workdir / "qemu.cmd").write_text(" ".join(cmd) + "\n")
        self._qemu_log = open(self.qemu_log, "wb")
        self._t_start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._qemu_log,
                                     stderr=subprocess.STDOUT, preexec_fn=_pdeathsig,
                                     cwd=self.workdir)
        _live.add(self)
        # QEMU is up once its QMP socket accepts connections.
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                self._cleanup()
                raise TestbedError(f"QEMU exited at startup (status {self.proc.returncode}):\n"
                                   f"{self._tail(self.qemu_log)}\ncommand: {' '.join(cmd)}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.qmp_path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TestbedError("QEMU did not open its QMP socket within 30 s")
                time.sleep(0.02)
        if wait:
            try:
                self._wait_userspace(timeout)
                self.wait_ready(max(1.0, timeout - (time.monotonic() - self._t_start)))
            except _KernelHang as hang:
                self.stop()
                if retry_hung_kernel <= 0:
                    raise TimeoutError(str(hang)) from None
                # A TCG guest kernel has (rarely) hung before userspace with nothing on the
                # console. That is the emulator's, not the code under test's, so boot once
                # more, loudly and with kernel messages on, so a repeat can be diagnosed.
                print(f"testvm: {hang}; booting once more with kernel messages on",
                      file=sys.stderr, flush=True)
                self.hung_boots.append(str(hang))
                self.proc = None
                if "ignore_loglevel" not in self.append.split():
                    self.append = " ".join(x for x in (self.append, "ignore_loglevel") if x)
                return self.start(wait, timeout, retry_hung_kernel - 1)
            except BaseException:
                self.stop()
                raise
        return self

    def _wait_userspace(self, timeout: float) -> None:
        """Wait for init's first line; raise _KernelHang with QEMU's view if it never comes."""
        limit = min(timeout, self.userspace_timeout)
        try:
            self.wait_for_console(re.escape(INIT_LINE), limit)
        except TimeoutError:
            raise _KernelHang(f"the guest kernel did not reach init within {limit:.0f} s "
                              f"(console: {self.console_text()[-300:]!r}; "
                              f"{self._cpu_state()})") from None

    def _cpu_state(self) -> str:
        """QEMU's run state and each vCPU's instruction pointer, for a hang report."""
        try:
            status = self.qmp("query-status", timeout=3).get("status")
            regs = self.qmp("human-monitor-command", timeout=5,
                            **{"command-line": "info registers -a"})
            rips = re.findall(r"RIP=([0-9a-f]+)", regs)
            return f"QEMU status {status}, vCPU RIP {', '.join(rips) or '?'}"
        except Exception as e:  # diagnostics only: never mask the hang itself
            return f"QEMU state unavailable: {e}"

    def wait_ready(self, timeout: float = 120, start: int = 0) -> float:
        """Wait for init's ready line; return seconds since start()."""
        self.wait_for_console(re.escape(READY_LINE), timeout, start=start)
        t = time.monotonic() - self._t_start
        if self.boot_seconds is None:
            self.boot_seconds = t
        return t

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def wait_exit(self, timeout: float = 30) -> int:
        """Wait for QEMU to exit by itself (e.g. guest poweroff); return its status."""
        if self.proc is None:
            raise RuntimeError("VM not started")
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"QEMU still running after {timeout} s; console tail:\n"
                               f"{self._tail(self.console_log)}") from None
        self._cleanup()
        return rc

    def stop(self, timeout: float = 10) -> None:
        """Quit QEMU (QMP quit, then SIGTERM, then SIGKILL) and reap it. Idempotent."""
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                self.qmp("quit", timeout=min(3.0, timeout))
            except Exception:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(3)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        _live.discard(self)
        if self._qemu_log:
            self._qemu_log.close()
            self._qemu_log = None
        if self._sockdir_tmp:  # kept: a retried boot makes it again
            shutil.rmtree(self._sockdir_tmp, ignore_errors=True)

    def __enter__(self) -> "TestVM":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:
        try:
            if self.is_running():
                self.proc.kill()
                self.proc.wait()
        except Exception:
            pass

    # ------------------------------------------------------------------ console
    def console_text(self) -> str:
        """Serial console output so far (\\r removed)."""
        try:
            data = self.console_log.read_bytes()
        except FileNotFoundError:
            return ""
        return data.decode("utf-8", "replace").replace("\r", "")

    def wait_for_console(self, pattern: str, timeout: float = 60, start: int = 0) -> "re.Match":
        """Wait until regex `pattern` appears in console_text()[start:]; return the match.
        Use start=len(vm.console_text()) to only look at output from now on."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            text = self.console_text()
            m = rx.search(text, start)
            if m:
                return m
            if not self.is_running():
                raise TestbedError(f"QEMU exited (status {self.returncode}) while waiting for "
                                   f"{pattern!r}; console tail:\n{self._tail(self.console_log)}\n"
                                   f"qemu log:\n{self._tail(self.qemu_log)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not seen on the console within {timeout} s; "
                                   f"console tail:\n{self._tail(self.console_log)}")
            time.sleep(0.05)

    @staticmethod
    def _tail(path: Path, n: int = 4000) -> str:
        try:
            data = path.read_bytes()[-n:]
        except FileNotFoundError:
            return "(none)"
        return data.decode("utf-8", "replace").replace("\r", "")

    # ---------------------------------------------------------------------- QMP
    def qmp(self, cmd: str, timeout: float = 10, **arguments):
        """Run one QMP command on a fresh connection; return its "return" value."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(self.qmp_path))
            f = s.makefile("rwb", buffering=0)

            def recv() -> dict:
                while True:
                    line = f.readline()
                    if not line:
                        raise EOFError("QMP connection closed")
                    msg = json.loads(line)
                    if "event" not in msg:
                        return msg

            def send(c: str, args: dict) -> dict:
                req = {"execute": c}
                if args:
                    req["arguments"] = args
                f.write(json.dumps(req).encode() + b"\n")
                return recv()

            recv()  # greeting
            send("qmp_capabilities", {})
            try:
                resp = send(cmd, arguments)
            except (EOFError, ConnectionResetError):
                if cmd == "quit":
                    return {}
                raise
            if "error" in resp:
                raise QMPError(f"{cmd}: {resp['error'].get('desc', resp['error'])}")
            return resp.get("return")
