"""Real node switch benchmark: one QEMU VM switched to a ~200 MB image, from cidcapt's start to ready.

    python bench/vm_switch.py [--pad-mb 150] [--cache DIR]

Builds the blancmange installer and a test image padded with --pad-mb MiB of incompressible data (the
image file is then about 200 MB), starts a real cidd on 127.0.0.1, boots one VM (KVM when it boots a guest,
software emulation otherwise) with a disk that already runs another image, and times
``cidcapt -n vm1 -i <image>`` from its start to its exit. The phases come from cidd's events table:
reboot to the installer (to_installer), install (installing), reboot to the image (to_image).
The last line is ``vm_switch_s=<seconds>``. Needs root and the Debian packages of `make sysdeps`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.procs import _env  # noqa: E402
from tests.vms import VM, build_image, build_installer, init_tls, kvm_boots, vm_cluster  # noqa: E402

MAC = "52:54:00:c1:d0:11"


def phases(db: Path, job: str) -> dict[str, float]:
    """Return {state: seconds spent in it} for the switching states of ``job`` (from cidd's events table)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT from_state, elapsed FROM events WHERE job = ? ORDER BY id", (job,)).fetchall()
    spent: dict[str, float] = {}
    for state, elapsed in rows:
        if state in ("to_installer", "installing", "to_image"):
            spent[state] = spent.get(state, 0.0) + elapsed
    return spent


def capture(cluster, job: str, image: str) -> tuple[int, float, str]:
    """Run cidcapt for ``job``; return (exit status, seconds, output)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cidcapt.main", "--server", cluster.server, "-j", job, "-n", "vm1",
                           "-i", image, "--timeout", "1500"], capture_output=True, text=True,
                          env=_env(cluster.state_dir), timeout=1600)
    return done.returncode, time.monotonic() - started, done.stdout + done.stderr


def main() -> int:
    """Run the benchmark; return 0 when the switch succeeded."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pad-mb", type=int, default=150, help="incompressible MiB added to the image")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cid-vm-bench-"))
    started = time.monotonic()
    cluster = vm_cluster(root / "cid", root / "installer", {MAC: "vm1"})
    installer = build_installer(root / "installer", init_tls(cluster))
    print(f"installer built in {time.monotonic() - started:.0f} s")
    build_image(installer, cluster, "vmbench", "1")
    build_image(installer, cluster, "vmbench", "2", "--pad-mb", str(args.pad_mb))
    size = (cluster.root / "images" / "vmbench-2-0.tar.zst").stat().st_size
    kvm = kvm_boots(installer / "vmlinuz")
    vm = VM("vm1", MAC, root / "vms", cluster.http_port, cluster.port, kvm=kvm)
    cluster.start_cidd()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "cidcapt.main", "--server", cluster.server, "-j", "warm",
                                 "-n", "vm1", "-i", "vmbench-1-0", "--timeout", "1500"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(cluster.state_dir))
        time.sleep(2)
        vm.start()
        if proc.wait(timeout=1600) != 0:
            print("the first switch (to the small image) failed; see", root)
            return 1
        status, seconds, output = capture(cluster, "bench", "vmbench-2-0")
        if status != 0:
            print(output)
            return 1
        spent = phases(cluster.db, "bench")
    finally:
        vm.stop()
        cluster.stop()
    print(f"mode={'kvm' if kvm else 'tcg'} image_mb={size / 1e6:.0f} cpus={os.cpu_count()}")
    print(f"reboot_to_installer_s={spent.get('to_installer', 0):.1f} install_s={spent.get('installing', 0):.1f} "
          f"reboot_to_image_s={spent.get('to_image', 0):.1f}")
    shutil.rmtree(root, ignore_errors=True)
    print(f"vm_switch_s={seconds:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
