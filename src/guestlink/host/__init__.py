"""The host side of guestlink: an asyncio client for one VM's agent (``connect``), its errors,
and a synchronous facade (``guestlink.sync``). ``connect(..., via="auto")`` falls back to the VM's
qemu-guest-agent (:mod:`guestlink.host.qga`, a :class:`QgaClient` with the same verbs).

Host-only: the guest agent never imports this package.
"""
from . import errors
from .client import (AgentInfo, Client, CompletedProcess, ConnectOptions, ExecOptions, Message,
                     Process, Runstate, Subscription, connect)
from .qga import QgaClient

__all__ = ["errors", "connect", "Client", "AgentInfo", "CompletedProcess", "ConnectOptions",
           "ExecOptions", "Message", "Process",
           "Runstate", "Subscription", "QgaClient"]
