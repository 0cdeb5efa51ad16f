"""Writing one image's entry into the catalog file: under ``<catalog>.lock``, through a temporary file that
replaces the old text atomically; only that entry changes."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from cidcatalog.catalog import CatalogError, CatalogProblem, Image, parse_catalog, upsert_entry_text
from cidcommon.paths import fsync_dir


def updated_catalog(text: str, image: Image, path: str) -> tuple[str, bool]:
    """Return (the catalog text with ``image``'s entry written, whether an entry was replaced).

    Raises CatalogError when ``text`` is not a valid catalog or cannot be edited.
    """
    old = parse_catalog(text, path)
    new = upsert_entry_text(text, image, path)
    if parse_catalog(new, path).get(image.id) != image:
        raise CatalogError([CatalogProblem(path, None, f"the edited catalog does not hold {image.id} as written")])
    return new, image.id in old


def read_catalog_text(path: Path) -> tuple[str, os.stat_result | None]:
    """Return (the catalog's text, its stat) or ("", None) when it does not exist. Raises CatalogError."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read(), os.fstat(handle.fileno())
    except FileNotFoundError:
        return "", None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 text ({exc.reason})"
        raise CatalogError([CatalogProblem(str(path), None, f"cannot read the catalog: {reason}")])


def update_catalog(path: Path, image: Image) -> bool:
    """Write ``image``'s entry into the catalog at ``path`` (created if missing); return whether it replaced one.

    Holds an exclusive flock on ``<path>.lock``, writes a temporary file in the same directory, fsyncs it and
    renames it over the catalog, keeping its mode and owner. Raises CatalogError or OSError; the catalog is
    then unchanged.
    """
    path = Path(os.path.realpath(path))
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text, st = read_catalog_text(path)
        new, replaced = updated_catalog(text, image, str(path))
        tmp = path.with_name(f".{path.name}.cid-mkimg.tmp")  # ours alone while we hold the lock
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(new)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, st.st_mode & 0o7777 if st else 0o644)
            if st:
                with contextlib.suppress(PermissionError):
                    os.chown(tmp, st.st_uid, st.st_gid)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)
    return replaced
