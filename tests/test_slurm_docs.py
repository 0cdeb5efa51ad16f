"""docs/slurm.md followed step by step, for both modes, against a REAL Slurm 22.05 and a real cidd.

The test takes the page's own snippets out of the Markdown (each fenced block after a ``<!-- snippet: NAME -->``
comment) and uses them as they are: cidd's ``scheduler`` section, the install commands (run with ``sh -e``),
``/etc/default/cid-slurm``, the slurm.conf lines of the mode and helpers.conf. What it changes, and only that:

- absolute paths move under the test's directory (``/etc/cid/`` -> ``<tmp>/etc/cid/``, ...), and cidd's address
  ``head:38008`` becomes the test cidd's, by one mapping applied alike to the snippets and to the hook scripts
  the install step copied (whose built-in ``/etc/default/cid-slurm`` must point at the test's file);
- the defaults file gets ``CID_REBOOT_COMMAND`` (the nodes are simulated: nothing may reboot this machine);
- the page's ``NodeName=`` line gives its ``Features=`` to the test's own node lines (ports, loopback);
- each slurmd gets ``CID_NODE`` (all simulated nodes share one host name), as the page allows.

The rest of slurm.conf (cluster name, munge, ports, SlurmUser=root) is the fixture's (tests/slurm.py).
"""

from __future__ import annotations

import re
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.slurm import CidCluster, Slurm, captures, require_slurm, write_shims

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "slurm.md"
SNIPPET = re.compile(r"^(?P<indent>[ \t]*)<!-- snippet: (?P<name>[^>]+?) -->\n(?P=indent)```[^\n]*\n(?P<body>.*?)"
                     r"^(?P=indent)```$", re.MULTILINE | re.DOTALL)
#: A line of the prolog log: time stamp, job, seconds since that prolog started, then the text.
STAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} job=\d+ \+\d+s .")
#: Absolute paths of the page that must all have been mapped before anything runs.
SYSTEM_PATH = re.compile(r"(?<![\w./-])/(?:etc|usr/local|var|opt)/")


def page_snippets(text: str) -> dict[str, str]:
    """Return {name: body} of the page's marked fenced blocks (indentation of list items removed)."""
    found = {m["name"]: textwrap.dedent(m["body"]) for m in SNIPPET.finditer(text)}
    assert len(found) == len(SNIPPET.findall(text)), "two snippets of docs/slurm.md have the same name"
    return found


def test_the_page_has_every_snippet_the_set_up_needs() -> None:
    snippets = page_snippets(PAGE.read_text())
    assert set(snippets) >= {"cidd.yaml", "install", "cid-slurm.default", "slurm.conf, prolog mode",
                             "slurm.conf, helpers mode", "helpers.conf"}, sorted(snippets)
    shipped = (REPO / "rc" / "slurm" / "slurm.conf.snippet").read_text()
    for line in snippets["slurm.conf, prolog mode"].splitlines()[:3]:  # the lines rc/slurm ships too
        assert re.search(rf"^{re.escape(line)}$", shipped, re.MULTILINE), line
    example = (REPO / "rc" / "slurm" / "helpers.conf.example").read_text()
    for line in snippets["helpers.conf"].splitlines():
        assert line.startswith(("BootTime", "ExecTime")) or f"\n{line}\n" in example, line


class Site:
    """cidd, a simulated fleet node[01-02] and a Slurm, all set up from the page for ``mode``."""

    def __init__(self, root: Path, mode: str) -> None:
        self.root = root
        self.mode = mode
        self.snippets = page_snippets(PAGE.read_text())
        scheduler = yaml.safe_load(self.snippets["cidd.yaml"])["scheduler"]
        self.features: dict[str, str] = scheduler["features"]
        self.cid = CidCluster(root / "cid", scheduler=scheduler, groups={
            "default": {"ladder": [{"method": "reboot", "timeout": 10}], "install_timeout": 10,
                        "install_attempts": 1}})
        self.slurm = Slurm(root / "slurm", ["node01", "node02"], node_env={"CID_NODE": "{node}"})
        self.rebooted = root / "rebooted"
        self.paths = {  # the page's paths -> this test's
            "/etc/default/cid-slurm": root / "etc" / "default" / "cid-slurm",
            "/etc/slurm": self.slurm.root,
            "/etc/cid": root / "etc" / "cid",
            "/usr/local/lib/cid": root / "lib",
            "/var/log/cid": root / "log",
            "/var/lib/cid": self.cid.state_dir,
            "/opt/cid/bin": root / "venv" / "bin",
        }

    def mapped(self, text: str, *, complete: bool = True) -> str:
        """Return ``text`` with the page's absolute paths and cidd's address replaced by this test's.

        With ``complete``, fail when a system path is left (nothing may touch /etc, /usr/local, /var or /opt).
        """
        for page_path, here in self.paths.items():
            text = re.sub(rf"(?<![\w./]){re.escape(page_path)}(?![\w.-])", str(here), text)
        text = text.replace("head:38008", self.cid.server)
        assert not complete or not SYSTEM_PATH.search(text), f"a path of the page was not mapped:\n{text}"
        return text

    def start(self) -> None:
        self.cid.start_cidd()
        self.cid.start_fleet("node[01-02]", "--reboot-delay", "1", "--install-time", "1",
                             "--initial-image", "debian-12-1", "--fail-install", "node02")
        self.cid.wait_online(2)
        write_shims(self.paths["/opt/cid/bin"])  # "pip install cid" into a virtualenv: this tree's programs
        self.slurm.root.mkdir(parents=True, exist_ok=True)
        # Step 2: the page's install commands.
        subprocess.run(["sh", "-e", "-c", self.mapped(self.snippets["install"])], cwd=REPO, check=True)
        for hook in self.paths["/usr/local/lib/cid"].glob("*.sh"):  # the hooks' fixed /etc/default/cid-slurm
            hook.write_text(self.mapped(hook.read_text(), complete=False))  # (PATH keeps /usr/local/bin)
        # Step 3: the defaults file.
        defaults = self.paths["/etc/default/cid-slurm"]
        defaults.parent.mkdir(parents=True, exist_ok=True)
        defaults.write_text(self.mapped(self.snippets["cid-slurm.default"])
                            + f"CID_REBOOT_COMMAND='touch {self.rebooted}'\n")
        # Step 4: the slurm.conf lines of the mode (and helpers.conf).
        conf = self.mapped(self.snippets[f"slurm.conf, {self.mode} mode"]).splitlines()
        for line in conf:
            if line.startswith("NodeName="):
                self.slurm.node_lines = re.search(r"\bFeatures=\S+", line)[0]  # type: ignore[index]
        self.slurm.conf += [line for line in conf if not line.startswith("NodeName=")]
        if self.mode == "helpers":
            (self.slurm.root / "helpers.conf").write_text(self.mapped(self.snippets["helpers.conf"]))
        self.slurm.start()

    def stop(self) -> None:
        self.slurm.stop()
        self.cid.stop()

    @property
    def prolog_log(self) -> Path:
        return self.paths["/var/log/cid"] / "slurm-prolog.log"

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
        with -b, as the new image's boot would; return the time of the restart."""
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

    def run_switching_job(self) -> tuple[str, dict[str, str]]:
        """Run a job asking for img_rocky93 on node01 (which runs debian-12-1), playing the node's reboot while
        cid switches it; return the job id and its final fields."""
        feature = next(f for f, image in self.features.items() if image == "rocky-9-3")
        job = self.batch(f"--constraint={feature}", "-w", "node01")
        booted = self.boot_when_switched("node01", "rocky-9-3")
        info = self.slurm.wait_job(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=90)
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", info
        records = captures(self.cid, job)
        (started,) = self.started(job)
        assert records and records[-1]["state"] == "ok" and records[-1]["ended"] < started, records
        assert booted < started and self.cid.status("node01")["node01"]["image"] == "rocky-9-3"
        return job, info


def start_site(tmp_path_factory: pytest.TempPathFactory, mode: str) -> Iterator[Site]:
    """Start the site of ``mode``; stop it afterwards."""
    require_slurm()
    site = Site(tmp_path_factory.mktemp(f"docs-{mode}"), mode)
    try:
        site.start()
        yield site
    finally:
        site.stop()


@pytest.fixture(scope="module")
def prolog_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    yield from start_site(tmp_path_factory, "prolog")


def test_prolog_mode_as_the_page_says_switches_the_nodes_and_survives_their_reboot(prolog_site: Site) -> None:
    """The node reboots (its slurmd restarts with -b) while the job is CONFIGURING: ReturnToService=2 of the
    page keeps Slurm from taking it for a crash."""
    site = prolog_site
    job, info = site.run_switching_job()
    lines = site.prolog_log.read_text().splitlines()
    assert lines and [line for line in lines if not STAMPED.match(line)] == []
    assert any(re.search(rf"job={job} \+\d+s prolog done: exit 0 after \d+ s$", line) for line in lines), lines
    assert "DRAIN" not in site.slurm.node_state("node01").upper() and "DOWN" not in site.slurm.node_state("node01")


def test_prolog_mode_drain_reasons_read_whole_with_the_pages_sinfo(prolog_site: Site) -> None:
    site = prolog_site
    job = site.batch("--constraint=img_rocky93", "-w", "node02")  # node02 fails every install
    site.slurm.wait_nodes(["node02"], "idle+drain", 40)
    reason = site.slurm.show("node", "node02")["Reason"]
    assert reason.startswith(f"cid: job {job}: switch to rocky-9-3 failed: ") and len(reason) > 60, reason
    short = site.slurm.run("sinfo", "-R").stdout
    assert reason not in short and reason[:20] in short  # what the page warns about
    whole = site.slurm.run("sinfo", "-R", "-o", "%N %E").stdout
    assert f"node02 {reason.split(' [')[0]}" in whole, whole
    site.slurm.run("scancel", job)
    site.slurm.run("scontrol", "update", "NodeName=node02", "State=RESUME")


@pytest.fixture(scope="module")
def helpers_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    yield from start_site(tmp_path_factory, "helpers")


def test_helpers_mode_as_the_page_says_switches_the_node_slurm_asked_for(helpers_site: Site) -> None:
    site = helpers_site
    node = site.slurm.show("node", "node01")
    assert node["ActiveFeatures"] == "img_deb121" and "cid_other" in node["AvailableFeatures"], node
    job, info = site.run_switching_job()
    assert site.slurm.show("node", "node01")["ActiveFeatures"] == "img_rocky93"
    assert not site.rebooted.exists()  # RebootProgram (no argument in 22.05) left the reboot to cid
    helper_log = (site.paths["/var/log/cid"] / "slurm-helper.log").read_text()
    assert "node01: runs rocky-9-3: active img_rocky93" in helper_log
    assert [line for line in site.prolog_log.read_text().splitlines() if not STAMPED.match(line)] == []
