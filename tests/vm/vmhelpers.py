"""Helpers shared by the end-to-end tests (imported by name: pytest puts tests/vm on sys.path)."""

import asyncio
import hashlib
import os

from guestlink.host.client import connect

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: the test session's isolation of the guestlink master (conftest.py): kept when a test cleans
#: the GUESTLINK_* variables out of a command's environment, so no command starts a master of
#: its own in the user's runtime directory (a master would outlive the test and cache domains)
MASTER_ENV = ("GUESTLINK_MASTER", "GUESTLINK_MASTER_SOCKET", "GUESTLINK_PERSIST")


def clean_env(prefixes=("GUESTLINK_",)):
    """os.environ without the variables starting with ``prefixes``, but with MASTER_ENV."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(tuple(prefixes)) or k in MASTER_ENV}


def run(vm, fn, timeout=30.0):
    """``await fn(client)`` on a fresh connection to ``vm``'s agent; returns its result."""
    async def main():
        async with connect(ctl=vm.ctl_path, data=vm.data_path, timeout=timeout) as c:
            return await fn(c)
    return asyncio.run(main())


async def guest_sh(c, script):
    """Run ``sh -c script`` in the guest (must exit 0); returns its stdout as text."""
    r = await c.run(["sh", "-c", script], check=True)
    return r.stdout.decode()


def sha(path):
    """sha256 hex digest of a host file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cli_env(vm):
    """Environment for running the CLI from this checkout against ``vm``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "src")] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["GUESTLINK_CTL"] = vm.ctl_path
    env["GUESTLINK_DATA"] = vm.data_path
    return env
