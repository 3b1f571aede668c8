"""``guestlink master serve|status|stop``: the control master (docs/master.md).

``serve`` is the daemon (uvicorn's shape: this thin command -> :class:`guestlink.host.master.
Master` -> its serve loop; signal handlers only set its stop flag). VM commands start it
themselves with ``--detach``: the command forks, the child starts a new session, logs to
``master.log`` next to its socket and serves; the parent returns once the child listens (or
found a master already running), so the caller can connect at once and no zombie is left.
"""

import argparse
import os
import sys
from typing import Any, Dict, Optional

from .. import exitcodes as X
from ..protocol.safetext import printable
from .common import fail, persist_duration, print_json

COMMANDS = ("master",)


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("master", help="the control master: one process holding the VM sessions "
                                      "that every guestlink command shares",
                       description="The control master (as OpenSSH's ControlMaster): VM commands "
                                   "start it and share it; these commands run, show and end it.")
    msub = p.add_subparsers(dest="master_command", metavar="ACTION")
    msub.required = True
    s = msub.add_parser("serve", help="run the master (VM commands start it by themselves)")
    s.add_argument("--persist", type=persist_duration, default=None, metavar="DURATION",
                   help="exit after this long without clients (60, 60s, 5m, 1h; default "
                        "$GUESTLINK_PERSIST, else 60s)")
    s.add_argument("--group", metavar="GROUP",
                   help="also serve the members of GROUP (socket 0660, directory 0710)")
    s.add_argument("--detach", action="store_true",
                   help="run in the background; return once it listens")
    st = msub.add_parser("status", help="show the running master: pid, uptime, VMs, clients")
    st.add_argument("--json", action="store_true", help="print JSON")
    sp = msub.add_parser("stop", help="stop the master, or close its session of one VM")
    sp.add_argument("vm", nargs="?", metavar="VM",
                    help="a libvirt domain or a control socket path: close only that session")


def run(args: argparse.Namespace) -> int:
    from ..host import errors as E

    try:
        if args.master_command == "serve":
            return serve(args)
        if args.master_command == "status":
            return status(args)
        return stop(args)
    except E.GuestlinkError as exc:
        from .common import exit_for

        return exit_for(exc)


def _persist(args: argparse.Namespace) -> float:
    from ..host import mastersock as MS

    if args.persist is not None:
        persist: float = args.persist
    else:
        try:
            persist = MS.parse_duration(os.environ.get(MS.PERSIST_ENV) or "%g" % MS.DEFAULT_PERSIST)
        except ValueError:
            persist = MS.DEFAULT_PERSIST
    return persist


def serve(args: argparse.Namespace) -> int:
    persist = _persist(args)
    if persist <= 0:
        fail("master serve: --persist must be positive (0 means: never start a master)")
        return X.EXIT_USAGE
    if args.detach:
        return _detach(args, persist)
    return _serve(args, persist, None)


def _serve(args: argparse.Namespace, persist: float, ready_fd: Optional[int]) -> int:
    import asyncio
    import logging

    from ..host.master import Master

    logging.basicConfig(level=logging.INFO, format="%(asctime)s guestlink master: %(message)s")
    try:
        master = Master(persist, group=args.group)
    except ValueError as exc:
        fail("master serve: %s" % exc)
        return X.EXIT_USAGE

    def ready(code: bytes) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, code)
                os.close(ready_fd)
            except OSError:
                pass

    if not master.take_lock():
        sys.stderr.write("guestlink: a master is already running (pid %s)\n"
                         % (master.holder() or "?"))
        ready(b"A")
        return X.EXIT_OK
    try:  # one socket per VM and per client: raise the soft limit on open files to the hard one
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
    try:
        asyncio.run(master.serve(lambda: ready(b"R")))
    except OSError as exc:
        fail("master serve: cannot listen on %s: %s" % (master.path, exc.strerror or exc))
        return X.EXIT_CANTCREAT
    return X.EXIT_OK


def _detach(args: argparse.Namespace, persist: float) -> int:
    from ..host import mastersock as MS

    sock_dir = os.path.dirname(os.environ.get(MS.SOCKET_ENV) or "") or MS.private_dir()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the master
        os.close(rfd)
        status = X.EXIT_SOFTWARE
        try:
            os.setsid()
            log = os.open(os.path.join(sock_dir, "master.log"),
                          os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.close(null)
            os.close(log)
            status = _serve(args, persist, wfd)
        except BaseException as exc:  # the last resort of a detached process: its log
            try:
                sys.stderr.write("guestlink master: %s\n" % printable(repr(exc)))
                sys.stderr.flush()
            except Exception:
                pass
        finally:
            os._exit(status)
    os.close(wfd)
    try:
        code = os.read(rfd, 1)
    finally:
        os.close(rfd)
    os.waitpid(pid, os.WNOHANG)
    if code in (b"R", b"A"):
        return X.EXIT_OK
    fail("master serve: the master did not start (see %s)" % os.path.join(sock_dir, "master.log"))
    return X.EXIT_SOFTWARE


def _not_running(exc: BaseException, as_json: bool = False) -> int:
    if as_json:
        print_json({"running": False})
    fail("no guestlink master is running (%s)" % exc)
    return X.EXIT_UNAVAILABLE


def status(args: argparse.Namespace) -> int:
    from ..host import errors as E
    from ..host import mastersock as MS

    try:
        info = MS.request(MS.OP_STATUS, {})
    except (E.SocketNotFound, E.NotListening) as exc:
        return _not_running(exc, args.json)
    if args.json:
        info["running"] = True
        print_json(info)
        return X.EXIT_OK
    print("master pid %s, up %.0f s, persist %g s, %d client%s, socket %s" % (
        info.get("pid"), info.get("uptime", 0), info.get("persist", 0), info.get("clients", 0),
        "" if info.get("clients") == 1 else "s", printable(str(info.get("socket")))))
    vms = info.get("vms") or []
    for vm in vms:
        if not isinstance(vm, dict):
            continue
        name = vm.get("domain") or vm.get("ctl")
        print("  %s: %s, %s client%s, agent %s on %s%s" % (
            printable(str(name)), printable(str(vm.get("state"))), vm.get("clients"),
            "" if vm.get("clients") == 1 else "s", printable(str(vm.get("agent_version"))),
            printable(str(vm.get("hostname"))),
            ", idle %.0f s" % vm["idle"] if vm.get("idle") else ""))
    if not vms:
        print("  no VM sessions")
    return X.EXIT_OK


def stop(args: argparse.Namespace) -> int:
    from ..host import errors as E
    from ..host import mastersock as MS

    req: Dict[str, Any] = {}
    if args.vm:
        vm = args.vm
        if "/" in vm or os.path.exists(vm):
            vm = os.path.abspath(vm)
        req["vm"] = vm
    try:
        path = MS.socket_path()
        reply = MS.request(MS.OP_STOP, req, path=path)
    except (E.SocketNotFound, E.NotListening) as exc:
        return _not_running(exc)
    if args.vm:
        stopped = reply.get("stopped") or []
        if not stopped:
            fail("the guestlink master holds no session of %s" % args.vm)
            return X.EXIT_UNAVAILABLE
        print("closed the master's session of %s" % ", ".join(printable(str(s)) for s in stopped))
        return X.EXIT_OK
    MS.wait_gone(path, 10.0)
    print("stopped the guestlink master (pid %s)" % reply.get("pid"))
    return X.EXIT_OK
