"""Timeouts of the host library: validating them, and the one timed wait (:func:`wait_within`).

Every timeout a caller gives goes through :func:`check_timeout` before anything is sent, and every
timed wait in the host code goes through :func:`wait_within` (never ``asyncio.wait_for``, which
before Python 3.12 can swallow the caller's cancellation; docs/security.md).
"""

from typing import TYPE_CHECKING, Any, Awaitable, Optional, TypeVar

if TYPE_CHECKING:  # asyncio is imported where it is used: the lean CLI path checks timeouts only
    import asyncio

T = TypeVar("T")

#: Default per-call timeout in seconds (connect(timeout=...) overrides it).
DEFAULT_TIMEOUT = 10.0

#: Longest timeout accepted (seconds, ~24 days): beyond 2**31 ms the agent's and the OS's timers
#: overflow, and no guestlink call is meant to wait that long.
MAX_TIMEOUT = 24 * 86400.0


def check_timeout(value: Optional[float], what: str = "timeout") -> Optional[float]:
    """``value`` as a float if it is None or a finite number of seconds in [0, MAX_TIMEOUT];
    otherwise ValueError (raised before anything is sent: inf, nan, negative, huge)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("%s must be a number of seconds, not %s" % (what, type(value).__name__))
    value = float(value)
    if not 0 <= value <= MAX_TIMEOUT:  # also false for nan
        raise ValueError("%s must be a finite number of seconds between 0 and %d, not %r"
                         % (what, MAX_TIMEOUT, value))
    return value


async def wait_within(aw: Awaitable[T], timeout: Optional[float]) -> T:
    """Await ``aw`` for at most ``timeout`` seconds (None: no limit) -> its result, else raise
    asyncio.TimeoutError. The one timed wait of the host code: asyncio.wait_for before Python
    3.12 loses a cancellation of the caller that coincides with ``aw`` completing (Ctrl-C was
    swallowed); here the caller's cancellation always wins."""
    import asyncio

    if timeout is None:
        return await aw
    if hasattr(asyncio, "timeout"):  # 3.11+: counts cancellations, so none is lost
        async with asyncio.timeout(timeout):
            return await aw
    return await _wait_within_compat(aw, timeout)


async def _wait_within_compat(aw: Awaitable[T], timeout: float) -> T:
    """wait_within for Python < 3.11 (no asyncio.timeout)."""
    import asyncio

    loop = asyncio.get_running_loop()
    inner = asyncio.ensure_future(aw)
    if inner.done():
        return inner.result()
    waiter = loop.create_future()

    def wake(_: Any = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    handle = loop.call_later(max(0.0, timeout), wake)
    inner.add_done_callback(wake)
    try:
        await waiter
    except asyncio.CancelledError:
        # even when ``inner`` finished in the same loop iteration: the cancellation wins
        inner.cancel()
        inner.add_done_callback(consume)
        raise
    finally:
        handle.cancel()
        inner.remove_done_callback(wake)
    if not inner.done():
        inner.cancel()
        await asyncio.wait([inner])
        if inner.cancelled():
            raise asyncio.TimeoutError()
    return inner.result()


def consume(fut: "asyncio.Future[Any]") -> None:
    """Done-callback that retrieves a future's exception, so that asyncio does not log a failure
    nobody awaits as unretrieved."""
    if not fut.cancelled():
        fut.exception()
