"""``shutdown`` / ``reboot``: choose the commands before replying, run them after the reply left."""
import os
import shutil
from typing import List

_BUSYBOX = ("/bin/busybox", "/usr/bin/busybox", "/sbin/busybox")


def systemd_is_init() -> bool:
    return os.path.isdir("/run/systemd/system")


def power_commands(action: str) -> List[List[str]]:
    """Candidate argv lists for ``action`` ("poweroff" or "reboot"), best first.

    systemctl when systemd is PID 1, else the plain command, else busybox's forced variant.
    Raises LookupError when none is available.
    """
    candidates = []
    systemctl = shutil.which("systemctl")
    if systemctl and systemd_is_init():
        candidates.append([systemctl, action])
    path = os.environ.get("PATH", "") + ":/sbin:/usr/sbin:/bin:/usr/bin"
    plain = shutil.which(action, path=path)
    if plain:
        candidates.append([plain])
    busybox = shutil.which("busybox", path=path) or next((b for b in _BUSYBOX if os.path.exists(b)), None)
    if busybox:
        candidates.append([busybox, action, "-f"])
    if not candidates:
        raise LookupError("no way to %s this guest: neither systemctl (with systemd as init), "
                          "%s nor busybox was found" % (action, action))
    return candidates
