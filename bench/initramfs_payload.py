"""What cid itself adds to the installer initramfs, now and at a baseline commit.

blancmange copies the packages named by ``blancmange.build.CID_PACKAGES`` into the initramfs and compiles them
(docs/blancmange.md). This packs exactly that payload of two trees the same way (sources + ``.pyc``, newc cpio,
``zstd -12``, blancmange's default level) and prints the sizes and their ratio. The baseline is a git revision
of this repository (default: the commit before the package cut).

usage: python bench/initramfs_payload.py [--baseline REV]
"""

from __future__ import annotations

import argparse
import ast
import compileall
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def packages_of(tree: Path) -> tuple[str, ...]:
    """Return CID_PACKAGES as ``tree``'s blancmange/build.py sets it (read, not imported)."""
    module = ast.parse((tree / "blancmange" / "build.py").read_text())
    for node in module.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(target, ast.Name) and target.id == "CID_PACKAGES":
                return tuple(ast.literal_eval(node.value))
    raise SystemExit(f"{tree}: no CID_PACKAGES in blancmange/build.py")


def payload(tree: Path, work: Path) -> tuple[tuple[str, ...], int, int]:
    """Copy and compile ``tree``'s initramfs packages under ``work``; return (packages, bytes, packed bytes)."""
    names = packages_of(tree)
    site = work / "site"
    for name in names:
        shutil.copytree(tree / name, site / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.md"))
    mode = compileall.py_compile.PycInvalidationMode.UNCHECKED_HASH
    compileall.compile_dir(str(site), quiet=1, invalidation_mode=mode)
    raw = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    out = work / "payload.cpio.zst"
    subprocess.run(f"cd {site} && find . -print0 | LC_ALL=C sort -z | cpio --null --create --format=newc "
                   f"--reproducible --quiet | zstd -q -12 -o {out} -f", shell=True, check=True)
    return names, raw, out.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="7b118bd", help="git revision to compare with (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base_tree), args.baseline],
                       check=True)
        try:
            base = payload(base_tree, Path(tmp) / "b")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)], check=True)
        now = payload(REPO, Path(tmp) / "n")
    for label, (names, raw, packed) in (("baseline", base), ("now", now)):
        print(f"{label}: packages={','.join(names)} payload_bytes={raw} packed_bytes={packed}")
    print(f"payload_ratio={now[1] / base[1]:.3f}")
    print(f"packed_ratio={now[2] / base[2]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
