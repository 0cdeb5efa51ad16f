"""cid behind a REAL Slurm (Debian's slurmctld, four slurmd, munged) on loopback: PrologSlurmctld mode.

The shipped rc/slurm/prolog_slurmctld.sh is Slurm's PrologSlurmctld; it runs ``cidcapt --slurm`` against a real
cidd whose simulated fleet is node[01-04] (node04 fails every install). Each batch script writes the time it
started, so the tests check the order: cidd ended the job's capture before the job ran. cidd's rights rules
allow everyone debian-12-1 and rocky-9-3 only, so a job asking for img_deb122 (debian-12-2) is refused.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm import (
    CidCluster,
    Slurm,
    capture_ends,
    captures,
    job_transitions,
    require_slurm,
    write_defaults,
    write_hook,
    write_shims,
)

pytestmark = pytest.mark.slow

NODES = ["node01", "node02", "node03", "node04"]
FEATURES = {"img_deb121": "debian-12-1", "img_rocky93": "rocky-9-3", "img_deb122": "debian-12-2"}
RIGHTS = [{"name": "everyone-but-deb122", "users": ["*"], "images": ["debian-12-1", "rocky-*"], "nodes": "*"}]
#: A line of the prolog log: time stamp, job, seconds since that prolog started, then the text.
STAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} job=\d+ \+\d+s .")


class Site:
    """The cid cluster and the Slurm cluster of this module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cid = CidCluster(root / "cid", scheduler={"features": FEATURES}, groups={
            "default": {"ladder": [{"method": "reboot", "timeout": 5}], "install_timeout": 10, "install_attempts": 1}},
            extra_config={"rights": RIGHTS})
        self.slurm = Slurm(root / "slurm", NODES, node_lines="Features=" + ",".join(FEATURES))
        self.prolog_log = root / "prolog.log"

    def start(self) -> None:
        self.cid.start_cidd()
        self.cid.start_fleet("node[01-04]", "--reboot-delay", "0.2", "--install-time", "0.3",
                             "--initial-image", "debian-12-1", "--fail-install", "node04")
        self.cid.wait_online(4)
        bindir = write_shims(self.root / "bin")
        self.defaults = write_defaults(self.root / "cid-slurm.default", self.cid, self.slurm.conf_path, bindir,
                                       CID_TIMEOUT="40", CID_LOG=str(self.prolog_log))
        prolog = write_hook(self.root / "prolog.sh", "prolog_slurmctld.sh", self.defaults)
        self.slurm.conf += [f"PrologSlurmctld={prolog}", "PrologEpilogTimeout=120"]
        self.slurm.start()

    def stop(self) -> None:
        self.slurm.stop()
        self.cid.stop()

    def batch(self, *args: str) -> str:
        """Submit a batch job that writes its start time to jobs/start.<id>; return its id."""
        jobs = self.slurm.root / "jobs"
        return self.slurm.sbatch(*args, "--wrap", f'date +%s.%N >> {jobs}/start.$SLURM_JOB_ID')

    def started(self, job: str) -> list[float]:
        """Return the start times the job's script wrote (one per run)."""
        path = self.slurm.root / "jobs" / f"start.{job}"
        return [float(line) for line in path.read_text().split()] if path.exists() else []


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_slurm()
    site = Site(tmp_path_factory.mktemp("slurm"))
    try:
        site.start()
        yield site
    finally:
        site.stop()


def test_batch_job_runs_only_after_its_nodes_switched(site: Site) -> None:
    submitted = time.time()
    job = site.batch("--constraint=img_rocky93", "-N2", "-w", "node0[1-2]")
    info = site.slurm.wait_job(job, ("COMPLETED", "FAILED"), timeout=60)
    assert info["JobState"] == "COMPLETED", info
    status = site.cid.status("node[01-02]")
    assert {(row["state"], row["image"]) for row in status.values()} == {("ready", "rocky-9-3")}
    steps = {(node, to) for node, _, to in job_transitions(site.cid, job)}
    assert {("node01", "installing"), ("node02", "installing"), ("node01", "ready")} <= steps
    (ended, event), = capture_ends(site.cid, job)
    (script_start,) = site.started(job)
    assert event["state"] == "ok" and submitted < ended < script_start, (submitted, ended, script_start)
    assert f"job={job} +0s prolog nodes=node[01-02]" in site.prolog_log.read_text()


def test_nodes_already_in_the_image_start_without_a_switch(site: Site) -> None:
    job = site.batch("--constraint=img_deb121", "-w", "node03")
    plain = site.batch("-w", "node03")  # no cid feature, no default image: cid leaves the node alone
    for j in (job, plain):
        assert site.slurm.wait_job(j, ("COMPLETED", "FAILED"), timeout=60)["JobState"] == "COMPLETED"
    assert job_transitions(site.cid, job) == []
    (record,) = captures(site.cid, job)
    assert record["state"] == "ok" and record["ended"] < site.started(job)[0]
    assert captures(site.cid, plain) == []
    assert "no constraint, and cidd has no default_image" in site.prolog_log.read_text()


def test_failed_node_is_drained_and_the_job_requeued_onto_good_nodes(site: Site) -> None:
    slurm = site.slurm
    blocker = slurm.sbatch("-N2", "-w", "node0[1-2]", "--wrap", "sleep 120")  # so that the job gets node[03-04]
    slurm.wait_job(blocker, ("RUNNING",), timeout=30)
    job = site.batch("--constraint=img_rocky93", "-N2")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = slurm.show("job", job)
        if info.get("Restarts", "0") != "0" and info["JobState"] == "PENDING":
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"job {job} was not requeued: {info}")
    node04 = slurm.show("node", "node04")
    assert "DRAIN" in node04["State"] and node04["Reason"].startswith("cid: job " + job), node04
    assert "simulated install failure" in node04["Reason"]
    for good in ("node01", "node02", "node03"):
        assert "DRAIN" not in slurm.show("node", good)["State"], good
    assert site.started(job) == []  # the prolog failed: the script never ran
    assert capture_ends(site.cid, job)[0][1]["state"] == "failed"

    slurm.run("scancel", blocker)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # else eligible again after ~2 minutes
    info = slurm.wait_job(job, ("COMPLETED", "FAILED"), timeout=60)
    assert info["JobState"] == "COMPLETED" and "node04" not in info["NodeList"], info
    records = captures(site.cid, job)  # the second capture may be over at once: no capture.ended in the log
    assert [r["state"] for r in records] == ["failed", "ok"], records
    assert records[1]["ended"] < site.started(job)[0]
    print(f"requeued job {job} ran on {info['NodeList']}")


def test_interactive_allocation_fails_when_its_prolog_fails(site: Site) -> None:
    slurm = site.slurm
    slurm.run("scontrol", "update", "NodeName=node04", "State=RESUME")
    result = slurm.run("srun", "-N1", "-w", "node04", "--constraint=img_rocky93", "true", check=False, timeout=60)
    assert result.returncode != 0, result
    assert "Something is wrong with the boot of the nodes" in result.stderr, result.stderr
    assert "DRAIN" in slurm.show("node", "node04")["State"]


def test_moab_style_host_list_works_unchanged(site: Site) -> None:
    """notP's JOBPROLOG line, ``cidcapt -j $JOBID -n $HOSTLIST -i IMAGE``, with Moab's ppn host list."""
    result = site.cid.cidcapt("-j", "Moab.7", "-n", "node01:ppn=8,node02:ppn=8", "-i", "debian-12-1",
                              role="scheduler")
    assert result.returncode == 0, result.stderr
    (record,) = captures(site.cid, "Moab.7")
    assert record["state"] == "ok" and record["nodes"] == "node[01-02]"
    assert {row["image"] for row in site.cid.status("node[01-02]").values()} == {"debian-12-1"}


def wait_ended(site: Site, job: str, timeout: float = 40) -> dict[str, str]:
    """Return the job's fields once it has ended; fail if Slurm requeued it instead."""
    end = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < end:
        info = site.slurm.show("job", job)
        assert info.get("Restarts") == "0", f"job {job} was requeued: {info}"
        if info.get("JobState") in ("CANCELLED", "FAILED", "COMPLETED"):
            return info
        time.sleep(0.3)
    raise AssertionError(f"job {job} not ended after {timeout} s: {info}")


@pytest.mark.parametrize("constraint, why", [
    ("img_deb121|img_rocky93", "asks for 2 different images (img_deb121 -> debian-12-1; img_rocky93 -> rocky-9-3)"),
    ("img_deb122", "rights: user root may not put image debian-12-2 on node"),
])
def test_a_job_that_can_never_run_is_ended_with_its_reason_not_requeued(site: Site, constraint: str,
                                                                        why: str) -> None:
    """Exit 2 (two images) and exit 5 from the rights rules: before, Slurm requeued these jobs every ~2 minutes."""
    job = site.batch(f"--constraint={constraint}", "-w", "node03")
    info = wait_ended(site, job)
    assert info["JobState"] == "CANCELLED" and info["Requeue"] == "0", info
    comment = site.slurm.run("scontrol", "show", "job", job).stdout
    assert "AdminComment=cid: job not run: " in comment and why in comment, comment
    site.slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)  # nothing left to requeue
    time.sleep(3)
    info = site.slurm.show("job", job)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0") and site.started(job) == [], info
    assert f"job {job} ended, not requeued" in site.prolog_log.read_text()


def test_a_prolog_that_cannot_run_cidcapt_drains_the_nodes_saying_why(site: Site) -> None:
    """SlurmUser cannot execute cidcapt's interpreter (a virtualenv under a private home): exit 126."""
    broken = site.root / "private-venv" / "bin"
    broken.mkdir(parents=True)
    python = broken / "python3"
    python.write_text("#!/bin/sh\nexit 0\n")
    python.chmod(0o644)  # not executable, even by root
    (broken / "cidcapt").write_text(f"#!{python}\n")
    (broken / "cidcapt").chmod(0o755)
    good = site.defaults.read_text()
    site.defaults.write_text(good + f"CID_BIN={broken}\n")  # the later assignment wins
    job = ""
    try:
        job = site.batch("--constraint=img_deb121", "-w", "node03")
        end = time.monotonic() + 40
        while time.monotonic() < end and "DRAIN" not in site.slurm.node_state("node03").upper():
            time.sleep(0.3)
        node = site.slurm.show("node", "node03")
        assert "DRAIN" in node["State"], node
        assert node["Reason"].startswith("cid: prolog cannot run cidcapt (exit 126), see "), node
        log = site.prolog_log.read_text()
        assert f"error: cannot run cidcapt (exit 126): its interpreter {python} is not executable by root" in log
        assert site.started(job) == []
    finally:
        site.defaults.write_text(good)
        if job:
            site.slurm.run("scancel", job, check=False)
        site.slurm.run("scontrol", "update", "NodeName=node03", "State=RESUME", check=False)


def test_every_line_of_the_prolog_log_has_a_time_stamp_and_the_seconds_since_the_start(site: Site) -> None:
    lines = site.prolog_log.read_text().splitlines()
    assert len(lines) > 20 and [line for line in lines if not STAMPED.match(line)] == []
    done = [line for line in lines if " prolog done: exit " in line]
    assert done and all(re.search(r"prolog done: exit \d+ after \d+ s$", line) for line in done), done
