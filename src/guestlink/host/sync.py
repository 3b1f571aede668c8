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
import threading

from .client import connect_with
from .options import DEFAULT_OUTPUT_LIMIT, DEFAULT_QUEUE_SIZE, ConnectOptions, ExecOptions
from .timing import DEFAULT_TIMEOUT

__all__ = ["connect", "SyncClient", "SyncProcess", "SyncSubscription"]


class _LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="guestlink-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro):
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            if not future.done():  # KeyboardInterrupt or similar in this thread
                future.cancel()
            raise

    def close(self):
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


def connect(ctl=None, data=None, *, domain=None, uri=None, ctl_name=None, data_name=None,
            timeout=DEFAULT_TIMEOUT, reconnect=True, max_payload=None,
            queue_size=DEFAULT_QUEUE_SIZE, queue_timeout=None, on_queue=None):
    """Connect (blocking) and return a :class:`SyncClient`; use it as a context manager.
    ``domain``/``uri``: a libvirt domain instead of socket paths, ``ctl_name``/``data_name`` its
    channel names (default: its guestlink metadata's, else the defaults); ``queue_timeout``/
    ``on_queue``: waiting for another client of the VM (all as the asyncio connect())."""
    lt = _LoopThread()
    try:
        client = connect_with(ConnectOptions(
            ctl=ctl, data=data, domain=domain, uri=uri, ctl_name=ctl_name, data_name=data_name,
            timeout=timeout, reconnect=reconnect, max_payload=max_payload, queue_size=queue_size,
            queue_timeout=queue_timeout, on_queue=on_queue)).client
        lt.run(client.connect())
    except BaseException:
        lt.close()
        raise
    return SyncClient(lt, client)


class SyncClient:
    """Blocking twin of :class:`guestlink.host.client.Client`."""

    def __init__(self, lt, client):
        self._lt = lt
        self._client = client

    @property
    def agent(self):
        return self._client.agent

    @property
    def runstate(self):
        return self._client.runstate

    @property
    def stats(self):
        return self._client.stats

    @property
    def connected(self):
        return self._client.connected

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if not self._lt.loop.is_closed():
            try:
                self._lt.run(self._client.close())
            finally:
                self._lt.close()

    def ping(self, *, timeout=None):
        return self._lt.run(self._client.ping(timeout=timeout))

    def info(self, *, timeout=None):
        return self._lt.run(self._client.info(timeout=timeout))

    def call(self, op, args=None, /, *, timeout=None, **kwargs):
        return self._lt.run(self._client.call(op, args, timeout=timeout, **kwargs))

    def shutdown(self, *, timeout=None):
        return self._lt.run(self._client.shutdown(timeout=timeout))

    def reboot(self, *, timeout=None):
        return self._lt.run(self._client.reboot(timeout=timeout))

    def publish(self, topic, data, *, timeout=None):
        return self._lt.run(self._client.publish(topic, data, timeout=timeout))

    def run(self, cmd, **kwargs):
        return self._lt.run(self._client.run(cmd, **kwargs))

    def push(self, local, remote, **kwargs):
        """Blocking :meth:`guestlink.host.client.Client.push` (progress runs in the loop thread)."""
        return self._lt.run(self._client.push(local, remote, **kwargs))

    def pull(self, remote, local, **kwargs):
        """Blocking :meth:`guestlink.host.client.Client.pull`."""
        return self._lt.run(self._client.pull(remote, local, **kwargs))

    def exec(self, cmd, *, stdin=False, timeout=None, env=None, env_clear=False, cwd=None,
             shell=None, output_limit=DEFAULT_OUTPUT_LIMIT, call_timeout=None):
        proc = self._client.exec_with(cmd, ExecOptions(
            stdin=stdin, timeout=timeout, env=env, env_clear=env_clear, cwd=cwd, shell=shell,
            output_limit=output_limit, call_timeout=call_timeout))
        return SyncProcess(self._lt, proc)

    def subscribe(self, topic, *, queue_size=None):
        async def make():
            return self._client.subscribe(topic, queue_size=queue_size)
        return SyncSubscription(self._lt, self._lt.run(make()))


class SyncProcess:
    """Blocking twin of :class:`guestlink.host.client.Process`; use ``with vm.exec(...) as p``."""

    def __init__(self, lt, proc):
        self._lt = lt
        self._proc = proc

    args = property(lambda self: self._proc.args)
    pid = property(lambda self: self._proc.pid)
    returncode = property(lambda self: self._proc.returncode)

    def __enter__(self):
        self._lt.run(self._proc.start())
        return self

    def __exit__(self, exc_type, exc, tb):
        self._lt.run(self._proc.__aexit__(exc_type, exc, tb))

    def output(self):
        """Blocking iterator of (stream, bytes)."""
        agen = self._proc.output()

        async def step():
            try:
                return await agen.__anext__()
            except StopAsyncIteration:
                return None

        while True:
            item = self._lt.run(step())
            if item is None:
                return
            yield item

    def write(self, data):
        return self._lt.run(self._proc.write(data))

    def close_stdin(self):
        return self._lt.run(self._proc.close_stdin())

    def wait(self):
        return self._lt.run(self._proc.wait())

    def cancel(self):
        return self._lt.run(self._proc.cancel())


class SyncSubscription:
    """Blocking iterator of :class:`~guestlink.host.client.Message`; ends when closed."""

    def __init__(self, lt, sub):
        self._lt = lt
        self._sub = sub

    topic = property(lambda self: self._sub.topic)
    dropped = property(lambda self: self._sub.dropped)

    def __iter__(self):
        return self

    def __next__(self):
        msg = self._lt.run(self._sub.next_or_none())
        if msg is None:
            raise StopIteration
        return msg

    def get(self, timeout=None):
        """The next message; raises TimeoutError (asyncio's) after ``timeout`` s, EOFError if closed."""
        return self._lt.run(self._sub.get(timeout))

    def close(self):
        if not self._lt.loop.is_closed():
            self._lt.loop.call_soon_threadsafe(self._sub.close)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
