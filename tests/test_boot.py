"""Boot profiles: ethers parsing, iPXE and pxelinux rendering, and a real cidd publishing them mid-switch."""

from __future__ import annotations

import time
import urllib.request

import pytest

from cidd.boot import (
    EthersError,
    InstallerBoot,
    ipxe_script,
    normalize_mac,
    parse_ethers,
    pxelinux_config,
    pxelinux_name,
)
from tests.procs import Cluster


def test_macs_in_every_spelling_ipxe_and_ethers_use() -> None:
    want = "52:54:00:12:34:56"
    for text in ("52:54:00:12:34:56", "52-54-00-12-34-56", "525400123456", "52:54:00:12:34:56".upper()):
        assert normalize_mac(text) == want
    for bad in ("52:54:00:12:34", "52:54-00:12:34:56", "zz:54:00:12:34:56", "", "../../etc"):
        assert normalize_mac(bad) is None


def test_ethers_parses_and_reports_every_bad_line() -> None:
    macs = parse_ethers("# comment\n52:54:00:00:00:01 node01\n52-54-00-00-00-02  node02 # trailing\n\n")
    assert macs == {"52:54:00:00:00:01": "node01", "52:54:00:00:00:02": "node02"}
    with pytest.raises(EthersError) as err:
        parse_ethers("nonsense\n52:54:00:00:00:01 a\n52:54:00:00:00:01 b\n52:54:00:00:00:03\n", "/etc/cid/ethers")
    text = str(err.value)
    assert "/etc/cid/ethers:1:" in text and "/etc/cid/ethers:3: MAC 52:54:00:00:00:01 is already given to a" in text
    assert "/etc/cid/ethers:4:" in text


def test_ipxe_scripts() -> None:
    installer = InstallerBoot("http://h:38080/boot/files/vmlinuz", "http://h:38080/boot/files/initrd.img", "quiet")
    script = ipxe_script("node01", "installer", installer, "10.0.0.1:38008", None, "job 7, image debian-12-1")
    assert script.startswith("#!ipxe\n")
    kernel = ("kernel http://h:38080/boot/files/vmlinuz initrd=initrd.img cid.server=10.0.0.1:38008 "
              "cid.node=node01 quiet")
    assert kernel in script
    assert "initrd --name initrd.img http://h:38080/boot/files/initrd.img" in script and script.endswith("boot\n")
    assert "sanboot" in ipxe_script("node01", "disk", installer, "s:1")
    unknown = ipxe_script(None, "installer", installer, "s:1")
    assert "sanboot" in unknown and "kernel" not in unknown  # an unknown machine is never reinstalled
    assert "kernel" not in ipxe_script("node01", "installer", None, "s:1")  # no installer configured


def test_pxelinux_files() -> None:
    assert pxelinux_name("52:54:00:00:00:01") == "01-52-54-00-00-00-01"
    text = pxelinux_config("n1", "installer", "cid/vmlinuz", "cid/initrd.img", "h:38008", None, "")
    assert "KERNEL cid/vmlinuz" in text and "APPEND cid.server=h:38008 cid.node=n1" in text
    assert "LOCALBOOT 0" in pxelinux_config("n1", "disk", "k", "i", "h:1", None, "")


@pytest.mark.slow
def test_cidd_publishes_the_installer_while_switching_and_the_disk_after(tmp_path) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"K" * 1000)
    initrd.write_bytes(b"I" * 2000)
    (tmp_path / "ethers").write_text("52:54:00:00:00:01 boot01\n52:54:00:00:00:02 boot02\n")
    cluster = Cluster(tmp_path / "c", extra_config={"boot": {
        "ethers": str(tmp_path / "ethers"), "kernel": str(kernel), "initrd": str(initrd),
        "cmdline": "console=ttyS0", "tftp_dir": str(tmp_path / "tftp")}})
    cluster.start_cidd()
    try:
        cluster.start_fleet("boot[01-02]", "--reboot-delay", "0.2", "--install-time", "3",
                            "--initial-image", "debian-12-1")
        cluster.wait_online(2)
        base = f"http://127.0.0.1:{cluster.http_port}"

        def script(mac: str) -> str:
            return urllib.request.urlopen(f"{base}/boot/{mac}", timeout=10).read().decode()

        assert "sanboot" in script("52-54-00-00-00-01")  # nothing asked yet: local disk
        capture = cluster.cidcapt_background("-j", "b1", "-n", "boot01", "-i", "rocky-9-3")
        deadline = time.monotonic() + 20
        while "kernel" not in script("52-54-00-00-00-01") and time.monotonic() < deadline:
            time.sleep(0.1)
        mid = script("52:54:00:00:00:01")
        assert f"kernel {base}/boot/files/vmlinuz" in mid and "cid.node=boot01" in mid
        assert f"cid.server=127.0.0.1:{cluster.port}" in mid and "console=ttyS0" in mid and "cid.token=" in mid
        assert "sanboot" in script("525400000002")  # the other node is not switching
        pxe = (tmp_path / "tftp" / "pxelinux.cfg" / "01-52-54-00-00-00-01").read_text()
        assert "KERNEL cid/vmlinuz" in pxe
        assert urllib.request.urlopen(f"{base}/boot/files/vmlinuz", timeout=10).read() == b"K" * 1000
        assert capture.wait(timeout=60) == 0
        assert "sanboot" in script("52:54:00:00:00:01")
        assert "LOCALBOOT 0" in (tmp_path / "tftp" / "pxelinux.cfg" / "01-52-54-00-00-00-01").read_text()
    finally:
        cluster.stop()
