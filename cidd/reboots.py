"""The ``reboot`` request cidd sends an agent for a ladder rung: the method and what to boot. Pure logic.

- ``kexec`` into the installer: the installer kernel and initramfs URLs (``/boot/files/...``) and the same
  command line the iPXE script carries (cidd's address, the node, its single-use boot token).
- ``kexec`` into the disk: the image's own kernel is not published yet (it comes with the "image's own kernel"
  boot decision), so cidd asks for an ordinary ``reboot`` and says so in the log; the profile then boots the
  disk. Likewise ``kexec`` without installer files configured.
- ``grub_reboot`` / ``efi_bootnext``: the entry of the node group's ``boot_entries`` for the boot.
"""

from __future__ import annotations

from typing import Any

from cidd.boot import kernel_args
from cidd.config import Config
from cidd.machine_types import NEXT_BOOT_METHODS, Policy


def reboot_message(config: Config, policy: Policy, node: str, boot: str, method: str,
                   token: str | None) -> tuple[dict[str, Any], str | None]:
    """Return (the ``reboot`` request for ``node``, a note when ``method`` was replaced by ``reboot``).

    ``token`` is the node's installer boot token (None when it has none).
    """
    message: dict[str, Any] = {"type": "reboot", "boot": boot, "method": method}
    if method == "kexec":
        files = config.boot.kernel is not None and config.boot.initrd is not None
        if boot != "installer" or not files:
            message["method"] = "reboot"
            why = ("no kernel of the image is published for kexec into the disk" if boot != "installer"
                   else "no installer kernel/initrd configured (boot.kernel, boot.initrd)")
            return message, f"kexec replaced by reboot: {why}"
        base = config.http_base
        message.update(kernel=f"{base}/boot/files/vmlinuz", initrd=f"{base}/boot/files/initrd.img",
                       cmdline=kernel_args(node, config.agent_address, token, config.boot.cmdline))
    elif method in NEXT_BOOT_METHODS:
        message["entry"] = policy.boot_entries[boot]
    return message, None
