"""kexec for real: the exact commands cidkid's kexec method runs, inside a QEMU guest with a Debian kernel.

This machine's own kernel must not be kexec'd, so the guest does it: QEMU (TCG) boots Debian's kernel with a
small initramfs holding busybox, Debian's kexec binary with its libraries, the kernel again and a second
initramfs. Its /init runs the commands ``cidkid.reboots.plan("kexec", ...)`` returns for the installer mode
(``kexec -l KERNEL --initrd=INITRD --command-line=...`` then ``kexec -e``); the second kernel prints the
command line it got. Seeing cid's command line (node, boot token) there proves the load and the jump.

The kernel comes from /boot, else Debian's linux-image package fetched once with ``apt-get download`` and
unpacked (not installed) under ~/.cache/cid-tests.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cidkid.reboots import RebootSpec, plan

pytestmark = pytest.mark.slow

CACHE = Path.home() / ".cache" / "cid-tests" / "kernels"
CMDLINE = "console=ttyS0 panic=-1 cid.server=10.0.2.2:38008 cid.node=node07 cid.token=Xq3-single-use"


def debian_kernel() -> Path:
    """Return a Debian kernel image: /boot's, else one unpacked from the mirror (apt-get download, cached)."""
    found = sorted(Path("/boot").glob("vmlinuz-*")) + sorted(CACHE.glob("*/boot/vmlinuz-*"))
    if found:
        return found[-1]
    depends = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True,
                             check=True).stdout
    names = [line.split(":", 1)[1].strip() for line in depends.splitlines()
             if line.strip().startswith("Depends: linux-image-")]
    if not names:
        pytest.fail("no Debian kernel package found (apt-cache depends linux-image-amd64); run apt-get update")
    download = CACHE / "download"
    download.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", names[0]], cwd=download, check=True, capture_output=True, timeout=600)
    deb = next(download.glob(f"{names[0]}_*.deb"))
    target = CACHE / names[0]
    subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    deb.unlink()
    for bulky in ("lib", "usr"):  # the modules (hundreds of MB): only boot/vmlinuz-* is needed
        shutil.rmtree(target / bulky, ignore_errors=True)
    return next(target.glob("boot/vmlinuz-*"))


def newc(entries: list[tuple[str, int, bytes, tuple[int, int] | None]]) -> bytes:
    """Return a newc cpio archive of (path, mode, data, (major, minor) for devices) entries.

    Directories that an entry needs and the list does not hold are added first.
    """
    have = {path for path, *_ in entries}
    parents = sorted({str(parent) for path, *_ in entries for parent in Path(path).parents} - have - {"."})
    entries = [(d, 0o40755, b"", None) for d in parents] + entries
    out = bytearray()
    for ino, (path, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", None)], start=1):
        name = path.encode() + b"\0"
        major, minor = rdev or (0, 0)
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(name), 0]
        out += b"070701" + b"".join(f"{v:08x}".encode() for v in fields) + name
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def with_libs(program: str) -> list[tuple[str, int, bytes, None]]:
    """Return cpio entries for ``program`` and the shared libraries ldd names for it."""
    entries = [(program.lstrip("/"), 0o100755, Path(program).read_bytes(), None)]
    for line in subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            entries.append((path.lstrip("/"), 0o100755, Path(os.path.realpath(path)).read_bytes(), None))
    return entries


def base_entries(init: str) -> list:
    dirs = ["bin", "dev", "proc", "sys"]
    entries: list = [(d, 0o40755, b"", None) for d in dirs]
    entries.append(("dev/console", 0o20600, b"", (5, 1)))
    entries.append(("bin/busybox", 0o100755, Path("/bin/busybox").read_bytes(), None))
    entries.append(("init", 0o100755, init.encode(), None))
    return entries


def test_cidkid_kexec_commands_jump_into_a_new_kernel_in_qemu(tmp_path: Path) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu, "qemu-system-x86_64 is missing: apt-get install qemu-system-x86"
    assert Path("/bin/busybox").exists() and Path("/usr/sbin/kexec").exists(), \
        "make sysdeps (busybox-static, kexec-tools)"
    kernel = debian_kernel()
    stage2 = newc(base_entries("#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n"
                               "echo \"CID-KEXEC-OK $(/bin/busybox cat /proc/cmdline)\"\n"
                               "/bin/busybox poweroff -f\n"))
    steps = plan("kexec", RebootSpec(kernel="http://h/k", initrd="http://h/i", cmdline=CMDLINE), mode="installer",
                 reboot_commands=(), kernel_path=Path("/kexec/vmlinuz"), initrd_path=Path("/kexec/initrd.img"))
    commands = [stage.commands[0] for stage in steps]
    assert commands == [("kexec", "-l", "/kexec/vmlinuz", "--initrd=/kexec/initrd.img",
                         f"--command-line={CMDLINE}"), ("kexec", "-e")]
    script = "".join(f"/usr/sbin/{shlex.join(argv)} || echo CID-KEXEC-FAILED\n" for argv in commands)
    init = ("#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n/bin/busybox mount -t sysfs sys /sys\n"
            "echo CID-STAGE-1\n" + script + "/bin/busybox poweroff -f\n")
    stage1 = base_entries(init) + with_libs("/usr/sbin/kexec") + [
        ("kexec/vmlinuz", 0o100644, kernel.read_bytes(), None),
        ("kexec/initrd.img", 0o100644, stage2, None)]
    (tmp_path / "stage1.cpio").write_bytes(newc(stage1))
    accel = "tcg"  # /dev/kvm here cannot boot ordinary guests (notes/real-components.md)
    log = tmp_path / "serial.log"
    proc = subprocess.Popen([qemu, "-accel", accel, "-m", "768", "-nographic", "-monitor", "none", "-no-reboot",
                             "-nic", "none", "-kernel", str(kernel), "-initrd", str(tmp_path / "stage1.cpio"),
                             "-append", "console=ttyS0 panic=-1 quiet"],
                            stdin=subprocess.DEVNULL, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 200
        while time.monotonic() < end and proc.poll() is None:
            if b"CID-KEXEC-OK" in log.read_bytes() or b"CID-KEXEC-FAILED" in log.read_bytes():
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    text = log.read_bytes().decode(errors="replace")
    assert "CID-STAGE-1" in text, text[-3000:]
    assert "CID-KEXEC-FAILED" not in text, text[-3000:]
    ok = [line for line in text.splitlines() if "CID-KEXEC-OK" in line]
    assert ok and "cid.node=node07 cid.token=Xq3-single-use" in ok[0], text[-3000:]
