"""The agent server: one thread, one selector, clean start and stop.

Port states:

* ``closed``  — the device is missing (or the unix peer is not listening): retry every few seconds.
* ``absent``  — (virtio only) the device is open but no host is connected: it reports POLLHUP, so
  it is NOT registered in the selector (POLLHUP is level-triggered and would spin). Instead an
  inner epoll watches it edge-triggered (the driver wakes its waiters when the host connects or
  goes), and that epoll's fd is in the selector: a host is noticed at once, without spinning. A
  1 s timer does a zero-timeout poll as well, in case no wakeup comes.
* ``active``  — a host is connected: registered for reading (and writing while bytes are queued).

Each opening of the port drains the stale bytes already readable, then queues HELLO. A SYNC
starts a host session; requests before it get ``not_ready``. The session ends when the host goes
away (HUP/EOF) or on a new SYNC: its exec process groups are killed and its pending calls dropped.
Those rules are ``protocol.session.AgentSession``'s; this module does the I/O and serves requests.
"""
import errno
import logging
import os
import select
import selectors
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from types import FrameType as FrameType_
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .. import _version
from ..protocol import (CorruptFrame, Fields, Frame, FrameDecoder, FrameType, Garbage,
                        UnsupportedVersion, codes, frame_type_name)
from ..protocol import messages as m
from ..protocol.frames import DecoderEvent, encode_frame
from ..protocol.ops import EXEC_USER_CAPABILITY, Pong
from ..protocol.session import (AgentSession, Ignored, Passed, Request, SendBytes, SessionEnded,
                                SessionStarted)
from . import power, sysinfo
from .execs import Exec, OpError, parse_exec_args, signal_group
from .handlers import HandlerContext, WorkerPool, load_handlers
from .local import LocalServer
from .config import Config
from .loop import Buffer, ByteQueue, Timer, Timers, Waker
from .ports import Port, PortAbsent, PortBusy, make_port
from .transfers import FILE_OPS, FileOps

log = logging.getLogger("guestlink.agent")

BUILTIN_OPS = ("ping", "info", "exec", "shutdown", "reboot") + FILE_OPS
READ_SIZE = 64 * 1024
OUT_HIGH = 1 << 20  # above: stop reading exec output (backpressure)
OUT_LOW = 256 << 10  # below: resume it
OUT_MAX = 4 << 20  # above: stop reading the port itself (the host is not reading our replies)
STDIN_MAX = 4 << 20  # an exec's stdin queue above this also stops reading the port
HUP_CHECK = 1.0
DRAIN_MAX = 64 << 20
HANDLER_WORKERS = 4
HANDLER_QUEUE_MAX = 64
POWER_FLUSH_TIMEOUT = 2.0
_PONG = m.PreparedResponse(Pong().to_wire())
GARBAGE_LOG_INTERVAL = 10.0

JSON = Dict[str, Any]
#: A selector callback: gets the ready events' mask.
Callback = Callable[[int], Any]


class FatalError(Exception):
    """The agent cannot run (port busy, socket in use); the message is for the user."""


class Session:
    """What one host session has in flight: from a SYNC until the host goes away or sends another
    SYNC."""

    def __init__(self) -> None:
        self.execs: Dict[int, Exec] = {}
        self.calls: Dict[int, str] = {}  # request id -> handler op in flight
        self.transfers: Dict[int, Any] = {}  # request id -> transfers.Transfer

    def in_flight(self, req_id: int) -> bool:
        return req_id in self.execs or req_id in self.calls or req_id in self.transfers


class Agent:
    EV_READ = selectors.EVENT_READ
    EV_WRITE = selectors.EVENT_WRITE

    def __init__(self, config: Config, port: Optional[Port] = None,
                 install_signals: Optional[bool] = None) -> None:
        self.config = config
        self.port = port if port is not None else make_port(config)
        self._install_signals = install_signals
        self.sel = selectors.DefaultSelector()
        self._interest: Dict[int, Tuple[int, Optional[Callback]]] = {}
        self.timers = Timers()
        self.waker = Waker()
        self.read_buf = bytearray(READ_SIZE)
        self.outq = ByteQueue()
        self.decoder = FrameDecoder()
        self.port_state = "closed"
        # inner epoll watching an absent port for its host (see above)
        self._presence: Optional["select.epoll"] = None
        self._host_timer: Optional[Timer] = None
        self.opening: Optional[str] = None  # random id of the current port opening (HELLO's "session")
        self.session: Optional[Session] = None
        self.rules = AgentSession(self.description, self._in_flight)
        self.output_paused = False
        self.orphans: List["subprocess.Popen[bytes]"] = []  # killed but not yet reaped
        self.local = LocalServer(self, config.socket) if config.socket else None
        self.handlers: Dict[str, Callable[..., Any]] = {}
        self.pool = WorkerPool(HANDLER_WORKERS, self._handler_done)
        self.files = FileOps(self)
        self._results: List[Tuple[Any, bool, Any, Optional[str]]] = []  # posted by worker threads
        self._results_lock = threading.Lock()
        self._stop = False
        self._after_flush: List[Callable[[], None]] = []  # to run once the port queue is empty
        self._retry_timer: Optional[Timer] = None
        self._garbage_logged_at: Optional[float] = None
        self._boot_id = sysinfo.boot_id()
        self._signals_installed = False
        self._old_handlers: Dict[int, Any] = {}
        self._old_wakeup: Optional[int] = None
        self._poll_children_timer: Optional[Timer] = None
        self.stats = {"wakeups": 0, "garbage_bytes": 0, "corrupt_frames": 0}
        self._port_callback: Callback = self._on_port_event  # one bound method, compared per loop
        self._policy_key: Optional[Tuple[List[str], List[str]]] = None
        self._policy_answers: Dict[str, bool] = {}

    # == public API ==============================================================================

    def request_stop(self) -> None:
        """Thread- and signal-safe."""
        self._stop = True
        try:
            self.waker.wake()
        except OSError:
            pass

    def run(self) -> int:
        """Run until stopped; returns the process exit code (0: clean stop)."""
        try:
            self._start()
            while not self._stop:
                self._iterate()
        except FatalError as exc:
            log.error("%s", exc)
            return 1
        finally:
            self._shutdown()
        log.info("stopped")
        return 0

    # == start / stop ============================================================================

    def _start(self) -> None:
        self.set_interest(self.waker.rfd, self.EV_READ, self._on_wake)
        install = self._install_signals
        if install is None:
            install = threading.current_thread() is threading.main_thread()
        if install:
            self._setup_signals()
        self.handlers = load_handlers(self.config.handlers_dir, BUILTIN_OPS)
        if self.local is not None:
            try:
                self.local.open()
            except Exception as exc:
                raise FatalError("local socket: %s" % exc)
        log.info("guestlink-agent %s starting (python %d.%d, pid %d); capabilities: %s",
                 _version.__version__, sys.version_info[0], sys.version_info[1], os.getpid(),
                 " ".join(self.capabilities()))
        self._open_port()

    def _setup_signals(self) -> None:
        self._signals_installed = True
        self._old_wakeup = signal.set_wakeup_fd(self.waker.wfd, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_stop_signal)
        self._old_handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda s, f: None)

    def _on_stop_signal(self, signum: int, frame: Optional[FrameType_]) -> None:
        self._stop = True  # the wakeup fd makes select() return

    def _shutdown(self) -> None:
        if self.session is not None:
            self._end_session("agent stopping")
        self._kill_orphans()
        self._unwatch_presence()
        if self.port.fd is not None:
            if self.port_state == "active" and self.outq.size:
                try:
                    self.outq.write_to(self.port.writev)
                except OSError:
                    pass
            self.set_interest(self.port.fd, 0)
            self.port.close()
        self.port_state = "closed"
        if self.local is not None:
            self.local.close()
        self.pool.stop()
        if self._signals_installed:
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)
            signal.set_wakeup_fd(self._old_wakeup if self._old_wakeup is not None else -1)
            self._signals_installed = False
        for fd in list(self._interest):
            self.set_interest(fd, 0)
        self.sel.close()
        self.waker.close()

    def _kill_orphans(self, wait: float = 1.0) -> None:
        for proc in self.orphans:
            signal_group(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + wait
        while self.orphans and time.monotonic() < deadline:
            self.orphans = [p for p in self.orphans if p.poll() is None]
            if self.orphans:
                time.sleep(0.01)

    # == the loop ================================================================================

    def _iterate(self) -> None:
        try:
            self._after_io()
        except FatalError:
            raise
        except Exception:
            log.exception("unexpected error in the loop (the agent keeps running)")
        timeout = self.timers.timeout()
        try:
            events = self.sel.select(timeout)
        except Exception:
            # Not expected (Timers bounds the wait), but every session depends on this loop: one
            # bad wait must not end it. The pause keeps a persistent failure from spinning.
            log.exception("waiting for events failed (the agent keeps running)")
            time.sleep(0.1)
            events = []
        self.stats["wakeups"] += 1
        for key, mask in events:
            if key.fd not in self._interest:
                continue  # unregistered by an earlier callback in this batch
            try:
                key.data(mask)
            except FatalError:
                raise
            except Exception:
                log.exception("unexpected error in an event callback (the agent keeps running)")
        self.timers.run_due(self._timer_error)

    @staticmethod
    def _timer_error(exc: Exception) -> None:
        if isinstance(exc, FatalError):
            raise exc
        log.error("unexpected error in a timer (the agent keeps running):\n%s",
                  "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())

    def set_interest(self, fd: int, events: int, callback: Optional[Callback] = None) -> None:
        """Register, modify or (events=0) unregister ``fd``."""
        current = self._interest.get(fd)
        if not events:
            if current is not None:
                del self._interest[fd]
                self.sel.unregister(fd)
            return
        if current is None:
            self.sel.register(fd, events, callback)
        elif current != (events, callback):
            self.sel.modify(fd, events, callback)
        self._interest[fd] = (events, callback)

    def _on_wake(self, mask: int) -> None:
        self.waker.drain()
        # A SIGCHLD, a handler result or a stop request: check everything cheaply.
        self._reap()
        with self._results_lock:
            results, self._results = self._results, []
        for item in results:
            try:
                self._deliver_handler_result(*item)
            except Exception:
                log.exception("unexpected error delivering a handler result")

    def _after_io(self) -> None:
        if self.port_state == "active" and self.outq.size:
            self._flush_port()
        if self._after_flush and (self.outq.size == 0 or self.port_state != "active"):
            callbacks, self._after_flush = self._after_flush, []
            for cb in callbacks:
                cb()
        # Backpressure on exec output.
        if not self.output_paused and self.outq.size > OUT_HIGH:
            self.output_paused = True
            log.debug("port queue at %d bytes: pausing exec output", self.outq.size)
            for ex in self._all_execs():
                ex.pause_output()
        elif self.output_paused and self.outq.size < OUT_LOW:
            self.output_paused = False
            log.debug("port queue at %d bytes: resuming exec output", self.outq.size)
            for ex in self._all_execs():
                ex.resume_output()
        self._update_port_interest()
        self._schedule_child_polling()

    def _all_execs(self) -> List[Exec]:
        return list(self.session.execs.values()) if self.session is not None else []

    # == the control port ========================================================================

    def _open_port(self) -> None:
        self._retry_timer = None
        try:
            self.port.open()
        except PortAbsent as exc:
            log.debug("%s", exc)
            self._retry_timer = self.timers.call_later(self.port.retry_interval, self._open_port)
            return
        except PortBusy as exc:
            raise FatalError(str(exc))
        except OSError as exc:
            log.error("cannot open %s: %s (retrying)", self.port, exc.strerror or exc)
            self._retry_timer = self.timers.call_later(self.port.retry_interval, self._open_port)
            return
        self.opening = uuid.uuid4().hex
        stale = self._drain_stale()
        log.info("opened %s%s", self.port, "; discarded %d stale bytes" % stale if stale else "")
        self.decoder.reset()
        self.outq.clear()
        self.session = None
        self.rules.end()
        self._queue_hello()
        if self.port.polls_for_host and not self.port.host_present():
            self._enter_absent(initial=True)
        else:
            self.port_state = "active"
            log.info("host connected")

    def _drain_stale(self) -> int:
        total = 0
        while total < DRAIN_MAX:
            try:
                n = self.port.read_into(self.read_buf)
            except BlockingIOError:
                break
            except OSError as exc:
                log.debug("draining stale bytes: %s", exc)
                break
            if n == 0:
                break
            total += n
        return total

    def _enter_absent(self, initial: bool = False) -> None:
        self.port_state = "absent"
        if self.port.fd is not None:
            self.set_interest(self.port.fd, 0)
        log.info("%s: no host connected; waiting for one", self.port)
        self._watch_presence()
        if self._host_timer is not None:
            self._host_timer.cancel()  # one timer chain, however often hosts come and go
        self._host_timer = self.timers.call_later(HUP_CHECK, self._check_host)
        self._check_host(timer=False)  # it may have come before the watch was in place

    def _watch_presence(self) -> None:
        self._unwatch_presence()
        if self.port.fd is None:
            return
        try:
            watch = select.epoll()
        except (AttributeError, OSError):  # no epoll: the timer alone
            return
        try:
            watch.register(self.port.fd, select.EPOLLIN | select.EPOLLOUT | select.EPOLLET)
            watch.poll(0)  # the current state (HUP) is reported once; only changes matter
        except OSError:
            watch.close()
            return
        self._presence = watch
        self.set_interest(watch.fileno(), self.EV_READ, self._on_presence)

    def _unwatch_presence(self) -> None:
        watch, self._presence = self._presence, None
        if watch is not None:
            self.set_interest(watch.fileno(), 0)
            watch.close()

    def _on_presence(self, mask: int) -> None:
        if self._presence is not None:
            self._presence.poll(0)  # consume the edge
        self._check_host(timer=False)

    def _check_host(self, timer: bool = True) -> None:
        if self.port_state != "absent" or self.port.fd is None:
            self._unwatch_presence()
            return
        try:
            present = self.port.host_present()
        except OSError as exc:
            log.warning("%s: %s", self.port, exc)
            present = False
        if present:
            self._unwatch_presence()
            self.port_state = "active"
            log.info("host connected")
            # _after_io registers the fd for reading
        elif self.port.replaced():
            self._unwatch_presence()
            log.info("%s was unplugged or replaced; reopening it by name", self.port)
            self._close_port(reopen_in=0)
        elif timer:
            self._host_timer = self.timers.call_later(HUP_CHECK, self._check_host)

    def _host_gone(self, why: str) -> None:
        log.info("host disconnected (%s)", why)
        if self.session is not None:
            self._end_session("host disconnected")
        self.decoder.reset()
        self.outq.clear()
        if self.port.polls_for_host:
            self._queue_hello()  # the first thing the next host sees
            self._enter_absent()
        else:
            self._close_port(reopen_in=self.port.retry_interval)

    def _close_port(self, reopen_in: float) -> None:
        self._unwatch_presence()
        if self.port.fd is not None:
            self.set_interest(self.port.fd, 0)
            self.port.close()
        self.port_state = "closed"
        self.outq.clear()
        self._retry_timer = self.timers.call_later(reopen_in, self._open_port)

    def _port_error(self, exc: OSError) -> None:
        log.error("%s failed: %s; reopening", self.port, exc.strerror or exc)
        if self.session is not None:
            self._end_session("port error")
        self._close_port(reopen_in=self.port.retry_interval)

    def _update_port_interest(self) -> None:
        if self.port_state != "active":
            return
        fd = self.port.fd
        if fd is None:
            return
        size = self.outq.size
        session = self.session
        read_paused = size > OUT_MAX or (session is not None and bool(session.execs) and any(
            ex.stdin_queue.size > STDIN_MAX for ex in session.execs.values()))
        events = (0 if read_paused else self.EV_READ) | (self.EV_WRITE if size else 0)
        # Runs on every loop iteration: unchanged interest (the usual case) costs one lookup.
        if self._interest.get(fd) == (events, self._port_callback):
            return
        if events:
            self.set_interest(fd, events, self._port_callback)
        else:
            self.set_interest(fd, 0)

    def _on_port_event(self, mask: int) -> None:
        if mask & self.EV_WRITE:
            self._flush_port()
        if mask & self.EV_READ and self.port_state == "active":
            self._read_port()

    def _flush_port(self) -> None:
        try:
            self.outq.write_to(self.port.writev)
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self._host_gone("write: %s" % exc.strerror)
            else:
                self._port_error(exc)

    def _read_port(self) -> None:
        for _ in range(16):  # then give other fds a turn
            try:
                n = self.port.read_into(self.read_buf)
            except BlockingIOError:
                return
            except OSError as exc:
                self._port_error(exc)
                return
            if n == 0:
                self._host_gone("end of stream" if not self.port.polls_for_host else "POLLHUP")
                return
            self._on_port_events(self.decoder.feed(memoryview(self.read_buf)[:n]))
            if self.port_state != "active" or n < READ_SIZE:
                # A short read emptied the port: the selector (level-triggered) reports what
                # comes next, so another read now would only fail with EAGAIN, one more
                # system call per request (costly in an emulated guest).
                return

    def send_parts(self, parts: Iterable[Buffer]) -> None:
        self.outq.extend(parts)

    def send_frame(self, type_: int, obj: JSON, id: int = 0) -> None:
        self.outq.push(encode_frame(type_, m.dump_json(obj), id=id))

    def post_result(self, token: Any, value: Any) -> None:
        """Thread-safe: hand a worker's outcome to the loop (delivered in _on_wake)."""
        with self._results_lock:
            self._results.append((token, True, value, None))
        self.waker.wake()

    def send_event(self, req_id: int, event: JSON) -> None:
        self.outq.push(m.encode_event(req_id, event))

    def reply(self, req_id: int, result: JSON) -> None:
        self._reply(req_id, result)

    def error(self, req_id: int, code: str, message: str, details: Optional[JSON] = None) -> None:
        self._error(req_id, code, message, details)

    def _reply(self, req_id: int, result: JSON) -> None:
        try:
            data = m.encode_response(req_id, result)
        except (ValueError, TypeError) as exc:
            log.error("request %d: reply cannot be encoded: %s", req_id, exc)
            data = m.encode_error(req_id, codes.INTERNAL, "the reply could not be encoded: %s" % exc)
        self.outq.push(data)

    def _error(self, req_id: int, code: str, message: str, details: Optional[JSON] = None) -> None:
        self.outq.push(m.encode_error(req_id, code, message, details))

    # == frames ==================================================================================

    def _on_port_events(self, events: List[DecoderEvent]) -> None:
        for ev in events:
            if isinstance(ev, Frame):
                try:
                    self._on_frame(ev)
                except Exception as exc:
                    log.error("unexpected error handling %r:\n%s", ev, traceback.format_exc().rstrip())
                    if ev.type == FrameType.REQUEST and ev.id and self.session is not None:
                        self.session.calls.pop(ev.id, None)
                        self._error(ev.id, codes.INTERNAL, "internal error in the agent (%s); "
                                    "its log has the details" % type(exc).__name__)
                if self.port_state != "active":
                    return
            elif isinstance(ev, Garbage):
                self._count_garbage(ev.nbytes)
            elif isinstance(ev, CorruptFrame):
                self._on_corrupt(ev)
            elif isinstance(ev, UnsupportedVersion):
                log.warning("frame with unsupported version %d (%s, id %d) skipped",
                            ev.version, frame_type_name(ev.type), ev.id)
                if ev.type == FrameType.REQUEST and ev.id and self.session is not None:
                    self._error(ev.id, codes.PROTOCOL_MISMATCH,
                                "frame version %d is not supported (this agent speaks 1)" % ev.version)

    def _count_garbage(self, nbytes: int) -> None:
        self.stats["garbage_bytes"] += nbytes
        now = time.monotonic()
        if self._garbage_logged_at is None or now - self._garbage_logged_at >= GARBAGE_LOG_INTERVAL:
            log.warning("skipped %d bytes of garbage on the control port (%d in total)",
                        nbytes, self.stats["garbage_bytes"])
            self._garbage_logged_at = now
        else:
            log.debug("skipped %d bytes of garbage on the control port", nbytes)

    def _on_corrupt(self, ev: CorruptFrame) -> None:
        self.stats["corrupt_frames"] += 1
        log.warning("dropped a corrupt %s frame (id %d, %d bytes, %s)",
                    frame_type_name(ev.type), ev.id, ev.length, ev.reason)
        session = self.session
        if session is None or not ev.id:
            return
        if ev.type == FrameType.REQUEST or (ev.type == FrameType.MESSAGE and ev.id):
            if not session.in_flight(ev.id):
                code = codes.TOO_LARGE if ev.reason == "too_large" else codes.BAD_REQUEST
                self._error(ev.id, code, "the request frame was corrupt (%s)" % (
                    "payload CRC mismatch" if ev.reason == "crc" else "larger than %d bytes"
                    % self.decoder.max_payload))
        elif ev.type == FrameType.STREAM and ev.id in session.execs:
            ex = session.execs.pop(ev.id)
            ex.kill("its stdin data arrived corrupted")
            self._error(ev.id, codes.CHECKSUM_MISMATCH, "stdin data for this process arrived corrupted; "
                        "the process was killed")

    def _on_frame(self, frame: Frame) -> None:
        if self.rules.is_ping(frame) and self._policy_allows("ping"):
            # What _on_request does for it, without the events, the dispatch and the reply's JSON.
            log.debug("request %d: ping", frame.id)
            self.outq.push(_PONG.frame(frame.id))
            return
        for ev in self.rules.receive_frame(frame):
            if isinstance(ev, Request):
                self._on_request(ev)
            elif isinstance(ev, SendBytes):
                self.outq.push(ev.data)
            elif isinstance(ev, Passed):
                t = ev.frame.type
                if t == FrameType.STREAM:
                    self._on_stream(ev.frame)
                elif t == FrameType.CANCEL:
                    self._on_cancel(ev.frame.id)
                else:
                    self._on_host_message(ev.frame)
            elif isinstance(ev, SessionStarted):
                self.session = Session()
                log.info("host session started")
            elif isinstance(ev, SessionEnded):
                self._drop_session(ev.reason)
            elif isinstance(ev, Ignored):
                log.log(logging.WARNING if ev.warning else logging.DEBUG, "%s", ev.reason)

    # -- handshake ------------------------------------------------------------------------------

    def description(self) -> JSON:
        return {
            "agent": "guestlink-agent",
            "agent_version": _version.__version__,
            "protocol": m.PROTOCOL_VERSION,
            "capabilities": self.capabilities(),
            "hostname": sysinfo.hostname(),
            "boot_id": self._boot_id,
            "session": self.opening or "",
        }

    def capabilities(self) -> List[str]:
        ops = list(BUILTIN_OPS) + sorted(self.handlers)
        allowed = [op for op in ops if self.config.policy_allows(op)]
        if "exec" in allowed:  # a feature of exec, not an op: says the agent knows exec's "user"
            allowed.append(EXEC_USER_CAPABILITY)
        return allowed

    def _queue_hello(self) -> None:
        self.outq.push(self.rules.hello())

    def _in_flight(self, req_id: int) -> bool:
        return self.session is not None and self.session.in_flight(req_id)

    def _end_session(self, reason: str) -> None:
        """The host went away (or the agent stops): the session is over for the rules too."""
        self.rules.end()
        self._drop_session(reason)

    def _drop_session(self, reason: str) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        for ex in list(session.execs.values()):
            ex.kill(reason)
        session.execs.clear()
        session.calls.clear()
        for tr in list(session.transfers.values()):
            self.files.cancel(tr, reason, keep_partial=True)  # the host may --resume
        session.transfers.clear()
        log.info("host session ended (%s)", reason)

    # -- requests -------------------------------------------------------------------------------

    def _on_request(self, request: Request) -> None:
        rid, op, args = request.id, request.op, request.args
        if op not in BUILTIN_OPS and op not in self.handlers:
            self._error(rid, codes.UNKNOWN_COMMAND, "the agent has no command %r" % op)
            return
        if not self._policy_allows(op):
            log.info("request %d: %s denied by policy", rid, op)
            self._error(rid, codes.DENIED, self.config.denial_reason(op))
            return
        log.debug("request %d: %s", rid, op)
        try:
            if op in FILE_OPS:
                result = self.files.handle(rid, op, args)
            elif op in BUILTIN_OPS:
                result = getattr(self, "_op_" + op)(rid, args)
            else:
                result = self._call_handler(rid, op, args)
        except OpError as exc:
            self._error(rid, exc.code, str(exc), exc.details)
            return
        except m.ProtocolViolation as exc:
            self._error(rid, exc.code, str(exc))
            return
        if result is not None:
            self._reply(rid, result)

    def _policy_allows(self, op: str) -> bool:
        """``config.policy_allows(op)``, remembered: it runs fnmatch over every pattern, on every
        request. The answers are dropped when the patterns change (compared by value)."""
        config = self.config
        key = self._policy_key
        if key is None or key[0] != config.deny or key[1] != config.allow:
            self._policy_key = (list(config.deny), list(config.allow))
            self._policy_answers.clear()
        allowed = self._policy_answers.get(op)
        if allowed is None:
            allowed = config.policy_allows(op)
            if len(self._policy_answers) < 1024:  # op names come from the host: bound the map
                self._policy_answers[op] = allowed
        return allowed

    def _op_ping(self, rid: int, args: Fields) -> None:
        self.outq.push(_PONG.frame(rid))

    def _op_info(self, rid: int, args: Fields) -> JSON:
        return sysinfo.info(_version.__version__, m.PROTOCOL_VERSION, self.capabilities())

    def _active_session(self) -> Session:
        """The current host session: requests are served only during one."""
        assert self.session is not None
        return self.session

    def _op_exec(self, rid: int, args: Fields) -> None:
        spec = parse_exec_args(args, self.config)
        session = self._active_session()
        if len(session.execs) >= self.config.max_concurrent:
            raise OpError(codes.BUSY, "too many processes: %d execs are running (max_concurrent)"
                          % len(session.execs))
        ex = Exec(self, session, rid, spec)
        ex.start()
        session.execs[rid] = ex
        if self.output_paused:
            ex.pause_output()
        return None

    def exec_finished(self, ex: Exec, result: JSON) -> None:
        if self.session is ex.session and self.session.execs.get(ex.id) is ex:
            del self.session.execs[ex.id]
            self._reply(ex.id, result)

    def adopt_orphan(self, proc: "subprocess.Popen[bytes]") -> None:
        self.orphans.append(proc)

    def _on_stream(self, frame: Frame) -> None:
        stream, eof = m.stream_flags(frame.flags)
        session = self.session
        ex = session.execs.get(frame.id) if session is not None else None
        if ex is None or stream != 0:
            log.debug("STREAM %d for id %d ignored (no such running exec)", stream, frame.id)
            return
        ex.feed_stdin(frame.payload, eof)

    def _on_cancel(self, rid: int) -> None:
        session = self.session
        if session is None:
            return
        ex = session.execs.pop(rid, None)
        if ex is not None:
            ex.kill("cancelled by the host")
            self._error(rid, codes.CANCELLED, "cancelled by the host; the process group was killed")
            return
        if session.calls.pop(rid, None) is not None:
            self._error(rid, codes.CANCELLED, "cancelled by the host (the handler's result will "
                        "be discarded)")
            return
        tr = session.transfers.pop(rid, None)
        if tr is not None:
            self.files.cancel(tr, "cancelled by the host", keep_partial=False)
            self._error(rid, codes.CANCELLED, "cancelled by the host; the transfer was stopped "
                        "and its temporary file removed")
            return
        log.debug("CANCEL for id %d ignored (not in flight)", rid)

    # -- power ----------------------------------------------------------------------------------

    def _op_shutdown(self, rid: int, args: Fields) -> None:
        return self._power(rid, "poweroff", self.config.poweroff_command)

    def _op_reboot(self, rid: int, args: Fields) -> None:
        return self._power(rid, "reboot", self.config.reboot_command)

    def _power(self, rid: int, action: str, configured: Optional[Sequence[str]]) -> None:
        if configured:
            candidates = [list(configured)]
        else:
            try:
                candidates = power.power_commands(action)
            except LookupError as exc:
                raise OpError(codes.NOT_FOUND, str(exc))
        log.warning("%s requested by the host", action)
        self._reply(rid, {})
        state = {"done": False}

        def go() -> None:
            if state["done"]:
                return
            state["done"] = True
            self._run_power(action, candidates)

        self._after_flush.append(go)
        self.timers.call_later(POWER_FLUSH_TIMEOUT, go)
        return None

    def _run_power(self, action: str, candidates: List[List[str]]) -> None:
        for argv in candidates:
            log.warning("%s: running %s", action, " ".join(argv))
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        close_fds=True, start_new_session=True)
            except OSError as exc:
                log.error("%s: cannot run %s: %s", action, argv[0], exc.strerror or exc)
                continue
            rest = candidates[candidates.index(argv) + 1:]
            self._watch_power(action, proc, argv[0], rest)
            return
        log.error("%s: every way to %s failed", action, action)

    def _watch_power(self, action: str, proc: "subprocess.Popen[bytes]", program: str,
                     rest: List[List[str]]) -> None:
        def check() -> None:
            rc = proc.poll()
            if rc is None:
                self.timers.call_later(0.2, check)
            elif rc != 0:
                log.error("%s: %s exited with status %d", action, program, rc)
                if rest:
                    self._run_power(action, rest)
            else:
                log.info("%s: %s succeeded", action, program)
        self.timers.call_later(0.2, check)

    # -- user handlers --------------------------------------------------------------------------

    def _call_handler(self, rid: int, op: str, args: Fields) -> Optional[JSON]:
        session = self._active_session()
        if self.pool.pending >= HANDLER_QUEUE_MAX:
            raise OpError(codes.BUSY, "too many handler calls in progress (%d)" % self.pool.pending)
        ctx = HandlerContext(op, rid, logging.getLogger("guestlink.handler." + op),
                             self._message_from_thread)
        session.calls[rid] = op
        self.pool.submit((session, rid, op), self.handlers[op], args.obj, ctx)
        return None

    def _handler_done(self, token: Any, ok: bool, value: Any, tb: Optional[str]) -> None:
        # Runs in a worker thread: only post the result and wake the loop.
        with self._results_lock:
            self._results.append((token, ok, value, tb))
        self.waker.wake()

    def _message_from_thread(self, topic: str, data: bytes) -> None:
        m.check_topic(topic)
        with self._results_lock:
            self._results.append((("message",), True, (topic, data), None))
        self.waker.wake()

    def _deliver_handler_result(self, token: Any, ok: bool, value: Any, tb: Optional[str]) -> None:
        if token == ("message",):
            self.message_to_host(*value)
            return
        if token == ("transfer",):
            self.files.finished(*value)
            return
        self.pool.pending -= 1
        session: Session = token[0]
        rid: int = token[1]
        op: str = token[2]
        if self.session is not session or session.calls.get(rid) != op:
            log.debug("handler %s (request %d) finished after its request was cancelled or its "
                      "session ended; result dropped", op, rid)
            return
        del session.calls[rid]
        if not ok:
            log.error("handler %s (request %d) raised %s: %s\n%s", op, rid, type(value).__name__,
                      value, (tb or "").rstrip())
            self._error(rid, codes.HANDLER_ERROR, "%s: %s" % (type(value).__name__, value)
                        if str(value) else type(value).__name__)
            return
        if not isinstance(value, dict):
            if value is None:
                value = {}
            else:
                log.error("handler %s returned %s, not a dict", op, type(value).__name__)
                self._error(rid, codes.HANDLER_ERROR, "handler %s returned %s, not a JSON object"
                            % (op, type(value).__name__))
                return
        try:
            data = m.encode_response(rid, value)
        except (ValueError, TypeError) as exc:
            log.error("handler %s returned a result that cannot be sent: %s", op, exc)
            self._error(rid, codes.HANDLER_ERROR, "handler %s returned a result that is not "
                        "JSON-serialisable: %s" % (op, exc))
            return
        self.outq.push(data)

    # -- topic messages -------------------------------------------------------------------------

    def _on_host_message(self, frame: Frame) -> None:
        try:
            topic, data = m.parse_message(frame.payload)
        except m.ProtocolViolation as exc:
            log.debug("invalid MESSAGE from the host: %s", exc)
            if frame.id:
                self._error(frame.id, exc.code, str(exc))
            return
        delivered = self.local.publish(topic, data) if self.local is not None else 0
        log.debug("host message on %s (%d bytes) delivered to %d subscribers", topic, len(data), delivered)
        if frame.id:
            self._reply(frame.id, {"delivered": delivered})

    def message_to_host(self, topic: str, data: bytes) -> Tuple[Optional[str], Optional[str]]:
        """Queue a guest -> host message. Returns (None, None) or (error code, message)."""
        if self.session is None:
            return codes.NOT_READY, "no host is connected"
        if self.outq.size > OUT_HIGH:
            return codes.BUSY, "the host is not reading (%d bytes queued for it)" % self.outq.size
        self.outq.push(m.encode_message(topic, data))
        return None, None

    # == children ================================================================================

    def _reap(self) -> None:
        for ex in self._all_execs():
            ex.poll()
        if self.orphans:
            self.orphans = [p for p in self.orphans if p.poll() is None]

    def _schedule_child_polling(self) -> None:
        """Without signal handlers (agent run in a thread) children are polled every 50 ms."""
        if self._signals_installed or self._poll_children_timer is not None:
            return
        if self.orphans or any(ex.proc.returncode is None for ex in self._all_execs()):
            def tick() -> None:
                self._poll_children_timer = None
                self._reap()
            self._poll_children_timer = self.timers.call_later(0.05, tick)
