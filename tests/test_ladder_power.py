"""The escalation ladder with real BMC endpoints: hung reboots end through an IPMI power cycle.

Real processes: cidd (with pyghmi on its BMC thread pool) and a `cid-simfleet` fleet in which every node has
its own IPMI BMC on a loopback UDP port (pyghmi's BMC server). 10 % of the simulated reboots hang; the ladder
is "agent reboot (3 s) → power cycle with network boot through the BMC".
"""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from tests.procs import Cluster, free_udp_block

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder")
    creds = root / "bmc.cred"
    creds.write_text("cidadmin:s3cret-bmc-pass\n")
    creds.chmod(0o600)
    base = free_udp_block(21)
    cluster = Cluster(root / "cid", extra_config={"bmc": {
        "address": f"127.0.0.1:{{index+{base - 1}}}", "credentials": str(creds), "timeout": 4,
        "max_concurrent": 8}}, groups={"default": {
            "ladder": [{"method": "reboot", "timeout": 3}, {"method": "power_cycle", "timeout": 20}],
            "install_timeout": 30}})
    cluster.bmc_base = base  # type: ignore[attr-defined]
    cluster.bmc_creds = creds  # type: ignore[attr-defined]
    cluster.start_cidd()
    try:
        cluster.start_fleet("node[01-21]", "--reboot-delay", "0.3", "--install-time", "0.3", "--initial-image",
                            "debian-12-1", "--hang-reboot-rate", "0.1", "--seed", "4", "--hang-reboot", "node21",
                            "--bmc-base-port", str(base), "--bmc-credentials", str(creds), "--bmc-dead", "node21")
        cluster.wait_online(21)
        yield cluster
    finally:
        cluster.stop()


def bmc_trail(cluster: Cluster, last: int = 60) -> str:
    """Return the last BMC events of cidd (power.*) and of the fleet's BMCs (simbmc.*), in time order.

    Shown when a test here fails, so that a failure in CI says which BMC call was slow or unanswered.
    """
    events = [e for e in cluster.log_events() if str(e.get("event", "")).startswith("power.")]
    for log in sorted(cluster.root.glob("fleet-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"simbmc.' in line:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass
    events.sort(key=lambda e: str(e.get("timestamp", "")))
    keys = ("event", "node", "action", "seconds", "error", "port", "device")
    return "\n".join(" ".join(f"{k}={e[k]}" for k in ("timestamp", *keys) if e.get(k) is not None)
                     for e in events[-last:])


def history(cluster: Cluster, job: str) -> list[tuple]:
    with sqlite3.connect(cluster.db) as db:
        return db.execute("SELECT ts, node, from_state, to_state, rung, detail FROM events WHERE job = ? "
                          "ORDER BY id", (job,)).fetchall()


def test_hung_reboots_end_ready_through_a_power_cycle(cluster: Cluster) -> None:
    result = cluster.cidcapt("-j", "hard1", "-n", "node[01-20]", "-i", "rocky-9-3", "--timeout", "180",
                             timeout=240)
    assert result.returncode == 0, result.stderr[-3000:] + "\n" + bmc_trail(cluster)
    # A BMC call that timed out under load may still be carried out by the BMC a little later (IPMI has no
    # cancel): that node then reboots from its disk once more and comes back ready. Allow it to settle.
    end = time.monotonic() + 30
    while True:
        status = cluster.status("node[01-20]")
        if {(row["state"], row["image"]) for row in status.values()} == {("ready", "rocky-9-3")}:
            break
        assert time.monotonic() < end, status
        time.sleep(0.5)
    rows = history(cluster, "hard1")
    climbed = {node for _, node, src, dst, rung, detail in rows if rung == 1 and "power_cycle" in detail}
    print(f"nodes that needed the power-cycle rung: {sorted(climbed)}")
    assert climbed, "with 10 % of reboots hanging, some node needed the power-cycle rung"
    for node in climbed:  # the history names the rung that worked: the row leaving the wait carries rung 1
        mine = [r for r in rows if r[1] == node]
        cycled = next(i for i, r in enumerate(mine) if r[4] == 1 and "power_cycle" in r[5])
        after = mine[cycled + 1]
        assert after[2] == mine[cycled][3] != after[3] and after[4] == 1, (node, mine)
        assert mine[-1][3] == "ready"
    events = [e for e in cluster.log_events() if e.get("event") == "node.power_cycle"]
    assert {e["node"] for e in events} >= climbed
    assert all("s3cret-bmc-pass" not in line for line in (cluster.root / "cidd.log").read_text().splitlines())


def test_a_bmc_that_does_not_answer_fails_its_node_without_holding_up_the_others(cluster: Cluster) -> None:
    result = cluster.cidcapt("-j", "dead1", "-n", "node[17-21]", "-i", "debian-12-2", "--timeout", "180",
                             timeout=240)
    assert result.returncode == 1, result.stderr[-3000:]
    failed = [line for line in result.stderr.splitlines() if "node21" in line and "failed" in line]
    assert failed and any("BMC" in line and "127.0.0.1:" in line for line in failed), result.stderr[-3000:]
    status = cluster.status("node[17-21]")
    assert all(status[f"node{n}"]["state"] == "ready" for n in range(17, 21)), (status, bmc_trail(cluster))
    rows = history(cluster, "dead1")
    ready_at = max(ts for ts, node, _s, dst, _r, _d in rows if dst == "ready")
    failed_at = next(ts for ts, node, _s, dst, _r, _d in rows if node == "node21" and dst == "failed")
    assert ready_at < failed_at, "the other nodes were ready before the dead BMC's node gave up"


def test_a_node_that_is_off_is_powered_on_through_its_bmc(cluster: Cluster) -> None:
    import subprocess
    import time

    port = cluster.bmc_base + 15  # node16: ports go in name order
    ipmitool = ["ipmitool", "-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p", str(port), "-U", "cidadmin",
                "-P", "s3cret-bmc-pass", "chassis", "power"]
    powered_off = subprocess.run([*ipmitool, "off"], capture_output=True, text=True, timeout=30)
    assert powered_off.returncode == 0, powered_off.stderr + "\n" + bmc_trail(cluster)
    deadline = time.monotonic() + 20
    while cluster.status("node16")["node16"]["online"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not cluster.status("node16")["node16"]["online"], "powering the BMC off dropped the agent"
    off = subprocess.run([*ipmitool, "status"], capture_output=True, text=True, timeout=30)
    assert "off" in off.stdout
    result = cluster.cidcapt("-j", "poweron1", "-n", "node16", "-i", "rocky-9-3", "--timeout", "120", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(e.get("event") == "node.power_on" and e.get("node") == "node16" for e in cluster.log_events())
    on = subprocess.run([*ipmitool, "status"], capture_output=True, text=True, timeout=30)
    assert "on" in on.stdout


def test_admin_power_command_and_a_dead_bmc(cluster: Cluster) -> None:
    status = cluster.cidcapt("--power", "status", "node[14-15,21]", timeout=120)
    assert status.returncode == 1, status.stderr + bmc_trail(cluster)  # node21's BMC never answers
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:]}
    assert "ok" in rows["node14"] and "on" in rows["node14"], (status.stdout, bmc_trail(cluster))
    assert "FAILED" in rows["node21"] and "BMC" in rows["node21"]
    cycled = cluster.cidcapt("--power", "cycle", "node14", timeout=120)
    assert cycled.returncode == 0, cycled.stderr
    assert cluster.cidcapt("--power", "off", "node14", role="reader").returncode == 5
    assert cluster.cidcapt("--power", "explode", "node14").returncode == 2
