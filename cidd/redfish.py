"""Redfish BMC sessions for cidd (OpenStack's sushy), used in a pool thread of cidd.power, one per call.

A ``RedfishSession`` logs in (``auth: session``: an X-Auth-Token session, deleted by ``close``; ``auth: basic``:
HTTP basic on every request), finds the node's system, does one action and logs out. Every request of the call
ends before the call's deadline (its timeout is what is left of the call's time), no request is retried
(a 5xx is an answer, reported as it is), and once the caller gave up (``abandoned`` set) no request goes out
but the logout: a reset the ladder gave up on never reaches the node, even in the middle of a call.

TLS: the BMC's certificate is verified against ``ca_bundle`` (else the system CAs); ``verify: false`` turns it
off and is logged at every start (cidd.bmc.BmcDirectory.load). A certificate that fails verification is an
answer ("TLS certificate ... not trusted"), not silence, so it never opens the BMC's circuit breaker.

Power off is graceful first (``GracefulShutdown``), forced (``ForceOff``) when the system is still on after
``off_timeout`` s. The one-time boot is ``BootSourceOverrideEnabled: Once`` with ``Pxe``, ``Hdd``, or
``UefiHttp`` and an ``HttpBootUri`` where the BMC offers both.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import requests
import structlog
import sushy
from sushy import auth as sushy_auth
from sushy import exceptions as sushy_exc
from sushy.connector import Connector

from cidd.bmc import BmcNoAnswer, BmcTarget, CallAbandoned

log = structlog.get_logger(__name__)

POLL_S = 0.5  # how often a graceful shutdown's progress is read
_STATES = {"On": "on", "Off": "off", "PoweringOn": "powering on", "PoweringOff": "powering off", "Paused": "paused"}


class RedfishTlsError(Exception):
    """The BMC's TLS certificate was not trusted (an answer: the BMC is there, cidd refused it)."""


class _Connector(Connector):  # type: ignore[misc]
    """sushy's Connector, with every request bounded by the call's deadline, never retried, never sent once the
    call's caller gave up (but the session's logout), and failures mapped to cidd's kinds."""

    def __init__(self, url: str, verify: bool | str, deadline: float, abandoned: threading.Event) -> None:
        super().__init__(url, verify=verify, server_side_retries=1, server_side_retries_delay=0,
                         default_request_timeout=max(0.1, deadline - time.monotonic()))
        self._deadline = deadline
        self._abandoned = abandoned
        self.requests: list[str] = []  # "METHOD path", for the debug log

    def _op(self, method: str, path: str = "", data: Any = None, headers: Any = None, blocking: bool = False,
            timeout: Any = None, server_side_retries_left: int | None = None, allow_reauth: bool = True,
            **kwargs: Any) -> Any:
        if method != "DELETE" and self._abandoned.is_set():
            raise CallAbandoned(f"{method} {path}")
        left = self._deadline - time.monotonic()
        if left <= 0 and method != "DELETE":
            raise BmcNoAnswer("the call's time ran out")
        self.requests.append(f"{method} {path}")
        try:
            return super()._op(method, path, data=data, headers=headers, blocking=blocking,
                               timeout=max(0.1, min(left, 5.0) if method == "DELETE" else left),
                               server_side_retries_left=0, allow_reauth=allow_reauth, **kwargs)
        except sushy_exc.ConnectionError as exc:
            cause = exc.__context__
            if isinstance(cause, requests.exceptions.SSLError):
                raise RedfishTlsError(_tls_reason(cause)) from None
            raise BmcNoAnswer(_no_answer_reason(cause)) from None


def _tls_reason(error: BaseException) -> str:
    """Return a sentence for a refused TLS handshake (certificate not trusted, or another TLS failure)."""
    text = str(error)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        detail = text[text.find("certificate verify failed"):].split(")")[0] if "certificate verify failed" in text \
            else "certificate verify failed"
        return (f"its TLS certificate is not trusted ({detail}); set bmc.ca_bundle to the CA that signed it "
                "(or, knowingly, verify: false for its group)")
    return f"TLS handshake failed ({type(error).__name__})"


def _no_answer_reason(error: BaseException | None) -> str:
    """Return a short reason for a request that got no answer (refused, timed out, reset)."""
    if isinstance(error, requests.exceptions.Timeout):
        return "no answer before the call's deadline"
    if isinstance(error, requests.exceptions.ConnectionError):
        return "connection refused or reset"
    return type(error).__name__ if error is not None else "no answer"


class RedfishSession:
    """A cidd.bmc.BmcSession over Redfish: one login, the node's system, one action, then ``close`` logs out.

    ``seconds`` bounds every request of the call (what is left of the call's time); nothing but the logout
    is sent once ``abandoned`` is set. Raises RedfishTlsError, BmcNoAnswer, CallAbandoned or sushy's errors.
    """

    def __init__(self, target: BmcTarget, seconds: float, abandoned: threading.Event) -> None:
        settings = target.settings
        assert settings is not None, "a Redfish target always carries its settings"
        self.target = target
        self.settings = settings
        self.abandoned = abandoned
        self.deadline = time.monotonic() + seconds
        verify: bool | str = str(settings.ca_bundle) if settings.ca_bundle else settings.verify
        self.connector = _Connector(target.base_url, verify, self.deadline, abandoned)
        user, password = target.credentials.user, target.credentials.password
        self.auth: Any = (sushy_auth.SessionAuth(user, password) if settings.auth == "session"
                          else sushy_auth.BasicAuth(user, password))
        self.root: Any = None
        try:
            self.root = sushy.Sushy(target.base_url, auth=self.auth, connector=self.connector)
            self.system: Any = self.root.get_system(target.path or None)
        except BaseException:
            self.close()
            raise

    # -- the BmcSession operations -----------------------------------------------------------------------------

    def power_state(self) -> str:
        """Return ``on``, ``off``, ``powering on``, ``powering off`` or ``paused`` (the system's PowerState)."""
        state = self.system.power_state
        value = state.value if state is not None else "unknown"
        return _STATES.get(value, str(value).lower())

    def power_on(self) -> None:
        """Reset ``On`` unless the system is on already."""
        if self._refreshed_state() != "on":
            self._reset(sushy.ResetType.ON)

    def power_off(self) -> str:
        """``GracefulShutdown``, then ``ForceOff`` when still on after ``off_timeout`` s; return how it went off.

        Returns ``"already off"``, ``"graceful"`` or ``"forced"``. The wait is bounded by the call's deadline too
        (cidd.power gives an ``off`` call ``timeout + off_timeout``), and ends without a ForceOff once the caller
        gave up.
        """
        if self._refreshed_state() == "off":
            return "already off"
        allowed = self._allowed_resets()
        if sushy.ResetType.GRACEFUL_SHUTDOWN in allowed and self.settings.off_timeout > 0:
            self._reset(sushy.ResetType.GRACEFUL_SHUTDOWN)
            until = min(time.monotonic() + self.settings.off_timeout, self.deadline - 1.0)
            while time.monotonic() < until:
                if self.abandoned.wait(min(POLL_S, max(0.0, until - time.monotonic()))):
                    raise CallAbandoned("ForceOff after a graceful shutdown")
                if self._refreshed_state() == "off":
                    return "graceful"
            log.info("power.graceful_timeout", node=self.target.node, bmc=self.target.address,
                     seconds=self.settings.off_timeout)
        self._reset(sushy.ResetType.FORCE_OFF)
        return "forced"

    def power_cycle(self) -> None:
        """``On`` when off; else ``PowerCycle`` where offered, else ``ForceRestart``."""
        if self._refreshed_state() == "off":
            self._reset(sushy.ResetType.ON)
            return
        allowed = self._allowed_resets()
        kind = sushy.ResetType.POWER_CYCLE if sushy.ResetType.POWER_CYCLE in allowed else sushy.ResetType.FORCE_RESTART
        self._reset(kind)

    def reset(self) -> None:
        """``ForceRestart`` (``On`` when off)."""
        if self._refreshed_state() == "off":
            self._reset(sushy.ResetType.ON)
        else:
            self._reset(sushy.ResetType.FORCE_RESTART)

    def set_next_boot(self, device: str) -> str:
        """One-time boot override: ``Pxe`` for ``network``, ``Hdd`` for ``default``; return the target set."""
        target = sushy.BootSource.PXE if device == "network" else sushy.BootSource.HDD
        self.system.set_system_boot_options(target=target, enabled=sushy.BootSourceOverrideEnabled.ONCE)
        return str(target.value)

    def boot_once(self, boot: str, http_uri: str | None) -> str:
        """One-time boot into ``boot`` then a reset; return what was set (``UefiHttp <uri>``, ``Pxe``, ``Hdd``).

        The installer boots ``UefiHttp`` with ``http_uri`` when one is given, the group's ``installer_boot``
        allows it (``auto`` or ``uefi_http``) and the BMC offers ``UefiHttp`` and ``HttpBootUri``; else ``Pxe``
        (``installer_boot: uefi_http`` on a BMC without them raises RuntimeError). The disk boots ``Hdd``.
        """
        if boot != "installer":
            chosen = self.set_next_boot("default")
        elif http_uri and self.settings.installer_boot != "pxe" and self._offers_http_boot():
            self.system.set_system_boot_options(target=sushy.BootSource.UEFI_HTTP, http_boot_uri=http_uri,
                                                enabled=sushy.BootSourceOverrideEnabled.ONCE)
            chosen = f"UefiHttp {http_uri}"
        elif self.settings.installer_boot == "uefi_http":
            raise RuntimeError("installer_boot is uefi_http, but the BMC offers no UefiHttp boot with an HttpBootUri"
                               if http_uri else "installer_boot is uefi_http, but cidd serves no UEFI binary "
                               "(boot.uefi_binary)")
        else:
            chosen = self.set_next_boot("network")
        self.system.refresh(force=True)
        self.reset()
        return chosen

    def mac_addresses(self) -> list[str]:
        """Return the MAC addresses of the system's EthernetInterfaces (lower case), in the BMC's order."""
        macs = []
        for nic in self.system.ethernet_interfaces.get_members():
            if nic.mac_address:
                macs.append(str(nic.mac_address).lower().replace("-", ":"))
        return macs

    def close(self) -> None:
        """Delete the X-Auth-Token session (session auth) and close the connection; never raise."""
        try:
            self.auth.close()
        except Exception as exc:  # noqa: BLE001 - a session left behind expires on the BMC's own timeout
            log.info("power.logout_failed", node=self.target.node, bmc=self.target.address,
                     error=type(exc).__name__)
        try:
            self.connector.close()
        except Exception:  # noqa: BLE001,S110 - closing a requests session does not fail in practice
            pass
        if self.root is not None:
            self.root._auth = None  # sushy's __del__ would log out again  # noqa: SLF001

    # -- helpers -----------------------------------------------------------------------------------------------

    def _refreshed_state(self) -> str:
        """Return the power state read afresh from the BMC."""
        self.system.refresh(force=True)
        return self.power_state()

    def _allowed_resets(self) -> set[Any]:
        """Return the ResetType values the system's Reset action allows (every one when it does not say)."""
        return set(self.system.get_allowed_reset_system_values())

    def _reset(self, kind: Any) -> None:
        """POST the system's Reset action with ``kind``."""
        log.debug("power.redfish_reset", node=self.target.node, bmc=self.target.address, reset=kind.value)
        self.system.reset_system(kind)

    def _offers_http_boot(self) -> bool:
        """Return whether the system offers a ``UefiHttp`` override target and an ``HttpBootUri`` property."""
        boot = self.system.json.get("Boot") or {}
        return (sushy.BootSource.UEFI_HTTP in self.system.get_allowed_system_boot_source_values()
                and "HttpBootUri" in boot)
