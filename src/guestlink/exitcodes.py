"""Every exit status of the ``guestlink`` command, in one table (sysexits.h style).

The image installer's errors carry these numbers (guestlink.image.errors); the CLI maps the host
library's errors to them (guestlink.cli.common.exit_code_for) and generates the "exit status:"
part of each command's help from :data:`TABLE` (:func:`help_text`), so the help cannot drift
from the code. A leaf module: the image package uses it without depending on the CLI.
(``guestlink-agent``, the guest's own command, has its own few statuses in guestlink.agent.cli.)
"""

import textwrap
from typing import NamedTuple, Tuple

EXIT_OK = 0
EXIT_PROBLEMS = 1          # doctor: a required item failed
EXIT_USAGE = 2             # bad command line (EX_USAGE is 64, but argparse uses 2)
EXIT_DATAERR = 65          # EX_DATAERR: image: no/unknown root filesystem, unreadable image
EXIT_NOINPUT = 66          # EX_NOINPUT: image install --agent FILE cannot be read
EXIT_NOHOST = 68           # EX_NOHOST: no libvirt domain of that name or UUID
EXIT_UNAVAILABLE = 69      # EX_UNAVAILABLE: the VM or libvirt cannot be reached; no image backend
EXIT_SOFTWARE = 70         # EX_SOFTWARE: any other error; an internal error (a bug)
EXIT_CANTCREAT = 73        # EX_CANTCREAT: a local output file, or the image, cannot be written
EXIT_IOERR = 74            # EX_IOERR: connection lost, request not sent, local I/O error
EXIT_TEMPFAIL = 75         # EX_TEMPFAIL: no answer in time; the VM or the image is in use
EXIT_PROTOCOL = 76         # EX_PROTOCOL: protocol mismatch or malformed answer
EXIT_NOPERM = 77           # EX_NOPERM: denied by the agent's policy, or permission denied
EXIT_CONFIG = 78           # EX_CONFIG: the libvirt domain has no guestlink channels
EXIT_TIMEOUT = 124         # exec: the command ran past --timeout (as timeout(1))
EXIT_CANNOT_RUN = 126      # exec: the program exists but cannot be run (as the shell/env(1))
EXIT_NOT_FOUND = 127       # exec: the program does not exist (as the shell/env(1))
EXIT_INTERRUPTED = 130     # Ctrl-C

# The command groups whose help lists exit statuses; a status can mean different things in each.
VM = "vm"          # the VM commands (ping, exec, cp, ...), libvirt and list
IMAGE = "image"
DOCTOR = "doctor"


class Status(NamedTuple):
    code: int
    group: str
    meaning: str


TABLE: Tuple[Status, ...] = (
    Status(EXIT_OK, VM, "success (exec: the command's own exit status; killed by signal N: 128+N)"),
    Status(EXIT_USAGE, VM, "usage error"),
    Status(EXIT_NOHOST, VM, "no libvirt domain of that name or UUID"),
    Status(EXIT_UNAVAILABLE, VM, "control socket missing, or nobody listening on it (is the VM "
                                 "running?); libvirt domain not running; libvirt not reachable"),
    Status(EXIT_SOFTWARE, VM, "other error reported by the agent, or an internal error (please "
                              "report it)"),
    Status(EXIT_CANTCREAT, VM, "local output file cannot be written"),
    Status(EXIT_IOERR, VM, "connection lost (outcome unknown) or request not sent"),
    Status(EXIT_TEMPFAIL, VM, "the agent did not answer in time"),
    Status(EXIT_PROTOCOL, VM, "protocol mismatch or malformed answer from the agent"),
    Status(EXIT_NOPERM, VM, "denied by the agent's policy, or permission denied"),
    Status(EXIT_CONFIG, VM, "the libvirt domain has no guestlink channels (guestlink libvirt "
                            "attach DOMAIN)"),
    Status(EXIT_TIMEOUT, VM, "exec: the command timed out (--timeout)"),
    Status(EXIT_CANNOT_RUN, VM, "exec: the program cannot be run in the guest"),
    Status(EXIT_NOT_FOUND, VM, "exec: the program does not exist in the guest"),
    Status(EXIT_INTERRUPTED, VM, "interrupted (Ctrl-C); a running command is cancelled in the "
                                 "guest (a second Ctrl-C quits without waiting for the guest)"),

    Status(EXIT_OK, IMAGE, "success"),
    Status(EXIT_USAGE, IMAGE, "usage error (also: the format cannot be told from the name; give "
                              "--format)"),
    Status(EXIT_DATAERR, IMAGE, "no root filesystem / unknown filesystem / unreadable image / "
                                "damaged manifest"),
    Status(EXIT_NOINPUT, IMAGE, "the --agent file cannot be read"),
    Status(EXIT_UNAVAILABLE, IMAGE, "no backend can run here (the message lists what each one "
                                    "lacks)"),
    Status(EXIT_SOFTWARE, IMAGE, "other error"),
    Status(EXIT_CANTCREAT, IMAGE, "the image or the guest filesystem is read-only or full "
                                  "(nothing was changed)"),
    Status(EXIT_TEMPFAIL, IMAGE, "the image is in use by a running VM (its QEMU lock is held); "
                                 "--force overrides"),
    Status(EXIT_NOPERM, IMAGE, "permission denied"),
    Status(EXIT_INTERRUPTED, IMAGE, "interrupted (everything set up so far is undone)"),

    Status(EXIT_OK, DOCTOR, "every item passes (items marked optional may fail)"),
    Status(EXIT_PROBLEMS, DOCTOR, "an item that is not optional fails"),
)


def help_text(group: str) -> str:
    """The "exit status:" section of a command's help: one entry per status of ``group``."""
    lines = ["exit status:"]
    for status in TABLE:
        if status.group == group:
            lines.extend(textwrap.wrap(status.meaning, width=88, initial_indent="%5d  " % status.code,
                                       subsequent_indent=" " * 7))
    return "\n".join(lines) + "\n"
