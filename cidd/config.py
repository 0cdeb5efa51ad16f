"""cidd configuration: parsed once from YAML into frozen objects, every problem reported together.

The sections below the top level (boot, bmc, tls, windows, users, scheduler, retention, groups' policies) are
in cidd.config_sections; this module holds Config and reads the top level.

Every key has a working default, so ``cidd`` with no file starts on a laptop: state under the default state
directory (cidcommon.paths), listening on loopback. See docs/configuration.md for every key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cidcommon import hostlists
from cidcommon.client_config import client_section
from cidcommon.errors import CidError
from cidcommon.paths import default_state_dir
from cidcommon.wire import DEFAULT_HTTP_PORT, DEFAULT_PORT, MAX_LINE
from cidd.config_sections import (
    BmcConfig,
    BootConfig,
    ConfigReader,
    DistributionConfig,
    RetentionConfig,
    TlsConfig,
    UsersConfig,
    WindowsConfig,
    bmc_section,
    boot_section,
    distribution_section,
    policy_section,
    retention_section,
    scheduler_section,
    tls_section,
    users_section,
    windows_section,
)
from cidd.core.machine_types import Policy
from cidd.core.rights import Rule, parse_rules
from cidd.unix_peers import SocketConfig, parse_socket


class ConfigError(CidError):
    """The configuration file is unreadable or wrong; the message lists every problem, one per line."""

    code = "bad_request"


@dataclass(frozen=True)
class NodeSpec:
    """A range of the node inventory: ``hosts`` (a hostlist) belongs to ``group``."""

    hosts: tuple[str, ...]
    group: str


@dataclass(frozen=True)
class Config:
    """The whole daemon configuration."""

    state_dir: Path
    catalog: Path
    catalog_required: bool = False
    image_dir: Path | None = None
    listen_host: str = "127.0.0.1"
    listen_port: int = DEFAULT_PORT
    http_host: str = "127.0.0.1"
    http_port: int = DEFAULT_HTTP_PORT
    public_http_url: str | None = None  # how nodes reach the HTTP port; default http://<http_host>:<port>
    db_synchronous: str = "full"  # SQLite durability: "full" (survives a power loss) or "normal" (a crash)
    restart_grace: float = 90.0  # after a restart, waiting deadlines are at least this far away (agents reconnect)
    heartbeat: float = 10.0
    heartbeat_rate: float = 250.0  # heartbeats/s cidd aims for: many agents get a longer interval (core/heartbeats.py)
    request_timeout: float = 30.0
    capture_timeout: float = 3600.0
    max_line: int = MAX_LINE
    auto_register: bool = True
    log_format: str = "json"
    log_level: str = "info"
    groups: Mapping[str, Policy] = field(default_factory=lambda: {"default": Policy()})
    nodes: tuple[NodeSpec, ...] = ()
    features: Mapping[str, str] = field(default_factory=dict)  # scheduler node feature -> image id
    default_image: str | None = None  # image for jobs that ask for no cid feature (None: leave nodes alone)
    release_to_default: bool = False  # epilog: put nodes back into default_image after each job
    boot: BootConfig = field(default_factory=lambda: BootConfig())
    bmc: BmcConfig | None = None  # None: no BMC power (ladders may not use power_cycle)
    rights: tuple[Rule, ...] | None = None  # None: no 'rights' section (shared images for all, cidd/core/rights.py)
    socket: SocketConfig = field(default_factory=SocketConfig)  # the local Unix socket (cidd/unix_peers.py)
    windows: WindowsConfig = field(default_factory=lambda: WindowsConfig())
    users: UsersConfig = field(default_factory=lambda: UsersConfig())
    tls: TlsConfig = field(default_factory=lambda: TlsConfig())
    #: group name -> how its installers get image bytes (cidd/distribution.py); absent groups use HTTP
    distribution: Mapping[str, DistributionConfig] = field(default_factory=dict)
    retention: RetentionConfig = field(default_factory=lambda: RetentionConfig())  # cidd/history.py

    @property
    def db_path(self) -> Path:
        """Return the SQLite database path."""
        return self.state_dir / "cidd.sqlite"

    @property
    def socket_path(self) -> Path | None:
        """Return the local Unix socket's path, or None when it is disabled."""
        if not self.socket.enabled:
            return None
        return self.socket.path or self.state_dir / "cidd.sock"

    @property
    def agent_address(self) -> str:
        """Return HOST:PORT of the agent port as installers reach it (boot.server, else the listen address)."""
        return self.boot.server or f"{self.listen_host}:{self.listen_port}"

    @property
    def http_base(self) -> str:
        """Return the base URL nodes use for images and boot scripts."""
        return self.public_http_url or f"http://{self.http_host}:{self.http_port}"

    def inventory(self) -> dict[str, str]:
        """Return {node name: group name} for every node declared in ``nodes``."""
        names: dict[str, str] = {}
        for spec in self.nodes:
            for name in spec.hosts:
                names[name] = spec.group
        return names

    def distribution_of(self, group: str) -> DistributionConfig:
        """Return the distribution of ``group`` (the default group's when it sets none, else HTTP)."""
        return self.distribution.get(group) or self.distribution.get("default") or DistributionConfig()

    def policy(self, group: str) -> Policy:
        """Return the policy of ``group`` (the default group's when unknown)."""
        return self.groups.get(group) or self.groups["default"]


_TOP_KEYS = {"state_dir", "catalog", "image_dir", "listen", "http", "heartbeat", "request_timeout", "restart_grace",
             "capture_timeout", "max_line", "auto_register", "log", "groups", "nodes", "scheduler", "boot", "bmc",
             "windows", "users"}
_TOP_KEYS |= {"rights", "socket", "tls", "database"}  # cidd/core/rights.py, cidd/unix_peers.py, cidd/tls.py
_TOP_KEYS |= {"retention"}  # the event history and its roll-ups: cidd/history.py
_TOP_KEYS |= {"heartbeat_rate"}  # the interval given to agents grows with their number: cidd/core/heartbeats.py
_TOP_KEYS |= {"client"}  # how clients on other hosts reach cidd: cidcommon/client_config.py (cidd does not use it)


def parse_config(data: Any, path: str = "cidd.yaml", env_state_dir: Path | None = None) -> Config:
    """Return the Config described by ``data`` (the loaded YAML). Raises ConfigError listing every problem."""
    reader = ConfigReader(path)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the configuration must be a mapping of keys to values")
    reader.unknown(data, _TOP_KEYS, "top level")
    state_dir = Path(reader.text(data, "state_dir", str(env_state_dir or default_state_dir()), "top level"))
    listen = reader.mapping(data, "listen", "top level")
    http = reader.mapping(data, "http", "top level")
    log = reader.mapping(data, "log", "top level")
    database = reader.mapping(data, "database", "top level")
    reader.unknown(database, {"synchronous"}, "database")
    reader.unknown(listen, {"host", "port"}, "listen")
    reader.unknown(http, {"host", "port", "public_url"}, "http")
    reader.unknown(log, {"format", "level"}, "log")
    groups = {"default": Policy()}
    distribution: dict[str, DistributionConfig] = {}
    for name, group in reader.mapping(data, "groups", "top level").items():
        groups[str(name)] = policy_section(reader, str(name), group)
        if isinstance(group, Mapping) and "distribution" in group:
            distribution[str(name)] = distribution_section(reader, str(name), group)
    specs: list[NodeSpec] = []
    node_items = data.get("nodes") or []
    if not isinstance(node_items, list):
        reader.problem("nodes", "'nodes' must be a list of {hosts: HOSTLIST, group: NAME} entries")
        node_items = []
    for index, item in enumerate(node_items):
        where = f"nodes[{index}]"
        if not isinstance(item, Mapping) or "hosts" not in item:
            reader.problem(where, "each entry needs 'hosts' (a hostlist) and optionally 'group'")
            continue
        reader.unknown(item, {"hosts", "group"}, where)
        group = reader.text(item, "group", "default", where)
        if group not in groups:
            reader.problem(where, f"group '{group}' is not defined under 'groups'")
        try:
            specs.append(NodeSpec(tuple(hostlists.expand(str(item["hosts"]))), group))
        except CidError as exc:
            reader.problem(where, exc.message)
    features, default_image, release_to_default = scheduler_section(reader, data)
    for where, problem in client_section(data.get("client"))[1]:  # checked as every client reads it
        reader.problem(where, problem)
    catalog = reader.optional_text(data, "catalog", "top level")
    image_dir = reader.optional_text(data, "image_dir", "top level")
    config = Config(
        state_dir=state_dir,
        catalog=Path(catalog) if catalog else state_dir / "images.yaml",
        catalog_required=bool(catalog),
        image_dir=Path(image_dir) if image_dir else None,
        listen_host=reader.text(listen, "host", "127.0.0.1", "listen"),
        listen_port=reader.port(listen, "port", DEFAULT_PORT, "listen"),
        http_host=reader.text(http, "host", "127.0.0.1", "http"),
        http_port=reader.port(http, "port", DEFAULT_HTTP_PORT, "http"),
        public_http_url=reader.optional_text(http, "public_url", "http"),
        heartbeat=reader.number(data, "heartbeat", 10.0, "top level", minimum=0.1),
        heartbeat_rate=reader.number(data, "heartbeat_rate", 250.0, "top level"),
        request_timeout=reader.number(data, "request_timeout", 30.0, "top level", minimum=0.1),
        capture_timeout=reader.number(data, "capture_timeout", 3600.0, "top level", minimum=1.0),
        restart_grace=reader.number(data, "restart_grace", 90.0, "top level"),
        max_line=int(reader.number(data, "max_line", MAX_LINE, "top level", minimum=1024)),
        auto_register=reader.flag(data, "auto_register", not specs, "top level"),
        log_format=reader.text(log, "format", "json", "log", ("json", "console")),
        log_level=reader.text(log, "level", "info", "log", ("debug", "info", "warning", "error")),
        db_synchronous=reader.text(database, "synchronous", "full", "database", ("full", "normal")),
        groups=groups,
        nodes=tuple(specs),
        features=features,
        default_image=default_image,
        release_to_default=release_to_default,
        boot=boot_section(reader, data),
        bmc=bmc_section(reader, data, groups),
        rights=parse_rules(data.get("rights"), reader.problem),
        socket=parse_socket(data.get("socket"), reader.problem),
        windows=windows_section(reader, data),
        users=users_section(reader, data),
        tls=tls_section(reader, data),
        distribution=distribution,
        retention=retention_section(reader, data),
    )
    if reader.problems:
        raise ConfigError("\n".join(reader.problems) + "\nfix these and start cidd again")
    return config


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Return the Config from the YAML file ``path``, or the defaults when ``path`` is None.

    Raises ConfigError when the file cannot be read or parsed, or has wrong values (all listed).
    """
    if path is None:
        return parse_config({}, "defaults")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}; check --config") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, str(path))
