"""The sections of cidd.yaml below the top level (boot, bmc, tls, windows, users, scheduler, a group's policy): their
frozen objects and their parsers, and ``ConfigReader``, which collects every problem so that all are reported
together. cidd.config assembles them into a Config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, overload

from cidcommon.tlsfiles import PkiPaths, default_pki_paths
from cidcommon.vocabulary import RebootMethod
from cidcommon.wire import HELLO_TIMEOUT
from cidd.core.machine_types import LADDER_METHODS, NEXT_BOOT_METHODS, POWER_METHODS, Policy, Rung


@dataclass(frozen=True)
class BootConfig:
    """Netboot settings: MAC map, installer files, TFTP directory, the address installers use for cidd."""

    ethers: Path | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    tftp_dir: Path | None = None
    server: str | None = None  # HOST:PORT of the agent port as nodes reach it; default listen host:port
    token_ttl: float = 7200.0  # seconds a single-use installer boot token stays valid
    uefi_binary: Path | None = None  # the EFI program UEFI HTTP boot loads (iPXE's ipxe.efi): /boot/uefi/...


BMC_TYPES = ("ipmi", "redfish")
REDFISH_AUTH = ("session", "basic")
INSTALLER_BOOTS = ("auto", "uefi_http", "pxe")
#: Keys of the ``bmc`` section that a group's own ``bmc`` may override (the others bound the one scheduler).
BMC_GROUP_KEYS = frozenset({"type", "address", "credentials", "timeout", "verify", "ca_bundle", "auth", "off_timeout",
                            "installer_boot"})
#: Keys that only mean something to Redfish BMCs.
REDFISH_KEYS = frozenset({"verify", "ca_bundle", "auth", "off_timeout", "installer_boot"})


@dataclass(frozen=True)
class BmcConfig:
    """How cidd reaches node BMCs (cidd/power.py, cidd/bmc.py): protocol, address pattern, credentials, bounds.

    The top-level ``bmc`` section holds the defaults and the cluster-wide bounds (``max_concurrent``, the
    breaker); ``groups`` holds each node group's settings, with its own ``bmc`` keys over the top-level ones
    (docs/power.md). ``for_group`` returns the settings a group's nodes use.
    """

    type: str = "ipmi"  # ipmi | redfish
    address: str = "{name}-bmc"  # {name}, {index}, {index+N}; ipmi: optional :port (623); redfish: URL (https)
    credentials: Path | None = None  # user:password or YAML; mode 0600
    max_concurrent: int = 8
    timeout: float = 20.0
    breaker_after: int = 3  # calls in a row without an answer after which a BMC's calls fail at once ...
    breaker_cooldown: float = 60.0  # ... for this many seconds; then one call is tried again
    verify: bool = True  # redfish: verify the BMC's TLS certificate (false: logged as a warning at every start)
    ca_bundle: Path | None = None  # redfish: CA file or directory that signed the BMCs' certificates
    auth: str = "session"  # redfish: session (X-Auth-Token, logged out after each call) | basic
    off_timeout: float = 30.0  # redfish: seconds a graceful shutdown may take before ForceOff
    installer_boot: str = "auto"  # redfish: auto | uefi_http (HttpBootUri) | pxe, for redfish_boot_installer
    configured: bool = True  # False: no top-level section (only groups have BMC settings)
    groups: Mapping[str, BmcConfig] = field(default_factory=dict, hash=False, compare=False)

    def for_group(self, group: str) -> BmcConfig | None:
        """Return the BMC settings of ``group``'s nodes, or None when neither the group nor the top level has any."""
        own = self.groups.get(group)
        if own is not None:
            return own
        return self if self.configured else None


TLS_MODES = ("tls", "plain")
CLIENT_CERT_MODES = ("optional", "required", "none")


@dataclass(frozen=True)
class TlsConfig:
    """TLS of the agent/client port: files (None: the defaults under state_dir), client certificates, SANs."""

    mode: str = "tls"  # tls | plain (plain TCP: explicit only, logged as security.plain_tcp at start)
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    client_certs: str = "optional"  # optional | required (agents need a CA-signed cert) | none (not asked)
    san: tuple[str, ...] = ()  # extra names/addresses for the server certificate cidd creates

    @property
    def explicit_files(self) -> bool:
        """Return whether any TLS file is configured (then cidd never creates a CA on its own)."""
        return any(f is not None for f in (self.cert, self.key, self.ca))

    def paths(self, state_dir: Path) -> PkiPaths:
        """Return the TLS file paths: the configured ones, else the defaults under ``state_dir``."""
        default = default_pki_paths(state_dir)
        return PkiPaths(ca=self.ca or default.ca, ca_key=default.ca_key, cert=self.cert or default.cert,
                        key=self.key or default.key, agents=default.agents)


@dataclass(frozen=True)
class WindowsConfig:
    """Reboot windows: at most ``reboots`` nodes rebooting and ``power`` BMC actions at once (None: no bound).

    A rung's timeout grows by ``timeout_per_node`` seconds per node rebooting at the moment it is issued.
    """

    reboots: int | None = None
    power: int | None = None
    timeout_per_node: float = 0.0


@dataclass(frozen=True)
class UsersConfig:
    """User database lookups (cidd/user_directory.py): how long to wait, keep and serve stale, how many at once."""

    timeout: float = 5.0
    ttl: float = 300.0
    stale_for: float = 3600.0
    max_lookups: int = 16


@dataclass(frozen=True)
class RetentionConfig:
    """How long the event history is kept (cidd/history.py): raw events by age and count, then roll-ups.

    Events older than ``events_days`` days, and the oldest beyond ``max_events`` rows, are folded into one roll-up
    row per node, image and period of ``period_days`` days, then deleted; roll-ups older than ``rollups_days``
    days go too. Retention runs every ``interval`` seconds, ``batch`` rows per transaction.
    """

    events_days: float = 30.0
    max_events: int = 1_000_000
    period_days: float = 7.0
    rollups_days: float = 730.0
    interval: float = 3600.0
    batch: int = 5000


class ConfigReader:
    """Collects problems while reading a mapping, so that all of them are reported at once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{self.path}: {where}: {message}")

    def number(self, data: Mapping[str, Any], key: str, default: float, where: str, minimum: float = 0.0) -> float:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            self.problem(where, f"'{key}' must be a number >= {minimum:g} (got {value!r})")
            return default
        return float(value)

    @overload
    def whole(self, data: Mapping[str, Any], key: str, default: int, where: str) -> int: ...

    @overload
    def whole(self, data: Mapping[str, Any], key: str, default: None, where: str) -> int | None: ...

    def whole(self, data: Mapping[str, Any], key: str, default: int | None, where: str) -> int | None:
        """Return ``data[key]`` as a whole number >= 1 (``default`` when absent; None is allowed if that is it)."""
        value = data.get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            absent = ", or absent for no bound" if default is None else ""
            self.problem(where, f"'{key}' must be a whole number >= 1{absent} (got {value!r})")
            return default
        return value

    def text(self, data: Mapping[str, Any], key: str, default: str, where: str,
             choices: tuple[str, ...] | None = None) -> str:
        value = data.get(key, default)
        if not isinstance(value, str) or (choices and value not in choices):
            wanted = f"one of {', '.join(choices)}" if choices else "a string"
            self.problem(where, f"'{key}' must be {wanted} (got {value!r})")
            return default
        return value

    def flag(self, data: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            self.problem(where, f"'{key}' must be true or false (got {value!r})")
            return default
        return value

    def port(self, data: Mapping[str, Any], key: str, default: int, where: str) -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
            self.problem(where, f"'{key}' must be a TCP port number from 0 to 65535 (got {value!r})")
            return default
        return value

    def optional_text(self, data: Mapping[str, Any], key: str, where: str) -> str | None:
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            self.problem(where, f"'{key}' must be a non-empty string (got {value!r})")
            return None
        return value

    def mapping(self, data: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
        value = data.get(key) or {}
        if not isinstance(value, Mapping):
            self.problem(where, f"'{key}' must be a mapping")
            return {}
        return value

    def unknown(self, data: Mapping[str, Any], known: set[str], where: str) -> None:
        for key in data:
            if key not in known:
                self.problem(where, f"unknown key '{key}' (known: {', '.join(sorted(known))})")


def bmc_section(reader: ConfigReader, data: Mapping[str, Any], groups: Mapping[str, Policy]) -> BmcConfig | None:
    """Return the BMC settings: the top-level ``bmc`` section with each group's own ``bmc`` over it.

    None when neither the top level nor any group has one. A group whose ladder has a power rung (power_cycle,
    redfish_boot_installer) needs BMC settings; redfish_boot_installer needs a Redfish BMC. Every problem is
    reported through ``reader``.
    """
    raw_groups = data.get("groups")
    own: dict[str, Mapping[str, Any]] = {}
    for name, group in (raw_groups.items() if isinstance(raw_groups, Mapping) else ()):
        if isinstance(group, Mapping) and "bmc" in group:
            own[str(name)] = reader.mapping(group, "bmc", f"groups.{name}")
    top: BmcConfig | None = None
    if "bmc" in data:
        section = reader.mapping(data, "bmc", "top level")
        reader.unknown(section, set(BMC_GROUP_KEYS | _BMC_TOP_KEYS), "bmc")
        top = _bmc_settings(reader, section, BmcConfig(), "bmc", top_level=True)
        if top.credentials is None:
            reader.problem("bmc", "'credentials' (a file holding user:password, mode 0600) is required")
    base = top or BmcConfig(configured=False)
    effective: dict[str, BmcConfig] = {}
    for name, section in own.items():
        where = f"groups.{name}.bmc"
        for key in section:
            if key in _BMC_TOP_KEYS:
                reader.problem(where, f"'{key}' bounds the one BMC scheduler of cidd: set it in the top-level "
                               "'bmc' section")
        reader.unknown({k: v for k, v in section.items() if k not in _BMC_TOP_KEYS}, set(BMC_GROUP_KEYS), where)
        settings = _bmc_settings(reader, section, base, where, top_level=False)
        if settings.credentials is None:
            reader.problem(where, "'credentials' (a file holding user:password, mode 0600) is required here or in "
                           "the top-level 'bmc' section")
        effective[name] = replace(settings, configured=True, groups={})
    for name in sorted(groups):
        settings = effective.get(name, top)
        methods = {rung.method for rung in groups[name].ladder}
        if settings is not None and RebootMethod.REDFISH_BOOT_INSTALLER in methods and settings.type != "redfish":
            reader.problem(f"groups.{name}", "method redfish_boot_installer needs a Redfish BMC: set "
                           "'bmc: {type: redfish, ...}' in the group or in the top-level 'bmc' section")
    users = sorted(name for name, policy in groups.items()
                   if name not in effective and any(r.method in POWER_METHODS for r in policy.ladder))
    if top is None and users:
        used = sorted({r.method.value for name in users for r in groups[name].ladder if r.method in POWER_METHODS})
        reader.problem("bmc", f"group(s) {', '.join(users)} use {', '.join(used)}, which needs a 'bmc' section "
                       "(address pattern and credentials file) at the top level or in the group")
    if top is None and not effective:
        return None
    return replace(base, groups=effective)


#: Keys of the top-level ``bmc`` section only: they bound the one scheduler every BMC call goes through.
_BMC_TOP_KEYS = frozenset({"max_concurrent", "breaker_after", "breaker_cooldown"})


def _bmc_settings(reader: ConfigReader, section: Mapping[str, Any], base: BmcConfig, where: str,
                  top_level: bool) -> BmcConfig:
    """Return ``base`` with the keys of ``section`` over it, each checked (problems go to ``reader``)."""
    kind = reader.text(section, "type", base.type, where, BMC_TYPES)
    address = reader.text(section, "address", base.address, where)
    scheme = address.partition("://")[0].lower() if "://" in address else None
    if kind == "ipmi" and scheme is not None:
        reader.problem(where, f"'address' {address!r} is a URL, but IPMI BMCs are reached at HOST or HOST:PORT; "
                       "set 'type: redfish' for a Redfish BMC")
    elif kind == "redfish" and scheme not in (None, "https", "http"):
        reader.problem(where, f"'address' {address!r}: a Redfish BMC is reached over https:// (or http://)")
    if not top_level and kind == "ipmi":
        for key in sorted(REDFISH_KEYS & set(section)):
            reader.problem(where, f"'{key}' applies to Redfish BMCs only (this group's BMCs are IPMI)")
    credentials = reader.optional_text(section, "credentials", where)
    ca_bundle = reader.optional_text(section, "ca_bundle", where)
    verify = reader.flag(section, "verify", base.verify, where)
    settings = replace(
        base, type=kind, address=address,
        credentials=Path(credentials) if credentials else base.credentials,
        timeout=reader.number(section, "timeout", base.timeout, where, minimum=1),
        verify=verify,
        ca_bundle=Path(ca_bundle) if ca_bundle else (base.ca_bundle if verify else None),
        auth=reader.text(section, "auth", base.auth, where, REDFISH_AUTH),
        off_timeout=reader.number(section, "off_timeout", base.off_timeout, where),
        installer_boot=reader.text(section, "installer_boot", base.installer_boot, where, INSTALLER_BOOTS),
    )
    if ca_bundle and not verify:
        reader.problem(where, "'ca_bundle' and 'verify: false' contradict each other: keep one")
    if top_level:
        settings = replace(
            settings,
            max_concurrent=int(reader.number(section, "max_concurrent", base.max_concurrent, where, minimum=1)),
            breaker_after=reader.whole(section, "breaker_after", base.breaker_after, where),
            breaker_cooldown=reader.number(section, "breaker_cooldown", base.breaker_cooldown, where, minimum=1))
    return settings


def windows_section(reader: ConfigReader, data: Mapping[str, Any]) -> WindowsConfig:
    """Return the ``windows`` section (no bound by default)."""
    section = reader.mapping(data, "windows", "top level")
    reader.unknown(section, {"reboots", "power", "timeout_per_node"}, "windows")
    return WindowsConfig(reboots=reader.whole(section, "reboots", None, "windows"),
                         power=reader.whole(section, "power", None, "windows"),
                         timeout_per_node=reader.number(section, "timeout_per_node", 0.0, "windows"))


def users_section(reader: ConfigReader, data: Mapping[str, Any]) -> UsersConfig:
    """Return the ``users`` section (user database lookups; defaults when absent)."""
    section = reader.mapping(data, "users", "top level")
    reader.unknown(section, {"timeout", "ttl", "stale_for", "max_lookups"}, "users")
    default = UsersConfig()
    timeout = reader.number(section, "timeout", default.timeout, "users", minimum=0.1)
    if timeout >= HELLO_TIMEOUT:  # a local peer's hello must not wait longer than the session's hello timeout
        reader.problem("users", f"'timeout' must be under {HELLO_TIMEOUT:g} seconds, the time a session has for "
                       f"its hello (got {timeout:g})")
        timeout = default.timeout
    ttl = reader.number(section, "ttl", default.ttl, "users", minimum=0.0)
    stale_for = reader.number(section, "stale_for", default.stale_for, "users", minimum=0.0)
    if stale_for < ttl:
        reader.problem("users", f"'stale_for' ({stale_for:g}) must be at least 'ttl' ({ttl:g})")
        stale_for = default.stale_for  # parse_config raises on any problem: the value is never used
    return UsersConfig(timeout=timeout, ttl=ttl, stale_for=stale_for,
                       max_lookups=reader.whole(section, "max_lookups", default.max_lookups, "users"))


def boot_section(reader: ConfigReader, data: Mapping[str, Any]) -> BootConfig:
    """Return the ``boot`` section."""
    section = reader.mapping(data, "boot", "top level")
    reader.unknown(section, {"ethers", "kernel", "initrd", "cmdline", "tftp_dir", "server", "token_ttl",
                             "uefi_binary"}, "boot")
    paths = {key: reader.optional_text(section, key, "boot")
             for key in ("ethers", "kernel", "initrd", "tftp_dir", "uefi_binary")}
    if bool(paths["kernel"]) != bool(paths["initrd"]):
        reader.problem("boot", "'kernel' and 'initrd' (the installer's files) go together")
    return BootConfig(**{k: Path(v) if v else None for k, v in paths.items()},
                      cmdline=reader.text(section, "cmdline", "", "boot"),
                      server=reader.optional_text(section, "server", "boot"),
                      token_ttl=reader.number(section, "token_ttl", 7200.0, "boot", minimum=10.0))


def tls_section(reader: ConfigReader, data: Mapping[str, Any]) -> TlsConfig:
    """Return the ``tls`` section (docs/configuration.md); ``mode: plain`` turns TLS off explicitly."""
    section = reader.mapping(data, "tls", "top level")
    reader.unknown(section, {"mode", "cert", "key", "ca", "client_certs", "san"}, "tls")
    files = {key: reader.optional_text(section, key, "tls") for key in ("cert", "key", "ca")}
    if bool(files["cert"]) != bool(files["key"]):
        reader.problem("tls", "'cert' and 'key' (the server certificate and its private key) go together")
    san = section.get("san") or []
    if not isinstance(san, list) or not all(isinstance(n, str) and n for n in san):
        reader.problem("tls", f"'san' must be a list of host names and IP addresses (got {san!r})")
        san = []
    return TlsConfig(mode=reader.text(section, "mode", "tls", "tls", TLS_MODES),
                     client_certs=reader.text(section, "client_certs", "optional", "tls", CLIENT_CERT_MODES),
                     san=tuple(san), **{k: Path(v) if v else None for k, v in files.items()})


#: Feature names that work in every Slurm mode: node_features/helpers accepts only [A-Za-z_][A-Za-z0-9_.=]*
#: (measured with Debian's Slurm 22.05, docs/slurm.md); '=' is left out as it reads like an assignment.
_FEATURE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def scheduler_section(reader: ConfigReader, data: Mapping[str, Any]) -> tuple[dict[str, str], str | None, bool]:
    """Return (feature -> image, default image, release to default) from the ``scheduler`` section."""
    section = reader.mapping(data, "scheduler", "top level")
    reader.unknown(section, {"features", "default_image", "release_to_default"}, "scheduler")
    features: dict[str, str] = {}
    for feature, image in reader.mapping(section, "features", "scheduler").items():
        if not isinstance(feature, str) or not _FEATURE.match(feature):
            reader.problem("scheduler.features", f"feature {feature!r} must start with a letter or '_' and use "
                           "only letters, digits, '_' and '.', so that it works in every Slurm mode")
        elif not isinstance(image, str) or not image:
            reader.problem(f"scheduler.features.{feature}", "must name an image id like debian-12-1")
        else:
            features[feature] = image
    default_image = reader.optional_text(section, "default_image", "scheduler")
    release = reader.flag(section, "release_to_default", False, "scheduler")
    if release and not default_image:
        reader.problem("scheduler", "'release_to_default' needs a 'default_image'")
    return features, default_image, release


_EFI_NUMBER = re.compile(r"^[0-9A-Fa-f]{1,4}$")


def _boot_entries(reader: ConfigReader, where: str, data: Mapping[str, Any], methods: set[str]) -> dict[str, str]:
    """Return a group's ``boot_entries`` ({installer: ..., disk: ...}); next-boot methods need both."""
    entries: dict[str, str] = {}
    for boot, entry in reader.mapping(data, "boot_entries", where).items():
        if boot not in ("installer", "disk"):
            reader.problem(f"{where}.boot_entries", f"unknown boot '{boot}' (known: disk, installer)")
        elif isinstance(entry, bool) or not isinstance(entry, str | int) or str(entry) == "":
            reader.problem(f"{where}.boot_entries", f"'{boot}' must name a boot entry (got {entry!r})")
        else:
            entries[boot] = str(entry)
    used = sorted(methods & NEXT_BOOT_METHODS)
    if used and set(entries) != {"installer", "disk"}:
        reader.problem(where, f"method(s) {', '.join(used)} need 'boot_entries' with both 'installer' and 'disk' "
                       "(the grub menu entry or EFI boot number of each)")
    if "efi_bootnext" in methods:
        for boot, entry in entries.items():
            if not _EFI_NUMBER.match(entry):
                reader.problem(f"{where}.boot_entries", f"'{boot}': efi_bootnext needs a hexadecimal EFI boot "
                               f"number like \"0003\" (quote it in YAML), not {entry!r}")
    return entries


def policy_section(reader: ConfigReader, name: str, data: Any) -> Policy:
    where = f"groups.{name}"
    if not isinstance(data, Mapping):
        reader.problem(where, "a group must be a mapping")
        return Policy()
    reader.unknown(data, {"ladder", "install_timeout", "install_attempts", "boot_entries", "resume_for",
                          "bmc", "distribution"}, where)  # bmc, distribution: read by bmc_section, distribution_section
    rungs: list[Rung] = []
    for index, item in enumerate(data.get("ladder") or []):
        spot = f"{where}.ladder[{index}]"
        if not isinstance(item, Mapping):
            reader.problem(spot, "a rung is a mapping like {method: reboot, timeout: 300}")
            continue
        method = reader.text(item, "method", "reboot", spot)
        if method not in LADDER_METHODS:
            reader.problem(spot, f"unknown method '{method}' (known: {', '.join(sorted(LADDER_METHODS))})")
            method = RebootMethod.REBOOT  # reported above; the configuration is refused
        rungs.append(Rung(RebootMethod(method), reader.number(item, "timeout", 300.0, spot, minimum=1.0)))
    entries = _boot_entries(reader, where, data, {r.method for r in rungs})
    default = Policy()
    return Policy(
        boot_entries=entries,
        ladder=tuple(rungs) or default.ladder,
        install_timeout=reader.number(data, "install_timeout", default.install_timeout, where, minimum=1.0),
        install_attempts=int(reader.number(data, "install_attempts", default.install_attempts, where, 1.0)),
        resume_for=reader.number(data, "resume_for", 0.0, where) if "resume_for" in data else None,
    )


def retention_section(reader: ConfigReader, data: Mapping[str, Any]) -> RetentionConfig:
    """Return the ``retention`` section (docs/configuration.md; defaults when absent)."""
    section = reader.mapping(data, "retention", "top level")
    reader.unknown(section, {"events_days", "max_events", "period_days", "rollups_days", "interval", "batch"},
                   "retention")
    default = RetentionConfig()
    events_days = reader.number(section, "events_days", default.events_days, "retention", minimum=0.01)
    period_days = reader.number(section, "period_days", default.period_days, "retention", minimum=0.01)
    rollups_days = reader.number(section, "rollups_days", default.rollups_days, "retention", minimum=0.01)
    if rollups_days < events_days:
        reader.problem("retention", f"'rollups_days' ({rollups_days:g}) must be at least 'events_days' "
                       f"({events_days:g}): roll-ups keep what the events no longer hold")
    return RetentionConfig(events_days=events_days,
                           max_events=reader.whole(section, "max_events", default.max_events, "retention"),
                           period_days=period_days, rollups_days=rollups_days,
                           interval=reader.number(section, "interval", default.interval, "retention", minimum=1.0),
                           batch=reader.whole(section, "batch", default.batch, "retention"))


# --- image distribution (cidd/distribution.py, docs/distribution.md) ---------------------------------------

DISTRIBUTION_METHODS = ("http", "multicast")


@dataclass(frozen=True)
class DistributionConfig:
    """How a group's installers get image bytes: ``http`` (each node downloads from cidd's HTTP port) or
    ``multicast`` (cidd sends each image once to every node installing it at about the same time, with udpcast;
    HTTP stays the fallback of every node the multicast fails).

    ``rate_mbit``: the sender's bit rate cap (udp-sender ``--max-bitrate``; None: udpcast's own pacing), set it a
    little under the slowest node link. ``gather``: seconds cidd waits after a session's first node for more nodes
    of the same image before it starts sending. ``wait``: seconds the sender then waits for receivers that have
    not connected yet. ``port_base``: UDP ports ``port_base + 2k`` and ``+ 2k + 1`` carry session ``k`` (at most
    ``sessions`` at once). ``interface``: the head node's interface on the provisioning network (None: udpcast's
    choice). ``address``: the multicast data address (None: udpcast derives it from the head node's address).
    ``drop_after``: retransmission rounds a silent receiver gets before the sender drops it. ``stall``: seconds
    without data after which an installer gives the multicast up and continues over HTTP.
    """

    method: str = "http"
    rate_mbit: float | None = None
    gather: float = 2.0
    wait: float = 10.0
    port_base: int = 9000
    sessions: int = 8
    interface: str | None = None
    address: str | None = None
    drop_after: int = 30
    stall: float = 10.0


def distribution_section(reader: ConfigReader, name: str, data: Any) -> DistributionConfig:
    """Return the ``distribution`` of group ``name`` (``{method: http}`` when absent); problems go to ``reader``."""
    where = f"groups.{name}.distribution"
    if not isinstance(data, Mapping) or "distribution" not in data:
        return DistributionConfig()
    section = data.get("distribution")
    if not isinstance(section, Mapping):
        reader.problem(where, "must be a mapping like {method: multicast, rate_mbit: 900}")
        return DistributionConfig()
    reader.unknown(section, {"method", "rate_mbit", "gather", "wait", "port_base", "sessions", "interface",
                             "address", "drop_after", "stall"}, where)
    default = DistributionConfig()
    rate = None
    if section.get("rate_mbit") is not None:
        rate = reader.number(section, "rate_mbit", 0.0, where, minimum=0.1)
    port_base = reader.port(section, "port_base", default.port_base, where)
    sessions = reader.whole(section, "sessions", default.sessions, where)
    if port_base + 2 * sessions > 65535 or port_base < 1024:
        reader.problem(where, f"'port_base' {port_base} with {sessions} sessions needs ports {port_base} to "
                       f"{port_base + 2 * sessions - 1}: choose a base from 1024 up that leaves room for them")
    return DistributionConfig(
        method=reader.text(section, "method", "http", where, DISTRIBUTION_METHODS),
        rate_mbit=rate,
        gather=reader.number(section, "gather", default.gather, where),
        wait=reader.number(section, "wait", default.wait, where, minimum=1.0),
        port_base=port_base,
        sessions=sessions,
        interface=reader.optional_text(section, "interface", where),
        address=reader.optional_text(section, "address", where),
        drop_after=reader.whole(section, "drop_after", default.drop_after, where),
        stall=reader.number(section, "stall", default.stall, where, minimum=1.0),
    )
