"""Topic messages from the guest: :class:`Message`, and :class:`Subscription`, the queue a client
fills for each ``subscribe(topic)``."""

import asyncio
import collections
from dataclasses import dataclass
from typing import Any, Callable, Deque, Optional

from .errors import copy_error
from .timing import check_timeout, wait_within


@dataclass(frozen=True)
class Message:
    """A topic message from the guest."""

    topic: str
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


class Subscription:
    """Messages from the guest on one topic. See :meth:`guestlink.host.client.Client.subscribe`.

    The client feeds it with :meth:`deliver` and ends it with :meth:`finish`; ``on_end(sub)`` is
    called when it ends, so that the client stops routing messages to it.
    """

    def __init__(self, topic: str, maxsize: int,
                 on_end: Callable[["Subscription"], Any]) -> None:
        self.topic = topic
        self.maxsize = max(1, int(maxsize))
        self.dropped = 0
        self._on_end = on_end
        self._queue: Deque[Message] = collections.deque()
        self._wakeup = asyncio.Event()
        self._done = False
        self._error: Optional[BaseException] = None

    def deliver(self, msg: Message) -> None:
        """Queue ``msg`` (dropping the oldest when full); ignored once ended."""
        if self._done:
            return
        if len(self._queue) >= self.maxsize:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(msg)
        self._wakeup.set()

    def finish(self, error: Optional[BaseException]) -> None:
        """End the subscription: readers get the queued messages, then ``error`` (None: the end)."""
        if not self._done:
            self._done = True
            self._error = error
            self._wakeup.set()
        self._on_end(self)

    def close(self) -> None:
        """Stop receiving; iteration ends after the messages already queued."""
        self.finish(None)

    async def get(self, timeout: Optional[float] = None) -> Message:
        """The next message. Raises the error that ended the connection for good (ConnectionLost,
        ProtocolMismatch; only with reconnect=False or an incompatible agent), EOFError after
        close() or the client's close, asyncio.TimeoutError after ``timeout`` seconds.

        Iterating (``async for``) ends quietly on close instead of raising EOFError."""
        timeout = check_timeout(timeout)
        msg = await wait_within(self.next_or_none(), timeout)
        if msg is None:
            raise EOFError("subscription to %r closed" % self.topic)
        return msg

    async def next_or_none(self) -> Optional[Message]:
        """The next message, or None once the subscription ended quietly (else its error)."""
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._done:
                if self._error is not None:
                    raise copy_error(self._error)
                return None
            self._wakeup.clear()
            await self._wakeup.wait()

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> Message:
        msg = await self.next_or_none()
        if msg is None:
            raise StopAsyncIteration
        return msg

    async def __aenter__(self) -> "Subscription":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
