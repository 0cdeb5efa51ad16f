"""cid-mkimg: capture a root filesystem into a cid image (``<id>.tar.zst``) and write its catalog entry.

GNU tar writes the archive to a pipe; this process compresses it with multithreaded zstd, hashes and counts
the compressed bytes, writes ``<image-dir>/<id>.tar.zst.part``, fsyncs it and renames it into place. The
catalog is then edited under ``<catalog>.lock``: only this image's entry changes, and the new text replaces
the old one atomically. ``main`` is the console script; ``exit_code`` is the one place mapping outcomes to
exit codes. See docs/images.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import zstandard

from cidd.catalog import BootHints, CatalogError, CatalogProblem, Image, parse_catalog, render_entry, upsert_entry_text

READ_SIZE = 1 << 20  # bytes per read from tar's pipe (the pipe is grown to this size), into one reused buffer
WRITE_SIZE = 256 << 10  # compressed bytes per write: small enough for malloc to recycle, no page-fault churn
WRITEBACK = 32 << 20  # start writing the image out every this many bytes
HASH_QUEUE = 32  # compressed chunks waiting to be hashed (at most HASH_QUEUE * WRITE_SIZE bytes)
LIVE_EMPTIED = ("proc", "sys", "dev", "run", "tmp", "var/tmp", "mnt", "media", "lost+found")
LIVE_FILES = ("var/cache/apt/archives/*.deb", "swapfile", "swap.img")
TAR_LINES = 5  # lines of tar's stderr quoted in an error
PLACEHOLDER_SHA = "0" * 64


class MkimgError(Exception):
    """Base class; ``str()`` is the sentence printed after ``cid-mkimg: error:``."""


class UsageError(MkimgError):
    """Bad arguments, an invalid name or version, or a broken catalog: nothing was written."""


class CaptureError(MkimgError):
    """tar, compression or writing the image failed; no image file (and no ``.part``) was left."""


class CatalogUpdateError(MkimgError):
    """The image file was written but the catalog could not be updated (it is unchanged)."""


class ReloadError(MkimgError):
    """Image and catalog are written, but cidd did not reload its catalog."""


def exit_code(error: BaseException | None) -> int:
    """Return the exit code for how a run ended: 0 ok, 1 capture or catalog write failed, 2 usage, 4 reload.

    130 for an interrupt (Ctrl-C).
    """
    if error is None:
        return 0
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, UsageError):
        return 2
    if isinstance(error, ReloadError):
        return 4
    return 1


@dataclasses.dataclass(frozen=True)
class Captured:
    """What a capture produced: ``raw`` tar bytes became ``size`` compressed bytes in ``seconds``."""

    path: Path
    size: int
    raw: int
    sha256: str
    seconds: float
    warnings: tuple[str, ...]


def _inside(root: Path, path: str | Path) -> str | None:
    """Return ``path`` relative to ``root`` (both resolved) when it lies strictly inside it, else None."""
    base, full = os.path.realpath(root), os.path.realpath(path)
    rel = os.path.relpath(full, base)
    return None if rel == "." or rel == ".." or rel.startswith("../") else rel


def default_excludes(root: Path, image_dir: Path, *, live: bool, swaps: str | None = None) -> list[str]:
    """Return the default exclude patterns (``--exclude`` syntax, relative to ``root``).

    With ``live``: the contents (not the directories) of LIVE_EMPTIED, downloaded .deb files, swap files
    (LIVE_FILES, and each file listed in ``swaps`` -- the text of /proc/swaps, read when None -- inside
    ``root``). Always: ``image_dir`` when it is inside ``root``, so the image never captures itself.
    """
    patterns: list[str] = []
    if live:
        patterns += [f"{d}/*" for d in LIVE_EMPTIED] + list(LIVE_FILES)
        if swaps is None:
            with contextlib.suppress(OSError):
                swaps = Path("/proc/swaps").read_text(encoding="utf-8", errors="replace")
        for line in (swaps or "").splitlines()[1:]:
            fields = line.split()
            if len(fields) > 1 and fields[1] == "file":
                rel = _inside(root, fields[0].replace("\\040", " "))
                patterns += [rel] if rel else []
    rel = _inside(root, image_dir)
    return patterns + ([rel] if rel else [])


def tar_pattern(pattern: str) -> str:
    """Return a user pattern (``var/log/*.gz``, ``/var/log/*.gz``) as GNU tar matches it (``./var/log/*.gz``)."""
    pattern = pattern.strip()
    while pattern.startswith(("/", "./")):
        pattern = pattern[1:] if pattern.startswith("/") else pattern[2:]
    return "./" + pattern


def tar_command(root: Path, patterns: list[str], *, live: bool) -> list[str]:
    """Return the GNU tar command line writing the archive of ``root`` to stdout.

    atime and ctime are left out of the pax headers (tar -x restores neither): a file whose mtime is a whole
    second then needs no extended header at all, 1 KiB less per file of a debootstrap tree.
    """
    return ["tar", "-c", "-f", "-", "-C", str(root), "--format=posix", "--xattrs", "--xattrs-include=*", "--acls",
            "--numeric-owner", "--sparse", "--pax-option=delete=atime,delete=ctime",
            *(["--one-file-system"] if live else []), "--anchored",
            *(f"--exclude={tar_pattern(p)}" for p in patterns), "."]


class _Sink:
    """The file-like end of the compressor: writes, counts and hashes the compressed chunks.

    Hashing runs in a thread at the lowest CPU priority, fed through a bounded queue (HASH_QUEUE chunks): it
    uses the CPU time the compression pipeline leaves idle instead of competing with it. Every WRITEBACK
    bytes the kernel is asked to start writing the file out and to drop the pages already written
    (``posix_fadvise(DONTNEED)``): the final fsync is short, and capturing a live node does not push its
    working set out of the page cache.
    """

    def __init__(self, handle: io.BufferedWriter) -> None:
        self.handle = handle
        self.size = 0
        self._sha = hashlib.sha256()
        self._marks = (0, 0)  # start of the range to advise next, end of the last advised range
        self._queue: queue.Queue[bytes | None] = queue.Queue(HASH_QUEUE)
        self._thread = threading.Thread(target=self._hash, name="cid-mkimg-sha256", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        while (data := self._queue.get()) is not None:
            self._sha.update(data)

    def write(self, data: bytes) -> int:
        """Write, count and queue ``data`` for hashing; return its length. Raises OSError from the file."""
        data = data if isinstance(data, bytes) else bytes(data)  # the hasher needs an immutable copy
        self._queue.put(data)
        self.handle.write(data)
        self.size += len(data)
        older, last = self._marks
        if self.size - last >= WRITEBACK:
            os.posix_fadvise(self.handle.fileno(), older, self.size - older, os.POSIX_FADV_DONTNEED)
            self._marks = (last, self.size)  # pages still dirty now are dropped on the next call
        return len(data)

    def flush(self) -> None:
        """Flush the file object's buffer (called by the compressor at the end of the frame)."""
        self.handle.flush()

    def close(self) -> str:
        """Stop the hashing thread once it has hashed everything; return the sha256 (hex) of what was written."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        return self._sha.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def capture(root: Path, out: Path, patterns: list[str], *, live: bool, level: int = 3, threads: int = -1) -> Captured:
    """Archive ``root`` into ``out`` (via ``out.part``, renamed when complete); return what was written.

    Raises CaptureError when tar fails (exit 1 is accepted with ``live``), or compressing or writing fails;
    the ``.part`` file is then removed.
    """
    part = out.with_name(out.name + ".part")
    start = time.monotonic()
    try:
        handle = open(part, "ab")  # not truncated before it is locked; closed by the with below
    except OSError as exc:
        raise CaptureError(f"cannot write {part}: {exc.strerror}; check that --image-dir exists and is writable")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise CaptureError(f"another cid-mkimg is writing {part}; wait until it ends")
    try:
        handle.truncate(0)
        with handle, open(os.memfd_create("cid-mkimg-tar-stderr"), "w+b") as errors:
            try:
                tar = subprocess.Popen(tar_command(root, patterns, live=live), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=errors)  # readinto fills the buffer
            except OSError as exc:
                raise CaptureError(f"cannot run tar: {exc.strerror}; install GNU tar (Debian package tar)")
            sink, raw = _Sink(handle), 0
            try:
                with contextlib.suppress(OSError):  # fewer, larger reads; the default 64 KiB works too
                    fcntl.fcntl(tar.stdout.fileno(), fcntl.F_SETPIPE_SZ, READ_SIZE)
                compressor = zstandard.ZstdCompressor(level=level, threads=threads)  # sha256 covers integrity
                buffer = bytearray(READ_SIZE)
                view = memoryview(buffer)
                with compressor.stream_writer(sink, write_size=WRITE_SIZE, closefd=False) as writer:
                    while count := tar.stdout.readinto(buffer):
                        writer.write(view[:count])
                        raw += count
                handle.flush()
                os.fsync(handle.fileno())
            except (OSError, zstandard.ZstdError) as exc:
                tar.kill()
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise CaptureError(f"writing {part} failed: {reason}; check the space left in --image-dir")
            except BaseException:  # an interrupt: do not wait for a tar stuck on a slow file
                tar.kill()
                raise
            finally:
                sha256 = sink.close()
                tar.stdout.close()
                status = tar.wait()
            errors.seek(0)
            lines = tuple(errors.read().decode("utf-8", "replace").splitlines())
        if status != 0 and not (status == 1 and live):
            hint = "; the root is in use: stop what writes to it, or use --live for a running system" \
                if status == 1 else ""
            raise CaptureError(f"tar failed (exit {status}) on {root}:\n  " + "\n  ".join(lines[-TAR_LINES:]) + hint)
        os.replace(part, out)
        _fsync_dir(out.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink()
        raise
    return Captured(out, sink.size, raw, sha256, time.monotonic() - start, lines)


def updated_catalog(text: str, image: Image, path: str) -> tuple[str, bool]:
    """Return (the catalog text with ``image``'s entry written, whether an entry was replaced).

    Raises CatalogError when ``text`` is not a valid catalog or cannot be edited.
    """
    old = parse_catalog(text, path)
    new = upsert_entry_text(text, image, path)
    if parse_catalog(new, path).get(image.id) != image:
        raise CatalogError([CatalogProblem(path, None, f"the edited catalog does not hold {image.id} as written")])
    return new, image.id in old


def _read_text(path: Path) -> tuple[str, os.stat_result | None]:
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
        text, st = _read_text(path)
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
        _fsync_dir(path.parent)
    return replaced


def _reload_target(address: str, token_file: Path | None) -> tuple[str, str]:
    """Return (cidd's HOST:PORT, the admin token) for ``--reload``; raise UsageError when either is unusable.

    An empty ``address`` means $CID_SERVER, else 127.0.0.1 on the default port.
    """
    from cidcapt.connection import parse_server  # imported here: cid-mkimg starts faster without them
    from cidcommon.errors import TokenFileError
    from cidcommon.paths import default_state_dir, read_token, token_path
    from cidcommon.wire import DEFAULT_PORT

    server = address or os.environ.get("CID_SERVER") or f"127.0.0.1:{DEFAULT_PORT}"
    path = token_file or Path(os.environ.get("CID_TOKEN_FILE") or token_path(default_state_dir(), "admin"))
    try:
        parse_server(server)
        return server, read_token(path)
    except (ValueError, TokenFileError) as exc:
        raise UsageError(f"--reload: {exc}; nothing was captured")


def reload_cidd(server: str, token: str) -> object:
    """Ask cidd at ``server`` (HOST:PORT) to reload its catalog, as admin; return the reply's ``images``.

    Raises ReloadError with cidd's reason (unreachable, refused token, catalog errors).
    """
    from cidcapt.connection import parse_server, simple_request
    from cidcommon.errors import CidError
    from cidcommon.tlsfiles import client_tls

    try:
        tls = client_tls(None, None, None, plain=False, env=os.environ)  # $CID_CA_FILE, $CID_PLAIN_TCP
        reply = simple_request(*parse_server(server), "admin", token, {"type": "reload"}, connect_timeout=10.0,
                               tls=tls)
    except CidError as exc:
        raise ReloadError(f"image and catalog are written, but cidd did not reload its catalog: {exc}; "
                          "reload it with 'kill -HUP $(pidof cidd)' or 'cidcapt --reload'")
    return reply.get("images")


def _say(text: str) -> None:
    """Print ``text`` to stdout; a reader that went away (``| head``) must not stop the capture or the catalog."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return ""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (argparse exits with code 2 on bad usage)."""
    p = argparse.ArgumentParser(prog="cid-mkimg", description="Capture a root filesystem into a cid image "
                                "(<image-dir>/<name>-<version>-<subversion>.tar.zst) and its catalog entry.",
                                epilog="exit codes: 0 ok, 1 capture or catalog write failed, 2 bad usage, "
                                "invalid name or broken catalog (nothing written), 4 cidd did not reload")
    p.add_argument("--root", type=Path, required=True, help="directory to capture (a chroot tree, or / with --live)")
    for opt in ("name", "version", "subversion"):
        p.add_argument(f"--{opt}", required=True, help=f"image {opt} (catalog rules, no '-')")
    p.add_argument("--image-dir", type=Path, required=True, help="where the image file is written")
    p.add_argument("--catalog", type=Path, required=True, help="images.yaml to update (created if missing)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="leave out paths matching PATTERN, relative to the root ('*' also matches '/')")
    p.add_argument("--exclude-from", type=Path, metavar="FILE", help="patterns, one a line ('#' comments)")
    p.add_argument("--live", action="store_true", help="ROOT is a running system: default excludes, "
                   "--one-file-system, tar's 'file changed as we read it' is a warning")
    p.add_argument("--threads", type=int, default=-1, help="compression threads (default -1: all cores)")
    p.add_argument("--level", type=int, default=3, choices=range(1, 23), metavar="L", help="zstd level 1-22")
    p.add_argument("--os", default="linux")
    p.add_argument("--owner", default="root")
    p.add_argument("--visibility", default="shared", choices=("shared", "private"))
    p.add_argument("--description", default="")
    p.add_argument("--kernel", help="kernel path inside the image, e.g. /boot/vmlinuz")
    p.add_argument("--initrd", help="initrd path inside the image")
    p.add_argument("--cmdline", default="", help="extra kernel arguments")
    p.add_argument("--reload", nargs="?", const="", metavar="HOST:PORT",
                   help="then ask cidd to reload its catalog (default $CID_SERVER, else 127.0.0.1:38008)")
    p.add_argument("--token-file", type=Path, help="admin token (default <state_dir>/secrets/admin.token); "
                   "the session runs over TLS with the CA in $CID_CA_FILE or <state_dir>/tls/ca.pem")
    return p


def plan(args: argparse.Namespace) -> tuple[Image, list[str], tuple[str, str] | None]:
    """Return (the image to write, without size and sha256; the exclude patterns; (server, token) to reload).

    Checks everything that can be checked before the capture. Raises UsageError.
    """
    try:
        image = Image(args.name, args.version, args.subversion, f"{args.name}-{args.version}-{args.subversion}"
                      ".tar.zst", os=args.os, boot=BootHints(args.kernel, args.initrd, args.cmdline),
                      owner=args.owner, visibility=args.visibility, description=args.description)
    except ValueError as exc:
        raise UsageError(f"invalid image: {exc}")
    if args.threads < -1:
        raise UsageError(f"--threads must be -1 (all cores), 0 or more, not {args.threads}")
    if not args.root.is_dir():
        raise UsageError(f"--root {args.root} is not a directory; give a chroot tree, or / with --live")
    if os.path.realpath(args.root) == "/" and not args.live:
        raise UsageError("--root / is the running system: add --live (excludes /proc, /sys, /dev, /tmp, ...)")
    if os.path.realpath(args.image_dir) == os.path.realpath(args.root):
        raise UsageError("--image-dir must not be the root itself; use a directory outside it or below it")
    if not args.catalog.parent.is_dir():
        raise UsageError(f"--catalog {args.catalog}: directory {args.catalog.parent} does not exist")
    patterns = default_excludes(args.root, args.image_dir, live=args.live) + args.exclude
    if args.exclude_from:
        try:
            lines = args.exclude_from.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --exclude-from {args.exclude_from}: {exc}")
        patterns += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    try:
        updated_catalog(_read_text(args.catalog)[0], dataclasses.replace(image, sha256=PLACEHOLDER_SHA),
                        str(args.catalog))
    except CatalogError as exc:
        problems = "\n".join(str(problem) for problem in exc.problems)
        raise UsageError(f"the catalog cannot take the new entry, nothing was captured:\n{problems}\n"
                         "fix the catalog and run cid-mkimg again")
    return image, patterns, None if args.reload is None else _reload_target(args.reload, args.token_file)


def run(args: argparse.Namespace) -> None:
    """Capture, write the catalog entry, reload cidd if asked, printing what happens. Raises MkimgError."""
    image, patterns, reload = plan(args)
    out = args.image_dir / image.file
    for rel in (image.boot.kernel, image.boot.initrd):
        if rel and not os.path.lexists(os.path.join(args.root, rel.lstrip("/"))):
            print(f"cid-mkimg: warning: {rel} does not exist in {args.root}", file=sys.stderr)
    _say(f"capturing {args.root}{' (live)' if args.live else ''} into {out}")
    if patterns:
        _say(f"  excluding: {' '.join(patterns)}")
    result = capture(args.root, out, patterns, live=args.live, level=args.level, threads=args.threads)
    for line in result.warnings:
        print(f"cid-mkimg: warning: {line}", file=sys.stderr)
    ratio = result.raw / result.size if result.size else 0.0
    rate = result.raw / result.seconds if result.seconds else 0.0
    _say(f"captured {_human(result.raw)} of tar into {_human(result.size)} ({result.size} bytes), ratio "
         f"{ratio:.2f}, in {result.seconds:.1f} s ({_human(rate)}/s)\nsha256 {result.sha256}")
    image = dataclasses.replace(image, size=result.size, sha256=result.sha256)
    store_boot_files(args.root, args.image_dir, image)
    try:
        replaced = update_catalog(args.catalog, image)
    except (CatalogError, OSError) as exc:
        reason = "\n".join(map(str, exc.problems)) if isinstance(exc, CatalogError) else str(exc)
        raise CatalogUpdateError(f"the catalog {args.catalog} was not changed:\n{reason}\nthe image is kept at "
                                 f"{out}; fix the catalog and add this entry under 'images:':\n{render_entry(image)}")
    _say(f"catalog {args.catalog}: {'replaced' if replaced else 'added'} {image.id}\n{render_entry(image).rstrip()}")
    if reload is not None:
        _say(f"cidd at {reload[0]} reloaded its catalog: {reload_cidd(*reload)} images")


def _in_tree(root: Path, rel: str) -> str | None:
    """Return the path of ``rel`` in the tree ``root``, following symlinks as if ``root`` were ``/`` (Debian's
    ``/vmlinuz -> boot/vmlinuz-6.1...``, or an absolute link); None after 40 links (a loop)."""
    path = rel
    for _ in range(40):
        parts = [p for p in path.split("/") if p and p != "."]
        current = ""
        for index, part in enumerate(parts):
            if part == "..":
                current = current.rsplit("/", 1)[0] if "/" in current else ""
                continue
            candidate = f"{current}/{part}"
            full = os.path.join(root, candidate.lstrip("/"))
            if os.path.islink(full):
                link = os.readlink(full)
                base = "" if link.startswith("/") else current
                path = f"{base}/{link}/" + "/".join(parts[index + 1:])
                break
            current = candidate
        else:
            return os.path.join(root, current.lstrip("/"))
    return None


def store_boot_files(root: Path, image_dir: Path, image: Image) -> None:
    """Copy the image's kernel and initrd (its boot hints) next to it as ``<id>.vmlinuz`` and ``<id>.initrd.img``:
    cidd serves them to nodes that boot the installed image (docs/boot.md). Missing files are skipped (warned
    about before the capture)."""
    for rel, suffix in ((image.boot.kernel, "vmlinuz"), (image.boot.initrd, "initrd.img")):
        if not rel:
            continue
        src = _in_tree(root, rel)
        if src is not None and os.path.isfile(src):
            dest = image_dir / f"{image.id}.{suffix}"
            shutil.copyfile(src, f"{dest}.tmp")
            os.replace(f"{dest}.tmp", dest)
            _say(f"boot file {rel} stored as {dest}")


def main(argv: list[str] | None = None) -> int:
    """Run cid-mkimg with ``argv`` (default sys.argv[1:]); return the exit code (see ``exit_code``)."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except MkimgError as exc:
        print(f"cid-mkimg: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt as exc:
        print("cid-mkimg: interrupted; no unfinished file is left behind", file=sys.stderr)
        return exit_code(exc)
    return exit_code(None)


if __name__ == "__main__":
    sys.exit(main())
