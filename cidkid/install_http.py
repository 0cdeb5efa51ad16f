"""The HTTP side of the installer: what a response must look like, the default opener, network errors as words."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Callable, Mapping
from typing import Protocol
from urllib.parse import urlsplit

from cidkid.install_errors import InstallError


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
