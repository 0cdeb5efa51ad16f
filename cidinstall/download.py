"""The HTTP side of the installer: the default opener, network errors as words, and ``RangedDownload`` (the
first GET of an image and its resumes)."""

from __future__ import annotations

import http.client
import math
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import structlog

from cidinstall.errors import DownloadError, InstallError, VerifyError

# Named after the installer on purpose: its log events kept their logger name when this module was split out.
log = structlog.get_logger(__name__)


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


def describe_network_error(exc: BaseException) -> str:
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


#: How long a dropped download is resumed, in seconds, when the install request names no ``resume_for``. The
#: clock starts when the download stops making progress; every byte received starts it again.
DEFAULT_RESUME_FOR = 300.0
#: The installer's kernel command line, and its word that sets the resume time when the install request does not
#: (``cid.resume_for=900``; cidd.yaml's ``boot.cmdline`` puts it there).
KERNEL_CMDLINE = Path("/proc/cmdline")
RESUME_FOR_WORD = "cid.resume_for"
#: The pause before the first resume; every later one doubles, up to RESUME_MAX_DELAY. Each pause is drawn
#: between half and the whole of that (jitter: a thousand nodes cut off together do not come back together).
RESUME_FIRST_DELAY = 0.25
RESUME_MAX_DELAY = 15.0
#: The longest a pause waits without looking at ``cancel`` (the default sleep).
CANCEL_POLL = 0.25
#: The reason of an install stopped through ``stream_install(..., cancel=event)``.
CANCELLED_REASON = "install cancelled: cidkid is stopping"
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


class DownloadAborted(Exception):
    """The extraction failed while the download waited to resume: stop downloading."""


def resume_for_of(requested: float | None, cmdline: Path = KERNEL_CMDLINE) -> float:
    """Return the seconds a dropped download is resumed: ``requested`` (the install request's ``resume_for``),
    else ``cid.resume_for=SECONDS`` on the kernel command line ``cmdline``, else DEFAULT_RESUME_FOR.

    Never raises: an unreadable command line or a word that is not a finite number >= 0 is logged and ignored.
    """
    if requested is not None:
        return requested
    try:
        words = cmdline.read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return DEFAULT_RESUME_FOR
    for word in words:
        key, sep, value = word.partition("=")
        if key != RESUME_FOR_WORD or not sep:
            continue
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
        log.warning("installer.bad_resume_for", word=word, cmdline=str(cmdline), default=DEFAULT_RESUME_FOR)
    return DEFAULT_RESUME_FOR


def resume_delay(attempt: int, draw: Callable[[float, float], float] = random.uniform) -> float:
    """Return the pause before resume number ``attempt`` (1, 2, ...): exponential backoff with jitter.

    The nominal pause doubles from RESUME_FIRST_DELAY up to RESUME_MAX_DELAY; the pause returned is drawn by
    ``draw(low, high)`` between half of it and all of it.
    """
    nominal = min(RESUME_MAX_DELAY, RESUME_FIRST_DELAY * 2.0 ** min(attempt - 1, 32))
    return draw(nominal / 2, nominal)


class RangedDownload:
    """The GETs of one image file: the first, then resumes from the bytes received (``Range``, and ``If-Range``
    with the first answer's ETag or Last-Modified, so that a file changed meanwhile is never spliced).

    A dropped download is resumed for ``resume_for`` seconds of ``clock`` from the moment it stopped making
    progress, pausing with exponential backoff and jitter (``resume_delay``) between tries; ``sleep(seconds)``
    makes the pauses (default: wait on ``abort``, looking at ``cancel`` every CANCEL_POLL seconds).
    ``total`` is the file's size once known (the request's, else the server's). Blocking: the installer's
    download thread calls it.
    """

    def __init__(self, url: str, size: int | None, image: str, opener: Opener, *, connect_timeout: float,
                 read_timeout: float, resume_for: float, abort: threading.Event, cancel: threading.Event | None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] | None = None) -> None:
        self.url = url
        self.size = size
        self.image = image
        self.opener = opener
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.resume_for = resume_for
        self.abort = abort
        self.cancel = cancel
        self.clock = clock
        self.sleep = sleep or self._wait
        self.total = size
        self.validators: dict[str, str] = {}
        self.resumes = 0
        self._stall: tuple[int, float, int] | None = None  # (byte, since when, tries) of the current outage

    def _request(self, offset: int) -> Response:
        """Send the GET for the bytes from ``offset`` on; raise what the opener raises (OSError, HTTPException)."""
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if "If-Range" in self.validators:
                headers["If-Range"] = self.validators["If-Range"]
        return self.opener(self.url, headers, self.connect_timeout, self.read_timeout)

    def open(self) -> Response:
        """Return the response of the first request; raise DownloadError/VerifyError when it is refused."""
        try:
            resp = self._request(0)
        except (OSError, http.client.HTTPException) as exc:
            raise DownloadError(f"cannot download {self.url}: {describe_network_error(exc)}", retry=True)
        return self._checked(resp, 0)

    def _checked(self, resp: Response, offset: int) -> Response:
        """Return ``resp`` when it carries the bytes from ``offset`` on; else close it and raise InstallError."""
        try:
            self._check_response(resp, offset)
        except BaseException:
            resp.close()
            raise
        return resp

    def _validator(self, resp: Response) -> str | None:
        """Return what identifies the version of the file ``resp`` carries: its strong ETag, else Last-Modified."""
        etag = resp.getheader("ETag")
        if etag and not etag.startswith("W/"):
            return etag
        return resp.getheader("Last-Modified") or None

    def _whole_file_again(self, resp: Response, offset: int) -> DownloadError:
        """Return the error for a resume answered with the whole file (HTTP 200), saying whether it changed."""
        before, now = self.validators.get("If-Range"), self._validator(resp)
        if before is not None and now is not None and now != before:
            return DownloadError(f"cannot resume the download of {self.url} at byte {offset}: the image file on the "
                                 f"server changed since the download began ({before} then {now}); none of the new "
                                 "file was used, the install must start again", retry=True)
        return DownloadError(f"cannot resume the download of {self.url} at byte {offset}: the server answered "
                             "with the whole file (HTTP 200), so it ignores Range or the file changed", retry=True)

    def _check_response(self, resp: Response, offset: int) -> None:
        """Raise unless ``resp`` carries the bytes from ``offset`` on; learn the total size from it."""
        url, status = self.url, resp.status
        if status in (404, 410):
            raise DownloadError(f"cannot download {url}: HTTP {status} {resp.reason} (the head node has no such "
                                "image file)", retry=False)
        if offset and status == 200:
            raise self._whole_file_again(resp, offset)
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
            if start != offset or (whole is not None and self.total is not None and whole != self.total):
                raise DownloadError(f"cannot resume the download of {url} at byte {offset}: the server answered "
                                    f"Content-Range {text!r}", retry=True)
            if self.total is None:
                self.total = whole
            return
        length = resp.getheader("Content-Length")
        size = int(length) if length and length.strip().isdigit() else None
        if size is not None and self.size is not None and size != self.size:
            raise VerifyError(f"size mismatch: the install request says {self.size} bytes but {url} "
                              f"has {size}")
        if self.total is None:
            self.total = size
        validator = self._validator(resp)
        if validator is not None:
            self.validators["If-Range"] = validator

    def _wait(self, seconds: float) -> None:
        """Pause ``seconds``; return early when ``abort`` or ``cancel`` is set."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.abort.wait(min(left, CANCEL_POLL)) or (self.cancel is not None and self.cancel.is_set()):
                return

    def _pause(self, seconds: float) -> None:
        """Sleep before a resume. Raises DownloadAborted when ``abort`` is set, DownloadError when ``cancel`` is."""
        if seconds > 0:
            self.sleep(seconds)
        if self.abort.is_set():
            raise DownloadAborted()
        if self.cancel is not None and self.cancel.is_set():
            raise DownloadError(CANCELLED_REASON, retry=True)

    def resume(self, exc: BaseException, received: int) -> Response:
        """Re-open the download after ``exc`` at byte ``received``; return the response.

        Tries again, pausing with backoff, until ``resume_for`` seconds have passed since the download stopped
        at byte ``received`` (the last try is made at that moment). Raises DownloadError once that time is up or
        when ``cancel`` is set, DownloadAborted when ``abort`` is set while waiting, and InstallError at once for
        an answer that is not the right range (a file changed on the server is never spliced).
        """
        now = self.clock()
        if self._stall is None or self._stall[0] != received:
            self._stall = (received, now, 0)
        _byte, since, tries = self._stall
        deadline = since + self.resume_for
        while True:
            reason = describe_network_error(exc)
            now = self.clock()
            if now >= deadline:
                raise DownloadError(f"download of {self.url} failed at byte {received}: no answer for "
                                    f"{now - since:.0f} s ({tries} resumes, resume_for {self.resume_for:g} s): "
                                    f"{reason}", retry=True)
            tries += 1
            self._stall = (received, since, tries)
            delay = min(resume_delay(tries), deadline - now)
            log.warning("installer.resuming", image=self.image, offset=received, attempt=tries, error=reason,
                        delay=round(delay, 2), stalled=round(now - since, 1), give_up_in=round(deadline - now, 1))
            self._pause(delay)
            self.resumes += 1
            try:
                resp = self._request(received)
            except (OSError, http.client.HTTPException) as again:
                exc = again
                continue
            resp = self._checked(resp, received)
            log.info("installer.resumed", image=self.image, offset=received, attempts=tries,
                     stalled=round(self.clock() - since, 1))
            return resp
