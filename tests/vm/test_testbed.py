"""Tests of the real-VM test bed itself (no guestlink agent needed)."""

import re
import socket
import zipapp
from pathlib import Path

import pytest

from testvm import TestVM

# A stand-in "agent": opens the ctl port, says READY (the host must not write
# before that), then echoes bytes; a chunk starting with "!" runs a shell command
# and answers "RC <status>".
ECHO_AGENT = r'''
import os, subprocess, sys, time
path = "/dev/virtio-ports/org.guestlink.ctl"
fd = os.open(path, os.O_RDWR)
print("echo-agent: argv=%r" % (sys.argv[1:],), flush=True)
os.write(fd, b"READY\n")          # blocks until the host is connected
buf = bytearray(65536)
while True:
    n = os.readv(fd, [buf])
    if n == 0:                    # no host connected (POLLHUP): wait
        time.sleep(0.05)
        continue
    data = bytes(buf[:n])
    if data.startswith(b"!"):
        rc = subprocess.call(data[1:].decode().strip(), shell=True)
        os.write(fd, b"RC %d\n" % rc)
    else:
        os.write(fd, data)
'''


@pytest.fixture
def echo_pyz(tmp_path):
    src = tmp_path / "echo"
    src.mkdir()
    (src / "__main__.py").write_text(ECHO_AGENT)
    out = tmp_path / "echo-agent.pyz"
    zipapp.create_archive(src, out)
    return out


class Port:
    """Host end of a virtio-serial port (QEMU's unix socket)."""

    def __init__(self, path, timeout=60):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def readline(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("port closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def read_exactly(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("port closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def run(self, cmd):
        self.sock.sendall(b"!" + cmd.encode() + b"\n")
        line = self.readline()
        assert line.startswith(b"RC "), line
        return int(line[3:])

    def close(self):
        self.sock.close()


def test_boot_without_agent(make_vm):
    vm = make_vm(agent_pyz=None, append="guestlink.noagent=1",
                 extra_ports=["org.qemu.guest_agent.0"])
    assert vm.is_running()
    vm.wait_for_console(r"guestlink-testvm: agent disabled", timeout=10)
    text = vm.console_text()
    assert "guestlink-testvm: ready" in text
    ports = dict(re.findall(r"guestlink-testvm: port (\S+) -> /dev/(\S+)", text))
    assert set(ports) == {"org.guestlink.ctl", "org.guestlink.data", "org.qemu.guest_agent.0"}
    assert Path(vm.port_path("org.qemu.guest_agent.0")).exists()
    assert vm.qmp("query-status")["status"] == "running"
    assert vm.boot_seconds is not None and vm.boot_seconds < 120
    vm.stop()
    assert not vm.is_running()
    assert vm.returncode is not None
    vm.stop()  # idempotent


def test_echo_over_ctl_with_args_and_files(make_vm, echo_pyz):
    vm = make_vm(agent_pyz=echo_pyz, agent_args=["--flag", "two words"],
                 extra_files={"/etc/guestlink/agent.conf": b"answer = 42\n"})
    port = Port(vm.ctl_path)
    assert port.readline() == b"READY"  # only now may the host write
    port.sock.sendall(b"hello guest\n")
    assert port.readline() == b"hello guest"
    payload = bytes(range(256)) * 1024  # 256 KiB, binary
    port.sock.sendall(payload)
    assert port.read_exactly(len(payload)) == payload
    assert port.run("grep -q 'answer = 42' /etc/guestlink/agent.conf") == 0
    assert port.run("test -L /dev/virtio-ports/org.guestlink.data") == 0
    assert port.run("test \"$(hostname)\" = guestlink-testvm") == 0
    vm.wait_for_console(r"echo-agent: argv=\['run', '--log-level', 'debug', '--flag', 'two words'\]",
                        timeout=10)
    port.close()
    vm.stop()


def test_respawn_reboot_poweroff(make_vm, echo_pyz):
    vm = make_vm(agent_pyz=echo_pyz)
    port = Port(vm.ctl_path)
    assert port.readline() == b"READY"
    # agent killed -> respawned; the host connection survives
    mark = len(vm.console_text())
    port.sock.sendall(b"!kill -9 $PPID\n")
    assert port.readline() == b"READY"
    vm.wait_for_console(r"agent exited \(status 137\), respawning", timeout=10, start=mark)
    # guest reboot -> the VM boots again (QEMU keeps running)
    mark = len(vm.console_text())
    port.sock.sendall(b"!reboot\n")
    vm.wait_ready(timeout=120, start=mark)
    # busybox sh runs its own `reboot` applet, which signals PID 1 and returns 0
    # at once (like a real `reboot`): an "RC 0" may come before the new READY.
    line = port.readline()
    while line.startswith(b"RC "):
        line = port.readline()
    assert line == b"READY"
    assert vm.is_running()
    # guest poweroff -> QEMU exits
    port.sock.sendall(b"!poweroff\n")
    assert vm.wait_exit(timeout=60) == 0
    port.close()


def test_reboot_exits_with_no_reboot(make_vm, echo_pyz):
    vm = make_vm(agent_pyz=echo_pyz, no_reboot=True)
    port = Port(vm.ctl_path)
    assert port.readline() == b"READY"
    port.sock.sendall(b"!reboot\n")
    assert vm.wait_exit(timeout=60) == 0
    port.close()


def test_vm_without_fixtures(tmp_path, testvm_base, echo_pyz):
    with TestVM(tmp_path / ("a-rather-long-directory-name-to-force-short-socket-paths" * 2),
                agent_pyz=echo_pyz) as vm:
        assert len(vm.ctl_path) < 100
        port = Port(vm.ctl_path)
        assert port.readline() == b"READY"
        port.close()
    assert not vm.is_running()


def test_hung_kernel_is_reported_and_booted_once_more(tmp_path, testvm_base, capsys):
    """A guest that never reaches init (here: PID 1 is a shell waiting on the console) is
    reported with QEMU's CPU state, booted once more with kernel messages on, then failed."""
    vm = TestVM(tmp_path, append="rdinit=/bin/sh")
    vm.userspace_timeout = 6
    with pytest.raises(TimeoutError, match=r"did not reach init within 6 s .*QEMU status running, "
                                           r"vCPU RIP [0-9a-f]{16}, [0-9a-f]{16}"):
        vm.start(timeout=60)
    assert len(vm.hung_boots) == 1 and "did not reach init" in vm.hung_boots[0]
    assert "booting once more with kernel messages on" in capsys.readouterr().err
    cmdline = (tmp_path / "qemu.cmd").read_text()
    assert "ignore_loglevel" in cmdline and "rdinit=/bin/sh" in cmdline
    assert not vm.is_running()
