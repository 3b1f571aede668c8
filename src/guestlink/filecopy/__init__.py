"""The file-copy code both sides run: the data-channel sender and receiver and the commit step.

Stdlib-only and CPython 3.8-compatible, because it is bundled into the agent zipapp; it imports
``guestlink.protocol`` and nothing from ``guestlink.host`` or ``guestlink.agent``, so the host
library and the agent share it without depending on each other.
"""
