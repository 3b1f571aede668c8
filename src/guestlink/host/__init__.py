"""The host side of guestlink: an asyncio client for one VM's agent (``connect``), its errors,
and a synchronous facade (``guestlink.sync``).

Host-only: the guest agent never imports this package.
"""
from . import errors
from .client import (AgentInfo, Client, CompletedProcess, ConnectOptions, ExecOptions, Message,
                     Process, Runstate, Subscription, connect)

__all__ = ["errors", "connect", "Client", "AgentInfo", "CompletedProcess", "ConnectOptions",
           "ExecOptions", "Message", "Process",
           "Runstate", "Subscription"]
