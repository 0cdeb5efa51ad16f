"""The systemd notify protocol (sd_notify): readiness, watchdog keep-alives and stopping, over a datagram.

Without ``$NOTIFY_SOCKET`` (not started by systemd with Type=notify) every call does nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    """Sends state lines to systemd's notify socket."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 1e6 / 2 if usec.isdigit() and mine else None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` (e.g. ``READY=1``); return whether a socket was there to send them to."""
        if self.address is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto("\n".join(lines).encode(), self.address)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> bool:
        """Tell systemd the daemon is ready, with a status line."""
        return self.notify("READY=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        """Send a watchdog keep-alive."""
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """Tell systemd the daemon is stopping."""
        return self.notify("STOPPING=1")
