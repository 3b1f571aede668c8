"""The first steps of ``guestlink enroll`` in the guest, before guestlink's agent is there.

The host runs this file's source through qemu-guest-agent's guest-exec as
``python3 -c SOURCE MODE ARGS...``; nothing of it is written to the guest. So it is one file,
stdlib only, and written for any python3 >= 3.6 (no f-strings, no walrus): a python that is too old must
still get as far as reporting its version, so that enroll can refuse with a clear line.

Modes (each prints one JSON object on stdout):

``probe INSTALLED SHA256 NEED_DRIVER``
    Read-only facts: the python version and executable, how the virtio_console driver is present
    (``loaded``, ``built-in``, ``module`` or null), and the SHA-256 of the regular file
    ``INSTALLED`` (the installed agent; null if none). Only when python >= 3.8, the driver is
    present (or ``NEED_DRIVER`` is 0) and that digest is not ``SHA256``, it makes ``tmpdir``: a
    fresh private directory (``tempfile.mkdtemp``: mode 0700, an unpredictable name no other guest
    user can plant in advance) for the zipapp to be written into.
``run PYZ SHA256 ARGS...``
    Verify that PYZ's SHA-256 is SHA256 (else exit 65, running nothing), then run
    ``python3 PYZ ARGS...``, remove PYZ's private directory, and pass on its output and exit status.
``cleanup DIR``
    Remove a directory ``probe`` made (its name must carry :data:`PREFIX`).
"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional

PREFIX = "guestlink-enroll-"
MIN_PYTHON = (3, 8)
MAX_PYZ = 8 * 1024 * 1024     # as guestlink.image.tree.MAX_FILE
MAX_LIST = 16 * 1024 * 1024   # modules.dep / modules.builtin read at most this far
EXIT_DATAERR = 65


def _sha256_of_regular(path: str) -> Optional[str]:
    """The SHA-256 of the regular file at ``path`` (not through a final symlink), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_PYZ:
            return None
        h = hashlib.sha256()
        total = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return h.hexdigest()
            total += len(chunk)
            if total > MAX_PYZ:
                return None
            h.update(chunk)
    finally:
        os.close(fd)


def _module_state(name: str) -> Optional[str]:
    """How the kernel module ``name`` is present: loaded, built-in, module, or None."""
    if os.path.isdir("/sys/module/" + name):
        return "loaded"
    base = "/lib/modules/" + os.uname()[2]
    for listing, state in (("modules.builtin", "built-in"), ("modules.dep", "module")):
        try:
            f = open(os.path.join(base, listing), "rb")
        except OSError:
            continue
        with f:
            for line in f.read(MAX_LIST).splitlines():
                path = line.split(b":", 1)[0].strip()
                stem = os.path.basename(path).split(b".ko")[0].replace(b"-", b"_")
                if stem == name.encode():
                    return state
    return None


def probe(installed: str, want_sha: str, need_driver: bool) -> Dict[str, Any]:
    facts: Dict[str, Any] = {
        "python": ".".join(str(n) for n in sys.version_info[:3]),
        "executable": sys.executable,
        "virtio_console": _module_state("virtio_console"),
        "installed_sha256": _sha256_of_regular(installed),
        "tmpdir": None,
    }
    usable = tuple(sys.version_info[:2]) >= MIN_PYTHON and (
        facts["virtio_console"] is not None or not need_driver)
    if usable and facts["installed_sha256"] != want_sha:
        facts["tmpdir"] = tempfile.mkdtemp(prefix=PREFIX)
    return facts


def _ours(directory: str) -> bool:
    return os.path.basename(os.path.normpath(directory)).startswith(PREFIX)


def run(pyz: str, want_sha: str, args: List[str]) -> int:
    have = _sha256_of_regular(pyz)
    if have != want_sha:
        sys.stdout.write(json.dumps({"error": "the agent zipapp in the guest has SHA-256 %s, not "
                                              "%s: damaged on the way; nothing was run"
                                              % (have, want_sha), "exit_code": EXIT_DATAERR}) + "\n")
        return EXIT_DATAERR
    try:
        proc = subprocess.Popen([sys.executable, pyz] + list(args), stdin=subprocess.DEVNULL)
        code = proc.wait()
    finally:
        directory = os.path.dirname(os.path.abspath(pyz))
        if _ours(directory):
            shutil.rmtree(directory, ignore_errors=True)
    return code


def main(argv: List[str]) -> int:
    if argv[:1] == ["probe"] and len(argv) == 4:
        sys.stdout.write(json.dumps(probe(argv[1], argv[2], argv[3] != "0")) + "\n")
        return 0
    if argv[:1] == ["run"] and len(argv) >= 3:
        return run(argv[1], argv[2], argv[3:])
    if argv[:1] == ["cleanup"] and len(argv) == 2:
        if _ours(argv[1]):
            shutil.rmtree(argv[1], ignore_errors=True)
        sys.stdout.write("{}\n")
        return 0
    sys.stderr.write("usage: probe INSTALLED SHA256 NEED_DRIVER | run PYZ SHA256 ARGS... | "
                     "cleanup DIR\n")
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
