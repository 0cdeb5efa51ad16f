"""cidd's HTTP side over real loopback: image downloads with ranges, refusals, live catalog, metrics, streaming."""

from __future__ import annotations

import hashlib
import http.client
import os
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import psutil
import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from twisted.internet import reactor, task, threads
from twisted.web import http as twhttp

from cidcatalog.catalog import Catalog, Image
from cidd.images_http import Unsatisfiable, build_site, file_validators, image_path, parse_range
from cidd.metrics import Metrics

MiB = 1024 * 1024


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def fetch(port: int, path: str, method: str = "GET", headers: dict | None = None, stop_after: int | None = None
          ) -> Reply:
    """Do one blocking request on 127.0.0.1 (never anything else); ``stop_after`` hangs up after that many bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read(stop_after) if stop_after is not None else resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


@dataclass
class Server:
    port: int
    image_dir: Path
    metrics: Metrics
    catalog: Catalog
    data: dict[str, bytes] = field(default_factory=dict)
    clock_offset: float = 0.0  # added to the wall clock the server compares Last-Modified dates with

    def get(self, path: str, **kwargs):
        """Return a Deferred firing with the Reply, the request being made from a thread."""
        return threads.deferToThread(fetch, self.port, path, **kwargs)


def make_image(image_dir: Path, image_id: str, data: bytes | None, suffix: str = ".tar.zst", sha: bool = True,
               file: str | None = None) -> Image:
    """Return a catalog entry for ``image_id``; write ``data`` as its file unless None."""
    name, version, sub = image_id.split("-")
    file = file or image_id + suffix
    if data is not None:
        (image_dir / file).parent.mkdir(parents=True, exist_ok=True)
        (image_dir / file).write_bytes(data)
    return Image(name, version, sub, file, size=None if data is None else len(data),
                 sha256=hashlib.sha256(data).hexdigest() if sha and data is not None else None)


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    main = os.urandom(3 * MiB + 12345)  # several 256 KiB chunks, not a multiple of one
    legacy = os.urandom(70_000)
    images = [make_image(image_dir, "debian-12-1", main),
              make_image(image_dir, "legacy-1-1", legacy, suffix=".gz", sha=False)]
    srv = Server(0, image_dir, Metrics(), Catalog({i.id: i for i in images}),
                 {"debian-12-1": main, "legacy-1-1": legacy})
    site = build_site(lambda: srv.catalog, image_dir, srv.metrics, clock=lambda: time.time() + srv.clock_offset)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    srv.port = port.getHost().port
    yield srv
    await port.stopListening()


def add(srv: Server, image: Image) -> None:
    srv.catalog = srv.catalog.with_image(image)


@pytest_twisted.ensureDeferred
async def test_full_get_returns_the_file_with_length_etag_and_type(server: Server) -> None:
    data = server.data["debian-12-1"]
    reply = await server.get("/images/debian-12-1.tar.zst")
    assert reply.status == 200 and reply.body == data
    assert int(reply.headers["content-length"]) == len(data)
    assert reply.headers["accept-ranges"] == "bytes"
    assert reply.headers["content-type"] == "application/zstd"
    info = os.stat(server.image_dir / "debian-12-1.tar.zst")
    assert reply.headers["etag"] == f'"{info.st_ino:x}-{info.st_size:x}-{info.st_mtime_ns:x}-{info.st_ctime_ns:x}"'
    legacy = await server.get("/images/legacy-1-1.gz")
    assert legacy.status == 200 and legacy.body == server.data["legacy-1-1"]
    assert legacy.headers["content-type"] == "application/gzip"
    assert legacy.headers["etag"] != reply.headers["etag"]  # a file's own, with or without a sha256 in the catalog
    assert (await server.get("/healthz")).body == b"ok"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(("spec", "first", "last"), [
    ("0-0", 0, 0), ("100-", 100, None), ("100-199", 100, 199), ("-500", -500, None), ("-99999999", 0, None),
    ("5-99999999", 5, None), ("1048570-1048580", 1048570, 1048580)])
async def test_single_ranges_get_206_with_content_range(server: Server, spec: str, first: int, last: int | None
                                                        ) -> None:
    data = server.data["debian-12-1"]
    size = len(data)
    start = first % size if first < 0 else first
    end = size - 1 if last is None else last
    reply = await server.get("/images/debian-12-1.tar.zst", headers={"Range": f"bytes={spec}"})
    assert reply.status == 206
    assert reply.headers["content-range"] == f"bytes {start}-{end}/{size}"
    assert int(reply.headers["content-length"]) == end - start + 1
    assert reply.body == data[start:end + 1]


@pytest_twisted.ensureDeferred
async def test_interrupted_download_resumes_from_the_middle_and_ranges_concatenate(server: Server) -> None:
    data = server.data["debian-12-1"]
    path = "/images/debian-12-1.tar.zst"
    head = (await server.get(path, stop_after=1_500_000)).body  # the client hangs up mid-way
    assert head == data[:1_500_000]
    rest = await server.get(path, headers={"Range": f"bytes={len(head)}-"})
    assert rest.status == 206 and head + rest.body == data
    cuts = [0, 1, 262_144, 262_145, 2_000_000, len(data)]
    parts = [await server.get(path, headers={"Range": f"bytes={a}-{b - 1}"}) for a, b in pairwise(cuts)]
    assert all(p.status == 206 for p in parts)
    assert b"".join(p.body for p in parts) == data


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("spec", ["bytes={size}-", "bytes={size}-{big}", "bytes=-0"])
async def test_unsatisfiable_range_is_416_with_the_size(server: Server, spec: str) -> None:
    size = len(server.data["debian-12-1"])
    reply = await server.get("/images/debian-12-1.tar.zst", headers={"Range": spec.format(size=size, big=size * 2)})
    assert reply.status == 416
    assert reply.headers["content-range"] == f"bytes */{size}"
    assert len(reply.body) < 100


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("spec", ["bytes=0-1,5-6", "bytes=9-2", "items=0-1", "bytes=x-"])
async def test_several_or_malformed_ranges_get_the_whole_file(server: Server, spec: str) -> None:
    reply = await server.get("/images/debian-12-1.tar.zst", headers={"Range": spec})
    assert reply.status == 200 and reply.body == server.data["debian-12-1"]


@pytest_twisted.ensureDeferred
async def test_head_sends_the_headers_of_get_without_a_body(server: Server) -> None:
    path = "/images/debian-12-1.tar.zst"
    for headers in ({}, {"Range": "bytes=10-19"}):
        got = await server.get(path, headers=headers)
        head = await server.get(path, method="HEAD", headers=headers)
        assert head.status == got.status and head.body == b""
        for key in ("content-length", "content-range", "etag", "content-type", "accept-ranges"):
            assert head.headers.get(key) == got.headers.get(key)
    missing = await server.get("/images/nope.tar.zst", method="HEAD")
    assert missing.status == 404 and missing.body == b""


@pytest_twisted.ensureDeferred
async def test_if_range_serves_the_range_only_for_the_same_version(server: Server) -> None:
    data = server.data["debian-12-1"]
    path = "/images/debian-12-1.tar.zst"
    etag = (await server.get(path, method="HEAD")).headers["etag"]
    same = await server.get(path, headers={"Range": "bytes=1000-", "If-Range": etag})
    assert same.status == 206 and same.body == data[1000:]
    sha = '"' + hashlib.sha256(data).hexdigest() + '"'  # the catalog's sha256 says nothing of the file on disk
    for other in (sha, '"' + "0" * 64 + '"', "W/" + etag, "Tue, 01 Jan 2002 00:00:00 GMT"):
        changed = await server.get(path, headers={"Range": "bytes=1000-", "If-Range": other})
        assert changed.status == 200 and changed.body == data
    # the Last-Modified date is a validator too: the later of mtime and ctime, strong once a second old
    old = time.time() - 3600
    os.utime(server.image_dir / "legacy-1-1.gz", (old, old))
    info = os.stat(server.image_dir / "legacy-1-1.gz")
    legacy = "/images/legacy-1-1.gz"
    modified = (await server.get(legacy, method="HEAD")).headers["last-modified"]
    assert modified == twhttp.datetimeToString(max(info.st_mtime, info.st_ctime)).decode()
    server.clock_offset = -10.0  # the file changed "just now": its date may not tell two versions apart
    young = await server.get(legacy, headers={"Range": "bytes=-10", "If-Range": modified})
    assert young.status == 200 and young.body == server.data["legacy-1-1"]
    server.clock_offset = 10.0
    ranged = await server.get(legacy, headers={"Range": "bytes=-10", "If-Range": modified})
    assert ranged.status == 206 and ranged.body == server.data["legacy-1-1"][-10:]


def swap_same_size_same_mtime(path: Path) -> None:
    """Replace ``path`` by another file (another inode) of the same size with the same mtime (``cp -p``)."""
    before = os.stat(path)
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(os.urandom(before.st_size))
    os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(tmp, path)


def rewrite_in_place(path: Path) -> None:
    """Overwrite the first bytes of ``path`` in place (same inode and size; the mtime moves)."""
    with open(path, "r+b") as handle:
        handle.write(os.urandom(4096))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1))


def rewrite_in_place_keeping_mtime(path: Path) -> None:
    """Overwrite ``path`` in place and set its mtime back (``rsync --inplace -t``): only the ctime tells."""
    before = os.stat(path)
    with open(path, "r+b") as handle:
        handle.write(os.urandom(4096))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("change", [swap_same_size_same_mtime, rewrite_in_place, rewrite_in_place_keeping_mtime])
async def test_a_changed_file_gets_new_validators_and_a_resume_gets_the_whole_file(server: Server, change) -> None:
    """The catalog entry (size, sha256) stays the same while the file under it changes: the ETag must change all
    the same, so that a resume with the old one gets the whole new file (200), never a splice of two files."""
    path = "/images/debian-12-1.tar.zst"
    server.clock_offset = 3600.0  # every date counts as a strong validator here
    first = await server.get(path, stop_after=1000)
    assert first.status == 200
    change(server.image_dir / "debian-12-1.tar.zst")
    new = (server.image_dir / "debian-12-1.tar.zst").read_bytes()
    assert len(new) == len(server.data["debian-12-1"])
    head = await server.get(path, method="HEAD")
    assert head.headers["etag"] != first.headers["etag"]
    resumed = await server.get(path, headers={"Range": "bytes=1000-", "If-Range": first.headers["etag"]})
    assert resumed.status == 200 and resumed.body == new
    current = await server.get(path, headers={"Range": "bytes=1000-", "If-Range": head.headers["etag"]})
    assert current.status == 206 and current.body == new[1000:]


@pytest_twisted.ensureDeferred
async def test_validators_survive_a_restart_of_cidd(server: Server) -> None:
    """A new site over the same unchanged file (cidd restarted) gives the same ETag and date: downloads cut by the
    restart resume (206) instead of starting again."""
    path = "/images/debian-12-1.tar.zst"
    first = await server.get(path, stop_after=1000)
    again = build_site(lambda: server.catalog, server.image_dir, Metrics(), clock=lambda: time.time() + 3600)
    port = reactor.listenTCP(0, again, interface="127.0.0.1")
    try:
        for validator in (first.headers["etag"], first.headers["last-modified"]):
            resumed = await threads.deferToThread(fetch, port.getHost().port, path,
                                                  headers={"Range": "bytes=1000-", "If-Range": validator})
            assert resumed.status == 206 and resumed.body == server.data["debian-12-1"][1000:]
            assert resumed.headers["etag"] == first.headers["etag"]
    finally:
        await port.stopListening()


def test_file_validators_follow_inode_size_mtime_and_ctime() -> None:
    def stat(ino: int, size: int, mtime_ns: int, ctime_ns: int) -> os.stat_result:
        return os.stat_result((0o100644, ino, 1, 1, 0, 0, size, 0, mtime_ns // 10**9, ctime_ns // 10**9),
                              {"st_mtime": mtime_ns / 1e9, "st_ctime": ctime_ns / 1e9, "st_mtime_ns": mtime_ns,
                               "st_ctime_ns": ctime_ns})

    base = file_validators(stat(7, 100, 5 * 10**18, 6 * 10**18))
    assert base[0] == b'"7-64-%x-%x"' % (5 * 10**18, 6 * 10**18) and base[1] == 6e9
    for other in (stat(8, 100, 5 * 10**18, 6 * 10**18), stat(7, 101, 5 * 10**18, 6 * 10**18),
                  stat(7, 100, 5 * 10**18 + 1, 6 * 10**18), stat(7, 100, 5 * 10**18, 6 * 10**18 + 1)):
        assert file_validators(other)[0] != base[0]
    assert file_validators(stat(7, 100, 9 * 10**18, 6 * 10**18))[1] == 9e9  # the later of mtime and ctime


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every path the process opens through os.open (what the server uses to read image files)."""
    paths: list[str] = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):
        paths.append(os.path.realpath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    return paths


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(("path", "reason"), [
    ("/images/../secret.tar.zst", "dot_or_empty_segment"),
    ("/images/%2e%2e/secret.tar.zst", "dot_or_empty_segment"),
    ("/images/%2E%2E%2Fsecret.tar.zst", "encoded_separator"),
    ("/images/sub%2Finner-1-1.tar.zst", "encoded_separator"),
    ("/images/sub%5cinner-1-1.tar.zst", "encoded_separator"),
    ("/images//etc/passwd", "absolute_path"),
    ("/images/%2Fetc/passwd", "encoded_separator"),
    ("/images/debian-12-1.tar.zst%00", "nul"),
    ("/images/./debian-12-1.tar.zst", "dot_or_empty_segment"),
    ("/images/stray-1-1.tar.zst", "not_catalogued"),
    ("/images/evil-1-1.tar.zst", "outside_image_dir"),
    ("/images/dir-1-1.tar.zst", "not_regular_file"),
    ("/images/fifo-1-1.tar.zst", "not_regular_file"),
])
async def test_paths_outside_the_catalog_are_refused_and_nothing_outside_is_read(
        server: Server, opened: list[str], path: str, reason: str) -> None:
    secret = b"TOP SECRET " * 10
    outside = server.image_dir.parent / "secret.tar.zst"
    outside.write_bytes(secret)
    (server.image_dir / "stray-1-1.tar.zst").write_bytes(b"present but not catalogued")
    (server.image_dir / "evil-1-1.tar.zst").symlink_to(outside)
    (server.image_dir / "dir-1-1.tar.zst").mkdir()
    os.mkfifo(server.image_dir / "fifo-1-1.tar.zst")
    for image_id in ("evil-1-1", "dir-1-1", "fifo-1-1"):
        add(server, make_image(server.image_dir, image_id, None))
    add(server, make_image(server.image_dir, "inner-1-1", b"inner", file="sub/inner-1-1.tar.zst"))
    with capture_logs() as logs:
        reply = await server.get(path)
    assert reply.status == 404
    assert b"SECRET" not in reply.body and b"root:" not in reply.body
    assert [e["reason"] for e in logs if e["event"] == "http.refused"] == [reason]
    assert str(outside) not in opened and "/etc/passwd" not in opened
    assert not [p for p in opened if not p.startswith(str(server.image_dir))]
    good = await server.get("/images/sub/inner-1-1.tar.zst")  # a real subdirectory is fine
    assert (good.status, good.body) == (200, b"inner")


@pytest_twisted.ensureDeferred
async def test_symlink_inside_the_image_dir_is_served(server: Server) -> None:
    (server.image_dir / "alias-1-1.tar.zst").symlink_to("debian-12-1.tar.zst")
    add(server, make_image(server.image_dir, "alias-1-1", None))
    reply = await server.get("/images/alias-1-1.tar.zst")
    assert reply.status == 200 and reply.body == server.data["debian-12-1"]


@pytest_twisted.ensureDeferred
async def test_missing_catalogued_file_is_404_saying_so(server: Server) -> None:
    add(server, make_image(server.image_dir, "gone-2-1", None))
    with capture_logs() as logs:
        reply = await server.get("/images/gone-2-1.tar.zst")
    assert reply.status == 404
    text = reply.body.decode()
    assert "gone-2-1.tar.zst" in text and "missing" in text and "check the image directory" in text
    assert any(e["event"] == "http.image_missing" and e["image"] == "gone-2-1" for e in logs)


@pytest_twisted.ensureDeferred
async def test_catalog_swapped_at_run_time_takes_effect_at_once(server: Server) -> None:
    path = "/images/rocky-9-3.tar.zst"
    new = make_image(server.image_dir, "rocky-9-3", b"rocky bytes")
    assert (await server.get(path)).status == 404  # on disk, not yet catalogued
    add(server, new)
    reply = await server.get(path)
    assert (reply.status, reply.body) == (200, b"rocky bytes")
    assert image_path(new) == path
    server.catalog = Catalog({})
    assert (await server.get(path)).status == 404
    assert (await server.get("/images/debian-12-1.tar.zst")).status == 404


@pytest_twisted.ensureDeferred
async def test_metrics_count_bytes_per_image_and_requests_per_code(server: Server) -> None:
    size = len(server.data["debian-12-1"])
    await server.get("/images/debian-12-1.tar.zst")
    await server.get("/images/debian-12-1.tar.zst", headers={"Range": "bytes=-1000"})
    await server.get("/images/legacy-1-1.gz", method="HEAD")
    await server.get("/images/nope.tar.zst")
    await server.get("/images/debian-12-1.tar.zst", headers={"Range": f"bytes={size}-"})
    reply = await server.get("/metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(reply.body.decode()) for s in family.samples}
    assert samples[("cid_http_bytes_sent_total", (("image", "debian-12-1"),))] == size + 1000
    assert ("cid_http_bytes_sent_total", (("image", "legacy-1-1"),)) not in samples  # HEAD sends no bytes
    for code, count in (("200", 2), ("206", 1), ("404", 1), ("416", 1)):  # 200: the GET and the HEAD
        assert samples[("cid_http_requests_total", (("code", code),))] == count
    assert server.metrics.value("cid_http_requests_total", code="200") == 3  # now with the /metrics GET


async def open_files_under(directory: Path, settle: float = 2.0) -> list[str]:
    """Return the files under ``directory`` this process still has open, once the server had time to close."""
    end = time.monotonic() + settle
    while True:
        found = [f.path for f in psutil.Process().open_files() if f.path.startswith(str(directory))]
        if not found or time.monotonic() > end:
            return found
        await task.deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.ensureDeferred
async def test_client_hanging_up_leaves_no_open_file(server: Server) -> None:
    big = server.image_dir / "big-2-1.tar.zst"
    with open(big, "wb") as handle:
        handle.truncate(64 * MiB)
    add(server, Image("big", "2", "1", big.name, size=64 * MiB))
    with capture_logs() as logs:
        reply = await server.get(image_path(server.catalog.images["big-2-1"]), stop_after=1000)
        assert reply.status == 200 and len(reply.body) == 1000
        assert await open_files_under(server.image_dir) == []
    aborted = [e for e in logs if e["event"] == "http.image_aborted"]
    assert len(aborted) == 1 and aborted[0]["sent"] < 64 * MiB
    sent = server.metrics.value("cid_http_bytes_sent_total", image="big-2-1")
    assert sent == aborted[0]["sent"] and server.metrics.value("cid_http_requests_total", code="200") == 1


@pytest_twisted.ensureDeferred
async def test_file_shrinking_during_a_download_gives_a_short_body_not_a_wrong_one(server: Server) -> None:
    big = server.image_dir / "shrink-1-1.tar.zst"
    with open(big, "wb") as handle:
        handle.truncate(64 * MiB)
    add(server, make_image(server.image_dir, "shrink-1-1", None))

    def download() -> tuple[int, int]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
        try:
            conn.request("GET", "/images/shrink-1-1.tar.zst")
            resp = conn.getresponse()
            got = len(resp.read(1))
            os.truncate(big, 32 * MiB)  # the image is replaced under our feet
            while chunk := resp.read(MiB):  # ends early when the server hangs up
                got += len(chunk)
            return got, int(resp.getheader("Content-Length"))
        finally:
            conn.close()

    with capture_logs() as logs:
        got, announced = await threads.deferToThread(download)
    assert announced == 64 * MiB and got == 32 * MiB  # short, so the client knows; never padded or wrong
    assert any(e["event"] == "http.image_read_failed" and e["image"] == "shrink-1-1" for e in logs)
    assert await open_files_under(server.image_dir) == []


def test_metrics_instances_are_independent_and_helpers_cache() -> None:
    one, two = Metrics(), Metrics()
    one.bytes_sent("a-1-1", 5)
    assert one.value("cid_http_bytes_sent_total", image="a-1-1") == 5
    assert two.value("cid_http_bytes_sent_total", image="a-1-1") is None
    gauge = one.gauge("cid_nodes", "Nodes by state.", ["state"])
    assert one.gauge("cid_nodes", "Nodes by state.", ["state"]) is gauge
    gauge.labels(state="ready").set(3)
    assert b'cid_nodes{state="ready"} 3.0' in one.render()
    with pytest.raises(ValueError, match="already exists"):
        one.counter("cid_nodes", "clash", ["state"])


def test_parse_range() -> None:
    assert parse_range(None, 10) is None
    assert parse_range(b"bytes=2-", 10) == (2, 9)
    assert parse_range(b"Bytes=2-4", 10) == (2, 4)
    assert parse_range(b"bytes=-3", 10) == (7, 9)
    assert parse_range(b"bytes=0-1, 3-4", 10) is None
    assert parse_range(b"bytes=0-1,", 10) == (0, 1)
    assert parse_range(b"bytes=5-1", 10) is None
    for bad in (b"bytes=10-", b"bytes=-0", b"bytes=-1"):
        with pytest.raises(Unsatisfiable):
            parse_range(bad, 10 if bad != b"bytes=-1" else 0)


@pytest_twisted.ensureDeferred
async def test_large_file_streams_without_blocking_the_reactor_or_growing_memory(server: Server) -> None:
    size = 256 * MiB
    path = server.image_dir / "big-1-1.tar.zst"
    with open(path, "wb") as handle:  # sparse, with markers so that offsets matter
        for offset in (0, 7 * MiB + 3, size // 2, size - 16):
            handle.seek(offset)
            handle.write(offset.to_bytes(8, "big") * 2)
        handle.truncate(size)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 * MiB):
            digest.update(chunk)
    add(server, Image("big", "1", "1", "big-1-1.tar.zst", size=size, sha256=digest.hexdigest()))

    def download() -> tuple[int, str, int]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request("GET", "/images/big-1-1.tar.zst")
            resp = conn.getresponse()
            got, total = hashlib.sha256(), 0
            while chunk := resp.read(MiB):
                got.update(chunk)
                total += len(chunk)
            return total, got.hexdigest(), int(resp.getheader("Content-Length"))
        finally:
            conn.close()

    proc = psutil.Process()
    baseline = proc.memory_info().rss
    ticks: list[float] = []
    peak = [baseline]

    def tick() -> None:
        ticks.append(time.monotonic())
        peak[0] = max(peak[0], proc.memory_info().rss)

    loop = task.LoopingCall(tick)
    loop.start(0.01)
    started = time.monotonic()
    total, hexdigest, length = await threads.deferToThread(download)
    elapsed = time.monotonic() - started
    loop.stop()
    assert (total, length, hexdigest) == (size, size, digest.hexdigest())
    gaps = [b - a for a, b in pairwise(ticks)]
    assert len(ticks) >= max(5, int(elapsed / 0.01 * 0.3)), (len(ticks), elapsed)
    assert max(gaps) < 0.25, max(gaps)
    assert peak[0] - baseline < 64 * MiB, (peak[0] - baseline) / MiB
    assert server.metrics.value("cid_http_bytes_sent_total", image="big-1-1") == size


@pytest_twisted.ensureDeferred
async def test_installer_never_splices_a_file_swapped_on_cidd_between_its_get_and_its_resume(
        server: Server, tmp_path: Path) -> None:
    """The installer downloads from the real cidd site; its connection drops after 1 MiB, and before it resumes
    the image file is replaced by another of the same size and mtime (the catalog entry unchanged). The resume
    must not be served from the new file: the install fails at once, retryably, saying why -- not 2 MiB later
    on a checksum mismatch."""
    import io
    import tarfile

    import zstandard

    from cidinstall.download import http_open
    from cidinstall.stream import INCOMPLETE, MARKER, stream_install
    from cidinstall.types import InstallRequest

    def image(seed: bytes) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as archive:
            info = tarfile.TarInfo("./big")
            info.size = 3 * MiB
            archive.addfile(info, io.BytesIO(hashlib.shake_256(seed).digest(3 * MiB)))
        return zstandard.ZstdCompressor(level=1).compress(out.getvalue())

    data = image(b"old")
    file = server.image_dir / "swap-1-1.tar.zst"
    file.write_bytes(data)
    add(server, make_image(server.image_dir, "swap-1-1", None))
    add(server, Image("swap", "1", "1", file.name, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    server.clock_offset = 3600.0  # dates count as strong validators too: only the validators' content matters
    cut = MiB
    opened: list[dict[str, str]] = []

    class CutAndSwap:
        """The first response: its body stops after ``cut`` bytes, once the file on cidd was swapped."""

        def __init__(self, resp) -> None:
            self.resp, self.status, self.reason, self.left = resp, resp.status, resp.reason, cut

        def getheader(self, name: str, default: str | None = None) -> str | None:
            return self.resp.getheader(name, default)

        def readinto(self, buffer: memoryview) -> int:
            if not self.left:
                swap_same_size_same_mtime(file)
                raise ConnectionResetError(104, "Connection reset by peer")
            n = self.resp.readinto(buffer[:self.left])
            self.left -= n
            return n

        def close(self) -> None:
            self.resp.close()

    def opener(url: str, headers, connect: float, read: float):
        opened.append(dict(headers))
        resp = http_open(url, headers, connect, read)
        return CutAndSwap(resp) if len(opened) == 1 else resp

    target = tmp_path / "target"
    target.mkdir()
    request = InstallRequest("swap-1-1", f"http://127.0.0.1:{server.port}/images/{file.name}",
                             hashlib.sha256(data).hexdigest(), len(data), "tar.zst", resume_for=60)
    with capture_logs() as logs:
        result = await threads.deferToThread(stream_install, request, target, lambda *a: None, chunk=64 * 1024,
                                             opener=opener)
    assert not result.ok and result.retry, result
    assert "changed since the download began" in result.reason and "checksum" not in result.reason
    assert [h.get("Range") for h in opened] == [None, f"bytes={cut}-"]
    assert opened[1]["If-Range"].startswith('"')  # the ETag of the first answer
    failed = [e for e in logs if e["event"] == "installer.failed"]
    assert failed and failed[0]["received"] == cut  # nothing of the new file was taken in
    assert not (target / MARKER).exists() and "changed" in (target / INCOMPLETE).read_text()
