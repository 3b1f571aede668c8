"""What the agent says about itself (its SYNC_ACK: :class:`AgentInfo`) and about its guest (the
``info`` reply: :func:`parse_info`), validated: everything received is untrusted."""

import collections.abc
from typing import Any, Dict, Iterator, List, Mapping

from ..protocol import Fields, ProtocolViolation
from ..protocol import messages as m


class AgentInfo(collections.abc.Mapping):
    """The agent's validated self-description from its SYNC_ACK.

    A read-only mapping with the wire keys (``agent``, ``agent_version``, ``protocol``,
    ``capabilities``, ``hostname``, ``boot_id``, ``session``) and attributes ``name``,
    ``version``, ``protocol``, ``capabilities`` (tuple), ``hostname``, ``boot_id``, ``session``.
    """

    __slots__ = ("_d",)

    def __init__(self, description: Mapping[str, Any]) -> None:
        d = dict(description)
        d["capabilities"] = tuple(d.get("capabilities", ()))
        self._d = d

    def __getitem__(self, key: str) -> Any:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return "AgentInfo(%r)" % (self._d,)

    name = property(lambda self: self._d["agent"])
    version = property(lambda self: self._d["agent_version"])
    protocol = property(lambda self: self._d["protocol"])
    capabilities = property(lambda self: self._d["capabilities"])
    hostname = property(lambda self: self._d["hostname"])
    boot_id = property(lambda self: self._d["boot_id"])
    session = property(lambda self: self._d["session"])


def parse_info(reply: Dict[str, Any]) -> Dict[str, Any]:
    """The ``info`` reply's fields, validated (ProtocolViolation otherwise)."""
    f = Fields(reply, "info reply")
    kernel = f.object("kernel")
    addresses: List[Dict[str, str]] = []
    raw = reply.get("addresses") or []
    if not isinstance(raw, list) or len(raw) > m.MAX_LIST:
        raise ProtocolViolation("info reply: field 'addresses' must be a list")
    for item in raw:
        a = Fields(item, "info reply.addresses[]")
        family = a.str("family", max_len=16)
        if family not in ("inet", "inet6"):
            raise ProtocolViolation("info reply: address family must be inet or inet6")
        addresses.append({"interface": a.str("interface", max_len=m.MAX_NAME),
                          "family": family, "address": a.str("address", max_len=m.MAX_NAME)})
    return {
        "hostname": f.str("hostname", max_len=m.MAX_NAME),
        "os_release": f.str_map("os_release", default={}),
        "kernel": {"release": kernel.str("release", default=""),
                   "version": kernel.str("version", default=""),
                   "machine": kernel.str("machine", default="")},
        "uptime": f.number("uptime", default=None, min=0),
        "agent_version": f.str("agent_version", max_len=m.MAX_NAME),
        "protocol": f.int("protocol", min=0, max=0xFFFF),
        "boot_id": f.str("boot_id", default="", max_len=m.MAX_NAME),
        "python": f.str("python", default="", max_len=m.MAX_NAME),
        "addresses": addresses,
        "capabilities": f.str_list("capabilities", default=[], max_items=256, max_len=m.MAX_NAME),
    }
