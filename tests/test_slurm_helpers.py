"""cid behind a REAL Slurm in node_features/helpers mode (Debian's Slurm 22.05 ships node_features_helpers.so).

Slurm's slurmd runs cid-slurm-helper (through the shipped rc/slurm/cid-slurm-helper.sh): with no argument it
prints the node's active cid feature (asked from cidd), with a feature it starts cid's switch of the node; then
slurmd runs RebootProgram, which is the helper again with --reboot and does not reboot a node cid is switching.
On a real node the new image's boot restarts slurmd; here the test restarts the node's slurmd with ``-b``
("the node has just booted") once cidd says the simulated node runs its new image.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm import CidCluster, Slurm, capture_ends, require_slurm, write_defaults, write_hook, write_shims

pytestmark = pytest.mark.slow

FEATURES = {"img_deb121": "debian-12-1", "img_rocky93": "rocky-9-3"}


class Site:
    """A cid cluster with node[01-02] and a Slurm whose image features are changeable through cid's helper."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cid = CidCluster(root / "cid", scheduler={"features": FEATURES}, groups={
            "default": {"ladder": [{"method": "reboot", "timeout": 10}], "install_timeout": 10}})
        self.slurm = Slurm(root / "slurm", ["node01", "node02"], node_env={"CID_NODE": "{node}"})
        self.rebooted = root / "rebooted"  # written by CID_REBOOT_COMMAND: the helper really rebooted a node
        self.log = root / "helper.log"

    def start(self) -> None:
        self.cid.start_cidd()
        # Slow enough (about 3 s) that slurmd's RebootProgram runs while cid is still switching the node.
        self.cid.start_fleet("node[01-02]", "--reboot-delay", "1", "--install-time", "1",
                             "--initial-image", "debian-12-1")
        self.cid.wait_online(2)
        bindir = write_shims(self.root / "bin")
        defaults = write_defaults(self.root / "cid-slurm.default", self.cid, self.slurm.conf_path, bindir,
                                  CID_REBOOT_COMMAND=f"touch {self.rebooted}", CID_LOG=str(self.log))
        helper = write_hook(self.root / "helper.sh", "cid-slurm-helper.sh", defaults)
        reboot = write_hook(self.root / "reboot.sh", "cid-slurm-helper.sh", defaults, "--reboot")
        self.slurm.root.mkdir(parents=True, exist_ok=True)
        (self.slurm.root / "helpers.conf").write_text(
            "".join(f"Feature={feature} Helper={helper}\n" for feature in FEATURES)
            + f"MutuallyExclusive={','.join(FEATURES)}\nBootTime=60\nExecTime=10\n")
        self.slurm.conf += ["NodeFeaturesPlugins=node_features/helpers", f"RebootProgram={reboot}",
                            "ResumeTimeout=60"]
        self.slurm.start()

    def stop(self) -> None:
        self.slurm.stop()
        self.cid.stop()


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


def test_slurm_reads_the_active_image_feature_from_cid(site: Site) -> None:
    for node in ("node01", "node02"):
        info = site.slurm.show("node", node)
        assert info["AvailableFeatures"] == "img_deb121,img_rocky93", info
        assert info["ActiveFeatures"] == "img_deb121", info


def test_job_asking_for_another_image_gets_its_node_switched_by_cid(site: Site) -> None:
    jobs = site.slurm.root / "jobs"
    job = site.slurm.sbatch("--constraint=img_rocky93", "-w", "node01", "--wrap", f"date +%s.%N > {jobs}/start.node01")
    wait_cid(site, "node01", "rocky-9-3")  # the helper's set_state started cid's switch
    (ended, event), = capture_ends(site.cid, "helper.node01.")
    assert event["state"] == "ok" and event["image"] == "rocky-9-3"
    assert site.slurm.show("job", job)["JobState"] in ("CONFIGURING", "PENDING")  # waits for the node's boot
    # The node boots its new image: its slurmd starts again (-b: "just booted") and the helper reports the feature.
    site.slurm.stop_slurmd("node01")
    site.slurm.start_slurmd("node01", rebooted=True)
    info = site.slurm.wait_job(job, ("COMPLETED", "FAILED"), timeout=60)  # Slurm 22.05 checks every ~30 s
    assert info["JobState"] == "COMPLETED", info
    assert ended < float((jobs / "start.node01").read_text())
    assert site.slurm.show("node", "node01")["ActiveFeatures"] == "img_rocky93"
    assert not site.rebooted.exists()  # RebootProgram saw cid switching the node and did not reboot it again
    log = site.log.read_text()
    assert f"node01: switching to rocky-9-3 (img_rocky93) as job {event['job']}" in log
    assert "node01: cid is switching the node to rocky-9-3" in log and "not rebooting a second time" in log


def test_admin_reboot_of_a_node_cid_is_not_switching_really_reboots(site: Site) -> None:
    site.slurm.run("scontrol", "reboot", "node02")
    end = time.monotonic() + 30
    while time.monotonic() < end and not site.rebooted.exists():
        time.sleep(0.2)
    assert site.rebooted.exists(), "RebootProgram did not run the reboot command"
    assert f"node02: rebooting: touch {site.rebooted}" in site.log.read_text()
    site.slurm.stop_slurmd("node02")
    site.slurm.start_slurmd("node02", rebooted=True)
    site.slurm.wait_nodes(["node02"], "idle", 30)
    assert site.cid.status("node02")["node02"]["image"] == "debian-12-1"  # cid was not involved
