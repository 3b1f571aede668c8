"""Agent configuration: built-in defaults < INI config file < command-line flags.

The file is read with configparser; every key is documented in ``agent/README.md``.
"""
import configparser
import errno
import fnmatch
import os
import re
import shlex
import stat
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..protocol.ports import CTL_NAME, DATA_NAME

DEFAULT_CONFIG_PATH = "/etc/guestlink/agent.conf"
MAX_CONFIG_SIZE = 1 << 20
LOG_LEVELS = ("debug", "info", "warning", "error")

_SIZE_RE = re.compile(r"\A\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

# section -> key -> (attribute, parser name)
_KEYS = {
    "agent": {
        "ctl_name": "str", "data_name": "str", "ctl_device": "str", "data_device": "str",
        "socket": "str",
        "handlers_dir": "str", "log_level": "log_level",
    },
    "policy": {"allow": "patterns", "deny": "patterns"},
    "exec": {"max_concurrent": "count", "max_output": "size", "max_timeout": "seconds"},
    "power": {"poweroff_command": "command", "reboot_command": "command"},
    "files": {"read_roots": "paths", "write_roots": "paths", "test_hooks": "bool"},
}


class ConfigError(Exception):
    """The configuration file or a flag is invalid; the message is meant for the user."""


class UntrustedFile(Exception):
    """A file or directory the agent (often root) must not take orders from; one-line message."""


# -- trusted files ---------------------------------------------------------------------------
#
# The config and the handler files decide what the agent runs as root, so only their owner (root
# or the agent's own user) may be able to change them: anyone else who can write one of them, or
# the directory holding it, could make the agent run anything. Each check is made with fstat on
# the descriptor that is then read (opened without following a final symlink), never by path, so
# nothing can be swapped in between.

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted under the expected name must not hang the agent.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def check_trusted(st: os.stat_result, path: str) -> None:
    """Raise UntrustedFile unless ``st`` is owned by root or us and not writable by group/other."""
    if st.st_uid not in (0, os.geteuid()):
        raise UntrustedFile("%s is owned by uid %d, not by root or the agent's user" % (path, st.st_uid))
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedFile("%s is writable by its group or by others (mode %04o)" % (
            path, stat.S_IMODE(st.st_mode)))


def _open_checked(path: str, flags: int, dir_fd: Optional[int] = None,
                  shown: Optional[str] = None) -> Tuple[int, os.stat_result]:
    shown = shown or path
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedFile("%s is a symbolic link" % shown)
        raise
    try:
        st = os.fstat(fd)
        check_trusted(st, shown)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_trusted_dir(path: str) -> int:
    """A descriptor of the directory ``path`` after checking it; FileNotFoundError if missing."""
    return _open_checked(path, _DIR_FLAGS)[0]


def read_trusted_file(dir_fd: int, name: str, shown: str, limit: int) -> bytes:
    """The contents of regular file ``name`` in the (checked) directory ``dir_fd``, at most
    ``limit`` bytes, after checking the file; UntrustedFile (or OSError) otherwise."""
    fd, st = _open_checked(name, _FILE_FLAGS, dir_fd=dir_fd, shown=shown)
    try:
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedFile("%s is not a regular file" % shown)
        if st.st_size > limit:
            raise UntrustedFile("%s is larger than %d bytes" % (shown, limit))
        chunks = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise UntrustedFile("%s is larger than %d bytes" % (shown, limit))
        return b"".join(chunks)
    finally:
        os.close(fd)


class Config:
    """Every setting of the agent. Attribute names equal the config-file keys."""

    def __init__(self) -> None:
        self.ctl_name = CTL_NAME
        self.data_name = DATA_NAME
        self.ctl_device = ""  # empty: find the port by name; "unix:PATH" for development
        self.data_device = ""  # the same for the data port
        self.socket = "/run/guestlink/agent.sock"
        self.handlers_dir = "/etc/guestlink/handlers.d"
        self.log_level = "info"
        self.allow = ["*"]
        self.deny: List[str] = []
        self.max_concurrent = 32
        self.max_output = 16 << 20
        self.max_timeout = 0.0  # 0: no limit
        self.poweroff_command: List[str] = []  # empty: systemctl / poweroff / busybox poweroff -f
        self.reboot_command: List[str] = []
        self.read_roots = ["/"]  # file transfers: where the host may read (pull, stat, list)
        self.write_roots = ["/"]  # ... and write (push, mkdir, symlink, setattr, remove)
        self.test_hooks = False  # honour test-only request fields (e.g. corrupt a chunk)
        self.config_path: Optional[str] = None  # the file that was read, if any

    def __repr__(self) -> str:
        return "Config(%s)" % ", ".join("%s=%r" % kv for kv in sorted(vars(self).items()))

    # -- policy ------------------------------------------------------------------------------

    def policy_allows(self, op: str) -> bool:
        """Deny wins over allow; both are fnmatch patterns of op names."""
        if any(fnmatch.fnmatchcase(op, p) for p in self.deny):
            return False
        return any(fnmatch.fnmatchcase(op, p) for p in self.allow)

    def denial_reason(self, op: str) -> str:
        for p in self.deny:
            if fnmatch.fnmatchcase(op, p):
                return "operation %r is denied by the agent's policy (deny = %s)" % (op, p)
        return "operation %r is denied by the agent's policy (not matched by allow = %s)" % (
            op, " ".join(self.allow) or "(empty)")


# -- value parsers ---------------------------------------------------------------------------

def parse_patterns(text: str) -> List[str]:
    return [p for p in re.split(r"[\s,]+", text.strip()) if p]


def parse_size(text: object) -> int:
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError("expected a size such as 1048576, 512K or 16M")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def _parse(kind: str, text: str) -> Any:
    text = text.strip()
    if kind == "str":
        return text
    if kind == "log_level":
        if text.lower() not in LOG_LEVELS:
            raise ValueError("expected one of %s" % ", ".join(LOG_LEVELS))
        return text.lower()
    if kind == "patterns":
        return parse_patterns(text)
    if kind == "count":
        try:
            value = int(text)
        except ValueError:
            raise ValueError("expected a positive integer")
        if value < 1:
            raise ValueError("expected a positive integer")
        return value
    if kind == "size":
        return parse_size(text)
    if kind == "paths":
        paths = parse_patterns(text)
        for p in paths:
            if not os.path.isabs(p):
                raise ValueError("expected absolute paths, not %r" % p)
        return [os.path.normpath(p) for p in paths]
    if kind == "bool":
        if text.lower() in ("1", "yes", "true", "on"):
            return True
        if text.lower() in ("0", "no", "false", "off"):
            return False
        raise ValueError("expected true or false")
    if kind == "command":
        try:
            return shlex.split(text)
        except ValueError as exc:
            raise ValueError("not a valid command line: %s" % exc)
    if kind == "seconds":
        try:
            seconds = float(text)
        except ValueError:
            raise ValueError("expected a number of seconds")
        if not seconds >= 0 or seconds == float("inf"):
            raise ValueError("expected a number of seconds >= 0")
        return seconds
    raise AssertionError(kind)


def read_config_file(config: Config, path: str, required: bool) -> Config:
    """Apply the INI file at ``path`` to ``config``. A missing file is an error only if required."""
    parser = configparser.ConfigParser(interpolation=None, empty_lines_in_values=False)
    try:
        dir_fd = open_trusted_dir(os.path.dirname(path) or ".")
        try:
            data = read_trusted_file(dir_fd, os.path.basename(path), path, MAX_CONFIG_SIZE)
        finally:
            os.close(dir_fd)
        parser.read_string(data.decode("utf-8"), path)
    except FileNotFoundError:
        if required:
            raise ConfigError("config file %s does not exist" % path)
        return config
    except UntrustedFile as exc:
        raise ConfigError("refusing config file %s: %s" % (path, exc))
    except OSError as exc:
        raise ConfigError("cannot read config file %s: %s" % (path, exc.strerror or exc))
    except UnicodeDecodeError:
        raise ConfigError("config file %s is not UTF-8 text" % path)
    except configparser.Error as exc:
        raise ConfigError("config file %s is invalid: %s" % (path, " ".join(str(exc).split())))
    for section in parser.sections():
        keys = _KEYS.get(section)
        if keys is None:
            raise ConfigError("config file %s: unknown section [%s] (known: %s)" % (
                path, section, ", ".join("[%s]" % s for s in _KEYS)))
        for key, value in parser.items(section):
            kind = keys.get(key)
            if kind is None:
                raise ConfigError("config file %s: unknown key %r in [%s] (known: %s)" % (
                    path, key, section, ", ".join(sorted(keys))))
            try:
                setattr(config, key, _parse(kind, value))
            except ValueError as exc:
                raise ConfigError("config file %s: [%s] %s = %r: %s" % (path, section, key, value, exc))
    config.config_path = path
    return config


def load_config(path: Optional[str] = None,
                overrides: Optional[Mapping[str, Optional[str]]] = None) -> Config:
    """Build the configuration. ``path`` None reads the default file if it exists.

    ``overrides`` maps key -> raw string from command-line flags (None values are ignored).
    """
    config = Config()
    read_config_file(config, path or DEFAULT_CONFIG_PATH, required=path is not None)
    kinds: Dict[str, str] = {}
    for keys in _KEYS.values():
        kinds.update(keys)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        try:
            setattr(config, key, _parse(kinds[key], value))
        except ValueError as exc:
            raise ConfigError("--%s %s: %s" % (key.replace("_", "-"), value, exc))
    for key in ("ctl_name", "data_name", "socket"):
        if not getattr(config, key):
            raise ConfigError("%s must not be empty" % key)
    if config.ctl_device.startswith("unix:") and len(config.ctl_device) == 5:
        raise ConfigError("ctl_device unix: needs a socket path (unix:/path/to.sock)")
    if not os.path.isabs(config.socket):
        raise ConfigError("socket must be an absolute path, not %r" % config.socket)
    return config
