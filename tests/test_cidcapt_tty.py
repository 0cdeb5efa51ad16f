"""cidcapt's progress as people see it, against a real cidd and a simulated fleet: the live view under a real
pseudo-terminal (pexpect), and the plain lines of a prolog's log (a pipe). sim[01-06] switch in about 2 s;
sim[07-08] never come back from a reboot (their ladder rung waits 60 s, longer than any capture here)."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import pexpect
import pytest

from tests.procs import Cluster, _env

pytestmark = pytest.mark.slow

IMAGE = "debian-12-2"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("tty"), groups={
        "default": {"ladder": [{"method": "reboot", "timeout": 60}], "install_timeout": 20}})
    cluster.start_cidd()
    try:
        cluster.start_fleet("sim[01-08]", "--reboot-delay", "0.3", "--install-time", "1.5",
                            "--initial-image", "debian-12-1", "--hang-reboot", "sim[07-08]")
        cluster.wait_online(8)
        yield cluster
    finally:
        cluster.stop()


def on_terminal(cluster: Cluster, *args: str, timeout: float = 30) -> tuple[int, str]:
    """Run cidcapt under a pseudo-terminal of 200 columns; return (exit status, everything it wrote)."""
    env = {**_env(cluster.state_dir), **cluster.extra_env, "TERM": "xterm-256color", "COLUMNS": "200"}
    child = pexpect.spawn(sys.executable, ["-m", "cidcapt.main", "--server", cluster.server, *args], env=env,
                          dimensions=(40, 200), encoding="utf-8", codec_errors="replace", timeout=timeout)
    try:
        child.expect(pexpect.EOF)
        text = child.before
    finally:
        child.close()
    assert child.exitstatus is not None, f"cidcapt ended by signal {child.signalstatus}"
    return child.exitstatus, text


def test_the_terminal_view_counts_nodes_ready_then_prints_the_result(cluster: Cluster) -> None:
    code, screen = on_terminal(cluster, "-j", "tty1", "-n", "sim[01-04]", "-i", IMAGE)
    assert code == 0, screen
    assert "capture of 4 nodes to debian-12-2 accepted" in screen
    seen = [int(n) for n in re.findall(r"(\d)/4 ready", screen)]
    assert seen and seen[0] == 0 and seen[-1] == 4 and len(set(seen)) >= 2, seen  # the counter moved
    assert seen == sorted(seen)
    assert "installing" in screen and "to_installer" in screen
    result = screen.index("cidcapt: job tty1: all 4 nodes run debian-12-2")
    assert result > screen.rindex("4/4 ready")  # the view's last drawing stays, the result comes under it
    assert "cidcapt: job tty1: 4 ready, 0 failed, 0 pending" in screen[result:]
    assert "\x1b[?25h" in screen  # the cursor is given back
    assert not re.search(r"sim0\d  \w+ -> \w+", screen)  # no line per normal transition


def test_the_terminal_view_names_a_hung_node_before_the_deadline(cluster: Cluster) -> None:
    code, screen = on_terminal(cluster, "-j", "tty2", "-n", "sim[05,07]", "-i", IMAGE, "--timeout", "8",
                               "--stall-after", "2")
    assert code == 3, screen
    stalled = re.search(r"stalled: sim07 in to_installer for (\d)s", screen)
    assert stalled and int(stalled.group(1)) >= 2, screen
    assert "1/2 ready" in screen
    assert stalled.start() < screen.index("cidcapt: job tty2: deadline passed with 1 of 2 nodes pending")
    assert "still to_installer" in screen


def test_a_prolog_log_gets_summary_lines_naming_a_hung_node(cluster: Cluster) -> None:
    result = cluster.cidcapt("-j", "log1", "-n", "sim[06,08]", "-i", IMAGE, "--timeout", "8",
                             "--summary-every", "1", "--stall-after", "2")
    assert result.returncode == 3, result.stderr
    lines = result.stderr.splitlines()
    assert "\x1b" not in result.stderr  # no terminal codes in a log
    assert lines[0] == "cidcapt: job log1: capture of 2 nodes to debian-12-2 accepted (0 already in the image, " \
                       "2 to switch)"
    summaries = [i for i, line in enumerate(lines) if line.startswith("cidcapt: job log1: ") and " ready, " in line
                 and "elapsed" in line]
    assert len(summaries) >= 3, result.stderr
    hung = [i for i in summaries if re.search(r"; not moved for \ds\+: sim08$", lines[i])]
    assert hung, result.stderr
    assert any(lines[i].startswith("cidcapt: job log1: 1/2 ready, 1 to_installer; ") for i in hung), result.stderr
    end = lines.index("cidcapt: job log1: deadline passed with 1 of 2 nodes pending")
    assert hung[0] < end
    assert not any(" -> " in line for line in lines)  # normal transitions: no line of their own
    assert lines[-1] == "cidcapt: job log1: 1 ready, 0 failed, 1 pending"
