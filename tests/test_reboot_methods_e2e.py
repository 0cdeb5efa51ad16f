"""Reboot methods per node group and the reboot window, end to end: a real cidd and a simulated fleet.

Four groups use kexec, grub_reboot, efi_bootnext and an ordinary reboot; the window allows 3 reboots at
once. The history names each group's method, the agents' logs show what cidd told them to boot (kexec URLs
and command line with the boot token, grub entries, EFI boot numbers), and cidd's own log events show that
never more than 3 reboots were in flight.
"""

from __future__ import annotations

import json
import sqlite3
import urllib.request

import pytest

from tests.procs import Cluster

pytestmark = pytest.mark.slow

GROUPS = {
    "kx": {"ladder": [{"method": "kexec", "timeout": 30}]},
    "gr": {"ladder": [{"method": "grub_reboot", "timeout": 30}],
           "boot_entries": {"installer": "cid-installer", "disk": "debian"}},
    "ef": {"ladder": [{"method": "efi_bootnext", "timeout": 30}],
           "boot_entries": {"installer": "0003", "disk": "0001"}},
    "default": {"ladder": [{"method": "reboot", "timeout": 30}]},
}
NODES = [{"hosts": "n[01-04]", "group": "kx"}, {"hosts": "n[05-08]", "group": "gr"},
         {"hosts": "n[09-12]", "group": "ef"}, {"hosts": "n[13-16]", "group": "default"}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    (root / "vmlinuz").write_bytes(b"kernel")
    (root / "initrd.img").write_bytes(b"initrd")
    cluster = Cluster(root / "cid", groups=GROUPS, nodes=NODES, extra_config={
        "windows": {"reboots": 3, "timeout_per_node": 1},
        "boot": {"kernel": str(root / "vmlinuz"), "initrd": str(root / "initrd.img"), "cmdline": "quiet"}})
    cluster.start_cidd()
    try:
        cluster.start_fleet("n[01-16]", "--reboot-delay", "0.3", "--install-time", "0.2",
                            "--initial-image", "debian-12-1", "--seed", "1")
        cluster.wait_online(16)
        yield cluster
    finally:
        cluster.stop()


def fleet_events(cluster: Cluster) -> list[dict]:
    events = []
    for line in (cluster.root / "fleet-0.log").read_text(errors="replace").splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def test_each_group_reboots_with_its_method_within_the_window(cluster: Cluster) -> None:
    result = cluster.cidcapt("-j", "m1", "-n", "n[01-16]", "-i", "rocky-9-3", "--timeout", "180", timeout=220)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {row["state"] for row in cluster.status("n[01-16]").values()} == {"ready"}

    with sqlite3.connect(cluster.db) as db:
        rows = db.execute("SELECT node, detail FROM events WHERE job = 'm1' AND to_state = 'to_installer'").fetchall()
    method_of = {node: detail.rsplit("rung 0: ", 1)[1] for node, detail in rows}
    assert {method_of[f"n{i:02d}"] for i in range(1, 5)} == {"kexec"}
    assert {method_of[f"n{i:02d}"] for i in range(5, 9)} == {"grub_reboot"}
    assert {method_of[f"n{i:02d}"] for i in range(9, 13)} == {"efi_bootnext"}
    assert {method_of[f"n{i:02d}"] for i in range(13, 17)} == {"reboot"}

    reboots = [(e["node"], e["boot"], e["method"], e.get("kernel"), e.get("cmdline"), e.get("entry"))
               for e in fleet_events(cluster) if e.get("event") == "sim.reboot"]
    seen = {(node, boot): (method, kernel, cmdline, entry) for node, boot, method, kernel, cmdline, entry in reboots}
    base = f"http://127.0.0.1:{cluster.http_port}"
    method, kernel, cmdline, entry = seen[("n02", "installer")]
    assert (method, kernel) == ("kexec", f"{base}/boot/files/vmlinuz")
    with urllib.request.urlopen(kernel, timeout=10) as response:  # what a real agent would fetch
        assert response.read() == b"kernel"
    assert f"cid.server=127.0.0.1:{cluster.port}" in cmdline and "cid.node=n02" in cmdline
    assert "cid.token=***" in cmdline and cmdline.endswith(" quiet")  # a token was sent; logs never show it
    assert all("cid.token=" not in line or "cid.token=***" in line
               for line in (cluster.root / "fleet-0.log").read_text().splitlines())
    assert seen[("n02", "disk")][0] == "reboot"  # the sample image has no published kernel: an ordinary reboot
    assert seen[("n06", "installer")] == ("grub_reboot", None, None, "cid-installer")
    assert seen[("n06", "disk")] == ("grub_reboot", None, None, "debian")
    assert seen[("n10", "installer")] == ("efi_bootnext", None, None, "0003")
    assert seen[("n10", "disk")] == ("efi_bootnext", None, None, "0001")
    assert seen[("n14", "installer")] == ("reboot", None, None, None)

    # the window, counted from cidd's log: a reboot is in flight from its issue until its node leaves the step
    in_flight, peak, holding = 0, 0, set()
    for event in cluster.log_events():
        if event.get("event") == "node.reboot_issued" and event["node"] not in holding:
            holding.add(event["node"])
            in_flight += 1
            peak = max(peak, in_flight)
        elif event.get("event") == "node.transition" and event["node"] in holding and \
                event["from"] in ("to_installer", "to_image"):
            holding.discard(event["node"])
            in_flight -= 1
    queued = [e for e in cluster.log_events() if e.get("event") == "node.reboot_queued"]
    print(f"reboot window: peak {peak} in flight, {len(queued)} reboots queued")
    assert peak == 3 and queued, "32 reboots through a window of 3: some waited, never more than 3 at once"
