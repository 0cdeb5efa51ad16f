"""Who gets which role on cidd's local Unix socket: the ``socket:`` section of cidd.yaml and the uid mapping.

Clients on the head node connect to the socket without a token; cidd reads the peer's uid and gid with
SO_PEERCRED (cidd.sessions) and ``socket_role`` maps them to a role. Root, and the user cidd runs as (who can
read the token files anyway), are always admin; ``roles`` lists users, ``@groups`` and ``*`` per role; the
highest role that matches wins; anybody else is refused. Pure: no reactor, no socket.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Client roles from the highest to the lowest.
ROLE_ORDER = ("admin", "scheduler", "reader")
#: Longest path a Unix socket address holds on Linux (sun_path is 108 bytes with the final NUL).
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class SocketConfig:
    """The local socket: ``path`` None means the default ``<state_dir>/cidd.sock``."""

    enabled: bool = True
    path: Path | None = None
    mode: int = 0o666
    roles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class PeerIdentity:
    """A local peer: its uid, gid, user name and group names (from the head node's user database)."""

    uid: int
    gid: int
    user: str
    groups: frozenset[str]


def parse_socket(data: Any, problem: Callable[[str, str], None]) -> SocketConfig:
    """Return the ``socket`` section (defaults when absent); report mistakes through ``problem``."""
    if data is None:
        return SocketConfig()
    if data is False:
        return SocketConfig(enabled=False)
    if not isinstance(data, Mapping):
        problem("socket", "'socket' must be a mapping like {path: /run/cid/cidd.sock, roles: {scheduler: [slurm]}}"
                " or false")
        return SocketConfig()
    unknown = sorted(set(data) - {"enabled", "path", "mode", "roles"})
    if unknown:
        problem("socket", f"unknown key(s) {', '.join(map(str, unknown))} (known: enabled, mode, path, roles)")
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        problem("socket", f"'enabled' must be true or false (got {enabled!r})")
        enabled = True
    path = data.get("path")
    if path is not None and (not isinstance(path, str) or not path.startswith("/")):
        problem("socket", f"'path' must be an absolute path (got {path!r})")
        path = None
    if isinstance(path, str) and len(path.encode()) > MAX_SOCKET_PATH:
        problem("socket", f"'path' is longer than {MAX_SOCKET_PATH} bytes, the limit of a Unix socket address")
        path = None
    mode = data.get("mode", 0o666)
    if isinstance(mode, str):
        mode = int(mode, 8) if mode.isdigit() else -1
    if isinstance(mode, bool) or not isinstance(mode, int) or mode not in (0o600, 0o660, 0o666):
        problem("socket", f"'mode' must be 0600, 0660 or 0666 (got {data.get('mode')!r})")
        mode = 0o666
    roles: dict[str, tuple[str, ...]] = {}
    raw = data.get("roles") or {}
    if not isinstance(raw, Mapping):
        problem("socket.roles", "must map a role (admin, scheduler, reader) to a list of users, @groups or '*'")
        raw = {}
    for role, names in raw.items():
        if role not in ROLE_ORDER:
            problem("socket.roles", f"unknown role {role!r} (known: {', '.join(ROLE_ORDER)})")
            continue
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            problem(f"socket.roles.{role}", "must be a list of user names, '@group' names or '*'")
            continue
        roles[role] = tuple(names)
    return SocketConfig(enabled=enabled, path=Path(path) if path else None, mode=mode, roles=roles)


def socket_role(peer: PeerIdentity, roles: Mapping[str, tuple[str, ...]], own_uid: int) -> str | None:
    """Return the role of a local peer (the highest that matches), or None when it has none."""
    if peer.uid in (0, own_uid):
        return "admin"
    for role in ROLE_ORDER:
        for name in roles.get(role, ()):
            if name == "*" or name == peer.user or (name.startswith("@") and name[1:] in peer.groups):
                return role
    return None


def granted_role(mapped: str, requested: Any) -> str:
    """Return the role a socket session gets: the mapped one, or a lower client role the client asked for."""
    lower = isinstance(requested, str) and requested in ROLE_ORDER
    if lower and ROLE_ORDER.index(requested) > ROLE_ORDER.index(mapped):
        return requested
    return mapped
