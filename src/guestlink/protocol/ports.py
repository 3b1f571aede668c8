"""The default virtio-serial port names of guestlink's two channels.

The one place these names live: the host (libvirt XML, addressing a domain) and the guest agent
(which ports to open) must agree on them. Stdlib-only, CPython >= 3.8.
"""

#: the control channel (virtio-serial port 1 in the XML guestlink writes)
CTL_NAME = "org.guestlink.ctl"
#: the data channel for file transfers (port 2)
DATA_NAME = "org.guestlink.data"

__all__ = ["CTL_NAME", "DATA_NAME"]
