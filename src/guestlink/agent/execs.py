"""The ``exec`` command: a child process in its own session, streamed through the agent's loop.

Lifecycle and the decisions behind it:

* The child runs in a new session (``start_new_session``), so its pid is its process group id and
  the whole group can be signalled.
* stdout/stderr are non-blocking pipes registered in the agent's selector; every read (at most
  64 KiB) becomes one STREAM frame. Reading pauses while the port's outbound queue is above its
  high-water mark (backpressure), so output is never buffered without bound.
* Exit is noticed through SIGCHLD (the loop then ``poll()``s each child; never ``waitpid(-1)``),
  independent of the pipes: a process that closes its stdout and keeps running is still timed out.
* The reply is sent once the process has exited AND its pipes are at EOF. If a background
  grandchild keeps a pipe open after the process exited, the agent keeps reading for
  ``EXIT_GRACE`` seconds of unpaused time, then takes what is immediately readable, closes its
  ends and replies; later output of the grandchild is lost (it gets EPIPE) and it is not killed.
* Timeout: SIGTERM to the group, SIGKILL 2 s later; the reply says ``timed_out``. CANCEL and the
  end of the host session: SIGKILL to the group at once.
* Environment: never the agent's own (under systemd it has no HOME). The child gets a login-like
  one from the passwd entry of the user it runs as (:func:`login_env`: HOME, USER, LOGNAME,
  SHELL, PATH, LANG=C.UTF-8), then the request's ``env`` on top; ``env_clear`` starts empty.
* ``user``: only a root agent may run a command as another user. The child sets its groups
  (initgroups), gid and uid, then changes to its working directory *as that user* (so a directory
  the user may not enter is refused), before exec; a failed step comes back to the agent through
  a close-on-exec pipe and becomes a precise error. Python 3.8 has no ``user=``/``group=`` for
  subprocess, hence ``preexec_fn`` (the agent is single-threaded).
"""
import errno
import logging
import os
import pwd
import signal
import subprocess
import time
from typing import IO, TYPE_CHECKING, Any, Callable, Dict, List, Optional

from ..protocol import FLAG_EOF, STREAM_STDERR, STREAM_STDOUT, FrameType, codes, encode_parts
from ..protocol.messages import Fields
from ..protocol.ops import ExecRequest, ExecResult, ExecStarted
from .loop import ByteQueue, Timer

if TYPE_CHECKING:  # the server creates the Execs
    from .server import Agent, Session

#: A validated exec request with this agent's defaults applied (parse_exec_args).
ExecSpec = Dict[str, Any]

log = logging.getLogger("guestlink.agent")

KILL_AFTER = 2.0
EXIT_GRACE = 0.5
FINAL_DRAIN_MAX = 1 << 20


class OpError(Exception):
    """A command failed in an expected way: becomes ERROR ``code`` with this message."""

    def __init__(self, code: str, message: str, details: Optional[Dict[str, Any]] = None) -> None:
        Exception.__init__(self, message)
        self.code = code
        self.details = details


def signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USER_PATH = "/usr/local/bin:/usr/bin:/bin"


def login_env(pw: Optional["pwd.struct_passwd"], uid: int) -> Dict[str, str]:
    """The login-like environment of a user (``pw``: their passwd entry, None if they have none)."""
    env = {"PATH": ROOT_PATH if uid == 0 else USER_PATH, "LANG": "C.UTF-8"}
    if pw is None:
        env["HOME"] = "/"
        return env
    env.update(HOME=pw.pw_dir or "/", USER=pw.pw_name, LOGNAME=pw.pw_name,
               SHELL=pw.pw_shell or "/bin/sh")
    return env


def _own_passwd() -> Optional["pwd.struct_passwd"]:
    try:
        return pwd.getpwuid(os.geteuid())
    except KeyError:
        return None


def run_as(name: Optional[str]) -> Optional["pwd.struct_passwd"]:
    """The passwd entry to switch to for ``user`` (None: stay the agent's own user), or OpError."""
    if name is None:
        return None
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise OpError(codes.NOT_FOUND, "no user %r in the guest" % name)
    if pw.pw_uid == os.geteuid() and os.geteuid() != 0:
        return None  # already that user
    if os.geteuid() != 0:
        raise OpError(codes.PERMISSION_DENIED, "cannot run as user %r: the agent does not run as "
                      "root (it runs as uid %d)" % (name, os.geteuid()))
    return pw


def parse_exec_args(args: Fields, config: Any) -> ExecSpec:
    """Validate the request's args (protocol.ops.ExecRequest) and apply this agent's defaults and
    limits; returns a dict for Exec."""
    req = ExecRequest.from_wire(args)
    argv = list(req.argv) if req.argv is not None else ["/bin/sh", "-c", req.shell]
    pw = run_as(req.user)
    if req.env_clear:
        env: Dict[str, str] = {}
    elif pw is not None:
        env = login_env(pw, pw.pw_uid)
    else:
        env = login_env(_own_passwd(), os.geteuid())
    env.update(req.env)
    timeout = req.timeout
    if config.max_timeout:
        timeout = config.max_timeout if timeout is None else min(timeout, config.max_timeout)
    limit = req.output_limit if req.output_limit is not None else config.max_output
    return {
        "argv": argv,
        "env": env,
        "cwd": req.cwd if req.cwd is not None else "/",
        "stdin": req.stdin,
        "timeout": timeout,
        "output_limit": min(limit, config.max_output),
        "user": pw,
    }


#: The steps of switching user in the child, as reported through the error pipe.
_STEPS = ("initgroups", "setgid", "setuid", "chdir")


def _switcher(pw: "pwd.struct_passwd", cwd: str, report_fd: int) -> Callable[[], None]:
    """The child's preexec_fn: become ``pw`` (groups, gid, uid), then enter ``cwd`` as them. A
    failed step writes ``STEP:ERRNO`` to ``report_fd`` (close-on-exec) and raises."""
    def switch() -> None:
        step = 0
        try:
            os.initgroups(pw.pw_name, pw.pw_gid)
            step = 1
            os.setgid(pw.pw_gid)
            step = 2
            os.setuid(pw.pw_uid)
            step = 3
            os.chdir(cwd)
        except OSError as exc:
            os.write(report_fd, ("%d:%d" % (step, exc.errno or 0)).encode("ascii"))
            raise
    return switch


class _Reader:
    __slots__ = ("fd", "stream", "sent", "truncated", "closed")

    def __init__(self, fd: int, stream: int) -> None:
        self.fd = fd
        self.stream = stream
        self.sent = 0
        self.truncated = False
        self.closed = False


class Exec:
    """One running ``exec`` request. ``agent`` is the server (selector, timers, port queue)."""

    # Set by start(); the agent keeps only an Exec that started.
    proc: "subprocess.Popen[bytes]"
    pgid: int
    started: float

    def __init__(self, agent: "Agent", session: "Session", req_id: int, spec: ExecSpec) -> None:
        self.agent = agent
        self.session = session
        self.id = req_id
        self.spec = spec
        self.readers: List[_Reader] = []
        self.stdin_fd: Optional[int] = None
        self.stdin_queue = ByteQueue()
        self.stdin_eof = False
        self.timed_out = False
        self.done = False
        self._timers: List[Timer] = []
        self._grace: Optional[Timer] = None

    # -- start --------------------------------------------------------------------------------

    def start(self) -> None:
        spec = self.spec
        cwd = spec["cwd"]
        if not os.path.isdir(cwd):
            if os.path.exists(cwd):
                raise OpError(codes.NOT_A_DIRECTORY, "working directory %s is not a directory" % cwd)
            raise OpError(codes.NOT_FOUND, "working directory %s does not exist" % cwd)
        program = spec["argv"][0]
        pw = spec["user"]
        report_r = report_w = -1
        preexec: Optional[Callable[[], None]] = None
        if pw is not None:
            report_r, report_w = os.pipe()  # both close-on-exec
            preexec = _switcher(pw, cwd, report_w)
        try:
            self.proc = subprocess.Popen(
                spec["argv"], stdin=subprocess.PIPE if spec["stdin"] else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd if pw is None else None,
                env=spec["env"], close_fds=True, start_new_session=True, preexec_fn=preexec)
        except subprocess.SubprocessError:
            raise self._switch_error(pw, cwd, report_r)
        except FileNotFoundError:
            raise OpError(codes.NOT_FOUND, "program not found: %s" % program)
        except PermissionError as exc:
            raise OpError(codes.PERMISSION_DENIED, "cannot execute %s: %s" % (program, exc.strerror))
        except OSError as exc:
            raise OpError(codes.errno_to_code(exc.errno or 0), "cannot execute %s: %s" % (
                program, exc.strerror or exc))
        except (ValueError, TypeError) as exc:
            raise OpError(codes.BAD_REQUEST, "cannot execute %s: %s" % (program, exc))
        finally:
            for fd in (report_r, report_w):
                if fd >= 0:
                    os.close(fd)
        self.started = time.monotonic()
        self.pgid = self.proc.pid
        agent = self.agent
        for stream in (STREAM_STDOUT, STREAM_STDERR):
            fd = self._pipe(stream).fileno()
            os.set_blocking(fd, False)
            self.readers.append(_Reader(fd, stream))
        if self.proc.stdin is not None:
            self.stdin_fd = self.proc.stdin.fileno()
            os.set_blocking(self.stdin_fd, False)
        agent.send_frame(FrameType.EVENT, ExecStarted(self.proc.pid).to_wire(), id=self.id)
        self.resume_output()
        if spec["timeout"] is not None:
            self._timers.append(agent.timers.call_later(spec["timeout"], self._on_timeout))
        log.debug("exec %d: started pid %d: %r", self.id, self.proc.pid, spec["argv"])

    @staticmethod
    def _switch_error(pw: "pwd.struct_passwd", cwd: str, report_fd: int) -> OpError:
        """The preexec_fn failed: which step and why, from the report pipe."""
        os.set_blocking(report_fd, False)
        try:
            step_s, _, err_s = os.read(report_fd, 64).decode("ascii").partition(":")
            step, err = int(step_s), int(err_s)
        except (OSError, ValueError):
            return OpError(codes.INTERNAL, "cannot run as user %r: the switch failed" % pw.pw_name)
        why = os.strerror(err)
        if _STEPS[step] == "chdir":
            return OpError(codes.errno_to_code(err), "user %r cannot enter working directory %s: "
                           "%s" % (pw.pw_name, cwd, why))
        return OpError(codes.errno_to_code(err), "cannot run as user %r: %s failed: %s"
                       % (pw.pw_name, _STEPS[step], why))

    # -- output -------------------------------------------------------------------------------

    def _pipe(self, stream: int) -> IO[bytes]:
        pipe = self.proc.stdout if stream == STREAM_STDOUT else self.proc.stderr
        assert pipe is not None  # both are PIPEs
        return pipe

    def pause_output(self) -> None:
        for r in self.readers:
            if not r.closed:
                self.agent.set_interest(r.fd, 0)

    def resume_output(self) -> None:
        for r in self.readers:
            if not r.closed:
                self.agent.set_interest(r.fd, self.agent.EV_READ, self._reader_callback(r))

    def _reader_callback(self, reader: _Reader) -> Callable[[int], object]:
        return lambda mask: self._on_readable(reader)

    def _on_readable(self, reader: _Reader, final: bool = False) -> bool:
        buf = self.agent.read_buf
        try:
            n = os.readv(reader.fd, [buf])
        except BlockingIOError:
            return False
        except OSError as exc:
            log.warning("exec %d: reading stream %d failed: %s", self.id, reader.stream, exc)
            n = 0
        if n == 0:
            self._close_reader(reader)
            self._maybe_finish()
            return False
        room = self.spec["output_limit"] - reader.sent
        if room > 0:
            k = min(n, room)
            self.agent.send_parts(encode_parts(FrameType.STREAM, bytes(memoryview(buf)[:k]),
                                               flags=reader.stream, id=self.id))
            reader.sent += k
        if n > room:
            reader.truncated = True
        return True

    def _close_reader(self, reader: _Reader) -> None:
        if reader.closed:
            return
        reader.closed = True
        self.agent.set_interest(reader.fd, 0)
        try:
            self._pipe(reader.stream).close()
        except OSError:
            pass
        if not self.done:
            self.agent.send_parts(encode_parts(FrameType.STREAM, b"", flags=reader.stream | FLAG_EOF,
                                               id=self.id))

    # -- stdin --------------------------------------------------------------------------------

    def feed_stdin(self, data: bytes, eof: bool) -> None:
        if self.stdin_fd is None:
            log.debug("exec %d: stdin data ignored (stdin not requested or already closed)", self.id)
            return
        self.stdin_queue.push(bytes(data))
        if eof:
            self.stdin_eof = True
        self._flush_stdin()

    def _flush_stdin(self, mask: Optional[int] = None) -> None:
        fd = self.stdin_fd
        if fd is None:
            return
        try:
            self.stdin_queue.write_to(lambda bufs: os.writev(fd, bufs))
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                log.warning("exec %d: writing stdin failed: %s", self.id, exc)
            self._close_stdin()
            return
        if self.stdin_queue.size:
            self.agent.set_interest(fd, self.agent.EV_WRITE, self._flush_stdin)
        else:
            self.agent.set_interest(fd, 0)
            if self.stdin_eof:
                self._close_stdin()

    def _close_stdin(self) -> None:
        if self.stdin_fd is None:
            return
        self.agent.set_interest(self.stdin_fd, 0)
        self.stdin_fd = None
        self.stdin_queue.clear()
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass

    # -- exit, timeout, cancel ----------------------------------------------------------------

    def poll(self) -> None:
        """Called when a child may have exited (SIGCHLD)."""
        if self.proc.returncode is None and self.proc.poll() is not None:
            log.debug("exec %d: pid %d exited with %s", self.id, self.proc.pid, self.proc.returncode)
            self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.done or self.proc.returncode is None:
            return
        if any(not r.closed for r in self.readers):
            if self._grace is None:
                self._grace = self.agent.timers.call_later(EXIT_GRACE, self._on_grace)
            return
        self._finish()

    def _on_grace(self) -> None:
        self._grace = None
        if self.done:
            return
        if self.agent.output_paused:
            self._grace = self.agent.timers.call_later(EXIT_GRACE, self._on_grace)
            return
        for r in self.readers:
            drained = 0
            while not r.closed and drained < FINAL_DRAIN_MAX and self._on_readable(r, final=True):
                drained += 1
            if not r.closed:
                log.debug("exec %d: pid %d exited but stream %d is still open (a background process "
                          "holds it); closing it", self.id, self.proc.pid, r.stream)
                self._close_reader(r)
        self._maybe_finish()

    def _on_timeout(self) -> None:
        if self.done or self.proc.returncode is not None:
            return
        log.info("exec %d: timed out after %g s; terminating process group %d",
                 self.id, self.spec["timeout"], self.pgid)
        self.timed_out = True
        signal_group(self.pgid, signal.SIGTERM)
        pgid = self.pgid
        # The follow-up KILL also catches group members that ignore SIGTERM after the leader died.
        self.agent.timers.call_later(KILL_AFTER, lambda: signal_group(pgid, signal.SIGKILL))

    def _finish(self) -> None:
        self.done = True
        self._cleanup()
        rc = self.proc.returncode
        result = ExecResult(
            returncode=rc, signal=-rc if rc < 0 else None, timed_out=self.timed_out,
            stdout_truncated=self.readers[0].truncated, stderr_truncated=self.readers[1].truncated,
            duration=round(time.monotonic() - self.started, 6)).to_wire()
        log.debug("exec %d: finished: %r", self.id, result)
        self.agent.exec_finished(self, result)

    def kill(self, reason: str) -> None:
        """Cancel or session end: SIGKILL the group, stop streaming, forget about the process."""
        if self.done:
            return
        self.done = True
        if self.proc.returncode is None:
            log.info("exec %d: killing process group %d (%s)", self.id, self.pgid, reason)
        signal_group(self.pgid, signal.SIGKILL)
        self._cleanup()
        if self.proc.returncode is None:
            self.agent.adopt_orphan(self.proc)

    def _cleanup(self) -> None:
        for t in self._timers:
            t.cancel()
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        for r in self.readers:
            self._close_reader(r)
        self._close_stdin()
