"""Packing a root into an image file: GNU tar to a pipe, multithreaded zstd in this process, the sha256 and
size of the compressed bytes, written to ``<out>.part``, fsync'ed and renamed into place. See docs/images.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import os
import queue
import subprocess
import threading
import time
from pathlib import Path

import zstandard

from cidcommon.paths import fsync_dir
from cidmkimg.errors import PackError

READ_SIZE = 1 << 20  # bytes per read from tar's pipe (the pipe is grown to this size), into one reused buffer
WRITE_SIZE = 256 << 10  # compressed bytes per write: small enough for malloc to recycle, no page-fault churn
WRITEBACK = 32 << 20  # start writing the image out every this many bytes
HASH_QUEUE = 32  # compressed chunks waiting to be hashed (at most HASH_QUEUE * WRITE_SIZE bytes)
LIVE_EMPTIED = ("proc", "sys", "dev", "run", "tmp", "var/tmp", "mnt", "media", "lost+found")
LIVE_FILES = ("var/cache/apt/archives/*.deb", "swapfile", "swap.img")
#: cid's own files on a node, never part of an image: the marker of the image it runs (and the marker writer's
#: temporary file), the flag of an unfinished install, the node's own agent token (written by the installer),
#: and the secrets of cid's state directory (tokens, private keys).
CID_OWN_FILES = ("etc/cid-image", "etc/cid-image.tmp", ".cid-incomplete", ".cid-incomplete.tmp",
                 "etc/cid/agent.token", "etc/cid/agent.token.tmp", "var/lib/cid/secrets")
TAR_LINES = 5  # lines of tar's stderr quoted in an error


@dataclasses.dataclass(frozen=True)
class Packed:
    """What packing produced: ``raw`` tar bytes became ``size`` compressed bytes in ``seconds``."""

    path: Path
    size: int
    raw: int
    sha256: str
    seconds: float
    warnings: tuple[str, ...]


def _inside(root: Path, path: str | Path) -> str | None:
    """Return ``path`` relative to ``root`` (both resolved) when it lies strictly inside it, else None."""
    base, full = os.path.realpath(root), os.path.realpath(path)
    rel = os.path.relpath(full, base)
    return None if rel == "." or rel == ".." or rel.startswith("../") else rel


def default_excludes(root: Path, image_dir: Path, *, live: bool, swaps: str | None = None) -> list[str]:
    """Return the default exclude patterns (``--exclude`` syntax, relative to ``root``).

    With ``live``: the contents (not the directories) of LIVE_EMPTIED, downloaded .deb files, swap files
    (LIVE_FILES, and each file listed in ``swaps`` -- the text of /proc/swaps, read when None -- inside
    ``root``), and cid's own files (CID_OWN_FILES: marker, unfinished-install flag, agent token, the state
    directory's secrets; also ``$CID_STATE_DIR/secrets`` when that lies inside ``root``). Always: ``image_dir``
    when it is inside ``root``, so the image never captures itself.
    """
    patterns: list[str] = []
    if live:
        patterns += [f"{d}/*" for d in LIVE_EMPTIED] + list(LIVE_FILES) + list(CID_OWN_FILES)
        state = os.environ.get("CID_STATE_DIR")
        secrets = _inside(root, Path(state) / "secrets") if state else None
        patterns += [secrets] if secrets and secrets not in patterns else []
        if swaps is None:
            with contextlib.suppress(OSError):
                swaps = Path("/proc/swaps").read_text(encoding="utf-8", errors="replace")
        for line in (swaps or "").splitlines()[1:]:
            fields = line.split()
            if len(fields) > 1 and fields[1] == "file":
                rel = _inside(root, fields[0].replace("\\040", " "))
                patterns += [rel] if rel else []
    rel = _inside(root, image_dir)
    return patterns + ([rel] if rel else [])


def tar_pattern(pattern: str) -> str:
    """Return a user pattern (``var/log/*.gz``, ``/var/log/*.gz``) as GNU tar matches it (``./var/log/*.gz``)."""
    pattern = pattern.strip()
    while pattern.startswith(("/", "./")):
        pattern = pattern[1:] if pattern.startswith("/") else pattern[2:]
    return "./" + pattern


def tar_command(root: Path, patterns: list[str], *, live: bool) -> list[str]:
    """Return the GNU tar command line writing the archive of ``root`` to stdout.

    atime and ctime are left out of the pax headers (tar -x restores neither): a file whose mtime is a whole
    second then needs no extended header at all, 1 KiB less per file of a debootstrap tree.
    """
    return ["tar", "-c", "-f", "-", "-C", str(root), "--format=posix", "--xattrs", "--xattrs-include=*", "--acls",
            "--numeric-owner", "--sparse", "--pax-option=delete=atime,delete=ctime",
            *(["--one-file-system"] if live else []), "--anchored",
            *(f"--exclude={tar_pattern(p)}" for p in patterns), "."]


class CompressedSink:
    """The file-like end of the compressor: writes, counts and hashes the compressed chunks.

    Hashing runs in a thread at the lowest CPU priority, fed through a bounded queue (HASH_QUEUE chunks): it
    uses the CPU time the compression pipeline leaves idle instead of competing with it. Every WRITEBACK
    bytes the kernel is asked to start writing the file out and to drop the pages already written
    (``posix_fadvise(DONTNEED)``): the final fsync is short, and capturing a live node does not push its
    working set out of the page cache.
    """

    def __init__(self, handle: io.BufferedWriter) -> None:
        self.handle = handle
        self.size = 0
        self._sha = hashlib.sha256()
        self._marks = (0, 0)  # start of the range to advise next, end of the last advised range
        self._queue: queue.Queue[bytes | None] = queue.Queue(HASH_QUEUE)
        self._thread = threading.Thread(target=self._hash, name="cid-mkimg-sha256", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        while (data := self._queue.get()) is not None:
            self._sha.update(data)

    def write(self, data: bytes) -> int:
        """Write, count and queue ``data`` for hashing; return its length. Raises OSError from the file."""
        data = data if isinstance(data, bytes) else bytes(data)  # the hasher needs an immutable copy
        self._queue.put(data)
        self.handle.write(data)
        self.size += len(data)
        older, last = self._marks
        if self.size - last >= WRITEBACK:
            os.posix_fadvise(self.handle.fileno(), older, self.size - older, os.POSIX_FADV_DONTNEED)
            self._marks = (last, self.size)  # pages still dirty now are dropped on the next call
        return len(data)

    def flush(self) -> None:
        """Flush the file object's buffer (called by the compressor at the end of the frame)."""
        self.handle.flush()

    def close(self) -> str:
        """Stop the hashing thread once it has hashed everything; return the sha256 (hex) of what was written."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        return self._sha.hexdigest()


def pack(root: Path, out: Path, patterns: list[str], *, live: bool, level: int = 3, threads: int = -1) -> Packed:
    """Archive ``root`` into ``out`` (via ``out.part``, renamed when complete); return what was written.

    Raises PackError when tar fails (exit 1 is accepted with ``live``), or compressing or writing fails;
    the ``.part`` file is then removed.
    """
    part = out.with_name(out.name + ".part")
    start = time.monotonic()
    try:
        handle = open(part, "ab")  # not truncated before it is locked; closed by the with below
    except OSError as exc:
        raise PackError(f"cannot write {part}: {exc.strerror}; check that --image-dir exists and is writable")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise PackError(f"another cid-mkimg is writing {part}; wait until it ends")
    try:
        handle.truncate(0)
        with handle, open(os.memfd_create("cid-mkimg-tar-stderr"), "w+b") as errors:
            try:
                tar = subprocess.Popen(tar_command(root, patterns, live=live), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=errors)  # readinto fills the buffer
            except OSError as exc:
                raise PackError(f"cannot run tar: {exc.strerror}; install GNU tar (Debian package tar)")
            sink, raw = CompressedSink(handle), 0
            try:
                with contextlib.suppress(OSError):  # fewer, larger reads; the default 64 KiB works too
                    fcntl.fcntl(tar.stdout.fileno(), fcntl.F_SETPIPE_SZ, READ_SIZE)
                compressor = zstandard.ZstdCompressor(level=level, threads=threads)  # sha256 covers integrity
                buffer = bytearray(READ_SIZE)
                view = memoryview(buffer)
                with compressor.stream_writer(sink, write_size=WRITE_SIZE, closefd=False) as writer:
                    while count := tar.stdout.readinto(buffer):
                        writer.write(view[:count])
                        raw += count
                handle.flush()
                os.fsync(handle.fileno())
            except (OSError, zstandard.ZstdError) as exc:
                tar.kill()
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise PackError(f"writing {part} failed: {reason}; check the space left in --image-dir")
            except BaseException:  # an interrupt: do not wait for a tar stuck on a slow file
                tar.kill()
                raise
            finally:
                sha256 = sink.close()
                tar.stdout.close()
                status = tar.wait()
            errors.seek(0)
            lines = tuple(errors.read().decode("utf-8", "replace").splitlines())
        if status != 0 and not (status == 1 and live):
            hint = "; the root is in use: stop what writes to it, or use --live for a running system" \
                if status == 1 else ""
            raise PackError(f"tar failed (exit {status}) on {root}:\n  " + "\n  ".join(lines[-TAR_LINES:]) + hint)
        os.replace(part, out)
        fsync_dir(out.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink()
        raise
    return Packed(out, sink.size, raw, sha256, time.monotonic() - start, lines)
