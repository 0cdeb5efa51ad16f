"""The marker of an installed image (``<target>/etc/cid-image``), the ``.cid-incomplete`` flag and the node's
agent token in the installed system. Nothing here follows a symlink the image carries.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import structlog

from cidinstall.errors import TargetError, unwritable_target
from cidinstall.types import InstallRequest

log = structlog.get_logger(__name__)

#: The marker of an installed image, relative to the target; and the flag of an unfinished install.
MARKER = "etc/cid-image"
INCOMPLETE = ".cid-incomplete"


def _open_dir(path: Path) -> int:
    """Return a file descriptor of the directory ``path`` (raises OSError)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def _write_at(dir_fd: int, name: str, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``name`` in ``dir_fd`` through a temporary file and a rename, following no symlink.

    Not fsync'ed: making the install durable is the target's ``finish`` (a ``sync`` of everything, done before
    the result is reported). Raises OSError.
    """
    tmp = name + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
        try:
            os.fchmod(fd, mode)
            os.write(fd, text.encode("utf-8"))
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _rewrite_at(dir_fd: int, name: str, text: str) -> None:
    """Overwrite the existing regular file ``name`` in place (needs no new inode: works on a full disk).

    Raises OSError (ELOOP for a symlink, FileNotFoundError when absent).
    """
    fd = os.open(name, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def _etc_fd(target: Path, *, create: bool) -> int | None:
    """Return a descriptor of ``<target>/etc`` opened without following a symlink (None when absent).

    Raises OSError (ELOOP when the image's etc is a symlink).
    """
    root = _open_dir(target)
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir("etc", 0o755, dir_fd=root)
        try:
            return os.open("etc", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
        except FileNotFoundError:
            return None
    finally:
        os.close(root)


def _incomplete_flag(root: Path) -> str | None:
    """Return the first line of ``<root>/.cid-incomplete`` (a note when it cannot be read), or None when there is
    no such entry. Never follows a symlink; never raises."""
    path = root / INCOMPLETE
    try:
        os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # cannot even tell: never take the root as installed
        return f"cannot check {path}: {exc.strerror or exc}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            first = os.read(fd, 4096).decode("utf-8", "replace").split("\n", 1)[0].strip()
        finally:
            os.close(fd)
    except OSError as exc:
        return f"present but unreadable: {exc.strerror or exc}"
    return first[:300] or "present"


def marker_root(marker: Path) -> Path:
    """Return the root file system the marker file ``marker`` belongs to: the marker is ``<root>/etc/cid-image``,
    so ``/etc/cid-image`` gives ``/`` and ``/mnt/cid-target/etc/cid-image`` gives ``/mnt/cid-target``."""
    return Path(marker).parent.parent


def read_marker(marker: Path, *, root: Path | None = None) -> str | None:
    """Return the image id installed in ``root`` (default ``marker_root(marker)``): the first line of the marker
    file ``marker``.

    Returns None when the marker is absent, empty or unreadable, and when ``<root>/.cid-incomplete`` exists: an
    install began there and never finished, so a marker beside it (one the image itself carried, say) does not
    mean the image is installed. Never raises.
    """
    root = marker_root(marker) if root is None else Path(root)
    flag = _incomplete_flag(root)
    if flag is not None:
        log.warning("agent.install_incomplete", root=str(root), marker=str(marker), flag=flag)
        return None
    try:
        with open(marker, encoding="utf-8") as handle:
            first = handle.readline().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("agent.marker_unreadable", path=str(marker), error=str(exc))
        return None
    return first or None


def remove_marker(target: Path) -> None:
    """Remove ``<target>/etc/cid-image`` (and its temporary file) if there; never follows a symlinked etc.

    Raises OSError when it exists but cannot be removed.
    """
    try:
        etc = _etc_fd(target, create=False)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return  # etc is a symlink or a file: there is no marker inside the target
        raise
    if etc is None:
        return
    try:
        for name in ("cid-image", "cid-image.tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=etc)
    finally:
        os.close(etc)


def write_install_marker(target: Path, image: str, sha256: str | None = None) -> None:
    """Write ``<target>/etc/cid-image``: the image id, then ``sha256=<hex>`` when known (creating ``etc``).

    The one writer of the marker: through a temporary file and a rename, following no symlink. Raises TargetError.
    """
    try:
        etc = _etc_fd(target, create=True)
        assert etc is not None
        try:
            before = os.fstat(etc)
            _write_at(etc, "cid-image", f"{image}\n" + (f"sha256={sha256}\n" if sha256 else ""))
            os.utime(etc, ns=(before.st_atime_ns, before.st_mtime_ns))  # etc keeps the image's time stamps
        finally:
            os.close(etc)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and (target / "etc").is_symlink():
            raise TargetError(f"cannot write the marker {target / MARKER}: the image's /etc is a symlink")
        raise TargetError(f"cannot write the marker {target / MARKER}: {exc.strerror or exc}")


def mark_incomplete(target: Path, reason: str) -> None:
    """Write ``reason`` to ``<target>/.cid-incomplete`` and remove any ``etc/cid-image``; best effort, logged."""
    try:
        remove_marker(target)
    except OSError as exc:
        log.error("installer.marker_not_removed", target=str(target), error=str(exc))
    try:
        root = _open_dir(target)
        try:
            text = reason.rstrip("\n") + "\n"
            try:
                _write_at(root, INCOMPLETE, text)
            except OSError:  # a full target: the flag written at the start has room for a sentence
                _rewrite_at(root, INCOMPLETE, text)
        finally:
            os.close(root)
    except OSError as exc:
        log.error("installer.incomplete_flag_not_written", target=str(target), error=str(exc))


def begin_install(target: Path, request: InstallRequest) -> None:
    """Check the target is a writable directory; flag it incomplete and drop any old marker. Raises TargetError."""
    if not target.is_dir():
        raise TargetError(f"target {target} is not a directory (is the target file system mounted?)")
    try:
        root = _open_dir(target)
        try:
            _write_at(root, INCOMPLETE, f"install of {request.image} from {request.url} in progress\n")
        finally:
            os.close(root)
        remove_marker(target)
    except OSError as exc:
        raise unwritable_target(target, exc) from None


def write_agent_token(target: Path, token: str) -> None:
    """Write the node's own agent token to ``<target>/etc/cid/agent.token`` (mode 0600, directory 0700).

    The installed system's cidkid reads it (rc/cidkid.service); so a shared image needs no token inside and
    each node still holds only its own. Never follows a symlinked etc or etc/cid. Raises TargetError.
    """
    try:
        etc = _etc_fd(target, create=True)
        assert etc is not None
        try:
            before = os.fstat(etc)
            with contextlib.suppress(FileExistsError):
                os.mkdir("cid", 0o700, dir_fd=etc)
            cid = os.open("cid", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=etc)
            os.utime(etc, ns=(before.st_atime_ns, before.st_mtime_ns))  # etc keeps the image's time stamps
        finally:
            os.close(etc)
        try:
            os.fchmod(cid, 0o700)
            _write_at(cid, "agent.token", token + "\n", mode=0o600)
        finally:
            os.close(cid)
    except OSError as exc:
        raise TargetError(f"cannot write the agent token into {target / 'etc/cid'}: {exc.strerror or exc}")


def complete_install(target: Path, image: str, digest: str) -> None:
    """Write the marker of ``image``, then remove the incomplete flag. Raises TargetError."""
    write_install_marker(target, image, digest)
    try:
        root = _open_dir(target)
        try:
            before = os.fstat(root)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(INCOMPLETE, dir_fd=root)
            os.utime(root, ns=(before.st_atime_ns, before.st_mtime_ns))  # the root keeps the image's time stamps
        finally:
            os.close(root)
    except OSError as exc:
        raise TargetError(f"cannot remove {target / INCOMPLETE}: {exc.strerror or exc}")
