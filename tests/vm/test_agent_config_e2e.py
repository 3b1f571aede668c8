"""End to end with an agent configured by files in the image: policy, user handlers, shutdown."""
import asyncio
import time

import pytest

import guestlink
from guestlink.host import errors

AGENT_CONF = b"""\
[policy]
deny = exec, reboot
"""

GREET_HANDLER = b"""\
import socket


def handle(args, ctx):
    name = args.get("name", "world")
    if name == "boom":
        raise RuntimeError("the handler exploded on purpose")
    return {"greeting": "hello %s from %s" % (name, socket.gethostname())}
"""


@pytest.fixture(scope="module")
def configured_vm(make_vm):
    return make_vm(extra_files={
        "/etc/guestlink/agent.conf": AGENT_CONF,
        "/etc/guestlink/handlers.d/greet.py": GREET_HANDLER,
    })


def test_policy_handlers_and_shutdown(configured_vm, run_cli):
    vm = configured_vm

    async def main():
        async with guestlink.connect(ctl=vm.ctl_path, data=vm.data_path, timeout=30) as conn:
            caps = set(conn.agent["capabilities"])
            greeting = await conn.call("greet", name="tester")
            with pytest.raises(errors.CommandDenied) as denied:
                await conn.run(["true"])
            with pytest.raises(errors.RemoteError) as exploded:
                await conn.call("greet", name="boom")
            with pytest.raises(errors.UnknownCommand):
                await conn.call("no-such-op")
            return caps, greeting, denied.value, exploded.value

    caps, greeting, denied, exploded = asyncio.run(main())
    assert "greet" in caps and "exec" not in caps
    assert greeting == {"greeting": "hello tester from guestlink-testvm"}
    assert "exec" in str(denied) and "policy" in str(denied)
    assert exploded.code == "handler_error" and "exploded on purpose" in str(exploded)

    refused = run_cli("exec", "--", "true", vm=vm)
    assert refused.returncode == 77
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert run_cli("call", "greet", "--arg", "name=cli", "--json", vm=vm).returncode == 0

    async def shutdown():
        async with guestlink.connect(ctl=vm.ctl_path, data=vm.data_path, timeout=30) as conn:
            await conn.shutdown()

    asyncio.run(shutdown())
    deadline = time.monotonic() + 60
    while vm.is_running() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not vm.is_running(), "the guest did not power off"
