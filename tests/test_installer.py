"""The streaming installer (cidinstall.stream), install targets (cidinstall.target) and LinuxPlatform.install.

Real files, real GNU tar, real HTTP on 127.0.0.1 (a small Range-capable server in a thread, defined here),
real mounts (tmpfs, a loop-mounted ext4). Needs root; everything mounted or attached is released in teardown
by the exact path or device it created.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import re
import signal
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_twisted
import structlog
import zstandard

from cidinstall.stream import INCOMPLETE, MARKER, stream_install
from cidinstall.target import DeviceTarget, DirectoryTarget, TargetError
from cidinstall.types import InstallRequest, InstallResult
from cidkid.main import build_parser, main, target_of
from cidkid.platform import SYSTEM_MODE_REASON, LinuxPlatform
from tests.rootfs import MissingTool, build_rootfs, compare_trees

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="the installer tests need root (owners, device nodes, mounts)")

IGNORE = ("etc/cid-image", "lost+found")
Calls = list[tuple[str, int, int | None]]


# -- a small Range-capable HTTP server --------------------------------------------------------------------------

@dataclass
class ImageServer:
    """Serves ``files`` ({path: bytes}) on 127.0.0.1; unknown paths get 404.

    ``drop_after``: the first response is cut (connection closed) after that many body bytes, and ``on_drop``
    is called just before (with the server still listening); ``ignore_range``: Range is ignored (always 200 and
    the whole file). ``requests`` records (path, headers); ``sent`` counts the body bytes written.
    """

    files: dict[str, bytes] = field(default_factory=dict)
    drop_after: int | None = None
    on_drop: Callable[[], None] | None = None
    ignore_range: bool = False
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    dropped: bool = False
    sent: int = 0
    httpd: ThreadingHTTPServer | None = None

    def url(self, path: str) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:
        spec: ImageServer = self.server.spec
        spec.requests.append((self.path, dict(self.headers.items())))
        data = spec.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and not spec.ignore_range:
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        self.end_headers()
        if spec.drop_after is not None and not spec.dropped:
            spec.dropped = True
            self.wfile.write(body[:spec.drop_after])
            self.wfile.flush()
            spec.sent += len(body[:spec.drop_after])
            if spec.on_drop is not None:
                spec.on_drop()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)
        spec.sent += len(body)


def serve(spec: ImageServer, port: int = 0) -> None:
    """Start serving ``spec`` on 127.0.0.1:``port`` (0: any free port) in a thread; ``spec.httpd`` is the server."""
    httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    httpd.daemon_threads = True
    httpd.spec = spec  # type: ignore[attr-defined]
    spec.httpd = httpd
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), name="test-image-server", daemon=True)
    thread.start()


def stop_serving(spec: ImageServer) -> None:
    """Stop ``spec``'s server and close its listening socket (new connections are then refused)."""
    assert spec.httpd is not None
    spec.httpd.shutdown()
    spec.httpd.server_close()


@pytest.fixture
def server() -> Iterator[ImageServer]:
    spec = ImageServer()
    serve(spec)
    yield spec
    stop_serving(spec)


# -- images ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RootImage:
    src: Path
    tar: bytes
    zst: bytes
    gz: bytes


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> RootImage:
    """A real root file system (tests/rootfs.py), archived by GNU tar, compressed in Python."""
    src = tmp_path_factory.mktemp("rootfs") / "src"
    try:
        build_rootfs(src)
    except MissingTool as exc:
        pytest.fail(str(exc))  # make test installs the tools: a missing one is a broken set-up, not a skip
    tar = subprocess.run(["tar", "-c", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "--sparse",
                          "-C", str(src), "."], check=True, capture_output=True).stdout
    zst = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(tar)
    return RootImage(src=src, tar=tar, zst=zst, gz=gzip.compress(tar, compresslevel=6))


def tar_of(members: list[tuple[str, Any]]) -> bytes:
    """Return a tar archive (Python tarfile, GNU format) of ``members``: (name, bytes | ("sym"|"hard", target))."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, what in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if isinstance(what, tuple):
                info.type = tarfile.SYMTYPE if what[0] == "sym" else tarfile.LNKTYPE
                info.linkname = what[1]
                archive.addfile(info)
            elif what is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                archive.addfile(info)
            else:
                info.size = len(what)
                info.mode = 0o644
                archive.addfile(info, io.BytesIO(what))
    return out.getvalue()


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def request_for(server: ImageServer, data: bytes, *, name: str = "/img.tar.zst", image: str = "test-1-1",
                fmt: str = "tar.zst", digest: str | None = None, size: int | None = -1) -> InstallRequest:
    """Publish ``data`` on ``server`` and return the install request for it."""
    server.files[name] = data
    return InstallRequest(image=image, url=server.url(name), sha256=digest or sha(data),
                          size=len(data) if size == -1 else size, format=fmt)


def recorder() -> tuple[Calls, Callable[[str, int, int | None], None]]:
    calls: Calls = []
    return calls, lambda step, done, total: calls.append((step, done, total))


def assert_installed(target: Path, image: str, digest: str) -> None:
    assert (target / MARKER).read_text() == f"{image}\nsha256={digest}\n"
    assert not (target / INCOMPLETE).exists()


def assert_not_installed(target: Path, *words: str) -> None:
    assert not (target / MARKER).exists() and not (target / MARKER).is_symlink()
    flag = (target / INCOMPLETE).read_text()
    for word in words:
        assert word in flag


@pytest.fixture
def mounts() -> Iterator[Callable[..., Path]]:
    """``mount(path, *options)`` mounts a tmpfs on ``path`` (created); each is unmounted in teardown."""
    done: list[Path] = []

    def mount(path: Path, options: str = "size=2m") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "cid-test", str(path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        done.append(path)
        return path

    yield mount
    for path in reversed(done):
        subprocess.run(["umount", str(path)], check=False)


# -- real root file systems -------------------------------------------------------------------------------------

def test_rootfs_into_a_directory_keeps_everything(tmp_path: Path, server: ImageServer, rootfs: RootImage) -> None:
    target = tmp_path / "target"
    target.mkdir()
    request = request_for(server, rootfs.zst, image="rootfs-1-1")
    calls, progress = recorder()
    result = stream_install(request, target, progress, chunk=256 * 1024)
    assert result == InstallResult(ok=True)
    assert compare_trees(rootfs.src, target, ignore=IGNORE) == []
    assert_installed(target, "rootfs-1-1", sha(rootfs.zst))
    assert (target / "var/spool/sparse.img").stat().st_blocks * 512 < 1024 * 1024  # still sparse
    total = len(rootfs.zst)
    assert calls[0] == ("writing", 0, total)
    assert calls[-2:] == [("writing", total, total), ("verifying", total, total)]


def _losetup(image: Path) -> str:
    """Attach ``image`` to a free loop device; return it (pytest.skip with the reason when impossible)."""
    try:
        result = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True)
    except FileNotFoundError:
        result = None
    if result is None or result.returncode != 0:
        reason = "losetup is missing" if result is None else result.stderr.strip()
        print(f"loop device unavailable ({reason}): only the directory-target variant ran")
        pytest.skip(f"cannot set up a loop device: {reason}")
    return result.stdout.strip()


def test_rootfs_onto_a_fresh_ext4_on_a_loop_device(tmp_path: Path, server: ImageServer, rootfs: RootImage) -> None:
    backing, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    subprocess.run(["truncate", "-s", "256M", str(backing)], check=True)
    loop = _losetup(backing)
    try:
        target = DeviceTarget(Path(loop), mnt)
        with pytest.raises(TargetError, match="is not a block device"):
            DeviceTarget(backing, mnt).prepare()
        assert target.prepare() == mnt
        assert os.path.ismount(mnt)
        with pytest.raises(TargetError, match="refusing to format .* it is mounted on"):
            DeviceTarget(Path(loop), tmp_path / "other").prepare()
        result = stream_install(request_for(server, rootfs.zst, image="rootfs-1-2"), mnt, lambda *a: None)
        target.finish()
        assert result.ok, result.reason
        assert not os.path.ismount(mnt)
        label = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", loop], capture_output=True, text=True)
        assert label.returncode == 0, f"blkid failed on {loop}: {label.stderr.strip()}"
        assert label.stdout.strip() == "cid-root"
        subprocess.run(["mount", "-o", "ro", loop, str(mnt)], check=True)
        try:
            assert compare_trees(rootfs.src, mnt, ignore=IGNORE) == []
            assert_installed(mnt, "rootfs-1-2", sha(rootfs.zst))
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["losetup", "-d", loop], check=False)


def test_gz_images_as_notp_made_them(tmp_path: Path, server: ImageServer, rootfs: RootImage) -> None:
    for fmt in ("tar.gz", "gz"):
        target = tmp_path / fmt
        target.mkdir()
        result = stream_install(request_for(server, rootfs.gz, name="/img.gz", fmt=fmt), target, lambda *a: None)
        assert result.ok, result.reason
        assert compare_trees(rootfs.src, target, ignore=IGNORE) == []


def test_multi_frame_zstd_and_multi_member_gzip(tmp_path: Path, server: ImageServer) -> None:
    archive = tar_of([("./etc", None), ("./etc/a", b"a" * 100_000), ("./etc/b", os.urandom(300_000))])
    half = len(archive) // 2
    for fmt, data in (("tar.zst", zst(archive[:half]) + zst(archive[half:])),
                      ("tar.gz", gzip.compress(archive[:half]) + gzip.compress(archive[half:]))):
        target = tmp_path / fmt
        target.mkdir()
        result = stream_install(request_for(server, data, fmt=fmt), target, lambda *a: None, chunk=4096)
        assert result.ok, result.reason
        assert (target / "etc/a").read_bytes() == b"a" * 100_000


# -- resuming -------------------------------------------------------------------------------------------------

def test_a_dropped_download_resumes_with_range(tmp_path: Path, server: ImageServer, rootfs: RootImage) -> None:
    target = tmp_path / "target"
    target.mkdir()
    cut = len(rootfs.zst) // 2 + 12345
    server.drop_after = cut
    result = stream_install(request_for(server, rootfs.zst), target, lambda *a: None, chunk=64 * 1024)
    assert result.ok, result.reason
    assert [h.get("Range") for _p, h in server.requests] == [None, f"bytes={cut}-"]
    assert server.requests[1][1].get("If-Range") == f'"{sha(rootfs.zst)}"'
    assert compare_trees(rootfs.src, target, ignore=IGNORE) == []
    assert_installed(target, "test-1-1", sha(rootfs.zst))


def test_a_server_ignoring_range_on_resume_fails_cleanly(tmp_path: Path, server: ImageServer,
                                                        rootfs: RootImage) -> None:
    target = tmp_path / "target"
    target.mkdir()
    server.drop_after, server.ignore_range = 100_000, True
    result = stream_install(request_for(server, rootfs.zst), target, lambda *a: None, chunk=64 * 1024)
    assert not result.ok and result.retry
    assert "HTTP 200" in result.reason and "Range" in result.reason
    assert_not_installed(target, "HTTP 200")


@dataclass
class FakeTime:
    """A clock and a sleep for the installer: ``sleep`` only moves ``now`` on (and records the pause), then calls
    ``after_sleep``; no test waits for real."""

    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)
    after_sleep: Callable[[float], None] | None = None

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.after_sleep is not None:
            self.after_sleep(self.now)


def test_a_long_server_outage_is_resumed_from_where_it_stopped(tmp_path: Path, server: ImageServer,
                                                               rootfs: RootImage) -> None:
    """cidd (its HTTP port) goes away in the middle of a download for 20 s -- more than the 5 tries in about 8 s
    the installer used to allow -- and comes back on the same port: the install resumes at the byte where it
    stopped and completes, and the server sent the image about once in all."""
    target = tmp_path / "target"
    target.mkdir()
    data = rootfs.zst
    cut = len(data) // 3
    time_ = FakeTime()
    port = server.httpd.server_address[1]
    away: dict[str, float] = {}

    def go_away() -> None:  # called by the server with the connection still open: no try can reach it
        stop_serving(server)
        away["since"] = time_.now

    def come_back(now: float) -> None:
        if "since" in away and "back" not in away and now - away["since"] >= 20:
            serve(server, port)
            away["back"] = now

    server.drop_after, server.on_drop, time_.after_sleep = cut, go_away, come_back
    request = request_for(server, data)
    with structlog.testing.capture_logs() as logs:
        result = stream_install(request, target, lambda *a: None, chunk=64 * 1024, clock=time_.clock,
                                sleep=time_.sleep, cmdline=tmp_path / "no-cmdline")
    assert result == InstallResult(ok=True), result.reason
    assert_installed(target, "test-1-1", sha(data))
    assert compare_trees(rootfs.src, target, ignore=IGNORE) == []
    assert [h.get("Range") for _p, h in server.requests] == [None, f"bytes={cut}-"]
    ratio = server.sent / len(data)
    print(f"outage {away['back'] - away['since']:.1f} s (fake clock), {len(time_.sleeps)} pauses, "
          f"bytes sent / image size = {ratio:.3f}")
    assert ratio == 1.0  # the old budget failed here, and the retry sent the whole image again (1.33x)
    assert sum(time_.sleeps) >= 20 and len(time_.sleeps) >= 5
    assert max(time_.sleeps) <= 15  # backoff is bounded
    tries = [e for e in logs if e["event"] == "installer.resuming"]
    assert [e["attempt"] for e in tries] == list(range(1, len(tries) + 1))
    assert all(e["offset"] == cut for e in tries)
    assert [e["event"] for e in logs if e["event"] == "installer.resumed"] == ["installer.resumed"]


def test_resumes_stop_after_resume_for_with_backoff(tmp_path: Path) -> None:
    """Every read fails: the download is tried again from the same byte, with growing jittered pauses, until the
    request's ``resume_for`` seconds are up; then a retryable failure saying so (an opener replaces HTTP)."""
    data = zst(tar_of([("./f", b"x" * 1000)]))
    opened: list[dict[str, str]] = []

    class Flaky:
        status, reason = 200, "OK"

        def __init__(self, headers: dict[str, str]) -> None:
            self.status = 206 if "Range" in headers else 200
            self.start = int(headers["Range"][6:-1]) if "Range" in headers else 0

        def getheader(self, name: str, default: str | None = None) -> str | None:
            return {"Content-Length": str(len(data) - self.start),
                    "Content-Range": f"bytes {self.start}-{len(data) - 1}/{len(data)}"}.get(name, default)

        def readinto(self, buffer: memoryview) -> int:
            if self.start == 0:
                buffer[:10] = data[:10]
                self.start = 10
                return 10
            raise ConnectionResetError(104, "Connection reset by peer")

        def close(self) -> None:
            pass

    def opener(url: str, headers: dict[str, str], connect: float, read: float) -> Flaky:
        opened.append(dict(headers))
        return Flaky(headers)

    target = tmp_path / "target"
    target.mkdir()
    time_ = FakeTime()
    request = InstallRequest("f-1-1", "http://x/f", sha(data), len(data), "tar.zst", resume_for=120)
    result = stream_install(request, target, lambda *a: None, opener=opener, clock=time_.clock, sleep=time_.sleep,
                            cmdline=tmp_path / "no-cmdline")
    assert not result.ok and result.retry
    assert "failed at byte 10: no answer for 120 s" in result.reason and "connection reset by peer" in result.reason
    assert sum(time_.sleeps) == pytest.approx(120)  # the last try is made when the time is up, not later
    assert opened[0].get("Range") is None and {h.get("Range") for h in opened[1:]} == {"bytes=10-"}
    assert len(opened) - 1 == len(time_.sleeps)  # one try after each pause
    pauses = time_.sleeps[:-1]  # the last one is cut to the deadline
    assert 0.125 <= pauses[0] <= 0.25 and all(p <= 15 for p in pauses)
    assert pauses[6] >= 7.5  # doubled six times (jitter keeps at least half)
    assert_not_installed(target, "no answer for 120 s")


def test_resume_delays_and_where_resume_for_comes_from(tmp_path: Path) -> None:
    from cidinstall.download import DEFAULT_RESUME_FOR, resume_delay, resume_for_of

    assert [resume_delay(n, lambda low, high: high) for n in range(1, 10)] == [
        0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    assert [resume_delay(n, lambda low, high: low) for n in (1, 7, 100)] == [0.125, 7.5, 7.5]
    assert all(2.0 <= resume_delay(5) <= 4.0 for _ in range(100))
    cmdline = tmp_path / "cmdline"
    assert resume_for_of(None, cmdline) == DEFAULT_RESUME_FOR == 300  # no command line at all
    cmdline.write_text("console=ttyS0 cid.server=h:38008 cid.resume_for=900 quiet\n")
    assert resume_for_of(None, cmdline) == 900
    assert resume_for_of(45, cmdline) == 45  # the install request wins
    cmdline.write_text("cid.resume_for=soon cid.resume_for=-3 cid.resume_for=inf\n")
    assert resume_for_of(None, cmdline) == DEFAULT_RESUME_FOR


def test_progress_is_throttled(tmp_path: Path) -> None:
    """A slow download reports ``writing`` about every 0.5 s, then the end and ``verifying``."""
    data = zst(tar_of([("./f", os.urandom(40_000))]))

    class Slow:
        status, reason = 200, "OK"
        at = 0

        def getheader(self, name: str, default: str | None = None) -> str | None:
            return str(len(data)) if name == "Content-Length" else default

        def readinto(self, buffer: memoryview) -> int:
            time.sleep(0.04)
            piece = data[self.at:self.at + 1000]
            buffer[:len(piece)] = piece
            self.at += len(piece)
            return len(piece)

        def close(self) -> None:
            pass

    target = tmp_path / "target"
    target.mkdir()
    stamps: list[tuple[float, str, int]] = []
    request = InstallRequest("f-1-1", "http://x/f", sha(data), len(data), "tar.zst")
    result = stream_install(request, target, lambda step, done, total: stamps.append((time.monotonic(), step, done)),
                            opener=lambda *a: Slow())
    assert result.ok, result.reason
    assert len(data) // 1000 >= 40  # ~1.6 s of download
    middle = stamps[1:-2]
    assert 2 <= len(middle) <= 5
    gaps = [b[0] - a[0] for a, b in zip(stamps[:-3], stamps[1:-2], strict=True)]
    assert min(gaps) >= 0.49
    assert [s[1] for s in stamps[-2:]] == ["writing", "verifying"] and stamps[-1][2] == len(data)


def test_cancel_stops_an_install_retryably(tmp_path: Path) -> None:
    data = zst(tar_of([("./f", os.urandom(100_000))]))
    cancel = threading.Event()

    class Slow:
        status, reason, at = 200, "OK", 0

        def getheader(self, name: str, default: str | None = None) -> str | None:
            return str(len(data)) if name == "Content-Length" else default

        def readinto(self, buffer: memoryview) -> int:
            time.sleep(0.02)
            piece = data[self.at:self.at + 1000]
            buffer[:len(piece)] = piece
            self.at += len(piece)
            if self.at > 20_000:
                cancel.set()
            return len(piece)

        def close(self) -> None:
            pass

    target = tmp_path / "target"
    target.mkdir()
    request = InstallRequest("f-1-1", "http://x/f", sha(data), len(data), "tar.zst")
    result = stream_install(request, target, lambda *a: None, opener=lambda *a: Slow(), cancel=cancel)
    assert result == InstallResult(ok=False, reason="install cancelled: cidkid is stopping", retry=True)
    assert_not_installed(target, "cancelled")


class Paced:
    """A response serving ``data`` in 64 KiB pieces; ``at_byte(offset)`` is called before each piece (tests)."""

    status, reason = 200, "OK"

    def __init__(self, data: bytes, at_byte: Callable[[int], None]) -> None:
        self.data, self.at, self.at_byte = data, 0, at_byte

    def getheader(self, name: str, default: str | None = None) -> str | None:
        return str(len(self.data)) if name == "Content-Length" else default

    def readinto(self, buffer: memoryview) -> int:
        self.at_byte(self.at)
        piece = self.data[self.at:self.at + min(len(buffer), 64 * 1024)]
        buffer[:len(piece)] = piece
        self.at += len(piece)
        return len(piece)

    def close(self) -> None:
        pass


def tar_of_this_install(target: Path) -> psutil.Process:
    """Return the tar this process runs to extract into ``target`` (the test fails when there is none)."""
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if child.name() == "tar" and str(target) in child.cmdline():
                return child
    pytest.fail(f"no tar extracting into {target} is running")


@pytest.mark.parametrize(("sig", "cancelling", "cancelled"), [
    (signal.SIGTERM, False, True), (signal.SIGINT, False, True), (signal.SIGKILL, True, True),
    (signal.SIGKILL, False, False)])
def test_a_tar_stopped_with_cidkid_reports_cancelled(tmp_path: Path, sig: signal.Signals, cancelling: bool,
                                                     cancelled: bool) -> None:
    """systemd stops cidkid and its tar together (SIGTERM to the whole unit): the install was cancelled, and may
    be retried -- not "tar could not extract the image (exit status -15)". A tar killed by another signal while
    the install is being cancelled is cancelled too; SIGKILL out of the blue (the OOM killer) is a failure."""
    data = zst(tar_of([("./etc", None), ("./etc/big", os.urandom(2 * 1024 * 1024))]))
    target = tmp_path / "target"
    target.mkdir()
    cancel = threading.Event()
    killed: list[int] = []

    def at_byte(offset: int) -> None:
        if offset >= 256 * 1024 and not killed:
            tar = tar_of_this_install(target)
            if cancelling:
                cancel.set()
            tar.send_signal(sig)
            killed.append(sig)
            deadline = time.monotonic() + 20  # dead, but left for the installer to reap (as systemd would)
            while tar.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
                time.sleep(0.01)

    request = InstallRequest("f-1-1", "http://x/f", sha(data), len(data), "tar.zst")
    result = stream_install(request, target, lambda *a: None, opener=lambda *a: Paced(data, at_byte), cancel=cancel)
    assert killed == [sig]
    if cancelled:
        assert result == InstallResult(ok=False, reason="install cancelled: cidkid is stopping", retry=True)
        assert_not_installed(target, "cancelled")
    else:
        assert not result.ok and not result.retry
        assert result.reason.startswith("tar could not extract the image (killed by SIGKILL)"), result.reason


def test_a_half_written_disk_does_not_look_installed(tmp_path: Path) -> None:
    """An image captured live from a cid node carries its own etc/cid-image: while it is being written, that
    marker lies in the target beside .cid-incomplete. A node that stops there (power cut) and boots the disk
    must not report the image as installed."""
    data = zst(tar_of([("./etc", None), ("./etc/cid-image", b"captured-1-1\nsha256=" + b"ab" * 32 + b"\n"),
                       ("./var", None), ("./var/big", os.urandom(2 * 1024 * 1024))]))
    target = tmp_path / "target"
    target.mkdir()
    seen: dict[str, Any] = {}

    def at_byte(offset: int) -> None:
        if offset >= 1024 * 1024 and "image" not in seen:  # tar has written etc/cid-image by now
            deadline = time.monotonic() + 20
            while not (target / MARKER).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            seen["marker"] = (target / MARKER).read_text()
            seen["flag"] = (target / INCOMPLETE).exists()
            seen["image"] = LinuxPlatform(None, node="n1", mode="system", marker=target / MARKER).identity().image

    request = InstallRequest("real-1-1", "http://x/f", sha(data), len(data), "tar.zst")
    result = stream_install(request, target, lambda *a: None, opener=lambda *a: Paced(data, at_byte))
    assert result.ok, result.reason
    assert seen["marker"].startswith("captured-1-1") and seen["flag"]  # the disk looked installed ...
    assert seen["image"] is None  # ... but the agent does not take it as installed
    assert LinuxPlatform(None, node="n1", marker=target / MARKER).identity().image == "real-1-1"


# -- refusing bad images ----------------------------------------------------------------------------------------

def test_checksum_mismatch_never_marks_installed(tmp_path: Path, server: ImageServer) -> None:
    target = tmp_path / "target"
    target.mkdir()
    data = zst(tar_of([("./etc", None), ("./etc/cid-image", b"forged-1-1\n"), ("./etc/hostname", b"n\n")]))
    result = stream_install(request_for(server, data, digest="ab" * 32), target, lambda *a: None)
    assert not result.ok and not result.retry
    assert result.reason == f"checksum mismatch: expected {'ab' * 32}, got {sha(data)}"
    assert_not_installed(target, "checksum")
    assert (target / "etc/hostname").exists()  # extracted, but not marked


def test_size_mismatch_and_missing_sha256_are_refused(tmp_path: Path, server: ImageServer) -> None:
    target = tmp_path / "target"
    target.mkdir()
    data = zst(tar_of([("./f", b"x")]))
    result = stream_install(request_for(server, data, size=len(data) + 1), target, lambda *a: None)
    assert not result.ok and not result.retry and "size mismatch" in result.reason
    result = stream_install(InstallRequest("f-1-1", server.url("/img.tar.zst"), None, None), target, lambda *a: None)
    assert not result.ok and not result.retry and "no valid sha256" in result.reason
    assert_not_installed(target, "sha256")


def test_corrupt_and_truncated_streams(tmp_path: Path, server: ImageServer, rootfs: RootImage) -> None:
    garbage = b"this is not a zstd stream " * 4000
    target = tmp_path / "t1"
    target.mkdir()
    result = stream_install(request_for(server, garbage), target, lambda *a: None)
    assert not result.ok and not result.retry
    assert result.reason.startswith("corrupt compressed stream") and "image file itself is bad" in result.reason
    cut = rootfs.zst[:len(rootfs.zst) * 2 // 3]
    target = tmp_path / "t2"
    target.mkdir()
    result = stream_install(request_for(server, cut), target, lambda *a: None)
    assert not result.ok and not result.retry and result.reason.startswith("truncated image"), result.reason
    assert_not_installed(target, "truncated")
    target = tmp_path / "t3"
    target.mkdir()
    result = stream_install(request_for(server, rootfs.gz[:-100], fmt="tar.gz"), target, lambda *a: None)
    assert not result.ok and "truncated" in result.reason, result.reason


@pytest.mark.parametrize("case", ["dotdot", "symlink", "hardlink", "hardlink-dotdot"])
def test_members_outside_the_target_are_refused(tmp_path: Path, server: ImageServer, case: str) -> None:
    target, outside, secrets = tmp_path / "target", tmp_path / "outside", tmp_path / "secrets"
    for d in (target, outside, secrets):
        d.mkdir()
    (secrets / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    members, culprit = {
        "dotdot": ([("./ok", b"1"), ("../outside/evil", b"pwned")], "../outside/evil"),
        "symlink": ([("./ok", b"1"), ("escape", ("sym", str(outside))), ("escape/pwned", b"pwned")],
                    "escape/pwned"),
        "hardlink": ([("./ok", b"1"), ("h", ("hard", str(secrets / "passwd"))), ("h", b"pwned")], "h"),
        "hardlink-dotdot": ([("./ok", b"1"), ("h", ("hard", "../secrets/passwd")), ("h", b"pwned")],
                            "h: Cannot hard link"),
    }[case]
    result = stream_install(request_for(server, zst(tar_of(members))), target, lambda *a: None)
    assert not result.ok and not result.retry
    assert culprit in result.reason, result.reason
    assert list(outside.iterdir()) == []
    assert (secrets / "passwd").read_text() == "root:x:0:0::/root:/bin/sh\n"
    assert (secrets / "passwd").stat().st_nlink == 1
    assert_not_installed(target, culprit)


def test_absolute_member_names_are_accepted_inside_the_target(tmp_path: Path, server: ImageServer) -> None:
    target = tmp_path / "target"
    target.mkdir()
    data = zst(tar_of([("/etc", None), ("/etc/hostname", b"abs\n"), ("/etc/h2", ("hard", "/etc/hostname"))]))
    result = stream_install(request_for(server, data), target, lambda *a: None)
    assert result.ok, result.reason
    assert (target / "etc/hostname").read_text() == "abs\n"
    assert (target / "etc/h2").stat().st_ino == (target / "etc/hostname").stat().st_ino


def test_marker_is_not_written_through_a_symlinked_etc(tmp_path: Path, server: ImageServer) -> None:
    target, outside = tmp_path / "target", tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    result = stream_install(request_for(server, zst(tar_of([("etc", ("sym", str(outside)))]))), target,
                            lambda *a: None)
    assert not result.ok and "symlink" in result.reason
    assert list(outside.iterdir()) == []
    assert_not_installed(target, "symlink")


# -- targets that cannot take the image -----------------------------------------------------------------------

def test_a_full_target_fails_saying_so(tmp_path: Path, server: ImageServer, mounts: Callable[..., Path]) -> None:
    target = mounts(tmp_path / "small", "size=2m")
    data = zst(tar_of([("./etc", None), ("./etc/big", os.urandom(4 * 1024 * 1024))]))
    result = stream_install(request_for(server, data), target, lambda *a: None)
    assert not result.ok and not result.retry
    assert result.reason.startswith(f"target full: {target} has no room left"), result.reason
    assert_not_installed(target)


def test_a_read_only_target_fails_saying_so(tmp_path: Path, server: ImageServer,
                                            mounts: Callable[..., Path]) -> None:
    target = mounts(tmp_path / "ro", "ro,size=1m")
    result = stream_install(request_for(server, zst(tar_of([("./f", b"x")]))), target, lambda *a: None)
    assert result == InstallResult(ok=False, reason=f"target {target} is read-only", retry=False)
    assert server.requests == []  # nothing was downloaded
    with pytest.raises(TargetError, match="is read-only"):
        DirectoryTarget(target).prepare()


def test_unknown_format_404_and_refused_connection(tmp_path: Path, server: ImageServer) -> None:
    target = tmp_path / "target"
    target.mkdir()
    data = zst(tar_of([("./f", b"x")]))
    result = stream_install(request_for(server, data, fmt="tar.xz"), target, lambda *a: None)
    assert not result.ok and not result.retry and result.reason.startswith("unknown image format 'tar.xz'")
    assert server.requests == []
    missing = InstallRequest("x-1-1", server.url("/nope.tar.zst"), sha(data), None, "tar.zst")
    result = stream_install(missing, target, lambda *a: None)
    assert not result.ok and not result.retry
    assert "HTTP 404" in result.reason and missing.url in result.reason
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    refused = InstallRequest("x-1-1", f"http://127.0.0.1:{port}/x.tar.zst", sha(data), None, "tar.zst")
    result = stream_install(refused, target, lambda *a: None, connect_timeout=5)
    assert not result.ok and result.retry and "connection refused" in result.reason
    assert_not_installed(target, "connection refused")


def test_a_silent_server_times_out_retryably(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    with socket.socket() as silent:  # the kernel completes the handshake; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/x.tar.zst"
        started = time.monotonic()
        result = stream_install(InstallRequest("x-1-1", url, "ab" * 32, None, "tar.zst"), target, lambda *a: None,
                                connect_timeout=0.3, read_timeout=0.3)
    assert not result.ok and result.retry and result.reason == f"cannot download {url}: timed out"
    assert time.monotonic() - started < 5


# -- DirectoryTarget -------------------------------------------------------------------------------------------

def test_directory_target_empties_without_following_symlinks(tmp_path: Path) -> None:
    target, outside = tmp_path / "target", tmp_path / "outside"
    (target / "etc/deep/er").mkdir(parents=True)
    outside.mkdir()
    (outside / "keep").write_text("keep")
    (target / "etc/cid-image").write_text("old-1-1\n")
    (target / "etc/deep/er/file").write_text("x")
    (target / "link").symlink_to(outside)
    (target / "etc/deep/link").symlink_to(outside / "keep")
    os.mkfifo(target / "fifo")
    assert DirectoryTarget(target).prepare() == target
    assert list(target.iterdir()) == []
    assert (outside / "keep").read_text() == "keep"


def test_directory_target_refuses_root_missing_dirs_and_inner_mounts(tmp_path: Path,
                                                                     mounts: Callable[..., Path]) -> None:
    for path in (Path("/"), tmp_path / ".." / ".." / ".." / ".." / ".." / ".." / ".."):
        with pytest.raises(TargetError, match="root of the running system"):
            DirectoryTarget(path).prepare()
    with pytest.raises(TargetError, match="does not exist"):
        DirectoryTarget(tmp_path / "nope").prepare()
    target = tmp_path / "target"
    (target / "etc").mkdir(parents=True)
    (target / "etc/cid-image").write_text("old-1-1\n")
    inner = mounts(target / "zz-mounted")
    (inner / "precious").write_text("keep")
    with pytest.raises(TargetError, match="zz-mounted is a mount point inside it"):
        DirectoryTarget(target).prepare()
    assert (inner / "precious").read_text() == "keep"
    assert not (target / "etc/cid-image").exists()
    assert "mount point" in (target / INCOMPLETE).read_text()


def test_directory_target_refuses_a_bind_mount_of_its_own_file_system(tmp_path: Path) -> None:
    target, elsewhere = tmp_path / "target", tmp_path / "elsewhere"
    (target / "home").mkdir(parents=True)
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("keep")
    bound = subprocess.run(["mount", "--bind", str(elsewhere), str(target / "home")], capture_output=True, text=True)
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bound.stderr.strip()}")
    try:
        with pytest.raises(TargetError, match="home is a mount point inside it"):
            DirectoryTarget(target).prepare()
    finally:
        subprocess.run(["umount", str(target / "home")], check=True)
    assert (elsewhere / "precious").read_text() == "keep"


def test_device_target_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="install device .*nodev does not exist"):
        DeviceTarget(tmp_path / "nodev", tmp_path / "mnt").prepare()
    with pytest.raises(ValueError, match="fstype"):
        DeviceTarget(tmp_path / "nodev", tmp_path / "mnt", fstype="ntfs")


# -- LinuxPlatform and the command line ----------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_linux_platform_installs_in_a_thread_reporting_on_the_reactor(tmp_path: Path, server: ImageServer,
                                                                          rootfs: RootImage) -> None:
    from twisted.internet import reactor

    target = tmp_path / "target"
    target.mkdir()
    (target / "stale").write_text("from the last image")
    platform = LinuxPlatform(reactor, node="n1", mode="installer", target=target)
    seen: list[tuple[int, str]] = []
    result = await platform.install(request_for(server, rootfs.zst, image="rootfs-2-1"),
                                    lambda step, done, total: seen.append((threading.get_ident(), step)))
    assert result == InstallResult(ok=True)
    assert seen and {ident for ident, _step in seen} == {threading.get_ident()}
    assert seen[-1][1] == "verifying"
    assert compare_trees(rootfs.src, target, ignore=IGNORE) == []
    assert_installed(target, "rootfs-2-1", sha(rootfs.zst))

    bad = LinuxPlatform(reactor, node="n1", mode="installer", target=tmp_path / "t2",
                        install_device=tmp_path / "nodev")
    result = await bad.install(request_for(server, rootfs.zst), lambda *a: None)
    assert not result.ok and not result.retry and "does not exist" in result.reason
    system = LinuxPlatform(reactor, node="n1", target=target)
    result = await system.install(request_for(server, rootfs.zst), lambda *a: None)
    assert result == InstallResult(ok=False, reason=SYSTEM_MODE_REASON, retry=False)


def test_installer_options(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert target_of(parser.parse_args(["--mode", "installer"])) == Path("/mnt/cid-target")
    assert target_of(parser.parse_args([])) == Path("/")
    args = parser.parse_args(["--mode", "installer", "--target", "/t", "--install-device", "/dev/sdz"])
    assert (target_of(args), args.install_device) == (Path("/t"), Path("/dev/sdz"))
    saved = structlog.get_config()
    try:
        assert main(["--install-device", "/dev/sdz"]) == 2
    finally:
        structlog.configure(**saved)
    assert "--install-device only applies with --mode installer" in capsys.readouterr().err
