"""blancmange's pure parts (config, apt sources, module order) and cid-partition on a real loop device.

The whole build, booted in QEMU, is tested by tests/test_vm_switch.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blancmange import main as blancmange_main
from blancmange.build import apt_mirror, debootstrap_tree, module_order, probe_mirror
from blancmange.config import BlancmangeError, MirrorUnreachable, load_config

HERE = Path(__file__).resolve().parent.parent / "blancmange"


def test_the_shipped_config_loads_and_its_tree_key_depends_only_on_suite_and_packages(tmp_path: Path) -> None:
    config = load_config(HERE / "top_config.yaml")
    assert "python3" in config.packages and "virtio_net" in config.modules and config.ssh_keys == ()
    assert config.ca is None
    text = (HERE / "top_config.yaml").read_text()
    other = tmp_path / "c.yaml"
    other.write_text(text.replace("compression_level: 12", "compression_level: 3"))
    assert load_config(other).tree_key() == config.tree_key()
    other.write_text(text.replace("  - kexec-tools\n", ""))
    assert load_config(other).tree_key() != config.tree_key()


@pytest.mark.parametrize("text, words", [
    ("packages: [zstd]\n", "must include python3 and busybox"),
    ("packages: [python3, busybox]\nmirror: http://x\n", "unknown key(s) mirror"),
    ("packages: [python3, busybox]\ncompression_level: 30\n", "compression_level"),
    ("- a list\n", "expected a mapping"),
])
def test_bad_configs_say_what_to_fix(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(BlancmangeError) as err:
        load_config(path)
    assert words in err.value.message and str(path) in err.value.message


def test_the_mirror_comes_from_the_apt_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("# nothing\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n")
    assert apt_mirror("bookworm", tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://one.example/debian trixie main\n")
    assert apt_mirror("trixie", tmp_path) == "http://one.example/debian"
    with pytest.raises(BlancmangeError, match="no apt source for Debian bookworm"):
        apt_mirror("bookworm", tmp_path)


@pytest.fixture()
def silent_mirror() -> Iterator[tuple[str, list[socket.socket]]]:
    """Yield (a mirror URL on loopback whose server accepts connections and never answers, the accepted ones)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/debian", accepted
    server.close()
    for conn in accepted:
        conn.close()


@pytest.fixture()
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Talk to loopback directly, whatever proxy the machine configures (never the internet)."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def test_a_mirror_that_never_answers_stops_the_build_in_bounded_time(tmp_path: Path, no_proxy: None,
                                                                     silent_mirror: tuple[str, list]) -> None:
    url, accepted = silent_mirror
    config = dataclasses.replace(load_config(HERE / "top_config.yaml"), mirror=url, mirror_timeout=1.5)
    started = time.monotonic()
    with pytest.raises(MirrorUnreachable) as err:
        debootstrap_tree(config, tmp_path / "cache")
    assert 1.4 < time.monotonic() - started < 6
    assert f"Debian mirror {url} cannot be used: no answer within 1.5 s" in err.value.message
    assert accepted, "the probe never reached the test mirror"
    assert not (tmp_path / "cache" / "trees").exists()  # nothing was started


def test_a_mirror_where_nothing_listens_stops_the_build_at_once(tmp_path: Path, no_proxy: None,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/debian"
    monkeypatch.setattr(blancmange_main.os, "geteuid", lambda: 0)  # the probe comes before anything needs root
    started = time.monotonic()
    code = blancmange_main.main(["--cache", str(tmp_path / "cache"), "--mirror", url, "build", "--out",
                                 str(tmp_path / "out")])
    assert code == 1 and time.monotonic() - started < 15
    err = capsys.readouterr().err
    assert f"blancmange: Debian mirror {url} cannot be used: " in err and "refused" in err.lower()
    assert not (tmp_path / "out").exists()


def test_a_file_mirror_must_hold_the_suite(tmp_path: Path) -> None:
    with pytest.raises(MirrorUnreachable, match="has no file://.*/dists/bookworm/Release"):
        probe_mirror(f"file://{tmp_path}", "bookworm", 1.0)
    (tmp_path / "dists" / "bookworm").mkdir(parents=True)
    (tmp_path / "dists" / "bookworm" / "Release").write_text("Suite: bookworm\n")
    probe_mirror(f"file://{tmp_path}", "bookworm", 1.0)


def test_modules_come_with_their_dependencies_first_and_builtins_are_skipped(tmp_path: Path) -> None:
    base = tmp_path / "lib" / "modules" / "6.1.0-9-amd64"
    base.mkdir(parents=True)
    (base / "modules.dep").write_text(
        "kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko\n"
        "kernel/fs/jbd2/jbd2.ko:\nkernel/fs/mbcache.ko:\nkernel/lib/crc16.ko:\n"
        "kernel/drivers/block/virtio_blk.ko:\nkernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n"
        "kernel/net/core/failover.ko:\nkernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko\n")
    (base / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    order = module_order(tmp_path, "6.1.0-9-amd64", ("virtio_pci", "virtio_net", "ext4", "virtio-blk", "jbd2"))
    assert order == ["kernel/net/core/failover.ko", "kernel/drivers/net/net_failover.ko",
                     "kernel/drivers/net/virtio_net.ko", "kernel/fs/jbd2/jbd2.ko", "kernel/fs/mbcache.ko",
                     "kernel/lib/crc16.ko", "kernel/fs/ext4/ext4.ko", "kernel/drivers/block/virtio_blk.ko"]
    with pytest.raises(BlancmangeError, match="nosuch"):
        module_order(tmp_path, "6.1.0-9-amd64", ("nosuch",))


@pytest.fixture
def loop_disk(tmp_path: Path):
    image = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    found = subprocess.run(["losetup", "--find", "--show", "--partscan", str(image)], capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip(f"loop devices cannot be used here: {found.stderr.strip()}")
    yield found.stdout.strip()
    subprocess.run(["losetup", "-d", found.stdout.strip()], capture_output=True)


def partition(disk: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(HERE / "cid-partition"), disk], capture_output=True, text=True, timeout=60)


def test_cid_partition_lays_out_an_empty_disk_and_keeps_an_existing_layout(loop_disk: str) -> None:
    first = partition(loop_disk)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"{loop_disk}p1" and "no partition table" in first.stderr
    layout = subprocess.run(["sfdisk", "-d", loop_disk], capture_output=True, text=True, check=True).stdout
    assert 'name="cid-root"' in layout and layout.count(f"{loop_disk}p") == 1
    again = partition(loop_disk)  # a disk with a table is left as it is
    assert again.returncode == 0 and again.stdout.strip() == f"{loop_disk}p1" and again.stderr == ""
    # a site layout: swap first, cid-root second, scratch third: the root is found by name, nothing changes
    subprocess.run(["sfdisk", "-q", loop_disk], input='label: gpt\nsize=8M, name="swap"\nsize=32M, name="cid-root"\n'
                   'size=+, name="scratch"\n', text=True, check=True)
    before = subprocess.run(["sfdisk", "-d", loop_disk], capture_output=True, text=True, check=True).stdout
    site = partition(loop_disk)
    assert site.returncode == 0 and site.stdout.strip() == f"{loop_disk}p2", site.stderr
    assert subprocess.run(["sfdisk", "-d", loop_disk], capture_output=True, text=True).stdout == before
