"""The guestlink guest agent (stdlib-only, CPython >= 3.8).

Layout, like uvicorn: ``cli`` (argparse) -> ``config`` (defaults < file < flags) -> ``server``
(one single-threaded selector loop). Imports only ``guestlink.protocol``, ``guestlink._version``
and its own modules, so it runs from the zipapp made by ``guestlink.bundle``.
"""
