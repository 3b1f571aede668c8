"""The default virtio-serial port names of guestlink's two channels.

The one place these names live: the host (libvirt XML, addressing a domain) and the guest agent
(which ports to open) must agree on them. Stdlib-only, CPython >= 3.8.
"""
from typing import Mapping, Optional, Tuple

#: the control channel (virtio-serial port 1 in the XML guestlink writes)
CTL_NAME = "org.guestlink.ctl"
#: the data channel for file transfers (port 2)
DATA_NAME = "org.guestlink.data"

#: environment defaults for a libvirt domain's channel names (--ctl-name / --data-name)
CTL_NAME_ENV = "GUESTLINK_CTL_NAME"
DATA_NAME_ENV = "GUESTLINK_DATA_NAME"





def names_given(ctl_name: Optional[str], data_name: Optional[str],
                environ: Mapping[str, str]) -> Tuple[Optional[str], Optional[str]]:
    """The channel names given on a command line, else in ``environ`` ($GUESTLINK_CTL_NAME /
    $GUESTLINK_DATA_NAME); None where neither says (then the domain's metadata, then the defaults
    decide)."""
    return (ctl_name or environ.get(CTL_NAME_ENV) or None,
            data_name or environ.get(DATA_NAME_ENV) or None)


__all__ = ["CTL_NAME", "DATA_NAME", "CTL_NAME_ENV", "DATA_NAME_ENV", "names_given"]
