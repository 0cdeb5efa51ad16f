"""``/boot/...`` over HTTP: each node's iPXE script by MAC, and the installer's kernel and initramfs.

``GET /boot/<mac>`` (any MAC spelling iPXE produces: ``${net0/mac}``, ``${mac:hexhyp}``) answers the script
for the node the ethers file names; ``GET /boot/files/vmlinuz`` and ``/boot/files/initrd.img`` serve the
configured installer files; ``GET /boot/images/<id>/vmlinuz|initrd.img`` the kernel and initrd cid-mkimg
stored next to a catalogued image (``<image_dir>/<id>.vmlinuz``, ``<id>.initrd.img``), and nothing else.

UEFI HTTP boot (docs/boot.md), when ``boot.uefi_binary`` names an EFI program (iPXE's ``ipxe.efi``):
``GET /boot/uefi/ipxe.efi`` serves it, and ``/boot/uefi/autoexec.ipxe`` a script that chains to the
node's script by MAC (a recent iPXE loads ``autoexec.ipxe`` from the directory it was loaded from);
``/boot/uefi/<node>/ipxe.efi`` and ``/boot/uefi/<node>/autoexec.ipxe`` are the same binary and the node's own
script by name, the URI a Redfish ``HttpBootUri`` names (no MAC lookup, no TFTP).
"""

from __future__ import annotations

import structlog
from twisted.web.resource import NoResource, Resource
from twisted.web.server import Request
from twisted.web.static import File

from cidd.core.boot import ImageBoot, InstallerBoot, ipxe_script, normalize_mac
from cidd.engine import Engine
from cidd.images_http import image_dir_of
from cidd.netboot import IMAGE_BOOT_FILES, image_boot

#: The files of an image's boot, as served and as stored next to the image by cid-mkimg.

log = structlog.get_logger(__name__)


class BootResource(Resource):
    """``/boot``: iPXE scripts by MAC and the installer files."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine
        boot = engine.config.boot
        if boot.kernel and boot.initrd:
            files = Resource()
            files.putChild(b"vmlinuz", File(str(boot.kernel), defaultType="application/octet-stream"))
            files.putChild(b"initrd.img", File(str(boot.initrd), defaultType="application/octet-stream"))
            self.putChild(b"files", files)
        self.putChild(b"images", _ImageFiles(engine))
        if boot.uefi_binary is not None:
            self.putChild(b"uefi", _Uefi(self))

    def installer(self) -> InstallerBoot | None:
        """Return the installer's URLs, or None when no installer files are configured."""
        boot = self.engine.config.boot
        if not (boot.kernel and boot.initrd):
            return None
        base = self.engine.config.http_base
        return InstallerBoot(f"{base}/boot/files/vmlinuz", f"{base}/boot/files/initrd.img", boot.cmdline)

    def image_boot(self, image_id: str | None) -> ImageBoot | None:
        """Return the boot of catalogued image ``image_id`` when cidd holds its kernel and initrd, else None."""
        return image_boot(self.engine.config, self.engine.catalog, image_dir_of(self.engine.config), image_id)

    def getChild(self, path: bytes, request: Request) -> Resource:
        mac = normalize_mac(path.decode("ascii", "replace"))
        if mac is None:
            return NoResource("expected /boot/<MAC>, e.g. /boot/52:54:00:12:34:56")
        return _Script(self, mac)


class _Script(Resource):
    """One node's iPXE script, found by MAC (the ethers file) or by name (UEFI HTTP boot through Redfish)."""

    isLeaf = True

    def __init__(self, parent: BootResource, mac: str | None, node: str | None = None) -> None:
        super().__init__()
        self.parent = parent
        self.mac = mac
        self.node = node

    def render_GET(self, request: Request) -> bytes:
        engine = self.parent.engine
        netboot = engine.netboot
        node = netboot.ethers.get(self.mac) if self.mac is not None else self.node
        if self.mac is None and node is not None and not engine.known(node):
            node = None  # a name cidd does not know boots its disk, as an unknown MAC does
        boot = netboot.profiles.get(node or "", "disk")
        record = engine.nodes.get(node or "")
        detail = f"job {record.job}, image {record.target}" if record is not None and record.job else ""
        log.info("boot.script", mac=self.mac, node=node, boot=boot, by="mac" if self.mac is not None else "name")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        token = netboot.tokens.get(node or "", (None, 0.0))[0] if boot == "installer" else None
        image = None
        if record is not None and boot == "disk":
            image = self.parent.image_boot(record.target if record.state == "to_image" else record.image)
        return ipxe_script(node, boot, self.parent.installer(), engine.config.agent_address, token, detail,
                           image).encode()


class _ImageFiles(Resource):
    """``/boot/images/<id>/vmlinuz|initrd.img``: the boot files of catalogued images only."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine

    def getChild(self, path: bytes, request: Request) -> Resource:
        image_id = path.decode("utf-8", "replace")
        rest = request.postpath
        if image_id not in self.engine.catalog or len(rest) != 1 or rest[0] not in IMAGE_BOOT_FILES:
            return NoResource("expected /boot/images/<catalogued image>/vmlinuz or initrd.img")
        request.postpath = []
        name = f"{image_id}.{IMAGE_BOOT_FILES[rest[0]]}"
        file_path = image_dir_of(self.engine.config) / name
        if not file_path.is_file():
            return NoResource(f"no boot file {name} in the image directory (capture the image with cid-mkimg "
                              "--kernel/--initrd)")
        return File(str(file_path), defaultType="application/octet-stream")


class _Uefi(Resource):
    """``/boot/uefi/``: the EFI binary and its ``autoexec.ipxe``, at the top (chain by MAC) and per node name."""

    def __init__(self, boot: BootResource) -> None:
        super().__init__()
        self.boot = boot
        binary = boot.engine.config.boot.uefi_binary
        assert binary is not None
        self.binary = File(str(binary), defaultType="application/efi")
        self.binary.isLeaf = True

    def getChild(self, path: bytes, request: Request) -> Resource:
        rest = request.postpath
        if path == b"ipxe.efi" and not rest:
            return self.binary
        if path == b"autoexec.ipxe" and not rest:
            return _ChainByMac(self.boot.engine.config.http_base)
        name = path.decode("utf-8", "replace")
        if len(rest) == 1 and rest[0] in (b"ipxe.efi", b"autoexec.ipxe") and name:
            request.postpath = []
            if rest[0] == b"ipxe.efi":
                log.info("boot.uefi_binary", node=name)
                return self.binary
            return _Script(self.boot, None, name)
        return NoResource("expected /boot/uefi/ipxe.efi, /boot/uefi/autoexec.ipxe or /boot/uefi/<node>/ipxe.efi")


class _ChainByMac(Resource):
    """An ``autoexec.ipxe`` that chains to the booting NIC's script by MAC (``/boot/${net0/mac:hexhyp}``)."""

    isLeaf = True

    def __init__(self, base: str) -> None:
        super().__init__()
        self.base = base

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return f"#!ipxe\nchain {self.base}/boot/${{net0/mac:hexhyp}}\n".encode()
