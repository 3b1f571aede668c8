"""Commands in the guest: :class:`Process` (one ``exec`` call with streamed I/O) and its outcome,
:class:`CompletedProcess`."""

import asyncio
import collections
from dataclasses import dataclass
from typing import Any, AsyncIterator, Deque, Dict, List, Optional, Tuple, Union

from ..protocol import STREAM_STDERR, STREAM_STDIN, STREAM_STDOUT, Fields, ProtocolViolation
from ..protocol import messages as m
from ..protocol.frames import MAX_ID
from . import errors as E
from .options import EXEC_KILL_GRACE, Command, ExecOptions, check_exec_agent, exec_request
from .session import Call, Payload, Session
from .timing import DEFAULT_TIMEOUT, wait_within

#: stdin is sent in STREAM frames of at most this many bytes.
STREAM_CHUNK = 64 * 1024

_STREAM_NAMES = {STREAM_STDOUT: "stdout", STREAM_STDERR: "stderr"}


@dataclass
class CompletedProcess:
    """The outcome of a command run in the guest (like subprocess.CompletedProcess).

    ``returncode`` is the exit status, or ``-N`` when the process was killed by signal N
    (``signal`` is then N). Output beyond the output limit was dropped and flagged truncated.
    """

    args: Union[str, list]
    returncode: int
    stdout: bytes = b""
    stderr: bytes = b""
    signal: Optional[int] = None
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration: float = 0.0
    pid: Optional[int] = None

    def check_returncode(self) -> None:
        """Raise CommandTimedOut or CommandFailed unless the command exited with status 0."""
        if self.timed_out:
            raise E.CommandTimedOut(self)
        if self.returncode != 0:
            raise E.CommandFailed(self)


class Process:
    """A command running in the guest; created by :meth:`guestlink.host.client.Client.exec`.

    ``async for stream, data in proc.output()`` yields ("stdout"|"stderr", bytes) as output
    arrives. :meth:`wait` returns the :class:`CompletedProcess`, whose stdout/stderr hold the output
    NOT already consumed through :meth:`output`.
    """

    def __init__(self, session: Session, cmd: Command, options: ExecOptions) -> None:
        self.args = cmd
        self.pid: Optional[int] = None
        self.timeout = options.timeout
        self._session = session
        self._request = exec_request(cmd, options)
        self._stdin = bool(options.stdin)
        self._stdin_closed = not options.stdin
        self._limit = options.output_limit
        self._call_timeout = options.call_timeout
        self._call: Optional[Call] = None
        self._started: Optional["asyncio.Future[None]"] = None
        self._chunks: Deque[Tuple[str, bytes]] = collections.deque()
        self._wakeup: Optional[asyncio.Event] = None
        self._received = {STREAM_STDOUT: 0, STREAM_STDERR: 0}
        self._truncated = {STREAM_STDOUT: False, STREAM_STDERR: False}
        self._eof = {STREAM_STDOUT: False, STREAM_STDERR: False}
        self._result: Optional[CompletedProcess] = None
        self._cancelled = False

    @property
    def returncode(self) -> Optional[int]:
        return None if self._result is None else self._result.returncode

    @property
    def done(self) -> bool:
        return self._call is not None and self._call.future.done()

    async def __aenter__(self) -> "Process":
        await self.start()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._call is not None and not self._call.future.done():
            try:
                await self.cancel()
            except E.GuestlinkError:
                if exc_type is None:
                    raise

    async def start(self) -> "Process":
        """Send the exec request and wait until the agent started the process (or refused it)."""
        if self._call is not None:
            raise RuntimeError("process already started")
        session = self._session
        agent = session.agent
        check_exec_agent(self._request, agent)
        loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._started = loop.create_future()
        call = self._call = Call("exec", self._on_event, self._on_stream)
        call.future.add_done_callback(self._on_done)
        await session.start_call(call, "exec", self._request, self._started,
                                 session.deadline(self._call_timeout),
                                 "the agent did not start the command within the timeout")
        if call.future.done():
            exc = call.future.exception()
            if exc is not None:
                raise exc
        return self

    def _on_done(self, fut: "asyncio.Future[Any]") -> None:
        if self._started is not None and not self._started.done():
            self._started.set_result(None)
        if self._wakeup is not None:
            self._wakeup.set()

    def _fail(self, exc: BaseException) -> None:
        call = self._checked_call()
        self._session.fail_call(call.id, exc, cancel=True)
        call.fail(exc)

    def _on_event(self, payload: Payload) -> None:
        try:
            f = Fields(m.parse_event(payload), "exec event")
            event = f.str("event", max_len=m.MAX_NAME)
            if event == "started":
                pid = f.int("pid", min=0, max=MAX_ID)
                self.pid = pid
                if self._started is not None and not self._started.done():
                    self._started.set_result(None)
        except ProtocolViolation as exc:
            self._fail(E.malformed("exec event", exc))

    def _on_stream(self, flags: int, payload: Payload) -> None:
        stream, eof = m.stream_flags(flags)
        if stream not in self._eof:
            self._fail(E.ProtocolError("the agent sent output on stream %d" % stream))
            return
        if self._eof[stream]:
            return  # after EOF: ignore
        if payload:
            limit = self._limit
            room = len(payload) if limit is None else max(0, limit - self._received[stream])
            if room < len(payload):
                self._truncated[stream] = True
                payload = payload[:room]
            if payload:
                self._received[stream] += len(payload)
                self._chunks.append((_STREAM_NAMES[stream], bytes(payload)))
        if eof:
            self._eof[stream] = True
        assert self._wakeup is not None
        self._wakeup.set()

    def _output_finished(self) -> bool:
        return all(self._eof.values()) or self._checked_call().future.done()

    async def output(self) -> AsyncIterator[Tuple[str, bytes]]:
        """Yield (stream, bytes) as output arrives, until both streams end.

        Raises the request's error (ConnectionLost, ...) if it failed before the output ended."""
        call = self._checked_call()
        assert self._wakeup is not None
        while True:
            while self._chunks:
                yield self._chunks.popleft()
            if self._output_finished():
                fut = call.future
                if fut.done() and not fut.cancelled():
                    exc = fut.exception()
                    if exc is not None and not self._cancelled:
                        raise exc
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    async def write(self, data: Union[bytes, bytearray, memoryview, str]) -> None:
        """Send bytes to the command's stdin (requires ``stdin=True``)."""
        call = self._checked_call()
        if not self._stdin:
            raise ValueError("the process was started without stdin=True")
        if self._stdin_closed:
            raise ValueError("stdin is closed")
        if isinstance(data, str):
            data = data.encode("utf-8")
        view = memoryview(bytes(data))
        frames = [m.encode_stream(call.id, STREAM_STDIN, bytes(view[i:i + STREAM_CHUNK]))
                  for i in range(0, len(view), STREAM_CHUNK)]
        if frames:
            await self._send(frames)

    async def close_stdin(self) -> None:
        """Send EOF on the command's stdin."""
        call = self._checked_call()
        if self._stdin_closed:
            return
        self._stdin_closed = True
        await self._send([m.encode_stream(call.id, STREAM_STDIN, b"", eof=True)])

    async def _send(self, frames: List[bytes]) -> None:
        call = self._checked_call()
        if call.future.done():
            exc = None if call.future.cancelled() else call.future.exception()
            if exc is not None:
                raise exc
            return  # finished: the agent would discard stdin anyway
        await self._session.send_frames(call, frames)

    async def wait(self) -> CompletedProcess:
        """Wait for the command to finish -> CompletedProcess (with the output not yet consumed)."""
        call = self._checked_call()
        session = self._session
        deadline = None
        if self.timeout is not None:
            extra = session.timeout if session.timeout is not None else DEFAULT_TIMEOUT
            deadline = asyncio.get_running_loop().time() + self.timeout + EXEC_KILL_GRACE + extra
        payload = await session.await_reply(call, deadline, "exec")
        if self._result is None:
            self._result = self._parse_result(payload)
        return self._result

    def _parse_result(self, payload: Payload) -> CompletedProcess:
        try:
            f = Fields(m.parse_response(payload), "exec reply")
            returncode = f.int("returncode", min=-255, max=255)
            signal = f.int("signal", default=None, min=1, max=255)
            timed_out = f.bool("timed_out", default=False)
            so_trunc = f.bool("stdout_truncated", default=False)
            se_trunc = f.bool("stderr_truncated", default=False)
            duration = f.number("duration", default=0.0, min=0)
        except ProtocolViolation as exc:
            raise E.malformed("exec reply", exc) from None
        if signal is None and returncode < 0:
            signal = -returncode
        out: Dict[int, List[bytes]] = {STREAM_STDOUT: [], STREAM_STDERR: []}
        for name, data in self._chunks:
            out[STREAM_STDOUT if name == "stdout" else STREAM_STDERR].append(data)
        self._chunks.clear()
        return CompletedProcess(
            args=self.args, returncode=returncode, stdout=b"".join(out[STREAM_STDOUT]),
            stderr=b"".join(out[STREAM_STDERR]), signal=signal, timed_out=timed_out,
            stdout_truncated=so_trunc or self._truncated[STREAM_STDOUT],
            stderr_truncated=se_trunc or self._truncated[STREAM_STDERR],
            duration=float(duration), pid=self.pid)

    async def cancel(self) -> None:
        """Cancel the command (the agent kills its process group); waits briefly for the agent."""
        call = self._checked_call()
        if call.future.done():
            return
        self._cancelled = True
        session = self._session
        sent = await session.send_frames(call, [m.encode_cancel(call.id)])
        if sent:
            try:
                await wait_within(asyncio.shield(call.future),
                                  session.timeout if session.timeout is not None else DEFAULT_TIMEOUT)
            except (E.GuestlinkError, asyncio.TimeoutError):
                pass
        session.forget(call)

    def _checked_call(self) -> Call:
        if self._call is None:
            raise RuntimeError("the process was not started: use 'async with vm.exec(...)'")
        return self._call


async def run_collected(vm: Any, cmd: Command, options: ExecOptions, input: Any,
                        check: bool) -> CompletedProcess:
    """``run`` of both clients (guestlink's and qemu-ga's, which share Process's interface):
    start ``cmd`` with ``vm.exec_with``, feed ``input`` (bytes or str; None: no stdin), wait;
    CommandTimedOut when its timeout expired, CommandFailed on a non-zero status with ``check``."""
    if isinstance(input, str):
        input = input.encode("utf-8")
    async with vm.exec_with(cmd, options) as proc:
        if input is not None:
            await proc.write(input)
            await proc.close_stdin()
        result: CompletedProcess = await proc.wait()
    if result.timed_out:
        raise E.CommandTimedOut(result, options.timeout)
    if check and result.returncode != 0:
        raise E.CommandFailed(result)
    return result
