"""cidcapt captures end to end against a scripted fake cidd on 127.0.0.1: every exit code, re-attach, JSON."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cidcapt.connection import Timing
from cidcapt.main import main
from cidsim.fake_cidd import FakeCidd, FakeSession, node_info, test_ca_file

TOKEN = "t0ken-for-tests"
IMAGE = "debian-12-1"
OLD = "debian-12-2"
FAST = Timing(request_timeout=2.0, silence_timeout=1.0, grace=0.2, backoff_first=0.02, backoff_max=0.1,
              attempt_timeout=1.0)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def token_file(tmp_path: Path) -> Path:
    """Return a private token file holding TOKEN."""
    path = tmp_path / "admin.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def run(args: list[str], token_file: Path | None = None, *, server: FakeCidd | str | None = None,
        env: dict[str, str] | None = None, timing: Timing = FAST) -> tuple[int, str, str]:
    """Run cidcapt's main in-process; return (exit code, stdout, stderr)."""
    argv = list(args)
    if server is not None:
        argv += ["--server", server if isinstance(server, str) else server.address]
    if token_file is not None:
        argv += ["--token-file", str(token_file)]
    out, err = io.StringIO(), io.StringIO()
    env = {"CID_CA_FILE": test_ca_file(), **(env if env is not None else {"USER": "alice"})}
    code = main(argv, stdout=out, stderr=err, env=env, timing=timing)
    return code, out.getvalue(), err.getvalue()


def free_port() -> int:
    """Return a loopback port on which nothing listens (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def switch_ok(session: FakeSession) -> None:
    """Script: accept a capture of node[01-02] (node02 already in the image) and switch node01."""
    session.hello()
    cap = session.expect("capture")
    session.accept(cap, {"node01": node_info("to_installer", OLD), "node02": node_info("ready", IMAGE)})
    session.send({"type": "keepalive"})
    session.node(cap, "node01", "to_installer", "installing", detail="installer connected")
    session.progress(cap, "node01", "writing", 50, 100)
    session.node(cap, "node01", "installing", "to_image", detail="image written")
    session.node(cap, "node01", "to_image", "ready", detail="booted into the image")
    session.done(cap, "ok", {"node01": node_info("ready", IMAGE), "node02": node_info("ready", IMAGE)})


def test_all_ready_exits_0_with_progress_and_summary(token_file: Path) -> None:
    with FakeCidd(switch_ok, token=TOKEN) as cidd:
        code, out, err = run(["-j", "1234", "-n", "node[01-02]", "-i", IMAGE, "--timeout", "1800"],
                             token_file, server=cidd)
    assert code == 0, err
    assert out == ""
    hello = cidd.messages("hello")[0]
    assert hello["role"] == "admin" and hello["token"] == TOKEN and hello["proto"] == 1
    (capture,) = cidd.messages("capture")
    assert {k: capture[k] for k in ("job", "nodes", "image", "timeout", "user", "watch")} == {
        "job": "1234", "nodes": "node[01-02]", "image": IMAGE, "timeout": 1800, "user": "alice", "watch": True}
    assert "capture of 2 nodes to debian-12-1 accepted (1 already in the image, 1 to switch)" in err
    assert "->" not in err  # normal transitions get no line of their own; the final summary lists every node
    summary = err[err.index("all 2 nodes run"):]
    assert "  node01  ready  debian-12-1" in summary and "  node02  ready  debian-12-1" in summary
    assert err.rstrip().endswith("cidcapt: job 1234: 2 ready, 0 failed, 0 pending")


def test_failed_nodes_exit_1_with_their_reasons(token_file: Path) -> None:
    reason = "checksum mismatch: expected 3a, got 9c"

    def script(session: FakeSession) -> None:
        session.hello()
        cap = session.expect("capture")
        session.accept(cap, {"node01": "to_installer", "node02": "to_installer"})
        session.node(cap, "node02", "installing", "failed", detail=reason)
        session.done(cap, "failed", {"node01": node_info("ready", IMAGE), "node02": node_info("failed", OLD, reason)})

    with FakeCidd(script, token=TOKEN) as cidd:
        code, _, err = run(["-j", "7", "-n", "node01,node02", "-i", IMAGE], token_file, server=cidd)
    assert code == 1
    assert f"node02  installing -> failed  ({reason})" in err
    assert f"  node02  failed  {OLD}  {reason}" in err
    assert "1 ready, 1 failed, 0 pending" in err


def test_bad_hostlist_exits_2_without_connecting(token_file: Path) -> None:
    with FakeCidd(switch_ok, token=TOKEN) as cidd:
        code, _, err = run(["-j", "1", "-n", "node[01-", "-i", IMAGE], token_file, server=cidd)
        time.sleep(0.05)
    assert code == 2
    assert "cidcapt: error: bad hostlist 'node[01-'" in err
    assert cidd.sessions == []


def test_unknown_image_from_cidd_exits_2(token_file: Path) -> None:
    text = "unknown image 'debian-13-1'; known: debian-12-1, debian-12-2"

    def script(session: FakeSession) -> None:
        session.hello()
        session.error(session.expect("capture"), "unknown_image", text)

    with FakeCidd(script, token=TOKEN) as cidd:
        code, _, err = run(["-j", "1", "-n", "node01", "-i", "debian-13-1"], token_file, server=cidd)
    assert code == 2
    assert f"cidcapt: error: {text}" in err
    assert len(cidd.messages("capture")) == 1


@pytest.mark.parametrize("args", [["-j", "1", "-n", "node01"], ["--bogus"], ["-j", "1", "-n", "n1", "-i", "x",
                                                                               "--timeout", "soon"],
                                  ["--status", "--captures"], ["--server", "host:99999", "--captures"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    code, out, err = run(args)
    assert code == 2
    assert "usage: cidcapt" in err and "cidcapt: error:" in err


def test_deadline_from_cidd_exits_3_listing_pending_steps(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        session.hello()
        cap = session.expect("capture")
        session.accept(cap, {"node01": "to_installer", "node02": "to_installer"})
        session.node(cap, "node01", "to_installer", "installing")
        session.progress(cap, "node01", "writing", 40, 100)
        session.done(cap, "deadline", {"node01": node_info("installing", None),
                                       "node02": node_info("ready", IMAGE)})

    with FakeCidd(script, token=TOKEN) as cidd:
        code, _, err = run(["-j", "1", "-n", "node[01-02]", "-i", IMAGE], token_file, server=cidd)
    assert code == 3
    assert "deadline passed with 1 of 2 nodes pending" in err
    row = next(line for line in err.splitlines() if line.startswith("  node01"))
    assert row.split(None, 3) == ["node01", "installing", "-", "still installing (writing 40%)"]
    assert "1 ready, 0 failed, 1 pending" in err


def test_local_deadline_with_only_keepalives_exits_3(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        session.hello()
        cap = session.expect("capture")
        session.accept(cap, {"node01": node_info("to_image", OLD)})
        assert session.keepalive_until_closed(interval=0.05, timeout=5.0), "cidcapt never gave up"

    started = time.monotonic()
    with FakeCidd(script, token=TOKEN) as cidd:
        code, out, err = run(["-j", "1", "-n", "node01", "-i", IMAGE, "--timeout", "0.3", "--json"],
                             token_file, server=cidd)
    elapsed = time.monotonic() - started
    assert code == 3
    assert 0.4 <= elapsed < 3.0  # timeout 0.3 s + grace 0.2 s; keepalives alone do not reset it
    assert "cidd sent no result before the deadline" in err
    assert "node01  to_image  debian-12-2  still to_image" in err
    result = json.loads(out.splitlines()[-1])
    assert result["state"] == "deadline" and result["local_deadline"] is True and result["exit"] == 3
    assert len(cidd.sessions) == 1  # keepalives kept the session alive: no re-attach


def test_nothing_listening_exits_4_after_connect_timeout(token_file: Path) -> None:
    port = free_port()
    started = time.monotonic()
    code, _, err = run(["-j", "1", "-n", "node01", "-i", IMAGE, "--connect-timeout", "0.3"], token_file,
                       server=f"127.0.0.1:{port}")
    assert code == 4
    assert 0.25 <= time.monotonic() - started < 3.0
    assert (f"cidcapt: error: cannot reach cidd at 127.0.0.1:{port}: connection refused; is cidd running? "
            "check --server") in err


def test_connect_retries_until_cidd_listens(token_file: Path) -> None:
    with FakeCidd(switch_ok, token=TOKEN, listen_delay=0.3) as cidd:
        code, _, err = run(["-j", "1", "-n", "node[01-02]", "-i", IMAGE, "--connect-timeout", "5"], token_file,
                           server=cidd)
    assert code == 0, err


def test_wrong_token_exits_4(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-token\n")
    wrong.chmod(0o600)
    with FakeCidd(switch_ok, token=TOKEN) as cidd:
        code, _, err = run(["-j", "1", "-n", "node01", "-i", IMAGE], wrong, server=cidd)
    assert code == 4
    assert "cidcapt: error: authentication failed: wrong token for role admin" in err
    assert cidd.messages("capture") == []


def test_missing_or_unsafe_token_file_exits_4(tmp_path: Path) -> None:
    code, _, err = run(["-j", "1", "-n", "node01", "-i", IMAGE, "--server", f"127.0.0.1:{free_port()}"],
                       tmp_path / "nope.token")
    assert code == 4
    assert f"cidcapt: error: token file {tmp_path / 'nope.token'} does not exist" in err
    loose = tmp_path / "loose.token"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    code, _, err = run(["-j", "1", "-n", "node01", "-i", IMAGE], loose)
    assert code == 4 and "chmod 600" in err


def test_default_token_path_comes_from_state_dir_and_role(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "scheduler.token").write_text(TOKEN)
    (secrets / "scheduler.token").chmod(0o600)

    def script(session: FakeSession) -> None:
        session.hello(expect_role="scheduler")
        cap = session.expect("capture")
        assert cap["user"] == "bob"
        session.accept(cap, {"node01": node_info("ready", IMAGE)}, state="ok")

    with FakeCidd(script, token=TOKEN) as cidd:
        env = {"CID_STATE_DIR": str(tmp_path), "CID_ROLE": "scheduler", "CID_SERVER": cidd.address,
               "SLURM_JOB_USER": "bob", "USER": "root"}
        code, _, err = run(["-j", "1", "-n", "node01", "-i", IMAGE], env=env)
    assert code == 0, err  # a capture already ok at once: no events needed
    assert "job 1: the node runs debian-12-1" in err


def test_conflict_exits_5(token_file: Path) -> None:
    text = "node03 is held by job 1200 for image centos-7-1; wait for it to end"

    def script(session: FakeSession) -> None:
        session.hello()
        session.error(session.expect("capture"), "conflict", text)

    with FakeCidd(script, token=TOKEN) as cidd:
        code, _, err = run(["-j", "1", "-n", "node03", "-i", IMAGE], token_file, server=cidd)
    assert code == 5
    assert f"cidcapt: error: {text}" in err


def test_auth_internal_error_during_watch_exits_4(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        session.hello()
        cap = session.expect("capture")
        session.accept(cap, {"node01": "to_installer"})
        session.error(None, "internal", "cidd bug in capture.py; see cidd.log")

    with FakeCidd(script, token=TOKEN) as cidd:
        code, _, err = run(["-j", "1", "-n", "node01", "-i", IMAGE], token_file, server=cidd)
    assert code == 4
    assert "stopped with 1 of 1 nodes pending" in err
    assert "cidcapt: error: cidd bug in capture.py; see cidd.log" in err


def test_moab_ppn_list_is_sent_as_a_compact_hostlist(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        session.hello()
        cap = session.expect("capture")
        session.accept(cap, {name: node_info("ready", IMAGE) for name in ("n1", "n2", "n3")}, state="ok")

    with FakeCidd(script, token=TOKEN) as cidd:
        code, _, err = run(["-j", "Moab.42", "-n", "n1:ppn=8,n2:ppn=8,n3:ppn=8", "-i", IMAGE], token_file,
                           server=cidd)
    assert code == 0, err
    assert cidd.messages("capture")[0]["nodes"] == "n[1-3]"
    assert cidd.messages("capture")[0]["job"] == "Moab.42"


def reattach_script(session: FakeSession) -> None:
    """Script: the first session accepts and then drops (cidd restarts); the second one finishes the job."""
    session.hello()
    cap = session.expect("capture")
    if session.index == 0:
        session.accept(cap, {"node01": "to_installer", "node02": "to_installer"})
        session.node(cap, "node01", "to_installer", "installing")
        session.drop()
        return
    session.accept(cap, {"node01": "to_image", "node02": "installing"}, attached=True)
    session.node(cap, "node01", "to_image", "ready", image=IMAGE)
    session.node(cap, "node02", "installing", "to_image")
    session.node(cap, "node02", "to_image", "ready", image=IMAGE)
    session.done(cap, "ok", {"node01": node_info("ready", IMAGE), "node02": node_info("ready", IMAGE)})


def test_reattaches_after_a_dropped_connection(token_file: Path) -> None:
    with FakeCidd(reattach_script, token=TOKEN) as cidd:
        code, out, err = run(["-j", "99", "-n", "node[01-02]", "-i", IMAGE, "--json"], token_file, server=cidd)
    assert code == 0, err
    first, second = cidd.messages("capture")
    assert "reattach" not in first and second["reattach"] is True  # a cancelled capture is not started again
    assert {k: v for k, v in first.items() if k != "id"} == {k: v for k, v in second.items()
                                                             if k not in ("id", "reattach")}
    assert len(cidd.messages("hello")) == 2
    assert "lost the connection to cidd at" in err and "re-attaching to job 99" in err
    assert "job 99: re-attached to the capture of 2 nodes" in err
    result = json.loads(out.splitlines()[-1])
    assert result["reattached"] == 1 and result["exit"] == 0


def test_reattaches_when_cidd_goes_silent(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        session.hello()
        cap = session.expect("capture")
        if session.index == 0:
            session.accept(cap, {"node01": "to_installer"})
            session.wait_closed(timeout=5.0)  # say nothing, not even keepalives
            return
        session.accept(cap, {"node01": node_info("ready", IMAGE)}, attached=True)
        session.done(cap, "ok", {"node01": node_info("ready", IMAGE)})

    timing = Timing(request_timeout=2.0, silence_timeout=0.3, grace=5.0, backoff_first=0.02, backoff_max=0.1)
    with FakeCidd(script, token=TOKEN) as cidd:
        code, _, err = run(["-j", "5", "-n", "node01", "-i", IMAGE], token_file, server=cidd, timing=timing)
    assert code == 0, err
    assert "nothing came from cidd for 0.3 s, not even a keepalive" in err
    assert len(cidd.messages("capture")) == 2


def test_connection_lost_before_acceptance_is_retried(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        session.hello()
        if session.index == 0:
            session.drop()
            return
        cap = session.expect("capture")
        session.accept(cap, {"node01": node_info("ready", IMAGE)}, state="ok")

    with FakeCidd(script, token=TOKEN) as cidd:
        code, _, err = run(["-j", "5", "-n", "node01", "-i", IMAGE], token_file, server=cidd)
    assert code == 0, err
    assert "failed before the capture was accepted" in err


def test_json_lines_end_with_the_result(token_file: Path) -> None:
    with FakeCidd(switch_ok, token=TOKEN) as cidd:
        code, out, err = run(["-j", "1234", "-n", "node[01-02]", "-i", IMAGE, "--json"], token_file, server=cidd)
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [m["type"] for m in lines] == ["reply", "node", "progress", "node", "node", "done", "result"]
    result = lines[-1]
    assert result["job"] == "1234" and result["state"] == "ok" and result["exit"] == 0
    assert (result["ready"], result["failed"], result["pending"]) == (2, 0, 0)
    assert "accepted" in err and "2 ready, 0 failed, 0 pending" in err  # the human lines stay on stderr


def test_json_result_for_an_error(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        session.hello()
        session.error(session.expect("capture"), "forbidden", "role reader may not start captures")

    with FakeCidd(script, token=TOKEN) as cidd:
        code, out, _ = run(["-j", "1", "-n", "node01", "-i", IMAGE, "--json"], token_file, server=cidd)
    assert code == 5
    result = json.loads(out.splitlines()[-1])
    assert result == {"type": "result", "job": "1", "image": IMAGE, "state": "error", "code": "forbidden",
                      "message": "role reader may not start captures", "exit": 5}


def test_quiet_keeps_only_the_summary_and_groups_many_nodes(token_file: Path) -> None:
    names = [f"node{i:02d}" for i in range(1, 17)]

    def script(session: FakeSession) -> None:
        session.hello()
        cap = session.expect("capture")
        session.accept(cap, {n: "to_installer" for n in names})
        for name in names:
            session.node(cap, name, "to_image", "ready")
        final = {n: node_info("ready", IMAGE) for n in names}
        final["node07"] = node_info("failed", OLD, "no hello from the image after 3 reboots")
        session.done(cap, "failed", final)

    with FakeCidd(script, token=TOKEN) as cidd:
        code, _, err = run(["-j", "1", "-n", "node[01-16]", "-i", IMAGE, "--quiet"], token_file, server=cidd)
    assert code == 1
    assert "->" not in err and "accepted" not in err
    lines = err.splitlines()
    assert lines[0] == "cidcapt: job 1: 1 of 16 nodes failed"
    assert lines[1].split() == ["node[01-06,08-16]", "ready", IMAGE]
    assert lines[2].split()[:3] == ["node07", "failed", OLD] and lines[2].endswith("after 3 reboots")
    assert lines[3] == "cidcapt: job 1: 15 ready, 1 failed, 0 pending"


def test_console_script_runs_without_twisted(token_file: Path) -> None:
    """Run ``python -m cidcapt`` as a prolog would, and check that Twisted was never imported."""
    with FakeCidd(switch_ok, token=TOKEN) as cidd:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CID_SERVER": cidd.address, "CID_CA_FILE": test_ca_file()}
        code = ("import sys, runpy; sys.argv = ['cidcapt'] + sys.argv[1:]\n"
                "try:\n    runpy.run_module('cidcapt', run_name='__main__')\n"
                "finally:\n    assert 'twisted' not in sys.modules, 'cidcapt imported twisted'\n"
                "    assert 'rich' not in sys.modules, 'cidcapt imported rich off a terminal (slow start)'\n"
                "    assert 'cryptography' not in sys.modules, 'cidcapt imported cryptography (slow start)'\n")
        proc = subprocess.run([sys.executable, "-c", code, "-j", "1", "-n", "node[01-02]", "-i", IMAGE,
                               "--token-file", str(token_file)], env=env, capture_output=True, text=True,
                              timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert "2 ready, 0 failed, 0 pending" in proc.stderr


def test_pipe_gets_failures_climbs_and_summary_lines_not_every_transition(token_file: Path) -> None:
    """Off a terminal (a prolog's log): failures, ladder climbs and retried installs get a line each, the rest
    only the periodic summary line (--summary-every), which counts the states and names nodes not moving."""
    def script(session: FakeSession) -> None:
        session.hello()
        cap = session.expect("capture")
        session.accept(cap, {"node01": "to_installer", "node02": "to_installer", "node03": "to_installer"})
        session.node(cap, "node01", "to_installer", "installing", detail="installer connected")
        session.progress(cap, "node01", "writing", 1 << 20, 4 << 20)
        session.node(cap, "node02", "to_installer", "to_installer", rung=1, detail="no answer 3s after rung 0 (reboot)")
        session.node(cap, "node03", "to_installer", "failed", detail="ladder exhausted")
        time.sleep(0.5)  # summary lines are due every 0.2 s; node01 and node02 do not move for 0.3 s
        session.node(cap, "node01", "installing", "to_image", detail="image written")
        session.node(cap, "node01", "to_image", "ready", detail="booted into the image")
        session.done(cap, "failed", {"node01": node_info("ready", IMAGE), "node02": node_info("to_installer", OLD),
                                     "node03": node_info("failed", OLD, "ladder exhausted")})

    with FakeCidd(script, token=TOKEN) as cidd:
        code, out, err = run(["-j", "9", "-n", "node[01-03]", "-i", IMAGE, "--summary-every", "0.2",
                              "--stall-after", "0.3"], token_file, server=cidd)
    assert code == 1, err
    assert out == ""
    assert "cidcapt: node03  to_installer -> failed  (ladder exhausted)" in err
    assert "cidcapt: node02  to_installer -> to_installer  (no answer 3s after rung 0 (reboot))" in err
    assert "installing -> to_image" not in err and "to_image -> ready" not in err
    summaries = [line for line in err.splitlines() if line.startswith("cidcapt: job 9: 0/3 ready")]
    assert summaries, err
    assert ", 1 to_installer, 1 installing (1.0 MiB of 4.0 MiB), 1 failed; " in summaries[0]
    assert "; on ladder rung 1: node02" in summaries[0]
    assert any(line.endswith("; not moved for 0s+: node[01-02]") for line in summaries), summaries


def test_help_documents_the_exit_codes() -> None:
    code, out, _ = run(["--help"])
    assert code == 0
    for line in ("0  all nodes are ready", "1  some nodes failed", "2  bad request", "3  deadline passed",
                 "4  cidd unreachable", "5  refused"):
        assert line in out


def test_reattaches_when_cidd_restarts_later_than_the_connect_timeout(token_file: Path) -> None:
    """The first session lasts longer than --connect-timeout, then cidd refuses sessions for longer than that
    too (a restart): cidcapt keeps re-attaching with backoff until the capture's deadline and ends with 0."""
    dropped: list[float] = []

    def script(session: FakeSession) -> None:
        if session.index == 0:
            session.hello()
            cap = session.expect("capture")
            session.accept(cap, {"node01": "to_installer"})
            for _ in range(6):  # 1.2 s of a healthy session, longer than the 0.5 s connect timeout
                time.sleep(0.2)
                session.send({"type": "keepalive"})
            dropped.append(time.monotonic())
            session.drop()
            return
        if time.monotonic() - dropped[0] < 1.0:  # still "restarting": 1 s, twice the connect timeout
            session.drop()
            return
        session.hello()
        cap = session.expect("capture")
        session.accept(cap, {"node01": node_info("ready", IMAGE)}, attached=True)
        session.done(cap, "ok", {"node01": node_info("ready", IMAGE)})

    with FakeCidd(script, token=TOKEN) as cidd:
        code, _, err = run(["-j", "12", "-n", "node01", "-i", IMAGE, "--timeout", "30", "--connect-timeout", "0.5"],
                           token_file, server=cidd)
    assert code == 0, err
    assert len(cidd.messages("capture")) == 2
    assert len(cidd.sessions) >= 3  # at least one refused attempt during the restart
    assert "re-attached to the capture" in err


def test_no_reattach_before_the_deadline_exits_4(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        if session.index > 0:
            session.drop()  # cidd is back on its port but keeps failing: never re-attached
            return
        session.hello()
        session.accept(session.expect("capture"), {"node01": "installing"})
        session.drop()

    with FakeCidd(script, token=TOKEN) as cidd:
        code, _, err = run(["-j", "8", "-n", "node01", "-i", IMAGE, "--timeout", "0.2"], token_file, server=cidd)
    assert code == 4
    assert len(cidd.sessions) >= 2
    assert "stopped with 1 of 1 nodes pending" in err
    assert "could not re-attach to job 8 before the deadline" in err


def test_space_separated_hostlist_words_are_one_list(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        session.hello()
        cap = session.expect("capture")
        session.accept(cap, {n: node_info("ready", IMAGE) for n in ("n1", "n2", "n7")}, state="ok")

    with FakeCidd(script, token=TOKEN) as cidd:
        code, _, err = run(["-j", "3", "-n", "n1:ppn=4", "n2:ppn=4", "-n", "n7", "-i", IMAGE, "--user", "carol"],
                           token_file, server=cidd)
    assert code == 0, err
    capture = cidd.messages("capture")[0]
    assert capture["nodes"] == "n[1-2,7]" and capture["user"] == "carol"


def test_bad_cid_server_variable_exits_2() -> None:
    code, _, err = run(["--captures"], env={"CID_SERVER": "head:http"})
    assert code == 2
    assert "bad port in server address 'head:http'" in err


def test_an_unexpected_exception_is_a_bug_with_its_own_exit_code(token_file: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in cidcapt exits 70 with the traceback on stderr; never 4, which tells a prolog to retry forever."""
    def broken(self: object) -> None:
        raise KeyError("boom")

    monkeypatch.setattr("cidcapt.main.CaptureRunner.run", broken)
    with FakeCidd(switch_ok, token=TOKEN) as cidd:
        code, _, err = run(["-j", "70", "-n", "node[01-02]", "-i", IMAGE], token_file, server=cidd)
    assert code == 70
    assert "Traceback (most recent call last)" in err and "KeyError: 'boom'" in err
    assert "internal error (a bug in cidcapt" in err and "retrying will not help" in err


def test_exit_code_of_errors_that_are_not_cid_errors() -> None:
    from cidcapt.errors import Unreachable
    from cidcapt.exit_codes import EXIT_BUG, EXIT_INTERRUPTED, exit_code

    assert exit_code(ValueError("x")) == EXIT_BUG == 70
    assert exit_code(KeyboardInterrupt()) == EXIT_INTERRUPTED
    assert exit_code(Unreachable("cidd is down", reason="refused")) == 4
