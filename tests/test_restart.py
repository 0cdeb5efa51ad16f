"""cidd killed with SIGKILL in the middle of a 200-node switch, then started again: nothing is lost.

Real processes on loopback: cidd, one simulated fleet of 200 agents, and cidcapt as the prolog runs it.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.procs import Cluster, _env

pytestmark = pytest.mark.slow

NODES = "node[001-200]"


def count_states(cluster: Cluster) -> dict[str, int]:
    with sqlite3.connect(cluster.db, timeout=10) as db:
        return dict(db.execute("SELECT state, COUNT(*) FROM nodes GROUP BY state").fetchall())


def test_kill_9_mid_switch_then_restart_completes_the_capture(tmp_path) -> None:
    cluster = Cluster(tmp_path, heartbeat=2.0, groups={
        "default": {"ladder": [{"method": "reboot", "timeout": 60}], "install_timeout": 120}})
    cluster.start_cidd()
    try:
        cluster.start_fleet(NODES, "--reboot-delay", "1", "--install-time", "3", "--initial-image", "debian-12-1")
        cluster.wait_online(200)
        prolog = subprocess.Popen(
            [sys.executable, "-m", "cidcapt.main", "--server", cluster.server, "-j", "777", "-n", NODES,
             "-i", "rocky-9-3", "--timeout", "300", "--connect-timeout", "30"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cluster.state_dir))
        # Wait until the switch is well under way: some nodes installing, none finished.
        deadline = time.monotonic() + 60
        states: dict[str, int] = {}
        while time.monotonic() < deadline:
            states = count_states(cluster)
            if states.get("installing", 0) >= 20:
                break
            time.sleep(0.05)
        assert states.get("installing", 0) >= 20, states
        cluster.kill_cidd()
        killed_states = count_states(cluster)
        assert killed_states.get("ready", 0) < 200, killed_states
        time.sleep(1.0)
        cluster.start_cidd()
        # The prolog that was waiting re-attaches by itself and sees the end of the capture.
        out, err = prolog.communicate(timeout=240)
        assert prolog.returncode == 0, err[-3000:]
        assert "re-attach" in err.lower() or "reattach" in err.lower(), err[-2000:]
        # A retried prolog (same job id) exits 0 at once: every node runs the image.
        again = cluster.cidcapt("-j", "777", "-n", NODES, "-i", "rocky-9-3", "--quiet")
        assert again.returncode == 0, again.stderr
        status = cluster.status(NODES)
        assert len(status) == 200
        assert {(row["state"], row["image"]) for row in status.values()} == {("ready", "rocky-9-3")}
        with sqlite3.connect(cluster.db) as db:
            finished = {row[0] for row in db.execute(
                "SELECT node FROM events WHERE job = '777' AND to_state = 'ready'")}
            started = {row[0] for row in db.execute(
                "SELECT node FROM events WHERE job = '777' AND from_state = 'ready' AND to_state = 'to_installer'")}
            captures = db.execute("SELECT job, state FROM captures WHERE job = '777'").fetchall()
        assert len(started) == 200 and finished == started, "every node's history runs from start to ready"
        assert captures[0] == ("777", "ok")
    finally:
        cluster.stop()


def fleet_events(cluster: Cluster, name: str) -> list[dict]:
    """Return the JSON events named ``name`` that the simulated fleet logged (what the agents really did)."""
    events = []
    for log in sorted(cluster.root.glob("fleet-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"{name}"' in line:
                event = json.loads(line)
                if event.get("event") == name:
                    events.append(event)
    return events


def test_installs_that_finish_while_cidd_is_down_are_never_run_again(tmp_path) -> None:
    """kill -9 of cidd while 40 nodes install; they finish before cidd is back (same installer boot) and report
    at reconnect. Checked from the agents' side: every node started its install exactly once, and the capture
    ends with every node ready (a second install would have emptied what the first one wrote)."""
    nodes = "node[01-40]"
    cluster = Cluster(tmp_path, heartbeat=2.0, groups={
        "default": {"ladder": [{"method": "reboot", "timeout": 60}], "install_timeout": 120}})
    cluster.start_cidd()
    try:
        cluster.start_fleet(nodes, "--reboot-delay", "0.5", "--install-time", "5", "--initial-image", "debian-12-1")
        cluster.wait_online(40)
        prolog = subprocess.Popen(
            [sys.executable, "-m", "cidcapt.main", "--server", cluster.server, "-j", "778", "-n", nodes,
             "-i", "rocky-9-3", "--timeout", "300", "--connect-timeout", "30"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cluster.state_dir))
        deadline = time.monotonic() + 60
        states: dict[str, int] = {}
        while time.monotonic() < deadline:
            states = count_states(cluster)
            if states.get("installing", 0) == 40:
                break
            time.sleep(0.02)
        assert states.get("installing", 0) == 40, states
        cluster.kill_cidd()
        end = time.monotonic() + 30  # every install (5 s) ends while cidd is down
        while time.monotonic() < end and len(fleet_events(cluster, "agent.install_finished")) < 40:
            time.sleep(0.1)
        assert len(fleet_events(cluster, "agent.install_finished")) == 40
        cluster.start_cidd()
        out, err = prolog.communicate(timeout=180)
        assert prolog.returncode == 0, err[-3000:]
        started = [e["node"] for e in fleet_events(cluster, "agent.install_started")]
        twice = sorted({n for n in started if started.count(n) > 1})
        assert not twice, f"installed twice in one boot: {twice}"
        assert sorted(started) == [f"node{i:02d}" for i in range(1, 41)]
        status = cluster.status(nodes)
        assert {(row["state"], row["image"]) for row in status.values()} == {("ready", "rocky-9-3")}
    finally:
        cluster.stop()
