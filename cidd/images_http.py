"""cidd's HTTP side (twisted.web): catalogued image files with byte ranges, ``/healthz`` and ``/metrics``.

Only files named by an entry of the *current* catalog are served (``get_catalog`` is called per request, so
a reload takes effect at once).  No request path reaches the filesystem unchecked: encoded separators,
NUL, ``.``/``..``/empty segments, absolute paths, uncatalogued names, symlinks leaving the image directory
and anything but regular files get a 404 and an ``http.refused`` log event with the reason.

Ranges (RFC 9110): one range ``bytes=N-``, ``bytes=N-M`` or ``bytes=-N`` gets a 206; a range starting past
the end gets a 416 with ``Content-Range: bytes */SIZE``.  A request for *several* ranges, an unknown unit or
a malformed range is answered with the whole file (200), as RFC 9110 allows a server to ignore ``Range``.
``If-Range`` is honoured: a strong match of the ETag or of the ``Last-Modified`` date serves the range, anything
else the whole file.  Both validators describe the file on disk, not its catalog entry (``file_validators``): the
ETag is made of its inode, size, mtime and ctime (nanoseconds), ``Last-Modified`` is the later of its mtime and
ctime; so a file replaced or rewritten under the same name, even with the same size and mtime, gets new ones
and a resume of it gets the whole new file (200), never a splice of two files.  They do not change when cidd
restarts, so a download still resumes across a restart.

Files are streamed by a pull producer in 256 KiB chunks: the reactor stays free and memory stays flat
whatever the image size.  Bytes written per image and requests per status code go to :class:`Metrics`.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, unquote_to_bytes

import structlog
from twisted.internet.interfaces import IListeningPort, IPullProducer
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from cidcatalog.catalog import Catalog, Image
from cidd.config import Config
from cidd.distribution import report_fallback
from cidd.metrics import Metrics, MetricsResource

log = structlog.get_logger(__name__)

CHUNK = 256 * 1024
CONTENT_TYPES = {".zst": b"application/zstd", ".gz": b"application/gzip"}
_ENCODED_BAD = ((b"%2f", "encoded_separator"), (b"%5c", "encoded_separator"), (b"%00", "nul"),
                (b"\\", "backslash"), (b"\0", "nul"))


class Refused(Exception):
    """A request path that must not reach the filesystem; ``reason`` is a short identifier for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unsatisfiable(Exception):
    """The Range header asks only for bytes past the end of the file (answer 416)."""


def image_dir_of(config: Config) -> Path:
    """Return the image directory: ``config.image_dir``, else ``<state_dir>/images``."""
    return config.image_dir if config.image_dir is not None else config.state_dir / "images"


def image_path(image: Image) -> str:
    """Return the URL path (percent-encoded, ``/`` kept) under which ``image`` is served."""
    return "/images/" + quote(image.file, safe="/")


def parse_range(header: bytes | None, size: int) -> tuple[int, int] | None:
    """Return the single range ``(first, last)`` (inclusive) that ``header`` asks of ``size`` bytes.

    Returns None when the whole file should be served (no header, other unit, malformed, several ranges).
    Raises Unsatisfiable when the range starts past the end (or is an empty suffix).
    """
    if header is None:
        return None
    unit, sep, spec = header.partition(b"=")
    specs = [part.strip() for part in spec.split(b",") if part.strip()]
    if not sep or unit.strip().lower() != b"bytes" or len(specs) != 1:
        return None
    first_text, dash, last_text = specs[0].partition(b"-")
    if not dash or (last_text and not last_text.isdigit()):
        return None
    if not first_text:  # suffix: the last N bytes
        if not last_text or int(last_text) == 0 or size == 0:
            raise Unsatisfiable()
        return max(0, size - int(last_text)), size - 1
    if not first_text.isdigit():
        return None
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if last_text and last < first:
        return None  # invalid range-spec: ignore the header
    if first >= size:
        raise Unsatisfiable()
    return first, min(last, size - 1)


def file_validators(info: os.stat_result) -> tuple[bytes, float]:
    """Return the strong ETag of the file ``info`` describes and the time its ``Last-Modified`` date gives.

    The ETag (``"<inode>-<size>-<mtime_ns>-<ctime_ns>"``, hex) changes whenever the file is replaced (another
    inode) or written to (mtime; ctime also when the mtime is set back), and stays the same across cidd restarts.
    The time is the later of mtime and ctime, so the date changes too when a file is swapped for one with an
    older or equal mtime (``cp -p``, ``rsync -t``).
    """
    etag = b'"%x-%x-%x-%x"' % (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    return etag, max(info.st_mtime, info.st_ctime)


def requested_name(request: Request) -> str:
    """Return the file name asked for under this resource, decoded, with ``/`` as the only separator.

    Raises Refused for encoded separators, NUL, backslashes, non-UTF-8, absolute paths and
    empty, ``.`` or ``..`` segments.
    """
    raw = b"/".join(request.path.split(b"/")[1 + len(request.prepath):])
    for bad, reason in _ENCODED_BAD:
        if bad in raw.lower():
            raise Refused(reason)
    try:
        name = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("not_utf8")
    if "\0" in name:
        raise Refused("nul")
    if name.startswith("/"):
        raise Refused("absolute_path")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise Refused("dot_or_empty_segment")
    return name


@implementer(IPullProducer)
class FileSender:
    """Stream ``length`` bytes of ``handle`` from ``offset`` into ``request``, CHUNK bytes per pull.

    Closes the file and finishes the request when done; counts every written chunk in ``metrics``.
    """

    def __init__(self, request: Request, handle: BinaryIO, offset: int, length: int, image: Image,
                 metrics: Metrics) -> None:
        self.request, self.handle, self.image, self.metrics = request, handle, image, metrics
        self.offset, self.remaining, self.sent = offset, length, 0
        self.started = time.monotonic()

    def start(self) -> None:
        """Seek to the offset, register as the request's producer and watch for the end of the request."""
        self.handle.seek(self.offset)
        self.request.notifyFinish().addBoth(self._ended)
        self.request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        """Write the next chunk; finish the request after the last one, drop the connection on a short file."""
        if self.handle.closed or self.remaining <= 0:
            return
        try:
            data = self.handle.read(min(CHUNK, self.remaining))
        except OSError as exc:
            data, error = b"", exc.strerror
        else:
            error = "file shorter than announced"
        if not data:
            log.error("http.image_read_failed", image=self.image.id, file=self.image.file, error=error,
                      sent=self.sent, missing=self.remaining)
            self.handle.close()
            self.request.unregisterProducer()
            self.request.loseConnection()  # the client sees a short body, never a wrong one
            return
        self.request.write(data)
        self.sent += len(data)
        self.remaining -= len(data)
        self.metrics.bytes_sent(self.image.id, len(data))
        if self.remaining <= 0:
            self.handle.close()
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        """Close the file: the connection is gone."""
        self.handle.close()

    def _ended(self, result: Any) -> None:
        """Log how the transfer ended; count aborted requests (finished ones are counted by the site)."""
        self.handle.close()
        fields = {"image": self.image.id, "client": _client(self.request), "code": self.request.code,
                  "sent": self.sent, "elapsed": round(time.monotonic() - self.started, 3)}
        if isinstance(result, Failure):
            self.metrics.request_done(self.request.code)
            log.warning("http.image_aborted", missing=self.remaining, **fields)
        else:
            log.info("http.image_sent", offset=self.offset, **fields)


def _client(request: Request) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", address))


class ImagesResource(Resource):
    """``GET``/``HEAD /images/<file>`` for files named by the current catalog, inside ``image_dir``."""

    isLeaf = True

    def __init__(self, get_catalog: Callable[[], Catalog], image_dir: Path, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.get_catalog, self.image_dir, self.metrics = get_catalog, Path(image_dir), metrics
        self.clock = clock  # wall-clock time, compared with the files' mtime and ctime
        self._index: tuple[Catalog, dict[str, Image]] | None = None

    def files(self) -> Mapping[str, Image]:
        """Return {file name: image} for the current catalog (rebuilt only when the catalog object changes)."""
        catalog = self.get_catalog()
        if self._index is None or self._index[0] is not catalog:
            files: dict[str, Image] = {}
            for image_id in catalog:
                files.setdefault(catalog.images[image_id].file, catalog.images[image_id])
            self._index = (catalog, files)
        return self._index[1]

    def render_GET(self, request: Request) -> bytes | int:
        """Start streaming the file (returns NOT_DONE_YET), or return an error body."""
        return self._serve(request, head=False)

    def render_HEAD(self, request: Request) -> bytes:
        """Return no body, with the headers GET would send."""
        result = self._serve(request, head=True)
        return result if isinstance(result, bytes) else b""

    def _serve(self, request: Request, head: bool) -> bytes | int:
        try:
            name = requested_name(request)
            image = self.files().get(name)
            if image is None:
                raise Refused("not_catalogued")
            handle = self._open(image)
        except Refused as exc:
            log.warning("http.refused", reason=exc.reason, path=request.path.decode("latin-1"),
                        client=_client(request))
            return _error(request, http.NOT_FOUND, "no such image file\n", head)
        except (FileNotFoundError, NotADirectoryError):
            log.error("http.image_missing", image=image.id, file=image.file, image_dir=str(self.image_dir))
            text = (f"image file {image.file} (image {image.id}) is missing from the image directory "
                    f"{self.image_dir}; check the image directory on the cidd host\n")
            return _error(request, http.NOT_FOUND, text, head)
        except OSError as exc:
            log.error("http.image_unreadable", image=image.id, file=image.file, error=exc.strerror)
            text = f"cannot open image file {image.file} (image {image.id}): {exc.strerror}; check its permissions\n"
            return _error(request, http.INTERNAL_SERVER_ERROR, text, head)
        info = os.fstat(handle.fileno())
        size = info.st_size
        if image.size is not None and image.size != size:
            log.warning("http.size_mismatch", image=image.id, file=image.file, catalog=image.size, disk=size)
        etag, changed = file_validators(info)
        modified = http.datetimeToString(changed)
        request.setHeader(b"Accept-Ranges", b"bytes")
        request.setHeader(b"Content-Type", CONTENT_TYPES.get(Path(image.file).suffix, b"application/octet-stream"))
        request.setHeader(b"Last-Modified", modified)
        request.setHeader(b"ETag", etag)
        try:
            wanted = _wanted_range(request, size, etag, modified, self.clock() - changed)
        except Unsatisfiable:
            handle.close()
            request.setHeader(b"Content-Range", b"bytes */%d" % size)
            return _error(request, http.REQUESTED_RANGE_NOT_SATISFIABLE, f"range not satisfiable: size {size}\n",
                          head)
        first, last = wanted if wanted is not None else (0, size - 1)
        fallback = request.getHeader(b"x-cid-fallback")
        if fallback is not None and not head:  # an installer that gave cidd's multicast up (docs/distribution.md)
            node = request.getHeader(b"x-cid-node")
            report_fallback(node.decode("ascii", "replace")[:100] if node else None, image.id,
                            fallback.decode("ascii", "replace")[:300], _client(request), first)
        if wanted is not None:
            request.setResponseCode(http.PARTIAL_CONTENT)
            request.setHeader(b"Content-Range", b"bytes %d-%d/%d" % (first, last, size))
        request.setHeader(b"Content-Length", b"%d" % (last - first + 1))
        if head or last < first:
            handle.close()
            return b""
        FileSender(request, handle, first, last - first + 1, image, self.metrics).start()
        return NOT_DONE_YET

    def _open(self, image: Image) -> BinaryIO:
        """Return the image file opened for reading.

        Raises Refused when it resolves outside the image directory or is not a regular file,
        FileNotFoundError when it is missing.
        """
        root = os.path.realpath(self.image_dir)
        target = os.path.realpath(os.path.join(root, image.file))
        if os.path.commonpath([root, target]) != root:
            raise Refused("outside_image_dir")
        if not stat.S_ISREG(os.stat(target).st_mode):  # before open(): a FIFO would block the reactor
            raise Refused("not_regular_file")
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise Refused("not_regular_file")
        return os.fdopen(fd, "rb", buffering=0)


def _wanted_range(request: Request, size: int, etag: bytes, modified: bytes,
                  age: float) -> tuple[int, int] | None:
    """Return the range to serve, or None for the whole file. Raises Unsatisfiable (answer 416).

    An If-Range that does not strongly match the ETag or the Last-Modified date (RFC 9110 13.1.5)
    means the client holds another version: the whole file is served. ``age`` is the seconds since the
    file last changed (the date is a strong validator only once it is a second old).
    """
    header = request.getHeader(b"range")
    condition = request.getHeader(b"if-range")
    if header is None:
        return None
    if condition is not None:
        condition = condition.strip()
        if condition.startswith(b'"'):
            matched = condition == etag
        else:  # a date is a strong validator only once it is a second in the past
            matched = condition == modified and age >= 1
        if not matched:
            return None
    return parse_range(header, size)


def _error(request: Request, code: int, text: str, head: bool) -> bytes:
    """Set ``code`` and return ``text`` as a plain-text body (empty for HEAD, with the same Content-Length)."""
    body = text.encode()
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return b"" if head else body


class _Text(Resource):
    """A leaf answering GET/HEAD with a fixed plain-text body."""

    isLeaf = True

    def __init__(self, text: str) -> None:
        super().__init__()
        self.body = text.encode()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return self.body

    def render_HEAD(self, request: Request) -> bytes:
        request.setHeader(b"Content-Length", b"%d" % len(self.body))
        return b""


class CidSite(Site):
    """A Site that counts every finished request by status code and logs it with structlog (debug)."""

    noisy = False

    def __init__(self, resource: Resource, metrics: Metrics) -> None:
        super().__init__(resource)
        self.metrics = metrics

    def log(self, request: Request) -> None:
        """Count and log one finished request (replaces the combined-format access log)."""
        self.metrics.request_done(request.code)
        log.debug("http.request", method=request.method.decode("latin-1"), path=request.path.decode("latin-1"),
                  code=request.code, sent=request.sentLength, client=_client(request))


def build_site(get_catalog: Callable[[], Catalog], image_dir: Path, metrics: Metrics,
               extra: Mapping[bytes, Resource] | None = None, clock: Callable[[], float] = time.time) -> Site:
    """Return the cidd Site: ``/images/<file>``, ``/healthz``, ``/metrics``, then ``extra`` children.

    ``extra`` maps a first path segment (e.g. ``b"boot"``) to a resource; it may replace a built-in one.
    ``clock`` gives the wall-clock time the images' Last-Modified dates are compared with (tests).
    """
    root = Resource()
    root.putChild(b"", _Text("cidd: /images/<file>, /healthz, /metrics\n"))
    root.putChild(b"images", ImagesResource(get_catalog, image_dir, metrics, clock))
    root.putChild(b"healthz", _Text("ok"))
    root.putChild(b"metrics", MetricsResource(metrics))
    for name, child in (extra or {}).items():
        root.putChild(name, child)
    return CidSite(root, metrics)


def listen_http(config: Config, get_catalog: Callable[[], Catalog], metrics: Metrics, reactor: Any,
                extra: Mapping[bytes, Resource] | None = None) -> IListeningPort:
    """Serve :func:`build_site` on ``config.http_host:http_port``; return the listening port.

    Creates the default image directory when ``image_dir`` is not configured; warns when a configured one
    does not exist.  Raises twisted's CannotListenError when the port is taken.
    """
    image_dir = image_dir_of(config)
    if config.image_dir is None:
        image_dir.mkdir(parents=True, exist_ok=True)
    elif not image_dir.is_dir():
        log.warning("http.image_dir_missing", image_dir=str(image_dir), hint="set image_dir in cidd.yaml")
    site = build_site(get_catalog, image_dir, metrics, extra)
    port = reactor.listenTCP(config.http_port, site, interface=config.http_host)
    log.info("http.listening", host=config.http_host, port=port.getHost().port, image_dir=str(image_dir))
    return port
