"""Multicast distribution without the network bed: the group setting, the piece list, the installer's checked
source and its HTTP fallback, the install message, and cidd's sessions (tests/test_distribution_bed.py runs the
real thing in network namespaces)."""

from __future__ import annotations

import base64
import io
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from cidcatalog.catalog import Image
from cidd.config import ConfigError, parse_config
from cidd.distribution import MIN_PIECE, Distributor, piece_digests, piece_size_for
from cidinstall.multicast import MulticastFailed, MulticastSource, digest
from cidinstall.stream import stream_install
from cidinstall.types import PIECE_DIGEST, MulticastSpec
from cidkid.protocol import parse_install
from tests.test_installer import ImageServer, request_for, serve, stop_serving, tar_of, zst

# --- configuration --------------------------------------------------------------------------------------------


def test_distribution_is_a_group_setting_with_http_by_default() -> None:
    config = parse_config({"groups": {"fast": {"distribution": {"method": "multicast", "rate_mbit": 900,
                                                                "interface": "eth1"}}, "slow": {}}})
    assert config.distribution_of("fast").method == "multicast"
    assert config.distribution_of("fast").rate_mbit == 900 and config.distribution_of("fast").interface == "eth1"
    assert config.distribution_of("slow").method == "http"
    with pytest.raises(ConfigError) as err:
        parse_config({"groups": {"g": {"distribution": {"method": "torrent", "port_base": 65530, "x": 1}}}})
    text = str(err.value)
    assert "'method' must be one of http, multicast" in text and "unknown key 'x'" in text
    assert "port_base" in text


# --- pieces ---------------------------------------------------------------------------------------------------


def test_piece_digests_cover_the_file_in_at_most_1024_pieces(tmp_path: Path) -> None:
    assert piece_size_for(10) == MIN_PIECE
    assert piece_size_for(5 << 30) == 5 << 20  # 5 GiB: 1024 pieces of 5 MiB
    data = random.Random(3).randbytes(MIN_PIECE * 2 + 5)
    (tmp_path / "f").write_bytes(data)
    size, piece, digests = piece_digests(tmp_path / "f")
    assert (size, piece) == (len(data), MIN_PIECE) and len(digests) == 3 * PIECE_DIGEST
    assert digests[2 * PIECE_DIGEST:] == digest(data[2 * MIN_PIECE:])


# --- the installer's multicast source -------------------------------------------------------------------------


class FakeReceiver:
    """Stands for the udp-receiver process: ``stdout`` gives ``data``."""

    def __init__(self, data: bytes, code: int = 0) -> None:
        self.stdout = io.BufferedReader(io.BytesIO(data))  # type: ignore[arg-type]
        self.stderr = io.BytesIO(b"Connected as #0 to 10.0.0.1\r\n")
        self.code = code
        self.argv: list[str] = []

    def poll(self) -> int:
        return self.code

    def wait(self, timeout: float | None = None) -> int:
        return self.code

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        pass


def spec_for(data: bytes, piece: int = 1 << 20) -> MulticastSpec:
    pieces = b"".join(digest(data[i:i + piece]) for i in range(0, len(data), piece))
    return MulticastSpec(port=9000, size=len(data), piece_size=piece, pieces=pieces, node="n1", session=1)


def popen_giving(data: bytes, code: int = 0) -> Any:
    def popen(argv: list[str], **kwargs: Any) -> FakeReceiver:
        receiver = FakeReceiver(data, code)
        receiver.argv = argv
        return receiver
    return popen


def read_all(source: MulticastSource) -> bytes:
    out = bytearray()
    view = memoryview(bytearray(300_000))
    while n := source.readinto(view):
        out += view[:n]
    return bytes(out)


def test_the_multicast_source_hands_on_only_checked_pieces() -> None:
    data = random.Random(1).randbytes((3 << 20) + 1000)
    source = MulticastSource(spec_for(data), "127.0.0.1", "img", popen=popen_giving(data), which=lambda _: "/x")
    assert read_all(source) == data
    assert source.getheader("Content-Length") == str(len(data))
    bad = bytearray(data)
    bad[(2 << 20) + 7] ^= 1
    source = MulticastSource(spec_for(data), "127.0.0.1", "img", popen=popen_giving(bytes(bad)),
                             which=lambda _: "/x")
    out = bytearray()
    view = memoryview(bytearray(1 << 20))
    with pytest.raises(MulticastFailed) as err:
        while n := source.readinto(view):
            out += view[:n]
    assert bytes(out) == data[:2 << 20] and source.offset == 2 << 20  # every byte handed on was good
    assert "piece 2 " in err.value.strerror and "failed its check" in err.value.strerror
    short = MulticastSource(spec_for(data), "127.0.0.1", "img", popen=popen_giving(data[:5000], 1),
                            which=lambda _: "/x")
    with pytest.raises(MulticastFailed, match="stopped at byte 5000"):
        read_all(short)
    with pytest.raises(MulticastFailed, match="udp-receiver .* is not installed"):
        MulticastSource(spec_for(data), "127.0.0.1", "img", popen=popen_giving(data), which=lambda _: None)


def test_a_broken_multicast_goes_on_over_http_from_the_last_good_piece(tmp_path: Path) -> None:
    data = zst(tar_of([("etc", None), ("etc/a", random.Random(2).randbytes(3 << 20)), ("etc/b", b"b" * 999)]))
    spec = spec_for(data)
    server = ImageServer()
    serve(server)
    try:
        request = replace(request_for(server, data), multicast=spec)
        bad = bytearray(data)
        bad[(1 << 20) + 10] ^= 0xFF
        target = tmp_path / "t"
        target.mkdir()
        result = stream_install(request, target, lambda *a: None, multicast_source=lambda s, host, image:
                                MulticastSource(s, host, image, popen=popen_giving(bytes(bad)), which=lambda _: "/x"))
        assert result.ok, result.reason
        assert (target / "etc" / "b").read_bytes() == b"b" * 999
        (path, headers), = server.requests
        assert headers["Range"] == f"bytes={1 << 20}-"  # HTTP from the start of the bad piece
        assert "piece 1 " in headers["X-Cid-Fallback"] and headers["X-Cid-Node"] == "n1"
        # No receiver at all: the whole file over HTTP, said so.
        server.requests.clear()
        result = stream_install(request, target, lambda *a: None, multicast_source=lambda s, host, image:
                                MulticastSource(s, host, image, which=lambda _: None))
        assert result.ok, result.reason
        (path, headers), = server.requests
        assert "Range" not in headers and "udp-receiver" in headers["X-Cid-Fallback"]
        # A corrupt image is still refused by its whole-file sha256, whatever the multicast said.
        server.requests.clear()
        wrong = replace(request, sha256="0" * 64)
        result = stream_install(wrong, target, lambda *a: None, multicast_source=lambda s, host, image:
                                MulticastSource(s, host, image, popen=popen_giving(data), which=lambda _: "/x"))
        assert not result.ok and result.reason.startswith("checksum mismatch") and not server.requests
    finally:
        stop_serving(server)


def test_the_install_message_carries_the_multicast_session() -> None:
    spec = spec_for(b"x" * 3000, piece=1000)
    message = {"type": "install", "image": "a-1-0", "url": "http://h/images/a", "sha256": "0" * 64, "size": 3000,
               "distribution": {"method": "multicast", "session": 4, "port": 9006, "size": 3000,
                                "piece_size": 1000, "pieces": base64.b64encode(spec.pieces).decode(),
                                "start_timeout": 30, "stall": 12, "node": "n7"}}
    request = parse_install(message)
    assert request.multicast == replace(spec, port=9006, start_timeout=30.0, stall=12.0, node="n7", session=4)
    assert parse_install({**message, "distribution": {"method": "future"}}).multicast is None
    with pytest.raises(Exception, match="pieces"):
        parse_install({**message, "distribution": {**message["distribution"], "pieces": "AAAA"}})


# --- cidd's sessions ------------------------------------------------------------------------------------------


class FakeProcess:
    def __init__(self) -> None:
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:  # noqa: N802 - Twisted's name
        self.signals.append(name)


def distributor(tmp_path: Path, **dist: Any) -> tuple[Distributor, Clock, list, list]:
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "a-1-0.tar.zst").write_bytes(os.urandom(100_000))
    config = parse_config({"state_dir": str(tmp_path), "groups": {"default": {"distribution": {
        "method": "multicast", "gather": 2, "wait": 5, "rate_mbit": 900, **dist}}}})
    sent: list[tuple[str, dict]] = []
    spawned: list[tuple[Any, str, list[str]]] = []

    def spawn(protocol: Any, executable: str, argv: list[str], **kwargs: Any) -> FakeProcess:
        spawned.append((protocol, executable, argv))
        return FakeProcess()

    clock = Clock()
    dist_ = Distributor(config, clock, tmp_path / "images", lambda node, message: sent.append((node, message)),
                        spawn=spawn, which=lambda name: f"/usr/bin/{name}")
    return dist_, clock, sent, spawned


IMAGE = Image("a", "1", "0", "a-1-0.tar.zst", size=100_000, sha256="0" * 64)


def install(node: str) -> dict[str, Any]:
    return {"type": "install", "image": "a-1-0", "url": "http://h/images/a-1-0.tar.zst", "attempt": 1}


def test_nodes_of_one_image_share_a_session_and_late_ones_get_the_next(tmp_path: Path) -> None:
    dist, clock, sent, spawned = distributor(tmp_path)
    assert dist.take("n1", "default", install("n1"), IMAGE) and dist.take("n2", "default", install("n2"), IMAGE)
    assert [node for node, _ in sent] == ["n1", "n2"]
    field = sent[0][1]["distribution"]
    assert field["method"] == "multicast" and field["port"] == 9000 and field["size"] == 100_000
    assert len(base64.b64decode(field["pieces"])) == PIECE_DIGEST and field["node"] == "n1"
    assert not spawned
    clock.advance(2)
    (_protocol, executable, argv), = spawned
    assert executable == "/usr/bin/udp-sender" and argv[argv.index("--min-receivers") + 1] == "2"
    assert argv[argv.index("--max-bitrate") + 1] == "900m" and argv[argv.index("--portbase") + 1] == "9000"
    assert dist.take("n3", "default", install("n3"), IMAGE)  # the first session is sending: a new one
    assert sent[-1][1]["distribution"]["port"] == 9002
    assert dist.view("n1")["state"] == "sending" and dist.view("n3")["state"] == "gathering"
    spawned[0][0].errReceived(b"New connection from 10.0.0.2  (#0)\nStarting transfer: 9\r\n")
    dist.sender_ended(dist.sessions[1], 0, None)
    assert dist.view("n1")["state"] == "done" and 1 not in dist.sessions


def test_http_with_a_reason_when_multicast_cannot_be_used(tmp_path: Path) -> None:
    dist, clock, sent, spawned = distributor(tmp_path)
    private = replace(IMAGE, owner="alice", visibility="private")
    assert not dist.take("n1", "default", install("n1"), private)
    assert "private" in dist.view("n1")["fallback"] and not sent
    dist.which = lambda name: None
    assert not dist.take("n2", "default", install("n2"), IMAGE)
    assert "udp-sender" in dist.view("n2")["fallback"]
    dist.which = lambda name: f"/usr/bin/{name}"
    missing = replace(IMAGE, file="gone.tar.zst")
    assert not dist.take("n3", "default", install("n3"), missing)
    assert "cannot read the image file" in dist.view("n3")["fallback"]
    dist.take("n4", "default", install("n4"), IMAGE)
    dist.fallback_reported("n4", "a-1-0", "piece 3 failed its check")
    assert dist.view("n4")["method"] == "http" and dist.view("n4")["fallback"] == "piece 3 failed its check"


def test_a_sender_no_receiver_reaches_is_stopped(tmp_path: Path) -> None:
    dist, clock, sent, spawned = distributor(tmp_path)
    dist.take("n1", "default", install("n1"), IMAGE)
    clock.advance(2)
    process = dist.sessions[1].process
    clock.advance(5 + 15)
    assert process.signals == ["KILL"]


def test_udp_receiver_is_started_for_the_session() -> None:
    data = b"z" * 10
    seen: list[list[str]] = []

    def popen(argv: list[str], **kwargs: Any) -> FakeReceiver:
        seen.append(argv)
        return FakeReceiver(data)

    spec = replace(spec_for(data), start_timeout=40, stall=9.4)
    source = MulticastSource(spec, "127.0.0.1", "img", popen=popen, which=lambda _: "/usr/bin/udp-receiver")
    assert read_all(source) == data
    argv = seen[0]
    assert argv[:4] == ["udp-receiver", "--nokbd", "--portbase", "9000"]
    assert argv[argv.index("--start-timeout") + 1] == "40" and argv[argv.index("--receive-timeout") + 1] == "9"
