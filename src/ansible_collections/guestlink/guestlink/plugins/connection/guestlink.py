"""Ansible connection plugin ``guestlink.guestlink.guestlink``: tasks in a VM over virtio-serial.

Everything goes through the guestlink host library (:func:`guestlink.host.client.connect`,
``Client.exec``/``push``/``pull``); this module only maps Ansible's connection contract onto it.
The library is asyncio; each Connection owns a private event loop, created in the process that
uses it (Ansible forks a worker per task, and the worker creates, uses and closes its connection).
"""

from __future__ import annotations

DOCUMENTATION = r"""
name: guestlink
short_description: Run tasks in a VM over virtio-serial (guestlink agent, no network)
description:
  - Runs commands and moves files between the Ansible controller and a QEMU/libvirt guest through
    the guest's two virtio-serial channels and the guestlink agent in the guest. The guest needs
    no network, no sshd and no qemu-guest-agent.
  - The controller must run on the hypervisor that hosts the VM (the channels are unix sockets
    there).
  - Commands run as C(/bin/sh -c CMD) with stdin streamed, stdout, stderr and the exit status kept
    apart (a process killed by signal N gives 128+N). Files move over the data channel into a temp
    file next to the destination that is verified (SHA-256) and renamed.
author: guestlink developers
version_added: "0.1.0"
requirements:
  - the guestlink Python package on the controller (C(pip install guestlink[ansible]))
  - the guestlink agent running in the guest, the guest's channels as libvirt C(<channel
    type='unix'>) elements (C(guestlink libvirt xml)) or QEMU unix chardevs
options:
  remote_addr:
    description:
      - The libvirt domain (name or UUID) of the VM.
    default: inventory_hostname
    type: str
    vars:
      - name: inventory_hostname
      - name: ansible_host
      - name: ansible_guestlink_domain
  uri:
    description:
      - The libvirt connection URI of the hypervisor (as C(virsh --connect)).
      - C(ansible_guestlink_uri) wins over C(ansible_libvirt_uri), C(GUESTLINK_URI) over
        C(LIBVIRT_DEFAULT_URI); unset, C(qemu:///system).
    type: str
    vars:
      - name: ansible_libvirt_uri
      - name: ansible_guestlink_uri
    env:
      - name: LIBVIRT_DEFAULT_URI
      - name: GUESTLINK_URI
  ctl_path:
    description:
      - The control channel's unix socket. Given, the libvirt look-up is skipped (plain QEMU).
    type: path
    vars:
      - name: ansible_guestlink_ctl
  data_path:
    description:
      - The data channel's unix socket (with O(ctl_path)); file transfers need it.
    type: path
    vars:
      - name: ansible_guestlink_data
  ctl_name:
    description:
      - Name of the control channel in the domain XML (default as recorded by guestlink in the
        domain's metadata, else C(org.guestlink.ctl)).
    type: str
    vars:
      - name: ansible_guestlink_ctl_name
  data_name:
    description:
      - Name of the data channel in the domain XML (default as recorded, else
        C(org.guestlink.data)).
    type: str
    vars:
      - name: ansible_guestlink_data_name
  remote_user:
    description:
      - The guest user commands run as (their HOME, USER, LOGNAME, SHELL from its passwd entry).
        Unset, the agent's own user (root).
    type: str
    vars:
      - name: ansible_user
      - name: ansible_guestlink_user
    keyword:
      - name: remote_user
  timeout:
    description:
      - Seconds to wait for the agent to answer when connecting (also the limit for every
        request that is not a command or a transfer). The C(reboot) action sets it.
    type: int
    default: 10
    ini:
      - section: defaults
        key: timeout
    env:
      - name: ANSIBLE_TIMEOUT
    vars:
      - name: ansible_guestlink_timeout
    cli:
      - name: timeout
  command_timeout:
    description:
      - Seconds a command may run before the agent kills its process group (exit status 124
        reported as a failure of the task). 0, no limit. Ansible's task C(timeout) keyword works
        in addition.
    type: int
    default: 0
    vars:
      - name: ansible_guestlink_command_timeout
    env:
      - name: GUESTLINK_COMMAND_TIMEOUT
  queue_timeout:
    description:
      - A VM serves one guestlink client at a time; another (a second playbook, a C(guestlink cp))
        makes this connection wait its turn. Seconds to wait before failing; 0, no limit.
    type: int
    default: 1800
    vars:
      - name: ansible_guestlink_queue_timeout
    env:
      - name: GUESTLINK_QUEUE_TIMEOUT
  pipelining:
    description:
      - Send modules on the command's stdin instead of uploading them (one command per module
        task instead of five).
    type: boolean
    default: false
    ini:
      - section: defaults
        key: pipelining
      - section: connection
        key: pipelining
    env:
      - name: ANSIBLE_PIPELINING
    vars:
      - name: ansible_pipelining
      - name: ansible_guestlink_pipelining
"""

EXAMPLES = r"""
# inventory.ini: VMs on this hypervisor, by libvirt domain name
[vms]
web1
web2 ansible_guestlink_uri=qemu:///session

[vms:vars]
ansible_connection=guestlink.guestlink.guestlink
ansible_python_interpreter=/usr/bin/python3
ansible_pipelining=true

# plain QEMU, sockets given
# vm3 ansible_connection=guestlink.guestlink.guestlink ansible_guestlink_ctl=/run/vm3/ctl.sock
#     ansible_guestlink_data=/run/vm3/data.sock
"""

import asyncio
import os
import re
import time
import typing as t

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

try:
    from guestlink.host import errors as GE
    from guestlink.host.client import Client, connect
    from guestlink.protocol.safetext import printable
    HAS_GUESTLINK = True
    IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # pragma: no cover - reported on first use
    HAS_GUESTLINK = False
    IMPORT_ERROR = exc

display = Display()

T = t.TypeVar("T")

#: Output a command may produce per stream, kept in the controller's memory (like ssh's, bounded).
OUTPUT_LIMIT = 1 << 30


class Connection(ConnectionBase):
    """One Ansible connection = one guestlink Client on a private event loop."""

    transport = "guestlink.guestlink.guestlink"
    has_pipelining = True
    has_tty = False

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_pid = 0
        self._client: "Client" | None = None

    # --- the private event loop -------------------------------------------------------------

    def _run(self, coro: t.Coroutine[t.Any, t.Any, T]) -> T:
        if self._loop is None or self._loop_pid != os.getpid() or self._loop.is_closed():
            # a new process (fork) never drives its parent's loop or sockets
            self._loop = asyncio.new_event_loop()
            self._loop_pid = os.getpid()
            self._client = None
        return self._loop.run_until_complete(coro)

    # --- connect / close / reset ------------------------------------------------------------

    def _target(self) -> str:
        ctl = self.get_option("ctl_path")
        if ctl:
            return "sockets %s" % ctl
        uri = self.get_option("uri") or "default URI"
        return "domain %s on %s" % (self.get_option("remote_addr"), uri)

    def _connect(self) -> "Connection":
        if not HAS_GUESTLINK:
            raise AnsibleError("the guestlink connection plugin needs the guestlink Python package "
                               "on the controller: pip install guestlink[ansible] (%s)" % IMPORT_ERROR)
        if self._client is not None and self._loop_pid == os.getpid():
            return self
        started = time.monotonic()
        client = self._run(self._open())
        self._client = client
        self._connected = True
        display.vvv("GUESTLINK CONNECTED to %s (agent %s on %s) in %.1f ms" % (
            self._target(), client.agent.version if client.agent else "?",
            printable(client.agent.hostname) if client.agent else "?",
            (time.monotonic() - started) * 1000), host=self._play_context.remote_addr)
        return self

    async def _open(self) -> "Client":
        timeout = float(self.get_option("timeout") or 10)
        queue_timeout = float(self.get_option("queue_timeout") or 0) or None
        ctl = self.get_option("ctl_path")
        host = self._play_context.remote_addr

        def queued(holder: str) -> None:
            display.vv("GUESTLINK %s is in use by %s: waiting for it (up to %s)" % (
                self._target(), printable(holder),
                "%d s" % queue_timeout if queue_timeout else "no limit"), host=host)

        # guestlink's own agent only: the qemu-ga fallback has no streamed stdin, no tree copies
        # and no other users, which Ansible's module runs need
        common: dict[str, t.Any] = dict(timeout=timeout, reconnect=False, via="guestlink",
                                          queue_timeout=queue_timeout, on_queue=queued)
        try:
            if ctl:
                conn = connect(ctl=ctl, data=self.get_option("data_path"), **common)
            else:
                domain = self.get_option("remote_addr")
                if not domain:
                    raise AnsibleConnectionFailure("guestlink: no libvirt domain to connect to "
                                                   "(inventory_hostname/ansible_host)")
                conn = connect(domain=domain, uri=self.get_option("uri"),
                               ctl_name=self.get_option("ctl_name"),
                               data_name=self.get_option("data_name"), **common)
            client = await conn
            assert isinstance(client, Client)  # via="guestlink" never answers with a QgaClient
            return client
        except GE.GuestlinkError as exc:
            raise AnsibleConnectionFailure("guestlink: cannot connect to %s: %s" % (
                self._target(), exc)) from None
        except (OSError, ValueError) as exc:
            raise AnsibleConnectionFailure("guestlink: cannot connect to %s: %s" % (
                self._target(), exc)) from None

    def close(self) -> None:
        client, loop = self._client, self._loop
        self._client = None
        self._connected = False
        if loop is None or self._loop_pid != os.getpid():
            self._loop = None
            return
        try:
            if not loop.is_closed():
                if client is not None:
                    try:
                        loop.run_until_complete(client.close())
                    except Exception as exc:  # closing: report, never raise
                        display.vvv("GUESTLINK close: %s" % exc)
                pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.close()
        finally:
            self._loop = None

    def reset(self) -> None:
        """meta: reset_connection, and the reboot/wait_for_connection actions: drop the
        connection; the next operation connects afresh (and finds a restarted domain's sockets)."""
        self.close()

    # --- commands ---------------------------------------------------------------------------

    def _exec_user(self) -> dict[str, t.Any]:
        user = self.get_option("remote_user")
        return {"user": user} if user else {}

    def exec_command(self, cmd: str, in_data: bytes | None = None,
                     sudoable: bool = True) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        self._connect()
        display.vvv("EXEC %s" % to_text(cmd), host=self._play_context.remote_addr)
        want_password = bool(sudoable and self.become and self.become.expect_prompt())
        return self._run(self._exec(to_text(cmd, errors="surrogate_or_strict"), in_data,
                                    want_password))

    async def _exec(self, cmd: str, in_data: bytes | None,
                    want_password: bool) -> tuple[int, bytes, bytes]:
        assert self._client is not None
        limit = int(self.get_option("command_timeout") or 0)
        stdin = in_data is not None or want_password
        kwargs = self._exec_user()
        try:
            async with self._client.exec(["/bin/sh", "-c", cmd], stdin=stdin,
                                         timeout=limit or None, output_limit=OUTPUT_LIMIT,
                                         **kwargs) as proc:
                out, err = bytearray(), bytearray()
                output = proc.output()
                if want_password:
                    await self._become_password(proc, output, out, err)
                if in_data:
                    await proc.write(in_data)
                if stdin:
                    await proc.close_stdin()
                async for stream, data in output:
                    (out if stream == "stdout" else err).extend(data)
                result = await proc.wait()
        except GE.ConnectError as exc:
            raise AnsibleConnectionFailure("guestlink: %s" % exc) from None
        except (GE.ConnectionLost, GE.RequestNotSent, GE.AgentNotResponding,
                GE.RequestTimeout, GE.ProtocolError) as exc:
            raise AnsibleConnectionFailure("guestlink: lost the agent of %s while running a "
                                           "command: %s" % (self._target(), exc)) from None
        except GE.RemoteError as exc:
            raise AnsibleError("guestlink: the agent refused the command: %s" % exc) from None
        rc = result.returncode
        if result.signal is not None:
            rc = 128 + result.signal  # as a shell reports it (ssh: 255 for the connection)
        if result.timed_out:
            err.extend(b"\n[guestlink] command killed after %d s (command_timeout)\n" % limit)
            rc = 124
        for name, cut in (("stdout", result.stdout_truncated), ("stderr", result.stderr_truncated)):
            if cut:
                err.extend(b"\n[guestlink] %s truncated at %d bytes\n" % (name.encode(), OUTPUT_LIMIT))
        return rc, bytes(out), bytes(err)

    async def _become_password(self, proc: t.Any, output: t.AsyncIterator[tuple[str, bytes]],
                               out: bytearray, err: bytearray) -> None:
        """A become method asks for a password: wait for its prompt (or for its success marker:
        no password was needed), write the password, then wait for success; a wrong or missing
        password, or no answer within ``timeout``, fails at once with what the method said."""
        become = self.become
        assert become is not None
        deadline = time.monotonic() + float(self.get_option("timeout") or 10)
        sent = False
        while True:
            seen = bytes(out) + b"\n" + bytes(err)
            if become.check_success(bytes(out)):
                break
            if sent and (become.check_incorrect_password(seen) or become.check_missing_password(seen)):
                raise AnsibleError("guestlink: become (%s) failed: incorrect or missing password: %s"
                                   % (become.name, to_text(seen.strip())))
            if not sent and become.check_password_prompt(seen):
                password = become.get_option("become_pass") or ""
                await proc.write(to_bytes(password, errors="surrogate_or_strict") + b"\n")
                sent = True
                del out[:]
                del err[:]
                continue
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                stream, data = await asyncio.wait_for(output.__anext__(), remaining)
            except StopAsyncIteration:
                raise AnsibleError("guestlink: become (%s) ended before it succeeded%s: %s" % (
                    become.name, "" if sent else " or asked for a password",
                    to_text(seen.strip()))) from None
            except asyncio.TimeoutError:
                raise AnsibleError("guestlink: become (%s): no %s within %s s: %s" % (
                    become.name, "success" if sent else "password prompt or success",
                    self.get_option("timeout"), to_text(seen.strip()))) from None
            (out if stream == "stdout" else err).extend(data)
        # drop everything up to and including the success marker (the prompt came before it)
        success = to_bytes(become.success)
        text = bytes(out)
        at = text.find(success)
        if at >= 0:
            rest = re.sub(br"^[ \t]*\r?\n", b"", text[at + len(success):], count=1)
            del out[:]
            out.extend(rest)

    # --- files ------------------------------------------------------------------------------

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        self._connect()
        display.vvv("PUT %s TO %s" % (in_path, out_path), host=self._play_context.remote_addr)
        local = os.path.abspath(to_text(in_path, errors="surrogate_or_strict"))
        if not os.path.isfile(local):
            raise AnsibleFileNotFound("file or module does not exist: %s" % local)
        remote = to_text(out_path, errors="surrogate_or_strict")
        owner = self._user_may("put", remote)
        self._transfer("put", local, remote)
        if owner is not None:
            # the agent wrote it: it becomes the remote user's, as if they had written it
            self._call("fs.setattr", {"path": remote, "uid": owner[0], "gid": owner[1]})

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        self._connect()
        display.vvv("FETCH %s TO %s" % (in_path, out_path), host=self._play_context.remote_addr)
        local = os.path.abspath(to_text(out_path, errors="surrogate_or_strict"))
        remote = to_text(in_path, errors="surrogate_or_strict")
        self._user_may("fetch", remote)
        self._transfer("fetch", remote, local)

    #: As the remote user: may it write the directory of $2 (put) or read $2 (fetch)? Prints its
    #: uid and gid. The path is an argument, never part of the script.
    _MAY = {"put": 'd=$(dirname -- "$2") && [ -w "$d" ] && [ -x "$d" ] && id -u && id -g',
            "fetch": '[ -r "$2" ] && id -u && id -g'}

    def _user_may(self, verb: str, path: str) -> tuple[int, int] | None:
        """Transfers are made by the agent (root); with a remote_user, the user's own permissions
        are checked first (as ssh would apply them) -> the user's (uid, gid), None without one."""
        user = self.get_option("remote_user")
        if not user:
            return None
        assert self._client is not None
        try:
            r = self._run(self._client.run(["/bin/sh", "-c", self._MAY[verb], "sh", verb, path],
                                           user=user, output_limit=4096))
        except GE.GuestlinkError as exc:
            raise AnsibleError("guestlink: cannot check %s's permissions for %s: %s" % (
                user, path, exc)) from None
        fields = r.stdout.split()
        if r.returncode != 0 or len(fields) != 2 or not all(f.isdigit() for f in fields):
            raise AnsibleError("guestlink: %s %s: permission denied for user %s" % (
                verb, path, user))
        return int(fields[0]), int(fields[1])

    def _call(self, op: str, args: dict[str, t.Any]) -> None:
        assert self._client is not None
        try:
            self._run(self._client.call(op, args))
        except GE.GuestlinkError as exc:
            raise AnsibleError("guestlink: %s %s: %s" % (op, args.get("path"), exc)) from None

    def _transfer(self, verb: str, src: str, dst: str) -> None:
        assert self._client is not None
        client = self._client
        try:
            if verb == "put":
                self._run(client.push(src, dst))
            else:
                self._run(client.pull(src, dst))
        except GE.ConnectError as exc:
            raise AnsibleConnectionFailure("guestlink: %s" % exc) from None
        except (GE.ConnectionLost, GE.RequestNotSent, GE.AgentNotResponding) as exc:
            raise AnsibleConnectionFailure("guestlink: lost the agent of %s during a transfer: %s"
                                           % (self._target(), exc)) from None
        except GE.RemoteNotFound as exc:
            raise AnsibleFileNotFound("guestlink: %s %s -> %s: %s" % (verb, src, dst, exc)) from None
        except (GE.GuestlinkError, OSError, ValueError) as exc:
            raise AnsibleError("guestlink: %s %s -> %s failed: %s" % (verb, src, dst, exc)) from None

