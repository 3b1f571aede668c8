"""VMs on another hypervisor, reached through OpenSSH: libvirt ``qemu+ssh://`` URIs.

For ``DRIVER+ssh://[USER@]HOST[:PORT]/PATH[?keyfile=K&no_verify=1&known_hosts=F&socket=S]``
guestlink runs the ``ssh`` command itself, so the user's OpenSSH configuration, keys, agent and
jump hosts apply (``$GUESTLINK_SSH_CONFIG`` is passed as ``-F``):

* one ControlMaster per (user, host, port, options), with ControlPersist (:data:`PERSIST` s), its
  ControlPath in a private directory (:func:`private_dir`: ``$XDG_RUNTIME_DIR/guestlink``, else
  ``/tmp/guestlink-UID``; 0700, owned by this user, else refused);
* the remote libvirt socket (``socket=``, else the one that exists of ``virtqemud-sock`` and
  ``libvirt-sock`` under /var/run/libvirt) is forwarded through the master
  (``ssh -O forward -L LOCAL.sock:REMOTE.sock``, ``StreamLocalBindUnlink=yes``) and libvirt is
  asked through it (``DRIVER+unix:///PATH?socket=LOCAL.sock``): the lookup pays no handshake.
  Other paths than /system (a per-user /session) go to libvirt with the URI as given;
* the domain's channel sockets (paths on the hypervisor, from its live XML) are checked there
  and forwarded the same way; the client connects to the local ends.

So the first command pays one ssh handshake and a second one reuses the master. Each failure
names its hop: :class:`SshError` (ssh: unreachable, authentication, host key),
:class:`ForwardError` (socket: the forward failed, or the socket is not there), the libvirt
errors of :mod:`guestlink.libvirt` (domain unknown, not running), and the session's
(agent not answering).
"""

import fcntl
import hashlib
import os
import shlex
import stat
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import ConnectError

#: Seconds an idle ControlMaster stays (OpenSSH ControlPersist).
PERSIST = 600
#: Seconds for the ssh handshake (ConnectTimeout) and for any one ssh invocation.
CONNECT_TIMEOUT = 15
RUN_TIMEOUT = 60
#: The remote libvirt sockets tried for a .../system URI without ``socket=``, in order.
SYSTEM_SOCKETS = ("/var/run/libvirt/virtqemud-sock", "/var/run/libvirt/libvirt-sock")
SSH_CONFIG_ENV = "GUESTLINK_SSH_CONFIG"
#: Query parameters of libvirt's ssh transport that guestlink understands; others are refused.
KNOWN_PARAMS = ("keyfile", "no_verify", "known_hosts", "socket", "no_tty", "netcat", "mode",
                "command", "proxy")


class RemoteHopError(ConnectError):
    """A hop to a remote hypervisor failed (its message names which)."""


class SshError(RemoteHopError):
    """ssh could not reach or log in to the hypervisor."""


class ForwardError(RemoteHopError):
    """A socket on the hypervisor could not be forwarded (or is not there)."""


def is_ssh_uri(uri: Optional[str]) -> bool:
    if not uri:
        return False
    scheme = uri.split(":", 1)[0].lower()
    return scheme.endswith("+ssh")


def private_dir() -> str:
    """This user's private directory for control and forwarded sockets (created 0700)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        path = os.path.join(runtime, "guestlink")
    else:
        path = os.path.join(tempfile.gettempdir(), "guestlink-%d" % os.geteuid())
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise SshError("cannot create %s for ssh control sockets: %s"
                       % (path, exc.strerror or exc)) from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise SshError("%s is not a private directory of this user (owner uid %d, mode %o): "
                       "refusing to keep ssh control sockets there" % (
                           path, st.st_uid, stat.S_IMODE(st.st_mode)))
    return path


def _flag(value: Optional[str]) -> bool:
    return bool(value) and value not in ("0", "no", "false")


@dataclass(frozen=True)
class SshHop:
    """The ssh hop to one hypervisor, parsed from its libvirt URI."""

    uri: str
    driver: str
    host: str
    path: str
    user: Optional[str] = None
    port: Optional[int] = None
    keyfile: Optional[str] = None
    no_verify: bool = False
    known_hosts: Optional[str] = None
    socket: Optional[str] = None

    @classmethod
    def parse(cls, uri: str) -> "SshHop":
        try:
            parts = urllib.parse.urlsplit(uri)
            port = parts.port
        except ValueError as exc:
            raise ValueError("invalid libvirt URI %r: %s" % (uri, exc)) from None
        driver = parts.scheme.rsplit("+", 1)[0]
        host = parts.hostname
        if not host or not driver or parts.scheme.rsplit("+", 1)[1].lower() != "ssh":
            raise ValueError("invalid ssh URI %r: expected DRIVER+ssh://[USER@]HOST[:PORT]/PATH"
                             % uri)
        if host.startswith("-") or (parts.username or "").startswith("-"):
            raise ValueError("invalid ssh URI %r: a host or user may not start with -" % uri)
        params: Dict[str, str] = {}
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if key not in KNOWN_PARAMS:
                raise ValueError("unsupported parameter %r in libvirt URI %s" % (key, uri))
            params[key] = value
        return cls(uri=uri, driver=driver, host=host, path=parts.path or "/system",
                   user=urllib.parse.unquote(parts.username) if parts.username else None,
                   port=port, keyfile=params.get("keyfile") or None,
                   no_verify=_flag(params.get("no_verify")),
                   known_hosts=params.get("known_hosts") or None,
                   socket=params.get("socket") or None)

    # --- naming ---------------------------------------------------------------------------

    @property
    def where(self) -> str:
        """``user@host:port`` as a message names the hop."""
        return "%s%s%s" % (self.user + "@" if self.user else "", self.host,
                           ":%d" % self.port if self.port else "")

    def _key(self) -> str:
        ident = repr((self.user, self.host, self.port, self.keyfile, self.no_verify,
                      self.known_hosts, os.environ.get(SSH_CONFIG_ENV)))
        return hashlib.sha256(ident.encode()).hexdigest()[:16]

    @property
    def control_path(self) -> str:
        return os.path.join(private_dir(), "cm-%s" % self._key())

    def local_socket(self, remote: str) -> str:
        """The local end of the forward of ``remote`` (stable: a second command finds it)."""
        digest = hashlib.sha256(("%s\0%s" % (self._key(), remote)).encode()).hexdigest()[:16]
        return os.path.join(private_dir(), "fw-%s.sock" % digest)

    # --- ssh ------------------------------------------------------------------------------

    def ssh_args(self) -> List[str]:
        """``ssh`` and its options, without the destination."""
        args = ["ssh"]
        config = os.environ.get(SSH_CONFIG_ENV)
        if config:
            args += ["-F", config]
        args += ["-o", "ControlPath=" + self.control_path, "-o", "BatchMode=yes",
                 "-o", "ConnectTimeout=%d" % CONNECT_TIMEOUT]
        if self.port:
            args += ["-p", str(self.port)]
        if self.user:
            args += ["-l", self.user]
        if self.keyfile:
            args += ["-i", self.keyfile]
        if self.no_verify:
            args += ["-o", "StrictHostKeyChecking=no"]
        if self.known_hosts:
            args += ["-o", "UserKnownHostsFile=" + self.known_hosts]
        return args

    def manual_command(self) -> str:
        """The ssh command line a user can try by hand to test this hop."""
        args = ["ssh"] + [a for a in ("-p", str(self.port)) if self.port] + (
            ["-i", self.keyfile] if self.keyfile else []) + [
            (self.user + "@" if self.user else "") + self.host, "true"]
        return " ".join(shlex.quote(a) for a in args)

    def _ssh(self, extra: Sequence[str], remote: Sequence[str] = (),
             timeout: float = RUN_TIMEOUT) -> Tuple[int, str, str]:
        """Run ssh (through the master when one runs); (status, stdout, stderr). Its stderr goes
        to a file: a master that backgrounds itself keeps it open, a pipe would never end."""
        cmd = self.ssh_args() + list(extra) + ["--", self.host] + list(remote)
        with tempfile.TemporaryFile() as err:
            try:
                r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=err, timeout=timeout)
            except FileNotFoundError:
                raise SshError("ssh is not installed (apt-get install openssh-client); it is "
                               "needed for %s" % self.uri) from None
            except subprocess.TimeoutExpired:
                raise SshError("ssh to %s did not finish within %d s" % (self.where, timeout)) from None
            err.seek(0)
            stderr = err.read(65536).decode("utf-8", "replace")
        return r.returncode, r.stdout.decode("utf-8", "replace"), stderr

    def master_pid(self) -> Optional[int]:
        """The running ControlMaster's pid (``ssh -O check``), or None."""
        rc, _, err = self._ssh(["-O", "check"])
        if rc != 0:
            return None
        # "Master running (pid=1234)"
        try:
            return int(err.split("pid=", 1)[1].split(")", 1)[0])
        except (IndexError, ValueError):
            return None

    def ensure_master(self) -> int:
        """Start the ControlMaster unless one runs (one at a time: a lock next to it); its pid.
        Remembered in this process for :data:`MASTER_MEMO` seconds (the CLI resolves twice)."""
        memo = _masters.get(self.control_path)
        if memo is not None and time.monotonic() - memo[1] < MASTER_MEMO:
            return memo[0]
        with open(self.control_path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            pid = self.master_pid()
            if pid is None:
                rc, _, err = self._ssh(["-o", "ControlMaster=yes", "-o",
                                        "ControlPersist=%d" % PERSIST, "-o",
                                        "StreamLocalBindUnlink=yes", "-o",
                                        "ServerAliveInterval=30", "-f", "-N"])
                if rc != 0:
                    raise SshError("ssh to %s failed: %s" % (self.where, _last_line(err, rc)))
                pid = self.master_pid()
                if pid is None:
                    raise SshError("ssh to %s: the control master did not start" % self.where)
        _masters[self.control_path] = (pid, time.monotonic())
        return pid

    def _forwarded(self, remote: str, master: int) -> bool:
        """Did this master already forward ``remote`` after checking it exists (a marker file
        next to the local socket names the master)?"""
        try:
            with open(self.local_socket(remote) + ".ok") as f:
                return f.read().strip() == str(master) and os.path.exists(self.local_socket(remote))
        except (OSError, ValueError):
            return False

    def _mark_forwarded(self, remote: str, master: int) -> None:
        marker = self.local_socket(remote) + ".ok"
        with open(marker + ".tmp", "w") as f:
            f.write("%d\n" % master)
        os.replace(marker + ".tmp", marker)

    def checked_forward(self, candidates: Sequence[str], what: str,
                        hint: str = "") -> Tuple[str, str]:
        """The first of ``candidates`` that is a socket on the hypervisor, forwarded: (remote,
        local). The check costs a remote shell; a forward the running master already made after
        its check is reused without one (so a second command pays only ``ssh -O check``)."""
        master = self.ensure_master()
        for remote in candidates:
            if self._forwarded(remote, master):
                return remote, self.local_socket(remote)
        missing = self.missing_sockets(candidates)
        present = [c for c in candidates if c not in missing]
        if not present:
            raise ForwardError("socket: no %s on %s (looked for %s)%s"
                               % (what, self.where, ", ".join(candidates), hint))
        local = self.forward(present[0])
        self._mark_forwarded(present[0], master)
        return present[0], local

    def run(self, command: Sequence[str]) -> Tuple[int, str, str]:
        """Run ``command`` (argv, quoted for the remote shell) on the hypervisor via the master."""
        rc, out, err = self._ssh([], [" ".join(shlex.quote(c) for c in command)])
        if rc == 255:
            raise SshError("ssh to %s failed: %s" % (self.where, _last_line(err, rc)))
        return rc, out, err

    def forward(self, remote: str) -> str:
        """Forward the hypervisor's unix socket ``remote`` to a local one; its path."""
        if (not remote.startswith("/") or ":" in remote
                or any(ord(c) < 0x20 or ord(c) == 0x7F for c in remote)):
            # ssh -L splits at ':'; a relative path would be relative to sshd's directory
            raise ForwardError("socket: cannot forward %r from %s: ssh forwards only absolute "
                               "socket paths without ':' or control characters"
                               % (remote, self.where))
        local = self.local_socket(remote)
        rc, _, err = self._ssh(["-O", "forward", "-L", "%s:%s" % (local, remote)])
        if rc != 0:
            raise ForwardError("socket: cannot forward %s from %s over ssh: %s"
                               % (remote, self.where, _last_line(err, rc)))
        return local

    def missing_sockets(self, paths: Sequence[str]) -> List[str]:
        """Which of ``paths`` are not sockets on the hypervisor (one remote shell)."""
        script = 'for p in "$@"; do [ -S "$p" ] || printf "%s\\n" "$p"; done'
        rc, out, err = self.run(["sh", "-c", script, "sh"] + list(paths))
        if rc != 0:
            raise ForwardError("socket: cannot check %s on %s: %s"
                               % (" ".join(paths), self.where, _last_line(err, rc)))
        return [p for p in out.splitlines() if p]

    # --- libvirt --------------------------------------------------------------------------

    def libvirt_uri(self) -> str:
        """The URI libvirt is asked with: through the forwarded remote libvirt socket for
        ``/system``; the URI as given otherwise (libvirt then runs its own ssh)."""
        if self.path.rstrip("/") != "/system" and not self.socket:
            return self.uri
        candidates = (self.socket,) if self.socket else SYSTEM_SOCKETS
        _, local = self.checked_forward(candidates, "libvirt daemon socket",
                                        ": is libvirtd (or virtqemud) running there?")
        return "%s+unix://%s?socket=%s" % (self.driver, self.path,
                                           urllib.parse.quote(local, safe="/"))

    def channel_sockets(self, ctl: str, data: Optional[str]) -> Tuple[str, Optional[str]]:
        """Forward the domain's channel sockets (paths on the hypervisor); the local paths."""
        master = self.ensure_master()
        wanted = [ctl] + ([data] if data else [])
        todo = [p for p in wanted if not self._forwarded(p, master)]
        missing = self.missing_sockets(todo) if todo else []
        if ctl in missing:
            raise ForwardError("socket: no control channel socket %s on %s: is the domain "
                               "running?" % (ctl, self.where))
        local: Dict[str, Optional[str]] = {}
        for path in wanted:
            if path in missing:
                local[path] = None  # file transfers will say the data channel is missing
            elif path in todo:
                local[path] = self.forward(path)
                self._mark_forwarded(path, master)
            else:
                local[path] = self.local_socket(path)
        local_ctl = local[ctl]
        assert local_ctl is not None
        return local_ctl, local[data] if data else None


#: control path -> (master pid, when checked): ensure_master's memo in this process.
_masters: Dict[str, Tuple[int, float]] = {}
MASTER_MEMO = 5.0


def _last_line(stderr: str, rc: int) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else "ssh exited with status %d" % rc
