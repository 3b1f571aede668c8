"""User command handlers: ``HANDLERS_DIR/OP.py`` files defining ``handle(args, ctx)``.

Handlers run in a small pool of daemon worker threads so a slow handler never blocks the loop;
each result is posted back to the loop through a queue and the loop's self-pipe.
"""
import glob
import importlib.util
import logging
import os
import queue
import threading
import traceback

from ..protocol.messages import OP_RE

log = logging.getLogger("guestlink.agent")


class HandlerContext:
    """The ``ctx`` a handler receives."""

    def __init__(self, op, request_id, log, send_message):
        self.op = op
        self.request_id = request_id
        self.log = log
        self._send_message = send_message

    def send_message(self, topic, data):
        """Send a topic message to the host (queued; dropped if no host session is established)."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        self._send_message(topic, bytes(data))


def load_handlers(directory, builtin):
    """Return {op: handle function} for every valid handler file in ``directory``."""
    handlers = {}
    if not directory or not os.path.isdir(directory):
        if directory:
            log.debug("handlers directory %s does not exist; no user handlers", directory)
        return handlers
    for path in sorted(glob.glob(os.path.join(directory, "*.py"))):
        op = os.path.basename(path)[:-3]
        if not OP_RE.match(op):
            log.warning("handler %s skipped: %r is not a valid op name (%s)", path, op, OP_RE.pattern)
            continue
        if op in builtin:
            log.warning("handler %s skipped: it would shadow the built-in op %r", path, op)
            continue
        try:
            spec = importlib.util.spec_from_file_location(
                "guestlink_handler_" + op.replace(".", "_").replace("-", "_"), path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except Exception as exc:  # a broken handler file must not stop the agent
            log.error("handler %s skipped: loading it failed: %s: %s\n%s", path, type(exc).__name__,
                      exc, traceback.format_exc().rstrip())
            continue
        handle = getattr(module, "handle", None)
        if not callable(handle):
            log.warning("handler %s skipped: it defines no handle(args, ctx) function", path)
            continue
        handlers[op] = handle
        log.info("loaded handler %s from %s", op, path)
    return handlers


class WorkerPool:
    """Daemon worker threads (so a stuck handler cannot keep the agent from exiting)."""

    def __init__(self, workers, on_done):
        self._jobs = queue.Queue()
        self._on_done = on_done  # called in the worker thread with (token, ok, value, tb)
        self._threads = []
        self._workers = workers
        self.pending = 0

    def submit(self, token, fn, *args):
        if len(self._threads) < self._workers and self.pending >= len(self._threads):
            t = threading.Thread(target=self._work, name="guestlink-handler-%d" % len(self._threads),
                                 daemon=True)
            self._threads.append(t)
            t.start()
        self.pending += 1
        self._jobs.put((token, fn, args))

    def _work(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            token, fn, args = job
            try:
                value = fn(*args)
            except BaseException as exc:  # noqa: handlers may raise anything, even SystemExit
                self._on_done(token, False, exc, traceback.format_exc())
            else:
                self._on_done(token, True, value, None)

    def stop(self):
        for _ in self._threads:
            self._jobs.put(None)
