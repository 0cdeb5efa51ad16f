"""The whole path of a real image: a real root filesystem → cid-mkimg → cidd's HTTP → the cidkid installer
→ a real ext4 filesystem on a loop device → the node "boots" it and reports the image; trees compared.

Real processes: cidd, `cidkid --mode installer` (the real LinuxPlatform and its streaming installer), and
`cidcapt` driving the switch. A "reboot" runs a test command that records the boot target and ends the
agent; the test then plays the firmware: it mounts the written filesystem and starts the system-mode agent.
"""

from __future__ import annotations

import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cidcatalog.catalog import load_catalog
from cidcommon.paths import node_token, read_token, token_path
from tests.procs import Cluster, _env
from tests.rootfs import build_rootfs, compare_trees

pytestmark = pytest.mark.slow


def loop_device(image: Path, size_mb: int) -> str | None:
    """Return a loop device backed by a new ``size_mb`` file, or None when loop devices cannot be used."""
    subprocess.run(["truncate", "-s", f"{size_mb}M", str(image)], check=True)
    found = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def make_image(src: Path, cluster: Cluster) -> Path:
    """Capture ``src`` with cid-mkimg as image testfs-1-0 of ``cluster``; return the image directory."""
    images = cluster.root / "images"
    images.mkdir()
    made = subprocess.run([sys.executable, "-m", "cidmkimg.main", "--root", str(src), "--name", "testfs",
                           "--version", "1", "--subversion", "0", "--image-dir", str(images),
                           "--catalog", str(cluster.root / "images.yaml")],
                          capture_output=True, text=True, env=_env(cluster.state_dir))
    assert made.returncode == 0, made.stderr
    return images


@pytest.fixture
def disk(tmp_path):
    device = loop_device(tmp_path / "disk.img", 256)
    mounts: list[Path] = []
    yield device, mounts
    for mount in reversed(mounts):
        subprocess.run(["umount", str(mount)], capture_output=True)
    if device:
        subprocess.run(["losetup", "-d", device], capture_output=True)


def test_real_image_from_mkimg_to_a_booted_ext4_disk(tmp_path, disk) -> None:
    device, mounts = disk
    src = build_rootfs(tmp_path / "src")
    cluster = Cluster(tmp_path / "cid", heartbeat=1.0)
    cluster.root.mkdir()
    images = make_image(src, cluster)
    env = _env(cluster.state_dir)
    image = load_catalog(cluster.root / "images.yaml").get("testfs-1-0")
    assert image is not None and image.sha256 and image.size
    cluster.extra_config = {"image_dir": str(images)}
    cluster.start_cidd()
    target = tmp_path / "target"
    target.mkdir()
    reboots = tmp_path / "reboots.log"
    reboot_cmd = f"echo $CID_BOOT >> {reboots}; kill -TERM $PPID"
    install_args = ["--install-device", device] if device else []
    if not device:
        print("loop devices are not available here: installing into a directory instead of ext4")
    agent = [sys.executable, "-m", "cidkid.main", "--server", cluster.server, "--node", "disk01",
             "--reboot-command", reboot_cmd]
    installer = subprocess.Popen([*agent, "--mode", "installer", "--target", str(target), *install_args],
                                 env=env, stderr=open(tmp_path / "installer.log", "wb"))  # noqa: SIM115
    system = None
    try:
        cluster.wait_online(1, timeout=30)
        capt = subprocess.Popen([sys.executable, "-m", "cidcapt.main", "--server", cluster.server, "-j", "img1",
                                 "-n", "disk01", "-i", "testfs-1-0", "--timeout", "120"],
                                env=env, stderr=subprocess.PIPE, text=True)
        assert installer.wait(timeout=120) == 0  # installed, then "rebooted" to its disk
        assert reboots.read_text().split() == ["disk"]
        booted = target
        if device:
            booted = tmp_path / "booted"
            booted.mkdir()
            subprocess.run(["mount", "-o", "ro", device, str(booted)], check=True)
            mounts.append(booted)
        token = booted / "etc/cid/agent.token"  # written by the installer: the node's own token, not the master
        assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
        assert token.read_text().strip() == node_token(read_token(token_path(cluster.state_dir, "agent")), "disk01")
        system = subprocess.Popen([*agent, "--mode", "system", "--marker", str(booted / "etc/cid-image"),
                                   "--target", str(booted), "--token-file", str(token)], env=env,
                                  stderr=open(tmp_path / "system.log", "wb"))  # noqa: SIM115
        _, err = capt.communicate(timeout=60)
        assert capt.returncode == 0, err
        ignore = ("etc/cid-image", "etc/cid", "etc/cid/agent.token", "lost+found")
        assert compare_trees(src, booted, ignore=ignore) == []
        assert (booted / "etc/cid-image").read_text().splitlines()[0] == "testfs-1-0"
        assert not (booted / ".cid-incomplete").exists()
        progress = [e for e in cluster.log_events() if e.get("event") == "node.transition"
                    and e.get("node") == "disk01"]
        assert [e["to"] for e in progress][-3:] == ["installing", "to_image", "ready"]
        served = [e for e in cluster.log_events() if e.get("event") == "http.image_sent"]
        assert served, "the image went through cidd's HTTP"
    finally:
        for proc in (installer, system):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)
        cluster.stop()
        shutil.rmtree(target, ignore_errors=True)


def test_a_corrupt_image_never_reports_ready(tmp_path) -> None:
    src = build_rootfs(tmp_path / "src")
    cluster = Cluster(tmp_path / "cid", heartbeat=1.0)
    cluster.root.mkdir()
    images = cluster.root / "images"
    images.mkdir()
    env = _env(cluster.state_dir)
    subprocess.run([sys.executable, "-m", "cidmkimg.main", "--root", str(src), "--name", "testfs", "--version", "1",
                    "--subversion", "0", "--image-dir", str(images), "--catalog", str(cluster.root / "images.yaml")],
                   check=True, capture_output=True, env=env)
    data = bytearray((images / "testfs-1-0.tar.zst").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size: only the checksum can tell
    (images / "testfs-1-0.tar.zst").write_bytes(bytes(data))
    cluster.extra_config = {"image_dir": str(images), "groups": {"default": {"install_attempts": 1}}}
    cluster.start_cidd()
    target = tmp_path / "target"
    target.mkdir()
    installer = subprocess.Popen([sys.executable, "-m", "cidkid.main", "--server", cluster.server, "--node", "disk02",
                                  "--reboot-command", "kill -TERM $PPID", "--mode", "installer",
                                  "--target", str(target)], env=env, stderr=subprocess.DEVNULL)
    try:
        cluster.wait_online(1, timeout=30)
        started = time.monotonic()
        result = cluster.cidcapt("-j", "bad1", "-n", "disk02", "-i", "testfs-1-0", "--timeout", "120")
        assert result.returncode == 1, result.stderr
        assert "checksum" in result.stderr
        assert installer.poll() is None, "the node stays in the installer, not rebooted"
        assert not (target / "etc/cid-image").exists() and (target / ".cid-incomplete").exists()
        assert time.monotonic() - started < 120
    finally:
        installer.send_signal(signal.SIGTERM)
        installer.wait(timeout=10)
        cluster.stop()


def test_a_netbooted_installer_authenticates_with_its_single_use_boot_token(tmp_path) -> None:
    """Inventory node, iPXE script from cidd, installer started from that kernel command line: no agent token."""
    import urllib.request

    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("tiny\n")
    cluster = Cluster(tmp_path / "cid", heartbeat=1.0, nodes=[{"hosts": "disk03"}])
    cluster.root.mkdir()
    images = make_image(src, cluster)
    (tmp_path / "ethers").write_text("52:54:00:aa:bb:03 disk03\n")
    cluster.extra_config = {"image_dir": str(images), "boot": {
        "ethers": str(tmp_path / "ethers"), "kernel": str(tmp_path / "ethers"), "initrd": str(tmp_path / "ethers")}}
    cluster.start_cidd()
    env = _env(cluster.state_dir)
    env.pop("CID_STATE_DIR")  # the installer has no token file at all
    target = tmp_path / "target"
    target.mkdir()
    installer = None
    try:
        capt = cluster.cidcapt_background("-j", "tok1", "-n", "disk03", "-i", "testfs-1-0", "--timeout", "60")
        script = ""
        deadline = time.monotonic() + 20
        while "cid.token=" not in script and time.monotonic() < deadline:
            url = f"http://127.0.0.1:{cluster.http_port}/boot/52-54-00-aa-bb-03"
            script = urllib.request.urlopen(url, timeout=10).read().decode()
            time.sleep(0.1)
        kernel_line = next(line for line in script.splitlines() if line.startswith("kernel "))
        (tmp_path / "cmdline").write_text(" ".join(kernel_line.split()[2:]) + "\n")  # as /proc/cmdline
        installer = subprocess.Popen([sys.executable, "-m", "cidkid.main", "--kernel-cmdline",
                                      str(tmp_path / "cmdline"), "--mode", "installer", "--target", str(target),
                                      "--token-file", str(tmp_path / "no-such-file"),
                                      "--ca", str(cluster.ca_file),  # public; baked into the initramfs
                                      "--reboot-command", "kill -TERM $PPID"], env=env,
                                     stderr=open(tmp_path / "installer.log", "wb"))  # noqa: SIM115
        assert installer.wait(timeout=60) == 0, (tmp_path / "installer.log").read_text()[-2000:]
        assert (target / "etc/cid-image").read_text().startswith("testfs-1-0")
        master = read_token(token_path(cluster.state_dir, "agent"))  # the installer had no token: cidd sent it
        assert (target / "etc/cid/agent.token").read_text().strip() == node_token(master, "disk03")
        assert master not in (tmp_path / "installer.log").read_text()
        assert node_token(master, "disk03") not in (tmp_path / "installer.log").read_text()
        used = [e for e in cluster.log_events() if e.get("event") == "boot.token_used"]
        assert [e["node"] for e in used] == ["disk03"]
        assert capt.poll() is None  # still waiting: the node has not booted its disk yet
        capt.kill()
    finally:
        if installer is not None and installer.poll() is None:
            installer.kill()
        cluster.stop()
