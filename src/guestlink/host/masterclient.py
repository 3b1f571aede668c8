"""A blocking client of one VM's agent through the guestlink master: the lean one-shot CLI path.

No asyncio: a plain socket, ``poll``, and the same sans-I/O session rules as the asyncio library
(:class:`guestlink.protocol.session.HostSession`, whose module docstring says what each event
means; this module does exactly that, blocking). It only talks to a master (which holds the VM's
session, so the handshake here is local and immediate); :func:`open_link` returns None when no
master is to be used, and the caller takes the asyncio path instead.

Verbs are ``async def`` with nothing to await, so the CLI's own ``cmd_*`` coroutines run on this
client unchanged (:func:`drive` runs such a coroutine to completion without an event loop).
"""

import os
import select
import socket
import time
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Dict, List, Optional, TypeVar

from ..protocol import ProtocolViolation
from ..protocol import messages as m
from ..protocol import session as rules
from ..protocol.frames import STREAM_STDIN, MAX_ID
from . import errors as E
from . import mastersock as MS
from .agentinfo import AgentInfo, parse_info

if TYPE_CHECKING:  # pragma: no cover
    from ..protocol.ops import ExecResult

T = TypeVar("T")
#: What an exec's output goes to: (stream number 1|2, bytes).
Output = Callable[[int, bytes], None]
#: stdin is sent in STREAM frames of at most this many bytes (as the asyncio Process).
STREAM_CHUNK = 64 * 1024
SYNC_INTERVAL = 1.0


def new_nonce() -> str:
    """A handshake nonce: 128 random bits from os.urandom (as secrets, without its imports)."""
    return os.urandom(16).hex()


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (one of the CLI's cmd_* on a :class:`Link`)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        value: T = stop.value
        return value
    coro.close()
    raise RuntimeError("the coroutine suspended: it needs an event loop")


def open_link(policy: MS.Policy, attach: Dict[str, Any], timeout: Optional[float]) -> Optional["Link"]:
    """A synchronised :class:`Link` to the VM in ``attach`` through this user's master, or None
    when there is no master to use (see :func:`guestlink.host.mastersock.open_route`)."""
    route = MS.open_route(policy, attach, timeout)
    if route is None:
        return None
    sock, reply = route
    link = Link(sock, reply)
    try:
        link.handshake(timeout)
    except BaseException:
        link.close()
        raise
    return link


class Link:
    """One blocking connection through the master (see the module docstring)."""

    #: which agent answers (the CLI's ping and exec reports say it): always guestlink's here
    via = "guestlink"

    def __init__(self, sock: socket.socket, reply: Dict[str, Any]) -> None:
        self.sock = sock
        self.ctl = reply.get("ctl")
        self.data = reply.get("data")
        self.machine = rules.HostSession(nonce_factory=new_nonce)
        self.agent: Optional[AgentInfo] = None
        sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- I/O ----------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise E.ConnectionLost("connection lost: %s" % (exc.strerror or exc)) from None

    def _read(self, deadline: Optional[float], extra: Optional[int] = None) -> Optional[bytes]:
        """Bytes from the master (None: ``extra``, another fd, is readable first); raises
        ConnectionLost at EOF and socket.timeout at ``deadline``."""
        fds = [self.sock.fileno()] + ([extra] if extra is not None else [])
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.machine.synchronised:
                wait = SYNC_INTERVAL if wait is None else min(wait, SYNC_INTERVAL)
            ready, _, _ = select.select(fds, [], [], wait)
            if self.sock.fileno() in ready:
                try:
                    data = self.sock.recv(1 << 18)
                except OSError as exc:
                    raise E.ConnectionLost("connection lost: %s" % (exc.strerror or exc)) from None
                if not data:
                    raise E.ConnectionLost("connection lost: the control socket was closed by "
                                           "the other end")
                return data
            if ready:
                return None
            if deadline is not None and time.monotonic() >= deadline:
                raise socket.timeout()
            resend = self.machine.sync_due()
            if resend:
                self._write(resend)

    def _events(self, deadline: Optional[float], extra: Optional[int] = None
                ) -> Optional[List[rules.HostEvent]]:
        data = self._read(deadline, extra)
        if data is None:
            return None
        events = self.machine.receive_data(data)
        for ev in events:
            if isinstance(ev, rules.SendBytes):
                self._write(ev.data)
            elif isinstance(ev, rules.HandshakeFailed):
                raise (E.ProtocolMismatch(ev.message, ev.details) if ev.mismatch
                       else E.ProtocolError(ev.message))
            elif isinstance(ev, rules.Synchronised):
                self.agent = AgentInfo(ev.agent)
        return events

    def handshake(self, timeout: Optional[float]) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._write(self.machine.start())
        try:
            while not self.machine.synchronised:
                self._events(deadline)
        except socket.timeout:
            raise E.AgentNotResponding("the guestlink master did not complete the handshake for "
                                       "%s within %g s" % (self.ctl, timeout or 0)) from None

    # --- requests -----------------------------------------------------------------------------

    def _outcome(self, ev: rules.HostEvent, id_: int) -> Optional[BaseException]:
        """The failure an event means for call ``id_`` (None: not about it, or not final)."""
        if isinstance(ev, rules.SessionLost):
            return E.ConnectionLost("connection lost (%s)" % ev.reason)
        if isinstance(ev, rules.ErrorReply) and ev.id == id_:
            return E.remote_error(ev.code, ev.message, ev.details)
        if isinstance(ev, rules.MalformedReply) and ev.id == id_:
            return E.malformed(ev.what, ev.message)
        if isinstance(ev, rules.CallBroken) and ev.id == id_:
            self._write(self.machine.cancel(id_))
            return E.ProtocolMismatch(ev.message) if ev.mismatch else E.ProtocolError(ev.message)
        return None

    def _call(self, frame: Callable[[int], bytes], what: str, timeout: Optional[float]) -> bytes:
        """Send one request and return its RESPONSE payload."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.machine.synchronised:
            raise E.RequestNotSent("request not sent: not synchronised")
        id_ = self.machine.allocate_id()
        self._write(frame(id_))
        try:
            while True:
                for ev in self._events(deadline) or []:
                    if isinstance(ev, rules.Response) and ev.id == id_:
                        return ev.payload
                    exc = self._outcome(ev, id_)
                    if exc is not None:
                        raise exc
        except socket.timeout:
            self._write(self.machine.cancel(id_))
            raise E.RequestTimeout("no reply to %s from the agent within the timeout" % what) from None

    def request(self, op: str, args: Dict[str, Any], timeout: Optional[float],
                idempotent: bool = False) -> Dict[str, Any]:
        """REQUEST ``op`` -> its RESPONSE as a dict; ``idempotent``: retried once when the agent
        restarted under it (as the asyncio client's idempotent_request)."""
        try:
            payload = self._call(lambda id_: m.encode_request(id_, op, args), op, timeout)
        except (E.ConnectionLost, E.NotReady):
            if not idempotent:
                raise
            self.handshake(timeout)
            payload = self._call(lambda id_: m.encode_request(id_, op, args), op, timeout)
        try:
            return m.parse_response(payload)
        except ProtocolViolation as exc:
            raise E.malformed("%s reply" % op, exc) from None

    # --- the verbs the CLI's cmd_* use (async signature, blocking body) ---------------------

    async def ping(self, *, timeout: Optional[float] = None) -> float:
        start = time.monotonic()
        reply = self.request("ping", {}, timeout, idempotent=True)
        if reply.get("pong") is not True:
            raise E.ProtocolError("malformed ping reply from the agent: no \"pong\": true")
        return time.monotonic() - start

    async def info(self, *, timeout: Optional[float] = None) -> Dict[str, Any]:
        reply = self.request("info", {}, timeout, idempotent=True)
        try:
            info = parse_info(reply)
        except ProtocolViolation as exc:
            raise E.malformed("info reply", exc) from None
        info["via"] = self.via  # as Client.info says it
        return info

    async def call(self, op: str, args: Optional[Dict[str, Any]] = None, /, *,
                   timeout: Optional[float] = None, **kwargs: Any) -> Dict[str, Any]:
        from .options import check_call

        return self.request(op, check_call(op, args, kwargs), timeout)

    async def publish(self, topic: str, data: Any, *, timeout: Optional[float] = None) -> int:
        from .options import check_publish

        body = check_publish(topic, data)
        payload = self._call(lambda id_: m.encode_message(topic, body, id=id_), "publish", timeout)
        try:
            reply = m.Fields(m.parse_response(payload), "publish reply")
            delivered: int = reply.int("delivered", min=0, max=MAX_ID)
            return delivered
        except ProtocolViolation as exc:
            raise E.malformed("publish reply", exc) from None

    # --- exec ---------------------------------------------------------------------------------

    def exec(self, request: Dict[str, Any], output: Output, stdin_fd: Optional[int],
             start_timeout: Optional[float], wait_timeout: Optional[float]) -> "ExecResult":
        """Run one exec: ``output(stream, bytes)`` as it arrives, local ``stdin_fd`` forwarded
        (when the request has ``stdin``) once the process started; -> its result. Ctrl-C
        (KeyboardInterrupt) cancels it in the guest and waits briefly for the agent."""
        from ..protocol.ops import ExecResult

        id_ = self.machine.allocate_id()
        self._write(m.encode_request(id_, "exec", request))
        deadline = None if start_timeout is None else time.monotonic() + start_timeout
        started = False
        forward = stdin_fd if request.get("stdin") else None
        try:
            while True:
                try:
                    events = self._events(deadline, forward if started else None)
                except socket.timeout:
                    self._write(self.machine.cancel(id_))
                    if started:
                        raise E.RequestTimeout("no reply to exec from the agent within the "
                                               "timeout") from None
                    raise E.RequestTimeout("the agent did not start the command within the "
                                           "timeout") from None
                if events is None:  # stdin is readable
                    assert forward is not None
                    try:
                        data = os.read(forward, STREAM_CHUNK)
                    except OSError:
                        data = b""
                    self._write(m.encode_stream(id_, STREAM_STDIN, data, eof=not data))
                    if not data:
                        forward = None
                    continue
                for ev in events:
                    if isinstance(ev, rules.CallStream) and ev.id == id_:
                        stream, _eof = m.stream_flags(ev.flags)
                        if stream not in (1, 2):
                            self._write(self.machine.cancel(id_))
                            raise E.ProtocolError("the agent sent output on stream %d" % stream)
                        if ev.payload:
                            output(stream, bytes(ev.payload))
                    elif isinstance(ev, rules.CallEvent) and ev.id == id_ and not started:
                        started = True
                        deadline = (None if wait_timeout is None
                                    else time.monotonic() + wait_timeout)
                    elif isinstance(ev, rules.Response) and ev.id == id_:
                        try:
                            return ExecResult.from_wire(m.parse_response(ev.payload))
                        except ProtocolViolation as exc:
                            raise E.malformed("exec reply", exc) from None
                    else:
                        failure = self._outcome(ev, id_)
                        if failure is not None:
                            raise failure
        except KeyboardInterrupt:
            self._cancel(id_)
            raise

    def _cancel(self, id_: int) -> None:
        """Ctrl-C: CANCEL the exec and wait (briefly) for the agent to confirm it."""
        if not self.machine.in_flight(id_):
            return
        try:
            self._write(m.encode_cancel(id_))
            deadline = time.monotonic() + 5.0
            while self.machine.in_flight(id_):
                self._events(deadline)
        except (E.GuestlinkError, socket.timeout, OSError):
            pass
