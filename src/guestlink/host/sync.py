"""Synchronous facade over the asyncio client, for scripts and REPLs.

::

    import guestlink.sync

    with guestlink.sync.connect(ctl="/run/vm1/ctl.sock", data="/run/vm1/data.sock") as vm:
        print(vm.ping(), vm.run(["uname", "-r"], check=True).stdout)
        with vm.exec(["cat"], stdin=True) as proc:
            proc.write(b"hi")
            proc.close_stdin()
            for stream, data in proc.output():
                ...
        for msg in vm.subscribe("events"):
            ...

Same verbs, arguments, results and exceptions as :class:`guestlink.host.client.Client`. Each
client runs its own event loop in a background (daemon) thread; calls block the calling thread.
Ctrl-C (KeyboardInterrupt) while a call blocks cancels it on the loop; inside ``with vm.exec()``
leaving the block cancels the remote command.
"""

import asyncio
import collections
import threading
from typing import (TYPE_CHECKING, Any, Callable, Coroutine, Dict, Iterator, Optional, Tuple,
                    TypeVar, Union)

from .agentinfo import AgentInfo
from .client import Client, connect_with
from .execs import Command, CompletedProcess, Process
from .messages import Message, Subscription
from .options import PathLike
from .session import Runstate

if TYPE_CHECKING:  # pragma: no cover
    from .transfer import TransferResult
from .options import DEFAULT_OUTPUT_LIMIT, DEFAULT_QUEUE_SIZE, ConnectOptions, ExecOptions
from .timing import DEFAULT_TIMEOUT

__all__ = ["connect", "SyncClient", "SyncProcess", "SyncSubscription"]

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="guestlink-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            if not future.done():  # KeyboardInterrupt or similar in this thread
                future.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


def connect(ctl: Optional[PathLike] = None, data: Optional[PathLike] = None, *,
            domain: Optional[str] = None, uri: Optional[str] = None,
            ctl_name: Optional[str] = None, data_name: Optional[str] = None,
            timeout: Optional[float] = DEFAULT_TIMEOUT, reconnect: bool = True,
            max_payload: Optional[int] = None, queue_size: int = DEFAULT_QUEUE_SIZE,
            queue_timeout: Optional[float] = None,
            on_queue: Optional[Callable[[str], Any]] = None,
            master: Optional[bool] = None, persist: Optional[float] = None) -> "SyncClient":
    """Connect (blocking) and return a :class:`SyncClient`; use it as a context manager.
    ``domain``/``uri``: a libvirt domain instead of socket paths, ``ctl_name``/``data_name`` its
    channel names (default: its guestlink metadata's, else the defaults); ``queue_timeout``/
    ``on_queue``: waiting for another client of the VM (all as the asyncio connect())."""
    lt = _LoopThread()
    try:
        client = connect_with(ConnectOptions(
            ctl=ctl, data=data, domain=domain, uri=uri, ctl_name=ctl_name, data_name=data_name,
            timeout=timeout, reconnect=reconnect, max_payload=max_payload, queue_size=queue_size,
            queue_timeout=queue_timeout, on_queue=on_queue,
        master=master, persist=persist)).client
        lt.run(client.connect())
    except BaseException:
        lt.close()
        raise
    return SyncClient(lt, client)


class SyncClient:
    """Blocking twin of :class:`guestlink.host.client.Client`."""

    def __init__(self, lt: _LoopThread, client: Client) -> None:
        self._lt = lt
        self._client = client

    @property
    def agent(self) -> Optional[AgentInfo]:
        return self._client.agent

    @property
    def runstate(self) -> Runstate:
        return self._client.runstate

    @property
    def stats(self) -> "collections.Counter[str]":
        return self._client.stats

    @property
    def connected(self) -> bool:
        return self._client.connected

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._lt.loop.is_closed():
            try:
                self._lt.run(self._client.close())
            finally:
                self._lt.close()

    def ping(self, *, timeout: Optional[float] = None) -> float:
        return self._lt.run(self._client.ping(timeout=timeout))

    def info(self, *, timeout: Optional[float] = None) -> Dict[str, Any]:
        return self._lt.run(self._client.info(timeout=timeout))

    def call(self, op: str, args: Optional[Dict[str, Any]] = None, /, *,
             timeout: Optional[float] = None, **kwargs: Any) -> Dict[str, Any]:
        return self._lt.run(self._client.call(op, args, timeout=timeout, **kwargs))

    def shutdown(self, *, timeout: Optional[float] = None) -> None:
        return self._lt.run(self._client.shutdown(timeout=timeout))

    def reboot(self, *, timeout: Optional[float] = None) -> None:
        return self._lt.run(self._client.reboot(timeout=timeout))

    def publish(self, topic: str, data: Any, *, timeout: Optional[float] = None) -> int:
        return self._lt.run(self._client.publish(topic, data, timeout=timeout))

    def run(self, cmd: Command, **kwargs: Any) -> CompletedProcess:
        return self._lt.run(self._client.run(cmd, **kwargs))

    def push(self, local: PathLike, remote: str, **kwargs: Any) -> "TransferResult":
        """Blocking :meth:`guestlink.host.client.Client.push` (progress runs in the loop thread)."""
        return self._lt.run(self._client.push(local, remote, **kwargs))

    def pull(self, remote: str, local: PathLike, **kwargs: Any) -> "TransferResult":
        """Blocking :meth:`guestlink.host.client.Client.pull`."""
        return self._lt.run(self._client.pull(remote, local, **kwargs))

    def exec(self, cmd: Command, *, stdin: bool = False, timeout: Optional[float] = None,
             env: Optional[Dict[str, str]] = None, env_clear: bool = False,
             cwd: Optional[PathLike] = None, shell: Optional[bool] = None,
             output_limit: Optional[int] = DEFAULT_OUTPUT_LIMIT,
             call_timeout: Optional[float] = None) -> "SyncProcess":
        proc = self._client.exec_with(cmd, ExecOptions(
            stdin=stdin, timeout=timeout, env=env, env_clear=env_clear, cwd=cwd, shell=shell,
            output_limit=output_limit, call_timeout=call_timeout))
        return SyncProcess(self._lt, proc)

    def subscribe(self, topic: str, *, queue_size: Optional[int] = None) -> "SyncSubscription":
        async def make() -> Subscription:
            return self._client.subscribe(topic, queue_size=queue_size)
        return SyncSubscription(self._lt, self._lt.run(make()))


class SyncProcess:
    """Blocking twin of :class:`guestlink.host.client.Process`; use ``with vm.exec(...) as p``."""

    def __init__(self, lt: _LoopThread, proc: Process) -> None:
        self._lt = lt
        self._proc = proc

    args = property(lambda self: self._proc.args)
    pid = property(lambda self: self._proc.pid)
    returncode = property(lambda self: self._proc.returncode)

    def __enter__(self) -> "SyncProcess":
        self._lt.run(self._proc.start())
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._lt.run(self._proc.__aexit__(exc_type, exc, tb))

    def output(self) -> Iterator[Tuple[str, bytes]]:
        """Blocking iterator of (stream, bytes)."""
        agen = self._proc.output()

        async def step() -> Optional[Tuple[str, bytes]]:
            try:
                return await agen.__anext__()
            except StopAsyncIteration:
                return None

        while True:
            item = self._lt.run(step())
            if item is None:
                return
            yield item

    def write(self, data: Union[bytes, bytearray, memoryview, str]) -> None:
        return self._lt.run(self._proc.write(data))

    def close_stdin(self) -> None:
        return self._lt.run(self._proc.close_stdin())

    def wait(self) -> CompletedProcess:
        return self._lt.run(self._proc.wait())

    def cancel(self) -> None:
        return self._lt.run(self._proc.cancel())


class SyncSubscription:
    """Blocking iterator of :class:`~guestlink.host.client.Message`; ends when closed."""

    def __init__(self, lt: _LoopThread, sub: Subscription) -> None:
        self._lt = lt
        self._sub = sub

    topic = property(lambda self: self._sub.topic)
    dropped = property(lambda self: self._sub.dropped)

    def __iter__(self) -> "SyncSubscription":
        return self

    def __next__(self) -> Message:
        msg = self._lt.run(self._sub.next_or_none())
        if msg is None:
            raise StopIteration
        return msg

    def get(self, timeout: Optional[float] = None) -> Message:
        """The next message; raises TimeoutError (asyncio's) after ``timeout`` s, EOFError if closed."""
        return self._lt.run(self._sub.get(timeout))

    def close(self) -> None:
        if not self._lt.loop.is_closed():
            self._lt.loop.call_soon_threadsafe(self._sub.close)

    def __enter__(self) -> "SyncSubscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
