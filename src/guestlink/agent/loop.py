"""Small building blocks of the agent's single-threaded loop: timers, a self-pipe, byte queues."""
import collections
import errno
import heapq
import itertools
import math
import os
import time
from typing import Any, Callable, Deque, Iterable, List, Optional, Sequence, Tuple, Union

IOV_MAX = 64  # chunks per writev/sendmsg call; well below the kernel's 1024
TIMER_SLACK = 0.002  # seconds
#: Longest single wait the loop hands to select(): epoll and poll overflow on timeouts beyond
#: ~24.8 days (INT_MAX milliseconds), so a far timer is reached by waking up now and then instead.
MAX_WAIT = 3600.0

Buffer = Union[bytes, bytearray, memoryview]


class Timer:
    __slots__ = ("when", "callback", "active")

    def __init__(self, when: float, callback: Callable[[], Any]) -> None:
        self.when = when
        self.callback = callback
        self.active = True

    def cancel(self) -> None:
        self.active = False


class Timers:
    """A heap of one-shot timers on the monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._heap: List[Tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def call_later(self, delay: float, callback: Callable[[], Any]) -> Timer:
        if not math.isfinite(delay):
            raise ValueError("timer delay must be a finite number of seconds, not %r" % (delay,))
        timer = Timer(self.clock() + max(0.0, delay), callback)
        heapq.heappush(self._heap, (timer.when, next(self._seq), timer))
        return timer

    def timeout(self) -> Optional[float]:
        """Seconds until the next active timer (at most MAX_WAIT), or None when there is none."""
        heap = self._heap
        while heap and not heap[0][2].active:
            heapq.heappop(heap)
        if not heap:
            return None
        return min(MAX_WAIT, max(0.0, heap[0][0] - self.clock()))

    def run_due(self, on_error: Optional[Callable[[Exception], Any]] = None) -> None:
        """Run the due timers. ``on_error(exc)`` handles a callback's exception (re-raise to stop)."""
        # A poll can return a hair before the deadline it was given (millisecond rounding, emulated
        # clocks); running timers that are that close avoids a second, near-empty wakeup.
        heap = self._heap
        if not heap:  # the usual case while serving requests: not even a clock read
            return
        now = self.clock() + TIMER_SLACK
        while heap and heap[0][0] <= now:
            _, _, timer = heapq.heappop(heap)
            if timer.active:
                timer.active = False
                if on_error is None:
                    timer.callback()
                    continue
                try:
                    timer.callback()
                except Exception as exc:
                    on_error(exc)


class Waker:
    """A non-blocking self-pipe: signal handlers and worker threads write, the loop reads."""

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe()
        for fd in (self.rfd, self.wfd):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)

    def wake(self) -> None:
        try:
            os.write(self.wfd, b"\0")
        except OSError as exc:  # a full pipe already guarantees a wakeup
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise

    def drain(self) -> bytes:
        """Read everything; returns the bytes (signal numbers when used as a wakeup fd)."""
        out = b""
        while True:
            try:
                data = os.read(self.rfd, 4096)
            except (BlockingIOError, InterruptedError):
                return out
            if not data:
                return out
            out += data

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass


class ByteQueue:
    """An outbound byte queue of chunks, written with writev without joining or re-slicing.

    ``size`` is the number of queued bytes. Partial writes keep a memoryview of the rest of the
    first chunk, so every byte is copied at most once (no quadratic buffer handling).
    """

    def __init__(self) -> None:
        self._chunks: Deque[Buffer] = collections.deque()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def push(self, data: Buffer) -> None:
        if data:
            self._chunks.append(data)
            self.size += len(data)

    def extend(self, parts: Iterable[Buffer]) -> None:
        for part in parts:
            self.push(part)

    def clear(self) -> None:
        self._chunks.clear()
        self.size = 0

    def write_to(self, writev: Callable[[Sequence[Buffer]], int]) -> int:
        """Write as much as ``writev(list_of_buffers) -> n`` takes; returns the bytes written.

        Stops at the first short write. BlockingIOError propagates only when nothing at all was
        written in this call; other OSErrors propagate.
        """
        chunks = self._chunks
        if len(chunks) == 1:
            # The usual case (one reply queued): no batch list, no partial-chunk bookkeeping
            # unless the write was short.
            first = chunks[0]
            n = writev((first,))
            self.size -= n
            if n >= len(first):
                chunks.popleft()
            else:
                chunks[0] = memoryview(first)[n:]
            return n
        total = 0
        while chunks:
            batch = list(itertools.islice(chunks, IOV_MAX))
            want = sum(map(len, batch))
            try:
                n = writev(batch)
            except BlockingIOError:
                if total:
                    return total
                raise
            total += n
            self.size -= n
            left = n
            while left:
                first = chunks[0]
                if left >= len(first):
                    left -= len(first)
                    chunks.popleft()
                else:
                    chunks[0] = memoryview(first)[left:]
                    left = 0
            if n < want:
                break
        return total
