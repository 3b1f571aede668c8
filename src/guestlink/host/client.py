"""asyncio client for a guestlink agent, over the VM's control socket (a QEMU unix chardev).

::

    async with guestlink.connect(ctl="/run/vm1/ctl.sock", data="/run/vm1/data.sock") as vm:
        print(vm.agent.hostname, await vm.ping())
        result = await vm.run(["uname", "-r"], check=True)
        async with vm.exec(["cat"], stdin=True) as proc:
            await proc.write(b"hello")
            await proc.close_stdin()
            async for stream, data in proc.output():
                ...
        async for msg in vm.subscribe("events"):
            ...

:class:`Client` holds the verbs; the connection under them (run state, handshake, pending
requests, reconnection, deadlines) is its :class:`~guestlink.host.session.Session`. Commands are
in :mod:`.execs`, topic messages in :mod:`.messages`, files in :mod:`.transfer`, the options in
:mod:`.options`, timeouts in :mod:`.timing`; their public names are importable from here too.
"""

import asyncio
import collections
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Generator, Optional, Set, Tuple, Union

from ..protocol import Fields, ProtocolViolation
from ..protocol import messages as m
from ..protocol.frames import MAX_ID
from . import errors as E
from .agentinfo import AgentInfo, parse_info
from .execs import Command, CompletedProcess, Process, run_collected
from .messages import Message, Subscription
from .options import (DEFAULT_OUTPUT_LIMIT, DEFAULT_QUEUE_SIZE, VIA_AUTO, VIA_GUESTLINK, VIA_QGA,
                      ConnectOptions, ExecOptions, PathLike, check_call, check_publish)
from .session import Call, Resolver, Runstate, Session
from .timing import DEFAULT_TIMEOUT, MAX_TIMEOUT, check_timeout, wait_within

if TYPE_CHECKING:  # pragma: no cover
    from .qga import QgaClient
    from .transfer import TransferResult

#: via="auto": how long guestlink's agent gets to complete the handshake before qemu-ga is tried
#: (a running agent answers in milliseconds; the client's own timeout when that is shorter)
AUTO_PROBE_TIMEOUT = 2.0

__all__ = ["connect", "Client", "AgentInfo", "CompletedProcess", "ConnectOptions", "ExecOptions",
           "Message", "Process", "Runstate", "Subscription", "check_timeout", "wait_within",
           "DEFAULT_TIMEOUT", "DEFAULT_OUTPUT_LIMIT", "DEFAULT_QUEUE_SIZE", "MAX_TIMEOUT"]


def connect(ctl: Optional[PathLike] = None, data: Optional[PathLike] = None, *,
            domain: Optional[str] = None, uri: Optional[str] = None,
            ctl_name: Optional[str] = None, data_name: Optional[str] = None,
            timeout: Optional[float] = DEFAULT_TIMEOUT, reconnect: bool = True,
            max_payload: Optional[int] = None, queue_size: int = DEFAULT_QUEUE_SIZE,
            queue_timeout: Optional[float] = None,
            on_queue: Optional[Callable[[str], Any]] = None,
            master: Optional[bool] = None, persist: Optional[float] = None,
            via: str = VIA_AUTO, qga: Optional[PathLike] = None) -> "Connector":
    """Connect to the agent of one VM.

    ``ctl`` is the control channel's unix socket, ``data`` the data channel's (kept for file
    transfer; not opened yet). Or ``domain``: a libvirt domain name or UUID (``uri`` as virsh's
    ``--connect``; default $LIBVIRT_DEFAULT_URI, else qemu:///system) whose live XML gives both
    paths, read again before every (re)connection (see :mod:`guestlink.libvirt`; its errors are
    ConnectErrors); its channels are named ``ctl_name``/``data_name`` when given, else as recorded
    in the domain's guestlink metadata, else org.guestlink.ctl/.data. ``timeout`` is the
    handshake timeout and every verb's default timeout (None: no limit). With ``reconnect=True``
    the client re-opens the socket with backoff after it breaks and calls made meanwhile wait for
    it up to their timeout.

    A VM serves one client at a time (QEMU's chardev accepts one connection): while another
    guestlink client is connected to it, this one waits its turn (:mod:`guestlink.host.vmlock`),
    calling ``on_queue(holder)`` once with a description of that client, for at most
    ``queue_timeout`` seconds (None: no limit; then VMInUse).

    ``master``: go through this user's guestlink master (docs/master.md), which holds the VM's
    session and serves any number of clients at once: None (the default) uses one when it is
    running, True also starts one when none is (it stays ``persist`` seconds after its last
    client; default $GUESTLINK_PERSIST, else 60), False never does; ``persist`` > 0 with None
    starts one too. $GUESTLINK_MASTER=0 turns it off. Without a master everything works as above.

    ``via``: ``"guestlink"`` (only guestlink's agent), ``"qga"`` (only qemu-guest-agent, see
    :mod:`guestlink.host.qga`: the domain's through libvirt, or the socket ``qga`` of a plain QEMU
    VM) or ``"auto"`` (the default): guestlink's agent when its channels exist and it completes
    the handshake within AUTO_PROBE_TIMEOUT seconds, else qemu-ga when there is a way to it. The
    result's ``via`` says which; a :class:`~guestlink.host.qga.QgaClient` has the same verbs
    (with qemu-ga's limits) and ``fallback_reason``. When the fallback fails too, the error is
    guestlink's, its message extended with qemu-ga's.

    Use as ``async with connect(...) as vm:`` or ``vm = await connect(...)`` (then ``await
    vm.close()``). The arguments make a :class:`~guestlink.host.options.ConnectOptions`;
    :func:`connect_with` takes one.
    """
    return connect_with(ConnectOptions(
        ctl=ctl, data=data, domain=domain, uri=uri, ctl_name=ctl_name, data_name=data_name,
        timeout=timeout, reconnect=reconnect, max_payload=max_payload, queue_size=queue_size,
        queue_timeout=queue_timeout, on_queue=on_queue,
        master=master, persist=persist, via=via, qga=qga))


def connect_with(options: ConnectOptions) -> "Connector":
    """:func:`connect` with its arguments as a :class:`~guestlink.host.options.ConnectOptions`."""
    resolver: Optional[Resolver] = None
    if options.domain is not None:
        from ..libvirt import resolver as libvirt_resolver

        resolver = libvirt_resolver(options.domain, options.uri, options.ctl_name,
                                    options.data_name)
    return Connector(options, resolver)


#: What connect() gives: guestlink's client, or qemu-ga's with the same verbs.
AnyClient = Union["Client", "QgaClient"]


class _FirstResolved:
    """A domain's resolver whose first answer can be fetched ahead (:meth:`prefetch`); the next
    call returns it, later calls resolve afresh (reconnections follow the domain)."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.domain = getattr(resolver, "domain", None)  # for a caller's messages, as resolver's
        self._first: Optional[Tuple[Optional[str], Optional[str]]] = None

    def prefetch(self) -> None:
        self._first = self.resolver()

    def __call__(self) -> Tuple[Optional[str], Optional[str]]:
        first, self._first = self._first, None
        return first if first is not None else self.resolver()


class Connector:
    """What :func:`connect` returns: await it (-> the connected :class:`Client` or
    :class:`~guestlink.host.qga.QgaClient`) or use it as ``async with`` (closing it at the end).
    ``client`` is the guestlink Client it starts with."""

    def __init__(self, options: ConnectOptions, resolver: Optional[Resolver] = None) -> None:
        self.options = options
        self._client: Optional[Client] = None
        self._queued = False  # the guestlink client is waiting its turn for the VM (vmlock)
        self._resolver = _FirstResolved(resolver) if resolver is not None else None
        if options.via != VIA_QGA and (options.ctl or options.domain is not None):
            self._client = Client(options.replace(on_queue=self._on_queue), self._resolver)
        self._opened: Optional[AnyClient] = None

    def _on_queue(self, holder: str) -> None:
        self._queued = True
        if self.options.on_queue is not None:
            self.options.on_queue(holder)

    @property
    def client(self) -> "Client":
        """The guestlink Client (ValueError when only qemu-ga was asked for)."""
        if self._client is None:
            raise ValueError("this connection uses only qemu-ga (via=\"qga\"): no guestlink client")
        return self._client

    def __await__(self) -> Generator[Any, None, AnyClient]:
        return self._open().__await__()

    async def __aenter__(self) -> AnyClient:
        return await self._open()

    async def __aexit__(self, *exc: object) -> None:
        if self._opened is not None:
            await self._opened.close()

    async def _open(self) -> AnyClient:
        from .qga import QgaClient

        options, client = self.options, self._client
        if client is None:  # via="qga", or "auto" given only the qemu-ga socket
            self._opened = await QgaClient(options).connect()
            return self._opened
        if options.via == VIA_GUESTLINK or (not options.qga and options.domain is None):
            # no way to qemu-ga: as before the fallback existed, with the full handshake timeout
            self._opened = await client.connect()
            return self._opened
        probe = AUTO_PROBE_TIMEOUT if options.timeout is None else min(options.timeout,
                                                                      AUTO_PROBE_TIMEOUT)
        reason: BaseException
        timed_out = False
        try:
            if self._resolver is not None:
                # the domain's lookup (libvirt; over ssh for a qemu+ssh:// URI, a new hop
                # takes ~1 s) comes before the probe: it is not the agent's answer time
                await asyncio.get_running_loop().run_in_executor(None, self._resolver.prefetch)
            if await self._probe(client, probe):
                self._opened = client
                return client
            reason = E.AgentNotResponding(
                "the guest agent did not answer on %s within %g s" % (client.ctl, probe))
            timed_out = True
        except E.GuestlinkError as exc:
            if not E.qga_may_help(exc):
                raise
            reason = exc
        await client.close()
        try:
            self._opened = await QgaClient(options, reason=reason).connect()
        except E.GuestlinkError as qexc:
            if timed_out:
                # guestlink's channel is there but silent, and qemu-ga does not help (absent, or
                # silent too: a booting VM): wait for guestlink's agent as long as asked
                self._client = Client(options.replace(on_queue=self._on_queue), self._resolver)
                self._opened = await self._client.connect()
                return self._opened
            err = E.copy_error(reason)
            err.args = ("%s; the qemu-ga fallback failed too: %s" % (reason, qexc),)
            raise err from None
        return self._opened

    async def _probe(self, client: "Client", probe: float) -> bool:
        """Connect ``client``, giving its handshake ``probe`` seconds -> True, or False (given
        up). Time spent waiting its turn behind another guestlink client does not count: a VM
        in use is not a VM without guestlink."""
        task = asyncio.ensure_future(client.connect())
        try:
            done, _ = await asyncio.wait({task}, timeout=probe)
            if not done and self._queued:  # the lock is taken at once, so this is known by now
                done, _ = await asyncio.wait({task})  # queue_timeout and timeout still apply
        except BaseException:
            task.cancel()
            raise
        if not done:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, E.GuestlinkError):
                pass
            return False
        task.result()
        return True


class Client:
    """A connection to one guest agent. Create it with :func:`connect`."""

    #: which agent this client talks to (a QgaClient says "qga")
    via = VIA_GUESTLINK
    #: why another agent was used instead (only a QgaClient has one)
    fallback_reason: Optional[BaseException] = None

    def __init__(self, options: ConnectOptions, resolver: Optional[Resolver] = None) -> None:
        self._queue_size = options.queue_size
        self._subs: Dict[str, Set[Subscription]] = collections.defaultdict(set)
        #: The data channel of :mod:`guestlink.host.transfer`, opened on first use; reset on close.
        self.datalink: Any = None
        self.session = Session(options, resolver, on_message=self._deliver_message,
                               on_gone=self._end_subscriptions)

    # --- public state ---------------------------------------------------------------------

    @property
    def ctl(self) -> Optional[str]:
        return self.session.ctl

    @property
    def data(self) -> Optional[str]:
        return self.session.data

    @property
    def timeout(self) -> Optional[float]:
        return self.session.timeout

    @property
    def reconnect(self) -> bool:
        return self.session.reconnect

    @property
    def queue_timeout(self) -> Optional[float]:
        return self.session.queue_timeout

    @property
    def stats(self) -> "collections.Counter[str]":
        return self.session.stats

    @property
    def runstate(self) -> Runstate:
        return self.session.runstate

    @property
    def agent(self) -> Optional[AgentInfo]:
        """:class:`AgentInfo` of the agent from the latest handshake."""
        return self.session.agent

    @property
    def connected(self) -> bool:
        return self.session.runstate is Runstate.RUNNING

    def __repr__(self) -> str:
        return "<guestlink.Client %s %s>" % (self.ctl, self.runstate.value)

    async def __aenter__(self) -> "Client":
        if self.runstate is Runstate.IDLE:
            await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> "Client":
        """Open the socket and perform the handshake; returns self."""
        await self.session.open()
        return self

    async def close(self) -> None:
        """Close the connection; pending requests fail, subscriptions end."""
        if self.datalink is not None and self.runstate not in (Runstate.IDLE, Runstate.CLOSED):
            self.datalink.reset()
        await self.session.close()

    # --- verbs ------------------------------------------------------------------------------

    async def ping(self, *, timeout: Optional[float] = None) -> float:
        """Round-trip a ping; returns the round-trip time in seconds."""
        start = time.monotonic()
        reply = await self.session.idempotent_request("ping", {}, timeout)
        if reply.get("pong") is not True:
            raise E.ProtocolError("malformed ping reply from the agent: no \"pong\": true")
        return time.monotonic() - start

    async def info(self, *, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The agent's description of the guest (validated dict, see docs/protocol.md), plus
        ``via``: "guestlink"."""
        reply = await self.session.idempotent_request("info", {}, timeout)
        try:
            info = parse_info(reply)
        except ProtocolViolation as exc:
            raise E.malformed("info reply", exc) from None
        info["via"] = self.via
        return info

    async def call(self, op: str, args: Optional[Dict[str, Any]] = None, /, *,
                   timeout: Optional[float] = None, **kwargs: Any) -> Dict[str, Any]:
        """Call a user-defined agent command: ``await vm.call("greet", name="x")`` -> dict.

        Arguments named like a keyword of this method can be passed as a dict positionally.
        """
        return await self.session.request(op, check_call(op, args, kwargs), timeout)

    async def shutdown(self, *, timeout: Optional[float] = None) -> None:
        """Ask the guest to power off (the agent answers first)."""
        await self.session.request("shutdown", {}, timeout)

    async def reboot(self, *, timeout: Optional[float] = None) -> None:
        """Ask the guest to reboot (the agent answers first)."""
        await self.session.request("reboot", {}, timeout)

    # --- messages ---------------------------------------------------------------------------

    async def publish(self, topic: str, data: Any, *, timeout: Optional[float] = None) -> int:
        """Send a topic message to the guest; returns how many local subscribers got it."""
        data = check_publish(topic, data)
        session = self.session
        deadline = session.deadline(timeout)
        call = Call("publish")
        await session.send_call(call, lambda id_: m.encode_message(topic, data, id=id_), deadline)
        payload = await session.await_reply(call, deadline, "publish")
        try:
            reply = Fields(m.parse_response(payload), "publish reply")
            return reply.int("delivered", min=0, max=MAX_ID)
        except ProtocolViolation as exc:
            raise E.malformed("publish reply", exc) from None

    def subscribe(self, topic: str, *, queue_size: Optional[int] = None) -> Subscription:
        """Receive the guest's messages on ``topic`` (exact match).

        Returns a :class:`Subscription`, registered at once: use ``async for msg in
        vm.subscribe(t)``, ``async with vm.subscribe(t) as sub``, or ``await sub.get()``. Each
        subscription buffers at most ``queue_size`` messages; when full the OLDEST is dropped and
        ``sub.dropped`` counts it. It stays registered until ``sub.close()``, the end of its
        ``async with`` block, or the client's close (breaking out of ``async for`` does not
        unregister it). Messages that arrive while the connection is down are lost.
        """
        try:
            m.check_topic(topic)
        except ProtocolViolation as exc:
            raise ValueError(str(exc)) from None
        sub = Subscription(topic, queue_size or self._queue_size, self._unsubscribe)
        state = self.runstate
        if state in (Runstate.CLOSED, Runstate.DISCONNECTED):
            sub.finish(self.session.last_error if state is Runstate.DISCONNECTED else None)
        else:
            self._subs[topic].add(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.topic)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.topic]

    def _deliver_message(self, topic: str, data: bytes) -> None:
        msg = Message(topic, data)
        for sub in list(self._subs.get(topic, ())):
            sub.deliver(msg)

    def _end_subscriptions(self, error: Optional[BaseException]) -> None:
        """The connection is gone for good (``error``) or closed (None): every subscription ends."""
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.finish(error)
        self._subs.clear()

    # --- commands -----------------------------------------------------------------------------

    def exec(self, cmd: Command, *, stdin: bool = False, timeout: Optional[float] = None,
             env: Optional[Dict[str, str]] = None, env_clear: bool = False,
             cwd: Optional[PathLike] = None, shell: Optional[bool] = None,
             output_limit: Optional[int] = DEFAULT_OUTPUT_LIMIT,
             call_timeout: Optional[float] = None, user: Optional[str] = None) -> Process:
        """Start a command in the guest with streamed I/O; use as ``async with vm.exec(...) as p``.

        ``cmd``: a list (argv) or a str (shell command line). ``shell=True`` runs a list through the
        shell (joined with shlex), ``shell=False`` splits a str into argv. ``timeout``: the
        command's own time limit (killed by the agent; the result says ``timed_out``).
        ``call_timeout``: limit for the agent to start it (default: the client's timeout).
        ``user``: run as this guest user, with their groups (needs a root agent). The command gets
        a login-like environment for its user (HOME, USER, LOGNAME, SHELL, PATH, LANG=C.UTF-8),
        ``env`` on top (``env_clear``: only ``env``); ``cwd`` defaults to /.
        Leaving the ``async with`` block before the command finished cancels it remotely.
        """
        return self.exec_with(cmd, ExecOptions(
            stdin=stdin, timeout=timeout, env=env, env_clear=env_clear, cwd=cwd, shell=shell,
            output_limit=output_limit, call_timeout=call_timeout, user=user))

    def exec_with(self, cmd: Command, options: ExecOptions) -> Process:
        """:meth:`exec` with its options as an :class:`~guestlink.host.options.ExecOptions`."""
        return Process(self.session, cmd, options)

    async def run(self, cmd: Command, *, check: bool = False, timeout: Optional[float] = None,
                  input: Optional[Any] = None, env: Optional[Dict[str, str]] = None,
                  cwd: Optional[PathLike] = None, shell: Optional[bool] = None,
                  env_clear: bool = False, output_limit: Optional[int] = DEFAULT_OUTPUT_LIMIT,
                  call_timeout: Optional[float] = None,
                  user: Optional[str] = None) -> CompletedProcess:
        """Run a command in the guest and collect its output -> :class:`CompletedProcess`.

        ``input`` (bytes or str) is fed to its stdin (otherwise stdin is /dev/null). Output beyond
        ``output_limit`` bytes per stream is dropped and flagged ``stdout_truncated`` /
        ``stderr_truncated``. Raises CommandTimedOut (with the partial output) when ``timeout``
        expired, and CommandFailed on a non-zero status when ``check`` is true. ``user``, ``env``,
        ``cwd``: as for :meth:`exec`.
        """
        options = ExecOptions(stdin=input is not None, timeout=timeout, env=env,
                              env_clear=env_clear, cwd=cwd, shell=shell,
                              output_limit=output_limit, call_timeout=call_timeout, user=user)
        return await run_collected(self, cmd, options, input, check)

    # --- files (guestlink.host.transfer) ---------------------------------------------------

    async def push(self, local: PathLike, remote: str, *, recursive: bool = False,
                   preserve: bool = False, resume: bool = False, checksum: str = "sha256",
                   progress: Optional[Callable[[int, Optional[int]], Any]] = None,
                   timeout: Optional[float] = None) -> "TransferResult":
        """Copy ``local`` (a file, ``-`` for stdin, or a directory with ``recursive``) to the
        guest path ``remote`` over the data channel -> TransferResult. ``progress(done, total)``
        is called in the event loop (total is None for a stream)."""
        from . import transfer
        check_timeout(timeout)
        return await transfer.push(self, str(local), str(remote), recursive=recursive,
                                   preserve=preserve, resume=resume, checksum=checksum,
                                   progress=progress, timeout=timeout)

    async def pull(self, remote: str, local: PathLike, *, recursive: bool = False,
                   preserve: bool = False, resume: bool = False, checksum: str = "sha256",
                   progress: Optional[Callable[[int, Optional[int]], Any]] = None,
                   timeout: Optional[float] = None) -> "TransferResult":
        """Copy the guest path ``remote`` to ``local`` (a path, an existing directory, or ``-``
        for stdout) -> TransferResult. Same options as :meth:`push`."""
        from . import transfer
        check_timeout(timeout)
        return await transfer.pull(self, str(remote), str(local), recursive=recursive,
                                   preserve=preserve, resume=resume, checksum=checksum,
                                   progress=progress, timeout=timeout)
