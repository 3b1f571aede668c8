"""Build the agent as one executable file (a zipapp), for guests that have no pip.

Only the guest-side code goes in (stdlib-only): the packages ``guestlink.protocol``,
``guestlink.filecopy`` and ``guestlink.agent``, and the modules of :data:`GUEST_MODULES` -- the
install description (``guestlink.image.tree``, with its errors and the exit-status table), so that
``guestlink-agent install`` in a running guest (``guestlink enroll``) runs the very installer that
``guestlink image install`` runs on a disk.
"""
import io
import os
import zipfile
from typing import Iterator, List, Tuple

GUEST_PACKAGES = ("protocol", "filecopy", "agent")
#: single guest-side modules outside those packages (paths relative to the guestlink package)
GUEST_MODULES = ("__init__.py", "_version.py", "exitcodes.py", "image/__init__.py",
                 "image/errors.py", "image/tree.py", "image/bootstrap.py")
_MAIN = b"""import sys
from guestlink.agent.cli import main
sys.exit(main())
"""
_EPOCH = (2020, 1, 1, 0, 0, 0)  # fixed timestamps make the bundle reproducible


def _guest_files() -> Iterator[Tuple[str, str]]:
    root = os.path.dirname(os.path.abspath(__file__))
    for module in GUEST_MODULES:
        yield "guestlink/" + module, os.path.join(root, *module.split("/"))
    for package in GUEST_PACKAGES:
        base = os.path.join(root, package)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith(".py"):
                    full = os.path.join(dirpath, name)
                    yield "guestlink/" + os.path.relpath(full, root).replace(os.sep, "/"), full


def build_bundle_bytes() -> bytes:
    buf = io.BytesIO()
    buf.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        entries: List[Tuple[str, bytes]] = [("__main__.py", _MAIN)]
        for arcname, path in _guest_files():
            with open(path, "rb") as f:
                entries.append((arcname, f.read()))
        for arcname, data in entries:
            info = zipfile.ZipInfo(arcname, _EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buf.getvalue()


def write_bundle(path: str) -> int:
    """Write the agent zipapp to ``path`` atomically and make it executable; returns its size."""
    data = build_bundle_bytes()
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return len(data)
