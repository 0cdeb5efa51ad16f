"""The ``blancmange`` command: build the cid installer (kernel + initramfs), and small test images.

Exit codes: 0 built, 1 a build step failed (the message says which and why), 2 bad command line or config.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from blancmange import build
from blancmange.config import MIRROR_TIMEOUT, BlancmangeError, BuildConfig, load_config

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "top_config.yaml"

DESCRIPTION = """\
blancmange builds the cid installer from Debian packages: a kernel (vmlinuz), the installer initramfs
(initrd.img: python3, cidkid, busybox, mkfs, sfdisk, zstd, kexec-tools, the configured drivers) and a small
initramfs for installed images (rootboot.img: mounts root= and starts the image's init). The package tree
is cached (--cache) by a hash of the package list; the mirror is the one of the machine's apt sources (or
--mirror), and must answer within --mirror-timeout seconds, else the build stops naming it. See docs/blancmange.md.
"""


def default_cache() -> Path:
    """Return $BLANCMANGE_CACHE, else ~/.cache/blancmange."""
    return Path(os.environ.get("BLANCMANGE_CACHE") or Path.home() / ".cache" / "blancmange")


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of blancmange."""
    p = argparse.ArgumentParser(prog="blancmange", description=DESCRIPTION, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="blancmange config (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=None,
                   help="cache of package trees and kernels (default: $BLANCMANGE_CACHE, else ~/.cache/blancmange)")
    p.add_argument("--mirror", default=None, metavar="URL",
                   help="Debian mirror for debootstrap (default: the one of this machine's apt sources for the suite)")
    p.add_argument("--mirror-timeout", type=float, default=MIRROR_TIMEOUT, metavar="SECONDS",
                   help="the mirror must answer within this time, or the build stops naming it (default: %(default)g)")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build vmlinuz, initrd.img and rootboot.img into --out", allow_abbrev=False)
    b.add_argument("--out", type=Path, required=True, help="output directory (created)")
    b.add_argument("--ca", type=Path, default=None,
                   help="cidd's cluster CA certificate (<state>/tls/ca.pem) to put in the initramfs as /etc/cid/ca.pem "
                   "(overrides the config's 'ca'); the installer then verifies cidd with it")
    i = sub.add_parser("image", help="build a small bootable test image with cidkid, captured with cid-mkimg",
                       allow_abbrev=False)
    i.add_argument("--installer", type=Path, required=True,
                   help="directory of a 'blancmange build' (its vmlinuz and rootboot.img go into /boot)")
    i.add_argument("--token-file", type=Path, default=None,
                   help="a node's own agent token to put into the image (tests only: cid's installer writes each "
                   "node's own token into the installed system, so shared images carry none)")
    i.add_argument("--ca", type=Path, default=None,
                   help="cidd's cluster CA certificate, put into the image as /etc/cid/ca.pem (cidkid passes --ca)")
    i.add_argument("--name", required=True)
    i.add_argument("--version", required=True)
    i.add_argument("--subversion", default="0")
    i.add_argument("--image-dir", type=Path, required=True, help="where cid-mkimg writes the image")
    i.add_argument("--catalog", type=Path, required=True, help="catalog (images.yaml) cid-mkimg updates")
    i.add_argument("--file", action="append", default=[], metavar="DEST=TEXT",
                   help="write TEXT into DEST inside the image (repeatable; e.g. to tell two test images apart)")
    i.add_argument("--pad-mb", type=int, default=0, help="add a file of N MiB of incompressible data")
    i.add_argument("--work", type=Path, help="directory for the image tree (default: under the cache)")
    return p


def build_installer(config: BuildConfig, out: Path, cache: Path) -> dict[str, int]:
    """Build vmlinuz, initrd.img and rootboot.img into ``out``; return {file: size in bytes}."""
    tree = build.debootstrap_tree(config, cache)
    kroot, kver = build.kernel_tree(config, cache)
    order = build.module_order(kroot, kver, config.modules)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(next((kroot / "boot").glob("vmlinuz-*")), out / "vmlinuz")
    work = cache / "work" / "installer"
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    build.run(["cp", "-a", str(tree), str(work)], "copying the package tree")
    prepare_tree(work, config)
    build.busybox_links(work)
    build.copy_modules(kroot, kver, order, work)
    etc = work / "etc" / "blancmange"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "modules.order").write_text("\n".join(order) + "\n")
    shutil.copy2(HERE / "udhcpc.script", etc / "udhcpc.script")
    shutil.copy2(HERE / "cid-partition", work / "usr" / "lib" / "blancmange" / "bin" / "cid-partition")
    (work / "init").unlink(missing_ok=True)
    shutil.copy2(HERE / "init.sh", work / "init")
    for script in (work / "init", etc / "udhcpc.script", work / "usr/lib/blancmange/bin/cid-partition"):
        script.chmod(0o755)  # an installed package may have lost the modes
    if config.ca is not None:
        (work / "etc" / "cid").mkdir(parents=True, exist_ok=True)
        shutil.copy2(config.ca, work / "etc" / "cid" / "ca.pem")
    if config.ssh_keys:
        ssh = work / "root" / ".ssh"
        ssh.mkdir(parents=True, exist_ok=True, mode=0o700)
        (ssh / "authorized_keys").write_text("\n".join(config.ssh_keys) + "\n")
    for src, dest in config.files.items():
        target = work / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(config.base / src, target)
    sizes = {"vmlinuz": (out / "vmlinuz").stat().st_size, "tree": build.tree_size(work)}
    sizes["initrd.img"] = build.pack(work, out / "initrd.img", config.compression_level)
    sizes["rootboot.img"] = build_rootboot(work, kver, order, out / "rootboot.img", cache)
    (out / "kernel-version").write_text(kver + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return sizes


def prepare_tree(root: Path, config: BuildConfig) -> None:
    """Strip ``root`` per the config, lock every password, add cid, and compile the Python code."""
    build.strip_tree(root, config.strip)
    shadow = root / "etc" / "shadow"
    if shadow.exists():  # no password login, ever: every account locked
        lines = [f"{f[0]}:*:{':'.join(f[2:])}" for f in (line.split(":") for line in shadow.read_text().splitlines())
                 if len(f) > 2]
        shadow.write_text("\n".join(lines) + "\n")
    build.add_cid(root, config.python_modules)
    # unchecked-hash bytecode does not depend on file times, so pack() may clamp them (reproducible archive)
    build.run(["chroot", str(root), "python3", "-m", "compileall", "-q", "-f", "-j0", "--invalidation-mode",
               "unchecked-hash", "/usr/lib/python3.11", "/usr/lib/python3/dist-packages"], "compiling the Python code")


def build_rootboot(tree: Path, kver: str, order: list[str], out: Path, cache: Path) -> int:
    """Pack the small initramfs of installed images (busybox, disk modules, rootboot init); return its size."""
    work = cache / "work" / "rootboot"
    shutil.rmtree(work, ignore_errors=True)
    for sub in ("bin", "proc", "sys", "dev", "newroot", "etc", "lib64", "lib/x86_64-linux-gnu"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(tree / "usr" / "bin" / "busybox", work / "bin" / "busybox")
    for lib in ("lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/libresolv.so.2", "lib64/ld-linux-x86-64.so.2"):
        src = tree / "usr" / lib
        while src.is_symlink():  # resolve inside the tree, not on the build host
            link = os.readlink(src)
            src = tree / link.lstrip("/") if link.startswith("/") else src.parent / link
        if src.exists():
            shutil.copy2(src, work / lib)
    for applet in ("sh", "mount", "umount", "insmod", "findfs", "switch_root", "sleep", "seq", "cat", "mkdir",
                   "uname", "echo"):
        (work / "bin" / applet).symlink_to("busybox")
    disk = [m for m in order if "/net/" not in m]
    for rel in disk:
        target = work / "lib" / "modules" / kver / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tree / "lib" / "modules" / kver / rel, target)
    (work / "etc" / "modules.order").write_text("\n".join(disk) + "\n")
    shutil.copy2(HERE / "rootboot-init.sh", work / "init")
    (work / "init").chmod(0o755)
    size = build.pack(work, out, 19)
    shutil.rmtree(work, ignore_errors=True)
    return size


IMAGE_INIT = """#!/bin/sh
# Minimal init of blancmange test images (no systemd: boots fastest under emulation). Mounts the kernel file
# systems, brings the network up by DHCP and keeps cidkid running (system mode, cidd address and node name
# from the kernel command line cidd's iPXE script gives).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/blancmange/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /run /tmp; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /run; mount -o remount,rw /
exec </dev/console >/dev/console 2>&1
while read -r module; do
    [ -n "$module" ] && insmod "/lib/modules/$(uname -r)/$module" 2>/dev/null
done < /etc/blancmange/modules.order
ip link set lo up
for path in /sys/class/net/*; do
    nic=${path##*/}; [ "$nic" = lo ] && continue
    ip link set "$nic" up
    udhcpc -i "$nic" -s /etc/blancmange/udhcpc.script -q -n -t 5 -T 2 >/dev/null 2>&1 && break
done
echo "cid test image $(head -1 /etc/cid-image 2>/dev/null) up"
set -- --mode system --kernel-cmdline /proc/cmdline --token-file /etc/cid/agent.token --log-format console \\
    --reboot-command "sync; reboot -f"
[ -f /etc/cid/ca.pem ] && set -- "$@" --ca /etc/cid/ca.pem
while :; do
    python3 -m cidkid.main "$@"
    echo "cidkid exited with status $?; restarting in 5 s"; sleep 5
done
"""


def build_image(args: argparse.Namespace, config: BuildConfig, cache: Path) -> None:
    """Build a test image tree from the cached package tree and capture it with cid-mkimg."""
    tree = build.debootstrap_tree(config, cache)
    kver = (args.installer / "kernel-version").read_text().strip()
    work = args.work or cache / "work" / f"image-{args.name}-{args.version}-{args.subversion}"
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    build.run(["cp", "-a", str(tree), str(work)], "copying the package tree")
    prepare_tree(work, config)
    build.busybox_links(work)
    kroot, modules_kver = build.kernel_tree(config, cache)
    if modules_kver != kver:
        raise BlancmangeError(f"the installer in {args.installer} has kernel {kver} but the config's kernel is now "
                              f"{modules_kver}: run 'blancmange build' again first")
    order = build.module_order(kroot, kver, config.modules)
    build.copy_modules(kroot, kver, order, work)
    etc = work / "etc" / "blancmange"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "modules.order").write_text("\n".join(order) + "\n")
    shutil.copy2(HERE / "udhcpc.script", etc / "udhcpc.script")
    (etc / "udhcpc.script").chmod(0o755)
    (work / "boot").mkdir(exist_ok=True)
    shutil.copy2(args.installer / "vmlinuz", work / "boot" / f"vmlinuz-{kver}")
    shutil.copy2(args.installer / "rootboot.img", work / "boot" / f"initrd.img-{kver}")
    init = work / "sbin" / "init"
    init.unlink(missing_ok=True)
    init.write_text(IMAGE_INIT)
    init.chmod(0o755)
    (work / "etc" / "cid").mkdir(parents=True, exist_ok=True)
    if args.token_file is not None:
        token = work / "etc" / "cid" / "agent.token"
        shutil.copy2(args.token_file, token)
        token.chmod(0o600)
    if args.ca is not None:
        shutil.copy2(args.ca, work / "etc" / "cid" / "ca.pem")
    (work / "etc" / "hostname").write_text(f"{args.name}\n")
    for item in args.file:
        dest, _, text = item.partition("=")
        path = work / dest.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    if args.pad_mb:
        with open(work / "var" / "pad.bin", "wb") as pad:
            for _ in range(args.pad_mb):
                pad.write(os.urandom(1 << 20))
    args.image_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(build.REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "cidmkimg.main", "--root", str(work), "--name", args.name,
                           "--version", args.version, "--subversion", args.subversion, "--image-dir",
                           str(args.image_dir), "--catalog", str(args.catalog), "--kernel", f"/boot/vmlinuz-{kver}",
                           "--initrd", f"/boot/initrd.img-{kver}", "--cmdline", "console=ttyS0",
                           "--description", "blancmange test image"], env=env, text=True, capture_output=True)
    print(done.stdout, end="")
    if done.returncode != 0:
        raise BlancmangeError(f"cid-mkimg failed: {done.stderr.strip()}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run blancmange with ``argv`` (default sys.argv[1:]); return the exit status."""
    args = build_parser().parse_args(argv)
    cache = args.cache or default_cache()
    try:
        config = load_config(args.config)
        if not args.mirror_timeout > 0:
            raise BlancmangeError(f"--mirror-timeout must be a number of seconds above 0 (got {args.mirror_timeout:g})")
        config = dataclasses.replace(config, mirror=args.mirror or None, mirror_timeout=args.mirror_timeout)
    except BlancmangeError as exc:
        print(f"blancmange: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    if os.geteuid() != 0:
        print("blancmange: must run as root (debootstrap, chroot, device nodes)", file=sys.stderr)
        return EXIT_USAGE
    started = time.monotonic()
    try:
        if args.command == "build":
            if args.ca is not None:
                config = dataclasses.replace(config, ca=args.ca)
            sizes = build_installer(config, args.out, cache)
            for name, size in sizes.items():
                label = "unpacked initramfs" if name == "tree" else str(args.out / name)
                print(f"{label}: {size / (1 << 20):.1f} MiB ({size} bytes)")
        else:
            build_image(args, config, cache)
    except BlancmangeError as exc:
        print(f"blancmange: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    print(f"blancmange {args.command}: done in {time.monotonic() - started:.1f} s")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
