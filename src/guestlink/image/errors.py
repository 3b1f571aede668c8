"""Errors of ``guestlink image``; each carries its exit status (sysexits style, see cli.EPILOG)."""

EXIT_DATAERR = 65      # no root filesystem / unknown filesystem / unreadable image / bad manifest
EXIT_UNAVAILABLE = 69  # no backend works here (missing tools, modules, devices)
EXIT_SOFTWARE = 70     # anything else
EXIT_CANTCREAT = 73    # image or guest filesystem read-only, or full
EXIT_TEMPFAIL = 75     # the image is in use (a running VM holds its lock)
EXIT_NOPERM = 77       # permission denied (loop/nbd need root)
EXIT_INTERRUPTED = 130


class ImageError(Exception):
    """A failure with a one-line message meant for the user."""

    exit_code = EXIT_SOFTWARE

    def __init__(self, message, exit_code=None):
        Exception.__init__(self, message)
        if exit_code is not None:
            self.exit_code = exit_code


class ImageInUse(ImageError):
    exit_code = EXIT_TEMPFAIL


class ReadOnly(ImageError):
    exit_code = EXIT_CANTCREAT


class NoSpace(ImageError):
    exit_code = EXIT_CANTCREAT


class NoRootFilesystem(ImageError):
    exit_code = EXIT_DATAERR


class BackendUnavailable(ImageError):
    """The backend cannot run here (missing tool/module/device/permission); auto tries the next."""

    exit_code = EXIT_UNAVAILABLE


class BadGuestFile(ImageError):
    """A file the installer must read from the image is not a regular file, or is too large."""

    exit_code = EXIT_DATAERR
