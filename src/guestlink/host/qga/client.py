"""The Client verbs through qemu-ga: ping, info, exec/run, push/pull, and the few fs calls the CLI
makes. See the package docstring for what differs from guestlink's own agent."""

import asyncio
import errno
import hashlib
import os
import secrets
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple

from ...protocol import ProtocolViolation, codes
from ...protocol.ops import Info
from .. import errors as E
from ..execs import Command, CompletedProcess, run_collected
from ..options import ConnectOptions, ExecOptions, PathLike
from ..timing import check_timeout
from ..transfer import TransferResult
from . import guest as G
from .transport import LibvirtTransport, QgaTransport, SocketTransport

Progress = Optional[Callable[[int, Optional[int]], Any]]

#: Guest programs tried, in order, for the end-to-end SHA-256 of a copied file.
_SHA256_PROGRAMS: Tuple[Tuple[str, ...], ...] = (
    ("sha256sum", "--"),
    ("python3", "-c", "import hashlib,sys;h=hashlib.sha256();f=open(sys.argv[1],'rb')\n"
                      "for b in iter(lambda:f.read(1<<20),b''):h.update(b)\nprint(h.hexdigest())"),
)


@dataclass
class QgaTransferResult(TransferResult):
    """A push or pull through qemu-ga; ``verified`` is False when the guest had no way to compute
    the SHA-256 (neither sha256sum nor python3), so the end-to-end check could not be made."""

    verified: bool = True


class QgaAgentInfo:
    """What ``Client.agent`` gives, for qemu-ga: ``name`` "qemu-ga", ``version``, ``hostname``."""

    def __init__(self, version: str, hostname: str, capabilities: List[str]) -> None:
        self.name = "qemu-ga"
        self.version = version
        self.hostname = hostname
        self.capabilities = tuple(capabilities)
        self.protocol = 0
        self.boot_id = ""
        self.session = ""


def _argv(cmd: Command, options: ExecOptions) -> List[str]:
    """The argv qemu-ga runs for ``cmd`` with ``options`` (cwd and env through sh and env(1),
    passed as arguments, never spliced into a shell string)."""
    if isinstance(cmd, (bytes, bytearray)):
        raise TypeError("cmd must be a str (shell command line) or a list of str (argv)")
    if isinstance(cmd, str):
        argv = shlex.split(cmd) if options.shell is False else ["/bin/sh", "-c", cmd]
    else:
        argv = [str(a) for a in cmd]
        if options.shell:
            argv = ["/bin/sh", "-c", " ".join(shlex.quote(a) for a in argv)]
    if not argv:
        raise ValueError("empty command")
    if options.user is not None:
        # qemu-ga runs every command as itself (root); su/sudo would need a shell string and
        # their own prompts: a different user is guestlink's agent's job
        raise ValueError("exec as user %r: not available through qemu-ga (enroll the VM for it: "
                         "guestlink enroll DOMAIN)" % (options.user,))
    if options.env or options.env_clear:
        argv = (["env"] + (["-i"] if options.env_clear else [])
                + ["%s=%s" % kv for kv in (options.env or {}).items()] + argv)
    if options.cwd is not None:
        argv = ["/bin/sh", "-c", 'cd -- "$1" && shift && exec "$@"', "sh", str(options.cwd)] + argv
    return argv


class QgaProcess:
    """A command run through qemu-ga, with the interface of guestlink's Process.

    qemu-ga cannot stream: stdin is collected (up to :data:`guest.MAX_STDIN`) and handed over
    when it is closed, then the command runs, and its output arrives once it exited."""

    def __init__(self, client: "QgaClient", cmd: Command, options: ExecOptions) -> None:
        self._client = client
        self.args = cmd
        self._argv = _argv(cmd, options)
        self._options = options
        self._stdin = bytearray() if options.stdin else None
        self._stdin_closed = asyncio.Event()
        if not options.stdin:
            self._stdin_closed.set()
        self._result: Optional[CompletedProcess] = None
        self._running: Optional["asyncio.Future[CompletedProcess]"] = None
        self.pid: Optional[int] = None

    async def __aenter__(self) -> "QgaProcess":
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._running is not None and not self._running.done():
            self._running.cancel()
            try:
                await self._running
            except (asyncio.CancelledError, Exception):
                pass

    async def write(self, data: bytes) -> None:
        if self._stdin is None or self._stdin_closed.is_set():
            raise ValueError("stdin is not open (exec(..., stdin=True))")
        if len(self._stdin) + len(data) > G.MAX_STDIN:
            raise E.TooLarge(codes.TOO_LARGE, "more than %d bytes of stdin cannot go through "
                             "qemu-ga's guest-exec" % G.MAX_STDIN)
        self._stdin += data

    async def close_stdin(self) -> None:
        self._stdin_closed.set()

    async def wait(self) -> CompletedProcess:
        if self._result is not None:
            return self._result
        if self._running is None:
            self._running = asyncio.ensure_future(self._run())
        self._result = await asyncio.shield(self._running)
        return self._result

    async def output(self) -> AsyncIterator[Tuple[str, bytes]]:
        """(stream, data) pairs: all of stdout, then all of stderr, once the command exited."""
        result = await self.wait()
        if result.stdout:
            yield "stdout", result.stdout
        if result.stderr:
            yield "stderr", result.stderr

    async def _run(self) -> CompletedProcess:
        await self._stdin_closed.wait()
        t = self._client.transport
        opts = self._options
        start = time.monotonic()
        call_timeout = opts.call_timeout or self._client.timeout
        try:
            self.pid = await G.exec_start(t, self._argv, bytes(self._stdin or b""),
                                          timeout=call_timeout)
        except E.RemoteError as exc:  # qemu-ga could not spawn it: say so as the agent does
            if "no such file" in exc.message.lower() or "not found" in exc.message.lower():
                raise E.RemoteNotFound(codes.NOT_FOUND, exc.message) from None
            raise
        deadline = start + opts.timeout if opts.timeout is not None else None
        timed_out = False
        try:
            status = await G.exec_wait(t, self.pid, deadline)
            if status is None:
                timed_out = True
                await G.kill(t, self.pid)
                status = await G.exec_wait(t, self.pid, time.monotonic() + 10.0)
                if status is None:
                    raise E.RequestTimeout("qemu-ga: the command did not end after SIGKILL")
        except asyncio.CancelledError:
            await asyncio.shield(G.kill(t, self.pid))
            raise
        limit = opts.output_limit
        out, err = status.stdout, status.stderr
        out_cut = status.stdout_truncated or (limit is not None and len(out) > limit)
        err_cut = status.stderr_truncated or (limit is not None and len(err) > limit)
        if limit is not None:
            out, err = out[:limit], err[:limit]
        returncode = -status.signal if status.signal is not None else int(status.exitcode or 0)
        return CompletedProcess(
            args=self.args, returncode=returncode,
            stdout=out, stderr=err, signal=status.signal, timed_out=timed_out,
            stdout_truncated=out_cut, stderr_truncated=err_cut,
            duration=time.monotonic() - start, pid=self.pid)


class QgaClient:
    """A connection to one VM's qemu-guest-agent with guestlink's Client verbs; create it with
    ``guestlink.connect(..., via="qga")`` (or "auto", the fallback)."""

    via = "qga"

    def __init__(self, options: ConnectOptions, transport: Optional[QgaTransport] = None,
                 reason: Optional[BaseException] = None) -> None:
        if transport is None:
            if options.qga:
                transport = SocketTransport(str(options.qga))
            elif options.domain:
                transport = LibvirtTransport(options.domain, options.uri)
            else:
                raise ValueError("via qemu-ga needs a libvirt domain or the qemu-ga socket (qga=)")
        self.transport = transport
        self.timeout = options.timeout
        #: why guestlink's own agent was not used (via="auto"), else None
        self.fallback_reason = reason
        self.agent: Optional[QgaAgentInfo] = None
        self._connected = False

    def __repr__(self) -> str:
        return "<guestlink.QgaClient %s>" % self.transport.describe

    @property
    def connected(self) -> bool:
        return self._connected

    async def __aenter__(self) -> "QgaClient":
        if not self._connected:
            await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> "QgaClient":
        try:
            await self.transport.open(self.timeout)
            version, enabled = await G.version(self.transport, self.timeout)
            self.agent = QgaAgentInfo(version, await self._hostname(), enabled)
        except BaseException:
            await self.transport.close()
            raise
        self._connected = True
        return self

    async def close(self) -> None:
        self._connected = False
        await self.transport.close()

    async def _hostname(self) -> str:
        try:
            reply = await self.transport.command("guest-get-host-name", None, self.timeout)
        except E.UnknownCommand:
            return ""
        return G.str_field(G.fields(reply, "guest-get-host-name reply"), "host-name",
                           "guest-get-host-name reply")

    # --- verbs --------------------------------------------------------------------------

    async def ping(self, *, timeout: Optional[float] = None) -> float:
        start = time.monotonic()
        await self.transport.command("guest-ping", None, check_timeout(timeout) or self.timeout)
        return time.monotonic() - start

    async def info(self, *, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The same fields as guestlink's info (validated alike), from qemu-ga's guest-info,
        guest-get-host-name and guest-get-osinfo; ``via`` is "qga", ``protocol`` 0, and
        ``agent_version`` is "qemu-ga VERSION". Fields qemu-ga does not give are empty."""
        t = check_timeout(timeout) or self.timeout
        version, enabled = await G.version(self.transport, t)
        hostname = await self._hostname()
        osr: Dict[str, str] = {}
        kernel = {"release": "", "version": "", "machine": ""}
        if "guest-get-osinfo" in enabled:
            what = "guest-get-osinfo reply"
            o = G.fields(await self.transport.command("guest-get-osinfo", None, t), what)
            kernel = {"release": G.str_field(o, "kernel-release", what),
                      "version": G.str_field(o, "kernel-version", what),
                      "machine": G.str_field(o, "machine", what)}
            for key, name in (("id", "ID"), ("name", "NAME"), ("pretty-name", "PRETTY_NAME"),
                              ("version", "VERSION"), ("version-id", "VERSION_ID")):
                if o.get(key) is not None:
                    osr[name] = G.str_field(o, key, what)
        try:
            info = Info.from_wire({
                "hostname": hostname, "agent_version": "qemu-ga " + version, "protocol": 0,
                "os_release": osr, "kernel": kernel, "capabilities": enabled[:256]}).to_wire()
        except ProtocolViolation as exc:
            raise E.malformed("info from qemu-ga", exc) from None
        info["via"] = self.via
        return info

    async def call(self, op: str, args: Optional[Dict[str, Any]] = None, /, *,
                   timeout: Optional[float] = None, **kwargs: Any) -> Dict[str, Any]:
        """Only the agent's fs.stat (type only), fs.setattr (mode only) and fs.remove, done with
        test/chmod/rm in the guest; anything else raises UnknownCommand."""
        a = dict(args or {})
        a.update(kwargs)
        path = a.get("path")
        if not isinstance(path, str):
            raise ValueError("%s needs a path" % op)
        t = check_timeout(timeout) or self.timeout
        if op == "fs.stat":
            st = await G.run(self.transport, ["test", "-d", path], timeout=t)
            if st.exitcode == 0:
                return {"type": "dir"}
            st = await G.run(self.transport, ["test", "-e", path], timeout=t)
            if st.exitcode == 0:
                return {"type": "file"}
            raise E.RemoteNotFound(codes.NOT_FOUND, "%s does not exist in the guest" % path)
        if op == "fs.setattr" and set(a) <= {"path", "mode"} and isinstance(a.get("mode"), int):
            await self._check(["chmod", "%o" % a["mode"], "--", path], t)
            return {}
        if op == "fs.remove" and set(a) == {"path"}:
            await self._check(["rm", "-f", "--", path], t)
            return {}
        raise E.UnknownCommand(codes.UNKNOWN_COMMAND, "%s is not available through qemu-ga "
                               "(enroll the VM: guestlink enroll DOMAIN)" % op)

    async def _check(self, argv: List[str], timeout: Optional[float]) -> None:
        st = await G.run(self.transport, argv, timeout=timeout)
        if st.exitcode != 0:
            detail = st.stderr.decode("utf-8", "replace").strip()[:300]
            raise E.RemoteIOError(codes.IO_ERROR, "%s failed in the guest: %s" % (argv[0], detail))

    def exec(self, cmd: Command, *, stdin: bool = False, timeout: Optional[float] = None,
             env: Optional[Dict[str, str]] = None, env_clear: bool = False,
             cwd: Optional[PathLike] = None, shell: Optional[bool] = None,
             output_limit: Optional[int] = G.QGA_OUTPUT_CAP,
             call_timeout: Optional[float] = None, user: Optional[str] = None) -> QgaProcess:
        return self.exec_with(cmd, ExecOptions(
            stdin=stdin, timeout=timeout, env=env, env_clear=env_clear, cwd=cwd, shell=shell,
            output_limit=output_limit, call_timeout=call_timeout, user=user))

    def exec_with(self, cmd: Command, options: ExecOptions) -> QgaProcess:
        return QgaProcess(self, cmd, options)

    async def run(self, cmd: Command, *, check: bool = False, timeout: Optional[float] = None,
                  input: Optional[Any] = None, env: Optional[Dict[str, str]] = None,
                  cwd: Optional[PathLike] = None, shell: Optional[bool] = None,
                  env_clear: bool = False, output_limit: Optional[int] = G.QGA_OUTPUT_CAP,
                  call_timeout: Optional[float] = None,
                  user: Optional[str] = None) -> CompletedProcess:
        options = ExecOptions(stdin=input is not None, timeout=timeout, env=env,
                              env_clear=env_clear, cwd=cwd, shell=shell,
                              output_limit=output_limit, call_timeout=call_timeout, user=user)
        return await run_collected(self, cmd, options, input, check)

    # --- files ------------------------------------------------------------------------------

    async def _guest_sha256(self, path: str, timeout: Optional[float]) -> Optional[str]:
        """The guest's SHA-256 of ``path`` (hex), or None when no program for it exists there."""
        for program in _SHA256_PROGRAMS:
            try:
                st = await G.run(self.transport, list(program) + [path], timeout=timeout)
            except E.RemoteError as exc:
                if "no such file" in exc.message.lower() or "not found" in exc.message.lower():
                    continue  # the program is not there
                raise
            if st.exitcode == 127:
                continue
            words = st.stdout.split()
            if st.exitcode != 0 or not words:
                detail = st.stderr.decode("utf-8", "replace").strip()[:300]
                raise E.RemoteIOError(codes.IO_ERROR, "%s %s failed in the guest: %s"
                                      % (program[0], path, detail))
            digest = words[0].decode("ascii", "replace").lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise E.ProtocolError("malformed SHA-256 from %s in the guest" % program[0])
            return digest
        return None

    @staticmethod
    def _unsupported(recursive: bool, preserve: bool, resume: bool) -> None:
        given = [name for name, flag in (("recursive", recursive), ("preserve", preserve),
                                         ("resume", resume)) if flag]
        if given:
            raise ValueError("%s: not available through qemu-ga (enroll the VM for it: "
                             "guestlink enroll DOMAIN)" % ", ".join(given))

    async def push(self, local: PathLike, remote: str, *, recursive: bool = False,
                   preserve: bool = False, resume: bool = False, checksum: str = "sha256",
                   progress: Progress = None,
                   timeout: Optional[float] = None) -> QgaTransferResult:
        """Copy the local file ``local`` (``-``: stdin) to the guest path ``remote`` (a file, or
        an existing directory) through guest-file-write: written to a temporary name beside the
        target, checked against the guest's SHA-256 of it, then renamed (mv -f, argv) into place;
        on any failure the temporary file is removed. ``checksum`` is always sha256 here."""
        self._unsupported(recursive, preserve, resume)
        t = self.transport
        ct = check_timeout(timeout) or self.timeout
        local = str(local)
        if not isinstance(remote, str) or not remote.startswith("/"):
            raise ValueError("the guest path must be absolute, not %r" % (remote,))
        start = time.monotonic()
        if remote.endswith("/") or await self._is_dir(remote, ct):
            remote = remote.rstrip("/") + "/" + (os.path.basename(local) if local != "-" else "stdin")
        parent, name = os.path.split(remote)
        tmp = "%s/.%s.guestlink-%s.part" % (parent or "", name, secrets.token_hex(4))
        mode = 0o644
        if local == "-":
            src = sys.stdin.buffer
            total: Optional[int] = None
        else:
            src = open(local, "rb")
            st = os.fstat(src.fileno())
            total, mode = st.st_size, st.st_mode & 0o755  # as scp with umask 022
        h = hashlib.sha256()
        done = 0
        try:
            handle = await G.file_open(t, tmp, "w", ct)
            try:
                size = G.chunk_size(t)
                loop = asyncio.get_running_loop()
                while True:
                    chunk = await loop.run_in_executor(None, src.read, size)
                    if not chunk:
                        break
                    await G.file_write(t, handle, chunk, ct)
                    h.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            finally:
                await asyncio.shield(G.file_close(t, handle, ct))
            digest = h.hexdigest()
            theirs = await self._guest_sha256(tmp, ct)
            if theirs is not None and theirs != digest:
                raise E.ChecksumMismatch(codes.CHECKSUM_MISMATCH, "the guest's SHA-256 of %s "
                                         "differs from what was sent" % remote)
            # qemu-ga creates files 0666: give it the source's mode before it gets its name
            await self._check(["chmod", "%o" % mode, "--", tmp], ct)
            await self._check(["mv", "-f", "--", tmp, remote], ct)
        except BaseException:
            try:
                await asyncio.shield(G.run(t, ["rm", "-f", "--", tmp], timeout=10.0))
            except Exception:
                pass
            raise
        finally:
            if src is not sys.stdin.buffer:
                src.close()
        return QgaTransferResult(local, remote, done, time.monotonic() - start, "sha256", digest,
                                 1, 0, verified=theirs is not None)

    async def _is_dir(self, path: str, timeout: Optional[float]) -> bool:
        st = await G.run(self.transport, ["test", "-d", path], timeout=timeout)
        return st.exitcode == 0

    async def pull(self, remote: str, local: PathLike, *, recursive: bool = False,
                   preserve: bool = False, resume: bool = False, checksum: str = "sha256",
                   progress: Progress = None,
                   timeout: Optional[float] = None) -> QgaTransferResult:
        """Copy the guest's regular file ``remote`` to ``local`` (a path, an existing directory,
        or ``-`` for stdout) through guest-file-read, at most its size at the start (ENOSPC
        before anything is read when the host has no room), into a temporary file renamed into
        place once the guest's SHA-256 of ``remote`` matches what arrived; removed on any
        failure."""
        self._unsupported(recursive, preserve, resume)
        t = self.transport
        ct = check_timeout(timeout) or self.timeout
        local = str(local)
        start = time.monotonic()
        if local != "-" and os.path.isdir(local):
            local = os.path.join(local, os.path.basename(remote.rstrip("/")))
        out: Any
        tmp: Optional[str] = None
        if local == "-":
            out = sys.stdout.buffer
        else:
            parent, name = os.path.split(os.path.abspath(local))
            tmp = os.path.join(parent, ".%s.guestlink-%s.part" % (name, secrets.token_hex(4)))
            out = open(tmp, "xb")
        h = hashlib.sha256()
        done = 0
        try:
            handle = await G.file_open(t, remote, "r", ct)
            try:
                # only a regular file has an end that its size announces (not /dev/zero)
                if (await G.run(t, ["test", "-f", remote], timeout=ct)).exitcode != 0:
                    raise E.BadRequest(codes.BAD_REQUEST, "%s is not a regular file (qemu-ga "
                                       "copies regular files only)" % remote)
                total = await G.file_size(t, handle, ct)
                if tmp is not None and shutil.disk_usage(os.path.dirname(tmp)).free < total:
                    raise OSError(errno.ENOSPC, "%s: %d bytes do not fit (%s)" % (
                        local, total, os.strerror(errno.ENOSPC)))
                loop = asyncio.get_running_loop()
                # never more than the announced size: a file that grows meanwhile fails the
                # checksum below instead of filling the host's disk
                while done < total:
                    want = min(G.CHUNK, total - done)  # its reply stays under libvirt's cap
                    data, eof = await G.file_read(t, handle, want, ct)
                    if data:
                        await loop.run_in_executor(None, out.write, data)
                        h.update(data)
                        done += len(data)
                        if progress is not None:
                            progress(done, total)
                    if eof or not data:
                        break
            finally:
                await asyncio.shield(G.file_close(t, handle, ct))
            digest = h.hexdigest()
            theirs = await self._guest_sha256(remote, ct)
            if theirs is not None and theirs != digest:
                raise E.ChecksumMismatch(codes.CHECKSUM_MISMATCH, "the guest's SHA-256 of %s "
                                         "differs from what arrived (changed while copied?)" % remote)
            out.flush()
            if tmp is not None:
                os.fsync(out.fileno())
                out.close()
                os.replace(tmp, local)
                tmp = None
        finally:
            if tmp is not None:
                out.close()
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        return QgaTransferResult(remote, local, done, time.monotonic() - start, "sha256", digest,
                                 1, 0, verified=theirs is not None)

