"""How a client finds cidd: one socket or one server, chosen in one place (docs/configuration.md, "How clients
find cidd"). Pure: reads the environment and at most one YAML file; no Twisted, no socket. First match wins:

1. the command line (``ClientOptions``); 2. the environment (CID_SOCKET, CID_SERVER, CID_TOKEN_FILE, CID_CA_FILE,
CID_CERT_FILE, CID_KEY_FILE, CID_PLAIN_TCP, CID_ROLE, CID_STATE_DIR; a token file asks for TCP); 3. the file
$CID_CONFIG, else ``/etc/cid/cidd.yaml`` when it exists: its ``client`` section (``server``, ``token_file``,
``ca``, ``role``: hosts other than the head node), else cidd's own keys (the socket ``socket.path`` or
``<state_dir>/cidd.sock``; the ``listen`` address with ``socket: false`` or a token file); 4. the socket of the
default state directory.

``resolve`` returns a ``ClientConfig``: exactly one way to reach cidd and where it came from. A client that cannot
reach it fails naming it; it never tries a second address.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cidcommon.errors import CidError
from cidcommon.hostport import format_hostport, parse_hostport
from cidcommon.paths import default_state_dir, token_path
from cidcommon.wire import CLIENT_ROLES, DEFAULT_PORT

CONFIG_ENV = "CID_CONFIG"
DEFAULT_CONFIG_DIR = Path("/etc/cid")
CONFIG_NAME = "cidd.yaml"
CLIENT_KEYS = ("ca", "role", "server", "token_file")
_TRUE = ("1", "yes", "true")


class ClientConfigError(CidError):
    """The configuration file, or a variable naming cidd, is unusable; the message names the file (or variable)
    and the key. A bad request: cidcapt exits 2."""

    code = "bad_request"


@dataclass(frozen=True)
class ClientOptions:
    """What the command line says; None (or False) where an option was not given."""

    socket: Path | None = None
    server: str | None = None  # HOST:PORT as typed
    token_file: Path | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    role: str | None = None
    plain: bool = False


@dataclass(frozen=True)
class FileSettings:
    """What clients take from the configuration file ``path`` (None: the file does not say)."""

    path: Path
    state_dir: Path | None = None
    listen: tuple[str, int] = ("127.0.0.1", DEFAULT_PORT)
    socket_enabled: bool = True
    socket_path: Path | None = None
    plain: bool = False  # tls.mode: plain
    tls_ca: Path | None = None  # tls.ca, the daemon's CA file
    server: tuple[str, int] | None = None  # client.server
    token_file: Path | None = None  # client.token_file
    ca: Path | None = None  # client.ca
    role: str | None = None  # client.role


@dataclass(frozen=True)
class ClientConfig:
    """Exactly one way to reach cidd: the local ``socket`` (no token, no TLS), or ``server`` (HOST, PORT) with a
    token file and TLS files (``ca`` None and ``plain`` True for clear-text TCP). ``origin`` says where the
    choice came from (an option, a variable, the file and its key, or the built-in default)."""

    socket: Path | None
    server: tuple[str, int] | None
    origin: str
    role: str
    state_dir: Path
    token_file: Path | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    plain: bool = False
    config_file: Path | None = None  # the file that was read, if any

    def __post_init__(self) -> None:
        if (self.socket is None) == (self.server is None):
            raise ValueError("a ClientConfig names exactly one of socket and server")

    @property
    def address(self) -> str:
        """Return the socket's path or ``HOST:PORT``."""
        return format_hostport(*self.server) if self.server is not None else str(self.socket)

    @property
    def host_port(self) -> tuple[str, int]:
        """Return (host, port), or (socket path, 0) for the socket (the connection code's convention)."""
        return self.server if self.server is not None else (str(self.socket), 0)

    @property
    def label(self) -> str:
        """Return where the address came from for messages, "" when it was typed on the command line."""
        return "" if self.origin.startswith("--") else self.origin

    @property
    def where(self) -> str:
        """Return the address and its origin for messages: ``/var/lib/cid/cidd.sock (from /etc/cid/cidd.yaml)``."""
        return f"{self.address} (from {self.label})" if self.label else self.address


def config_path(env: Mapping[str, str], config_dir: Path = DEFAULT_CONFIG_DIR) -> Path | None:
    """Return the configuration file to read: $CID_CONFIG, else ``<config_dir>/cidd.yaml`` when it exists, else None.
    Raises ClientConfigError when $CID_CONFIG names no file."""
    named = env.get(CONFIG_ENV)
    if named:
        if not Path(named).is_file():
            raise ClientConfigError(f"${CONFIG_ENV} names {named}, which is not a file; point it at cidd's "
                                    "configuration (cidd.yaml), or unset it")
        return Path(named)
    default = Path(config_dir) / CONFIG_NAME
    return default if default.exists() else None


def _text(data: Mapping[str, Any], key: str, where: str, problems: list[tuple[str, str]]) -> str | None:
    """Return ``data[key]`` when it is a non-empty string, None when absent; note a problem otherwise."""
    value = data.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        problems.append((where, f"'{key}' must be a non-empty string (got {value!r})"))
        return None
    return value


def _mapping(data: Mapping[str, Any], key: str, problems: list[tuple[str, str]]) -> Mapping[str, Any]:
    """Return the mapping ``data[key]`` ({} when absent); note a problem when it is something else."""
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        problems.append((key, f"must be a mapping (got {value!r})"))
        return {}
    return value


def client_section(data: Any) -> tuple[FileSettings | None, list[tuple[str, str]]]:
    """Return (the ``client`` section's settings on a placeholder path, its problems as (key, sentence) pairs).
    Used by the clients and by cidd's own configuration check, so that both accept the same section."""
    problems: list[tuple[str, str]] = []
    if data is None:
        return FileSettings(Path()), problems
    if not isinstance(data, Mapping):
        return None, [("client", f"must be a mapping of {', '.join(CLIENT_KEYS)} (got {data!r})")]
    unknown = sorted(str(k) for k in data if k not in CLIENT_KEYS)
    if unknown:
        problems.append(("client", f"unknown key(s) {', '.join(unknown)} (known: {', '.join(CLIENT_KEYS)})"))
    server_text = _text(data, "server", "client", problems)
    server = None
    if server_text is not None:
        try:
            server = parse_hostport(server_text, DEFAULT_PORT, what="client.server address")
        except ValueError as exc:
            problems.append(("client", str(exc)))
    role = _text(data, "role", "client", problems)
    if role is not None and role not in CLIENT_ROLES:
        problems.append(("client", f"'role' must be one of {', '.join(CLIENT_ROLES)} (got {role!r})"))
        role = None
    token, ca = _text(data, "token_file", "client", problems), _text(data, "ca", "client", problems)
    return FileSettings(Path(), server=server, role=role, token_file=Path(token) if token else None,
                        ca=Path(ca) if ca else None), problems


def parse_settings(data: Any, path: Path) -> FileSettings:
    """Return what clients need from the loaded YAML ``data`` of ``path``: cidd's ``state_dir``, ``listen``,
    ``socket`` and ``tls`` keys, and the ``client`` section. Other keys are cidd's business and are not checked.
    Raises ClientConfigError listing every problem, each naming the file and the key."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ClientConfigError(f"{path}: the configuration must be a mapping of keys to values")
    client, problems = client_section(data.get("client"))
    state_dir = _text(data, "state_dir", "state_dir", problems)
    listen, tls = _mapping(data, "listen", problems), _mapping(data, "tls", problems)
    host = _text(listen, "host", "listen", problems) or "127.0.0.1"
    port = listen.get("port", DEFAULT_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        problems.append(("listen", f"'port' must be a TCP port number from 0 to 65535 (got {port!r})"))
        port = DEFAULT_PORT
    socket = data.get("socket")
    enabled, socket_path = socket is not False, None
    if isinstance(socket, Mapping):
        enabled = socket.get("enabled", True) is not False
        socket_path = _text(socket, "path", "socket", problems)
        if socket_path is not None and not socket_path.startswith("/"):
            problems.append(("socket", f"'path' must be an absolute path (got {socket_path!r})"))
    elif socket is not None and socket is not False:
        problems.append(("socket", f"must be a mapping like {{path: /run/cid/cidd.sock}} or false (got {socket!r})"))
    mode = tls.get("mode", "tls")
    if mode not in ("tls", "plain"):
        problems.append(("tls", f"'mode' must be tls or plain (got {mode!r})"))
    tls_ca = _text(tls, "ca", "tls", problems)
    if problems or client is None:
        raise ClientConfigError("\n".join(f"{path}: {where}: {text}" for where, text in problems) +
                                f"\nfix {path} (docs/configuration.md), or point ${CONFIG_ENV} at another file")
    return FileSettings(path, state_dir=Path(state_dir) if state_dir else None, listen=(host, port),
                        socket_enabled=enabled, socket_path=Path(socket_path) if socket_path else None,
                        plain=mode == "plain", tls_ca=Path(tls_ca) if tls_ca else None, server=client.server,
                        token_file=client.token_file, ca=client.ca, role=client.role)


def load_settings(path: Path) -> FileSettings:
    """Return the settings of the configuration file ``path``. Raises ClientConfigError naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ClientConfigError(f"cannot read cidd's configuration {path}: {exc.strerror}; clients read it to find "
                                f"cidd: make it readable (it holds no secret), or set ${CONFIG_ENV}") from None
    except yaml.YAMLError as exc:
        raise ClientConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_settings(data, Path(path))


def _env_path(env: Mapping[str, str], name: str) -> Path | None:
    """Return the path in the variable ``name`` of ``env``, None when it is unset or empty."""
    return Path(env[name]) if env.get(name) else None


def _tcp_server(file: FileSettings | None) -> tuple[tuple[str, int], str]:
    """Return (the TCP address, its origin) from the file (client.server, else listen), else 127.0.0.1:38008.
    Raises ClientConfigError when the listen port is 0 (any free port: nobody can find it)."""
    if file is None:
        return ("127.0.0.1", DEFAULT_PORT), "the built-in default"
    if file.server is not None:
        return file.server, f"{file.path}, client.server"
    host, port = file.listen
    if port == 0:
        raise ClientConfigError(f"{file.path}: listen: port 0 (any free port) cannot be found by clients; set "
                                "client.server, or pass --server HOST:PORT")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return (host, port), f"{file.path}, listen"


def resolve(options: ClientOptions = ClientOptions(), env: Mapping[str, str] | None = None, *,
            config_dir: Path = DEFAULT_CONFIG_DIR, default_role: str = "admin") -> ClientConfig:
    """Return how to reach cidd from ``options``, then ``env`` (default the process's), then the configuration
    file ($CID_CONFIG, else ``<config_dir>/cidd.yaml`` when it exists), then the built-in default (module doc).
    Raises ClientConfigError for --socket with --server, a bad $CID_SERVER or $CID_ROLE, an unusable file."""
    env = os.environ if env is None else env
    if options.socket is not None and options.server is not None:
        raise ClientConfigError("use either --socket (local, no token) or --server (TCP, with a token)")
    path = config_path(env, config_dir)
    file = load_settings(path) if path is not None else None
    if env.get("CID_STATE_DIR"):
        state_dir, state_origin = Path(env["CID_STATE_DIR"]), "$CID_STATE_DIR"
    elif file is not None and file.state_dir is not None:
        state_dir, state_origin = file.state_dir, f"{file.path}, state_dir"
    else:
        state_dir, state_origin = default_state_dir(env), "the default state directory"
    role = options.role or env.get("CID_ROLE") or (file.role if file else None) or default_role
    if role not in CLIENT_ROLES:
        raise ClientConfigError(f"unknown role {role!r} (--role or $CID_ROLE); use one of {', '.join(CLIENT_ROLES)}")
    given_token = options.token_file or _env_path(env, "CID_TOKEN_FILE")
    socket: Path | None = None
    server: tuple[str, int] | None = None
    if options.socket is not None or (options.server is None and env.get("CID_SOCKET")):
        socket, origin = (options.socket, "--socket") if options.socket else (Path(env["CID_SOCKET"]), "$CID_SOCKET")
    elif options.server is not None or env.get("CID_SERVER"):
        text, origin = (options.server, "--server") if options.server else (env["CID_SERVER"], "$CID_SERVER")
        try:
            server = parse_hostport(text, DEFAULT_PORT)
        except ValueError as exc:
            raise ClientConfigError(f"{origin}: {exc}") from None
    elif given_token is not None or (file is not None and (file.server is not None or not file.socket_enabled)):
        server, origin = _tcp_server(file)  # a token file asks for TCP
    elif file is not None and file.socket_path is not None:
        socket, origin = file.socket_path, f"{file.path}, socket.path"
    else:  # the socket under the state directory: cidd's default socket.path
        socket = state_dir / "cidd.sock"
        origin = str(file.path) if file is not None and state_origin.startswith("the default") else state_origin
    if socket is not None:
        return ClientConfig(socket=socket, server=None, origin=origin, role=role, state_dir=state_dir,
                            config_file=path)
    plain = options.plain or env.get("CID_PLAIN_TCP", "").strip().lower() in _TRUE or bool(file and file.plain)
    ca = (options.ca or _env_path(env, "CID_CA_FILE") or ((file.ca or file.tls_ca) if file else None)
          or state_dir / "tls" / "ca.pem")
    token = given_token or (file.token_file if file else None) or token_path(state_dir, role)
    return ClientConfig(socket=None, server=server, origin=origin, role=role, state_dir=state_dir, token_file=token,
                        ca=None if plain else ca, cert=options.cert or _env_path(env, "CID_CERT_FILE"),
                        key=options.key or _env_path(env, "CID_KEY_FILE"), plain=plain, config_file=path)


def agent_server(env: Mapping[str, str] | None = None, *, config_dir: Path = DEFAULT_CONFIG_DIR) -> tuple[str, str]:
    """Return (HOST:PORT of cidd's agent port, where it came from) for an agent given no --server: $CID_SERVER,
    else the configuration file's client.server or listen address, else 127.0.0.1:38008. Agents never use the
    socket. Raises ClientConfigError for an unusable file."""
    env = os.environ if env is None else env
    if env.get("CID_SERVER"):
        return env["CID_SERVER"], "$CID_SERVER"
    path = config_path(env, config_dir)
    server, origin = _tcp_server(load_settings(path) if path is not None else None)
    return format_hostport(*server), origin
