"""A scriptable fake guest agent for the host-library and CLI unit tests (no tests of its own here).

It speaks the real protocol through ``guestlink.protocol`` over a real unix socket, its session
rules are the real agent's (``protocol.session.AgentSession``), so the host client is exercised
exactly as against the guest agent, plus knobs for misbehaviour: garbage,
stale SYNC_ACKs, silence, protocol mismatch, restarts, dropped connections, malformed replies.

Exec is scripted (nothing runs): argv[0] selects the behaviour, see ``FakeAgent._exec_body``.
"""
import asyncio
import json
import os
import shlex
import sys
import threading

from guestlink.protocol import FrameDecoder, FrameType, codes
from guestlink.protocol import messages as m
from guestlink.protocol.frames import encode_frame
from guestlink.protocol.session import AgentSession, Passed, Request, SendBytes

DESCRIPTION = {
    "agent": "guestlink-agent", "agent_version": "0.1.0", "protocol": 1,
    "capabilities": ["ping", "info", "exec", "shutdown", "reboot", "greet"],
    "hostname": "fakevm", "boot_id": "0f0e0d0c-0b0a-0908-0706-050403020100", "session": "s1",
}

INFO = {
    "hostname": "fakevm", "os_release": {"ID": "debian", "VERSION_ID": "12"},
    "kernel": {"release": "6.1.0-cloud-amd64", "version": "#1 SMP", "machine": "x86_64"},
    "uptime": 12.5, "agent_version": "0.1.0", "protocol": 1,
    "boot_id": DESCRIPTION["boot_id"], "python": "3.11.2",
    "addresses": [{"interface": "lo", "family": "inet", "address": "127.0.0.1"}],
    "capabilities": DESCRIPTION["capabilities"],
}


class Reply(Exception):
    """Raise from a handler to answer with an ERROR."""

    def __init__(self, code, message="", details=None):
        Exception.__init__(self, message)
        self.code, self.message, self.details = code, message, details


class FakeConn:
    def __init__(self, agent, reader, writer):
        self.agent = agent
        self.reader = reader
        self.writer = writer
        self.tasks = {}
        self.stdin = {}
        self.rules = AgentSession(lambda: agent.description, self._in_flight)

    def _in_flight(self, id_):
        task = self.tasks.get(id_)
        return task is not None and not task.done()

    @property
    def synced(self):
        return self.rules.active

    @synced.setter
    def synced(self, value):
        """Only False: the agent forgets the session (as after a restart)."""
        assert not value
        self.rules.end()

    def send(self, data):
        if not self.writer.is_closing():
            self.writer.write(data)

    async def run(self):
        agent = self.agent
        if agent.garbage:
            self.send(agent.garbage)
        if agent.hello:
            self.send(m.encode_hello(dict(agent.description, session="hello")))
        decoder = FrameDecoder()
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for ev in decoder.feed(data):
                    if getattr(ev, "type", None) is not None and hasattr(ev, "payload"):
                        self.on_frame(ev)
        except (ConnectionError, OSError):
            pass
        finally:
            for task in list(self.tasks.values()):
                task.cancel()
            self.writer.close()

    def on_frame(self, frame):
        agent = self.agent
        t = frame.type
        if t == FrameType.SYNC:
            nonce, protocol = m.parse_sync(frame.payload)
            agent.nonces.append(nonce)
            if agent.ignore_syncs > 0:
                agent.ignore_syncs -= 1
                return
            if agent.silent:
                return
            if agent.mismatch:
                self.send(m.encode_error(0, codes.PROTOCOL_MISMATCH, "I speak protocol 7",
                                         {"nonce": nonce, "protocol": 7}))
                return
            if agent.ack_override is not None:
                self.send(agent.ack_override(nonce))
                return
            if agent.stale_ack:
                self.send(m.encode_sync_ack("0" * 32, dict(agent.description, hostname="stale")))
                self.send(b"\x89GLK garbage between frames \x00\x01")
        for ev in self.rules.receive_frame(frame):
            if isinstance(ev, SendBytes):
                self.send(ev.data)
            elif isinstance(ev, Request):
                agent.requests.append((ev.op, dict(ev.args.obj)))
                self.tasks[ev.id] = asyncio.ensure_future(self.serve(ev.id, ev.op, ev.args))
            elif isinstance(ev, Passed):
                self.on_session_frame(ev.frame)

    def on_session_frame(self, frame):
        agent = self.agent
        t = frame.type
        if t == FrameType.STREAM:
            queue = self.stdin.get(frame.id)
            if queue is not None:
                stream, eof = m.stream_flags(frame.flags)
                queue.put_nowait((bytes(frame.payload), eof))
        elif t == FrameType.CANCEL:
            agent.cancels.append(frame.id)
            # As in the real agent, a cancelled id is no longer in flight (the host may reuse it).
            task = self.tasks.pop(frame.id, None)
            if task is not None:
                task.cancel()
        elif t == FrameType.MESSAGE and frame.id:
            topic, data = m.parse_message(frame.payload)
            agent.published.append((topic, data))
            self.send(m.encode_response(frame.id, {"delivered": agent.delivered}))

    async def serve(self, id_, op, args):
        agent = self.agent
        try:
            handler = agent.handlers.get(op)
            if handler is not None:
                result = await handler(self, id_, args)
            elif op == "ping":
                result = {"pong": True}
            elif op == "info":
                result = dict(INFO)
            elif op == "exec":
                result = await self.exec(id_, args)
            elif op in ("shutdown", "reboot"):
                agent.power.append(op)
                result = {}
            else:
                raise Reply(codes.UNKNOWN_COMMAND, "no command %r" % op)
            if result is not None:
                self.send(result if isinstance(result, bytes) else m.encode_response(id_, result))
        except asyncio.CancelledError:
            self.send(m.encode_error(id_, codes.CANCELLED, "cancelled by the host"))
        except Reply as r:
            self.send(m.encode_error(id_, r.code, r.message, r.details))
        finally:
            try:
                me = asyncio.current_task()
            except RuntimeError:  # closed by the garbage collector after its loop ended
                me = None
            if me is not None and self.tasks.get(id_) is me:
                self.tasks.pop(id_, None)
            if id_ not in self.tasks:  # else a new request with this id owns it
                self.stdin.pop(id_, None)

    async def exec(self, id_, args):
        argv = args.str_list("argv", default=None)
        shell = args.str("shell", default=None)
        if argv is None:
            argv = shlex.split(shell)
        timeout = args.number("timeout", default=None)
        limit = args.int("output_limit", default=16 << 20)
        if self.agent.ignore_output_limit:
            limit = 1 << 62
        self.agent.execs.append(dict(args.obj))
        prog = argv[0]
        if prog == "missing":
            raise Reply(codes.NOT_FOUND, "no such program: missing")
        if prog == "forbidden":
            raise Reply(codes.DENIED, "exec is refused by the agent's policy")
        if args.bool("stdin", default=False):
            self.stdin[id_] = asyncio.Queue()
        self.send(m.encode_event(id_, {"event": "started", "pid": 4242}))
        sent = {1: 0, 2: 0}
        trunc = {1: False, 2: False}

        def out(stream, data):
            room = max(0, limit - sent[stream])
            if len(data) > room:
                trunc[stream] = True
                data = data[:room]
            if data:
                sent[stream] += len(data)
                self.send(m.encode_stream(id_, stream, data))

        result = {"returncode": 0, "signal": None, "timed_out": False}
        try:
            await asyncio.wait_for(self._exec_body(id_, argv, args, out, result), timeout)
        except asyncio.TimeoutError:
            result.update(returncode=-15, signal=15, timed_out=True)
        self.send(m.encode_stream(id_, 1, b"", eof=True))
        self.send(m.encode_stream(id_, 2, b"", eof=True))
        result.update(stdout_truncated=trunc[1], stderr_truncated=trunc[2], duration=0.01)
        return result

    async def _exec_body(self, id_, argv, args, out, result):
        prog, rest = argv[0], argv[1:]
        if prog == "echo":
            out(1, (" ".join(rest) + "\n").encode())
        elif prog == "cat":
            queue = self.stdin.get(id_)
            while queue is not None:
                data, eof = await queue.get()
                out(1, data)
                if eof:
                    break
        elif prog == "fail":
            out(2, b"failing\n")
            result["returncode"] = int(rest[0])
        elif prog == "kill":
            result.update(returncode=-int(rest[0]), signal=int(rest[0]))
        elif prog == "sleep":
            out(1, b"sleeping\n")
            await asyncio.sleep(float(rest[0]))
            out(1, b"woke\n")
        elif prog == "spam":
            count, size = int(rest[0]), int(rest[1])
            for i in range(count):
                out(1 + i % 2, b"x" * size)
                await asyncio.sleep(0)
        elif prog == "args":
            out(1, json.dumps(args.obj, sort_keys=True).encode())
        elif prog == "both":
            out(1, b"to-stdout\n")
            out(2, b"to-stderr\n")
            result["returncode"] = int(rest[0]) if rest else 0
        elif prog == "true":
            pass
        elif prog == "binary":
            out(1, bytes([0xff, 0xfe, 0x00, 0x41]))
        else:
            raise Reply(codes.NOT_FOUND, "no such program: %s" % prog)


class FakeAgent:
    """An asyncio unix-socket server playing the guest agent."""

    def __init__(self, path, **knobs):
        self.path = str(path)
        self.description = dict(DESCRIPTION)
        self.hello = True
        self.garbage = b""
        self.stale_ack = False
        self.silent = False
        self.mismatch = False
        self.ignore_syncs = 0
        self.ack_override = None
        self.ignore_output_limit = False
        self.delivered = 1
        self.handlers = {}
        for key, value in knobs.items():
            if not hasattr(self, key):
                raise TypeError("unknown knob %s" % key)
            setattr(self, key, value)
        self.conns = []
        self.nonces = []
        self.requests = []
        self.cancels = []
        self.published = []
        self.execs = []
        self.power = []
        self.server = None

    async def start(self):
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def _serve(self, reader, writer):
        conn = FakeConn(self, reader, writer)
        self.conns.append(conn)
        await conn.run()

    @property
    def conn(self):
        return self.conns[-1]

    def push(self, topic, data):
        """Send a guest -> host topic message on every open connection."""
        for conn in self.conns:
            conn.send(m.encode_message(topic, data))

    def restart(self, cut_frame=b""):
        """Simulate an agent restart: forget the session and say HELLO again.

        ``cut_frame``: bytes of a frame the dying agent only half wrote, sent before the HELLO.
        """
        for conn in self.conns:
            conn.send(cut_frame)
            conn.synced = False
            for task in list(conn.tasks.values()):
                task.cancel()
            conn.tasks.clear()
            conn.send(m.encode_hello(dict(self.description, session="restarted")))

    def drop(self):
        """Close every connection (the host sees EOF); the server keeps listening."""
        for conn in self.conns:
            conn.writer.close()
            conn.writer.transport.abort()

    async def stop(self):
        self.drop()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc):
        await self.stop()


class ThreadedAgent:
    """A FakeAgent running in its own event loop thread (for the sync facade and the CLI)."""

    def __init__(self, path, **knobs):
        self.loop = asyncio.new_event_loop()
        self.agent = FakeAgent(path, **knobs)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.agent.start(), self.loop).result(5)
        return self.agent

    def call(self, fn, *args):
        async def go():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.agent.stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def raw_frame(type_, payload, id_=0):
    """Any payload (even invalid JSON) in a valid frame."""
    return encode_frame(type_, payload, id=id_)


def short_tmp(tmp_path):
    """Unix socket paths are limited to ~107 bytes; pytest's tmp paths can be longer."""
    path = str(tmp_path)
    if len(path) < 80:
        return path
    import tempfile
    return tempfile.mkdtemp(prefix="gl-")


__all__ = ["FakeAgent", "FakeConn", "Reply", "ThreadedAgent", "raw_frame", "short_tmp",
           "DESCRIPTION", "INFO"]

if __name__ == "__main__":  # pragma: no cover - manual use: python3 test_host_fakeagent.py PATH
    async def _main(path):
        async with FakeAgent(path):
            await asyncio.Event().wait()
    asyncio.run(_main(sys.argv[1]))
