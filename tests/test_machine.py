"""Tests for cidd.core.machine: every state and transition of the per-node switch machine, with explicit times.

The machine is pure (``apply(node, event, policy, now)``), so each test builds a node record, feeds it one
event at a chosen time and checks the new record, the actions and the history row (from/to/attempt/rung/
elapsed/detail). The policy below has three rungs with different timeouts and methods, so that every rung's
deadline and method can be told apart.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from cidd.core.machine import (
    CANCELLED,
    SWITCHING,
    AlreadySwitching,
    Node,
    State,
    Step,
    Transition,
    apply,
    restore,
)
from cidd.core.machine_types import (
    Cancel,
    Connected,
    Disconnected,
    Installed,
    InstallReport,
    Policy,
    PowerOn,
    Reboot,
    Rung,
    RungFailed,
    SendInstall,
    SetBoot,
    SetDeadline,
    Switch,
    Tick,
)

POLICY = Policy(
    ladder=(Rung("reboot", 100.0), Rung("kexec", 200.0), Rung("reboot", 400.0)),
    install_timeout=1000.0,
    install_attempts=2,
)
LADDER = "reboot, kexec, reboot"
A, B, C = "alma-9-1", "debian-12-1", "rocky-9-2"


def step(node: Node, event, now: float, policy: Policy = POLICY) -> Step:
    """Apply ``event`` to ``node`` at ``now``."""
    return apply(node, event, policy, now)


def row(s: Step) -> tuple:
    """Return the (from, to, attempt, rung, elapsed, detail) of a step's history row."""
    t = s.transition
    assert t is not None, "expected a history row"
    return (t.from_state, t.to_state, t.attempt, t.rung, t.elapsed, t.detail)


def ready(image: str = A, boot: str = "b1", since: float = 0.0) -> Node:
    """Return a node connected from its installed system running ``image``."""
    return Node("n1", state=State.READY, image=image, online=True, mode="system", boot_id=boot, since=since)


def offline(image: str | None = A, since: float = 0.0, boot: str | None = "b0") -> Node:
    """Return a node without agent session, last seen running ``image``."""
    return Node("n1", state=State.OFFLINE, image=image, boot_id=boot, since=since)


def in_installer(boot: str = "i1", since: float = 0.0) -> Node:
    """Return a node whose agent runs in the installer, with nothing to do."""
    return Node("n1", state=State.IN_INSTALLER, image=A, online=True, mode="installer", boot_id=boot, since=since)


def to_installer(online: bool = True, rung: int = 0, reboot_from: str | None = "b1", deadline: float = 1100.0,
                 since: float = 1000.0) -> Node:
    """Return a node switching to B, waiting for the installer (reboot sent from boot b1 unless told)."""
    return Node("n1", state=State.TO_INSTALLER, image=A, target=B, job="j1", online=online,
                mode="system" if online else None, boot_id="b1", reboot_from=reboot_from, rung=rung,
                deadline=deadline, since=since)


def installing(attempt: int = 1, boot: str = "i1", deadline: float = 3000.0, since: float = 2000.0,
               online: bool = True) -> Node:
    """Return a node whose installer is writing B."""
    return Node("n1", state=State.INSTALLING, image=A, target=B, job="j1", online=online,
                mode="installer" if online else None, boot_id=boot, attempt=attempt, deadline=deadline, since=since)


def to_image(rung: int = 0, reboot_from: str | None = "i1", online: bool = True, deadline: float = 3100.0,
             since: float = 3000.0) -> Node:
    """Return a node whose image B is written, waiting for B's hello (reboot sent from installer boot i1)."""
    return Node("n1", state=State.TO_IMAGE, image=A, target=B, job="j1", online=online,
                mode="installer" if online else None, boot_id="i1", reboot_from=reboot_from, attempt=1,
                rung=rung, deadline=deadline, since=since)


def failed(online: bool = False, mode: str | None = None, image: str | None = A) -> Node:
    """Return a node that failed its switch to B at attempt 2, rung 1."""
    return Node("n1", state=State.FAILED, image=image, target=B, job="j1", online=online, mode=mode,
                boot_id="b9", attempt=2, rung=1, since=500.0, reason="it broke")


# --- idle states: offline, ready, in_installer -----------------------------------------------------------


def test_offline_node_connecting_from_its_system_becomes_ready_with_the_reported_image():
    s = step(offline(image=None, since=10.0), Connected("b1", "system", A), 25.0)
    assert s.node.state is State.READY
    assert (s.node.image, s.node.online, s.node.mode, s.node.boot_id, s.node.since) == (A, True, "system", "b1", 25.0)
    assert s.actions == ()
    assert row(s) == ("offline", "ready", 0, 0, 15.0, "agent connected (system)")


def test_offline_node_connecting_from_the_installer_is_in_installer_and_keeps_its_last_image():
    s = step(offline(image=A, since=10.0), Connected("i1", "installer", None), 12.5)
    assert s.node.state is State.IN_INSTALLER
    assert (s.node.image, s.node.mode, s.node.boot_id) == (A, "installer", "i1")
    assert s.actions == ()
    assert row(s) == ("offline", "in_installer", 0, 0, 2.5, "agent connected (installer)")


def test_ready_node_reporting_another_image_changes_image_without_a_history_row():
    s = step(ready(A), Connected("b2", "system", C), 50.0)
    assert s.node.state is State.READY
    assert s.node.image == C
    assert s.node.boot_id == "b2"
    assert s.transition is None
    assert s.actions == ()


def test_ready_node_reconnecting_from_the_installer_moves_to_in_installer():
    s = step(ready(A, since=5.0), Connected("i7", "installer", None), 9.0)
    assert s.node.state is State.IN_INSTALLER
    assert s.node.image == A  # the installer says nothing about the installed image
    assert row(s) == ("ready", "in_installer", 0, 0, 4.0, "agent connected (installer)")


@pytest.mark.parametrize("node", [ready(since=3.0), in_installer(since=3.0)], ids=["ready", "in_installer"])
def test_disconnect_of_an_idle_node_makes_it_offline(node):
    s = step(node, Disconnected(), 10.0)
    assert s.node.state is State.OFFLINE
    assert (s.node.online, s.node.mode) == (False, None)
    assert s.node.image == A  # the last verified image is remembered
    assert s.node.since == 10.0
    assert s.actions == ()
    assert row(s) == (node.state.value, "offline", 0, 0, 7.0, "agent session closed")


def test_disconnect_of_an_offline_node_changes_nothing():
    node = offline()
    s = step(node, Disconnected(), 10.0)
    assert s.node == node
    assert s.transition is None


@pytest.mark.parametrize("node", [offline(), ready(), in_installer(), failed()],
                         ids=["offline", "ready", "in_installer", "failed"])
def test_tick_and_late_reports_do_nothing_outside_the_switching_states(node):
    for event in (Tick(), Installed(B, ok=True), RungFailed("agent refused")):
        s = step(node, event, 1e9)
        assert s == Step(node), event


# --- switch ------------------------------------------------------------------------------------------------


def test_switch_from_ready_sets_the_installer_boot_and_reboots_with_the_first_rung():
    s = step(ready(A, boot="b1", since=400.0), Switch(B, "j1"), 1000.0)
    n = s.node
    assert n.state is State.TO_INSTALLER
    assert (n.target, n.job, n.attempt, n.rung) == (B, "j1", 0, 0)
    assert n.deadline == 1100.0  # now + rung 0's timeout
    assert n.since == 1000.0
    assert n.reboot_from == "b1"  # reboot sent from the current boot
    assert n.image == A  # still the last verified image
    assert s.actions == (SetBoot("installer"), Reboot("installer", "reboot"))
    assert s.transition == Transition(node="n1", job="j1", image=B, from_state="ready", to_state="to_installer",
                                      attempt=0, rung=0, elapsed=600.0,
                                      detail=f"switch to {B} for job j1; rung 0: reboot")


def test_switch_to_the_image_a_ready_node_already_runs_is_a_no_op():
    node = ready(B)
    s = step(node, Switch(B, "j1"), 1000.0)
    assert s == Step(node)


def test_switch_of_an_offline_node_waits_for_the_agent_before_rebooting():
    s = step(offline(A, since=1.0), Switch(B, "j1"), 1000.0)
    n = s.node
    assert n.state is State.TO_INSTALLER
    assert n.deadline == 1100.0
    assert n.reboot_from is None  # nothing sent yet
    # no Reboot: an agent method needs a session; a node that is off is powered on (when cidd has a BMC)
    assert s.actions == (SetBoot("installer"), PowerOn("installer"))
    assert row(s) == ("offline", "to_installer", 0, 0, 999.0,
                      f"switch to {B} for job j1; rung 0: reboot when the agent connects")


def test_offline_switching_node_gets_its_reboot_when_the_agent_connects():
    node = step(offline(A), Switch(B, "j1"), 1000.0).node
    s = step(node, Connected("b2", "system", A), 1030.0)
    assert s.node.state is State.TO_INSTALLER
    assert s.actions == (Reboot("installer", "reboot"),)
    assert s.node.reboot_from == "b2"
    assert (s.node.online, s.node.mode, s.node.boot_id) == (True, "system", "b2")
    assert s.node.deadline == 1100.0  # the rung's deadline does not move
    assert s.node.rung == 0
    assert s.transition is None


def test_offline_switching_node_connecting_already_in_the_target_image_is_ready_without_reboot():
    node = step(offline(A), Switch(B, "j1"), 1000.0).node
    s = step(node, Connected("b2", "system", B), 1040.0)
    assert s.node.state is State.READY
    assert s.node.image == B
    assert (s.node.deadline, s.node.reboot_from, s.node.reason) == (None, None, None)
    assert s.actions == ()
    assert row(s) == ("to_installer", "ready", 0, 0, 40.0, f"already runs {B}")


def test_switch_of_a_node_in_the_installer_starts_the_install_at_once():
    s = step(in_installer(since=10.0), Switch(B, "j1"), 1000.0)
    n = s.node
    assert n.state is State.INSTALLING
    assert (n.target, n.job, n.attempt, n.rung) == (B, "j1", 1, 0)
    assert n.deadline == 2000.0  # now + install_timeout
    assert s.actions == (SendInstall(B),)
    assert row(s) == ("in_installer", "installing", 1, 0, 990.0, f"switch to {B} for job j1")


@pytest.mark.parametrize("state_node", [to_installer(), installing(), to_image()],
                         ids=["to_installer", "installing", "to_image"])
def test_switch_to_another_image_while_switching_raises_already_switching(state_node):
    with pytest.raises(AlreadySwitching) as err:
        step(state_node, Switch(C, "j2"), 1050.0)
    message = str(err.value)
    assert "n1" in message and B in message and "j1" in message


@pytest.mark.parametrize("state_node", [to_installer(), installing(), to_image()],
                         ids=["to_installer", "installing", "to_image"])
def test_switch_to_the_same_image_while_switching_joins_without_change(state_node):
    s = step(state_node, Switch(B, "j2"), 1050.0)
    assert s == Step(state_node)  # job stays j1: the first job keeps the node


# --- to_installer -> installing ----------------------------------------------------------------------------


def test_installer_hello_starts_the_install():
    s = step(to_installer(online=False, since=1000.0), Connected("i1", "installer", None), 1060.0)
    n = s.node
    assert n.state is State.INSTALLING
    assert (n.attempt, n.rung, n.deadline, n.reboot_from) == (1, 0, 2060.0, None)
    assert (n.online, n.mode, n.boot_id) == (True, "installer", "i1")
    assert s.actions == (SendInstall(B),)
    assert row(s) == ("to_installer", "installing", 1, 0, 60.0, "installer connected")


def test_installer_hello_at_a_higher_rung_resets_the_rung():
    s = step(to_installer(online=False, rung=2, deadline=1900.0), Connected("i1", "installer", None), 1500.0)
    assert (s.node.state, s.node.rung, s.node.attempt) == (State.INSTALLING, 0, 1)
    assert row(s)[:4] == ("to_installer", "installing", 1, 2)  # the row names the rung that worked


def test_same_boot_reconnect_while_waiting_for_the_installer_resends_the_reboot_without_climbing():
    node = replace(to_installer(), online=False, mode=None)  # the session dropped before the node rebooted
    s = step(node, Connected("b1", "system", A), 1050.0)
    assert s.node.state is State.TO_INSTALLER
    assert (s.node.rung, s.node.deadline, s.node.reboot_from) == (0, 1100.0, "b1")
    assert s.actions == (Reboot("installer", "reboot"),)
    assert s.transition is None


def test_new_boot_into_the_disk_instead_of_the_installer_climbs_one_rung():
    node = replace(to_installer(), online=False, mode=None)
    s = step(node, Connected("b2", "system", A), 1080.0)
    n = s.node
    assert n.state is State.TO_INSTALLER
    assert n.rung == 1
    assert n.deadline == 1280.0  # now + rung 1's timeout
    assert n.reboot_from == "b2"  # online: rung 1's reboot goes out at once
    assert s.actions == (Reboot("installer", "kexec"),)  # no second SetBoot above rung 0
    assert row(s) == ("to_installer", "to_installer", 0, 1, 80.0,
                      f"node booted its disk ({A}) instead of the installer; rung 1: kexec")


def test_booting_the_disk_after_the_last_rung_fails_naming_the_ladder():
    node = replace(to_installer(rung=2, deadline=1700.0), online=False, mode=None)
    s = step(node, Connected("b3", "system", A), 1200.0)
    assert s.node.state is State.FAILED
    assert s.node.deadline is None
    assert s.actions == ()
    reason = (f"node booted its disk ({A}) instead of the installer; "
              f"node did not boot into the installer after every rung of the ladder ({LADDER})")
    assert s.node.reason == reason
    assert row(s) == ("to_installer", "failed", 0, 2, 200.0, reason)


# --- installing ----------------------------------------------------------------------------------------------


def test_install_ok_points_the_boot_at_the_disk_and_reboots():
    s = step(installing(since=2000.0), Installed(B, ok=True), 2600.0)
    n = s.node
    assert n.state is State.TO_IMAGE
    assert (n.attempt, n.rung, n.deadline, n.reboot_from) == (1, 0, 2700.0, "i1")
    assert s.actions == (SetBoot("disk"), Reboot("disk", "reboot"))
    assert row(s) == ("installing", "to_image", 1, 0, 600.0, f"{B} written and verified; rung 0: reboot")


def test_install_report_for_another_image_is_ignored():
    node = installing()
    assert step(node, Installed(C, ok=True), 2500.0) == Step(node)
    assert step(node, Installed(C, ok=False, reason="x", retry=False), 2500.0) == Step(node)


def test_install_failure_with_retry_under_the_limit_sends_the_install_again():
    s = step(installing(attempt=1, since=2000.0), Installed(B, ok=False, reason="disk error", retry=True), 2300.0)
    n = s.node
    assert n.state is State.INSTALLING
    assert (n.attempt, n.deadline) == (2, 3300.0)
    assert n.since == 2000.0  # same state: since does not move
    assert s.actions == (SendInstall(B, attempt=2),)
    assert row(s) == ("installing", "installing", 2, 0, 300.0, "install failed (disk error); trying again")


def test_install_failure_with_retry_at_the_limit_fails():
    s = step(installing(attempt=2), Installed(B, ok=False, reason="disk error", retry=True), 2300.0)
    assert s.node.state is State.FAILED
    assert s.node.reason == f"install of {B} failed after 2 attempt(s): disk error"
    assert s.node.deadline is None
    assert s.actions == ()
    assert row(s) == ("installing", "failed", 2, 0, 300.0, s.node.reason)


def test_install_failure_without_retry_fails_with_the_reason():
    s = step(installing(attempt=1), Installed(B, ok=False, reason="sha256 mismatch", retry=False), 2100.0)
    assert s.node.state is State.FAILED
    assert s.node.reason == f"install of {B} failed after 1 attempt(s): sha256 mismatch"
    assert s.actions == ()


def test_tick_before_the_install_deadline_does_nothing():
    node = installing(deadline=3000.0)
    assert step(node, Tick(), 2999.9) == Step(node)


def test_install_timeout_with_attempts_left_sends_the_install_again():
    s = step(installing(attempt=1, deadline=3000.0, since=2000.0), Tick(), 3000.0)  # exactly at the deadline
    assert s.node.state is State.INSTALLING
    assert (s.node.attempt, s.node.deadline) == (2, 4000.0)
    assert s.actions == (SendInstall(B, attempt=2),)
    assert row(s) == ("installing", "installing", 2, 0, 1000.0, "install did not finish within 1000s")


def test_install_timeout_after_the_last_attempt_fails():
    s = step(installing(attempt=2, deadline=3000.0, since=2000.0), Tick(), 3001.0)
    assert s.node.state is State.FAILED
    assert s.node.reason == f"install of {B} did not finish within 1000s (2 attempt(s))"
    assert s.actions == ()
    assert row(s) == ("installing", "failed", 2, 0, 1001.0, s.node.reason)


def test_install_timeout_of_an_offline_installer_fails_even_with_attempts_left():
    s = step(installing(attempt=1, online=False), Tick(), 3000.0)
    assert s.node.state is State.FAILED
    assert s.node.reason == f"install of {B} did not finish within 1000s (1 attempt(s))"
    assert s.actions == ()


def test_installer_refusing_the_install_fails_the_node():
    s = step(installing(), RungFailed("installer refused the install: no space"), 2100.0)
    assert s.node.state is State.FAILED
    assert s.node.reason == f"the installer refused to install {B}: installer refused the install: no space"


def test_installer_reconnecting_from_the_same_boot_gets_the_install_again_as_the_same_attempt():
    node = replace(installing(attempt=1, boot="i1"), online=False, mode=None)
    s = step(node, Connected("i1", "installer", None), 2500.0)
    assert s.node.state is State.INSTALLING
    assert (s.node.attempt, s.node.deadline) == (1, 3000.0)  # a flapping session does not move the deadline
    assert s.actions == (SendInstall(B),)
    assert s.transition is None


def test_installer_reconnecting_with_its_install_still_running_is_not_sent_it_again():
    node = replace(installing(attempt=1, boot="i1"), online=False, mode=None)
    s = step(node, Connected("i1", "installer", None, InstallReport(B, "running", 1)), 2500.0)
    assert (s.node.state, s.node.online, s.node.attempt) == (State.INSTALLING, True, 1)
    assert s.actions == ()  # never a second install over the one that is writing


def test_installer_reconnecting_after_its_install_finished_is_read_not_sent_the_install_again():
    """cidd restarted (or the link dropped) while the install ended: the hello's report is the result."""
    node = replace(installing(attempt=1, boot="i1"), online=False, mode=None)
    s = step(node, Connected("i1", "installer", None, InstallReport(B, "ok", 1)), 2500.0)
    assert s.node.state is State.TO_IMAGE
    assert not any(isinstance(a, SendInstall) for a in s.actions)
    failed = step(node, Connected("i1", "installer", None, InstallReport(B, "failed", 1, "disk error", True)),
                  2500.0)
    assert (failed.node.state, failed.node.attempt) == (State.INSTALLING, 2)
    assert failed.actions == (SendInstall(B, attempt=2),)  # a new attempt, because the result was read


def test_installer_reporting_an_older_attempt_or_another_image_gets_the_current_attempt():
    node = replace(installing(attempt=2, boot="i1"), online=False, mode=None)
    older = step(node, Connected("i1", "installer", None, InstallReport(B, "failed", 1, "x", True)), 2500.0)
    assert older.actions == (SendInstall(B, attempt=2),) and older.node.attempt == 2
    other = step(node, Connected("i1", "installer", None, InstallReport("other-1-1", "ok", 2)), 2500.0)
    assert other.actions == (SendInstall(B, attempt=2),)


def test_a_late_installed_event_of_an_earlier_attempt_is_ignored():
    node = installing(attempt=2)
    s = step(node, Installed(B, ok=False, reason="disk error", retry=True, attempt=1), 2500.0)
    assert s == Step(node)


def test_installer_reconnecting_from_a_new_boot_counts_a_new_attempt():
    node = replace(installing(attempt=1, boot="i1"), online=False, mode=None)
    s = step(node, Connected("i2", "installer", None), 2500.0)
    assert (s.node.state, s.node.attempt, s.node.boot_id, s.node.deadline) == (State.INSTALLING, 2, "i2", 3500.0)
    assert s.actions == (SendInstall(B, attempt=2),)
    assert row(s) == ("installing", "installing", 2, 0, 500.0, "installer restarted")


def test_new_installer_boot_after_the_last_attempt_fails_instead_of_installing_again():
    # An installer that crashes and reboots at every attempt must not loop for ever.
    node = replace(installing(attempt=2, boot="i1"), online=False, mode=None)  # install_attempts == 2
    s = step(node, Connected("i2", "installer", None), 2500.0)
    reason = (f"installer restarted, but all 2 install attempt(s) of {B} were used; "
              "check the node's console and the image")
    assert (s.node.state, s.node.reason, s.node.deadline) == (State.FAILED, reason, None)
    assert (s.node.online, s.node.mode, s.node.boot_id) == (True, "installer", "i2")
    assert s.actions == ()
    assert row(s) == ("installing", "failed", 2, 0, 500.0, reason)


def test_an_install_that_keeps_ending_in_the_disk_stops_after_install_attempts():
    node = installing(attempt=2, boot="i1")  # install_attempts == 2: this was the last attempt
    sends = []
    for cycle in range(3):  # the installer crashes, the node boots its disk, cidd sends it back...
        s = step(node, Connected(f"b{cycle}", "system", A), 2100.0 + 100 * cycle)
        sends.extend(a for a in s.actions if isinstance(a, SendInstall))
        s = step(s.node, Connected(f"i{cycle + 2}", "installer", None), 2150.0 + 100 * cycle)
        sends.extend(a for a in s.actions if isinstance(a, SendInstall))
        node = s.node
    assert node.attempt <= POLICY.install_attempts, f"attempt {node.attempt} of {POLICY.install_attempts}"
    assert node.state is State.FAILED
    assert sends == []


def test_system_hello_while_installing_goes_back_to_waiting_for_the_installer():
    node = replace(installing(attempt=1, since=2000.0), online=False, mode=None)
    s = step(node, Connected("b5", "system", A), 2400.0)
    n = s.node
    assert n.state is State.TO_INSTALLER
    assert (n.rung, n.attempt, n.deadline, n.reboot_from) == (0, 1, 2500.0, "b5")
    assert s.actions == (SetBoot("installer"), Reboot("installer", "reboot"))
    assert row(s) == ("installing", "to_installer", 1, 0, 400.0,
                      "node left the installer before the install ended; rung 0: reboot")


# --- to_image -> ready ------------------------------------------------------------------------------------


def test_system_hello_in_the_target_image_ends_the_switch_ready():
    node = replace(to_image(since=3000.0), online=False, mode=None)
    s = step(node, Connected("b7", "system", B), 3090.0)
    n = s.node
    assert n.state is State.READY
    assert (n.image, n.target, n.deadline, n.reboot_from, n.reason) == (B, B, None, None, None)
    assert (n.online, n.mode, n.boot_id) == (True, "system", "b7")
    assert s.actions == ()
    assert s.transition == Transition(node="n1", job="j1", image=B, from_state="to_image", to_state="ready",
                                      attempt=1, rung=0, elapsed=90.0, detail=f"booted {B}")


def test_wrong_image_booted_fails_naming_both_images():
    node = replace(to_image(), online=False, mode=None)
    s = step(node, Connected("b7", "system", C), 3050.0)
    assert s.node.state is State.FAILED
    assert s.node.image == C
    assert s.node.reason == (f"node booted image {C} instead of {B}; "
                             "check its boot order and the installed boot loader")
    assert s.actions == ()
    assert row(s)[:4] == ("to_image", "failed", 1, 0)


def test_booting_a_system_without_marker_fails_as_unknown_image():
    node = replace(to_image(), online=False, mode=None)
    s = step(node, Connected("b7", "system", None), 3050.0)
    assert s.node.state is State.FAILED
    assert s.node.reason.startswith(f"node booted image unknown instead of {B}")


def test_same_boot_reconnect_while_waiting_for_the_image_resends_the_disk_reboot():
    node = replace(to_image(rung=1, deadline=3300.0), online=False, mode=None)
    s = step(node, Connected("i1", "installer", None), 3050.0)
    assert s.node.state is State.TO_IMAGE
    assert (s.node.rung, s.node.deadline, s.node.reboot_from) == (1, 3300.0, "i1")
    assert s.actions == (Reboot("disk", "kexec"),)  # the current rung's method
    assert s.transition is None


def test_new_installer_boot_instead_of_the_disk_climbs():
    node = replace(to_image(), online=False, mode=None)
    s = step(node, Connected("i2", "installer", None), 3050.0)
    assert s.node.state is State.TO_IMAGE
    assert (s.node.rung, s.node.deadline, s.node.reboot_from) == (1, 3250.0, "i2")
    assert s.actions == (Reboot("disk", "kexec"),)
    assert row(s) == ("to_image", "to_image", 1, 1, 50.0,
                      "node booted the installer again instead of its disk; rung 1: kexec")


def test_wrong_image_before_any_reboot_was_sent_gets_the_reboot_instead_of_failing():
    # After climbing while offline the rung's reboot is still to be sent: the first hello gets it.
    node = replace(to_image(rung=1, reboot_from=None, deadline=3300.0), online=False, mode=None)
    s = step(node, Connected("b8", "system", C), 3150.0)
    assert s.node.state is State.TO_IMAGE
    assert s.actions == (Reboot("disk", "kexec"),)
    assert s.node.reboot_from == "b8"


# --- the ladder ---------------------------------------------------------------------------------------------


def test_every_rung_of_the_installer_ladder_on_timeout_then_failed():
    node = step(ready(A, boot="b1"), Switch(B, "j1"), 1000.0).node
    node = step(node, Disconnected(), 1001.0).node  # the node went down and never came back
    assert step(node, Tick(), 1099.0) == Step(node)  # before the deadline nothing happens

    s1 = step(node, Tick(), 1100.0)
    assert (s1.node.state, s1.node.rung, s1.node.deadline, s1.node.reboot_from) == (State.TO_INSTALLER, 1, 1300.0,
                                                                                   None)
    assert s1.actions == (PowerOn("installer"),)  # kexec needs the agent: sent when it connects
    assert row(s1) == ("to_installer", "to_installer", 0, 1, 100.0,
                       "no answer 100s after rung 0 (reboot); rung 1: kexec when the agent connects")

    assert step(s1.node, Tick(), 1299.0) == Step(s1.node)
    s2 = step(s1.node, Tick(), 1300.0)
    assert (s2.node.rung, s2.node.deadline) == (2, 1700.0)
    assert row(s2) == ("to_installer", "to_installer", 0, 2, 300.0,
                       "no answer 200s after rung 1 (kexec); rung 2: reboot when the agent connects")

    s3 = step(s2.node, Tick(), 1700.0)
    reason = ("no answer 400s after rung 2 (reboot); "
              f"node did not boot into the installer after every rung of the ladder ({LADDER})")
    assert s3.node.state is State.FAILED
    assert (s3.node.reason, s3.node.deadline) == (reason, None)
    assert s3.actions == ()
    assert row(s3) == ("to_installer", "failed", 0, 2, 700.0, reason)


def test_every_rung_of_the_image_ladder_on_timeout_with_the_agent_online():
    node = to_image(deadline=3100.0, since=3000.0)  # online: the installer never rebooted
    s1 = step(node, Tick(), 3100.0)
    assert (s1.node.rung, s1.node.deadline, s1.node.reboot_from) == (1, 3300.0, "i1")
    assert s1.actions == (Reboot("disk", "kexec"),)
    assert row(s1) == ("to_image", "to_image", 1, 1, 100.0, "no answer 100s after rung 0 (reboot); rung 1: kexec")
    s2 = step(s1.node, Tick(), 3300.0)
    assert (s2.node.rung, s2.node.deadline) == (2, 3700.0)
    assert s2.actions == (Reboot("disk", "reboot"),)
    s3 = step(s2.node, Tick(), 3750.0)
    assert s3.node.state is State.FAILED
    assert s3.node.reason == ("no answer 400s after rung 2 (reboot); "
                              f"node did not boot into image {B} after every rung of the ladder ({LADDER})")
    assert row(s3)[:5] == ("to_image", "failed", 1, 2, 750.0)


def test_climbing_while_offline_sends_that_rung_s_reboot_on_connect():
    node = step(to_installer(online=False), Tick(), 1100.0).node
    s = step(node, Connected("b1", "system", A), 1150.0)  # even from the same boot: nothing was sent at rung 1
    assert s.actions == (Reboot("installer", "kexec"),)
    assert (s.node.rung, s.node.reboot_from) == (1, "b1")


def test_rung_failed_climbs_the_ladder():
    s = step(to_installer(), RungFailed("agent refused kexec into installer: unsupported"), 1010.0)
    assert (s.node.state, s.node.rung, s.node.deadline) == (State.TO_INSTALLER, 1, 1210.0)
    assert s.actions == (Reboot("installer", "kexec"),)
    assert row(s) == ("to_installer", "to_installer", 0, 1, 10.0,
                      "agent refused kexec into installer: unsupported; rung 1: kexec")


def test_rung_failed_on_the_last_rung_fails():
    s = step(to_image(rung=2, deadline=3500.0), RungFailed("no answer"), 3200.0)
    assert s.node.state is State.FAILED
    assert s.node.reason == f"no answer; node did not boot into image {B} after every rung of the ladder ({LADDER})"


def test_a_power_rung_is_sent_without_a_session_and_not_resent_on_connect():
    policy = Policy(ladder=(Rung("ipmi-cycle", 50.0),), install_timeout=100.0, install_attempts=1)
    s = step(offline(A), Switch(B, "j1"), 10.0, policy)
    assert s.actions == (SetBoot("installer"), Reboot("installer", "ipmi-cycle"))
    assert (s.node.reboot_from, s.node.deadline) == ("b0", 60.0)
    s2 = step(s.node, Connected("b0", "system", A), 20.0, policy)
    assert s2.actions == ()  # the power cycle is under way; wait for it
    assert s2.node.state is State.TO_INSTALLER


# --- disconnects and restarts ------------------------------------------------------------------------------


@pytest.mark.parametrize("node", [to_installer(), installing(), to_image()],
                         ids=["to_installer", "installing", "to_image"])
def test_disconnect_during_a_switch_keeps_the_switching_state_and_deadline(node):
    s = step(node, Disconnected(), 1050.0)
    assert s.node == replace(node, online=False, mode=None)
    assert s.actions == ()
    assert s.transition is None


@pytest.mark.parametrize("node", [ready(), in_installer()], ids=["ready", "in_installer"])
def test_restore_collapses_live_only_states_to_offline(node):
    restored = restore(node)
    assert restored == replace(node, state=State.OFFLINE, online=False, mode=None)


@pytest.mark.parametrize("node", [to_installer(), installing(), to_image()],
                         ids=["to_installer", "installing", "to_image"])
def test_restore_keeps_switching_states_with_their_deadlines(node):
    restored = restore(node)
    assert restored.state is node.state
    assert (restored.deadline, restored.rung, restored.attempt, restored.reboot_from, restored.target) == (
        node.deadline, node.rung, node.attempt, node.reboot_from, node.target)
    assert (restored.online, restored.mode) == (False, None)


def test_restore_keeps_failed_with_its_reason():
    restored = restore(failed(online=True, mode="system"))
    assert (restored.state, restored.reason, restored.online) == (State.FAILED, "it broke", False)


def test_after_a_restart_the_same_boot_gets_the_journaled_reboot():
    # cidd persisted "reboot sent from b1", then died before the command left: the same boot must get it.
    restored = restore(to_installer())
    s = step(restored, Connected("b1", "system", A), 1020.0)
    assert s.actions == (Reboot("installer", "reboot"),)
    assert (s.node.state, s.node.rung) == (State.TO_INSTALLER, 0)


def test_restored_switch_past_its_deadline_climbs_on_the_first_tick():
    restored = restore(to_installer(deadline=1100.0))
    s = step(restored, Tick(), 5000.0)
    assert (s.node.rung, s.node.deadline) == (1, 5200.0)


def test_a_restart_gives_waiting_nodes_a_grace_before_a_passed_deadline_climbs():
    """cidd was down while the node did what it was told: its agent gets time to reconnect and say so."""
    restored = restore(to_installer(deadline=1100.0), now=5000.0, grace=90.0)
    assert restored.deadline == 5090.0
    assert step(restored, Tick(), 5000.0) == Step(restored)  # no climb at once
    assert step(restored, Connected("i9", "installer", None), 5010.0).node.state is State.INSTALLING
    assert restore(to_installer(deadline=9000.0), now=5000.0, grace=90.0).deadline == 9000.0  # later: kept
    assert restore(failed(), now=5000.0, grace=90.0).deadline is None


# --- failed ---------------------------------------------------------------------------------------------------


def test_failed_node_stays_failed_when_its_agent_connects():
    node = failed()
    s = step(node, Connected("b10", "system", C), 900.0)
    assert s.node.state is State.FAILED
    assert (s.node.reason, s.node.online, s.node.image, s.node.boot_id) == ("it broke", True, C, "b10")
    assert s.actions == ()
    assert s.transition is None
    s2 = step(s.node, Disconnected(), 901.0)
    assert (s2.node.state, s2.node.online, s2.transition) == (State.FAILED, False, None)


def test_switch_restarts_a_failed_node_with_attempt_and_rung_reset():
    s = step(failed(), Switch(C, "j2"), 1000.0)
    n = s.node
    assert n.state is State.TO_INSTALLER
    assert (n.target, n.job, n.attempt, n.rung, n.reason, n.deadline) == (C, "j2", 0, 0, None, 1100.0)
    assert s.actions == (SetBoot("installer"), PowerOn("installer"))
    assert row(s) == ("failed", "to_installer", 0, 0, 500.0,
                      f"switch to {C} for job j2; rung 0: reboot when the agent connects")


def test_failed_node_sitting_in_the_installer_goes_straight_to_installing():
    s = step(failed(online=True, mode="installer"), Switch(B, "j3"), 1000.0)
    assert s.node.state is State.INSTALLING
    assert (s.node.attempt, s.node.rung, s.node.job, s.node.reason) == (1, 0, "j3", None)
    assert s.actions == (SendInstall(B),)
    assert row(s)[:4] == ("failed", "installing", 1, 0)


def test_failed_node_already_running_the_requested_image_is_ready_without_reboot():
    node = failed(online=True, mode="system", image=B)  # e.g. it came up in B after the ladder gave up
    s = step(node, Switch(B, "j2"), 1000.0)
    n = s.node
    assert (n.state, n.image, n.target, n.job, n.attempt, n.rung) == (State.READY, B, B, "j2", 0, 0)
    assert (n.reason, n.deadline, n.reboot_from) == (None, None, None)
    assert s.actions == ()
    assert row(s) == ("failed", "ready", 0, 0, 500.0, f"already runs {B}")


@pytest.mark.parametrize("online, mode", [(False, None), (True, "installer")], ids=["offline", "in-installer"])
def test_failed_node_last_seen_in_the_image_but_not_running_it_now_is_switched(online, mode):
    node = failed(online=online, mode=mode, image=B)
    s = step(node, Switch(B, "j2"), 1000.0)
    assert s.node.state in SWITCHING
    assert s.actions[0] in (SetBoot("installer"), SendInstall(B))


# --- one full walk, as the engine would drive it ------------------------------------------------------------


def test_a_whole_switch_writes_one_history_row_per_step():
    events = [
        (0.0, Connected("b1", "system", A)),
        (10.0, Switch(B, "j1")),
        (11.0, Disconnected()),
        (40.0, Connected("i1", "installer", None)),
        (500.0, Installed(B, ok=True)),
        (501.0, Disconnected()),
        (560.0, Connected("b2", "system", B)),
    ]
    node = Node("n1")
    rows, actions = [], []
    for now, event in events:
        s = step(node, event, now)
        node = s.node
        actions.extend(s.actions)
        if s.transition:
            rows.append((s.transition.from_state, s.transition.to_state, s.transition.elapsed))
    assert rows == [
        ("offline", "ready", 0.0),
        ("ready", "to_installer", 10.0),
        ("to_installer", "installing", 30.0),
        ("installing", "to_image", 460.0),
        ("to_image", "ready", 60.0),
    ]
    assert actions == [SetBoot("installer"), Reboot("installer", "reboot"), SendInstall(B), SetBoot("disk"),
                       Reboot("disk", "reboot")]
    assert (node.state, node.image, node.deadline) == (State.READY, B, None)
    assert node.state not in SWITCHING


def test_a_late_failure_of_a_step_the_node_left_is_ignored():
    node = installing(attempt=1, boot="i1")
    late = RungFailed("power cycle failed: BMC of n1 did not answer", "to_installer", 1)
    assert step(node, late, 2000.0) == Step(node)  # the node reached the installer by another way
    waiting = to_installer(online=False, rung=1, deadline=1900.0)
    assert step(waiting, RungFailed("agent refused reboot", "to_installer", 0), 1500.0) == Step(waiting)
    climbed = step(waiting, RungFailed("power cycle failed", "to_installer", 1), 1500.0)
    assert (climbed.node.state, climbed.node.rung) == (State.TO_INSTALLER, 2)  # the current rung's failure counts


# -- SetDeadline: the engine's reboot window (queued: no deadline; issued: the rung's timeout from then) ---------

def test_set_deadline_none_queues_the_reboot_without_a_deadline_and_writes_no_row():
    node = to_installer(rung=1, deadline=1100.0)
    s = step(node, SetDeadline("to_installer", 1, None), 1050.0)
    assert s.node == replace(node, deadline=None)
    assert s.actions == () and s.transition is None
    assert step(s.node, Tick(), 99999.0) == Step(s.node)  # no deadline: a tick never climbs a queued reboot


def test_set_deadline_when_the_reboot_is_issued_starts_the_rung_timeout_then():
    queued = replace(to_image(rung=0), deadline=None)
    s = step(queued, SetDeadline("to_image", 0, 5000.0), 4000.0)
    assert s.node.deadline == 5000.0 and s.transition is None and s.actions == ()
    assert step(s.node, Tick(), 4999.0).node.deadline == 5000.0
    assert step(s.node, Tick(), 5000.0).node.rung == 1  # the deadline counts again: the ladder climbs


@pytest.mark.parametrize("event", [
    SetDeadline("to_installer", 0, 9999.0),  # the node is at rung 1 now
    SetDeadline("to_image", 1, 9999.0),  # the node is in another state
])
def test_set_deadline_for_a_step_the_node_has_left_changes_nothing(event):
    node = to_installer(rung=1)
    assert step(node, event, 1050.0) == Step(node)


def test_set_deadline_outside_the_reboot_states_changes_nothing():
    for node in (installing(), Node("n1", state=State.READY, image=A, online=True, mode="system")):
        assert step(node, SetDeadline(node.state.value, 0, None), 1050.0) == Step(node)


def test_a_node_that_boots_its_disk_with_the_target_after_an_unreported_install_is_ready():
    """The installer finished (the marker is written only once verified) while cidd was down, and the node
    then booted its disk: it runs the target, so it is ready, not sent back to install it again."""
    node = replace(installing(attempt=1, boot="i1"), online=False, mode=None)
    s = step(node, Connected("b7", "system", B), 2500.0)
    assert s.node.state is State.READY and s.node.image == B and s.actions == ()
    other = step(node, Connected("b7", "system", A), 2500.0)  # its old image: the install did not end
    assert other.node.state is State.TO_INSTALLER


# --- Cancel: the capture that asked for the switch was cancelled (cidcapt --cancel) ----------------------------

CANCEL = Cancel("j1", "bob")


def cancel_row(s: Step) -> tuple:
    """Return (job, image, from, to, attempt, rung, elapsed) of a cancel's history row."""
    t = s.transition
    assert t is not None, "expected a history row"
    return (t.job, t.image, t.from_state, t.to_state, t.attempt, t.rung, t.elapsed)


def test_cancel_of_a_node_whose_reboot_waits_for_the_window_leaves_it_ready_in_its_image_untouched():
    queued = replace(to_installer(), deadline=None)  # SetDeadline(None): the reboot is queued, not issued
    s = step(queued, CANCEL, 1030.0)
    assert (s.node.state, s.node.image, s.node.deadline, s.node.reboot_from) == (State.READY, A, None, None)
    assert s.node.since == 1030.0 and s.node.state not in SWITCHING
    assert s.actions == (SetBoot("disk"),)  # no reboot: the node was never told anything
    assert cancel_row(s) == ("j1", B, "to_installer", CANCELLED, 0, 0, 30.0)
    assert s.transition.detail == f"cancelled by bob: the node was not rebooted yet; it stays ready in {A}"


def test_cancel_of_an_offline_node_whose_reboot_was_never_sent_leaves_it_offline_with_the_disk_as_next_boot():
    waiting = to_installer(online=False, reboot_from=None)
    s = step(waiting, CANCEL, 1010.0)
    assert (s.node.state, s.node.image, s.node.deadline) == (State.OFFLINE, A, None)
    assert s.actions == (SetBoot("disk"),)
    assert s.transition.detail == "cancelled by bob: the node was not rebooted yet; it stays offline, next boot " \
                                  "from its disk"
    again = step(s.node, Connected("b0", "system", A), 1020.0)  # its agent comes back: nothing to do, ready
    assert again.node.state is State.READY and again.actions == ()


def test_cancel_of_a_node_on_its_way_to_the_installer_sends_it_back_to_its_image_at_its_next_hello():
    rebooting = to_installer(online=False)  # the reboot into the installer was issued from boot b1
    s = step(rebooting, Cancel("j7", "bob"), 1040.0)
    node = s.node
    assert (node.state, node.target, node.job, node.rung, node.attempt) == (State.TO_IMAGE, A, "j7", 0, 0)
    assert (node.deadline, node.reboot_from, node.since) == (1140.0, None, 1040.0)
    assert s.actions == (SetBoot("disk"),)  # the reboot into the disk goes to the agent's next hello
    assert cancel_row(s) == ("j7", B, "to_installer", CANCELLED, 0, 0, 40.0)
    assert s.transition.detail == (f"cancelled by bob: nothing written yet; the node goes back to {A} on its disk; "
                                   "rung 0: reboot when the agent connects")
    # the installer says hello (a new boot): it is told to boot its disk, at rung 0, no climb and no row
    installer = step(node, Connected("i9", "installer", None), 1050.0)
    assert installer.actions == (Reboot("disk", "reboot"),) and installer.transition is None
    assert (installer.node.state, installer.node.rung, installer.node.reboot_from) == (State.TO_IMAGE, 0, "i9")
    back = step(installer.node, Connected("b2", "system", A), 1060.0)
    assert (back.node.state, back.node.image) == (State.READY, A)
    assert row(back)[:2] == ("to_image", "ready") and row(back)[5] == f"booted {A}"


def test_cancel_of_a_node_that_climbed_the_ladder_sends_it_back_too():
    climbed = to_installer(rung=1, deadline=1300.0)
    s = step(climbed, CANCEL, 1200.0)
    assert (s.node.state, s.node.target, s.node.rung) == (State.TO_IMAGE, A, 0)
    assert cancel_row(s)[2:6] == ("to_installer", CANCELLED, 0, 1)  # the row keeps the rung it ended


def test_cancel_with_a_power_rung_first_power_cycles_the_node_back_to_its_disk_at_once():
    policy = Policy(ladder=(Rung("power_cycle", 50.0),), install_timeout=100.0, install_attempts=1)
    s = step(to_installer(online=False), CANCEL, 1020.0, policy)
    assert s.actions == (SetBoot("disk"), Reboot("disk", "power_cycle"))
    assert (s.node.state, s.node.reboot_from, s.node.deadline) == (State.TO_IMAGE, "b1", 1070.0)


def test_cancel_of_a_node_with_no_verified_image_leaves_the_switch_with_the_disk_as_next_boot():
    unknown = replace(to_installer(online=False), image=None)
    s = step(unknown, CANCEL, 1020.0)
    assert (s.node.state, s.node.deadline) == (State.OFFLINE, None)
    assert s.actions == (SetBoot("disk"),)
    assert s.transition.to_state == CANCELLED and "never verified an image" in s.transition.detail


@pytest.mark.parametrize("node", [
    installing(),  # the installer is writing the target
    installing(online=False),
    to_image(),  # the target is written
    replace(to_installer(), attempt=1),  # an install began, then the node left the installer
], ids=["installing", "installing-offline", "to_image", "to_installer-after-an-attempt"])
def test_cancel_never_stops_a_switch_whose_disk_may_hold_part_of_the_image(node):
    s = step(node, CANCEL, 2500.0)
    assert s == Step(node)  # the switch goes on to its end: no change, no action, no row


def test_after_a_cancel_an_install_under_way_still_ends_ready_in_the_new_image():
    node = step(installing(), CANCEL, 2500.0).node
    written = step(node, Installed(B, True, attempt=1), 2600.0)
    assert written.node.state is State.TO_IMAGE and written.node.target == B
    assert step(written.node, Connected("b5", "system", B), 2700.0).node.state is State.READY


@pytest.mark.parametrize("node", [ready(), offline(), in_installer(), failed()], ids=lambda n: n.state.value)
def test_cancel_of_a_node_that_is_not_switching_changes_nothing(node):
    assert step(node, CANCEL, 5000.0) == Step(node)


def test_a_sent_back_node_is_restored_waiting_for_its_old_image_after_a_restart():
    node = step(to_installer(online=False), CANCEL, 1040.0).node
    restored = restore(node, now=1050.0, grace=90.0)
    assert (restored.state, restored.target, restored.deadline) == (State.TO_IMAGE, A, 1140.0)
