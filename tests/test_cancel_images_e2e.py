"""End to end on loopback, real processes: ``cidcapt --cancel`` of a running capture, and ``cidcapt --images``.

One cidd (reboot window of 1) and two simulated fleets: c01 reboots fast and installs slowly; c[02-03] reboot
slowly. A capture of c[01-03] therefore has, a moment after it starts, c01 installing, c02 on its way to the
installer and c03 waiting for the window: the three cases of docs/state-machine.md, "Cancelling a capture".
The catalog has a private image of alice's, for ``--images``.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.procs import CATALOG, Cluster, _env

pytestmark = pytest.mark.slow

OLD, NEW = "debian-12-1", "debian-12-2"
PRIVATE = """
  - name: alicefs
    version: "1"
    subversion: "1"
    file: alicefs-1-1.tar.zst
    os: "debian 12 (alice's build)"
    owner: alice
    visibility: private
    description: "alice's own image"
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    cluster = Cluster(tmp_path_factory.mktemp("cancel"), groups={
        "default": {"ladder": [{"method": "reboot", "timeout": 20}, {"method": "reboot", "timeout": 20}],
                    "install_timeout": 30, "install_attempts": 1},
    }, extra_config={"windows": {"reboots": 1}})
    cluster.root.mkdir(parents=True, exist_ok=True)
    cluster.catalog.write_text(CATALOG.read_text() + PRIVATE)
    cluster.start_cidd()
    try:
        cluster.start_fleet("c01", "--reboot-delay", "0.3", "--install-time", "6", "--initial-image", OLD)
        cluster.start_fleet("c[02-03]", "--reboot-delay", "5", "--install-time", "6", "--initial-image", OLD)
        cluster.wait_online(3)
        yield cluster
    finally:
        cluster.stop()


def nodes(cluster: Cluster) -> dict[str, tuple[str, float | None, str | None, str | None]]:
    """Return {node: (state, deadline, image, target)} as cidd stored them (cheaper than a cidcapt per poll)."""
    with sqlite3.connect(cluster.db) as db:
        rows = db.execute("SELECT name, state, deadline, image, target FROM nodes").fetchall()
    return {name: (state, deadline, image, target) for name, state, deadline, image, target in rows}


def wait_for(what: str, check: Any, timeout: float = 20.0) -> None:
    """Return once ``check()`` is true; fail naming ``what`` otherwise."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout:g} s")


def fleet_reboots(cluster: Cluster) -> dict[str, list[str]]:
    """Return {node: [boot target of each reboot its simulated agent carried out]} from the fleets' logs."""
    seen: dict[str, list[str]] = {}
    for log in sorted(cluster.root.glob("fleet-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == "sim.reboot":
                    seen.setdefault(event["node"], []).append(event["boot"])
    return seen


def marker(cluster: Cluster, node: str) -> str:
    """Return the image id the simulated node's disk holds (its marker)."""
    return (cluster.root / "sim" / node / "etc" / "cid-image").read_text().split()[0]


def test_cancel_of_a_running_capture(cluster: Cluster) -> None:
    waiting = subprocess.Popen(
        [sys.executable, "-m", "cidcapt.main", "--server", cluster.server, "-j", "cx1", "-n", "c[01-03]", "-i", NEW,
         "--user", "alice", "--timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**_env(cluster.state_dir), "CID_ROLE":
                                                                       "scheduler"})
    try:
        def three_cases() -> bool:
            """c01 installs; c02's reboot into the installer was issued (it holds the window); c03 waits for it."""
            n = nodes(cluster)
            return (n["c01"][0] == "installing" and n["c02"][0] == "to_installer" and n["c02"][1] is not None
                    and n["c03"][0] == "to_installer" and n["c03"][1] is None)

        wait_for("c01 installing while c02 reboots", three_cases)
        cancelled = cluster.cidcapt("--cancel", "-j", "cx1", "--user", "bob")
        assert cancelled.returncode == 0, cancelled.stderr
        assert "job cx1: capture of 3 node(s) to debian-12-2 cancelled by bob" in cancelled.stderr
        rows = {line.split()[0]: line for line in cancelled.stdout.splitlines()[1:]}
        assert "goes on to its end" in rows["c01"]
        assert f"goes back to {OLD} on its disk" in rows["c02"]
        assert f"not rebooted yet; it stays ready in {OLD}" in rows["c03"]

        out, err = waiting.communicate(timeout=20)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert waiting.returncode == 6, err
    assert "cidcapt: job cx1: the capture was cancelled by bob (cidcapt --cancel)" in err
    assert "job cx1: cancelled with 3 of 3 nodes not in debian-12-2" in err

    refused = cluster.cidcapt("--cancel", "-j", "cx1", "--user", "eve", role="scheduler")
    assert refused.returncode == 5, refused.stderr
    assert "user eve may not cancel the capture of job cx1: it was started by user alice" in refused.stderr
    again = cluster.cidcapt("--cancel", "-j", "cx1")
    assert again.returncode == 0 and "was already cancelled by bob" in again.stderr
    unknown = cluster.cidcapt("--cancel", "-j", "nosuch")
    assert unknown.returncode == 2 and "job nosuch has no capture; nothing to cancel" in unknown.stderr
    captures = json.loads(cluster.cidcapt("--captures", "--json").stdout)
    assert [(c["state"], c["nodes"]) for c in captures if c["job"] == "cx1"] == [("cancelled", "c[01-03]")]

    # c01 finishes its install and boots the new image; c02 comes up in the installer and is sent to its disk
    def settled() -> bool:
        n = nodes(cluster)
        return (n["c01"][0], n["c01"][2], n["c02"][0], n["c02"][2]) == ("ready", NEW, "ready", OLD)

    wait_for("c01 in the new image and c02 back in its old one", settled)
    status = cluster.status("c[01-03]")
    assert [(status[n]["state"], status[n]["image"]) for n in ("c01", "c02", "c03")] == [
        ("ready", NEW), ("ready", OLD), ("ready", OLD)]
    with sqlite3.connect(cluster.db) as db:
        history = db.execute("SELECT node, from_state, to_state, image, detail FROM events WHERE job = 'cx1'"
                             " ORDER BY id").fetchall()
    cancels = {node: (frm, image, detail) for node, frm, to, image, detail in history if to == "cancelled"}
    assert sorted(cancels) == ["c02", "c03"]  # c01's install was never stopped: no cancel row
    assert cancels["c02"][:2] == ("to_installer", NEW) and cancels["c02"][2].startswith("cancelled by bob: nothing")
    assert cancels["c03"][2] == f"cancelled by bob: the node was not rebooted yet; it stays ready in {OLD}"
    assert ("c01", "to_image", "ready") in {(node, frm, to) for node, frm, to, _, _ in history}
    # what the simulated agents did: c03 never rebooted, c02 went to the installer and back, c01 installed
    reboots = fleet_reboots(cluster)
    assert "c03" not in reboots
    assert reboots["c02"] == ["installer", "disk"] and reboots["c01"] == ["installer", "disk"]
    assert [marker(cluster, n) for n in ("c01", "c02", "c03")] == [NEW, OLD, OLD]


def test_images_hides_a_private_image_from_those_who_may_not_see_it(cluster: Cluster) -> None:
    def listed(*args: str, role: str | None = None) -> dict[str, Any]:
        run = cluster.cidcapt("--images", "--json", *args, role=role)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    reader = listed("--user", "alice", role="reader")  # a reader's token proves no user
    assert "alicefs-1-1" not in [i["id"] for i in reader["images"]] and reader["hidden"] == 1
    assert OLD in [i["id"] for i in reader["images"]]
    bob = listed("--user", "bob", role="scheduler")
    assert "alicefs-1-1" not in [i["id"] for i in bob["images"]] and bob["hidden"] == 1
    alice = listed("--user", "alice", role="scheduler")
    [own] = [i for i in alice["images"] if i["id"] == "alicefs-1-1"]
    assert (own["owner"], own["visibility"], own["size"]) == ("alice", "private", 1 << 20)
    assert abs(own["date"] - (cluster.state_dir / "images" / "alicefs-1-1.tar.zst").stat().st_mtime) < 1
    table = cluster.cidcapt("--images")  # admin: every image, as a table
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["IMAGE", "OS", "SIZE", "DATE", "OWNER", "VISIBILITY", "DESCRIPTION"]
    by_id = {row.split()[0]: row for row in rows}
    assert set(by_id) == {OLD, NEW, "rocky-9-3", "alicefs-1-1"}
    assert "1.0 MiB" in by_id["alicefs-1-1"] and "alice  private" in by_id["alicefs-1-1"]
