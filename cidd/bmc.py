"""The BMC interface of cidd: which BMC a node has, how to reach it, and one session type per protocol.

The ladder (cidd/rebooter.py), the power windows, ``cidcapt --power`` and the console (cidd/client_api.py) ask
``cidd.power.PowerController`` for an action on a *node*; the controller resolves the node to a ``BmcTarget``
here (``BmcDirectory.target``: the node's group, its ``bmc`` settings, the address pattern, the loaded
credentials), schedules the call, and in a pool thread opens a ``BmcSession`` of the target's protocol
(``cidd.power.open_session``): ``IpmiSession`` (pyghmi) or ``cidd.redfish.RedfishSession`` (sushy). A session offers the
same operations whatever is underneath: power state, on, off, cycle, reset, next boot device, one-time boot
into the installer, the system's MAC addresses; it is closed (logged out) after every call.

The password never appears in a log event, an error message or a ``repr``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import structlog
import yaml

from cidcommon.errors import CidError, TokenFileError
from cidcommon.hostport import parse_hostport
from cidcommon.paths import check_private
from cidd import pyghmi_io
from cidd.config_sections import BmcConfig

log = structlog.get_logger(__name__)

DEFAULT_IPMI_PORT = 623
BOOT_DEVICES = ("network", "default")  # set_next_boot: the network (installer) or the default device (disk)
IPMI, REDFISH = "ipmi", "redfish"


class PowerError(CidError):
    """A BMC call failed or did not answer; the message names the node and the BMC address."""

    code = "power"


class CredentialsError(CidError):
    """The BMC credentials file is missing, unreadable, not private or malformed."""

    code = "config"


class BmcNoAnswer(Exception):
    """Raised in a pool thread when the BMC did not answer (refused connection, timeout): silence, not an error."""


class CallAbandoned(Exception):
    """Raised in a pool thread instead of sending a request once the call's caller gave up."""


@dataclass(frozen=True)
class BmcCredentials:
    """The BMC user and password (``repr`` hides the password)."""

    user: str
    password: str = field(repr=False)

    @classmethod
    def load(cls, path: Path | str) -> BmcCredentials:
        """Return the credentials in ``path``.

        The file is either YAML (``user: admin`` and ``password: ...``) or one line ``user:password`` (the
        password may itself contain ``:``). It must not be readable or writable by group or others.

        Raises CredentialsError (a message naming the file, and ``chmod 600`` when it is not private).
        """
        path = Path(path)
        try:
            check_private(path)
            text = path.read_text(encoding="utf-8")
        except TokenFileError as exc:
            raise CredentialsError(f"BMC credentials file {exc.message}") from None
        except FileNotFoundError:
            raise CredentialsError(f"BMC credentials file {path} does not exist") from None
        except OSError as exc:
            raise CredentialsError(f"cannot read BMC credentials file {path}: {exc.strerror}; "
                                   "check its owner and mode") from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, source: str = "BMC credentials") -> BmcCredentials:
        """Return the credentials in ``text`` (YAML mapping or ``user:password``); raise CredentialsError."""
        data: Any = None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict):
            user, password = data.get("user", data.get("username")), data.get("password")
            if not isinstance(user, str) or not user or password is None:
                raise CredentialsError(f"{source} needs both 'user' and 'password'")
            return cls(user, str(password))
        line = text.strip()
        if "\n" in line or ":" not in line:
            raise CredentialsError(f"{source} must hold 'user:password' on one line, "
                                   "or YAML with 'user' and 'password'")
        user, _, password = line.partition(":")
        if not user:
            raise CredentialsError(f"{source} names no user before ':'")
        return cls(user, password)


_FIELD = re.compile(r"\{([^{}]*)\}")


def node_index(node: str) -> int | None:
    """Return the number at the end of ``node`` (``node03`` -> 3), or None when it ends in no digit."""
    match = re.search(r"(\d+)$", node)
    return int(match.group(1)) if match else None


def bmc_address(node: str, pattern: str) -> str:
    """Return the BMC address of ``node`` from an inventory ``pattern``.

    Fields: ``{name}`` is the node name, ``{index}`` the number its name ends with (``node03`` -> ``3``; a format
    spec works: ``{index:02d}``), ``{port}`` is an alias of ``{index}`` for ports, and arithmetic is allowed only
    as ``{index+9000}`` / ``{port+9000}``. Examples: ``"{name}-bmc"`` -> ``node03-bmc``; ``"10.1.0.{index}"`` ->
    ``10.1.0.3``; ``"127.0.0.1:{index+9000}"`` -> ``127.0.0.1:9003``; ``"https://{name}-bmc"`` (Redfish).

    Raises PowerError when the pattern uses an unknown field or ``{index}`` for a name without a number.
    """

    def field_value(match: re.Match[str]) -> str:
        spec = match.group(1)
        key, _, fmt = spec.partition(":")
        key = key.strip()
        if key == "name":
            return format(node, fmt)
        base, plus, offset = key.partition("+")
        if base.strip() in ("index", "port"):
            index = node_index(node)
            if index is None:
                raise PowerError(f"BMC address pattern {pattern!r} uses {{{base.strip()}}} but node name "
                                 f"{node!r} does not end with a number")
            if plus:
                try:
                    index += int(offset)
                except ValueError:
                    raise PowerError(f"BMC address pattern {pattern!r}: {{{spec}}} must be "
                                     f"{{{base.strip()}+NUMBER}}") from None
            return format(index, fmt)
        raise PowerError(f"BMC address pattern {pattern!r} uses unknown field {{{spec}}}; "
                         "use {name}, {index} or {index+N}")

    return _FIELD.sub(field_value, pattern)


def split_address(address: str) -> tuple[str, int]:
    """Return (host, port) of an IPMI BMC address (``cidcommon.hostport``; default port 623). Raises PowerError."""
    try:
        return parse_hostport(address, DEFAULT_IPMI_PORT, what="BMC address")
    except ValueError as exc:
        raise PowerError(str(exc)) from None


@dataclass(frozen=True)
class BmcTarget:
    """One node's BMC, resolved: protocol, where it is, and the settings and credentials its calls use.

    ``address`` is what messages show (``10.1.0.7:623``, ``https://10.1.0.7/redfish/v1/Systems/1``); ``path``
    is a Redfish system's path ('' for the BMC's only system); ``settings`` is None for an address given
    directly (an IPMI BMC with the controller's own credentials and timeout).
    """

    node: str
    protocol: str
    address: str
    host: str
    port: int
    credentials: BmcCredentials
    settings: BmcConfig | None = None
    scheme: str = ""
    path: str = ""

    @property
    def key(self) -> tuple[str, int]:
        """Return the scheduler's key: calls with the same key run one at a time (one BMC, or one Redfish system)."""
        if self.protocol == REDFISH:
            return (f"{self.scheme}://{self.host}{self.path}", self.port)
        return (self.host, self.port)

    @property
    def base_url(self) -> str:
        """Return ``scheme://host:port`` of a Redfish service."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def ipmi_target(node: str, address: str, credentials: BmcCredentials,
                settings: BmcConfig | None = None) -> BmcTarget:
    """Return the IPMI target of ``node`` at ``address`` (HOST or HOST:PORT). Raises PowerError."""
    host, port = split_address(address)
    return BmcTarget(node, IPMI, address, host, port, credentials, settings)


def redfish_target(node: str, address: str, credentials: BmcCredentials, settings: BmcConfig) -> BmcTarget:
    """Return the Redfish target of ``node`` at ``address`` (a URL; https:// when it has no scheme).

    A path in the URL names the system (``https://bmc/redfish/v1/Systems/1``); without one the service's only
    system is used. Raises PowerError for a malformed address.
    """
    url = address if "://" in address else f"https://{address}"
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or not parts.netloc or parts.query or parts.fragment or "@" in parts.netloc:
        raise PowerError(f"Redfish BMC address {address!r} of {node} must be https://HOST[:PORT][/SYSTEM PATH]")
    try:
        host, port = parse_hostport(parts.netloc, 443 if scheme == "https" else 80, what="Redfish BMC address")
    except ValueError as exc:
        raise PowerError(f"{exc} for {node}") from None
    path = parts.path.rstrip("/")
    shown = f"{scheme}://{parts.netloc}{path}"
    return BmcTarget(node, REDFISH, shown, host, port, credentials, settings, scheme, path)


class BmcDirectory:
    """Which BMC each node has: its group's ``bmc`` settings (docs/power.md) and the credentials they name.

    ``group_of(node)`` returns a node's group; ``credentials`` maps every configured credentials file to what
    it holds (``load`` reads them all at start, so a bad file stops cidd before the first call).
    """

    def __init__(self, bmc: BmcConfig, group_of: Callable[[str], str],
                 credentials: Mapping[Path, BmcCredentials]) -> None:
        self.bmc = bmc
        self.group_of = group_of
        self.credentials = dict(credentials)

    @classmethod
    def load(cls, bmc: BmcConfig, inventory: Mapping[str, str]) -> BmcDirectory:
        """Return the directory of ``bmc`` for nodes whose groups ``inventory`` names (others: ``default``).

        Reads every credentials file (raises CredentialsError) and logs ``power.tls_unverified`` (a warning) for
        every Redfish setting with ``verify: false`` and ``power.plain_http`` for every ``http://`` address, at
        every start.
        """
        settings = [("bmc", bmc)] if bmc.configured else []
        settings += [(f"groups.{name}.bmc", own) for name, own in sorted(bmc.groups.items())]
        files: dict[Path, BmcCredentials] = {}
        for where, one in settings:
            if one.credentials is not None and one.credentials not in files:
                files[one.credentials] = BmcCredentials.load(one.credentials)
            if one.type != REDFISH:
                continue
            if not one.verify:
                log.warning("power.tls_unverified", settings=where, address=one.address,
                            reason="verify: false, the BMCs' TLS certificates are not checked; anyone on the "
                            "path can read the BMC password; set ca_bundle instead")
            if one.address.lower().startswith("http://"):
                log.warning("power.plain_http", settings=where, address=one.address,
                            reason="Redfish over plain HTTP sends the BMC password unencrypted")
        return cls(bmc, lambda node: inventory.get(node, "default"), files)

    def settings(self, node: str) -> BmcConfig | None:
        """Return the BMC settings of ``node``'s group, or None when it has none."""
        return self.bmc.for_group(self.group_of(node))

    def target(self, node: str) -> BmcTarget:
        """Return ``node``'s BMC. Raises PowerError when its group has no BMC or its address pattern fails."""
        settings = self.settings(node)
        if settings is None or settings.credentials is None:
            raise PowerError(f"{node} has no BMC: its group {self.group_of(node)!r} has no 'bmc' settings and "
                             "there is no top-level 'bmc' section")
        credentials = self.credentials.get(settings.credentials)
        if credentials is None:
            credentials = self.credentials[settings.credentials] = BmcCredentials.load(settings.credentials)
        try:
            address = bmc_address(node, settings.address)
            if settings.type == REDFISH:
                return redfish_target(node, address, credentials, settings)
            return ipmi_target(node, address, credentials, settings)
        except PowerError as exc:
            raise PowerError(f"{exc.message} for {node}; fix the BMC address pattern") from None


class BmcSession(Protocol):
    """One logged-in session to a node's BMC, used in a pool thread for one call, then closed.

    Every method raises on failure: BmcNoAnswer when the BMC did not answer, CallAbandoned when the call's
    caller gave up before a request went out, anything else for an answer with an error.
    """

    def power_state(self) -> str:
        """Return ``"on"``, ``"off"`` (or a transition such as ``"powering on"``, Redfish)."""
        ...

    def power_on(self) -> None:
        """Power the node on (nothing when it is on)."""
        ...

    def power_off(self) -> str:
        """Power the node off; return how (``"off"``, ``"graceful"``, ``"forced"``, ``"already off"``)."""
        ...

    def power_cycle(self) -> None:
        """Power the node off then on (just on when it is off)."""
        ...

    def reset(self) -> None:
        """Hard-reset the node (on when it is off)."""
        ...

    def set_next_boot(self, device: str) -> str:
        """Make the next boot (only) use ``device`` (``network`` or ``default``); return what was set."""
        ...

    def boot_once(self, boot: str, http_uri: str | None) -> str:
        """Set a one-time boot into ``boot`` (installer or disk), then reset the node; return what was set."""
        ...

    def mac_addresses(self) -> list[str]:
        """Return the MAC addresses of the system's network interfaces (lower case, colon-separated)."""
        ...

    def close(self) -> None:
        """Log out (never raises)."""
        ...


class IpmiSession:
    """A BmcSession over a pyghmi ``Command`` (one IPMI session, logged out by ``close``)."""

    def __init__(self, command: Any) -> None:
        self.command = command

    def power_state(self) -> str:
        """Return ``"on"`` or ``"off"`` (chassis power status)."""
        return str(self.command.get_power()["powerstate"])

    def power_on(self) -> None:
        """Chassis power on (no wait)."""
        self.command.set_power("on", wait=False)

    def power_off(self) -> str:
        """Chassis power off, hard (IPMI: no graceful step); return ``"off"``."""
        self.command.set_power("off", wait=False)
        return "off"

    def power_cycle(self) -> None:
        """Chassis control 'power cycle' when on, 'on' when off."""
        if self.command.get_power()["powerstate"] == "off":
            self.command.set_power("on", wait=False)
            return
        response = self.command.raw_command(netfn=0, command=2, data=[2])
        if "error" in response:
            raise RuntimeError(f"power cycle refused: {response['error']}")

    def reset(self) -> None:
        """Chassis hard reset (pyghmi's ``boot``: on when off)."""
        self.command.set_power("boot", wait=False)

    def set_next_boot(self, device: str) -> str:
        """Set the next boot device (once): ``network`` or ``default``; return it."""
        self.command.set_bootdev(device, persist=False)
        return device

    def boot_once(self, boot: str, http_uri: str | None) -> str:
        """Network boot once (installer) or the default device (disk), then a power cycle; return the device."""
        device = "network" if boot == "installer" else "default"
        self.set_next_boot(device)
        self.power_cycle()
        return device

    def mac_addresses(self) -> list[str]:
        """IPMI has no standard way to list a system's NICs: raise RuntimeError."""
        raise RuntimeError("IPMI has no standard way to read the system's MAC addresses; use a Redfish BMC")

    def close(self) -> None:
        """Close the IPMI session (one round trip, not retried) unless a console shares it; never raise."""
        session = getattr(self.command, "ipmi_session", None)
        if session is None or getattr(session, "sol_handler", None) is not None:
            return  # pyghmi shares one session per BMC in a process: this one carries an open console, keep it
        try:
            session.logout()
        except Exception as exc:  # noqa: BLE001 - a failed logout only leaves a session for the BMC to expire
            log.debug("power.logout_failed", error=type(exc).__name__)
        finally:
            pyghmi_io.discard_session(session)  # never joined by a later call, whatever the logout did
