"""cidd's local Unix socket for clients on the head node, and the wiring of security events into /metrics.

The socket (``socket:`` in cidd.yaml, default ``<state_dir>/cidd.sock``) takes client sessions without a
token: the peer's uid/gid (SO_PEERCRED) decides its role (cidd/unix_peers.py). The file is mode 0666 by
default: the peer check, not the file mode, is the authorisation, so that anybody may ask and only the
users named in ``socket.roles`` (plus root and cidd's own user) get in.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Mapping
from typing import Any

import structlog
from twisted.internet.task import LoopingCall

from cidcommon.errors import CidError
from cidd.engine import Engine
from cidd.metrics import Metrics
from cidd.security_events import SecurityEvents
from cidd.sessions import CiddFactory, Sessions
from cidd.unix_peers import MAX_SOCKET_PATH
from cidd.user_directory import UserDirectory

log = structlog.get_logger(__name__)

FLUSH_S = 10.0


class SocketError(CidError):
    """The local socket cannot be created (path in use by a live cidd, not a socket, too long)."""

    code = "internal"


def count_refusals(metrics: Metrics, security: SecurityEvents, reactor: Any) -> LoopingCall:
    """Count every refusal in ``cid_security_refusals_total{kind}``; flush suppressed counts periodically.

    Returns the started LoopingCall that flushes the rate limiter's ended windows.
    """
    counter = metrics.counter("cid_security_refusals_total", "Refused peers and requests by kind.", ("kind",))
    security.count = lambda kind: counter.labels(kind=kind).inc()
    flush = LoopingCall(security.flush)
    flush.clock = reactor
    flush.start(FLUSH_S, now=False)
    return flush


def listen_unix(engine: Engine, sessions: Sessions, tokens: Mapping[str, str], reactor: Any,
                security: SecurityEvents, directory: UserDirectory) -> Any:
    """Listen on the configured local socket; return the listening port, or None when disabled or impossible.

    A socket path that is too long when it is only the default is skipped with a warning; a configured one
    that cannot be used raises SocketError.
    """
    config = engine.config
    path = config.socket_path
    if path is None:
        return None
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        if config.socket.path is None:
            log.warning("socket.skipped", path=str(path), reason="the default path is too long for a Unix socket")
            return None
        raise SocketError(f"socket path {path} is too long for a Unix socket; set socket.path in cidd.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    factory = CiddFactory(engine, sessions, tokens, reactor, security, unix=True, directory=directory)
    port = reactor.listenUNIX(str(path), factory, mode=config.socket.mode, backlog=128)
    os.chmod(path, config.socket.mode)
    log.info("socket.listening", path=str(path), mode=f"{config.socket.mode:04o}")
    return port


def remove_stale(path: Any) -> None:
    """Remove a socket file left by a dead cidd. Raises SocketError when a cidd answers there or it is no socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketError(f"{path} exists and is not a socket; remove it or choose another socket.path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        os.unlink(path)  # nobody listens: a stale file
        return
    finally:
        probe.close()
    raise SocketError(f"another process (a running cidd?) listens on {path}; stop it or choose another socket.path")
