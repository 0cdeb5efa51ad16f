"""Real QEMU virtual machines that netboot through iPXE into cidd's installer (tests and benchmarks).

Each VM has an empty disk made by qemu-img, QEMU's user-mode network with ``restrict=on`` (DHCP and TFTP built
in; the guest reaches nothing outside but cidd: ``guestfwd`` relays 10.0.2.100:80 and 10.0.2.100:38008 to
cidd's HTTP and agent ports on 127.0.0.1, one ``busybox nc`` per connection) and its serial console in a file.
The iPXE ROM of the NIC (Debian ipxe-qemu) loads ``boot.ipxe`` from the TFTP directory, which chains to
cidd's ``/boot/<mac>`` script. KVM is used when it really boots a guest; otherwise software emulation (TCG).
Every VM is stopped by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.procs import REPO, Cluster, _env

QEMU = "qemu-system-x86_64"
HOST = "10.0.2.100"  # cidd as the VMs see it (guestfwd to 127.0.0.1)
HTTP_PORT, AGENT_PORT = 80, 38008  # cidd's ports as the VMs see them
BLANCMANGE_CACHE = Path(os.environ.get("BLANCMANGE_CACHE") or Path.home() / ".cache" / "blancmange")


def kvm_boots(kernel: Path, timeout: float = 20.0) -> bool:
    """Return True when KVM really boots a Linux kernel here (it reaches its first message and panics on
    the missing root), False otherwise: on nested set-ups /dev/kvm can exist and still fail ordinary guests."""
    forced = os.environ.get("CID_VM_ACCEL")
    if forced:
        return forced == "kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        done = subprocess.run([QEMU, "-accel", "kvm", "-m", "256", "-nographic", "-no-reboot", "-kernel", str(kernel),
                               "-append", "console=ttyS0 panic=-1", "-serial", "stdio", "-monitor", "none"],
                              capture_output=True, text=True, timeout=timeout)
        output = done.stdout
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    return "Kernel panic" in output or "VFS:" in output


def init_tls(cluster: Cluster) -> Path:
    """Create ``cluster``'s CA and a server certificate naming the address the VMs use (``cidd init --san``);
    return the CA certificate (baked into the installer and the test images)."""
    done = subprocess.run([sys.executable, "-m", "cidd.main", "init", "--san", HOST, "--config",
                           str(cluster.write_config())], capture_output=True, text=True,
                          env=_env(cluster.state_dir), timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    return cluster.ca_file


def build_installer(out: Path, ca: Path | None = None) -> Path:
    """Run ``blancmange build`` into ``out`` (cache: $BLANCMANGE_CACHE, else ~/.cache/blancmange), with cidd's
    CA certificate ``ca`` in the initramfs; return out."""
    done = subprocess.run([sys.executable, "-m", "blancmange", "--cache", str(BLANCMANGE_CACHE), "build",
                           "--out", str(out), *(["--ca", str(ca)] if ca else [])],
                          capture_output=True, text=True, env=_env(out), timeout=1800)
    assert done.returncode == 0, done.stderr + done.stdout
    print(done.stdout)
    return out


def build_image(installer: Path, cluster: Cluster, name: str, version: str, *extra: str) -> None:
    """Build the blancmange test image ``name-version-0`` into ``cluster``'s image directory and catalog.

    The image carries cidd's CA certificate but no agent token: cid's installer writes each node's own token.
    """
    done = subprocess.run([sys.executable, "-m", "blancmange", "--cache", str(BLANCMANGE_CACHE), "image",
                           "--installer", str(installer), "--ca", str(cluster.ca_file), "--name", name,
                           "--version", version, "--image-dir", str(cluster.root / "images"),
                           "--catalog", str(cluster.catalog), *extra],
                          capture_output=True, text=True, env=_env(cluster.state_dir), timeout=1800)
    assert done.returncode == 0, done.stderr + done.stdout
    print(done.stdout)


def vm_cluster(root: Path, installer: Path, macs: dict[str, str], **policy: object) -> Cluster:
    """Return a Cluster (not started) whose cidd serves ``installer`` to the VMs of ``macs`` {mac: node}."""
    cluster = Cluster(root, heartbeat=2.0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    ethers = root / "ethers"
    ethers.write_text("".join(f"{mac} {node}\n" for mac, node in macs.items()))
    group = {"ladder": [{"method": "reboot", "timeout": 600}], "install_timeout": 600, "install_attempts": 1}
    group.update(policy)
    cluster.groups = {"vms": group}
    cluster.nodes = [{"hosts": ",".join(sorted(macs.values())), "group": "vms"}]
    cluster.extra_config = {
        "image_dir": str(root / "images"),
        "http": {"host": "127.0.0.1", "port": cluster.http_port, "public_url": f"http://{HOST}:{HTTP_PORT}"},
        "boot": {"ethers": str(ethers), "kernel": str(installer / "vmlinuz"), "initrd": str(installer / "initrd.img"),
                 "cmdline": "console=ttyS0 quiet", "server": f"{HOST}:{AGENT_PORT}"},
    }
    return cluster


@dataclass
class VM:
    """One QEMU VM with an empty disk that boots from the network first."""

    name: str
    mac: str
    root: Path
    http_port: int  # cidd's ports on 127.0.0.1
    agent_port: int
    kvm: bool = False
    memory_mb: int = 1024
    disk_mb: int = 2048
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def console(self) -> Path:
        return self.root / f"{self.name}.console.log"

    def start(self) -> None:
        """Create the disk (first time) and the TFTP script, then start QEMU."""
        self.root.mkdir(parents=True, exist_ok=True)
        disk = self.root / f"{self.name}.qcow2"
        if not disk.exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), f"{self.disk_mb}M"], check=True)
        tftp = self.root / "tftp"
        tftp.mkdir(exist_ok=True)
        (tftp / "boot.ipxe").write_text(f"#!ipxe\nchain http://{HOST}:{HTTP_PORT}/boot/${{net0/mac}}\n")
        relay = "cmd:busybox nc 127.0.0.1"
        accel = ["-accel", "kvm", "-cpu", "host"] if self.kvm else ["-accel", "tcg"]
        argv = [QEMU, *accel, "-m", str(self.memory_mb), "-smp", "1", "-nographic", "-monitor", "none",
                "-serial", f"file:{self.console}", "-boot", "order=nc",
                "-drive", f"file={disk},if=virtio,format=qcow2,cache=unsafe",
                "-netdev", f"user,id=n0,restrict=on,tftp={tftp},bootfile=boot.ipxe,"
                           f"guestfwd=tcp:{HOST}:{HTTP_PORT}-{relay} {self.http_port},"
                           f"guestfwd=tcp:{HOST}:{AGENT_PORT}-{relay} {self.agent_port}",
                "-device", f"virtio-net-pci,netdev=n0,mac={self.mac}"]
        log = open(self.root / f"{self.name}.qemu.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def console_text(self) -> str:
        """Return what the VM wrote on its serial console so far."""
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop QEMU (by PID)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0) -> None:
    """Return once ``predicate()`` is true; raise TimeoutError naming ``what`` otherwise."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} after {timeout:g} s")


__all__ = ["REPO", "VM", "build_image", "build_installer", "kvm_boots", "vm_cluster", "wait_for"]
