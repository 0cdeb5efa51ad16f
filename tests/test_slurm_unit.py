"""Slurm integration without Slurm: the constraint parser, the drain calls, --slurm and --release against a fake
cidd, Moab host lists, and cid-slurm-helper's three modes."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cidcapt import slurm, slurm_helper
from cidcapt.connection import Timing
from cidcapt.main import main
from cidcapt.slurm import ConstraintError, ImageChoiceError, Term, choose_image, drain_commands, parse_constraint
from cidsim.fake_cidd import ClientClosed, FakeCidd, FakeSession, node_info, test_ca_file

TOKEN = "slurm-t0ken"
FEATURES = {"img_deb121": "debian-12-1", "img_rocky93": "rocky-9-3", "rocky": "rocky-9-3"}
FAST = Timing(request_timeout=2.0, silence_timeout=1.0, grace=0.2, backoff_first=0.02, backoff_max=0.1,
              attempt_timeout=1.0)


# The constraint expression parser ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, words", [
    ("", []),
    ("img_rocky93", ["img_rocky93"]),
    ("img_rocky93&gpu", ["img_rocky93", "gpu"]),
    ("gpu,img-deb.12", ["gpu", "img-deb.12"]),
    ("[img_a|img_b]", ["img_a", "img_b"]),
    ("[rack1*2&rack2*4]", ["rack1", "rack2"]),
    ("(a|b)&c", ["a", "b", "c"]),
    ("((a))*3 & b", ["a", "b"]),
    ("img:x+y=z/w@v", ["img:x+y=z/w@v"]),
])
def test_constraint_words(text: str, words: list[str]) -> None:
    assert [t.name for t in parse_constraint(text)] == words


def test_negation_marks_the_word_or_the_whole_group() -> None:
    assert parse_constraint("!a&b") == [Term("a", True), Term("b")]
    assert parse_constraint("!(a|b)&c") == [Term("a", True), Term("b", True), Term("c")]
    assert parse_constraint("img!s") == [Term("img!s")]  # Slurm 22.05 accepts '!' inside a name


@pytest.mark.parametrize("text, where", [
    ("a&", "at the end"), ("(a", "missing ')'"), ("a)", "unexpected ')'"), ("[a|b", "missing ']'"),
    ("&a", "expected a feature"), ("a*", "'*' must be followed by a count"), ("a b", "unexpected 'b'"),
    ("a|(b]", "missing ')'"),
])
def test_bad_constraints_say_where(text: str, where: str) -> None:
    with pytest.raises(ConstraintError) as err:
        parse_constraint(text)
    assert where in err.value.message and err.value.code == "bad_request"


def test_image_from_the_cid_features_only() -> None:
    assert choose_image("img_rocky93&gpu", FEATURES, None) == "rocky-9-3"
    assert choose_image("[img_rocky93|rocky]", FEATURES, None) == "rocky-9-3"  # two features, one image
    assert choose_image("gpu", FEATURES, "debian-12-1") == "debian-12-1"  # none: the default
    assert choose_image("", FEATURES, None) is None
    assert choose_image("!img_rocky93&img_deb121", FEATURES, None) == "debian-12-1"  # negated words do not ask


def test_two_images_are_refused_naming_both() -> None:
    with pytest.raises(ImageChoiceError) as err:
        choose_image("img_deb121|img_rocky93", FEATURES, None)
    assert "debian-12-1" in err.value.message and "rocky-9-3" in err.value.message


# Drain calls ------------------------------------------------------------------------------------------------

def test_one_drain_call_per_reason_for_failed_and_pending_nodes_only() -> None:
    nodes = {"n1": node_info("ready", "rocky-9-3"), "n2": node_info("failed", None, "install: disk full"),
             "n3": node_info("failed", None, "install: disk full"), "n4": {"state": "installing", "step": "writing"},
             "n5": node_info("ready", "debian-12-1"), "n6": node_info("ready", None)}
    commands = drain_commands("42", "rocky-9-3", nodes, scontrol="/x/scontrol")
    assert commands == [
        ["/x/scontrol", "update", "NodeName=n[2-3]", "State=DRAIN",
         "Reason=cid: job 42: switch to rocky-9-3 failed: install: disk full"],
        ["/x/scontrol", "update", "NodeName=n4", "State=DRAIN",
         "Reason=cid: job 42: rocky-9-3 not ready by the deadline (node still installing)"],
        ["/x/scontrol", "update", "NodeName=n5", "State=DRAIN",
         "Reason=cid: job 42: rocky-9-3 not ready by the deadline (node still ready)"],
    ]


def test_reasons_are_one_line_shortened_and_kept_as_one_argument() -> None:
    reason = 'checksum "bad"; $(rm -rf /)\n`x` ' + "y" * 500
    (command,) = drain_commands("7", "img-1-1", {"n1": node_info("failed", None, reason)})
    text = command[4].removeprefix("Reason=")
    assert len(text) == slurm.MAX_REASON and text.endswith("...") and "\n" not in text
    assert text.startswith('cid: job 7: switch to img-1-1 failed: checksum "bad"; $(rm -rf /) `x` yyy')


def test_run_drains_passes_slurm_conf_and_reports_failures() -> None:
    calls: list[tuple[list[str], dict[str, str]]] = []

    def runner(argv: list[str], **kwargs: Any) -> Any:
        calls.append((argv, kwargs["env"]))
        import subprocess
        return subprocess.CompletedProcess(argv, 1 if "n2" in argv[2] else 0, "", "slurm_update error: Invalid")

    said: list[str] = []
    commands = [["scontrol", "update", "NodeName=n1", "State=DRAIN", "Reason=cid: a"],
                ["scontrol", "update", "NodeName=n2", "State=DRAIN", "Reason=cid: b"]]
    failures = slurm.run_drains(commands, {"SLURM_CONF": "/s/slurm.conf"}, said.append, runner=runner)
    assert failures == 1 and [c[1]["SLURM_CONF"] for c in calls] == ["/s/slurm.conf"] * 2
    assert said == ["drained n1: cid: a", "warning: could not drain n2: scontrol exited 1: slurm_update error: Invalid"]


# --slurm and --release against a fake cidd -----------------------------------------------------------------

def serve(*, features: dict[str, Any] | None = None, default: str | None = None, release: bool = False,
          capture: Callable[[FakeSession, dict[str, Any]], None] | None = None,
          status: list[dict[str, Any]] | None = None) -> Callable[[FakeSession], None]:
    """Return a FakeCidd script answering features, capture and (given ``status`` rows) status requests until
    the client closes."""
    def script(session: FakeSession) -> None:
        session.hello()
        while True:
            try:
                message = session.recv()
            except ClientClosed:
                return
            kind = message["type"]
            if kind == "features":
                session.reply(message, features=features if features is not None else FEATURES,
                              default_image=default, release_to_default=release)
            elif kind == "capture" and capture is not None:
                capture(session, message)
            elif kind == "capture":
                session.accept(message, {n: "to_installer" for n in ("node01", "node02")})
            elif kind == "status" and status is not None:
                session.reply(message, nodes=status)
            else:
                session.error(message, "unknown_type", f"not scripted: {kind}")
    return script


def switch(outcome: dict[str, dict[str, Any]], state: str) -> Callable[[FakeSession, dict[str, Any]], None]:
    """Return a capture handler that accepts and ends with ``state`` and the node infos ``outcome``."""
    def handler(session: FakeSession, cap: dict[str, Any]) -> None:
        session.accept(cap, {n: "to_installer" for n in outcome})
        session.done(cap, state, outcome)
    return handler


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    """Return a PrologSlurmctld-like environment, with a fake scontrol on PATH that logs its arguments."""
    token = tmp_path / "scheduler.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "scontrol"
    fake.write_text(f'#!/bin/sh\nprintf "%s|" "$@" >> {tmp_path}/scontrol.log\necho "$SLURM_CONF" >> '
                    f'{tmp_path}/scontrol.log\n')
    fake.chmod(0o755)
    return {"PATH": f"{bindir}:/usr/bin:/bin", "SLURM_CONF": "/etc/slurm-test/slurm.conf", "CID_ROLE": "scheduler",
            "CID_TOKEN_FILE": str(token), "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[01-02]",
            "SLURM_JOB_USER": "alice", "SLURM_JOB_CONSTRAINTS": "img_rocky93&gpu", "TMP": str(tmp_path),
            "CID_CA_FILE": test_ca_file(), "CID_REBOOT_COMMAND": f"touch {tmp_path}/rebooted"}


def run(cidd: FakeCidd | str, env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run cidcapt's main in-process against ``cidd``; return (exit code, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    server = cidd if isinstance(cidd, str) else cidd.address
    code = main(["--server", server, "--connect-timeout", "0.5", *args], stdout=out, stderr=err, env=env,
                timing=FAST)
    return code, err.getvalue()


def scontrol_calls(env: dict[str, str]) -> list[str]:
    log = Path(env["TMP"]) / "scontrol.log"
    return log.read_text().splitlines() if log.exists() else []


def test_slurm_prolog_switches_the_job_nodes_to_the_constraint_image(env: dict[str, str]) -> None:
    ok = {"node01": node_info("ready", "rocky-9-3"), "node02": node_info("ready", "rocky-9-3")}
    with FakeCidd(serve(capture=switch(ok, "ok")), token=TOKEN) as cidd:
        code, err = run(cidd, env, "--slurm")
    assert code == 0, err
    (cap,) = cidd.messages("capture")
    assert (cap["job"], cap["nodes"], cap["image"], cap["user"], cap["watch"]) == \
        ("42", "node[01-02]", "rocky-9-3", "alice", True)
    assert scontrol_calls(env) == []


def test_slurm_prolog_drains_exactly_the_failed_nodes(env: dict[str, str]) -> None:
    outcome = {"node01": node_info("ready", "rocky-9-3"), "node02": node_info("failed", None, "install: bad disk")}
    with FakeCidd(serve(capture=switch(outcome, "failed")), token=TOKEN) as cidd:
        code, err = run(cidd, env, "--slurm")
    assert code == 1, err
    assert scontrol_calls(env) == [
        "update|NodeName=node02|State=DRAIN|Reason=cid: job 42: switch to rocky-9-3 failed: install: bad disk|"
        "/etc/slurm-test/slurm.conf"]
    assert "drained node02" in err


def test_slurm_prolog_drains_pending_nodes_at_the_deadline(env: dict[str, str]) -> None:
    outcome = {"node01": node_info("ready", "rocky-9-3"), "node02": node_info("to_image", "debian-12-1")}
    with FakeCidd(serve(capture=switch(outcome, "deadline")), token=TOKEN) as cidd:
        code, err = run(cidd, env, "--slurm")
    assert code == 3, err
    assert [c.split("|")[1] for c in scontrol_calls(env)] == ["NodeName=node02"]


def test_explicit_image_wins_without_asking_for_features(env: dict[str, str]) -> None:
    ok = {"node01": node_info("ready", "debian-12-1"), "node02": node_info("ready", "debian-12-1")}
    with FakeCidd(serve(capture=switch(ok, "ok")), token=TOKEN) as cidd:
        code, err = run(cidd, env, "--slurm", "-i", "debian-12-1")
    assert code == 0, err
    assert cidd.messages("features") == [] and cidd.messages("capture")[0]["image"] == "debian-12-1"


def test_no_cid_feature_and_no_default_leaves_the_nodes_alone(env: dict[str, str]) -> None:
    env["SLURM_JOB_CONSTRAINTS"] = "gpu"
    with FakeCidd(serve(), token=TOKEN) as cidd:
        code, err = run(cidd, env, "--slurm")
    assert code == 0, err
    assert cidd.messages("capture") == [] and "'gpu' names no cid feature, and cidd has no default_image" in err


def test_no_cid_feature_uses_the_default_image(env: dict[str, str]) -> None:
    env.pop("SLURM_JOB_CONSTRAINTS")
    ok = {"node01": node_info("ready", "debian-12-1"), "node02": node_info("ready", "debian-12-1")}
    with FakeCidd(serve(default="debian-12-1", capture=switch(ok, "ok")), token=TOKEN) as cidd:
        code, err = run(cidd, env, "--slurm")
    assert code == 0, err
    assert cidd.messages("capture")[0]["image"] == "debian-12-1"


@pytest.mark.parametrize("change, args, text", [
    ({"SLURM_JOB_ID": ""}, [], "needs SLURM_JOB_ID"),
    ({}, ["-j", "7"], "drop -j/-n"),
    ({}, ["--release", "-i", "x-1-1"], "takes no -i"),
])
def test_slurm_usage_errors_exit_2_and_touch_nothing(env: dict[str, str], change: dict[str, str],
                                                     args: list[str], text: str) -> None:
    env.update(change)
    with FakeCidd(serve(), token=TOKEN) as cidd:
        code, err = run(cidd, env, "--slurm", *args)
    assert code == 2 and text in err, err
    assert cidd.messages("capture") == [] and scontrol_calls(env) == []


@pytest.mark.parametrize("constraint, text", [
    ("img_deb121|img_rocky93", "2 different images"),
    ("img_deb121&(", "bad constraint"),
])
def test_a_request_that_can_never_succeed_ends_the_job_instead_of_a_requeue(env: dict[str, str], constraint: str,
                                                                            text: str) -> None:
    env["SLURM_JOB_CONSTRAINTS"] = constraint
    with FakeCidd(serve(), token=TOKEN) as cidd:
        code, err = run(cidd, env, "--slurm")
    assert code == 2 and text in err, err
    assert cidd.messages("capture") == []
    (call,) = scontrol_calls(env)
    arguments, slurm_conf = call.rsplit("|", 1)
    assert arguments.startswith("update|JobId=42|Requeue=0|AdminComment=cid: job not run: "), call
    assert text in arguments and slurm_conf == "/etc/slurm-test/slurm.conf", call  # one argument; SLURM_CONF
    assert "job 42 ended, not requeued" in err


@pytest.mark.parametrize("code_name, ends", [("forbidden", True), ("unknown_image", True), ("conflict", False)])
def test_refusals_end_the_job_only_when_no_retry_can_help(env: dict[str, str], code_name: str, ends: bool) -> None:
    def refuse(session: FakeSession, cap: dict[str, Any]) -> None:
        session.error(cap, code_name, f"refused for the test ({code_name})")

    with FakeCidd(serve(capture=refuse), token=TOKEN) as cidd:
        code, err = run(cidd, env, "--slurm")
    assert code in (2, 5) and f"refused for the test ({code_name})" in err, err
    calls = scontrol_calls(env)
    if ends:
        assert len(calls) == 1 and f"AdminComment=cid: job not run: refused for the test ({code_name})" in calls[0]
    else:
        assert calls == []  # another job holds a node for a while: Slurm's requeue is the right answer


def test_unknown_nodes_are_drained_and_the_job_requeued(env: dict[str, str]) -> None:
    def unknown(session: FakeSession, cap: dict[str, Any]) -> None:
        session.error(cap, "unknown_node", "unknown node(s) node02: not in the inventory and never connected")

    rows = [{"node": "node01", "state": "ready", "image": "debian-12-1"}]
    with FakeCidd(serve(capture=unknown, status=rows), token=TOKEN) as cidd:
        code, err = run(cidd, env, "--slurm")
    assert code == 2, err
    (call,) = scontrol_calls(env)
    assert call.startswith("update|NodeName=node02|State=DRAIN|Reason=cid: job 42: cidd does not know this node"), call
    assert "drained node02" in err


def test_slurm_prolog_with_cidd_unreachable_exits_4_without_draining(env: dict[str, str]) -> None:
    code, err = run("127.0.0.1:1", env, "--slurm")
    assert code == 4 and "cannot reach cidd" in err
    assert scontrol_calls(env) == []


def test_release_starts_the_default_image_without_waiting(env: dict[str, str]) -> None:
    def accept(session: FakeSession, cap: dict[str, Any]) -> None:
        session.accept(cap, {"node01": "to_installer", "node02": "ready"})

    with FakeCidd(serve(default="debian-12-1", release=True, capture=accept), token=TOKEN) as cidd:
        code, err = run(cidd, env, "--slurm", "--release")
    assert code == 0, err
    (cap,) = cidd.messages("capture")
    assert (cap["job"], cap["nodes"], cap["image"], cap["watch"]) == ("42.release", "node[01-02]", "debian-12-1",
                                                                     False)
    assert "switching node[01-02] back to debian-12-1 as job 42.release" in err


def test_release_does_nothing_when_cidd_says_so(env: dict[str, str]) -> None:
    with FakeCidd(serve(default="debian-12-1", release=False), token=TOKEN) as cidd:
        code, err = run(cidd, env, "--slurm", "--release")
    assert code == 0 and cidd.messages("capture") == [] and "release_to_default is off" in err


def test_release_never_fails_the_epilog_for_a_cid_problem(env: dict[str, str]) -> None:
    def refuse(session: FakeSession, cap: dict[str, Any]) -> None:
        session.error(cap, "conflict", "node01 held by job 43 for image rocky-9-3")

    with FakeCidd(serve(default="debian-12-1", release=True, capture=refuse), token=TOKEN) as cidd:
        code, err = run(cidd, env, "--release", "-j", "42", "-n", "node01")
    assert code == 0 and "warning: job 42: nodes node01 not released: node01 held by job 43" in err
    started = time.monotonic()
    code, err = run("127.0.0.1:1", env, "--slurm", "--release")
    assert code == 0 and "warning" in err and time.monotonic() - started < 5
    env.pop("SLURM_JOB_NODELIST")
    assert run("127.0.0.1:1", env, "--slurm", "--release")[0] == 2  # bad usage is the one failure


def test_moab_ppn_host_list_from_jobprolog(env: dict[str, str]) -> None:
    ok = {"n01": node_info("ready", "rocky-9-3"), "n02": node_info("ready", "rocky-9-3")}
    with FakeCidd(serve(capture=switch(ok, "ok")), token=TOKEN) as cidd:
        code, err = run(cidd, env, "-j", "Moab.17", "-n", "n01:ppn=8,n02:ppn=8", "-i", "rocky-9-3")
    assert code == 0, err
    assert cidd.messages("capture")[0]["nodes"] == "n[01-02]"


# cid-slurm-helper -------------------------------------------------------------------------------------------

def helper_script(rows: dict[str, dict[str, Any]]) -> Callable[[FakeSession], None]:
    """Return a FakeCidd script that also answers ``status`` with ``rows``."""
    base = serve(capture=lambda s, cap: s.accept(cap, {cap["nodes"]: "to_installer"}))

    def script(session: FakeSession) -> None:
        original = session.recv

        def recv(timeout: float = 5.0) -> dict[str, Any]:
            while True:
                message = original(timeout)
                if message.get("type") != "status":
                    return message
                session.reply(message, nodes=[{"node": n, **r} for n, r in rows.items() if n == message["nodes"]])
        session.recv = recv  # type: ignore[method-assign]
        base(session)
    return script


def helper(cidd: FakeCidd | str, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    server = cidd if isinstance(cidd, str) else cidd.address
    code = slurm_helper.main(["--server", server, "--node", "node01", *args], stdout=out, stderr=err, env=env)
    return code, out.getvalue(), err.getvalue()


def test_helper_reports_the_features_of_the_running_image(env: dict[str, str]) -> None:
    with FakeCidd(helper_script({"node01": {"state": "ready", "image": "rocky-9-3"}}), token=TOKEN) as cidd:
        code, out, err = helper(cidd, env)
    assert (code, out) == (0, "img_rocky93\nrocky\n"), err


@pytest.mark.parametrize("row, why", [
    ({"state": "ready", "image": "debian-12-2"}, "runs debian-12-2, which no feature of cidd's scheduler.features"),
    ({"state": "installing", "image": None, "target": "rocky-9-3"}, "the node is installing (to rocky-9-3)"),
    ({"state": "failed", "image": None, "target": "rocky-9-3"}, "the node is failed"),
])
def test_helper_reports_cid_other_when_no_image_feature_is_active(env: dict[str, str], row: dict[str, Any],
                                                                  why: str) -> None:
    with FakeCidd(helper_script({"node01": row}), token=TOKEN) as cidd:
        code, out, err = helper(cidd, env)
    assert (code, out) == (0, "cid_other\n"), err
    assert why in err and not Path(env["TMP"], "rebooted").exists()


def test_helper_without_cidd_reports_cid_other_and_never_reboots(env: dict[str, str]) -> None:
    code, out, err = helper("127.0.0.1:1", env)
    assert (code, out) == (0, "cid_other\n")
    assert "cannot tell which image the node runs (cannot reach cidd" in err
    assert not Path(env["TMP"], "rebooted").exists()  # Slurm 22.05's RebootProgram call after a feature change


def test_helper_waits_for_a_booting_node_to_say_hello(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm_helper, "SETTLE_POLL_S", 0.05)
    rows = {"node01": {"state": "to_image", "image": None, "target": "rocky-9-3"}}
    with FakeCidd(helper_script(rows), token=TOKEN) as cidd:
        def hello_later() -> None:
            time.sleep(0.3)
            rows["node01"] = {"state": "ready", "image": "rocky-9-3"}
        threading.Thread(target=hello_later, daemon=True).start()
        code, out, err = helper(cidd, env)
    assert (code, out) == (0, "img_rocky93\nrocky\n"), err


def test_helper_activates_by_starting_a_switch_it_does_not_wait_for(env: dict[str, str]) -> None:
    env["CID_TIMEOUT"] = "45"
    with FakeCidd(helper_script({"node01": {"state": "ready", "image": "debian-12-1"}}), token=TOKEN) as cidd:
        code, out, err = helper(cidd, env, "img_rocky93")
        assert code == 0, err
        (cap,) = cidd.messages("capture")
        assert cap["job"].startswith("helper.node01.") and cap["watch"] is False and cap["image"] == "rocky-9-3"
        assert cap["timeout"] == 45 and "deadline 45 s" in err  # CID_TIMEOUT, as the prolog's captures
        code, _, err = helper(cidd, env, "nosuch")
        assert code == 2 and "not in cidd's scheduler.features" in err
        code, _, err = helper(cidd, env, "cid_other")
        assert code == 2 and "cannot be activated" in err
        code, _, err = helper(cidd, env, "img_deb121,img_rocky93")
        assert code == 2 and "a node runs one image" in err
    assert len(cidd.messages("capture")) == 1


def test_helper_reboots_a_node_that_already_runs_the_image(env: dict[str, str]) -> None:
    """Slurm waits for a reboot after set_state: without one the job would wait until ResumeTimeout."""
    with FakeCidd(helper_script({"node01": {"state": "ready", "image": "debian-12-1"}}), token=TOKEN) as cidd:
        code, _, err = helper(cidd, env, "img_deb121")
    assert code == 0 and "already runs debian-12-1" in err and "rebooting: touch" in err
    assert Path(env["TMP"], "rebooted").exists() and cidd.messages("capture") == []


def test_helper_as_reboot_program_of_slurm_23_changes_nothing_while_the_node_switches(env: dict[str, str]) -> None:
    """From Slurm 23.02 RebootProgram gets the features as one comma list, after set_state started the switch."""
    row = {"state": "to_installer", "image": "debian-12-1", "target": "rocky-9-3", "job": "helper.node01.1"}
    with FakeCidd(helper_script({"node01": row}), token=TOKEN) as cidd:
        code, _, err = helper(cidd, env, "img_rocky93,gpu_mode2")
    assert code == 0 and "already switching to rocky-9-3" in err and "ignoring gpu_mode2" in err
    assert cidd.messages("capture") == [] and not Path(env["TMP"], "rebooted").exists()


def test_helper_reboot_only_when_cid_is_not_switching(env: dict[str, str]) -> None:
    marker = Path(env["TMP"]) / "rebooted"
    with FakeCidd(helper_script({"node01": {"state": "installing", "target": "rocky-9-3", "job": "j"}}),
                  token=TOKEN) as cidd:
        code, _, err = helper(cidd, env, "--reboot")
    assert code == 0 and not marker.exists() and "not rebooting a second time" in err
    with FakeCidd(helper_script({"node01": {"state": "ready", "image": "rocky-9-3"}}), token=TOKEN) as cidd:
        code, _, err = helper(cidd, env, "--reboot")
    assert code == 0 and marker.exists(), err


def test_missing_slurm_fails_the_real_slurm_tests_saying_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import slurm as fixture

    monkeypatch.setattr(fixture, "PROGRAMS", (*fixture.PROGRAMS, "no-such-slurm-daemon"))
    with pytest.raises(pytest.fail.Exception) as failed:
        fixture.require_slurm()
    assert "no-such-slurm-daemon" in str(failed.value) and "make test" in str(failed.value)
