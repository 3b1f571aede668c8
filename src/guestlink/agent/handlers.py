"""User command handlers: ``HANDLERS_DIR/OP.py`` files defining ``handle(args, ctx)``.

Handlers run in a small pool of daemon worker threads so a slow handler never blocks the loop;
each result is posted back to the loop through a queue and the loop's self-pipe.
"""
import importlib.util
import logging
import os
import queue
import threading
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..protocol.messages import OP_RE
from .config import UntrustedFile, open_trusted_dir, read_trusted_file

log = logging.getLogger("guestlink.agent")

MAX_HANDLER_SIZE = 4 << 20


class HandlerContext:
    """The ``ctx`` a handler receives."""

    def __init__(self, op: str, request_id: int, log: logging.Logger,
                 send_message: Callable[[str, bytes], None]) -> None:
        self.op = op
        self.request_id = request_id
        self.log = log
        self._send_message = send_message

    def send_message(self, topic: str, data: Union[str, bytes, bytearray, memoryview]) -> None:
        """Send a topic message to the host (queued; dropped if no host session is established)."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        self._send_message(topic, bytes(data))


def load_handlers(directory: str, builtin: Sequence[str]) -> Dict[str, Callable[..., Any]]:
    """Return {op: handle function} for every valid, trusted handler file in ``directory``.

    The directory and each file must be owned by root (or the agent's user) and not writable by
    group or others (see config.check_trusted); a file that is not is skipped with one log line.
    Each file is read from the descriptor that was checked, and compiled from those bytes.
    """
    handlers: Dict[str, Callable[..., Any]] = {}
    if not directory:
        return handlers
    try:
        dir_fd = open_trusted_dir(directory)
    except FileNotFoundError:
        log.debug("handlers directory %s does not exist; no user handlers", directory)
        return handlers
    except UntrustedFile as exc:
        log.error("no user handlers loaded: %s", exc)
        return handlers
    except OSError as exc:
        log.error("no user handlers loaded: cannot open %s: %s", directory, exc.strerror or exc)
        return handlers
    try:
        names = sorted(n for n in os.listdir(dir_fd) if n.endswith(".py") and not n.startswith("."))
        for name in names:
            handle = _load_handler(dir_fd, directory, name, builtin)
            if handle is not None:
                handlers[name[:-3]] = handle
    finally:
        os.close(dir_fd)
    return handlers


def _load_handler(dir_fd: int, directory: str, name: str,
                  builtin: Sequence[str]) -> Optional[Callable[..., Any]]:
    """The ``handle`` function of handler file ``name``, or None (after logging why)."""
    path = os.path.join(directory, name)
    op = name[:-3]
    if not OP_RE.match(op):
        log.warning("handler %s skipped: %r is not a valid op name (%s)", path, op, OP_RE.pattern)
        return None
    if op in builtin:
        log.warning("handler %s skipped: it would shadow the built-in op %r", path, op)
        return None
    try:
        source = read_trusted_file(dir_fd, name, path, MAX_HANDLER_SIZE)
    except UntrustedFile as exc:
        log.error("handler skipped: %s", exc)
        return None
    except OSError as exc:
        log.error("handler %s skipped: cannot read it: %s", path, exc.strerror or exc)
        return None
    try:
        spec = importlib.util.spec_from_loader(
            "guestlink_handler_" + op.replace(".", "_").replace("-", "_"), loader=None, origin=path)
        assert spec is not None  # a name and no loader always make a spec
        module = importlib.util.module_from_spec(spec)
        module.__file__ = path
        exec(compile(source, path, "exec"), module.__dict__)
    except Exception as exc:  # a broken handler file must not stop the agent
        log.error("handler %s skipped: loading it failed: %s: %s\n%s", path, type(exc).__name__,
                  exc, traceback.format_exc().rstrip())
        return None
    handle = getattr(module, "handle", None)
    if not callable(handle):
        log.warning("handler %s skipped: it defines no handle(args, ctx) function", path)
        return None
    log.info("loaded handler %s from %s", op, path)
    return handle


class WorkerPool:
    """Daemon worker threads (so a stuck handler cannot keep the agent from exiting)."""

    def __init__(self, workers: int,
                 on_done: Callable[[Any, bool, Any, Optional[str]], None]) -> None:
        self._jobs: "queue.Queue[Optional[Tuple[Any, Callable[..., Any], Tuple[Any, ...]]]]" = queue.Queue()
        self._on_done = on_done  # called in the worker thread with (token, ok, value, tb)
        self._threads: List[threading.Thread] = []
        self._workers = workers
        self.pending = 0

    def submit(self, token: Any, fn: Callable[..., Any], *args: Any) -> None:
        if len(self._threads) < self._workers and self.pending >= len(self._threads):
            t = threading.Thread(target=self._work, name="guestlink-handler-%d" % len(self._threads),
                                 daemon=True)
            self._threads.append(t)
            t.start()
        self.pending += 1
        self._jobs.put((token, fn, args))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            token, fn, args = job
            try:
                value = fn(*args)
            except BaseException as exc:  # handlers may raise anything, even SystemExit
                self._on_done(token, False, exc, traceback.format_exc())
            else:
                self._on_done(token, True, value, None)

    def stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
