"""Facts about the guest for HELLO and ``info``, from /proc, /etc and the stdlib only."""
import array
import fcntl
import logging
import os
import shlex
import socket
import struct
import sys
from typing import Any, Dict, Iterable, List, Optional

log = logging.getLogger("guestlink.agent")

SIOCGIFADDR = 0x8915


def read_text(path: str, default: Optional[str] = "") -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return default


def _read_text(path: str) -> str:
    """The file's text, "" when it cannot be read."""
    return read_text(path) or ""


def boot_id() -> str:
    return _read_text("/proc/sys/kernel/random/boot_id").strip()


def hostname() -> str:
    return socket.gethostname()


def parse_os_release(text: str) -> Dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        if not key.replace("_", "").isalnum():
            continue
        try:
            parts = shlex.split(value, posix=True)
            value = " ".join(parts)
        except ValueError:
            value = value.strip().strip("\"'")
        out[key] = value
    return out


def os_release() -> Dict[str, str]:
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        text = read_text(path, None)
        if text is not None:
            return parse_os_release(text)
    return {}


def uptime() -> float:
    try:
        return float(_read_text("/proc/uptime").split()[0])
    except (IndexError, ValueError):
        return 0.0


def _ipv4_addresses() -> List[Dict[str, str]]:
    out: List[Dict[str, str]] = []
    try:
        interfaces = socket.if_nameindex()
    except OSError:
        return out
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in interfaces:
            req = array.array("B", struct.pack("256s", name.encode()[:15]))
            try:
                fcntl.ioctl(s.fileno(), SIOCGIFADDR, req, True)
            except OSError:
                continue  # no IPv4 address on this interface
            addr = socket.inet_ntoa(req.tobytes()[20:24])
            out.append({"interface": name, "family": "inet", "address": addr})
    return out


def _ipv6_addresses() -> List[Dict[str, str]]:
    out = []
    for line in _read_text("/proc/net/if_inet6").splitlines():
        fields = line.split()
        if len(fields) < 6 or len(fields[0]) != 32:
            continue
        try:
            addr = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[0]))
        except ValueError:
            continue
        out.append({"interface": fields[5], "family": "inet6", "address": addr})
    return out


def addresses() -> List[Dict[str, str]]:
    return _ipv4_addresses() + _ipv6_addresses()


def info(version: str, protocol: int, capabilities: Iterable[str]) -> Dict[str, Any]:
    uname = os.uname()
    return {
        "hostname": hostname(),
        "os_release": os_release(),
        "kernel": {"release": uname.release, "version": uname.version, "machine": uname.machine},
        "uptime": uptime(),
        "agent_version": version,
        "protocol": protocol,
        "boot_id": boot_id(),
        "python": "%d.%d.%d" % tuple(sys.version_info[:3]),
        "addresses": addresses(),
        "capabilities": list(capabilities),
    }
