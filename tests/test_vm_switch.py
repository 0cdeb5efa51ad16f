"""A real node switch in virtual machines: two QEMU VMs with empty disks netboot through iPXE into the
blancmange installer, stream an image onto their disks, boot it, and their cidkid reports it.

Everything is real and built here from Debian packages: the installer (``blancmange build``), the test
images (``blancmange image``, captured with cid-mkimg), cidd serving iPXE scripts, kernels and images on
127.0.0.1 (the VMs reach it at 10.0.2.2), and ``cidcapt`` driving the switches. KVM is used when it boots a
guest, software emulation otherwise. The tests of this module run in order and share the VMs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.procs import _env
from tests.vms import VM, build_image, build_installer, init_tls, kvm_boots, vm_cluster, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MACS = {"52:54:00:c1:d0:01": "vm1", "52:54:00:c1:d0:02": "vm2"}
IMAGE_A, IMAGE_B, BAD = "vmtest-1-0", "vmtest-2-0", "vmbad-1-0"

needs_tools = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None or shutil.which("debootstrap") is None,
                                 reason="needs qemu-system-x86, ipxe-qemu, qemu-utils and debootstrap (make sysdeps)")


def corrupt_entry(catalog: Path, good: str, other: str) -> None:
    """Add the catalog entry ``vmbad-1-0``: the file of image ``other`` announced with the sha256 of ``good``.

    The archive itself is sound (it extracts), so the install fails only at the final checksum.
    """
    data = yaml.safe_load(catalog.read_text())
    entries = {f"{e['name']}-{e['version']}-{e['subversion']}": e for e in data["images"]}
    bad = dict(entries[other], name="vmbad", version="1", subversion="0", sha256=entries[good]["sha256"],
               description="corrupted on purpose: its sha256 is another image's")
    bad.pop("boot", None)
    data["images"].append(bad)
    catalog.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Build the installer and the images, start cidd and return (cluster, {node: VM}); VMs are started by
    the first capture and stopped (by PID) at the end."""
    root = tmp_path_factory.mktemp("vmswitch")
    started = time.monotonic()
    cluster = vm_cluster(root / "cid", root / "installer", MACS)
    installer = build_installer(root / "installer", init_tls(cluster))  # the installer verifies cidd with its CA
    build_image(installer, cluster, "vmtest", "1", "--file", "/etc/cid-test=image A")
    build_image(installer, cluster, "vmtest", "2", "--file", "/etc/cid-test=image B")
    corrupt_entry(cluster.catalog, IMAGE_A, IMAGE_B)
    print(f"built the installer and 2 images in {time.monotonic() - started:.0f} s")
    kvm = kvm_boots(installer / "vmlinuz")
    print(f"accelerator: {'kvm' if kvm else 'tcg (software emulation)'}")
    vms = {node: VM(node, mac, root / "vms", cluster.http_port, cluster.port, kvm=kvm) for mac, node in MACS.items()}
    cluster.start_cidd()
    try:
        yield cluster, vms
    finally:
        for vm in vms.values():
            vm.stop()
        cluster.stop()
        for vm in vms.values():
            print(f"--- console of {vm.name} (tail) ---\n{vm.console_text()[-3000:]}")


def capture(cluster, job: str, hosts: str, image: str, vms: dict[str, VM], timeout: float = 700.0
            ) -> subprocess.CompletedProcess:
    """Run cidcapt for ``job`` on ``vms``; the VMs not running yet are started once cidd has accepted the
    capture (their boot profile is then the installer): a VM is first powered on by the first test that
    uses it."""
    proc = subprocess.Popen([sys.executable, "-m", "cidcapt.main", "--server", cluster.server, "-j", job, "-n", hosts,
                             "-i", image, "--timeout", str(timeout)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(cluster.state_dir))
    off = [vm for vm in vms.values() if vm.proc is None]
    if off:
        wait_for(lambda: all(cluster.status()[vm.name]["state"] == "to_installer" for vm in off), 30,
                 "cidd did not take the capture")
        for vm in off:
            vm.start()
    out, err = proc.communicate(timeout=timeout + 30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@needs_tools
def test_two_vms_netboot_install_and_report_image_a(site) -> None:
    cluster, vms = site
    result = capture(cluster, "J1", "vm[1-2]", IMAGE_A, vms)
    assert result.returncode == 0, result.stderr + result.stdout
    status = cluster.status()
    for node in ("vm1", "vm2"):
        assert status[node]["state"] == "ready" and status[node]["image"] == IMAGE_A, status[node]
        assert status[node]["mode"] == "system"  # cidkid of the installed image, not the installer
        assert f"cid test image {IMAGE_A} up" in vms[node].console_text()


@needs_tools
def test_second_capture_switches_both_to_image_b(site) -> None:
    cluster, vms = site
    result = capture(cluster, "J2", "vm[1-2]", IMAGE_B, vms)
    assert result.returncode == 0, result.stderr + result.stdout
    status = cluster.status()
    assert {status[n]["image"] for n in ("vm1", "vm2")} == {IMAGE_B}
    for vm in vms.values():
        assert f"cid test image {IMAGE_B} up" in vm.console_text()


@needs_tools
def test_third_capture_with_the_running_image_returns_without_a_reboot(site) -> None:
    cluster, vms = site
    seen = len(cluster.log_events())
    result = capture(cluster, "J3", "vm[1-2]", IMAGE_B, vms, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "2 already in the image" in result.stdout + result.stderr
    after = [e for e in cluster.log_events()[seen:] if e.get("node") in vms]
    assert not [e for e in after if e["event"] in ("boot.profile", "node.transition") or "reboot" in e["event"]], after
    assert all(row["online"] and row["state"] == "ready" for row in cluster.status().values())


@needs_tools
def test_corrupted_image_fails_with_the_reason_then_a_good_one_succeeds(site) -> None:
    cluster, vms = site
    vm1 = {"vm1": vms["vm1"]}
    result = capture(cluster, "J4", "vm1", BAD, vm1)
    assert result.returncode == 1, result.stderr + result.stdout
    assert "checksum mismatch" in result.stderr
    row = cluster.status()["vm1"]
    assert row["state"] == "failed" and row["mode"] == "installer", row  # the VM stays in the installer
    assert "checksum mismatch" in row["reason"]
    last_boot = vms["vm1"].console_text().rsplit("blancmange: cid installer starting", 1)[-1]
    assert "blancmange: starting cidkid" in last_boot and "cid test image" not in last_boot
    result = capture(cluster, "J5", "vm1", IMAGE_A, vm1)
    assert result.returncode == 0, result.stderr + result.stdout
    row = cluster.status()["vm1"]
    assert row["state"] == "ready" and row["image"] == IMAGE_A and row["mode"] == "system", row


@needs_tools
def test_installer_without_cid_arguments_stays_up_and_says_why(site, tmp_path: Path) -> None:
    """The installer booted without cidd's arguments reports the reason on its console and stays up:
    QEMU runs with -no-reboot, so a reboot would end it."""
    cluster, vms = site
    boot = cluster.extra_config["boot"]
    console = tmp_path / "console.log"
    accel = ["-accel", "kvm", "-cpu", "host"] if vms["vm1"].kvm else ["-accel", "tcg"]
    qemu = subprocess.Popen(["qemu-system-x86_64", *accel, "-m", "1024", "-nographic", "-monitor", "none",
                             "-no-reboot", "-serial", f"file:{console}", "-kernel", boot["kernel"], "-initrd",
                             boot["initrd"], "-append", "console=ttyS0 quiet", "-netdev", "user,id=n0,restrict=on",
                             "-device", "virtio-net-pci,netdev=n0"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: console.exists() and "blancmange: FAILED" in console.read_text(errors="replace"), 180,
                 "the installer did not report its failure")
        time.sleep(3)  # a reboot loop would restart the kernel (and end QEMU) right after the message
        text = console.read_text(errors="replace")
        assert "FAILED: no cid.server= on the kernel command line" in text
        assert text.count("blancmange: cid installer starting") == 1 and qemu.poll() is None
        assert "staying up" in text
    finally:
        qemu.kill()
        qemu.wait()
