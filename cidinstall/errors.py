"""The errors of an install: each names what went wrong and whether trying again may help (``retry``)."""

from __future__ import annotations

import errno
from pathlib import Path

from cidcommon.errors import CidError


class InstallError(CidError):
    """An install that cannot go on; ``retry`` says whether trying again later may help."""

    code = "install_failed"
    retry = False

    def __init__(self, message: str, *, retry: bool | None = None) -> None:
        super().__init__(message)
        if retry is not None:
            self.retry = retry


class DownloadError(InstallError):
    """The image could not be fetched (HTTP error, refused connection, timeout, dropped download)."""

    retry = True


class VerifyError(InstallError):
    """The bytes received are not the image asked for (size or sha256 mismatch)."""


class TargetError(InstallError):
    """The install target cannot take the image (full, read-only, not writable, missing)."""


def unwritable_target(path: Path | str, exc: OSError, label: str = "target") -> TargetError:
    """Return the TargetError for ``exc`` raised while writing into ``path`` (called ``label path`` in the
    message): read-only, full, or not writable."""
    if exc.errno == errno.EROFS:
        return TargetError(f"{label} {path} is read-only")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return TargetError(f"target full: {path} has no room left ({exc.strerror or exc})")
    return TargetError(f"{label} {path} is not writable: {exc.strerror or exc}")


class ArchiveError(InstallError):
    """The image is not a good archive: corrupt or truncated stream, unsafe member, tar error."""
