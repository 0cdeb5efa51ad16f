"""Boot profiles: ethers parsing, iPXE and pxelinux rendering, and a real cidd publishing them mid-switch."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from cidd.core.boot import (
    EthersError,
    ImageBoot,
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


def test_ipxe_script_of_an_installed_image_boots_its_own_kernel_on_the_local_root() -> None:
    image = ImageBoot("debian-12-1", "http://h/boot/images/debian-12-1/vmlinuz",
                      "http://h/boot/images/debian-12-1/initrd.img", "console=ttyS0")
    script = ipxe_script("node01", "disk", None, "10.0.0.1:38008", image=image)
    assert ("kernel http://h/boot/images/debian-12-1/vmlinuz initrd=initrd.img root=LABEL=cid-root rw "
            "cid.server=10.0.0.1:38008 cid.node=node01 console=ttyS0\n") in script
    assert "initrd --name initrd.img http://h/boot/images/debian-12-1/initrd.img\nboot\n" in script
    assert "sanboot" not in script and "cid.token" not in script  # an installed system gets no boot token
    own_root = ImageBoot("x-1-1", "k", "i", "root=/dev/sda2 quiet")
    assert "kernel k initrd=initrd.img cid.server=s:1 cid.node=n root=/dev/sda2 quiet" in ipxe_script(
        "n", "disk", None, "s:1", image=own_root)
    # the installer profile and unknown machines never boot an image kernel
    assert "boot/images" not in ipxe_script("node01", "installer", InstallerBoot("k", "i"), "s:1", "t", image=image)
    assert "sanboot" in ipxe_script(None, "disk", None, "s:1", image=image)


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
    images = tmp_path / "images"  # cid-mkimg stores an image's kernel and initrd next to it
    images.mkdir()
    (images / "rocky-9-3.vmlinuz").write_bytes(b"R" * 100)
    (images / "rocky-9-3.initrd.img").write_bytes(b"r" * 50)
    cluster = Cluster(tmp_path / "c", extra_config={"image_dir": str(images), "boot": {
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
        after = script("52:54:00:00:00:01")  # the image's own kernel, its root on the local disk
        assert f"kernel {base}/boot/images/rocky-9-3/vmlinuz initrd=initrd.img root=LABEL=cid-root" in after
        assert "cid.node=boot01" in after and "cid.token" not in after
        assert urllib.request.urlopen(f"{base}/boot/images/rocky-9-3/initrd.img", timeout=10).read() == b"r" * 50
        assert "sanboot" in script("52:54:00:00:00:02")  # debian-12-1 has no boot files here: its disk
        for bad in ("debian-12-1/vmlinuz", "nosuch-1-1/vmlinuz", "rocky-9-3/other", "rocky-9-3/vmlinuz/x"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"{base}/boot/images/{bad}", timeout=10)
            assert err.value.code == 404
        assert "LOCALBOOT 0" in (tmp_path / "tftp" / "pxelinux.cfg" / "01-52-54-00-00-00-01").read_text()
    finally:
        cluster.stop()
