"""The ``reboot`` request cidd sends an agent for a ladder rung: the method and what to boot. Pure logic.

- ``kexec`` into the installer: the installer kernel and initramfs URLs (``/boot/files/...``) and the same
  command line the iPXE script carries (cidd's address, the node, its single-use boot token).
- ``kexec`` into the disk: the installed image's own kernel and initrd (``/boot/images/<id>/...``, stored by
  cid-mkimg) and the kernel arguments its iPXE script carries (root on the local disk). An image without
  published boot files cannot be kexec'd: cidd asks for an ordinary ``reboot`` and says so in the log.
  Likewise ``kexec`` into the installer without installer files configured.
- ``grub_reboot`` / ``efi_bootnext``: the entry of the node group's ``boot_entries`` for the boot.
"""

from __future__ import annotations

from typing import Any

from cidd.config import Config
from cidd.core.boot import ImageBoot, image_args, kernel_args
from cidd.core.machine_types import NEXT_BOOT_METHODS, Policy


def reboot_message(config: Config, policy: Policy, node: str, boot: str, method: str,
                   token: str | None, image: ImageBoot | None = None) -> tuple[dict[str, Any], str | None]:
    """Return (the ``reboot`` request for ``node``, a note when ``method`` was replaced by ``reboot``).

    ``token`` is the node's installer boot token (None when it has none); ``image`` is how the image the node
    boots next is booted (None when cidd holds no kernel for it).
    """
    message: dict[str, Any] = {"type": "reboot", "boot": boot, "method": method}
    if method == "kexec" and boot != "installer":
        if image is None:
            message["method"] = "reboot"
            return message, "kexec replaced by reboot: no kernel of the image is published (cid-mkimg --kernel)"
        message.update(kernel=image.kernel_url, initrd=image.initrd_url,
                       cmdline=image_args(node, config.agent_address, image))
    elif method == "kexec":
        if config.boot.kernel is None or config.boot.initrd is None:
            message["method"] = "reboot"
            return message, "kexec replaced by reboot: no installer kernel/initrd configured (boot.kernel, boot.initrd)"
        base = config.http_base
        message.update(kernel=f"{base}/boot/files/vmlinuz", initrd=f"{base}/boot/files/initrd.img",
                       cmdline=kernel_args(node, config.agent_address, token, config.boot.cmdline))
    elif method in NEXT_BOOT_METHODS:
        message["entry"] = policy.boot_entries[boot]
    return message, None
