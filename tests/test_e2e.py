"""End-to-end on loopback with real processes: cidd, simulated cidkid fleets, cidcapt as a prolog runs it.

One cidd and two fleets serve the whole module; each test uses its own nodes:
node[01-10] switch normally, node[11-14] install slowly (for conflicts and joins), node19 fails its
install, node[18,20] never come back from a reboot.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import pytest

from tests.procs import Cluster

pytestmark = pytest.mark.slow

FAST = ["--reboot-delay", "0.2", "--install-time", "0.3", "--initial-image", "debian-12-1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    cluster = Cluster(tmp_path_factory.mktemp("e2e"), groups={
        "default": {"ladder": [{"method": "reboot", "timeout": 3}, {"method": "reboot", "timeout": 3}],
                    "install_timeout": 20, "install_attempts": 2},
    })
    cluster.start_cidd()
    try:
        cluster.start_fleet("node[01-10,18-20]", *FAST, "--fail-install", "node19", "--hang-reboot", "node[18,20]")
        cluster.start_fleet("node[11-14]", "--reboot-delay", "0.2", "--install-time", "4",
                            "--initial-image", "debian-12-1")
        cluster.wait_online(17)
        yield cluster
    finally:
        cluster.stop()


def job_events(cluster: Cluster, job: str) -> list[tuple[str, str, str]]:
    with sqlite3.connect(cluster.db) as db:
        return db.execute("SELECT node, from_state, to_state FROM events WHERE job = ? ORDER BY id", (job,)).fetchall()


def test_switch_succeeds_and_reports_progress(cluster: Cluster) -> None:
    result = cluster.cidcapt("-j", "ok1", "-n", "node[01-08]", "-i", "debian-12-2")
    assert result.returncode == 0, result.stderr
    assert "  node03  ready  debian-12-2" in result.stderr  # the final summary lists every node
    assert " -> " not in result.stderr  # normal transitions get no line of their own (docs/operations.md)
    status = cluster.status("node[01-08]")
    assert {row["state"] for row in status.values()} == {"ready"}
    assert {row["image"] for row in status.values()} == {"debian-12-2"}
    steps = {(f, t) for _, f, t in job_events(cluster, "ok1")}
    assert {("ready", "to_installer"), ("to_installer", "installing"), ("installing", "to_image"),
            ("to_image", "ready")} <= steps


def test_nodes_already_in_the_image_are_skipped(cluster: Cluster) -> None:
    cluster.cidcapt("-j", "skip0", "-n", "node[01-02]", "-i", "debian-12-2")
    started = time.monotonic()
    result = cluster.cidcapt("-j", "skip1", "-n", "node[01-02]", "-i", "debian-12-2")
    assert result.returncode == 0, result.stderr
    assert job_events(cluster, "skip1") == []  # no reboot, no transition
    assert time.monotonic() - started < 10


def test_partial_failure_lists_each_failed_node_with_its_reason(cluster: Cluster) -> None:
    result = cluster.cidcapt("-j", "part1", "-n", "node[09-10,19]", "-i", "rocky-9-3")
    assert result.returncode == 1, result.stderr
    failed_lines = [line for line in result.stderr.splitlines() if "node19" in line and "failed" in line]
    assert failed_lines and any("simulated install failure" in line for line in failed_lines)
    status = cluster.status("node[09-10,19]")
    assert status["node09"]["state"] == "ready" and status["node10"]["image"] == "rocky-9-3"
    assert status["node19"]["state"] == "failed"


def test_deadline_gives_exit_3_with_the_pending_step(cluster: Cluster) -> None:
    result = cluster.cidcapt("-j", "late1", "-n", "node20", "-i", "rocky-9-3", "--timeout", "2")
    assert result.returncode == 3, result.stderr
    assert "node20" in result.stderr and "to_installer" in result.stderr


def test_ladder_exhausted_fails_with_a_reason(cluster: Cluster) -> None:
    result = cluster.cidcapt("-j", "hang1", "-n", "node18", "-i", "rocky-9-3", "--timeout", "60")
    assert result.returncode == 1, result.stderr
    assert "ladder" in result.stderr and "node18" in result.stderr
    rungs = [row for row in job_events(cluster, "hang1") if row[1] == row[2] == "to_installer"]
    assert rungs, "the history records the climb to rung 1"


@pytest.mark.parametrize("args, message", [
    (["-j", "bad1", "-n", "node01", "-i", "debian-13-9"], "unknown image"),
    (["-j", "bad2", "-n", "node[01-", "-i", "debian-12-1"], "hostlist"),
    (["-j", "bad3", "-n", "nosuch[1-2]", "-i", "debian-12-1"], "unknown node"),
    (["-n", "node01", "-i", "debian-12-1"], ""),  # usage: no job id
])
def test_bad_requests_give_exit_2_and_start_nothing(cluster: Cluster, args: list[str], message: str) -> None:
    result = cluster.cidcapt(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr.lower()
    if "-j" in args:
        assert job_events(cluster, args[1]) == []


def test_conflict_is_refused_naming_the_holder_and_same_image_joins(cluster: Cluster) -> None:
    holder = subprocess.Popen([sys.executable, "-m", "cidcapt.main", "--server", cluster.server, "-j", "hold1",
                               "-n", "node[11-12]", "-i", "rocky-9-3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**cluster_env(cluster)})
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if cluster.status("node12")["node12"]["state"] in ("to_installer", "installing"):
                break
            time.sleep(0.1)
        refused = cluster.cidcapt("-j", "other1", "-n", "node[12-13]", "-i", "debian-12-2")
        assert refused.returncode == 5, refused.stderr
        assert "hold1" in refused.stderr
        assert job_events(cluster, "other1") == []
        joined = cluster.cidcapt("-j", "join1", "-n", "node12", "-i", "rocky-9-3")
        assert joined.returncode == 0, joined.stderr
        again = cluster.cidcapt("-j", "hold1", "-n", "node[11-12]", "-i", "rocky-9-3")
        assert again.returncode == 0, again.stderr
        assert holder.wait(timeout=60) == 0
    finally:
        if holder.poll() is None:
            holder.kill()


def cluster_env(cluster: Cluster) -> dict[str, str]:
    from tests.procs import _env

    return _env(cluster.state_dir)


def test_wrong_token_gives_exit_4(cluster: Cluster, tmp_path) -> None:
    bad = tmp_path / "bad.token"
    bad.write_text("not-the-token\n")
    bad.chmod(0o600)
    result = cluster.cidcapt("--token-file", str(bad), "-j", "tok1", "-n", "node01", "-i", "debian-12-1")
    assert result.returncode == 4, result.stderr
    assert "authentication failed" in result.stderr
    assert job_events(cluster, "tok1") == []


def test_reader_role_may_not_capture(cluster: Cluster) -> None:
    result = cluster.cidcapt("-j", "read1", "-n", "node01", "-i", "debian-12-1", role="reader")
    assert result.returncode == 5, result.stderr
    assert cluster.cidcapt("--status", "node01", role="reader").returncode == 0


def test_cidd_survives_garbage_from_a_peer(cluster: Cluster) -> None:
    with cluster.tls_connect() as sock:
        sock.sendall(b"\x00\xff not json\n" + b"x" * 70000 + b"\n")
        sock.settimeout(5)
        data = sock.recv(65536)
    assert b'"type":"error"' in data
    assert cluster.cidcapt("--status", "node01").returncode == 0


def test_catalog_reload_is_live_and_a_broken_catalog_keeps_the_old_one(cluster: Cluster) -> None:
    import signal

    from cidcatalog.catalog import Image, upsert_entry_text

    before = cluster.catalog.read_text()
    def others_dropped() -> int:
        return sum(1 for e in cluster.log_events() if e.get("event") == "agent.disconnected"
                   and e.get("node") not in ("node07", "node18", "node20"))

    dropped = others_dropped()
    try:
        # An entry whose file is not in the image directory yet is left out, and a capture of it says why.
        cluster.catalog.write_text(upsert_entry_text(before, Image("alma", "9", "4", "alma-9-4.tar.zst")))
        reloaded = cluster.cidcapt("--reload")
        assert reloaded.returncode == 0 and "3 images" in reloaded.stderr, reloaded.stderr
        missing = cluster.cidcapt("-j", "new0", "-n", "node07", "-i", "alma-9-4")
        assert missing.returncode == 2 and "cannot be installed" in missing.stderr, missing.stderr
        assert "alma-9-4.tar.zst does not exist" in missing.stderr, missing.stderr
        (cluster.state_dir / "images" / "alma-9-4.tar.zst").write_bytes(b"alma")  # the file arrives
        reloaded = cluster.cidcapt("--reload")
        assert reloaded.returncode == 0 and "4 images" in reloaded.stderr, reloaded.stderr
        assert cluster.cidcapt("-j", "new1", "-n", "node07", "-i", "alma-9-4").returncode == 0
        # A broken catalog: every problem with its line, exit 2, the previous catalog stays active.
        cluster.catalog.write_text(before + "  - name: Bad-Name\n    version: 1\n")
        refused = cluster.cidcapt("--reload")
        assert refused.returncode == 2, refused.stderr
        assert "images.yaml:" in refused.stderr and "Bad-Name" in refused.stderr, refused.stderr
        assert cluster.cidcapt("-j", "new2", "-n", "node07", "-i", "debian-12-2").returncode == 0
        assert cluster.cidcapt("-j", "new3", "-n", "node07", "-i", "alma-9-4").returncode == 0
        # SIGHUP reloads too.
        cluster.catalog.write_text(before)
        cluster.cidd.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if cluster.cidcapt("-j", "new4", "-n", "node07", "-i", "alma-9-4").returncode == 2:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("SIGHUP did not reload the catalog")
        assert cluster.cidcapt("--reload", role="scheduler").returncode == 5
    finally:
        cluster.catalog.write_text(before)
    assert others_dropped() == dropped  # only node07 rebooted (its switches); no session dropped by a reload


def test_http_status_metrics_and_image_refusals(cluster: Cluster) -> None:
    import json
    import urllib.error
    import urllib.request

    base = f"http://127.0.0.1:{cluster.http_port}"
    status = json.load(urllib.request.urlopen(f"{base}/status", timeout=10))
    rows = {row["node"]: row for row in status["nodes"]}
    assert rows["node01"]["online"] is True and "debian-12-1" in status["images"]
    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    assert 'cid_nodes{state="ready"}' in metrics and "cid_nodes_online" in metrics
    for path in ("/images/alma-7-7.tar.zst", "/images/../cidd.sqlite", "/images/%2e%2e/state/cidd.sqlite"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + path, timeout=10)
        assert refused.value.code == 404  # not in the catalog; nothing outside the image directory is served
