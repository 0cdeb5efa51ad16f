"""Boot profiles and installer boot tokens: what each node boots next, and proof for its installer.

The engine calls ``set_boot`` when the state machine emits ``SetBoot``; the profile is stored in SQLite
(surviving restarts), served as iPXE by cidd.boot_http and written as pxelinux files when a TFTP directory is
configured. Installer profiles carry a single-use, expiring boot token (docs/security.md).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import structlog
from twisted.internet.interfaces import IReactorTime

from cidcatalog.catalog import Catalog
from cidcommon.errors import AuthError
from cidcommon.paths import tokens_equal
from cidd.config import Config, ConfigError
from cidd.core.boot import ImageBoot, macs_of, parse_ethers, pxelinux_config, pxelinux_name
from cidd.store import Store

log = structlog.get_logger(__name__)


class Netboot:
    """Published boot profiles, boot tokens and resume tokens of every node."""

    def __init__(self, config: Config, store: Store, clock: IReactorTime) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.profiles: dict[str, str] = {}  # node -> "installer" | "disk", as published
        self.tokens: dict[str, tuple[str, float]] = {}  # node -> (single-use installer token, expiry)
        self.resume_tokens: dict[str, str] = {}  # node -> token an installer reconnects with after its boot token
        self.ethers: dict[str, str] = load_ethers(config)

    def load(self) -> None:
        """Read the published profiles and unused boot tokens back from the store (after a restart)."""
        for name, (boot, token, expires) in self.store.boot_profiles().items():
            self.profiles[name] = boot
            if token and expires:
                self.tokens[name] = (token, expires)

    def set_boot(self, name: str, boot: str) -> None:
        """Publish ``name``'s next boot: recorded in the store, served as iPXE, written as pxelinux files.

        An installer profile carries a new single-use boot token (docs/security.md); a disk profile
        withdraws any boot and resume token of the node.
        """
        self.resume_tokens.pop(name, None)
        self.profiles[name] = boot
        self._publish(name)
        log.info("boot.profile", node=name, boot=boot)

    def _publish(self, name: str) -> None:
        """Store ``name``'s profile with a fresh boot token (installer only) and rewrite its pxelinux files."""
        boot = self.profiles[name]
        now = self.clock.seconds()
        token, expires = None, None
        if boot == "installer":
            token, expires = secrets.token_urlsafe(24), now + self.config.boot.token_ttl
            self.tokens[name] = (token, expires)
        else:
            self.tokens.pop(name, None)
        self.store.set_boot(name, boot, now, token, expires)
        tftp = self.config.boot.tftp_dir
        if tftp is not None:
            for mac in macs_of(self.ethers, name):
                text = pxelinux_config(name, boot, "cid/vmlinuz", "cid/initrd.img", self.config.agent_address,
                                       token, self.config.boot.cmdline)
                write_atomic(tftp / "pxelinux.cfg" / pxelinux_name(mac), text)

    def accept_installer_token(self, name: str, boot_token: str | None, resume_token: str | None) -> str:
        """Check an installer's credentials; return the resume token it reconnects with from now on.

        A boot token is single-use and expires (``boot.token_ttl``); using it issues a resume token that stays
        valid while the node's profile is the installer. Raises AuthError, with a reason, otherwise.
        """
        if resume_token is not None:
            expected = self.resume_tokens.get(name)
            if expected is not None and tokens_equal(resume_token, expected):
                return expected
            raise AuthError(f"resume token of {name} is not valid (the node left the installer, or cidd "
                            "restarted); reboot the node into the installer for a new boot token")
        stored = self.tokens.get(name)
        if boot_token is None or stored is None or not tokens_equal(boot_token, stored[0]):
            raise AuthError(f"boot token of {name} is not valid: it was already used, or belongs to another "
                            "boot; reboot the node into the installer for a new one")
        if self.clock.seconds() >= stored[1]:
            raise AuthError(f"boot token of {name} expired; reboot the node into the installer for a new one")
        del self.tokens[name]
        self.store.use_boot_token(name)
        if self.profiles.get(name) == "installer":
            self._publish(name)  # the next installer boot (a crash, a power cycle) gets a token of its own
        resume = secrets.token_urlsafe(24)
        self.resume_tokens[name] = resume
        log.info("boot.token_used", node=name)
        return resume


def load_ethers(config: Config) -> dict[str, str]:
    """Return {mac: node} from the configured ethers file ({} when none). Raises EthersError or ConfigError."""
    path = config.boot.ethers
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the ethers file {path}: {exc.strerror}; check boot.ethers") from None
    return parse_ethers(text, str(path))


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def uefi_boot_uri(config: Config, node: str) -> str | None:
    """Return the URL a UEFI HTTP boot of ``node`` loads (``<http base>/boot/uefi/<node>/ipxe.efi``: the EFI
    binary, with the node's script beside it as ``autoexec.ipxe``), or None when cidd serves no EFI binary
    (``boot.uefi_binary`` unset)."""
    if config.boot.uefi_binary is None:
        return None
    return f"{config.http_base}/boot/uefi/{node}/ipxe.efi"


#: The boot files cid-mkimg stores next to an image (``<image dir>/<id>.vmlinuz``), by their URL name.
IMAGE_BOOT_FILES = {b"vmlinuz": "vmlinuz", b"initrd.img": "initrd.img"}


def image_boot(config: Config, catalog: Catalog, image_dir: Path, image_id: str | None) -> ImageBoot | None:
    """Return how nodes boot catalogued image ``image_id`` (its kernel and initrd URLs under
    ``/boot/images/<id>/`` and its kernel arguments), or None when it is not catalogued or cidd holds no
    kernel and initrd for it (the node then boots its disk's own boot loader)."""
    if not image_id or image_id not in catalog:
        return None
    if not all((image_dir / f"{image_id}.{name}").is_file() for name in IMAGE_BOOT_FILES.values()):
        return None
    base = f"{config.http_base}/boot/images/{image_id}"
    image = catalog.get(image_id)
    cmdline = image.boot.cmdline if image is not None and image.boot.cmdline else ""
    return ImageBoot(image_id, f"{base}/vmlinuz", f"{base}/initrd.img", cmdline)
