"""Inputs (events), outputs (actions) and the per-group policy of the node state machine. Pure data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cidcommon.vocabulary import BootTarget, Mode, RebootMethod

#: Ladder methods carried out by the node's agent (they need a live session).
AGENT_METHODS = frozenset({RebootMethod.REBOOT, RebootMethod.KEXEC, RebootMethod.GRUB_REBOOT,
                           RebootMethod.EFI_BOOTNEXT})
#: Agent methods that set the next boot (grub entry, EFI boot number) from the group's ``boot_entries``.
NEXT_BOOT_METHODS = frozenset({RebootMethod.GRUB_REBOOT, RebootMethod.EFI_BOOTNEXT})
#: Ladder methods carried out by cidd through the node's BMC (they work on a hung or powered-off node, and as a
#: first rung for a node whose agent is not connected). redfish_boot_installer needs a Redfish BMC.
POWER_METHODS = frozenset({RebootMethod.POWER_CYCLE, RebootMethod.REDFISH_BOOT_INSTALLER})
#: Every ladder method cidd knows.
LADDER_METHODS = frozenset(RebootMethod)


@dataclass(frozen=True)
class Rung:
    """One rung of the escalation ladder: how to make the node reboot, and how long to wait for it."""

    method: RebootMethod
    timeout: float


@dataclass(frozen=True)
class Policy:
    """Timeouts and ladder of a node group (from cidd.yaml)."""

    ladder: tuple[Rung, ...] = field(default=(Rung(RebootMethod.REBOOT, 300.0), Rung(RebootMethod.REBOOT, 600.0)))
    install_timeout: float = 3600.0
    install_attempts: int = 2
    #: seconds an installer resumes a dropped download for (None: the installer's own setting, else 300 s)
    resume_for: float | None = None
    #: {"installer": entry, "disk": entry} for grub_reboot (a grub menu entry) and efi_bootnext (a boot number)
    boot_entries: Mapping[str, str] = field(default_factory=dict, hash=False)


# --- events (inputs) ---


@dataclass(frozen=True)
class Switch:
    """A capture asks for ``image`` on the node on behalf of ``job``."""

    image: str
    job: str


@dataclass(frozen=True)
class InstallReport:
    """What an installer's hello says about the install it holds in this boot (docs/protocol.md).

    ``state`` is "running", "ok" or "failed"; ``attempt`` is cidd's attempt number the install was sent with
    (None from an agent that does not say).
    """

    image: str
    state: str
    attempt: int | None = None
    reason: str | None = None
    retry: bool = False


@dataclass(frozen=True)
class Connected:
    """An agent said hello: ``mode`` is "system" or "installer"; ``image`` is its marker (system mode);
    ``install`` what an installer holds (running or finished) in this boot."""

    boot_id: str
    mode: Mode
    image: str | None
    install: InstallReport | None = None


@dataclass(frozen=True)
class Disconnected:
    """The node's agent session closed."""


@dataclass(frozen=True)
class Installed:
    """The installer reported the end of an install (of cidd's ``attempt``, when the agent says which)."""

    image: str
    ok: bool
    reason: str | None = None
    retry: bool = False
    attempt: int | None = None


@dataclass(frozen=True)
class RungFailed:
    """A rung's command could not be carried out (the agent refused it, it timed out, the BMC failed).

    ``state`` and ``rung`` say which step the command belonged to; a failure that arrives after the node
    moved on (a BMC call timing out late) is ignored. None means "the current step".
    """

    reason: str
    state: str | None = None
    rung: int | None = None


@dataclass(frozen=True)
class SetDeadline:
    """The engine deferred (``deadline`` None: the reboot waits for a window) or issued the rung's reboot.

    Applies only while the node is still in ``state`` at ``rung``; the rung's timeout then counts from the issue.
    """

    state: str
    rung: int
    deadline: float | None


@dataclass(frozen=True)
class Tick:
    """Time passed: check the node's deadline."""


@dataclass(frozen=True)
class Cancel:
    """``by`` cancelled the capture of ``job``, and no other running capture wants the node's switch.

    The node leaves its switch where nothing of the target was written yet; otherwise the switch goes on
    (docs/state-machine.md, "Cancelling a capture").
    """

    job: str
    by: str


Event = Switch | Connected | Disconnected | Installed | RungFailed | SetDeadline | Tick | Cancel


# --- actions (outputs) ---


@dataclass(frozen=True)
class SetBoot:
    """Publish the node's next boot: the installer or the disk (boot profiles, iPXE)."""

    boot: BootTarget


@dataclass(frozen=True)
class Reboot:
    """Make the node boot ``boot`` (the installer or the disk) using ladder ``method``."""

    boot: BootTarget
    method: RebootMethod


@dataclass(frozen=True)
class SendInstall:
    """Ask the installer to write ``image``, as install attempt number ``attempt`` of the switch."""

    image: str
    attempt: int = 1


@dataclass(frozen=True)
class PowerOn:
    """The node has no agent session: power it on through its BMC if it is off (booting ``boot`` next)."""

    boot: BootTarget


Action = SetBoot | Reboot | SendInstall | PowerOn
