"""``/boot/...`` over HTTP: each node's iPXE script by MAC, and the installer's kernel and initramfs.

``GET /boot/<mac>`` (any MAC spelling iPXE produces: ``${net0/mac}``, ``${mac:hexhyp}``) answers the script
for the node the ethers file names; ``GET /boot/files/vmlinuz`` and ``/boot/files/initrd.img`` serve the
configured installer files, and nothing else.
"""

from __future__ import annotations

import structlog
from twisted.web.resource import NoResource, Resource
from twisted.web.server import Request
from twisted.web.static import File

from cidd.boot import InstallerBoot, ipxe_script, normalize_mac
from cidd.engine import Engine

log = structlog.get_logger("cidd.boot")


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

    def installer(self) -> InstallerBoot | None:
        """Return the installer's URLs, or None when no installer files are configured."""
        boot = self.engine.config.boot
        if not (boot.kernel and boot.initrd):
            return None
        base = self.engine.config.http_base
        return InstallerBoot(f"{base}/boot/files/vmlinuz", f"{base}/boot/files/initrd.img", boot.cmdline)

    def getChild(self, path: bytes, request: Request) -> Resource:
        mac = normalize_mac(path.decode("ascii", "replace"))
        if mac is None:
            return NoResource("expected /boot/<MAC>, e.g. /boot/52:54:00:12:34:56")
        return _Script(self, mac)


class _Script(Resource):
    isLeaf = True

    def __init__(self, parent: BootResource, mac: str) -> None:
        super().__init__()
        self.parent = parent
        self.mac = mac

    def render_GET(self, request: Request) -> bytes:
        engine = self.parent.engine
        netboot = engine.netboot
        node = netboot.ethers.get(self.mac)
        boot = netboot.profiles.get(node or "", "disk")
        record = engine.nodes.get(node or "")
        detail = f"job {record.job}, image {record.target}" if record is not None and record.job else ""
        log.info("boot.script", mac=self.mac, node=node, boot=boot)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        token = netboot.tokens.get(node or "", (None, 0.0))[0] if boot == "installer" else None
        return ipxe_script(node, boot, self.parent.installer(), engine.config.agent_address, token, detail).encode()
