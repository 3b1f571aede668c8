"""The options of a connection and of a command, each in one dataclass.

The public API keeps its keyword arguments (``connect(ctl=..., timeout=...)``,
``vm.exec(cmd, stdin=True, ...)``): those entry points build these objects, and everything under
them passes the object instead of repeating the argument list.
"""

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

from .timing import DEFAULT_TIMEOUT, check_timeout

#: Bytes per output stream that run() keeps in memory (and asks the agent to send) by default.
DEFAULT_OUTPUT_LIMIT = 64 * 1024 * 1024
#: Messages a subscription buffers before it drops the oldest.
DEFAULT_QUEUE_SIZE = 1024

PathLike = Union[str, "os.PathLike[str]"]
#: Which agent a connection uses: guestlink's, qemu-guest-agent's (guestlink.host.qga), or
#: guestlink's when it answers, else qemu-ga's.
VIA_GUESTLINK, VIA_QGA, VIA_AUTO = "guestlink", "qga", "auto"
VIAS = (VIA_AUTO, VIA_GUESTLINK, VIA_QGA)


@dataclass(frozen=True)
class ConnectOptions:
    """How to reach one VM's agent; see :func:`guestlink.host.client.connect` for each field.

    Either ``ctl`` (and ``data``) socket paths, or a libvirt ``domain`` (``uri``, ``ctl_name``,
    ``data_name``) whose live XML gives them. ``via`` picks the agent (:data:`VIAS`); ``qga`` is
    the qemu-ga socket of a plain QEMU VM (a domain's qemu-ga is reached through libvirt).
    Invalid combinations and timeouts raise ValueError /
    TypeError on construction, before anything is opened.
    """

    ctl: Optional[PathLike] = None
    data: Optional[PathLike] = None
    domain: Optional[str] = None
    uri: Optional[str] = None
    ctl_name: Optional[str] = None
    data_name: Optional[str] = None
    timeout: Optional[float] = DEFAULT_TIMEOUT
    reconnect: bool = True
    max_payload: Optional[int] = None
    queue_size: int = DEFAULT_QUEUE_SIZE
    queue_timeout: Optional[float] = None
    on_queue: Optional[Callable[[str], Any]] = None
    via: str = VIA_AUTO
    qga: Optional[PathLike] = None

    def __post_init__(self) -> None:
        if self.via not in VIAS:
            raise ValueError("connect(): via must be one of %s, not %r" % (", ".join(VIAS), self.via))
        if self.domain is not None and self.qga:
            raise ValueError("connect(): a libvirt domain's qemu-ga is reached through libvirt; "
                             "qga= is the socket of a plain QEMU VM")
        if self.via == VIA_QGA and self.domain is None and not self.qga:
            raise ValueError("connect(via=\"qga\") needs a libvirt domain or the qemu-ga socket "
                             "path (qga=...)")
        if self.domain is not None:
            if self.ctl or self.data:
                raise ValueError("connect(): give either domain= or ctl=/data=, not both")
        elif self.ctl_name or self.data_name:
            raise ValueError("connect(): ctl_name=/data_name= name a libvirt domain's channels; "
                             "they need domain=")
        elif not self.ctl and not (self.qga and self.via != VIA_GUESTLINK):
            raise ValueError("connect() needs the control socket path (ctl=...)")
        # frozen: the validated float replaces the caller's value
        object.__setattr__(self, "timeout", check_timeout(self.timeout))
        object.__setattr__(self, "queue_timeout", check_timeout(self.queue_timeout,
                                                                "queue_timeout"))


@dataclass(frozen=True)
class ExecOptions:
    """How to run one command in the guest; see :meth:`guestlink.host.client.Client.exec`.

    The command gets a login-like environment for ``user`` (default: the agent's own user):
    HOME, USER, LOGNAME, SHELL, PATH and LANG from its passwd entry, then ``env`` on top."""

    stdin: bool = False
    timeout: Optional[float] = None
    env: Optional[Mapping[str, str]] = None
    env_clear: bool = False
    cwd: Optional[PathLike] = None
    shell: Optional[bool] = None
    output_limit: Optional[int] = DEFAULT_OUTPUT_LIMIT
    call_timeout: Optional[float] = None
    user: Optional[str] = None
