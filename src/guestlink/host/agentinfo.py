"""What the agent says about itself (its SYNC_ACK: :class:`AgentInfo`) and about its guest (the
``info`` reply: :func:`parse_info`), validated: everything received is untrusted."""

import collections.abc
from typing import Any, Dict, Iterator, Mapping



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
    """The ``info`` reply's fields, validated (ProtocolViolation otherwise): the checks are
    :class:`guestlink.protocol.ops.Info`'s, the agent's own definition of the reply."""
    from ..protocol.ops import Info  # here: the lean one-shot path parses no info reply

    return Info.from_wire(reply).to_wire()
