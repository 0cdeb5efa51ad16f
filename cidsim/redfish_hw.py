"""The simulated fleet's side of Redfish BMCs: sushy-emulator's fake systems drive the SimNodes' power.

sushy-emulator's fake driver (cidsim.redfish_emulator, ``--notify URL``) PUTs a system's JSON to URL whenever it
changes (its ``external_notifier``): power state, pending power change, boot device. ``RedfishHardware`` listens
on 127.0.0.1 for these notifications and plays the machine behind the BMC:

- the system went **Off** (ForceOff, GracefulShutdown, or the off half of a ForceRestart): the node stops (its
  agent session drops; a hung node stops too);
- it went **On** from Off: the node boots; the installer when the boot override is ``Pxe``, ``UefiHttp`` or a
  ``Cd`` attached from an ``HttpBootUri`` (the emulator's stand-in for UEFI HTTP boot), else its disk.

Each node's last power state starts as ``On`` (the fleet starts powered on, as the emulator's systems do).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

if TYPE_CHECKING:
    from cidsim.fleet import SimNode

log = structlog.get_logger(__name__)

INSTALLER_TARGETS = ("Pxe", "UefiHttp")


def boots_installer(system: Mapping[str, Any]) -> bool:
    """Return whether a system powering on with this state boots the network installer."""
    device = system.get("boot_device")
    if device in INSTALLER_TARGETS:
        return True
    image = (system.get("boot_image") or {}).get("Cd") or []
    return device == "Cd" and bool(system.get("http_boot_uri") or (image and image[0]))


class RedfishHardware(Resource):
    """Receives the fake driver's notifications and powers the named SimNodes off and on (reactor thread)."""

    isLeaf = True

    def __init__(self, nodes: Mapping[str, SimNode]) -> None:
        super().__init__()
        self.nodes = nodes
        self.power: dict[str, str] = {name: "On" for name in nodes}
        self.port: IListeningPort | None = None

    def listen(self, reactor: Any, port: int) -> IListeningPort:
        """Listen on 127.0.0.1:``port``; return the listening port."""
        self.port = reactor.listenTCP(port, Site(self), interface="127.0.0.1")
        log.info("simredfish.listening", port=port, nodes=len(self.nodes))
        return self.port

    def render_PUT(self, request: Request) -> bytes:  # noqa: N802 (twisted.web's name)
        """Apply one notification (a system's JSON); answer 204."""
        try:
            system = json.loads(request.content.read() if request.content else b"{}")
        except ValueError:
            request.setResponseCode(400)
            return b"not JSON"
        self.apply(system)
        request.setResponseCode(204)
        return b""

    def apply(self, system: Mapping[str, Any]) -> None:
        """Power the system's node off or on as its new power state says."""
        name = str(system.get("name"))
        node = self.nodes.get(name)
        state = system.get("power_state")
        if node is None or state not in ("On", "Off"):
            return
        before = self.power.get(name, "On")
        self.power[name] = state
        if state == before:
            return
        if state == "Off":
            log.info("simredfish.power_off", node=name)
            node.stop()
        else:
            boot = "installer" if boots_installer(system) else "disk"
            log.info("simredfish.power_on", node=name, boot=boot, device=system.get("boot_device"))
            node.power_cycle(boot)
