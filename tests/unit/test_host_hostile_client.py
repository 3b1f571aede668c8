"""The host library against a hostile or misbehaving guest, and against its own callers' edge
cases: cancellation is never lost, timeouts are finite, malformed replies raise only the documented
error tree (guestlink.host.errors)."""
import asyncio
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from guestlink.host import session as session_mod  # noqa: E402
from guestlink.host import timing  # noqa: E402
from guestlink.host import errors  # noqa: E402
from guestlink.host.client import connect, wait_within  # noqa: E402
from test_host_fakeagent import FakeAgent, short_tmp  # noqa: E402


@pytest.fixture
def path(tmp_path):
    return os.path.join(short_tmp(tmp_path), "ctl.sock")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


# --- cancellation (Ctrl-C) is never swallowed -----------------------------------------------------

def test_cancel_that_coincides_with_the_reply_is_not_lost(path, monkeypatch):
    """asyncio.wait_for (< 3.12) returned the reply when the caller was cancelled in the loop
    iteration the reply arrived in: Ctrl-C was lost. The cancellation must win."""
    async def main():
        async with FakeAgent(path):
            async with connect(path) as vm:
                task = asyncio.current_task()
                resolve = session_mod.Call.resolve

                def resolve_and_cancel(call, payload):
                    resolve(call, payload)
                    task.cancel()  # Ctrl-C lands in the same iteration as the reply

                monkeypatch.setattr(session_mod.Call, "resolve", resolve_and_cancel)
                try:
                    await vm.ping()
                except asyncio.CancelledError:
                    return "cancelled"
                finally:
                    monkeypatch.setattr(session_mod.Call, "resolve", resolve)
                return "swallowed"

    assert asyncio.run(main()) == "cancelled"


@pytest.mark.parametrize("helper", [wait_within, timing._wait_within_compat],
                         ids=["wait_within", "compat"])
def test_wait_within_keeps_a_cancellation_that_coincides_with_completion(helper):
    async def main():
        loop = asyncio.get_running_loop()
        inner = loop.create_future()
        task = asyncio.ensure_future(helper(asyncio.shield(inner), 10))
        await asyncio.sleep(0)  # the helper waits
        inner.set_result("reply")
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "swallowed"

    assert asyncio.run(main()) == "cancelled"


@pytest.mark.parametrize("helper", [wait_within, timing._wait_within_compat],
                         ids=["wait_within", "compat"])
def test_wait_within_times_out_and_returns(helper):
    async def main():
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await helper(asyncio.sleep(5), 0.05)
        elapsed = loop.time() - started
        value = await helper(asyncio.sleep(0.01, "done"), 5)
        ready = loop.create_future()
        ready.set_result("at once")
        return elapsed, value, await helper(ready, 0)

    elapsed, value, immediate = asyncio.run(main())
    assert elapsed < 1 and value == "done" and immediate == "at once"


# --- timeouts must be finite and in range ----------------------------------------------------------

BAD_TIMEOUTS = [math.inf, -math.inf, math.nan, -1.0, 30 * 86400.0, 1e400]


@pytest.mark.parametrize("bad", BAD_TIMEOUTS, ids=repr)
def test_bad_timeouts_are_refused_before_anything_is_sent(path, bad):
    async def main():
        async with FakeAgent(path) as agent:
            with pytest.raises(ValueError, match="finite number of seconds"):
                connect(path, timeout=bad)
            with pytest.raises(ValueError, match="finite number of seconds"):
                connect(path, queue_timeout=bad)
            async with connect(path) as vm:
                for verb in (lambda: vm.ping(timeout=bad), lambda: vm.info(timeout=bad),
                             lambda: vm.call("greet", timeout=bad),
                             lambda: vm.publish("t", b"x", timeout=bad),
                             lambda: vm.run(["true"], timeout=bad),
                             lambda: vm.run(["true"], call_timeout=bad),
                             lambda: vm.push("/dev/null", "/tmp/x", timeout=bad),
                             lambda: vm.pull("/tmp/x", "/dev/null", timeout=bad),
                             lambda: vm.subscribe("t").get(timeout=bad)):
                    with pytest.raises(ValueError):
                        await verb()
                sent = list(agent.requests) + list(agent.published)
                assert await vm.ping() > 0  # the connection is still fine
            return sent

    assert run(main()) == []


def test_good_timeouts_still_work(path):
    async def main():
        async with FakeAgent(path):
            async with connect(path, timeout=24 * 86400) as vm:
                result = await vm.run(["echo", "hi"], timeout=3)
                return await vm.ping(timeout=0.5), result.stdout

    rtt, out = run(main())
    assert rtt > 0 and out == b"hi\n"


# --- a bug met on the guest's input is one escaped line, not a traceback ---------------------------

def test_a_reader_failure_is_logged_on_one_line_and_loses_the_connection(path, monkeypatch, caplog):
    from guestlink.protocol import messages as m

    def broken(payload):
        raise RuntimeError("unexpected \x1b[2J" + payload.decode("latin-1"))

    async def main():
        async with FakeAgent(path) as agent:
            async with connect(path, reconnect=False) as vm:
                sub = vm.subscribe("t")
                monkeypatch.setattr(m, "parse_message", broken)
                agent.push("t", b"\x1b]0;x\x07")
                with pytest.raises(errors.ConnectionLost) as exc:
                    await sub.get(timeout=5)
                return str(exc.value)

    lost = run(main())
    records = [r for r in caplog.records if r.levelno >= 30]
    assert len(records) == 1 and records[0].exc_info is None
    text = records[0].getMessage()
    assert text.startswith("guestlink: reader failed: RuntimeError: unexpected \\x1b[2J")
    assert "\x1b" not in text and "\x1b" not in lost and "error reading" in lost
