"""Real-VM test bed for guestlink: a tiny Debian-based Linux guest under QEMU.

    from testvm import TestVM, ensure_base

See testvm/README.md.
"""

from .build import BaseImage, TestbedError, ensure_base, make_overlay
from .vm import TestVM, QMPError, guest_files, kernel_cmdline, write_initrd

__all__ = ["BaseImage", "TestbedError", "ensure_base", "make_overlay", "TestVM", "QMPError",
           "guest_files", "kernel_cmdline", "write_initrd"]
