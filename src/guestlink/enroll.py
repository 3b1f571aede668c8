"""Enroll a running VM: install guestlink's agent through qemu-guest-agent, start it, ping it.

``guestlink enroll`` (guestlink.cli.enroll) is this module's command line. The steps:

1. **Channels** (libvirt domains): the guestlink channels are added to the persistent definition
   and, where libvirt can hot-plug them, to the running domain (:func:`guestlink.libvirt.attach`,
   the machinery of ``guestlink libvirt attach``).
2. **Probe**, through qemu-ga's guest-exec: ``python3 -c`` :mod:`guestlink.image.bootstrap`
   (nothing written) reports python's version, the virtio_console driver and the digest of an
   installed agent; a guest without python3 >= 3.8 or the driver is refused here, before anything
   is written. When there is something to install, the probe also makes a private (0700,
   unpredictable) temp directory.
3. **Copy**: the agent zipapp goes into that directory with qemu-ga's guest-file-write.
4. **Install**: bootstrap ``run`` checks the zipapp's SHA-256 in the guest, then runs its
   ``guestlink-agent install --start`` -- the installer of ``guestlink image install``
   (guestlink.image.tree) on the guest's own root: the same files, the same manifest, so
   ``image status`` reads an enrolled disk the same and ``enroll --remove`` (the zipapp's
   ``remove --stop``) undoes exactly what was done. The same agent already installed: its own
   ``install --start`` runs (nothing copied, nothing changed, started if it was not running).
5. **Ping** over the guestlink channels until the agent answers.

Everything the guest prints is untrusted: read within :data:`MAX_REPLY` bytes, parsed as one JSON
object, checked field by field (:func:`parse_probe`, :func:`parse_result`), escaped when shown.
"""

import asyncio
import hashlib
import inspect
import json
import posixpath
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

from .exitcodes import EXIT_CONFIG, EXIT_DATAERR, EXIT_SOFTWARE, EXIT_TEMPFAIL
from .image import bootstrap
from .image.errors import ImageError
from .image.tree import AGENT_PYZ, INIT_KINDS, pyz_version
from .protocol.safetext import printable

#: the most of a guest program's stdout enroll reads (the results are a few hundred bytes)
MAX_REPLY = 64 * 1024
MIN_PYTHON = bootstrap.MIN_PYTHON
DEFAULT_PING_TIMEOUT = 60.0
#: guest-exec timeouts: the probe reads two small files; install may hash and fsync ~100 KiB
PROBE_TIMEOUT = 60.0
INSTALL_TIMEOUT = 120.0

_VERSION_RE = re.compile(r"\A(\d+)\.(\d+)\.(\d+)\Z")
_SHA_RE = re.compile(r"\A[0-9a-f]{64}\Z")
_TMPDIR_RE = re.compile(r"\A/[^\0\n]*/" + re.escape(bootstrap.PREFIX) + r"[A-Za-z0-9_]+\Z")
_MODULE_STATES = ("loaded", "built-in", "module")


class EnrollError(ImageError):
    """enroll failed: a one-line message and an exit status from guestlink.exitcodes (an
    installer's error, as guestlink image's, whose exit path it shares)."""


class GuestRefused(EnrollError):
    """The guest cannot run the agent (python3, virtio_console); nothing was written."""

    exit_code = EXIT_CONFIG


@dataclass
class ExecOutput:
    """What a guest program did: its exit status and (bounded) output."""

    exit_code: int
    stdout: bytes
    stderr: bytes


class GuestExec:
    """What enroll needs of qemu-guest-agent (guestlink.host.qga adapts to it): run a program and
    get its status and output; write a file. Errors are the transport's own exceptions."""

    async def run(self, argv: Sequence[str], timeout: float) -> ExecOutput:
        raise NotImplementedError

    async def write_file(self, path: str, data: bytes) -> None:
        raise NotImplementedError


class QgaExec(GuestExec):
    """:class:`GuestExec` over a qemu-ga transport (guestlink.host.qga: its raw socket or a
    libvirt domain's agent), with the validated calls of guestlink.host.qga.guest."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    async def run(self, argv: Sequence[str], timeout: float) -> ExecOutput:
        from .host.qga import guest as qg

        status = await qg.run(self.transport, argv, timeout=timeout)
        code = status.exitcode if status.exitcode is not None else 128 + (status.signal or 0)
        return ExecOutput(code, status.stdout, status.stderr)

    async def write_file(self, path: str, data: bytes) -> None:
        from .host.qga import guest as qg

        handle = await qg.file_open(self.transport, path, "wb")
        try:
            step = qg.chunk_size(self.transport)
            for at in range(0, len(data), step):
                await qg.file_write(self.transport, handle, data[at:at + step])
        finally:
            await qg.file_close(self.transport, handle)


@dataclass
class Probe:
    python: str
    executable: str
    virtio_console: Optional[str]
    installed_sha256: Optional[str]
    tmpdir: Optional[str]


@dataclass
class Outcome:
    """The result of :func:`enroll` / :func:`remove` (``as_dict`` is the ``--json`` output)."""

    action: str  # installed, upgraded, downgraded, reinstalled, unchanged, removed, absent
    summary: str
    version: Optional[str] = None
    previous_version: Optional[str] = None
    init: Optional[str] = None
    changed: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    python: Optional[str] = None
    virtio_console: Optional[str] = None
    channels: Optional[Dict[str, Any]] = None
    agent: Optional[Dict[str, Any]] = None
    steps: Dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


Progress = Callable[[str], None]
Waiter = Callable[[Dict[str, Any], float], Awaitable[Dict[str, Any]]]


def _quiet(line: str) -> None:
    pass


# --- what the guest says (untrusted) ---------------------------------------------------------

def _one_json_object(data: bytes, what: str) -> Dict[str, Any]:
    if len(data) > MAX_REPLY:
        raise EnrollError("%s printed more than %d bytes" % (what, MAX_REPLY), EXIT_DATAERR)
    text = data.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text.splitlines()[-1] if text else "",
                         parse_constant=lambda name: None)
    except (ValueError, RecursionError):
        raise EnrollError("%s printed no JSON result: %s" % (what, _excerpt(data)), EXIT_DATAERR)
    if not isinstance(obj, dict):
        raise EnrollError("%s printed no JSON object" % what, EXIT_DATAERR)
    return obj


def _excerpt(data: bytes, limit: int = 200) -> str:
    text = printable(data.decode("utf-8", "replace").strip())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _str(value: Any, limit: int = 4096) -> bool:
    return isinstance(value, str) and len(value) <= limit and "\0" not in value


def parse_probe(out: ExecOutput) -> Probe:
    """The probe's facts, each checked; an EnrollError for anything malformed."""
    obj = _one_json_object(out.stdout, "the guest's python3 (probe)")
    python, exe = obj.get("python"), obj.get("executable")
    vc, sha, tmp = obj.get("virtio_console"), obj.get("installed_sha256"), obj.get("tmpdir")
    bad = None
    if not (isinstance(python, str) and _str(python, 32) and _VERSION_RE.match(python)):
        bad = "python"
    elif not (isinstance(exe, str) and _str(exe) and exe.startswith("/") and exe.isprintable()):
        bad = "executable"
    elif vc is not None and vc not in _MODULE_STATES:
        bad = "virtio_console"
    elif sha is not None and not (isinstance(sha, str) and _SHA_RE.match(sha)):
        bad = "installed_sha256"
    elif tmp is not None and not (isinstance(tmp, str) and _str(tmp) and _TMPDIR_RE.match(tmp)
                                  and posixpath.normpath(tmp) == tmp):
        bad = "tmpdir"
    if bad:
        raise EnrollError("malformed probe result from the guest (field %s): %s"
                          % (bad, _excerpt(out.stdout)), EXIT_DATAERR)
    return Probe(str(python), str(exe), vc, sha, tmp)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= 1000 and all(_str(v) for v in value)


def parse_result(out: ExecOutput, action: str) -> Dict[str, Any]:
    """The in-guest installer's JSON result (install or remove), checked; its error as an
    EnrollError with its exit status."""
    what = "guestlink-agent %s in the guest" % action
    obj = _one_json_object(out.stdout, what)
    if "error" in obj:
        code = obj.get("exit_code")
        code = code if type(code) is int and 1 <= code <= 125 else EXIT_SOFTWARE
        message = obj["error"] if _str(obj["error"]) else "unknown error"
        raise EnrollError("%s failed: %s" % (what, printable(message)), code)
    if out.exit_code != 0:
        raise EnrollError("%s failed (exit %d): %s" % (what, out.exit_code,
                                                        _excerpt(out.stderr or out.stdout)))
    checks = {
        "action": lambda v: v == action,
        "summary": _str,
        "notes": _str_list,
        "version": lambda v: v is None or _str(v, 256),
    }
    if action == "install":
        checks.update(changed=_str_list, init=lambda v: v in INIT_KINDS,
                      previous_version=lambda v: v is None or _str(v, 256))
    else:
        checks.update(removed=lambda v: isinstance(v, bool))
    for key, check in checks.items():
        if not check(obj.get(key)):
            raise EnrollError("malformed result from %s (field %s): %s"
                              % (what, key, _excerpt(out.stdout)), EXIT_DATAERR)
    return obj


# --- the steps ---------------------------------------------------------------------------------

def bootstrap_source() -> str:
    return inspect.getsource(bootstrap)


async def probe(qga: GuestExec, want_sha: str, need_driver: bool = True,
                python: str = "python3") -> Probe:
    """Step 2: facts about the guest; GuestRefused when it cannot run the agent."""
    argv = [python, "-c", bootstrap_source(), "probe", AGENT_PYZ, want_sha,
            "1" if need_driver else "0"]
    from .host import errors as E

    try:
        out = await qga.run(argv, PROBE_TIMEOUT)
    except E.RemoteNotFound:
        # qemu-ga could not start the program: for a plain "python3" that means there is none
        raise GuestRefused("the guest has no python3 (the guestlink agent needs python3 >= "
                           "%d.%d): nothing was written" % MIN_PYTHON) from None
    if out.exit_code != 0:
        raise GuestRefused("the guest has no usable python3 (`python3` exited with status %d%s; "
                           "the guestlink agent needs python3 >= %d.%d): nothing was written"
                           % ((out.exit_code, ": " + _excerpt(out.stderr, 120) if out.stderr
                               else "") + MIN_PYTHON))
    facts = parse_probe(out)
    version = tuple(int(n) for n in facts.python.split(".")[:2])
    if version < MIN_PYTHON:
        raise GuestRefused("the guest's python3 is %s; the guestlink agent needs python3 >= %d.%d: "
                           "nothing was written" % ((printable(facts.python),) + MIN_PYTHON))
    if need_driver and facts.virtio_console is None:
        raise GuestRefused("the guest kernel has no virtio_console driver (not loaded, not built "
                           "in, no module): the guestlink channels cannot work; nothing was "
                           "written")
    return facts


async def _copy_and_run(qga: GuestExec, facts: Probe, pyz: bytes, sha: str, args: List[str],
                        progress: Progress, steps: Dict[str, float]) -> ExecOutput:
    """Steps 3-4: the zipapp into the probe's private directory, then bootstrap ``run`` (verify,
    run, remove the directory). The directory is removed on a failure before that too."""
    assert facts.tmpdir is not None
    remote = facts.tmpdir + "/guestlink-agent.pyz"
    ran = False
    try:
        progress("copying the agent (%d KiB) through qemu-guest-agent" % (len(pyz) // 1024))
        t = time.monotonic()
        await qga.write_file(remote, pyz)
        steps["copy"] = time.monotonic() - t
        progress("verifying its SHA-256 in the guest and running it")
        t = time.monotonic()
        ran = True
        out = await qga.run([facts.executable, "-c", bootstrap_source(), "run", remote, sha]
                            + args, INSTALL_TIMEOUT)
        steps["run"] = time.monotonic() - t
        return out
    finally:
        if not ran:
            try:
                await qga.run([facts.executable, "-c", bootstrap_source(), "cleanup",
                               facts.tmpdir], PROBE_TIMEOUT)
            except Exception:  # the error that got us here matters more
                pass


async def wait_for_agent(connect_kw: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """Step 5: ping over the guestlink channels until the agent answers (or ``timeout``)."""
    from .host import errors as E
    from .host.client import connect

    deadline = time.monotonic() + timeout
    last: Optional[BaseException] = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise EnrollError("the agent was installed and started, but did not answer over the "
                              "guestlink channels within %g s (%s)"
                              % (timeout, printable(str(last)) if last else "no answer"),
                              EXIT_TEMPFAIL)
        try:
            # via guestlink only: an answer of the domain's qemu-ga (via="auto") proves nothing
            async with connect(timeout=min(5.0, left), reconnect=False, via="guestlink",
                               **connect_kw) as vm:
                rtt = await vm.ping(timeout=min(5.0, left))
                agent = vm.agent
                return {"version": agent.version if agent else None,
                        "hostname": agent.hostname if agent else None,
                        "ping_ms": round(rtt * 1000, 3)}
        except E.PermissionDenied:
            raise  # waiting will not change it (libvirt's sockets belong to its qemu user)
        except (E.GuestlinkError, OSError) as exc:
            last = exc
        await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def add_channels(domain: str, uri: Optional[str], ctl_name: Optional[str],
                 data_name: Optional[str], socket_dir: Optional[str] = None,
                 backend_: Any = None) -> Tuple[Dict[str, Any], bool]:
    """Step 1 for a libvirt domain: the guestlink channels where missing, in the persistent
    definition and (hot-plugged) the running domain -- guestlink.libvirt.attach, as ``guestlink
    libvirt attach``. Returns (attach's result, whether the running domain has them now): not
    when it has no virtio-serial controller, which libvirt cannot hot-plug (a note says so)."""
    from . import libvirt as L

    result = L.attach(domain, uri, ctl_name=ctl_name, data_name=data_name,
                      socket_dir=socket_dir, backend_=backend_)
    return dict(result), "live" in result


def _version_key(version: Optional[str]) -> Optional[Tuple[int, ...]]:
    if version is None or not re.match(r"\A\d+(\.\d+)*\Z", version):
        return None
    return tuple(int(n) for n in version.split("."))


def _install_args(init: Optional[str], ctl_name: Optional[str],
                  data_name: Optional[str]) -> List[str]:
    args = []
    for opt, value in (("--init", init), ("--ctl-name", ctl_name), ("--data-name", data_name)):
        if value:
            args += [opt, value]
    return args


async def enroll(qga: GuestExec, pyz: bytes, connect_kw: Dict[str, Any], *,
                 init: Optional[str] = None, ctl_name: Optional[str] = None,
                 data_name: Optional[str] = None, ping_timeout: float = DEFAULT_PING_TIMEOUT,
                 progress: Progress = _quiet,
                 channels: Optional[Dict[str, Any]] = None,
                 wait: Optional[Waiter] = None) -> Outcome:
    """Steps 2-5 (the channels, step 1, are the caller's: they depend on how the VM is run).
    ``wait`` replaces :func:`wait_for_agent` (unit tests have no guestlink channels)."""
    version = pyz_version(pyz)
    if version is None:
        raise EnrollError("the agent bundle is not a guestlink zipapp", EXIT_DATAERR)
    sha = hashlib.sha256(pyz).hexdigest()
    steps: Dict[str, float] = {}
    t0 = time.monotonic()
    progress("checking the guest through qemu-guest-agent (python3, virtio_console)")
    facts = await probe(qga, sha)
    steps["probe"] = time.monotonic() - t0
    args = ["install", "--sha256", sha, "--start", "--json"] + _install_args(init, ctl_name,
                                                                          data_name)
    if facts.tmpdir is None:  # this very agent is installed: its own installer checks and starts
        progress("agent %s already installed; checking its files and starting it"
                 % printable(version))
        t = time.monotonic()
        out = await qga.run([facts.executable, AGENT_PYZ] + args, INSTALL_TIMEOUT)
        steps["run"] = time.monotonic() - t
    else:
        out = await _copy_and_run(qga, facts, pyz, sha, args, progress, steps)
    result = parse_result(out, "install")
    progress("waiting for the agent to answer over the guestlink channels")
    t = time.monotonic()
    agent = await (wait or wait_for_agent)(connect_kw, ping_timeout)
    steps["first_ping"] = time.monotonic() - t
    steps["total"] = time.monotonic() - t0
    prev, changed = result.get("previous_version"), list(result["changed"])
    if facts.tmpdir is None and not changed:
        action, summary = "unchanged", "already enrolled (version %s), nothing changed" % version
    elif prev is None:
        action, summary = "installed", "enrolled: guestlink agent %s installed and running" % version
    elif prev != version:
        new_key, old_key = _version_key(version), _version_key(prev)
        verb = "downgraded" if new_key and old_key and new_key < old_key else "upgraded"
        action, summary = verb, "%s guestlink agent %s -> %s, restarted" % (
            verb, printable(prev), version)
    else:
        action, summary = "reinstalled", "guestlink agent %s: files updated, restarted" % version
    return Outcome(action=action, summary=summary, version=version, previous_version=prev,
                   init=result["init"], changed=changed, notes=list(result["notes"]),
                   python=facts.python, virtio_console=facts.virtio_console, channels=channels,
                   agent=agent, steps={k: round(v, 3) for k, v in steps.items()})


async def remove(qga: GuestExec, pyz: bytes, *, progress: Progress = _quiet,
                 channels: Optional[Dict[str, Any]] = None) -> Outcome:
    """Stop the agent and undo its install (the manifest's record), with this zipapp's
    ``guestlink-agent remove --stop`` run in the guest."""
    sha = hashlib.sha256(pyz).hexdigest()
    steps: Dict[str, float] = {}
    t0 = time.monotonic()
    progress("checking the guest through qemu-guest-agent")
    facts = await probe(qga, "-", need_driver=False)  # "-": no digest matches, a tmpdir is made
    steps["probe"] = time.monotonic() - t0
    out = await _copy_and_run(qga, facts, pyz, sha, ["remove", "--stop", "--json"], progress,
                              steps)
    result = parse_result(out, "remove")
    steps["total"] = time.monotonic() - t0
    return Outcome(action="removed" if result["removed"] else "absent",
                   summary=result["summary"], version=result.get("version"),
                   notes=list(result["notes"]), python=facts.python,
                   virtio_console=facts.virtio_console, channels=channels,
                   steps={k: round(v, 3) for k, v in steps.items()})

