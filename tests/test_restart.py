"""cidd killed with SIGKILL in the middle of a 200-node switch, then started again: nothing is lost.

Real processes on loopback: cidd, one simulated fleet of 200 agents, and cidcapt as the prolog runs it.
"""

from __future__ import annotations

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
