"""The streaming installer: HTTP → sha256 → decompress → GNU tar, with no temporary copy of the image.

``stream_install`` is blocking code for a worker thread (it imports nothing from the reactor). The image is
read from its URL in large chunks; every chunk is hashed, then handed to a second thread that decompresses it
(``zstandard`` for ``tar.zst``, zlib for ``tar.gz``/notP's ``.gz``) straight into the stdin pipe of a GNU
``tar`` that extracts into the target with owners, modes, links, device nodes, xattrs, ACLs and file
capabilities. A dropped connection is resumed with ``Range: bytes=<received>-`` (the hash state is kept) for a
bounded time (``resume_for``), with exponential backoff and jitter between tries.

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

The parts: ``install_http`` (the GETs, resumes and network errors as words), ``decompress`` (zstd/gzip into tar's
pipe), ``install_marker`` (marker, incomplete flag, agent token), ``install_errors``, ``multicast`` (the bytes of
cidd's multicast session, piece by piece checked, with HTTP as the fallback); this module runs them.
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
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import structlog

from cidinstall.decompress import DECODE_ERRORS, WRITE_SIZE, PipeWriter, QueueSource, ungzip, unzstd
from cidinstall.download import (
    CANCELLED_REASON,
    KERNEL_CMDLINE,
    DownloadAborted,
    Opener,
    RangedDownload,
    Response,
    http_open,
    resume_for_of,
)
from cidinstall.errors import ArchiveError, DownloadError, InstallError, TargetError, VerifyError
from cidinstall.marker import (
    INCOMPLETE,
    MARKER,
    begin_install,
    complete_install,
    mark_incomplete,
    write_agent_token,
)
from cidinstall.multicast import MulticastFailed, MulticastSource, fallback_header
from cidinstall.types import InstallRequest, InstallResult, ProgressCallback

__all__ = ["INCOMPLETE", "MARKER", "InstallError", "stream_install"]

log = structlog.get_logger(__name__)

MiB = 1 << 20
#: Least time between two ``progress`` calls of one install.
PROGRESS_INTERVAL = 0.5
#: Accepted ``format`` values and the decompressor each needs.
FORMATS = {"tar.zst": "zstd", "zst": "zstd", "tzst": "zstd", "tar.gz": "gzip", "gz": "gzip", "tgz": "gzip"}
#: GNU tar options that keep everything a root file system holds (devices and sparse files need nothing more);
#: 128 KiB records (instead of 10 KiB) cut tar's read calls on the pipe (about 10 % of its CPU time).
TAR_OPTIONS = ("--numeric-owner", "--same-owner", "--preserve-permissions", "--xattrs", "--xattrs-include=*",
               "--acls", "--blocking-factor=256")
#: Chunks read ahead of the decompressing thread (memory: (QUEUE_DEPTH + 4) * chunk).
QUEUE_DEPTH = 8
#: Lines of tar's stderr kept for the reason of a failure, and logged at most.
STDERR_LINES = 6
MAX_LOGGED_LINES = 50

_FULL_RE = re.compile(r"No space left on device|Disk quota exceeded|Wrote only \d+ of \d+ bytes")
_READONLY_RE = re.compile(r"Read-only file system")
_UNSAFE_RE = re.compile(r"Member name contains '\.\.'|Removing leading `[^']*\.\./'")
_LOST_ATTRS_RE = re.compile(r"Cannot (?:l?setxattr|fsetxattr|acl_\w+|l?setfilecon)")


@dataclass
class _State:
    """What the threads of one install learnt (each field written by one thread)."""

    received: int = 0
    download_error: InstallError | None = None
    decode_error: str | None = None
    decoder_crash: BaseException | None = None
    tar_early_exit: int | None = None
    tar_exit: int | None = None
    tar_lines: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_LINES))
    source: str = "http"  # where the bytes came from: "http", or "multicast" (then "http" after a fallback)
    fallback: str | None = None  # why the multicast was given up for HTTP
    target_problem: InstallError | None = None
    unsafe: list[str] = field(default_factory=list)
    lost_attrs: list[str] = field(default_factory=list)
    messages: int = 0


class _Install:
    """One run of ``stream_install`` (see there); ``run()`` returns the hex sha256 or raises InstallError."""

    def __init__(self, request: InstallRequest, target: Path, progress: ProgressCallback, *, chunk: int,
                 connect_timeout: float, read_timeout: float, opener: Opener, resume_for: float,
                 cancel: threading.Event | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] | None = None,
                 multicast_source: Callable[..., Response] = MulticastSource) -> None:
        self.request = request
        self.target = target
        self.progress = progress
        self.chunk = chunk
        self.state = _State()
        self.sha = hashlib.sha256()
        self.abort = threading.Event()
        self.cancel = cancel
        self.multicast_source = multicast_source
        opener = self._telling_fallback(opener)
        self.http = RangedDownload(request.url, request.size, request.image, opener, connect_timeout=connect_timeout,
                                   read_timeout=read_timeout, resume_for=resume_for, abort=self.abort,
                                   cancel=cancel, clock=clock, sleep=sleep)
        self.feeding = True
        self.killed_tar = False  # this installer sent tar its SIGKILL (a full target, a failed download)
        self._last_progress = 0.0
        self._full: queue.Queue[tuple[memoryview, int] | None] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(QUEUE_DEPTH + 4):
            self._free.put(memoryview(bytearray(chunk)))

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
                    if isinstance(exc, MulticastFailed):
                        resp = self._fall_back(exc.strerror or str(exc), self.state.received)
                    else:
                        resp = self.http.resume(exc, self.state.received)
                    continue
                if not n:
                    self._free.put(view)
                    total = self.http.total
                    if total is not None and self.state.received < total:  # http.client does not raise for this
                        resp.close()
                        resp = self.http.resume(ConnectionResetError(
                            errno.ECONNRESET, f"connection closed after {self.state.received} of {total} bytes"),
                            self.state.received)
                        continue
                    break
                self.sha.update(view[:n])
                self.state.received += n
                if self.feeding:
                    self._full.put((view, n))
                else:
                    self._free.put(view)
                self._report("writing")
        except DownloadAborted:
            pass
        finally:
            resp.close()

    # --- where the bytes come from ------------------------------------------------------------------

    def _telling_fallback(self, opener: Opener) -> Opener:
        """Return ``opener`` adding, once the multicast was given up, its reason and the node's name as headers
        of every request to cidd (``X-Cid-Fallback``, ``X-Cid-Node``): cidd logs it and shows it in the node's
        status."""

        def opened(url: str, headers: Mapping[str, str], connect_timeout: float, read_timeout: float) -> Response:
            spec, reason = self.request.multicast, self.state.fallback
            if spec is not None and reason is not None:
                headers = {**headers, "X-Cid-Fallback": fallback_header(reason)}
                if spec.node:
                    headers["X-Cid-Node"] = fallback_header(spec.node)
            return opener(url, headers, connect_timeout, read_timeout)

        return opened

    def open_source(self) -> Response:
        """Return the first source of the image: cidd's multicast session when the request names one (HTTP
        when it cannot be joined), else the first HTTP answer. Raises DownloadError/VerifyError as
        RangedDownload.open."""
        spec = self.request.multicast
        if spec is None:
            return self.http.open()
        try:
            source = self.multicast_source(spec, urlsplit(self.request.url).hostname or "", self.request.image)
        except MulticastFailed as exc:
            return self._fall_back(exc.strerror or str(exc), 0)
        self.state.source = "multicast"
        return source

    def _fall_back(self, reason: str, offset: int) -> Response:
        """Give the multicast up: log why, then return HTTP's answer from byte ``offset`` on (every byte before
        it was checked). Raises what RangedDownload.open/resume raise."""
        self.state.fallback = reason
        self.state.source = "http"
        log.warning("installer.fallback", image=self.request.image, to="http", offset=offset, reason=reason,
                    url=self.request.url)
        if offset == 0:
            return self.http.open()
        return self.http.resume(MulticastFailed(reason), offset)

    def _report(self, step: str, *, force: bool = False) -> None:
        """Call ``progress`` with the bytes received, at most every PROGRESS_INTERVAL unless ``force``."""
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL:
            return
        self._last_progress = now
        try:
            self.progress(step, self.state.received, self.http.total)
        except Exception:
            log.exception("installer.progress_failed", image=self.request.image)

    # --- decompression and tar ----------------------------------------------------------------------

    def feed(self, kind: str, tar: subprocess.Popen[bytes]) -> None:
        """Decompress the queued chunks into tar's stdin until the end marker (thread body; never raises).

        A broken pipe (tar stopped reading), a corrupt stream or any other error stops the feeding; queued
        chunks are then only recycled, so that the download can go on to hash the rest of the file.
        """
        assert tar.stdin is not None
        source = QueueSource(self._full, self._free)
        writer = PipeWriter(tar.stdin.fileno())
        try:
            if kind == "zstd":
                unzstd(source, writer, self.chunk)
            else:
                ungzip(source, writer)
        except BrokenPipeError:
            self._tar_stopped(tar)
        except DECODE_ERRORS as exc:
            self.state.decode_error = f"{exc} (within the first {source.fed} compressed bytes)"
        except ArchiveError as exc:
            self.state.decode_error = exc.message
        except BaseException as exc:  # a bug: report it, but keep draining so the download never blocks
            log.exception("installer.decoder_crashed", image=self.request.image)
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
        """Stop tar (SIGKILL, when it still runs) and the download."""
        self.abort.set()
        with contextlib.suppress(OSError):
            if tar.poll() is None:
                self.killed_tar = True
                tar.kill()

    def _tar_status(self) -> int | None:
        """Return tar's exit status: the one seen when it stopped reading early, else the final one."""
        st = self.state
        return st.tar_early_exit if st.tar_early_exit not in (None, 0) else st.tar_exit

    def _stopped_with_cidkid(self) -> bool:
        """Return whether tar was killed by a signal that stops the install rather than fails it: SIGTERM or
        SIGINT (sent to cidkid and its children together, as at shutdown), or any signal this installer did
        not send while ``cancel`` is set."""
        code = self._tar_status()
        if code is None or code >= 0:
            return False
        sig = -code
        ours = sig == signal.SIGKILL and self.killed_tar
        cancelling = self.cancel is not None and self.cancel.is_set()
        return sig in (signal.SIGTERM, signal.SIGINT) or (cancelling and not ours)

    def run(self) -> str:
        """Do the install; return the sha256 of the image. Raises InstallError."""
        kind = FORMATS[self.request.format]
        tar_path = shutil.which("tar")
        if tar_path is None:
            raise InstallError("GNU tar is not installed in the installer (the install needs it)")
        resp = self.open_source()
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
        code = self._tar_status()
        if st.unsafe:
            said = list(dict.fromkeys([*st.unsafe[:STDERR_LINES], *st.tar_lines]))
            return ArchiveError("unsafe archive member refused (it would land outside the target): "
                                + "; ".join(said))
        if any("Unexpected EOF in archive" in line for line in st.tar_lines):
            return ArchiveError(f"truncated image: the archive ends in the middle of a member (tar exit status "
                                f"{code}: {lines})")
        if code is not None and code < 0:
            return ArchiveError(f"tar could not extract the image (killed by {_signal_name(-code)}): {lines}")
        return ArchiveError(f"tar could not extract the image (exit status {code}): {lines}")

    def _verdict(self, completed: bool) -> str:
        """Return the sha256 when everything went right; else raise the most telling InstallError.

        Order: a full or read-only target; a tar stopped together with cidkid (CANCELLED_REASON, retryable);
        then, for a download that did not complete, tar's failure when tar failed first, else the download
        error; then size, checksum, corrupt stream, tar's exit status and complaints, lost extended attributes.
        """
        st, request = self.state, self.request
        if st.target_problem is not None:
            raise st.target_problem
        if self._stopped_with_cidkid():
            log.warning("installer.tar_stopped", image=request.image, signal=_signal_name(-(self._tar_status() or 0)),
                        cancelling=self.cancel is not None and self.cancel.is_set(), received=st.received)
            raise InstallError(CANCELLED_REASON, retry=True)
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


def _signal_name(number: int) -> str:
    """Return the name of signal ``number`` (``SIGTERM``), or ``signal N`` for one Python does not know."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _check_request(request: InstallRequest) -> None:
    """Raise InstallError for a request this installer cannot carry out."""
    if request.format not in FORMATS:
        raise ArchiveError(f"unknown image format {request.format!r}: this installer knows "
                           f"{', '.join(sorted(FORMATS))}")
    if not request.sha256 or not re.fullmatch(r"[0-9a-fA-F]{64}", request.sha256):
        raise VerifyError(f"the install request for {request.image} carries no valid sha256; an image that cannot "
                          "be verified is never installed (add its sha256 to the catalog)")


def stream_install(request: InstallRequest, target: Path, progress: ProgressCallback, *, chunk: int = MiB,
                   connect_timeout: float = 30, read_timeout: float = 60, opener: Opener | None = None,
                   cancel: threading.Event | None = None, clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] | None = None, cmdline: Path = KERNEL_CMDLINE,
                   multicast_source: Callable[..., Response] = MulticastSource) -> InstallResult:
    """Download ``request.url`` and extract it into the directory ``target``; return the InstallResult.

    Blocking (run it in a worker thread). ``progress(step, done, total)`` is called from this thread with the
    compressed bytes received: ``"writing"`` at most every 0.5 s (and once at the end), then ``"verifying"``.
    ``chunk`` is the size of each HTTP read; a dropped connection is resumed from the byte where it stopped for
    ``request.resume_for`` seconds (when None: ``cid.resume_for=`` on the kernel command line ``cmdline``, else
    DEFAULT_RESUME_FOR), with exponential backoff and jitter, timed by ``clock`` and paused by ``sleep`` (tests
    inject both); ``opener`` replaces ``http_open`` (tests); setting ``cancel`` stops the install at the next
    chunk or pause (a failed, retryable result: cidkid is stopping), and so does a tar killed by SIGTERM or
    SIGINT (stopped with cidkid, as at shutdown). When ``request.multicast`` names cidd's multicast session the
    bytes come from it first (``multicast_source``, cidinstall.multicast), each piece checked before it reaches
    tar; whatever stops the multicast, the install goes on over HTTP from the last good piece
    (``installer.fallback``, reason told to cidd). Never raises: every failure is a result with ``ok=False``, a
    reason and ``retry`` (True only when trying again may help: network trouble, a stopped install). See the
    module docstring for the marker and ``.cid-incomplete`` rules.
    """
    target = Path(target)
    started = time.monotonic()
    install = None
    resume_for = resume_for_of(request.resume_for, cmdline)
    log.info("installer.started", image=request.image, url=request.url, target=str(target), format=request.format,
             resume_for=resume_for)
    try:
        _check_request(request)
        begin_install(target, request)
        install = _Install(request, target, progress, chunk=chunk, connect_timeout=connect_timeout,
                           read_timeout=read_timeout, opener=opener or http_open,
                           resume_for=resume_for, cancel=cancel, clock=clock, sleep=sleep,
                           multicast_source=multicast_source)
        digest = install.run()
        if request.agent_token:
            write_agent_token(target, request.agent_token)
        complete_install(target, request.image, digest)
    except InstallError as exc:
        result = InstallResult(ok=False, reason=exc.message, retry=exc.retry)
    except Exception as exc:
        log.exception("installer.crashed", image=request.image)
        result = InstallResult(ok=False, reason=f"the installer crashed ({exc!r}); see the cidkid log on the node")
    else:
        elapsed = time.monotonic() - started
        received = install.state.received
        log.info("installer.finished", image=request.image, bytes=received, seconds=round(elapsed, 2),
                 rate=round(received / elapsed) if elapsed > 0 else None, resumes=install.http.resumes, sha256=digest,
                 tar_messages=install.state.messages, source=install.state.source, fallback=install.state.fallback)
        return InstallResult(ok=True)
    if target.is_dir():
        mark_incomplete(target, result.reason or "install failed")
    log.error("installer.failed", image=request.image, reason=result.reason, retry=result.retry,
              received=install.state.received if install else 0)
    return result
