"""Install targets: where the streaming installer writes an image (blocking code, for a worker thread).

``DirectoryTarget`` is an existing directory that ``prepare`` empties; ``DeviceTarget`` a block device that
``prepare`` formats (``mkfs.ext4 -F -q -L LABEL``) and mounts. ``prepare`` returns the directory to install
into; ``finish`` flushes the data to disk (and unmounts a device). Errors are ``TargetError`` with a sentence
for the operator.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Protocol

import structlog

from cidinstall.errors import TargetError, unwritable_target
from cidinstall.marker import mark_incomplete, remove_marker

log = structlog.get_logger(__name__)

DEFAULT_MOUNTPOINT = Path("/mnt/cid-target")
#: mkfs options per file system type: force (the device may hold an old file system), quiet.
MKFS_OPTIONS = {"ext2": ("-F", "-q"), "ext3": ("-F", "-q"), "ext4": ("-F", "-q"), "xfs": ("-f", "-q")}
COMMAND_TIMEOUT = 600.0
_OCTAL_RE = re.compile(r"\\([0-7]{3})")

__all__ = ["DEFAULT_MOUNTPOINT", "DeviceTarget", "DirectoryTarget", "Target", "TargetError", "mounted_devices",
           "mounts_inside"]


class Target(Protocol):
    """Where an image is installed."""

    def prepare(self) -> Path:
        """Make the target ready and empty; return the directory to extract into. Raises TargetError."""
        ...

    def finish(self) -> None:
        """Flush the installed data to disk (and release the target). Raises TargetError."""
        ...


def _strerror(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _mountinfo() -> list[tuple[int, str]]:
    """Return (device number, mount point) of every mount this process sees (from /proc/self/mountinfo)."""
    try:
        text = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or ":" not in fields[2]:
            continue
        major, minor = fields[2].split(":", 1)
        point = _OCTAL_RE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        mounts.append((os.makedev(int(major), int(minor)), point))
    return mounts


def mounted_devices() -> dict[int, list[str]]:
    """Return {device number: [mount points]} of the mounts this process sees."""
    found: dict[int, list[str]] = {}
    for device, point in _mountinfo():
        found.setdefault(device, []).append(point)
    return found


def mounts_inside(path: Path) -> list[str]:
    """Return the mount points strictly inside the directory ``path`` (bind mounts included), sorted."""
    real = os.path.realpath(path).rstrip("/")
    return sorted({point for _device, point in _mountinfo() if point.startswith(real + "/")})


def _is_mountpoint(path: Path) -> bool:
    """Return True when ``path`` is the root of a mounted file system."""
    return os.path.ismount(path)


class DirectoryTarget:
    """An existing directory to install into (often a file system mounted there by the initramfs)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"DirectoryTarget({str(self.path)!r})"

    def prepare(self) -> Path:
        """Empty the directory (crossing no mount point) and check it is writable; return its path.

        Any ``etc/cid-image`` marker goes first; when emptying fails the directory gets a ``.cid-incomplete``
        flag with the reason (best effort). The ``lost+found`` of a mounted file system is kept.

        Raises TargetError for ``/`` (or a directory that is ``/`` under another name), a missing directory,
        a mount point found inside it, an entry that cannot be removed, a read-only or full file system.
        """
        path = self.path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise TargetError(f"install target {path} does not exist (mount the target file system there, "
                              "or give --install-device)")
        except OSError as exc:
            raise TargetError(f"install target {path} cannot be used: {_strerror(exc)}")
        if not stat.S_ISDIR(st.st_mode):
            raise TargetError(f"install target {path} is not a directory")
        root = os.stat("/")
        if os.path.realpath(path) == "/" or (st.st_dev, st.st_ino) == (root.st_dev, root.st_ino):
            raise TargetError(f"refusing to install into {path}: it is the root of the running system")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise TargetError(f"install target {path} cannot be opened: {_strerror(exc)}")
        try:
            with contextlib.suppress(OSError):
                remove_marker(path)  # first, so that a half-emptied target never looks installed
            inner = mounts_inside(path)
            if inner:
                raise TargetError(f"cannot empty the install target: {', '.join(inner)} is a mount point inside "
                                  "it; unmount it first")
            keep = frozenset({"lost+found"}) if _is_mountpoint(path) else frozenset()
            removed = _empty(fd, st.st_dev, path, keep=keep)
            _probe(fd, path)
        except TargetError as exc:
            mark_incomplete(path, exc.message)
            raise
        finally:
            os.close(fd)
        log.info("target.emptied", path=str(path), removed=removed)
        return path

    def finish(self) -> None:
        """Flush everything written to disk (``sync``)."""
        os.sync()


def _empty(dir_fd: int, device: int, where: Path, *, keep: frozenset[str] = frozenset()) -> int:
    """Remove every entry inside the directory ``dir_fd`` but ``keep`` (never following a symlink); return how many.

    Raises TargetError naming a mount point found inside (it is left alone) or an entry that cannot go.
    """
    count = 0
    with os.scandir(dir_fd) as entries:
        names = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries if entry.name not in keep]
    for name, is_dir in names:
        path = where / name
        try:
            if is_dir:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                try:
                    if os.fstat(sub).st_dev != device:
                        raise TargetError(f"cannot empty the install target: {path} is a mount point; "
                                          "unmount it first")
                    count += _empty(sub, device, path)
                finally:
                    os.close(sub)
                os.rmdir(name, dir_fd=dir_fd)
            else:
                os.unlink(name, dir_fd=dir_fd)
        except TargetError:
            raise
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise TargetError(f"cannot empty the install target: {path} is busy (a mount point?)")
            if exc.errno == errno.EROFS:
                raise TargetError(f"install target {where} is read-only: cannot remove {path}")
            raise TargetError(f"cannot empty the install target: cannot remove {path}: {_strerror(exc)}")
        count += 1
    return count


def _probe(dir_fd: int, path: Path) -> None:
    """Create and remove a small file in ``dir_fd``; raise TargetError saying why the directory is not writable."""
    name = ".cid-write-test"
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
        try:
            os.write(fd, b"cid")
        finally:
            os.close(fd)
        os.unlink(name, dir_fd=dir_fd)
    except OSError as exc:
        raise unwritable_target(path, exc, "install target") from None


def _run(argv: list[str], what: str) -> None:
    """Run ``argv``; raise TargetError saying ``what`` failed, with the command's stderr."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                              env={**os.environ, "LC_ALL": "C"})
    except FileNotFoundError:
        raise TargetError(f"{what} failed: {argv[0]} is not installed")
    except subprocess.TimeoutExpired:
        raise TargetError(f"{what} failed: {' '.join(argv)} did not finish within {COMMAND_TIMEOUT:g} s")
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().replace("\n", "; ")[-500:] or "no message"
        raise TargetError(f"{what} failed (exit status {done.returncode}): {detail}")


class DeviceTarget:
    """A block device that gets a fresh file system, mounted on ``mountpoint`` for the install."""

    def __init__(self, device: Path, mountpoint: Path = DEFAULT_MOUNTPOINT, fstype: str = "ext4",
                 label: str = "cid-root") -> None:
        if fstype not in MKFS_OPTIONS:
            raise ValueError(f"fstype must be one of {', '.join(sorted(MKFS_OPTIONS))}, not {fstype!r}")
        self.device = Path(device)
        self.mountpoint = Path(mountpoint)
        self.fstype = fstype
        self.label = label
        self.mounted = False

    def __repr__(self) -> str:
        return f"DeviceTarget({str(self.device)!r}, {str(self.mountpoint)!r})"

    def prepare(self) -> Path:
        """Format the device and mount it on the mount point (created if needed); return the mount point.

        Raises TargetError: device missing or not a block device, device mounted somewhere, mount point
        busy, mkfs or mount failing (with their messages).
        """
        device, point = self.device, self.mountpoint
        try:
            st = os.stat(device)
        except FileNotFoundError:
            raise TargetError(f"install device {device} does not exist")
        except OSError as exc:
            raise TargetError(f"install device {device} cannot be used: {_strerror(exc)}")
        if not stat.S_ISBLK(st.st_mode):
            raise TargetError(f"install device {device} is not a block device")
        points = mounted_devices().get(st.st_rdev)
        if points:
            raise TargetError(f"refusing to format {device}: it is mounted on {', '.join(points)}")
        try:
            point.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TargetError(f"cannot create the mount point {point}: {_strerror(exc)}")
        if _is_mountpoint(point):
            raise TargetError(f"cannot mount {device} on {point}: something is already mounted there")
        log.info("target.formatting", device=str(device), fstype=self.fstype, label=self.label)
        _run([f"mkfs.{self.fstype}", *MKFS_OPTIONS[self.fstype], "-L", self.label, str(device)],
             f"formatting {device} as {self.fstype}")
        _run(["mount", "-t", self.fstype, str(device), str(point)], f"mounting {device} on {point}")
        self.mounted = True
        log.info("target.mounted", device=str(device), mountpoint=str(point))
        return point

    def finish(self) -> None:
        """Flush the data and unmount the device (when ``prepare`` mounted it). Raises TargetError."""
        os.sync()
        if self.mounted:
            _run(["umount", str(self.mountpoint)], f"unmounting {self.mountpoint}")
            self.mounted = False
            log.info("target.unmounted", device=str(self.device), mountpoint=str(self.mountpoint))
