"""Agent-side reboot methods: what cidd asks for (``RebootSpec``) and the commands each method runs. Pure logic.

A ``reboot`` request names a ``method`` (one rung of the node group's ladder, chosen in cidd.yaml):

- ``reboot``: an ordinary reboot; with netboot, cidd's boot profile decides what comes up.
- ``kexec``: load the kernel and initramfs cidd names (URLs, fetched first) with its command line, then jump
  into it without a firmware POST (``systemctl kexec`` on an installed system, ``kexec -e`` in the installer).
- ``grub_reboot``: ``grub-reboot ENTRY`` (the next boot only), then reboot: for sites without netboot.
- ``efi_bootnext``: ``efibootmgr --bootnext NUM`` (the next boot only), then reboot.

``plan`` returns the stages as argv tuples; ``cidkid.platform.LinuxPlatform`` runs them. Tests check the argv.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cidcommon.errors import BadRequest
from cidcommon.wire import Message, get_str

#: Methods a real node's agent can carry out.
REBOOT_METHODS = frozenset({"reboot", "kexec", "grub_reboot", "efi_bootnext"})
#: Methods that set the firmware's or the boot loader's next boot, then reboot; they need an ``entry``.
NEXT_BOOT_METHODS = frozenset({"grub_reboot", "efi_bootnext"})
_EFI_ENTRY = re.compile(r"^[0-9A-Fa-f]{1,4}$")
_TOKEN = re.compile(r"(cid\.token=)\S+")


def redact(text: str) -> str:
    """Return ``text`` with the value of every ``cid.token=`` (the installer's boot token) replaced by ``***``."""
    return _TOKEN.sub(r"\1***", text)


@dataclass(frozen=True)
class RebootSpec:
    """What to boot: kexec's kernel/initramfs URLs and command line, or the next-boot entry."""

    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""
    entry: str | None = None


@dataclass(frozen=True)
class Stage:
    """One step of a reboot: ``commands`` are tried in turn until one exits 0; if none does, the reboot stops."""

    what: str
    commands: tuple[tuple[str, ...], ...]


def parse_spec(method: str, message: Message) -> RebootSpec:
    """Return the RebootSpec of a ``reboot`` request for ``method``.

    Raises BadRequest when the request lacks what the method needs (kexec: ``kernel``; next-boot methods: an
    ``entry``, for efi_bootnext a hexadecimal boot number).
    """
    spec = RebootSpec(kernel=get_str(message, "kernel", required=False),
                      initrd=get_str(message, "initrd", required=False),
                      cmdline=str(get_str(message, "cmdline", required=False, default="")),
                      entry=get_str(message, "entry", required=False))
    if method == "kexec" and not spec.kernel:
        raise BadRequest("a kexec reboot needs 'kernel' (and usually 'initrd', 'cmdline'): the URLs of what to "
                         "boot; check the boot section of cidd.yaml")
    if method in NEXT_BOOT_METHODS and not spec.entry:
        raise BadRequest(f"a {method} reboot needs 'entry' (the boot entry to use once); set boot_entries in "
                         "the node group of cidd.yaml")
    if method == "efi_bootnext" and not _EFI_ENTRY.match(spec.entry or ""):
        raise BadRequest(f"efi_bootnext needs a hexadecimal EFI boot number like 0003, not {spec.entry!r}; "
                         "see 'efibootmgr' on the node for its entries")
    return spec


def plan(method: str, spec: RebootSpec, *, mode: str, reboot_commands: tuple[tuple[str, ...], ...],
         kernel_path: Path | None = None, initrd_path: Path | None = None,
         grub_boot_dir: Path | None = None) -> tuple[Stage, ...]:
    """Return the stages that reboot a node with ``method`` (``mode``: "system" or "installer").

    ``reboot_commands`` are the ordinary reboot commands (the last stage of every method but kexec);
    ``kernel_path``/``initrd_path`` are where kexec's files were fetched; ``grub_boot_dir`` is given to
    grub-reboot as ``--boot-directory`` (default: grub's own, /boot). Raises BadRequest for an unknown method
    or a missing part of ``spec``.
    """
    reboot = Stage("reboot", reboot_commands)
    if method == "reboot":
        return (reboot,)
    if method == "kexec":
        if kernel_path is None:
            raise BadRequest("kexec needs the kernel file")
        load = ["kexec", "-l", str(kernel_path)]
        if initrd_path is not None:
            load.append(f"--initrd={initrd_path}")
        load.append(f"--command-line={spec.cmdline}")
        # An installed system shuts down cleanly first (systemd runs the loaded kernel); the installer has
        # nothing to save and jumps at once.
        jump = (("systemctl", "kexec"), ("kexec", "-e")) if mode == "system" else (("kexec", "-e"),)
        return (Stage("kexec load", (tuple(load),)), Stage("kexec exec", jump))
    if method == "grub_reboot":
        argv = ["grub-reboot"]
        if grub_boot_dir is not None:
            argv.append(f"--boot-directory={grub_boot_dir}")
        argv.append(str(spec.entry))
        return (Stage("grub next entry", (tuple(argv),)), reboot)
    if method == "efi_bootnext":
        return (Stage("EFI BootNext", (("efibootmgr", "--bootnext", str(spec.entry)),)), reboot)
    raise BadRequest(f"unknown reboot method {method!r} (known: {', '.join(sorted(REBOOT_METHODS))})")
