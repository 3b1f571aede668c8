"""Errors of ``guestlink image``; each carries its exit status (from the one table,
guestlink.exitcodes, which also says what each means for ``guestlink image``)."""

from typing import Optional

from ..exitcodes import (EXIT_CANTCREAT, EXIT_DATAERR, EXIT_INTERRUPTED, EXIT_NOPERM,  # noqa: F401
                         EXIT_SOFTWARE, EXIT_TEMPFAIL, EXIT_UNAVAILABLE)


class ImageError(Exception):
    """A failure with a one-line message meant for the user."""

    exit_code = EXIT_SOFTWARE

    def __init__(self, message: str, exit_code: Optional[int] = None) -> None:
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
