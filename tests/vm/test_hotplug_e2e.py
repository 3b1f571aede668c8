"""The control port unplugged and plugged again while the agent runs (libvirt detach/attach --live)."""
import asyncio
import time

import pytest

import guestlink
from guestlink.host import errors


@pytest.fixture(scope="module")
def hvm(make_vm):
    """One VM for both tests (a boot saved): each replugs the control port and checks that the
    agent answers on it again afterwards, which leaves the VM as usable as a fresh one."""
    return make_vm()


def test_agent_reopens_a_replugged_control_port(hvm):
    vm = hvm
    mark = len(vm.console_text())

    async def main():
        async with guestlink.connect(ctl=vm.ctl_path, data=vm.data_path, timeout=30) as conn:
            before = conn.agent["session"]
            await conn.ping()
            vm.qmp("device_del", id="vport1")
            await asyncio.sleep(3)
            vm.qmp("device_add", driver="virtserialport", bus="vser0.0", nr=1, chardev="port1",
                   name="org.guestlink.ctl", id="vport1")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    await conn.ping(timeout=5)
                except (errors.ConnectionLost, errors.RequestNotSent, errors.RequestTimeout,
                        errors.NotReady):
                    continue
                if conn.agent["session"] != before:
                    break
                await asyncio.sleep(0.5)
            return before, conn.agent["session"], await conn.ping()

    before, after, rtt = asyncio.run(main())
    assert after != before, "the agent never reopened the replugged port"
    assert rtt > 0
    console = vm.console_text()[mark:]
    assert "unplugged or replaced" in console or "reopening" in console


def test_agent_reopens_a_port_replugged_while_no_host_was_connected(hvm):
    vm = hvm

    async def ping_once():
        async with guestlink.connect(ctl=vm.ctl_path, data=vm.data_path, timeout=30) as conn:
            return await conn.ping()

    assert asyncio.run(ping_once()) > 0
    mark = len(vm.console_text())
    vm.wait_for_console(r"no host connected", timeout=30, start=mark)  # the agent is polling at 1 Hz
    vm.qmp("device_del", id="vport1")
    time.sleep(2)
    vm.qmp("device_add", driver="virtserialport", bus="vser0.0", nr=1, chardev="port1",
           name="org.guestlink.ctl", id="vport1")
    vm.wait_for_console(r"unplugged or replaced", timeout=30, start=mark)
    assert asyncio.run(ping_once()) > 0
