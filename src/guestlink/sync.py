"""Synchronous facade of the host library: ``with guestlink.sync.connect(ctl=...) as vm: vm.run(...)``.

The implementation lives in :mod:`guestlink.host.sync`; see its docstring.
"""
from .host.sync import SyncClient, SyncProcess, SyncSubscription, connect

__all__ = ["connect", "SyncClient", "SyncProcess", "SyncSubscription"]
