"""Install, upgrade, inspect and remove the agent in a guest root tree (a mounted directory).

Everything here works on a plain directory, so every backend (nbd, loop, guestfs through
mount-local) and ``--root DIR`` share one code path. Paths inside the guest are resolved *within*
the root: a guest symlink such as ``/etc/rc.local -> /etc/rc.d/rc.local`` never leads to the host.

What install created or changed is recorded in :data:`MANIFEST` so that remove undoes exactly
that: files it created are deleted, files it replaced are restored from hard-link backups, its
block is cut out of ``/etc/rc.local``, directories it created are removed when empty, and a
config file the user has edited since is kept.
"""

import errno
import hashlib
import io
import json
import os
import re
import signal
import stat
import time
import zipfile

from .errors import EXIT_DATAERR, ImageError, NoRootFilesystem, NoSpace, ReadOnly

MANIFEST = "/var/lib/guestlink/install.json"
BACKUP_DIR = "/var/lib/guestlink/backup"
AGENT_PYZ = "/usr/local/lib/guestlink/guestlink-agent.pyz"
WRAPPER = "/usr/local/sbin/guestlink-agent"
CONFIG = "/etc/guestlink/agent.conf"
MODULES_CONF = "/etc/modules-load.d/guestlink.conf"
SYSTEMD_UNIT = "/etc/systemd/system/guestlink-agent.service"
SYSTEMD_WANTS = "/etc/systemd/system/multi-user.target.wants/guestlink-agent.service"
SYSV_SCRIPT = "/etc/init.d/guestlink-agent"
RCLOCAL_SCRIPT = "/usr/local/lib/guestlink/guestlink-agent.init"
RC_LOCAL = "/etc/rc.local"
INIT_KINDS = ("systemd", "sysv", "rc.local")
DEFAULT_CTL = "org.guestlink.ctl"
DEFAULT_DATA = "org.guestlink.data"
BLOCK_BEGIN = "# >>> guestlink agent (managed by guestlink image install; remove with guestlink image remove)"
BLOCK_END = "# <<< guestlink agent"
RC_LOCAL_SKELETON = "#!/bin/sh\n\nexit 0\n"
_TMP_SUFFIX = ".guestlink-tmp"
SPACE_MARGIN = 256 * 1024



def sha256(data):
    return hashlib.sha256(data).hexdigest()


def pyz_version(data):
    """The agent version inside a zipapp (``guestlink/_version.py``), or None."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            text = zf.read("guestlink/_version.py").decode("utf-8", "replace")
    except (zipfile.BadZipFile, KeyError, OSError):
        return None
    m = re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", text)
    return m.group(1) if m else None


def _os_error(exc, what):
    """Map an OSError while writing the guest tree to a clear ImageError."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace("the guest filesystem is full (%s): nothing was changed" % what)
    if exc.errno == errno.EROFS:
        return ReadOnly("the guest filesystem is read-only (%s): nothing was changed" % what)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ImageError("permission denied (%s): %s" % (what, exc.strerror), 77)
    return ImageError("%s: %s" % (what, exc.strerror or exc))


# --- generated files -----------------------------------------------------------------------

def wrapper_text():
    return """#!/bin/sh
# guestlink agent launcher; installed by `guestlink image install`, removed by `guestlink image remove`.
for py in /usr/bin/python3 /usr/local/bin/python3 /bin/python3; do
    [ -x "$py" ] && exec "$py" %(pyz)s "$@"
done
exec python3 %(pyz)s "$@"
""" % {"pyz": AGENT_PYZ}


def config_text(ctl_name, data_name):
    return """# guestlink agent configuration (keys: see the guestlink-agent README).
# Written by `guestlink image install`. Edit freely: an upgrade keeps a file you have changed.

[agent]
ctl_name = %s
data_name = %s

[policy]
# fnmatch patterns of operations; deny wins. Example: deny = exec, reboot
allow = *
deny =
""" % (ctl_name, data_name)


def modules_text(modules):
    return ("# virtio-serial for the guestlink agent; written by `guestlink image install`.\n"
            + "".join(m + "\n" for m in modules))


def systemd_unit_text():
    return """[Unit]
Description=guestlink guest agent
Documentation=https://github.com/guestlink/guestlink
After=systemd-modules-load.service local-fs.target
Wants=systemd-modules-load.service

[Service]
Type=simple
ExecStart=%s run
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
""" % WRAPPER


def init_script_text():
    return """#!/bin/sh
### BEGIN INIT INFO
# Provides:          guestlink-agent
# Required-Start:    $local_fs
# Required-Stop:     $local_fs
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: guestlink guest agent
### END INIT INFO
# Installed by `guestlink image install`; `guestlink image remove` deletes it.
# start: loads the virtio modules, then runs the agent in a respawn loop (2 s pause).
AGENT=%(wrapper)s
PIDFILE=/run/guestlink-agent.pid
LOG=${GUESTLINK_AGENT_LOG:-/var/log/guestlink-agent.log}

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

case "$1" in
start)
    if running; then echo "guestlink-agent: already running"; exit 0; fi
    for m in $(sed 's/#.*//' %(modules)s 2>/dev/null); do modprobe "$m" 2>/dev/null; done
    (
        trap 'kill "$child" 2>/dev/null; exit 0' TERM INT
        while :; do
            "$AGENT" run </dev/null >>"$LOG" 2>&1 &
            child=$!
            wait "$child"
            sleep 2
        done
    ) </dev/null >/dev/null 2>&1 &
    echo $! > "$PIDFILE"
    echo "guestlink-agent: started"
    ;;
stop)
    if running; then kill "$(cat "$PIDFILE")"; fi
    rm -f "$PIDFILE"
    ;;
restart)
    "$0" stop
    "$0" start
    ;;
status)
    if running; then echo "guestlink-agent: running"; else echo "guestlink-agent: stopped"; exit 3; fi
    ;;
*)
    echo "usage: $0 start|stop|restart|status" >&2
    exit 2
    ;;
esac
exit 0
""" % {"wrapper": WRAPPER, "modules": MODULES_CONF}


def rc_local_block():
    return "%s\n%s start\n%s\n" % (BLOCK_BEGIN, RCLOCAL_SCRIPT, BLOCK_END)


def strip_block(text):
    """``text`` without our block; (text, found)."""
    pattern = re.compile(re.escape(BLOCK_BEGIN) + r"\n.*?" + re.escape(BLOCK_END) + r"\n?", re.S)
    new, n = pattern.subn("", text, count=1)
    return new, bool(n)


def insert_block(text):
    """Put our block before a final ``exit 0`` (rc.local's usual last line), else at the end."""
    block = rc_local_block()
    lines = text.splitlines(True)
    idx = len(lines)
    for i in range(len(lines) - 1, -1, -1):
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            continue
        if re.match(r"^exit(\s+0)?\s*$", stripped):
            idx = i
        break
    head = "".join(lines[:idx])
    if head and not head.endswith("\n"):
        head += "\n"
    return head + block + "".join(lines[idx:])


# --- the guest tree ------------------------------------------------------------------------

class Tree:
    """A guest root directory; guest paths ("/etc/x") are resolved within it."""

    def __init__(self, root):
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise ImageError("not a directory: %s" % root, EXIT_DATAERR)

    def host(self, gpath, follow=False, _depth=0):
        """The host path for guest path ``gpath``. Symlinks in the parent directories are
        followed inside the root; the last component too with ``follow``."""
        if _depth > 40:
            raise ImageError("too many levels of symbolic links in the guest at %s" % gpath)
        parts = [p for p in gpath.split("/") if p and p != "."]
        cur = self.root
        for i, part in enumerate(parts):
            if part == "..":
                cur = os.path.dirname(cur) if cur != self.root else cur
                continue
            nxt = os.path.join(cur, part)
            last = i == len(parts) - 1
            if os.path.islink(nxt) and (follow or not last):
                target = os.readlink(nxt)
                rest = "/".join(parts[i + 1:])
                if target.startswith("/"):
                    base = target
                else:
                    base = "/" + os.path.relpath(os.path.join(cur, target), self.root)
                    if base.startswith("/.."):
                        base = "/" + target  # cannot climb above the root
                return self.host(base.rstrip("/") + ("/" + rest if rest else ""), follow,
                                 _depth + 1)
            cur = nxt
        return cur

    def guest(self, host_path):
        return "/" + os.path.relpath(host_path, self.root)

    def lexists(self, gpath):
        return os.path.lexists(self.host(gpath))

    def exists(self, gpath):
        return os.path.exists(self.host(gpath, follow=True))

    def read(self, gpath, follow=True):
        with open(self.host(gpath, follow=follow), "rb") as f:
            return f.read()

    def read_or_none(self, gpath):
        try:
            return self.read(gpath)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def isdir(self, gpath):
        return os.path.isdir(self.host(gpath, follow=True))

    def is_linux_root(self):
        return self.lexists("/etc/os-release") or self.lexists("/usr/lib/os-release")


def detect_init(tree):
    """(kind, reason): how this guest starts services."""
    init = tree.host("/sbin/init", follow=True)
    if os.path.basename(init) == "systemd" and os.path.exists(init):
        return "systemd", "/sbin/init is systemd"
    if not tree.lexists("/sbin/init"):
        for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd"):
            if tree.exists(p):
                return "systemd", "%s exists (no /sbin/init)" % p
    rc_dirs = [d for d in ("/etc/rc2.d", "/etc/rc3.d", "/etc/rc5.d") if tree.isdir(d)]
    if tree.isdir("/etc/init.d") and rc_dirs:
        return "sysv", "/etc/init.d and %s exist" % rc_dirs[0]
    if tree.exists(RC_LOCAL):
        return "rc.local", "%s exists" % RC_LOCAL
    return "rc.local", "no systemd and no sysv runlevel directories found"


def virtio_modules(tree):
    """Modules for /etc/modules-load.d: virtio_console, plus virtio_pci unless every kernel in
    the image has it built in (or it has no kernel modules at all, when both are listed)."""
    mods = ["virtio_console"]
    base = tree.host("/lib/modules", follow=True)
    kernels = []
    try:
        kernels = [os.path.join(base, k) for k in sorted(os.listdir(base))]
    except OSError:
        pass
    builtin_everywhere = bool(kernels)
    for k in kernels:
        try:
            with open(os.path.join(k, "modules.builtin"), encoding="utf-8", errors="replace") as f:
                names = {os.path.basename(l.strip()).split(".ko")[0].replace("-", "_") for l in f}
        except OSError:
            names = set()
        if "virtio_pci" not in names:
            builtin_everywhere = False
    if not builtin_everywhere:
        mods.insert(0, "virtio_pci")
    return mods


def read_manifest(tree):
    data = tree.read_or_none(MANIFEST)
    if data is None:
        return None
    try:
        man = json.loads(data.decode("utf-8"))
        if not isinstance(man, dict) or not isinstance(man.get("entries"), list):
            raise ValueError("no entries")
    except ValueError as exc:
        raise ImageError("%s in the guest is damaged (%s); remove it by hand to reinstall"
                         % (MANIFEST, exc), EXIT_DATAERR)
    return man


def _plan(tree, pyz, init, ctl_name, data_name):
    """The desired entries: dicts with path, kind and content/target."""
    entries = [
        {"path": AGENT_PYZ, "kind": "file", "content": pyz, "mode": 0o755},
        {"path": WRAPPER, "kind": "file", "content": wrapper_text().encode(), "mode": 0o755},
        {"path": CONFIG, "kind": "config", "content": config_text(ctl_name, data_name).encode(),
         "mode": 0o644},
        {"path": MODULES_CONF, "kind": "file",
         "content": modules_text(virtio_modules(tree)).encode(), "mode": 0o644},
    ]
    if init == "systemd":
        entries += [
            {"path": SYSTEMD_UNIT, "kind": "file", "content": systemd_unit_text().encode(),
             "mode": 0o644},
            {"path": SYSTEMD_WANTS, "kind": "symlink", "target": SYSTEMD_UNIT},
        ]
    elif init == "sysv":
        entries.append({"path": SYSV_SCRIPT, "kind": "file", "content": init_script_text().encode(),
                        "mode": 0o755})
        for level in "2345":
            if tree.isdir("/etc/rc%s.d" % level):
                entries.append({"path": "/etc/rc%s.d/S01guestlink-agent" % level,
                                "kind": "symlink", "target": "../init.d/guestlink-agent"})
        for level in "016":
            if tree.isdir("/etc/rc%s.d" % level):
                entries.append({"path": "/etc/rc%s.d/K01guestlink-agent" % level,
                                "kind": "symlink", "target": "../init.d/guestlink-agent"})
    elif init == "rc.local":
        entries += [
            {"path": RCLOCAL_SCRIPT, "kind": "file", "content": init_script_text().encode(),
             "mode": 0o755},
            {"path": RC_LOCAL, "kind": "block"},
        ]
    else:
        raise ImageError("unknown init kind %r (use one of %s)" % (init, ", ".join(INIT_KINDS)), 2)
    return entries


class _DeferSigint:
    """Hold Ctrl-C while the commit renames run, so the manifest always matches the tree."""

    def __enter__(self):
        self.pending = False
        self.old = None
        try:
            self.old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            pass
        return self

    def _handler(self, signum, frame):
        self.pending = True

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        if self.pending and exc[0] is None:
            raise KeyboardInterrupt


class Installer:
    """One install/remove run on a Tree. ``log`` receives human-readable lines."""

    def __init__(self, tree, log=None, fault=None):
        self.tree = tree
        self.log = log or (lambda line: None)
        self.fault = fault  # tests: callable(stage_name) that may raise
        self.created_dirs = []
        self.staged = []

    def _fault(self, name):
        if self.fault:
            self.fault(name)

    # -- low level -------------------------------------------------------------------------

    def _makedirs(self, gdir):
        """Create the guest directory and missing parents; record the ones created."""
        parts = [p for p in gdir.split("/") if p]
        cur = ""
        for part in parts:
            cur += "/" + part
            hp = self.tree.host(cur, follow=True)
            if os.path.isdir(hp):
                continue
            if os.path.lexists(hp):
                raise ImageError("cannot create directory %s in the guest: a file is in the way" % cur)
            os.mkdir(hp, 0o755)
            self.created_dirs.append(cur)

    def _stage_bytes(self, gpath, data, mode):
        self._makedirs(os.path.dirname(gpath))
        final = self.tree.host(gpath)
        tmp = final + _TMP_SUFFIX
        self.staged.append(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        return tmp

    def _stage_symlink(self, gpath, target):
        self._makedirs(os.path.dirname(gpath))
        tmp = self.tree.host(gpath) + _TMP_SUFFIX
        self.staged.append(tmp)
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(target, tmp)
        return tmp

    def _rollback_staging(self):
        for tmp in reversed(self.staged):
            try:
                os.unlink(tmp)
            except OSError:
                pass
        for gdir in reversed(self.created_dirs):
            try:
                os.rmdir(self.tree.host(gdir, follow=True))
            except OSError:
                pass
        self.staged = []
        self.created_dirs = []

    def _current_sha(self, gpath):
        hp = self.tree.host(gpath)
        if os.path.islink(hp) or not os.path.isfile(hp):
            return None
        with open(hp, "rb") as f:
            return sha256(f.read())

    # -- install ---------------------------------------------------------------------------

    def install(self, pyz, init=None, ctl_name=None, data_name=None):
        """Install or upgrade. Returns a result dict (also what ``--json`` prints)."""
        tree = self.tree
        if not tree.is_linux_root():
            raise NoRootFilesystem("%s does not look like a Linux root filesystem (no "
                                   "/etc/os-release)" % tree.root)
        version = pyz_version(pyz)
        if version is None:
            raise ImageError("the agent bundle is not a guestlink zipapp (no guestlink/_version.py)")
        old = read_manifest(tree)
        old_entries = {e["path"]: e for e in (old or {}).get("entries", [])}
        if init is None:
            init, reason = detect_init(tree)
            self.log("init system: %s (%s)" % (init, reason))
        else:
            self.log("init system: %s (--init)" % init)
        ctl_name = ctl_name or (old or {}).get("ctl_name") or DEFAULT_CTL
        data_name = data_name or (old or {}).get("data_name") or DEFAULT_DATA
        desired = _plan(tree, pyz, init, ctl_name, data_name)
        if not tree.exists("/usr/bin/python3") and not tree.exists("/usr/local/bin/python3"):
            self.log("warning: no python3 in the guest (/usr/bin/python3): the agent needs "
                     "python3 >= 3.8 to run")

        # decide what to do per entry
        actions = []  # (entry, manifest_record, staged_kind)
        records = []
        notes = []
        for d in desired:
            path, kind = d["path"], d["kind"]
            prev = old_entries.get(path)
            ours = prev is not None and prev.get("kind") == kind and not prev.get("kept_existing")
            hp = tree.host(path)
            present = os.path.lexists(hp)
            rec = {"path": path, "kind": kind}
            if kind in ("file", "config"):
                rec["sha256"] = sha256(d["content"])
                if kind == "config":
                    cur = self._current_sha(path)
                    if present and not ours:
                        rec.update(sha256=cur, kept_existing=True)
                        notes.append("kept the existing %s (not written by guestlink)" % path)
                        records.append(rec)
                        continue
                    if present and ours and cur != prev.get("sha256"):
                        rec["sha256"] = prev.get("sha256")
                        notes.append("kept %s: modified since install%s" % (
                            path, "" if cur is None else " (new defaults not applied)"))
                        records.append(rec)
                        continue
                if present and ours and self._current_sha(path) == rec["sha256"] \
                        and stat.S_IMODE(os.lstat(hp).st_mode) == d["mode"]:
                    records.append(dict(prev, **rec))
                    continue
                if ours and prev.get("backup"):
                    rec["backup"] = prev["backup"]
                actions.append((d, rec, present and not ours))
            elif kind == "symlink":
                rec["target"] = d["target"]
                if present and os.path.islink(hp) and os.readlink(hp) == d["target"] and (
                        ours or prev is None):
                    if prev is None:
                        # identical link made by someone else: adopt nothing, just leave it
                        rec["kept_existing"] = True
                    else:
                        rec = dict(prev, **rec)
                    records.append(rec)
                    continue
                if ours and prev.get("backup"):
                    rec["backup"] = prev["backup"]
                actions.append((d, rec, present and not ours))
            elif kind == "block":
                target_hp = tree.host(path, follow=True)
                exists = os.path.exists(target_hp)
                text = tree.read(path).decode("utf-8", "surrogateescape") if exists else ""
                stripped, had = strip_block(text)
                new = insert_block(stripped if exists else RC_LOCAL_SKELETON)
                mode = stat.S_IMODE(os.stat(target_hp).st_mode) if exists else 0o755
                if ours:
                    rec["created"] = prev.get("created", False)
                    rec["mode_before"] = prev.get("mode_before")
                else:
                    rec["created"] = not exists
                    rec["mode_before"] = mode if exists else None
                if exists and had and new == text and mode & 0o111:
                    records.append(rec)
                    continue
                d = dict(d, content=new.encode("utf-8", "surrogateescape"), mode=mode | 0o755)
                actions.append((d, rec, False))
        stale = [e for p, e in old_entries.items() if p not in {d["path"] for d in desired}]
        if old and old.get("init") and old.get("init") != init:
            notes.append("start method changed from %s to %s" % (old["init"], init))

        # space: everything staged at once, plus a margin
        need = sum(len(d.get("content", b"")) for d, _, _ in actions) + SPACE_MARGIN
        try:
            st = os.statvfs(tree.root)
            free = st.f_bavail * st.f_frsize
            if st.f_blocks and free < need:
                raise NoSpace("the guest filesystem is full: %d KiB free, %d KiB needed; nothing "
                              "was changed" % (free // 1024, need // 1024))
        except OSError:
            pass

        # stage
        self._fault("before-stage")
        try:
            staged = []
            for d, rec, backup in actions:
                if d["kind"] == "symlink":
                    tmp = self._stage_symlink(d["path"], d["target"])
                else:
                    gpath = d["path"]
                    if d["kind"] == "block":
                        gpath = tree.guest(tree.host(gpath, follow=True))
                    tmp = self._stage_bytes(gpath, d["content"], d["mode"])
                if backup:
                    self._makedirs(os.path.dirname(BACKUP_DIR + d["path"]))
                staged.append((d, rec, backup, tmp))
                self._fault("staged:" + d["path"])
            self._makedirs(os.path.dirname(MANIFEST))
        except OSError as exc:
            self._rollback_staging()
            raise _os_error(exc, "writing into the guest")
        except BaseException:
            self._rollback_staging()
            raise

        # commit: renames only (no new space); Ctrl-C waits until the manifest is written
        prev_version = (old or {}).get("agent_version")
        with _DeferSigint():
            try:
                for d, rec, backup, tmp in staged:
                    final = tree.host(d["path"], follow=d["kind"] == "block")
                    if backup:
                        bk = tree.host(BACKUP_DIR + d["path"])
                        if os.path.lexists(bk):
                            os.unlink(bk)
                        if os.path.islink(final) or not os.path.isfile(final):
                            os.rename(final, bk)
                        else:
                            os.link(final, bk)
                        rec["backup"] = BACKUP_DIR + d["path"]
                    os.rename(tmp, final)
                    records.append(rec)
                self.staged = []
                for e in stale:
                    self._undo(e, notes)
                    self._fault("stale-undone")
                created = list((old or {}).get("created_dirs", []))
                created += [c for c in self.created_dirs if c not in created]
                manifest = {
                    "format": 1,
                    "agent_version": version,
                    "previous_version": prev_version,
                    "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "init": init,
                    "ctl_name": ctl_name,
                    "data_name": data_name,
                    "entries": records,
                    "created_dirs": created,
                }
                self._write_manifest(manifest)
            except OSError as exc:
                self._rollback_staging()
                raise _os_error(exc, "committing the install")
        if prev_version is None:
            summary = "installed guestlink agent %s" % version
        elif prev_version == version:
            summary = "guestlink agent %s already installed%s" % (
                version, "; updated its files" if actions or stale else "; nothing to do")
        else:
            summary = "upgraded guestlink agent %s -> %s" % (prev_version, version)
        return {"action": "install", "version": version, "previous_version": prev_version,
                "init": init, "changed": [d["path"] for d, _, _ in actions] + [
                    e["path"] for e in stale], "notes": notes, "summary": summary,
                "ctl_name": ctl_name, "data_name": data_name}

    def _write_manifest(self, manifest):
        data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        self._makedirs(os.path.dirname(MANIFEST))
        tmp = self._stage_bytes(MANIFEST, data, 0o644)
        os.rename(tmp, self.tree.host(MANIFEST))
        self.staged = []

    # -- remove ----------------------------------------------------------------------------

    def _undo(self, e, notes):
        tree = self.tree
        path, kind = e["path"], e.get("kind")
        if e.get("kept_existing"):
            return
        if kind == "block":
            hp = tree.host(path, follow=True)
            if not os.path.exists(hp):
                return
            text = tree.read(path).decode("utf-8", "surrogateescape")
            new, had = strip_block(text)
            if e.get("created") and new.strip() in ("", RC_LOCAL_SKELETON.strip(), "#!/bin/sh"):
                os.unlink(hp)
                return
            if had:
                tmp = hp + _TMP_SUFFIX
                with open(tmp, "wb") as f:
                    f.write(new.encode("utf-8", "surrogateescape"))
                mode = e.get("mode_before")
                os.chmod(tmp, mode if mode is not None else stat.S_IMODE(os.stat(hp).st_mode))
                os.rename(tmp, hp)
            return
        hp = tree.host(path)
        if kind == "config" and os.path.lexists(hp) and self._current_sha(path) != e.get("sha256"):
            notes.append("kept %s: modified since install" % path)
            return
        if kind == "symlink" and os.path.islink(hp) and os.readlink(hp) != e.get("target"):
            notes.append("kept %s: changed since install" % path)
            return
        if os.path.lexists(hp):
            os.unlink(hp)
        if e.get("backup"):
            bk = tree.host(e["backup"])
            if os.path.lexists(bk):
                os.rename(bk, hp)

    def remove(self):
        tree = self.tree
        man = read_manifest(tree)
        if man is None:
            found = [p for p in (AGENT_PYZ, WRAPPER, SYSTEMD_UNIT, SYSV_SCRIPT) if tree.lexists(p)]
            if found:
                raise ImageError("no %s in the guest, but %s exist: not installed by "
                                 "`guestlink image install`; nothing removed"
                                 % (MANIFEST, ", ".join(found)), EXIT_DATAERR)
            return {"action": "remove", "removed": False, "version": None, "notes": [],
                    "summary": "guestlink agent is not installed; nothing to do"}
        notes = []
        try:
            with _DeferSigint():
                for e in reversed(man["entries"]):
                    self._undo(e, notes)
                    self._fault("undone:" + e["path"])
                os.unlink(tree.host(MANIFEST))
                for gdir in reversed(man.get("created_dirs", [])):
                    hp = tree.host(gdir, follow=True)
                    try:
                        os.rmdir(hp)
                    except FileNotFoundError:
                        pass
                    except OSError:
                        if os.path.isdir(hp):
                            notes.append("kept directory %s: not empty" % gdir)
        except OSError as exc:
            raise _os_error(exc, "removing from the guest")
        return {"action": "remove", "removed": True, "version": man.get("agent_version"),
                "notes": notes,
                "summary": "removed guestlink agent %s" % man.get("agent_version")}


# --- status --------------------------------------------------------------------------------

def status(tree):
    """What is installed (dict; also the ``--json`` output of ``image status``)."""
    man = read_manifest(tree)
    pyz = tree.read_or_none(AGENT_PYZ)
    out = {"installed": man is not None, "agent_version": pyz_version(pyz) if pyz else None,
           "manifest": MANIFEST if man else None}
    if man is None:
        out["init"] = None
        out["foreign_files"] = [p for p in (AGENT_PYZ, WRAPPER, SYSTEMD_UNIT, SYSV_SCRIPT)
                                if tree.lexists(p)]
        return out
    out.update(manifest_version=man.get("agent_version"), init=man.get("init"),
               installed_at=man.get("installed_at"), previous_version=man.get("previous_version"),
               ctl_name=man.get("ctl_name"), data_name=man.get("data_name"))
    files = []
    for e in man["entries"]:
        path = e["path"]
        hp = tree.host(path, follow=e.get("kind") == "block")
        state = "present"
        if not os.path.lexists(hp):
            state = "missing"
        elif e.get("kind") in ("file", "config"):
            with open(tree.host(path, follow=True), "rb") as f:
                if sha256(f.read()) != e.get("sha256"):
                    state = "modified"
        elif e.get("kind") == "symlink":
            if not os.path.islink(hp) or os.readlink(hp) != e.get("target"):
                state = "modified"
        elif e.get("kind") == "block":
            if not strip_block(tree.read(path).decode("utf-8", "surrogateescape"))[1]:
                state = "missing"
        if e.get("kept_existing"):
            state += " (not ours)"
        files.append({"path": path, "kind": e.get("kind"), "state": state})
    out["files"] = files
    out["config"] = {"path": CONFIG, "ctl_name": man.get("ctl_name"),
                     "data_name": man.get("data_name"),
                     "modified": any(f["path"] == CONFIG and f["state"].startswith("modified")
                                     for f in files)}
    return out
