"""guestlink: messages, commands and files between a VM's host and its guest over virtio-serial.

The guest agent imports only ``guestlink.protocol`` and ``guestlink.agent`` (stdlib-only, CPython >= 3.8);
the host API is loaded lazily so that importing this package inside the guest pulls in nothing host-only.
"""
from typing import Any

from ._version import __version__

__all__ = ["__version__", "connect", "errors", "sync"]


def __getattr__(name: str) -> Any:  # PEP 562: keep the guest's import of this package light
    if name == "connect":
        from .host.client import connect
        return connect
    if name == "errors":
        from .host import errors
        return errors
    if name == "sync":
        import importlib
        return importlib.import_module(__name__ + ".sync")
    raise AttributeError("module 'guestlink' has no attribute %r" % name)
