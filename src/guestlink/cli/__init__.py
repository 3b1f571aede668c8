"""The ``guestlink`` command line (host side; ``guestlink agent ...`` runs the guest agent).

One module per command group, importing in one direction: :mod:`.common` (the exit path, VM
addressing, argument types, output) <- the groups (:mod:`.vm`, :mod:`.files`, :mod:`.libvirt`,
:mod:`.image`, :mod:`.doctor`, :mod:`.agent`) <- :mod:`.app` (the parser, dispatch, Ctrl-C and
the last resort). The exit statuses are guestlink.exitcodes' one table. tests/unit/
test_architecture.py checks that no import cycle runs through this package.
"""

from ..exitcodes import (EXIT_CANNOT_RUN, EXIT_CANTCREAT, EXIT_CONFIG, EXIT_DATAERR,
                         EXIT_INTERRUPTED, EXIT_IOERR, EXIT_NOHOST, EXIT_NOINPUT, EXIT_NOPERM,
                         EXIT_NOT_FOUND, EXIT_OK, EXIT_PROBLEMS, EXIT_PROTOCOL, EXIT_SOFTWARE,
                         EXIT_TEMPFAIL, EXIT_TIMEOUT, EXIT_UNAVAILABLE, EXIT_USAGE)
from .app import COMMANDS, check_args, build_parser, main
from .common import Target, UsageError, exit_code_for, local_error, resolve_target

__all__ = [
    "EXIT_CANNOT_RUN", "EXIT_CANTCREAT", "EXIT_CONFIG", "EXIT_DATAERR", "EXIT_INTERRUPTED",
    "EXIT_IOERR", "EXIT_NOHOST", "EXIT_NOINPUT", "EXIT_NOPERM", "EXIT_NOT_FOUND", "EXIT_OK",
    "EXIT_PROBLEMS", "EXIT_PROTOCOL", "EXIT_SOFTWARE", "EXIT_TEMPFAIL", "EXIT_TIMEOUT",
    "EXIT_UNAVAILABLE", "EXIT_USAGE", "COMMANDS", "Target", "UsageError", "check_args",
    "build_parser", "exit_code_for", "local_error", "main", "resolve_target"]
