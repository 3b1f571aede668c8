"""The qemu-guest-agent (qemu-ga) path: reach a VM that has qemu-ga but not guestlink's agent.

Most VMs people already run have qemu-ga (Proxmox turns it on, cloud images ship it). This package
talks to it so that ping, info, exec/run and cp work on them at once, slowly, until the VM is
enrolled (``guestlink enroll DOMAIN``). Normally it is reached through :func:`guestlink.connect`::

    async with guestlink.connect(domain="vm1") as vm:           # via="auto" (the default)
        print(vm.via)                                            # "guestlink" or "qga"
    async with guestlink.connect(qga="/run/vm1-qga.sock", via="qga") as vm:
        r = await vm.run(["uname", "-r"], check=True)            # plain QEMU, qemu-ga's socket
        await vm.push("local.bin", "/tmp/x.bin", progress=cb)    # temp + sha256 check + mv -f

``via="auto"`` tries guestlink's channels first (a short probe: the handshake completes in
milliseconds when the agent runs) and falls back to qemu-ga when they are missing or nobody
answers; ``via="qga"`` forces qemu-ga, ``via="guestlink"`` never uses it. The qemu-ga route is a
libvirt domain's agent (through libvirt: libvirt-python's qemuAgentCommand, else ``virsh
qemu-agent-command``), or for plain QEMU the host socket of the port ``org.qemu.guest_agent.0``
(``qga=PATH``; the CLI's ``--qga PATH`` / $GUESTLINK_QGA).

Layers (each usable alone):

- :mod:`.transport` -- ``SocketTransport(path)`` / ``LibvirtTransport(domain, uri)``, each with
  ``await t.open(timeout)``, ``await t.command(name, args, timeout) -> "return" value``,
  ``await t.close()``. The socket transport resynchronises (0xFF, then ``guest-sync-delimited``
  with a fresh random id, stale bytes discarded up to its reply) on connect, after a timeout and
  after a broken reply. Replies are capped (:data:`~.transport.MAX_REPLY`, 48 MiB; libvirt caps
  at 10 MiB itself), parsed without huge integers or deep nesting, and qemu-ga's errors become
  the host error tree (guestlink.host.errors: UnknownCommand, RemoteNotFound, ..., RemoteError
  with code ``qga:CLASS``). Unreachable qemu-ga is :class:`~.transport.QgaUnavailable` (a
  ConnectError); a silent one AgentNotResponding / RequestTimeout.
- :mod:`.guest` -- one validated call per qemu-ga command: ``exec_start`` (guest-exec with
  input-data and capture-output; argv, never a shell string), ``exec_wait`` (guest-exec-status
  polled with backoff from 2 ms to 250 ms), ``run``, ``kill``, ``file_open/read/write/close``,
  ``file_size``, ``version``. Base64 is decoded strictly and each field's type and range checked.
- :mod:`.client` -- :class:`QgaClient`: ``ping``, ``info`` (guestlink's fields, ``via: "qga"``),
  ``exec``/``exec_with`` (a :class:`QgaProcess` with Process's interface), ``run``, ``push``,
  ``pull`` (-> :class:`QgaTransferResult`, ``verified`` False when the guest has neither
  sha256sum nor python3), and ``call`` for fs.stat/fs.setattr/fs.remove only.

What qemu-ga cannot do (docs/qga.md): stream (stdin is collected, up to 8 MiB, and output arrives
after exit), keep more than 16 MiB per output stream (the result says truncated), report
progress of its own (push/pull report per chunk), kill a process group (a timeout SIGKILLs the
command's pid with kill(1)), copy trees, resume, or preserve attributes; and it is slow: every byte
goes base64 inside JSON, one request at a time.
"""

from .client import QgaAgentInfo, QgaClient, QgaProcess, QgaTransferResult
from .transport import (MAX_REPLY, LibvirtTransport, QgaTransport, QgaUnavailable,
                        SocketTransport)

__all__ = ["QgaClient", "QgaProcess", "QgaAgentInfo", "QgaTransferResult", "QgaTransport",
           "SocketTransport", "LibvirtTransport", "QgaUnavailable", "MAX_REPLY"]
