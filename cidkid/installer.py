"""The streaming installer: HTTP → sha256 → decompress → GNU tar, with no temporary copy of the image.

``stream_install`` is blocking code for a worker thread (it imports nothing from the reactor). The image is
read from its URL in large chunks; every chunk is hashed, then handed to a second thread that decompresses it
(``zstandard`` for ``tar.zst``, zlib for ``tar.gz``/notP's ``.gz``) straight into the stdin pipe of a GNU
``tar`` that extracts into the target with owners, modes, links, device nodes, xattrs, ACLs and file
capabilities. A dropped connection is resumed with ``Range: bytes=<received>-`` (the hash state is kept).

Safety rules:

- The node is only marked installed (``<target>/etc/cid-image``: the image id, then ``sha256=<hex>``) when
  the whole file arrived, its size matches the request (when given) and its sha256 matches. A request without
  a sha256 is refused: an image that cannot be verified is never installed.
- ``<target>/.cid-incomplete`` exists from the start of an install until it succeeded; on any failure it holds
  the reason, and no ``etc/cid-image`` is left behind (even one the archive carried).
- Members that would land outside the target are refused by GNU tar (``..`` components are skipped; symlinks
  to absolute or ``..`` paths are only created at the end, so nothing can be written through them). Whenever
  tar reports such a member, says it removed a ``..`` prefix, or exits non-zero, the install fails naming
  the member as tar reported it.
- Absolute member names (``/etc/passwd``) and absolute hard-link targets are *accepted*: GNU tar strips the
  leading ``/``, so they land inside the target (``<target>/etc/passwd``), which is what an archive of a root
  file system made with absolute names means.
- A target that cannot take the image fails the install: full (stopped at tar's first "No space left"),
  read-only, or unable to hold the image's extended attributes/ACLs (tar's warnings about them are fatal).
- Nothing is fsync'ed here: the caller makes the install durable before reporting it (``Target.finish``
  runs ``sync``), so an install is never reported before its data is on disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import os
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import structlog
import zstandard

from cidcommon.errors import CidError
from cidkid.platform import InstallRequest, InstallResult

log = structlog.get_logger(__name__)

MiB = 1 << 20
#: Least time between two ``progress`` calls of one install.
PROGRESS_INTERVAL = 0.5
#: The marker of an installed image, relative to the target; and the flag of an unfinished install.
MARKER = "etc/cid-image"
INCOMPLETE = ".cid-incomplete"
#: Accepted ``format`` values and the decompressor each needs.
FORMATS = {"tar.zst": "zstd", "zst": "zstd", "tzst": "zstd", "tar.gz": "gzip", "gz": "gzip", "tgz": "gzip"}
#: GNU tar options that keep everything a root file system holds (devices and sparse files need nothing more);
#: 128 KiB records (instead of 10 KiB) cut tar's read calls on the pipe (about 10 % of its CPU time).
TAR_OPTIONS = ("--numeric-owner", "--same-owner", "--preserve-permissions", "--xattrs", "--xattrs-include=*",
               "--acls", "--blocking-factor=256")
#: Chunks read ahead of the decompressing thread (memory: (QUEUE_DEPTH + 4) * chunk).
QUEUE_DEPTH = 8
#: Size of the pieces the decompressor hands to tar (also the most it holds at once).
WRITE_SIZE = MiB
#: Delays before the successive resumes of one download (the last one repeats).
RESUME_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0)
#: The reason of an install stopped through ``stream_install(..., cancel=event)``.
CANCELLED_REASON = "install cancelled: cidkid is stopping"
#: Lines of tar's stderr kept for the reason of a failure, and logged at most.
STDERR_LINES = 6
MAX_LOGGED_LINES = 50

_FULL_RE = re.compile(r"No space left on device|Disk quota exceeded|Wrote only \d+ of \d+ bytes")
_READONLY_RE = re.compile(r"Read-only file system")
_UNSAFE_RE = re.compile(r"Member name contains '\.\.'|Removing leading `[^']*\.\./'")
_LOST_ATTRS_RE = re.compile(r"Cannot (?:l?setxattr|fsetxattr|acl_\w+|l?setfilecon)")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


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


class _Aborted(Exception):
    """The extraction failed while the download waited to resume: stop downloading."""


class Response(Protocol):
    """What ``stream_install`` reads: an ``http.client.HTTPResponse`` or anything shaped like it."""

    status: int
    reason: str

    def getheader(self, name: str, default: str | None = None) -> str | None:
        """Return the value of header ``name``, or ``default``."""
        ...

    def readinto(self, buffer: memoryview) -> int:
        """Fill ``buffer`` with body bytes; return their number (0 at the end of the body)."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


#: ``opener(url, headers, connect_timeout, read_timeout)`` sends a GET and returns the response (headers read).
Opener = Callable[[str, Mapping[str, str], float, float], Response]
Progress = Callable[[str, int, int | None], None]


def http_open(url: str, headers: Mapping[str, str], connect_timeout: float, read_timeout: float) -> Response:
    """Send ``GET url`` with ``headers``; return the response once its headers arrived.

    Connecting may take ``connect_timeout`` seconds, every later read ``read_timeout``. Raises InstallError
    for a URL that is not http(s), OSError (ConnectionRefusedError, TimeoutError, socket.gaierror) and
    http.client.HTTPException as the connection fails.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InstallError(f"cannot download {url}: only http:// and https:// URLs are supported")
    port = parts.port
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, port, timeout=connect_timeout)
    else:
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=connect_timeout)
    try:
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(read_timeout)
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                     headers={"User-Agent": "cidkid-installer", **headers})
        return conn.getresponse()
    except BaseException:
        conn.close()
        raise


def _describe(exc: BaseException) -> str:
    """Return a short sentence for a network exception."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return "connection closed early"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class _PipeWriter:
    """A file-like ``write`` into a pipe file descriptor that writes everything it is given."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes | memoryview) -> int:
        """Write all of ``data``; return its length. Raises BrokenPipeError when the reader went away."""
        view = memoryview(data)
        size = len(view)
        while view:
            view = view[os.write(self.fd, view):]
        return size


class _QueueSource:
    """The compressed chunks queued by the download thread, as a file-like ``read`` (for the decompressors).

    A chunk's buffer goes back to the free list two reads later (the zstd reader may still look at the input
    it was last given); ``fed`` counts the compressed bytes handed out, ``ended`` says the end marker was seen.
    """

    def __init__(self, full: queue.Queue[tuple[memoryview, int] | None], free: queue.SimpleQueue[memoryview]) -> None:
        self._full = full
        self._free = free
        self._held: deque[memoryview] = deque()
        self.fed = 0
        self.ended = False

    def read(self, size: int = -1) -> memoryview | bytes:
        """Return the next chunk (whatever ``size``), or b"" at the end of the download."""
        while len(self._held) >= 2:
            self._free.put(self._held.popleft())
        if self.ended:
            return b""
        item = self._full.get()
        if item is None:
            self.ended = True
            return b""
        view, n = item
        self._held.append(view)
        self.fed += n
        return view[:n]

    def drain(self) -> None:
        """Recycle every held and queued chunk up to the end marker (the download thread must never block)."""
        while not self.ended:
            self.read()
        while self._held:
            self._free.put(self._held.popleft())


def _unzstd(source: _QueueSource, writer: _PipeWriter, read_size: int) -> None:
    """Decompress zstd (any number of frames) from ``source`` into ``writer``, WRITE_SIZE bytes at a time.

    Memory stays bounded whatever the ratio (a GiB of zeros is 33 KB of zstd). Raises zstandard.ZstdError for
    a corrupt stream and BrokenPipeError. A stream cut short inside a frame is not detected here (zstandard's
    streaming readers do not tell): the size and sha256 checks and tar's "Unexpected EOF" catch it.
    """
    reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=read_size, read_across_frames=True,
                                                        closefd=False)
    out = memoryview(bytearray(WRITE_SIZE))
    while n := reader.readinto(out):
        writer.write(out[:n])


class _GzipDecoder:
    """Decompresses gzip (any number of members) into ``writer``, never holding more than WRITE_SIZE out."""

    def __init__(self, writer: _PipeWriter) -> None:
        self._writer = writer
        self._z = zlib.decompressobj(wbits=31)

    def feed(self, data: memoryview | bytes) -> None:
        """Decompress ``data``; raises zlib.error for a corrupt stream, BrokenPipeError."""
        while data:
            if self._z.eof:
                self._z = zlib.decompressobj(wbits=31)
            out = self._z.decompress(data, WRITE_SIZE)
            if out:
                self._writer.write(out)
            if self._z.eof:
                data = self._z.unused_data
            else:
                data = self._z.unconsumed_tail
                while not data and not self._z.eof:  # output was capped: drain what zlib still holds
                    out = self._z.decompress(b"", WRITE_SIZE)
                    if not out:
                        break
                    self._writer.write(out)

    def finish(self) -> None:
        """Raise ArchiveError when the last gzip member is incomplete."""
        if not self._z.eof:
            raise ArchiveError("truncated compressed stream: the gzip data ends in the middle of a member")


def _ungzip(source: _QueueSource, writer: _PipeWriter) -> None:
    """Decompress gzip from ``source`` into ``writer``; raises zlib.error, ArchiveError (truncated), BrokenPipeError."""
    decoder = _GzipDecoder(writer)
    while data := source.read():
        decoder.feed(data)
    decoder.finish()


@dataclass
class _State:
    """What the threads of one install learnt (each field written by one thread)."""

    received: int = 0
    total: int | None = None
    download_error: InstallError | None = None
    decode_error: str | None = None
    decoder_crash: BaseException | None = None
    tar_early_exit: int | None = None
    tar_exit: int | None = None
    tar_lines: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_LINES))
    target_problem: InstallError | None = None
    unsafe: list[str] = field(default_factory=list)
    lost_attrs: list[str] = field(default_factory=list)
    messages: int = 0


class _Install:
    """One run of ``stream_install`` (see there); ``run()`` returns the hex sha256 or raises InstallError."""

    def __init__(self, request: InstallRequest, target: Path, progress: Progress, *, chunk: int,
                 max_resumes: int, connect_timeout: float, read_timeout: float, opener: Opener,
                 cancel: threading.Event | None = None) -> None:
        self.request = request
        self.target = target
        self.progress = progress
        self.chunk = chunk
        self.max_resumes = max_resumes
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.opener = opener
        self.state = _State(total=request.size)
        self.sha = hashlib.sha256()
        self.abort = threading.Event()
        self.cancel = cancel
        self.feeding = True
        self.validators: dict[str, str] = {}
        self.resumes = 0
        self._last_progress = 0.0
        self._full: queue.Queue[tuple[memoryview, int] | None] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(QUEUE_DEPTH + 4):
            self._free.put(memoryview(bytearray(chunk)))

    # --- HTTP ---------------------------------------------------------------------------------------

    def _request(self, offset: int) -> Response:
        """Send the GET for the bytes from ``offset`` on; raise what the opener raises (OSError, HTTPException)."""
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if "If-Range" in self.validators:
                headers["If-Range"] = self.validators["If-Range"]
        return self.opener(self.request.url, headers, self.connect_timeout, self.read_timeout)

    def open(self) -> Response:
        """Return the response of the first request; raise DownloadError/VerifyError when it is refused."""
        try:
            resp = self._request(0)
        except (OSError, http.client.HTTPException) as exc:
            raise DownloadError(f"cannot download {self.request.url}: {_describe(exc)}", retry=True)
        return self._checked(resp, 0)

    def _checked(self, resp: Response, offset: int) -> Response:
        """Return ``resp`` when it carries the bytes from ``offset`` on; else close it and raise InstallError."""
        try:
            self._check_response(resp, offset)
        except BaseException:
            resp.close()
            raise
        return resp

    def _check_response(self, resp: Response, offset: int) -> None:
        """Raise unless ``resp`` carries the bytes from ``offset`` on; learn the total size from it."""
        url, status = self.request.url, resp.status
        if status in (404, 410):
            raise DownloadError(f"cannot download {url}: HTTP {status} {resp.reason} (the head node has no such "
                                "image file)", retry=False)
        if offset and status == 200:
            raise DownloadError(f"cannot resume the download of {url} at byte {offset}: the server answered with "
                                "the whole file (HTTP 200), so it ignores Range or the file changed", retry=True)
        if offset and status == 416:
            raise DownloadError(f"cannot resume the download of {url} at byte {offset}: HTTP 416 (the file on the "
                                "server is shorter than what was already received)", retry=True)
        if status != (206 if offset else 200):
            raise DownloadError(f"cannot download {url}: HTTP {status} {resp.reason}", retry=status >= 500)
        if offset:
            text = resp.getheader("Content-Range") or ""
            match = _CONTENT_RANGE_RE.match(text.strip())
            start = int(match.group(1)) if match else None
            whole = None if not match or match.group(3) == "*" else int(match.group(3))
            if start != offset or (whole is not None and self.state.total is not None and whole != self.state.total):
                raise DownloadError(f"cannot resume the download of {url} at byte {offset}: the server answered "
                                    f"Content-Range {text!r}", retry=True)
            if self.state.total is None:
                self.state.total = whole
            return
        length = resp.getheader("Content-Length")
        size = int(length) if length and length.strip().isdigit() else None
        if size is not None and self.request.size is not None and size != self.request.size:
            raise VerifyError(f"size mismatch: the install request says {self.request.size} bytes but {url} "
                              f"has {size}")
        if self.state.total is None:
            self.state.total = size
        etag = resp.getheader("ETag")
        modified = resp.getheader("Last-Modified")
        if etag and not etag.startswith("W/"):
            self.validators["If-Range"] = etag
        elif modified:
            self.validators["If-Range"] = modified

    def _resume(self, exc: BaseException) -> Response:
        """Re-open the download after ``exc`` at the bytes received so far; raise DownloadError past max_resumes.

        Every attempt counts, also one whose connection fails; an answer that is not the right range fails
        at once (InstallError from ``_check_response``).
        """
        while True:
            self.resumes += 1
            reason = _describe(exc)
            if self.resumes > self.max_resumes:
                raise DownloadError(f"download of {self.request.url} failed at byte {self.state.received} after "
                                    f"{self.max_resumes} resumes: {reason}", retry=True)
            log.warning("installer.resuming", image=self.request.image, offset=self.state.received,
                        attempt=self.resumes, error=reason)
            if self.abort.wait(RESUME_DELAYS[min(self.resumes, len(RESUME_DELAYS)) - 1]):
                raise _Aborted()
            if self.cancel is not None and self.cancel.is_set():
                raise DownloadError(CANCELLED_REASON, retry=True)
            try:
                resp = self._request(self.state.received)
            except (OSError, http.client.HTTPException) as again:
                exc = again
                continue
            return self._checked(resp, self.state.received)

    def download(self, resp: Response) -> None:
        """Read the whole image from ``resp`` on, hash it and queue it for the decompressing thread.

        Returns early when ``abort`` is set (tar failed). Raises DownloadError (also when ``cancel`` is set)
        and VerifyError.
        """
        try:
            self._report("writing", force=True)
            while not self.abort.is_set():
                if self.cancel is not None and self.cancel.is_set():
                    raise DownloadError(CANCELLED_REASON, retry=True)
                view = self._free.get()
                try:
                    n = resp.readinto(view)
                except (OSError, http.client.HTTPException) as exc:
                    self._free.put(view)
                    resp.close()
                    resp = self._resume(exc)
                    continue
                if not n:
                    self._free.put(view)
                    total = self.state.total
                    if total is not None and self.state.received < total:  # http.client does not raise for this
                        resp.close()
                        resp = self._resume(ConnectionResetError(
                            errno.ECONNRESET, f"connection closed after {self.state.received} of {total} bytes"))
                        continue
                    break
                self.sha.update(view[:n])
                self.state.received += n
                if self.feeding:
                    self._full.put((view, n))
                else:
                    self._free.put(view)
                self._report("writing")
        except _Aborted:
            pass
        finally:
            resp.close()

    def _report(self, step: str, *, force: bool = False) -> None:
        """Call ``progress`` with the bytes received, at most every PROGRESS_INTERVAL unless ``force``."""
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL:
            return
        self._last_progress = now
        try:
            self.progress(step, self.state.received, self.state.total)
        except Exception:
            log.exception("installer.progress_failed", image=self.request.image)

    # --- decompression and tar ----------------------------------------------------------------------

    def feed(self, kind: str, tar: subprocess.Popen[bytes]) -> None:
        """Decompress the queued chunks into tar's stdin until the end marker (thread body; never raises).

        A broken pipe (tar stopped reading), a corrupt stream or any other error stops the feeding; queued
        chunks are then only recycled, so that the download can go on to hash the rest of the file.
        """
        assert tar.stdin is not None
        source = _QueueSource(self._full, self._free)
        writer = _PipeWriter(tar.stdin.fileno())
        try:
            if kind == "zstd":
                _unzstd(source, writer, self.chunk)
            else:
                _ungzip(source, writer)
        except BrokenPipeError:
            self._tar_stopped(tar)
        except (zstandard.ZstdError, zlib.error) as exc:
            self.state.decode_error = f"{exc} (within the first {source.fed} compressed bytes)"
        except ArchiveError as exc:
            self.state.decode_error = exc.message
        except BaseException as exc:  # a bug: report it, but keep draining so the download never blocks
            self.state.decoder_crash = exc
        finally:
            self._stop_feeding(tar)
            source.drain()

    def _stop_feeding(self, tar: subprocess.Popen[bytes]) -> None:
        """Stop writing to tar and close its stdin (it then sees the end of the archive)."""
        self.feeding = False
        if tar.stdin is not None and not tar.stdin.closed:
            with contextlib.suppress(OSError):
                tar.stdin.close()

    def _tar_stopped(self, tar: subprocess.Popen[bytes]) -> None:
        """tar closed its stdin: fine after the end-of-archive blocks (exit 0), else abort the download."""
        self._stop_feeding(tar)
        self.state.tar_early_exit = code = tar.wait()
        if code != 0:
            self.abort.set()

    def read_stderr(self, tar: subprocess.Popen[bytes]) -> None:
        """Collect tar's stderr lines; stop tar at once when the target is full or read-only (thread body)."""
        assert tar.stderr is not None
        for raw in tar.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            text = line[5:] if line.startswith("tar: ") else line
            if "Exiting with failure status" not in text:
                self.state.tar_lines.append(text[:300])
            self.state.messages += 1
            if self.state.messages <= MAX_LOGGED_LINES:  # a hostile archive may make tar say millions of lines
                log.warning("installer.tar_said", image=self.request.image, line=text[:300])
            if _FULL_RE.search(text) and self.state.target_problem is None:
                self.state.target_problem = TargetError(f"target full: {self.target} has no room left for the "
                                                        f"image ({text})")
                self._kill(tar)
            elif _READONLY_RE.search(text) and self.state.target_problem is None:
                self.state.target_problem = TargetError(f"target {self.target} is read-only ({text})")
                self._kill(tar)
            elif _UNSAFE_RE.search(text) and len(self.state.unsafe) < STDERR_LINES:
                self.state.unsafe.append(text[:300])
            elif _LOST_ATTRS_RE.search(text) and len(self.state.lost_attrs) < STDERR_LINES:
                self.state.lost_attrs.append(text[:300])

    def _kill(self, tar: subprocess.Popen[bytes]) -> None:
        """Stop tar and the download."""
        self.abort.set()
        with contextlib.suppress(OSError):
            tar.kill()

    def run(self) -> str:
        """Do the install; return the sha256 of the image. Raises InstallError."""
        kind = FORMATS[self.request.format]
        tar_path = shutil.which("tar")
        if tar_path is None:
            raise InstallError("GNU tar is not installed in the installer (the install needs it)")
        resp = self.open()
        argv = ["tar", "-x", "-f", "-", "-C", str(self.target), *TAR_OPTIONS]
        try:
            tar = subprocess.Popen(argv, executable=tar_path, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, env={**os.environ, "LC_ALL": "C"}, close_fds=True)
        except BaseException:
            resp.close()
            raise
        assert tar.stdin is not None
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(tar.stdin.fileno(), fcntl.F_SETPIPE_SZ, WRITE_SIZE)
        feeder = threading.Thread(target=self.feed, args=(kind, tar), name="cid-install-decompress", daemon=True)
        reader = threading.Thread(target=self.read_stderr, args=(tar,), name="cid-install-tar-stderr", daemon=True)
        feeder.start()
        reader.start()
        completed = False
        try:
            self.download(resp)
            completed = not self.abort.is_set()
        except InstallError as exc:
            self.state.download_error = exc
        finally:
            self._full.put(None)
            feeder.join()
            if not completed:
                self._kill(tar)
            self.state.tar_exit = tar.wait()
            reader.join()
        if completed:
            self._report("writing", force=True)
            self._report("verifying", force=True)
        return self._verdict(completed)

    def _tar_failure(self) -> ArchiveError:
        """Return the error for a tar that exited non-zero, naming the members it complained about."""
        st = self.state
        lines = "; ".join(st.tar_lines) or "no message"
        code = st.tar_early_exit if st.tar_early_exit not in (None, 0) else st.tar_exit
        if st.unsafe:
            said = list(dict.fromkeys([*st.unsafe[:STDERR_LINES], *st.tar_lines]))
            return ArchiveError("unsafe archive member refused (it would land outside the target): "
                                + "; ".join(said))
        if any("Unexpected EOF in archive" in line for line in st.tar_lines):
            return ArchiveError(f"truncated image: the archive ends in the middle of a member (tar exit status "
                                f"{code}: {lines})")
        return ArchiveError(f"tar could not extract the image (exit status {code}): {lines}")

    def _verdict(self, completed: bool) -> str:
        """Return the sha256 when everything went right; else raise the most telling InstallError.

        Order: a full or read-only target; then, for a download that did not complete, tar's failure when
        tar failed first, else the download error; then size, checksum, corrupt stream, tar's exit status and
        complaints, lost extended attributes.
        """
        st, request = self.state, self.request
        if st.target_problem is not None:
            raise st.target_problem
        if not completed:
            if st.tar_early_exit not in (None, 0) or st.download_error is None:
                raise self._tar_failure()
            raise st.download_error
        digest = self.sha.hexdigest()
        if request.size is not None and st.received != request.size:
            raise VerifyError(f"size mismatch: expected {request.size} bytes, received {st.received}")
        expected = (request.sha256 or "").lower()
        if digest != expected:
            raise VerifyError(f"checksum mismatch: expected {expected}, got {digest}")
        if st.decoder_crash is not None:
            raise InstallError(f"the installer crashed while decompressing ({st.decoder_crash!r}); "
                               "see the cidkid log on the node")
        if st.decode_error is not None:
            raise ArchiveError(f"corrupt compressed stream in {request.url}: {st.decode_error} (the file matches "
                               "its sha256, so the image file itself is bad)")
        if st.unsafe or st.tar_exit != 0:
            raise self._tar_failure()
        if st.lost_attrs:
            raise TargetError(f"target {self.target} cannot hold the image's extended attributes or ACLs: "
                              + "; ".join(st.lost_attrs[:STDERR_LINES]))
        return digest


# --- the marker and the incomplete flag ---------------------------------------------------------------------

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


def write_install_marker(target: Path, image: str, sha256: str) -> None:
    """Write ``<target>/etc/cid-image``: the image id, then ``sha256=<hex>``. Raises TargetError."""
    try:
        etc = _etc_fd(target, create=True)
        assert etc is not None
        try:
            before = os.fstat(etc)
            _write_at(etc, "cid-image", f"{image}\nsha256={sha256}\n")
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


def _begin(target: Path, request: InstallRequest) -> None:
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


def _complete(target: Path, image: str, digest: str) -> None:
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


def _check_request(request: InstallRequest) -> None:
    """Raise InstallError for a request this installer cannot carry out."""
    if request.format not in FORMATS:
        raise ArchiveError(f"unknown image format {request.format!r}: this installer knows "
                           f"{', '.join(sorted(FORMATS))}")
    if not request.sha256 or not re.fullmatch(r"[0-9a-fA-F]{64}", request.sha256):
        raise VerifyError(f"the install request for {request.image} carries no valid sha256; an image that cannot "
                          "be verified is never installed (add its sha256 to the catalog)")


def stream_install(request: InstallRequest, target: Path, progress: Progress, *, chunk: int = MiB,
                   max_resumes: int = 5, connect_timeout: float = 30, read_timeout: float = 60,
                   opener: Opener | None = None, cancel: threading.Event | None = None) -> InstallResult:
    """Download ``request.url`` and extract it into the directory ``target``; return the InstallResult.

    Blocking (run it in a worker thread). ``progress(step, done, total)`` is called from this thread with the
    compressed bytes received: ``"writing"`` at most every 0.5 s (and once at the end), then ``"verifying"``.
    ``chunk`` is the size of each HTTP read; a dropped connection is resumed up to ``max_resumes`` times;
    ``opener`` replaces ``http_open`` (tests); setting ``cancel`` stops the install at the next chunk (a failed,
    retryable result: cidkid is stopping). Never raises: every failure is a result with ``ok=False``, a
    reason and ``retry`` (True only when trying again may help: network trouble). See the module docstring
    for the marker and ``.cid-incomplete`` rules.
    """
    target = Path(target)
    started = time.monotonic()
    install = None
    log.info("installer.started", image=request.image, url=request.url, target=str(target), format=request.format)
    try:
        _check_request(request)
        _begin(target, request)
        install = _Install(request, target, progress, chunk=chunk, max_resumes=max_resumes,
                           connect_timeout=connect_timeout, read_timeout=read_timeout, opener=opener or http_open,
                           cancel=cancel)
        digest = install.run()
        if request.agent_token:
            write_agent_token(target, request.agent_token)
        _complete(target, request.image, digest)
    except InstallError as exc:
        result = InstallResult(ok=False, reason=exc.message, retry=exc.retry)
    except Exception as exc:
        log.exception("installer.crashed", image=request.image)
        result = InstallResult(ok=False, reason=f"the installer crashed ({exc!r}); see the cidkid log on the node")
    else:
        elapsed = time.monotonic() - started
        received = install.state.received
        log.info("installer.finished", image=request.image, bytes=received, seconds=round(elapsed, 2),
                 rate=round(received / elapsed) if elapsed > 0 else None, resumes=install.resumes, sha256=digest,
                 tar_messages=install.state.messages)
        return InstallResult(ok=True)
    if target.is_dir():
        mark_incomplete(target, result.reason or "install failed")
    log.error("installer.failed", image=request.image, reason=result.reason, retry=result.retry,
              received=install.state.received if install else 0)
    return result
