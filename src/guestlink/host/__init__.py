"""The host side of guestlink: an asyncio client for one VM's agent (``connect``), its errors,
a synchronous facade (``guestlink.sync``), the control master (:mod:`.master`, with its
asyncio-free rendezvous :mod:`.mastersock` and blocking client :mod:`.masterclient`).
``connect(..., via="auto")`` falls back to the VM's qemu-guest-agent (:mod:`guestlink.host.qga`,
a :class:`QgaClient` with the same verbs).

Host-only: the guest agent never imports this package. The names below are loaded on first use
(PEP 562), so the lean one-shot CLI path can import :mod:`.mastersock` without asyncio.
"""
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from . import errors
    from .client import (AgentInfo, Client, CompletedProcess, ConnectOptions, ExecOptions,
                         Message, Process, Runstate, Subscription, connect)
    from .qga import QgaClient

__all__ = ["errors", "connect", "Client", "AgentInfo", "CompletedProcess", "ConnectOptions",
           "ExecOptions", "Message", "Process",
           "Runstate", "Subscription", "QgaClient"]


def __getattr__(name: str) -> Any:
    import importlib

    if name == "errors":
        return importlib.import_module(__name__ + ".errors")
    if name == "QgaClient":
        return importlib.import_module(__name__ + ".qga").QgaClient
    if name in __all__:
        return getattr(importlib.import_module(__name__ + ".client"), name)
    raise AttributeError("module 'guestlink.host' has no attribute %r" % name)
