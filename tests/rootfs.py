"""A real root filesystem for tests and benchmarks, and an exact comparison of two trees.

``build_rootfs`` makes a bootable-shaped tree from Debian's busybox-static (installed by ``make test``):
busybox with its applet symlinks, hard links, device nodes, a FIFO, setuid/setgid files, files owned by
another user, extended attributes, a file capability, POSIX ACLs, a sparse file, odd names and fixed
mtimes. ``compare_trees`` lists every difference in owners, modes, links, devices, xattrs and contents.
Building needs root (device nodes, chown).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import struct
import subprocess
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
FIXED_MTIME = 1_700_000_000
APPLETS = ("sh", "ls", "cat", "cp", "mv", "rm", "mkdir", "mount", "umount", "ps", "grep", "sed", "vi",
           "ip", "udhcpc", "wget", "tar", "init", "reboot", "poweroff", "ping", "su", "passwd")


class MissingTool(RuntimeError):
    """A tool the test needs is not installed; the message names the Debian package and `make test`."""


def require(tool: str, package: str) -> str:
    """Return the path of ``tool``; raise MissingTool naming ``package`` when it is not installed."""
    path = shutil.which(tool) or (str(BUSYBOX) if tool == "busybox" and BUSYBOX.exists() else None)
    if path is None:
        raise MissingTool(f"{tool} is missing: install Debian's {package} (make test does it)")
    return path


def _capability_xattr(cap: int) -> bytes:
    """Return a VFS_CAP_REVISION_2 ``security.capability`` value granting ``cap`` effective+permitted."""
    return struct.pack("<IIIII", 0x02000001, 1 << cap, 0, 0, 0)


def build_rootfs(root: Path, *, extra_mb: int = 0, system_mb: int = 0, seed: int = 7) -> Path:
    """Create a root filesystem under ``root`` (which must not exist or be empty); return ``root``.

    For benchmarks: ``system_mb`` adds that many MiB of this machine's own /usr files (real binaries, libraries
    and text, see ``copy_system_files``); ``extra_mb`` adds that many MiB of synthetic data, half compressible
    text, half random, in 4 MiB files. Raises MissingTool when busybox-static or acl (setfacl) is not installed.
    """
    busybox = require("busybox", "busybox-static")
    setfacl = require("setfacl", "acl")
    root.mkdir(parents=True, exist_ok=True)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "run", "var/log", "var/spool",
              "home/user", "root", "tmp", "boot", "srv/shared"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "root", 0o700)
    shutil.copy2(busybox, root / "bin/busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    os.link(root / "bin/busybox", root / "usr/bin/busybox-hardlink")  # a hard link
    os.link(root / "bin/busybox", root / "sbin/busybox-hardlink2")
    (root / "sbin/init").symlink_to("/bin/busybox")  # absolute symlink
    (root / "etc/mtab").symlink_to("/proc/self/mounts")
    (root / "etc/dangling").symlink_to("../nowhere/at/all")
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev/zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    os.mknod(root / "dev/console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    os.mknod(root / "dev/sda1", 0o660 | stat.S_IFBLK, os.makedev(8, 1))
    os.mkfifo(root / "run/initctl", 0o600)
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
        "etc/group": "root:x:0:\nuser:x:1000:\nstaff:x:50:user\n",
        "etc/hostname": "cid-test\n",
        "etc/os-release": 'NAME="cid test rootfs"\nID=cidtest\nVERSION_ID=1\n',
        "etc/shadow": "root:*:19000:0:99999:7:::\n",
        "home/user/.profile": "export PS1='$ '\n",
        "home/user/notes with spaces.txt": "spaces in names\n",
        "srv/shared/données-ünïcode.txt": "unicode name\n",
        "var/log/empty.log": "",
        "boot/vmlinuz-test": "not a kernel\n",
        "x" * 200: "a long file name\n",
    }
    for rel, text in files.items():
        (root / rel).write_text(text, encoding="utf-8")
    os.chmod(root / "etc/shadow", 0o000)
    shutil.copy2(busybox, root / "bin/suid-tool")
    os.chmod(root / "bin/suid-tool", 0o4755)  # setuid
    os.chmod(root / "srv/shared", 0o2775)  # setgid directory
    os.chown(root / "srv/shared", 0, 50)
    for path in (root / "home/user", root / "home/user/.profile", root / "home/user/notes with spaces.txt"):
        os.chown(path, 1000, 1000)
    os.setxattr(root / "etc/hostname", "user.cid.origin", b"rootfs fixture")
    os.setxattr(root / "home/user/.profile", "user.cid.empty", b"")
    os.setxattr(root / "bin/suid-tool", "security.capability", _capability_xattr(13))  # cap_net_raw
    subprocess.run([setfacl, "-m", "u:1000:rw,g:50:r", str(root / "etc/os-release")], check=True)
    subprocess.run([setfacl, "-d", "-m", "u:1000:rwx", str(root / "srv/shared")], check=True)
    with open(root / "var/spool/sparse.img", "wb") as handle:
        handle.truncate(32 * 1024 * 1024)
        handle.seek(8 * 1024 * 1024)
        handle.write(b"data in the middle of a hole")
    if extra_mb:
        _add_bulk(root / "usr/share/bulk", extra_mb, seed)
    if system_mb:
        copy_system_files(root, system_mb)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    os.utime(root, (FIXED_MTIME, FIXED_MTIME))
    return root


def _add_bulk(where: Path, megabytes: int, seed: int) -> None:
    """Write ``megabytes`` MiB of half-text, half-random files of 4 MiB each under ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    chunk = 4 * 1024 * 1024
    for index in range(max(1, megabytes // 4)):
        if index % 2:
            data = rng.randbytes(chunk)
        else:
            out = bytearray()
            while len(out) < chunk:
                out += b" ".join(rng.choices(words, k=64)) + b"\n"
            data = bytes(out[:chunk])
        (where / f"blob{index:04d}.bin").write_bytes(data)


SYSTEM_SOURCES = ("/usr/bin", "/usr/sbin", "/usr/lib", "/usr/share")


def copy_system_files(root: Path, megabytes: int, sources: tuple[str, ...] = SYSTEM_SOURCES) -> int:
    """Copy this machine's files from ``sources`` into the same paths under ``root`` until ``megabytes`` MiB of
    regular files are copied; return the bytes copied.

    The walk is sorted (the same files on the same machine); files keep their modes and owners, symlinks are
    copied as links (directories get the default mode and owner); it skips what it cannot read and anything
    under ``root`` itself. This is what an OS image is made of, unlike random data: the benchmarks use it so
    that compression ratios are those of real images.
    """
    budget, copied = megabytes * 1024 * 1024, 0
    skip = os.path.realpath(root)
    for source in sources:
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames[:] = sorted(d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) != skip)
            dest_dir = root / dirpath.lstrip("/")
            dest_dir.mkdir(parents=True, exist_ok=True)
            for name in sorted(filenames):
                src, dest = os.path.join(dirpath, name), dest_dir / name
                try:
                    st = os.lstat(src)
                    if stat.S_ISLNK(st.st_mode):
                        os.symlink(os.readlink(src), dest)
                    elif stat.S_ISREG(st.st_mode):
                        shutil.copyfile(src, dest)
                        os.chmod(dest, stat.S_IMODE(st.st_mode))
                        copied += st.st_size
                    else:
                        continue
                    os.chown(dest, st.st_uid, st.st_gid, follow_symlinks=False)
                except OSError:
                    continue
                if copied >= budget:
                    return copied
    return copied


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {name: os.getxattr(path, name, follow_symlinks=False) for name in sorted(names)}


def describe_tree(root: Path) -> dict[str, tuple]:
    """Return {relative path: comparable description} for every entry below ``root``.

    The description holds the type and mode bits, owner, group, device numbers, symlink target, size and
    sha256 of regular files, xattrs (ACLs included), mtime (not for directories' own changes) and the
    hard-link group (the sorted paths sharing an inode).
    """
    entries: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            st = full.lstat()
            kind = stat.S_IFMT(st.st_mode)
            extra: tuple = ()
            if kind == stat.S_IFREG:
                extra = (st.st_size, _digest(full))
                inodes.setdefault(st.st_ino, []).append(rel)
            elif kind == stat.S_IFLNK:
                extra = (os.readlink(full),)
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
            mtime = int(st.st_mtime) if kind != stat.S_IFLNK else None
            entries[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, extra, _xattrs(full), mtime, st.st_ino)
    described = {}
    for rel, (mode, uid, gid, extra, xattrs, mtime, ino) in entries.items():
        links = tuple(sorted(inodes.get(ino, [rel]))) if mode.startswith("-") else ()
        described[rel] = (mode, uid, gid, extra, tuple(xattrs.items()), mtime, links)
    return described


def compare_trees(expected: Path, actual: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """Return a sentence per difference between the trees (empty when identical), ignoring paths in ``ignore``."""
    a = {k: v for k, v in describe_tree(expected).items() if k not in ignore}
    b = {k: v for k, v in describe_tree(actual).items() if k not in ignore}
    problems = [f"missing: {rel}" for rel in sorted(a.keys() - b.keys())]
    problems += [f"unexpected: {rel}" for rel in sorted(b.keys() - a.keys())]
    fields = ("mode", "uid", "gid", "content/device/target", "xattrs", "mtime", "hard links")
    for rel in sorted(a.keys() & b.keys()):
        for name, left, right in zip(fields, a[rel], b[rel], strict=True):
            if left != right:
                problems.append(f"{rel}: {name} differs: expected {left!r}, got {right!r}")
    return problems
