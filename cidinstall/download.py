"""The HTTP side of the installer: the default opener, network errors as words, and ``RangedDownload`` (the
first GET of an image and its resumes)."""

from __future__ import annotations

import http.client
import re
import socket
import threading
from collections.abc import Callable, Mapping
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


#: Delays before the successive resumes of one download (the last one repeats).
RESUME_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0)
#: The reason of an install stopped through ``stream_install(..., cancel=event)``.
CANCELLED_REASON = "install cancelled: cidkid is stopping"
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


class DownloadAborted(Exception):
    """The extraction failed while the download waited to resume: stop downloading."""


class RangedDownload:
    """The GETs of one image file: the first, then resumes from the bytes received (``Range``, and ``If-Range``
    with the first answer's ETag or Last-Modified, so that a file changed meanwhile is never spliced).

    ``total`` is the file's size once known (the request's, else the server's). Blocking: the installer's
    download thread calls it.
    """

    def __init__(self, url: str, size: int | None, image: str, opener: Opener, *, connect_timeout: float,
                 read_timeout: float, max_resumes: int, abort: threading.Event,
                 cancel: threading.Event | None) -> None:
        self.url = url
        self.size = size
        self.image = image
        self.opener = opener
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_resumes = max_resumes
        self.abort = abort
        self.cancel = cancel
        self.total = size
        self.validators: dict[str, str] = {}
        self.resumes = 0

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

    def _check_response(self, resp: Response, offset: int) -> None:
        """Raise unless ``resp`` carries the bytes from ``offset`` on; learn the total size from it."""
        url, status = self.url, resp.status
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
        etag = resp.getheader("ETag")
        modified = resp.getheader("Last-Modified")
        if etag and not etag.startswith("W/"):
            self.validators["If-Range"] = etag
        elif modified:
            self.validators["If-Range"] = modified

    def resume(self, exc: BaseException, received: int) -> Response:
        """Re-open the download after ``exc`` at byte ``received``; return the response.

        Every attempt counts, also one whose connection fails. Raises DownloadError past ``max_resumes`` or when
        ``cancel`` is set, DownloadAborted when ``abort`` is set while waiting, and InstallError at once for an
        answer that is not the right range.
        """
        while True:
            self.resumes += 1
            reason = describe_network_error(exc)
            if self.resumes > self.max_resumes:
                raise DownloadError(f"download of {self.url} failed at byte {received} after "
                                    f"{self.max_resumes} resumes: {reason}", retry=True)
            log.warning("installer.resuming", image=self.image, offset=received,
                        attempt=self.resumes, error=reason)
            if self.abort.wait(RESUME_DELAYS[min(self.resumes, len(RESUME_DELAYS)) - 1]):
                raise DownloadAborted()
            if self.cancel is not None and self.cancel.is_set():
                raise DownloadError(CANCELLED_REASON, retry=True)
            try:
                resp = self._request(received)
            except (OSError, http.client.HTTPException) as again:
                exc = again
                continue
            return self._checked(resp, received)
