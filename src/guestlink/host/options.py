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


@dataclass(frozen=True)
class ConnectOptions:
    """How to reach one VM's agent; see :func:`guestlink.host.client.connect` for each field.

    Either ``ctl`` (and ``data``) socket paths, or a libvirt ``domain`` (``uri``, ``ctl_name``,
    ``data_name``) whose live XML gives them. Invalid combinations and timeouts raise ValueError /
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
    #: The guestlink master (docs/master.md): True use one (start one if none runs), False never,
    #: None use a running one (start one only when ``persist`` > 0 is given).
    master: Optional[bool] = None
    #: Seconds a master started for this connection stays after its last client (0: never start).
    persist: Optional[float] = None

    def __post_init__(self) -> None:
        if self.domain is not None:
            if self.ctl or self.data:
                raise ValueError("connect(): give either domain= or ctl=/data=, not both")
        elif self.ctl_name or self.data_name:
            raise ValueError("connect(): ctl_name=/data_name= name a libvirt domain's channels; "
                             "they need domain=")
        elif not self.ctl:
            raise ValueError("connect() needs the control socket path (ctl=...)")
        # frozen: the validated float replaces the caller's value
        object.__setattr__(self, "timeout", check_timeout(self.timeout))
        object.__setattr__(self, "queue_timeout", check_timeout(self.queue_timeout,
                                                                "queue_timeout"))
        object.__setattr__(self, "persist", check_timeout(self.persist, "persist"))


@dataclass(frozen=True)
class ExecOptions:
    """How to run one command in the guest; see :meth:`guestlink.host.client.Client.exec`."""

    stdin: bool = False
    timeout: Optional[float] = None
    env: Optional[Mapping[str, str]] = None
    env_clear: bool = False
    cwd: Optional[PathLike] = None
    shell: Optional[bool] = None
    output_limit: Optional[int] = DEFAULT_OUTPUT_LIMIT
    call_timeout: Optional[float] = None
