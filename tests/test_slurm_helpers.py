"""cid behind a REAL Slurm in node_features/helpers mode (Debian's Slurm 22.05 ships node_features_helpers.so).

Set up as docs/slurm.md says for this mode: slurmd runs cid-slurm-helper (through the shipped
rc/slurm/cid-slurm-helper.sh) with no argument to read the node's active cid feature (``cid_other`` when there is
none) and with a feature to start cid's switch of the node; RebootProgram is ``"HELPER --reboot"``, which Slurm
22.05 runs with no argument after a feature change; and cid's PrologSlurmctld keeps every job off nodes that do
not run its image. On a real node the new image's boot restarts slurmd; here the test restarts the node's slurmd
with ``-b`` ("the node has just booted") once cidd says the simulated node is booting its new image.

The prolog (slurmctld host) and the helper (nodes) read separate defaults files, as on a real cluster.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm import (
    CidCluster,
    Slurm,
    captures,
    require_slurm,
    write_defaults,
    write_hook,
    write_shims,
)

pytestmark = pytest.mark.slow

FEATURES = {"img_deb121": "debian-12-1", "img_rocky93": "rocky-9-3"}
HELPER_FEATURES = [*FEATURES, "cid_other"]
CID_TIMEOUT = 45  # the defaults files' CID_TIMEOUT: the deadline of the prolog's and the helper's switches


class Site:
    """A cid cluster with node[01-02] and a Slurm whose image features are changeable through cid's helper."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cid = CidCluster(root / "cid", scheduler={"features": FEATURES}, groups={
            "default": {"ladder": [{"method": "reboot", "timeout": 90}], "install_timeout": 30}})
        self.slurm = Slurm(root / "slurm", ["node01", "node02"], node_env={"CID_NODE": "{node}"})
        self.rebooted = root / "rebooted"  # written by CID_REBOOT_COMMAND: the helper really rebooted a node
        self.log = root / "helper.log"
        self.prolog_log = root / "prolog.log"
        self.prolog_defaults = root / "prolog.default"

    def start(self) -> None:
        self.cid.start_cidd()
        # Slow enough (about 3 s) that slurmd's RebootProgram runs while cid is still switching the node.
        self.cid.start_fleet("node[01-02]", "--reboot-delay", "1", "--install-time", "1",
                             "--initial-image", "debian-12-1")
        self.cid.wait_online(2)
        bindir = write_shims(self.root / "bin")
        nodes = write_defaults(self.root / "nodes.default", self.cid, self.slurm.conf_path, bindir,
                               CID_REBOOT_COMMAND=f"touch {self.rebooted}", CID_LOG=str(self.log),
                               CID_TIMEOUT=str(CID_TIMEOUT))
        write_defaults(self.prolog_defaults, self.cid, self.slurm.conf_path, bindir, CID_LOG=str(self.prolog_log),
                       CID_TIMEOUT=str(CID_TIMEOUT))
        helper = write_hook(self.root / "helper.sh", "cid-slurm-helper.sh", nodes)
        prolog = write_hook(self.root / "prolog.sh", "prolog_slurmctld.sh", self.prolog_defaults)
        self.slurm.root.mkdir(parents=True, exist_ok=True)
        (self.slurm.root / "helpers.conf").write_text(
            "".join(f"Feature={feature} Helper={helper}\n" for feature in HELPER_FEATURES)
            + f"MutuallyExclusive={','.join(HELPER_FEATURES)}\nBootTime=60\nExecTime=10\n")
        self.slurm.conf += ["NodeFeaturesPlugins=node_features/helpers", f'RebootProgram="{helper} --reboot"',
                            "ResumeTimeout=60", f"PrologSlurmctld={prolog}", "PrologEpilogTimeout=120",
                            "ReturnToService=2"]
        self.slurm.start()

    def stop(self) -> None:
        self.slurm.stop()
        self.cid.stop()

    def batch(self, *args: str) -> str:
        """Submit a batch job that writes its start time to jobs/start.<id>; return its id."""
        jobs = self.slurm.root / "jobs"
        return self.slurm.sbatch(*args, "--wrap", f"date +%s.%N >> {jobs}/start.$SLURM_JOB_ID")

    def started(self, job: str) -> list[float]:
        """Return the start times the job's script wrote (one per run)."""
        path = self.slurm.root / "jobs" / f"start.{job}"
        return [float(line) for line in path.read_text().split()] if path.exists() else []

    def boot_when_switched(self, node: str, image: str, timeout: float = 40) -> float:
        """Play the node's boot: once cidd says ``node`` is booting ``image`` (or runs it), restart its slurmd
        with -b; return the time of the restart."""
        end = time.monotonic() + timeout
        row: dict = {}
        while time.monotonic() < end:
            row = self.cid.status(node)[node]
            if (row["state"] == "to_image" and row.get("target") == image) or \
                    (row["state"] == "ready" and row["image"] == image):
                self.slurm.stop_slurmd(node)
                self.slurm.start_slurmd(node, rebooted=True)
                return time.time()
            time.sleep(0.1)
        raise AssertionError(f"{node} never started booting {image} after {timeout} s: {row}")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_slurm()
    site = Site(tmp_path_factory.mktemp("helpers"))
    try:
        site.start()
        yield site
    finally:
        site.stop()


def wait_cid(site: Site, node: str, image: str, timeout: float = 30) -> None:
    """Return once cidd says ``node`` is ready in ``image``."""
    end = time.monotonic() + timeout
    row: dict = {}
    while time.monotonic() < end:
        row = site.cid.status(node)[node]
        if row["state"] == "ready" and row["image"] == image:
            return
        time.sleep(0.2)
    raise AssertionError(f"{node} not ready in {image} after {timeout} s: {row}")


def wait_requeued(site: Site, job: str, restarts: int = 1, timeout: float = 60) -> dict[str, str]:
    """Return the job's fields once Slurm has requeued it ``restarts`` times and it is pending again."""
    end = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < end:
        info = site.slurm.show("job", job)
        if int(info.get("Restarts", "0")) >= restarts and info["JobState"] == "PENDING":
            return info
        assert info["JobState"] not in ("RUNNING", "COMPLETED"), info
        time.sleep(0.3)
    raise AssertionError(f"job {job} was not requeued after {timeout} s: {info}")


def wait_feature(site: Site, node: str, feature: str, timeout: float = 60) -> None:
    """Return once Slurm shows ``feature`` as the node's active feature."""
    end = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < end:
        info = site.slurm.show("node", node)
        if info.get("ActiveFeatures") == feature:
            return
        time.sleep(0.3)
    raise AssertionError(f"{node}'s active features are not {feature} after {timeout} s: {info}")


def test_slurm_reads_the_active_image_feature_from_cid(site: Site) -> None:
    for node in ("node01", "node02"):
        info = site.slurm.show("node", node)
        assert info["AvailableFeatures"] == ",".join(HELPER_FEATURES), info
        assert info["ActiveFeatures"] == "img_deb121", info


def test_job_asking_for_another_image_gets_its_node_switched_by_cid(site: Site) -> None:
    job = site.batch("--constraint=img_rocky93", "-w", "node01")
    site.boot_when_switched("node01", "rocky-9-3")  # the helper's set_state (or the prolog) started cid's switch
    info = site.slurm.wait_job(job, ("COMPLETED", "FAILED"), timeout=60)  # Slurm 22.05 checks every ~30 s
    assert info["JobState"] == "COMPLETED", info
    (record,) = captures(site.cid, job)  # the prolog's capture: it joined the helper's switch, or started it
    assert record["state"] == "ok" and record["ended"] < site.started(job)[0]
    assert site.slurm.show("node", "node01")["ActiveFeatures"] == "img_rocky93"
    log = site.log.read_text()
    assert "node01: switching to rocky-9-3 (img_rocky93) as job helper.node01." in log or \
        "node01: already switching to rocky-9-3 (img_rocky93)" in log, log
    # Slurm 22.05 runs RebootProgram without its --reboot after a feature change: the helper only reported.
    assert not site.rebooted.exists()
    assert "node01: rebooting" not in log and "node01: runs rocky-9-3: active img_rocky93" in log


def test_the_helper_gives_its_switches_the_cid_timeout_deadline(site: Site) -> None:
    """CID_TIMEOUT of /etc/default/cid-slurm, as the prolog's captures (before: always 3600 s).

    The prolog is kept from starting the switch itself (it cannot reach cidd for this job), so the only
    capture is the one slurmd's set_state call made through the helper.
    """
    runs = site.cid.status("node01")["node01"]["image"]
    feature, image = next((f, i) for f, i in FEATURES.items() if i != runs)  # an image node01 does not run
    good = site.prolog_defaults.read_text()
    site.prolog_defaults.write_text(good + "CID_SERVER=127.0.0.1:1\n")
    job = ""
    try:
        job = site.batch(f"--constraint={feature}", "-w", "node01")
        end = time.monotonic() + 30
        mine: list[dict] = []
        while time.monotonic() < end and not mine:
            mine = [c for c in captures(site.cid, None) if c["job"].startswith("helper.node01.")
                    and c["image"] == image]
            time.sleep(0.3)
        assert mine, f"the helper started no switch to {image}"
        (record,) = mine
        assert abs(record["deadline"] - record["created"] - CID_TIMEOUT) < 2, record
        assert f"as job {record['job']} (capture running, deadline {CID_TIMEOUT} s)" in site.log.read_text()
        site.boot_when_switched("node01", image)
        wait_requeued(site, job)  # the prolog could not check the node: the job never ran
        assert site.started(job) == []
    finally:
        site.prolog_defaults.write_text(good)
        if job:
            site.slurm.run("scancel", job, check=False)


def test_admin_reboot_of_a_node_cid_is_not_switching_really_reboots(site: Site) -> None:
    site.slurm.wait_nodes(["node02"], "idle", 30)
    site.slurm.run("scontrol", "reboot", "node02")
    end = time.monotonic() + 30
    while time.monotonic() < end and not site.rebooted.exists():
        time.sleep(0.2)
    assert site.rebooted.exists(), "RebootProgram did not run the reboot command"
    assert f"node02: rebooting: touch {site.rebooted}" in site.log.read_text()
    site.rebooted.unlink()
    site.slurm.stop_slurmd("node02")
    site.slurm.start_slurmd("node02", rebooted=True)
    site.slurm.wait_nodes(["node02"], "idle", 30)
    assert site.cid.status("node02")["node02"]["image"] == "debian-12-1"  # cid was not involved


def test_with_cidd_down_a_job_never_runs_on_a_node_that_does_not_run_its_image(site: Site) -> None:
    """Issue 17: cidd unreachable when Slurm asked the helper to switch node02 (debian-12-1) to img_rocky93.

    Slurm marks img_rocky93 active when it asks for the reboot; nothing reboots. Before, the helper then
    reported nothing, Slurm kept img_rocky93 active once the node was back, and the requeued job ran on
    debian-12-1. Now the prolog refuses to run the job it cannot check, and the helper reports cid_other.
    """
    slurm = site.slurm
    site.cid.kill_cidd(signal.SIGTERM)
    job = site.batch("--constraint=img_rocky93", "-w", "node02")
    wait_requeued(site, job)
    assert site.started(job) == []
    assert "cannot reach cidd" in site.prolog_log.read_text()
    # The node comes back (rebooted by hand, still in debian-12-1) while cidd is still down; so does node01.
    for node in ("node01", "node02"):
        slurm.stop_slurmd(node)
        slurm.start_slurmd(node, rebooted=True)
    wait_feature(site, "node02", "cid_other")  # not the img_rocky93 Slurm set when it asked for the reboot
    wait_feature(site, "node01", "cid_other")
    assert "node02: cannot tell which image the node runs (cannot reach cidd" in site.log.read_text()
    assert site.started(job) == []

    # cidd is back: the job gets node02 switched, and runs only once the node runs rocky-9-3.
    site.cid.start_cidd()
    end = time.monotonic() + 150  # the agents reconnect with backoff (up to ~90 s): wait until cidd heard both
    while time.monotonic() < end and {row["state"] for row in site.cid.status().values()} != {"ready"}:
        time.sleep(0.3)
    rows = site.cid.status()
    assert {row["state"] for row in rows.values()} == {"ready"}, rows
    already = False
    try:
        slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    except AssertionError as exc:  # the requeued job's own ~121 s delay may be over already (slow agents)
        if "already finished" in str(exc):
            already = True  # it ran through its prolog by itself; the checks below still hold
        elif "no longer pending" not in str(exc):  # its prolog runs now: it waits for node02 as below
            raise
    booted = None if already else site.boot_when_switched("node02", "rocky-9-3")
    info = slurm.wait_job(job, ("COMPLETED", "FAILED"), timeout=60)
    assert info["JobState"] == "COMPLETED", info
    (started,) = site.started(job)
    (record,) = captures(site.cid, job)  # the prolog's: none while cidd was down; this one waited for node02
    assert record["state"] == "ok" and record["image"] == "rocky-9-3", record
    assert record["ended"] < started and (booted is None or booted < started), (record, booted, started)
    assert site.cid.status("node02")["node02"]["image"] == "rocky-9-3"
    assert slurm.show("node", "node02")["ActiveFeatures"] == "img_rocky93"


def test_a_node_already_running_the_image_slurm_asks_for_is_rebooted_not_switched(site: Site) -> None:
    """Slurm shows cid_other for node01 (its slurmd started while cidd was down, previous test) and asks the
    helper to activate the feature of the image node01 does run: Slurm then waits for a reboot, so the helper
    reboots the node (CID_REBOOT_COMMAND) instead of leaving the job to wait for ResumeTimeout."""
    assert site.slurm.show("node", "node01")["ActiveFeatures"] == "cid_other"
    runs = site.cid.status("node01")["node01"]["image"]
    feature = next(f for f, image in FEATURES.items() if image == runs)
    switches = [c for c in captures(site.cid, None) if c["job"].startswith("helper.node01.")]
    job = site.batch(f"--constraint={feature}", "-w", "node01")
    end = time.monotonic() + 30
    while time.monotonic() < end and not site.rebooted.exists():
        time.sleep(0.2)
    assert site.rebooted.exists(), "the helper did not reboot node01"
    site.slurm.stop_slurmd("node01")  # the reboot
    site.slurm.start_slurmd("node01", rebooted=True)
    info = site.slurm.wait_job(job, ("COMPLETED", "FAILED"), timeout=60)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", info
    assert site.slurm.show("node", "node01")["ActiveFeatures"] == feature
    assert [c for c in captures(site.cid, None) if c["job"].startswith("helper.node01.")] == switches
    assert f"node01: already runs {runs} ({feature}); slurmd waits for a reboot" in site.log.read_text()
