"""The one table of error codes shared by agent and host.

An ERROR frame carries one of these codes; the host maps each code to one exception class
(see ``guestlink.host.errors``). A code the host does not know maps to the generic RemoteError.
"""

BAD_REQUEST = "bad_request"
UNKNOWN_COMMAND = "unknown_command"
DENIED = "denied"
NOT_FOUND = "not_found"
PERMISSION_DENIED = "permission_denied"
EXISTS = "exists"
IS_A_DIRECTORY = "is_a_directory"
NOT_A_DIRECTORY = "not_a_directory"
NO_SPACE = "no_space"
IO_ERROR = "io_error"
TIMEOUT = "timeout"
CANCELLED = "cancelled"
BUSY = "busy"
TOO_LARGE = "too_large"
NOT_READY = "not_ready"
PROTOCOL_MISMATCH = "protocol_mismatch"
CHECKSUM_MISMATCH = "checksum_mismatch"
CHANGED = "changed"
HANDLER_ERROR = "handler_error"
INTERNAL = "internal"

#: code -> meaning; docs/protocol.md renders the same table.
ERROR_CODES = {
    BAD_REQUEST: "the request is malformed or one of its fields is invalid",
    UNKNOWN_COMMAND: "the agent has no command of that name",
    DENIED: "the agent's policy refuses this command or path",
    NOT_FOUND: "a file, directory, program or topic does not exist",
    PERMISSION_DENIED: "the operating system refused access",
    EXISTS: "the target exists and the request did not allow replacing it",
    IS_A_DIRECTORY: "a file was expected but the path is a directory",
    NOT_A_DIRECTORY: "a directory was expected but the path is not one",
    NO_SPACE: "the file system is full",
    IO_ERROR: "another operating-system error",
    TIMEOUT: "the operation ran past its deadline",
    CANCELLED: "the operation was cancelled by the peer",
    BUSY: "the resource is in use (for example the data port by another transfer)",
    TOO_LARGE: "a size limit was exceeded",
    NOT_READY: "the agent has not been synchronised with this host session yet",
    PROTOCOL_MISMATCH: "the peers speak incompatible protocol versions",
    CHECKSUM_MISMATCH: "data arrived corrupted",
    CHANGED: "a file changed while it was being read",
    HANDLER_ERROR: "a user-supplied command handler raised an exception",
    INTERNAL: "a bug in the agent; its log has the details",
}


def errno_to_code(errno_value: int) -> str:
    """Map an OSError's errno to a protocol error code."""
    import errno as _errno

    return {
        _errno.ENOENT: NOT_FOUND,
        _errno.EACCES: PERMISSION_DENIED,
        _errno.EPERM: PERMISSION_DENIED,
        _errno.EROFS: PERMISSION_DENIED,
        _errno.EEXIST: EXISTS,
        _errno.EISDIR: IS_A_DIRECTORY,
        _errno.ENOTDIR: NOT_A_DIRECTORY,
        _errno.ENOSPC: NO_SPACE,
        _errno.EDQUOT: NO_SPACE,
        _errno.EBUSY: BUSY,
        _errno.EFBIG: TOO_LARGE,
    }.get(errno_value, IO_ERROR)
