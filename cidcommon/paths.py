"""Default locations and token files shared by cidd, cidkid and cidcapt.

Working defaults so that a bare ``cidd`` starts with no set-up, and cidkid/cidcapt on the same machine find
its tokens: the state directory is ``$CID_STATE_DIR``, else ``/var/lib/cid`` for root, else
``$XDG_STATE_HOME/cid`` (``~/.local/state/cid``).
"""

from __future__ import annotations

import base64
import hmac
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from cidcommon.errors import TokenFileError


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    """Return the state directory to use when no configuration names one, from ``env`` (default the process's
    environment): $CID_STATE_DIR, else /var/lib/cid for root, else $XDG_STATE_HOME/cid (~/.local/state/cid)."""
    env = os.environ if env is None else env
    if env.get("CID_STATE_DIR"):
        return Path(env["CID_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/cid")
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "cid"


def token_path(state_dir: Path, role: str) -> Path:
    """Return the path of the token file for ``role`` under ``state_dir``."""
    return Path(state_dir) / "secrets" / f"{role}.token"


def check_private(path: Path) -> None:
    """Raise TokenFileError when ``path`` is readable or writable by group or others."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenFileError(
            f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"secrets must be private: run 'chmod 600 {path}'"
        )


def read_token(path: Path, *, check_mode: bool = True) -> str:
    """Return the token stored in ``path`` (surrounding white space removed).

    Raises TokenFileError when the file is missing, unreadable, empty, or (with ``check_mode``) not private.
    """
    path = Path(path)
    try:
        if check_mode:
            check_private(path)
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise TokenFileError(
            f"token file {path} does not exist; start cidd once to create it, or pass --token-file"
        ) from None
    except OSError as exc:
        raise TokenFileError(f"cannot read token file {path}: {exc.strerror}; check its owner and mode") from None
    if not token:
        raise TokenFileError(f"token file {path} is empty; delete it and restart cidd to create a new one")
    return token


def ensure_token(path: Path) -> str:
    """Return the token in ``path``, creating the file (mode 0600, directory 0700) with a new random token."""
    path = Path(path)
    if path.exists():
        return read_token(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    token = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii").rstrip("=")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    return token


def tokens_equal(given: str, expected: str) -> bool:
    """Return whether two tokens are equal, in time independent of where they differ."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def node_token(master: str, node: str) -> str:
    """Return ``node``'s agent token: HMAC-SHA256 of the node name under the agent master secret, in hex.

    cidd holds the master (``<state>/secrets/agent.token``); each node holds only its own token
    (``cidd agent-token NODE``), so an agent cannot speak for another node.
    """
    return hmac.new(master.encode("utf-8"), node.encode("utf-8"), "sha256").hexdigest()


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 (replacing any file there). Raises OSError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Flush the directory ``path`` itself (its entries: a rename or a new file) to disk. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
