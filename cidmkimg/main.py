"""cid-mkimg: pack a root filesystem into a cid image (``<id>.tar.zst``) and write its catalog entry.

GNU tar writes the archive to a pipe; this process compresses it with multithreaded zstd, hashes and counts
the compressed bytes, writes ``<image-dir>/<id>.tar.zst.part``, fsyncs it and renames it into place. The
catalog is then edited under ``<catalog>.lock``: only this image's entry changes, and the new text replaces
the old one atomically. ``main`` is the console script; ``exit_code`` is the one place mapping outcomes to
exit codes. The parts: ``pack`` (tar, zstd, sha256, the file), ``cidcatalog.edit`` (the entry),
``mkimg_errors``; this module checks the arguments and runs them. See docs/images.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cidcatalog.catalog import BootHints, CatalogError, Image, render_entry
from cidcatalog.edit import read_catalog_text, update_catalog, updated_catalog
from cidmkimg.errors import CatalogUpdateError, MkimgError, ReloadError, UsageError
from cidmkimg.pack import default_excludes, pack

if TYPE_CHECKING:
    from cidcommon.client_config import ClientConfig

PLACEHOLDER_SHA = "0" * 64


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


def _reload_target(address: str, token_file: Path | None) -> tuple[ClientConfig, str]:
    """Return (how to reach cidd, the admin token: "" on the local socket) for ``--reload``; raise UsageError when
    either is unusable.

    An empty ``address`` means what every client uses (cidcommon.client_config): $CID_SOCKET, $CID_SERVER, then
    $CID_CONFIG or /etc/cid/cidd.yaml, then the default socket; a token file asks for TCP.
    """
    from cidcommon.client_config import ClientOptions, resolve  # imported here: cid-mkimg starts faster without
    from cidcommon.errors import CidError
    from cidcommon.paths import read_token

    try:
        client = resolve(ClientOptions(server=address or None, token_file=token_file, role="admin"), os.environ)
        return client, "" if client.token_file is None else read_token(client.token_file)
    except CidError as exc:
        raise UsageError(f"--reload: {exc.message}; nothing was captured")


def reload_cidd(client: ClientConfig, token: str) -> object:
    """Ask cidd at ``client``'s one address to reload its catalog, as admin; return the reply's ``images``.

    Raises ReloadError with cidd's reason (unreachable, naming the address and where it came from; refused token;
    catalog errors). No other address is tried.
    """
    from cidcapt.connection import simple_request
    from cidcommon.errors import CidError
    from cidcommon.tlsfiles import ClientTls

    try:
        tls = None if client.ca is None else ClientTls(client.ca, client.cert, client.key)
        reply = simple_request(*client.host_port, "admin", token, {"type": "reload"}, connect_timeout=10.0,
                               tls=tls, origin=client.label)
    except CidError as exc:
        raise ReloadError(f"image and catalog are written, but cidd did not reload its catalog: {exc}; "
                          "reload it with 'cidcapt --reload' (or 'systemctl reload cidd')")
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
    p = argparse.ArgumentParser(prog="cid-mkimg", allow_abbrev=False,
                                description="Pack a root filesystem into a cid image "
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
                   help="then ask cidd to reload its catalog: at HOST:PORT, else where every client finds it "
                   "($CID_SOCKET, $CID_SERVER, then $CID_CONFIG or /etc/cid/cidd.yaml, then the default socket "
                   "<state_dir>/cidd.sock; docs/configuration.md)")
    p.add_argument("--token-file", type=Path, help="admin token for TCP (default $CID_TOKEN_FILE, else the "
                   "configuration's client.token_file, else <state_dir>/secrets/admin.token); the session runs over "
                   "TLS with the CA in $CID_CA_FILE, client.ca or tls.ca, else <state_dir>/tls/ca.pem")
    return p


def plan(args: argparse.Namespace) -> tuple[Image, list[str], tuple[ClientConfig, str] | None]:
    """Return (the image to write, without size and sha256; the exclude patterns; (cidd, token) to reload).

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
        updated_catalog(read_catalog_text(args.catalog)[0], dataclasses.replace(image, sha256=PLACEHOLDER_SHA),
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
    result = pack(args.root, out, patterns, live=args.live, level=args.level, threads=args.threads)
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
        _say(f"cidd at {reload[0].address} reloaded its catalog: {reload_cidd(*reload)} images")


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
