"""The shipped hook scripts and SysV init scripts (rc/slurm, rc/moab, rc/init.d, rc/logrotate.d) work as written.

The init scripts run for real: start-stop-daemon starts cidd and a simulated cidkid fleet in the background with
their logs under a temporary directory (settings through CIDD_DEFAULTS/CIDKID_DEFAULTS instead of /etc/default).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cidcapt.slurm_helper import build_parser
from tests.procs import Cluster, wait_port

REPO = Path(__file__).resolve().parent.parent
RC = REPO / "rc"
SCRIPTS = [*sorted((RC / "slurm").glob("*.sh")), RC / "init.d" / "cidd", RC / "init.d" / "cidkid"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse_and_are_executable(script: Path) -> None:
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True).returncode == 0
    assert script.stat().st_mode & 0o111


def test_hooks_export_slurm_conf_before_anything_calls_scontrol() -> None:
    for name in ("prolog_slurmctld.sh", "epilog_slurmctld.sh"):
        code = [line for line in (RC / "slurm" / name).read_text().splitlines() if not line.lstrip().startswith("#")]
        first = {word: next(i for i, line in enumerate(code) if word in line)
                 for word in ("export SLURM_CONF", "cidcapt --slurm")}
        assert first["export SLURM_CONF"] < first["cidcapt --slurm"], name
        scontrol = [i for i, line in enumerate(code) if "scontrol " in line]
        assert all(first["export SLURM_CONF"] < i for i in scontrol), name


def test_every_hook_reads_the_fixed_defaults_file_and_the_helper_passes_cid_timeout_on() -> None:
    for script in sorted((RC / "slurm").glob("*.sh")):
        assert "${CID_SLURM_DEFAULTS:-/etc/default/cid-slurm}" in script.read_text(), script.name
    helper = (RC / "slurm" / "cid-slurm-helper.sh").read_text()
    assert re.search(r"^export .*\bCID_TIMEOUT\b", helper, re.MULTILINE)


def test_moab_snippet_keeps_notp_jobprolog_line() -> None:
    text = (RC / "moab" / "moab.cfg.snippet").read_text()
    assert re.search(r"CLASSCFG\[\w+\]\s+JOBPROLOG='\S*cidcapt -j \$JOBID -n \$HOSTLIST -i [\w.-]+'", text)


def test_snippets_name_what_the_docs_promise() -> None:
    conf = (RC / "slurm" / "slurm.conf.snippet").read_text()
    for key in ("PrologSlurmctld=", "EpilogSlurmctld=", "PrologEpilogTimeout=", "NodeFeaturesPlugins=",
                "RebootProgram=", "ResumeTimeout="):
        assert key in conf, key
    helpers = (RC / "slurm" / "helpers.conf.example").read_text()
    for key in ("Feature=", "Helper=", "MutuallyExclusive=", "BootTime=", "ExecTime="):
        assert key in helpers, key
    assert build_parser({}).prog == "cid-slurm-helper"
    assert "copytruncate" in (RC / "logrotate.d" / "cid").read_text()


def init(script: str, action: str, defaults: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", f"{script.upper()}_DEFAULTS": str(defaults)}
    return subprocess.run([str(RC / "init.d" / script), action], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.slow
def test_init_scripts_start_status_reload_and_stop_the_daemons(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "cid")
    cluster.root.mkdir(parents=True)
    config = cluster.write_config()
    bindir = Path(sys.executable).parent
    logs = tmp_path / "log"
    cidd_defaults = tmp_path / "cidd.default"
    this_tree = f"export PYTHONPATH={RC.parent}\n"  # the daemons run this tree's code, not the venv's install
    cidd_defaults.write_text(f'DAEMON={bindir}/cidd\nCIDD_OPTS="--config {config}"\nCID_STATE_DIR={cluster.state_dir}\n'
                             f"PIDFILE={tmp_path}/cidd.pid\nLOGDIR={logs}\n{this_tree}")
    kid_defaults = tmp_path / "cidkid.default"
    kid_defaults.write_text(f'DAEMON={bindir}/cid-simfleet\nCID_SERVER={cluster.server}\nPIDFILE={tmp_path}/cidkid.pid\n'
                            f'LOGDIR={logs}\nCIDKID_OPTS="node[01-02] --sim-dir {tmp_path}/sim '
                            f'--token-file {cluster.state_dir}/secrets/agent.token --ca {cluster.ca_file}"\n'
                            f"{this_tree}")
    try:
        assert init("cidd", "start", cidd_defaults).returncode == 0
        wait_port(cluster.port)
        assert init("cidd", "status", cidd_defaults).returncode == 0
        assert init("cidkid", "start", kid_defaults).returncode == 0
        cluster.wait_online(2, timeout=30)
        assert init("cidkid", "start", kid_defaults).returncode == 0  # already running: still fine
        assert init("cidd", "reload", cidd_defaults).returncode == 0  # SIGHUP: catalog reload
        end = time.monotonic() + 10
        while time.monotonic() < end and '"catalog.reloaded"' not in (logs / "cidd.log").read_text():
            time.sleep(0.1)
        assert '"catalog.reloaded"' in (logs / "cidd.log").read_text()
        assert "agent" in (logs / "cidkid.log").read_text()
    finally:
        kid_stop = init("cidkid", "stop", kid_defaults)
        cidd_stop = init("cidd", "stop", cidd_defaults)
    assert kid_stop.returncode == 0 and cidd_stop.returncode == 0
    assert init("cidd", "status", cidd_defaults).returncode == 3
    assert init("cidkid", "status", kid_defaults).returncode == 3
    assert not (tmp_path / "cidd.pid").exists()
