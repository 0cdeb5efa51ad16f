"""The closed sets of words the programs exchange (docs/protocol.md, docs/state-machine.md), as enums.

They are ``StrEnum``: a member is its wire string (``Mode.INSTALLER == "installer"``), so JSON, SQLite and the
configuration carry them unchanged, while the code names them instead of spelling strings.
"""

from __future__ import annotations

from enum import StrEnum


class Mode(StrEnum):
    """What an agent runs: its installed system, or the installer initramfs."""

    SYSTEM = "system"
    INSTALLER = "installer"


class BootTarget(StrEnum):
    """What a node boots next: the installer, or its disk (the installed image)."""

    INSTALLER = "installer"
    DISK = "disk"


class RebootMethod(StrEnum):
    """How a rung of the escalation ladder makes a node boot (docs/boot.md, docs/power.md)."""

    REBOOT = "reboot"  # the agent runs the node's reboot command
    KEXEC = "kexec"  # the agent loads the kernel cidd names and jumps into it
    GRUB_REBOOT = "grub_reboot"  # the agent sets grub's next entry, then reboots
    EFI_BOOTNEXT = "efi_bootnext"  # the agent sets EFI BootNext, then reboots
    POWER_CYCLE = "power_cycle"  # cidd power-cycles the node through its BMC (network boot next)
    REDFISH_BOOT_INSTALLER = "redfish_boot_installer"  # cidd sets a one-time boot through Redfish, then resets
