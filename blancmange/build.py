"""Building the installer: a cached debootstrap tree, a Debian kernel and its modules, packed as a cpio.zst.

Blocking code for a command-line tool (runs debootstrap, apt-get, dpkg-deb, cpio, zstd as root). The
mirror is the one of the machine's apt sources (or ``blancmange --mirror``); nothing in the config names a
host. The mirror is probed with a bounded wait before debootstrap, and every tool runs under a time limit, so
that a build with no reachable mirror fails naming it instead of hanging.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import structlog

from blancmange.config import MIRROR_TIMEOUT, BlancmangeError, BuildConfig, MirrorUnreachable

log = structlog.get_logger(__name__)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: cid's own packages copied into the initramfs and images: the agent, the installer and what both share.
#: Never cidd, cidcapt, cidcatalog, cidmkimg or cidsim (``make lint`` keeps these three free of them).
CID_PACKAGES = ("cidkid", "cidinstall", "cidcommon")
PY_SITE = "usr/lib/python3/dist-packages"


def run(argv: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``argv`` and return it finished; raise BlancmangeError with ``what`` and its stderr on failure, or
    when it outlives its ``timeout`` (killed)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    except FileNotFoundError:
        raise BlancmangeError(f"{what}: {argv[0]} is not installed (apt-get install debootstrap cpio zstd "
                              "kmod)") from None
    except subprocess.TimeoutExpired as exc:
        raise BlancmangeError(f"{what} did not finish within {exc.timeout:g} s and was stopped") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-8:]
        raise BlancmangeError(f"{what} failed (exit status {done.returncode}): " + " | ".join(tail))
    return done


def apt_mirror(suite: str, sources: Path = Path("/etc/apt")) -> str:
    """Return the URI of the Debian mirror the machine's apt sources use for ``suite`` (component main).

    Reads deb822 ``*.sources`` and one-line ``*.list`` files. Raises BlancmangeError when none is found.
    """
    files = sorted(glob.glob(str(sources / "sources.list.d" / "*.sources"))) + [str(sources / "sources.list")] + \
        sorted(glob.glob(str(sources / "sources.list.d" / "*.list")))
    for name in files:
        try:
            text = Path(name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict((k.strip().lower(), v.strip()) for k, _, v in
                              (line.partition(":") for line in stanza.splitlines()
                               if ":" in line and not line.startswith("#")))
                if ("deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split()
                        and fields.get("enabled", "yes") != "no"):
                    return fields["uris"].split()[0]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                    return words[1]
    raise BlancmangeError(f"no apt source for Debian {suite} in {sources}: configure the mirror in apt's sources")


def _fetch_status(url: str, timeout: float, result: list[object]) -> None:
    """Append the HTTP status of a GET of ``url`` (headers only) to ``result``, or the exception that stopped it."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            result.append(reply.status)
    except Exception as exc:  # handed to the caller, which names the mirror
        result.append(exc)


def probe_mirror(mirror: str, suite: str, timeout: float = MIRROR_TIMEOUT) -> None:
    """Return once the Debian mirror ``mirror`` answers for ``dists/<suite>/Release`` within ``timeout`` seconds
    (name lookup included: the request runs in a thread that is waited for at most that long).

    Only http, https and file mirrors are probed. Raises MirrorUnreachable naming the mirror, the reason and what
    to check: a refused connection, no answer in time, an HTTP error, or no such file.
    """
    url = f"{mirror.rstrip('/')}/dists/{suite}/Release"
    scheme = urllib.parse.urlsplit(mirror).scheme
    fix = ("check the mirror (blancmange --mirror, else apt's sources), the network and any proxy "
           "(http_proxy)")
    if scheme == "file":
        if not Path(urllib.parse.urlsplit(url).path).is_file():
            raise MirrorUnreachable(f"Debian mirror {mirror} has no {url}: not a mirror of {suite}; {fix}")
        return
    if scheme not in ("http", "https"):
        log.info("blancmange.mirror_not_probed", mirror=mirror, scheme=scheme)
        return
    started = time.monotonic()
    result: list[object] = []
    worker = threading.Thread(target=_fetch_status, args=(url, timeout, result), daemon=True,
                              name="blancmange-mirror-probe")
    worker.start()
    worker.join(timeout + 1.0)
    answer = result[0] if result else TimeoutError("timed out")
    if isinstance(answer, urllib.error.HTTPError):
        reason = f"it answered HTTP {answer.code} for {url}"
    elif isinstance(answer, urllib.error.URLError):
        reason = str(answer.reason)
    elif isinstance(answer, BaseException):
        reason = str(answer) or type(answer).__name__
    else:
        log.info("blancmange.mirror_ok", mirror=mirror, status=answer, seconds=round(time.monotonic() - started, 3))
        return
    if "timed out" in reason:
        reason = f"no answer within {timeout:g} s"
    raise MirrorUnreachable(f"Debian mirror {mirror} cannot be used: {reason}; nothing was built; {fix}")


def debootstrap_tree(config: BuildConfig, cache: Path) -> Path:
    """Return a debootstrap'd tree of ``config.packages`` (cached under ``cache`` by the package list).

    The mirror (``config.mirror``, else the apt sources') is probed first (``config.mirror_timeout``). Raises
    MirrorUnreachable naming the mirror when it does not answer, BlancmangeError when debootstrap fails or
    outlives its hour.
    """
    done = cache / "trees" / config.tree_key()
    root = done / "root"
    if (done / "complete").exists():
        log.info("blancmange.tree_cached", tree=str(root))
        return root
    mirror = config.mirror or apt_mirror(config.suite)
    probe_mirror(mirror, config.suite, config.mirror_timeout)
    work = cache / "trees" / f"{config.tree_key()}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log.info("blancmange.debootstrap", suite=config.suite, mirror=mirror, packages=len(config.packages))
    started = time.monotonic()
    run(["debootstrap", "--variant=minbase", f"--include={','.join(config.packages)}", config.suite,
         str(work / "root"), mirror], f"debootstrap from {mirror}", timeout=3600)
    shutil.rmtree(work / "root" / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (work / "packages").write_text("\n".join(sorted(config.packages)) + "\n")
    shutil.rmtree(done, ignore_errors=True)
    work.rename(done)
    (done / "complete").write_text(f"{time.monotonic() - started:.0f} s\n")
    return root


def kernel_tree(config: BuildConfig, cache: Path) -> tuple[Path, str]:
    """Return (the extracted linux-image package, its kernel version), downloading it through apt when needed."""
    package = config.kernel_package
    deps = run(["apt-cache", "depends", "--no-recommends", "--no-suggests", package], "apt-cache depends").stdout
    real = re.findall(r"Depends:\s+(linux-image-[0-9][^\s]*)", deps)
    package = real[0] if real else package
    version = run(["apt-cache", "policy", package], "apt-cache policy").stdout
    candidate = re.search(r"Candidate:\s+(\S+)", version)
    if candidate is None or candidate.group(1) == "(none)":
        raise BlancmangeError(f"no candidate for {package}: run apt-get update, or fix kernel_package")
    where = cache / "kernels" / f"{package}_{candidate.group(1)}"
    if not (where / "complete").exists():
        shutil.rmtree(where, ignore_errors=True)
        (where / "deb").mkdir(parents=True)
        run(["apt-get", "download", f"{package}={candidate.group(1)}"], f"apt-get download {package}",
            cwd=where / "deb", timeout=1800)
        debs = list((where / "deb").glob("*.deb"))
        run(["dpkg-deb", "-x", str(debs[0]), str(where / "root")], "dpkg-deb -x")
        shutil.rmtree(where / "deb")
        for kver in (where / "root" / "lib" / "modules").iterdir():  # modules.dep is made by postinst
            run(["depmod", "-b", str(where / "root"), kver.name], "depmod")
        (where / "complete").write_text(package + "\n")
    versions = [p.name for p in (where / "root" / "lib" / "modules").iterdir()]
    return where / "root", versions[0]


def module_order(kroot: Path, kver: str, wanted: tuple[str, ...]) -> list[str]:
    """Return the module files (relative to lib/modules/KVER) to load for ``wanted``, dependencies first.

    Built-in modules are skipped; an unknown module raises BlancmangeError.
    """
    base = kroot / "lib" / "modules" / kver
    deps: dict[str, list[str]] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {Path(p).name.split(".ko")[0].replace("-", "_"): p for p in deps}
    builtin = {Path(line).name.split(".ko")[0].replace("-", "_")
               for line in (base / "modules.builtin").read_text().splitlines()}
    order: list[str] = []

    def add(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            add(dep)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        if key not in by_name:
            raise BlancmangeError(f"kernel module {name} is neither a module nor built into {kver}; fix 'modules'")
        add(by_name[key])
    return order


def copy_modules(kroot: Path, kver: str, order: list[str], dest: Path) -> None:
    """Copy the modules of ``order`` under ``dest``/lib/modules/KVER, as shipped (bookworm: plain .ko files)."""
    src = kroot / "lib" / "modules" / kver
    for rel in order:
        target = dest / "lib" / "modules" / kver / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, target)


def strip_tree(root: Path, patterns: tuple[str, ...]) -> None:
    """Remove every path of ``root`` matching one of ``patterns`` (globs relative to root)."""
    for pattern in patterns:
        for path in glob.glob(str(root / pattern)):
            if os.path.islink(path) or os.path.isfile(path):
                os.unlink(path)
            else:
                shutil.rmtree(path, ignore_errors=True)


def add_cid(root: Path, python_modules: tuple[str, ...]) -> None:
    """Copy CID_PACKAGES (and the listed pure-Python modules) into the tree's Python path."""
    site = root / PY_SITE
    site.mkdir(parents=True, exist_ok=True)
    for name in CID_PACKAGES:
        shutil.rmtree(site / name, ignore_errors=True)
        shutil.copytree(REPO / name, site / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in python_modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise BlancmangeError(f"python module {name} is not installed where blancmange runs; pip install it")
        origin = Path(spec.origin)
        if origin.name == "__init__.py":
            shutil.copytree(origin.parent, site / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, site / origin.name)
    wrapper = root / "usr" / "bin" / "cidkid"
    wrapper.write_text("#!/bin/sh\nexec python3 -m cidkid.main \"$@\"\n")
    wrapper.chmod(0o755)
    paths = [f"/{PY_SITE}/{name}" for name in CID_PACKAGES]
    paths += [f"/{PY_SITE}/{n}.py" for n in python_modules if (site / f"{n}.py").exists()]
    run(["chroot", str(root), "python3", "-m", "compileall", "-q", "-j0", "--invalidation-mode", "unchecked-hash",
         *paths], "compiling cidkid")


def busybox_links(root: Path, bindir: str = "usr/lib/blancmange/bin") -> None:
    """Give every busybox applet the tree lacks a symlink in ``bindir`` (last on /init's PATH)."""
    applets = run(["chroot", str(root), "busybox", "--list"], "busybox --list").stdout.split()
    where = root / bindir
    where.mkdir(parents=True, exist_ok=True)
    for applet in applets:
        if not any((root / d / applet).exists() for d in ("usr/bin", "usr/sbin")):
            link = where / applet
            with contextlib.suppress(FileExistsError):
                link.symlink_to("/usr/bin/busybox")


def pack(root: Path, out: Path, level: int) -> int:
    """Pack ``root`` as a reproducible newc cpio compressed with zstd into ``out``; return its size in bytes.

    Every file time of ``root`` (a scratch copy) is set to the epoch first, and files go in name order: the same
    tree gives the same bytes."""
    tmp = out.with_name(out.name + ".tmp")
    cmd = (f"cd {shlex.quote(str(root))} && find . -exec touch -h -d @0 {{}} + && find . -print0 | LC_ALL=C sort -z | "
           f"cpio --null --create --format=newc --reproducible --quiet | zstd -q -T0 -{level} -o "
           f"{shlex.quote(str(tmp))} -f")
    run(["sh", "-c", cmd], "packing the initramfs", env={**os.environ, "SOURCE_DATE_EPOCH": "0"})
    os.replace(tmp, out)
    return out.stat().st_size


def tree_size(root: Path) -> int:
    """Return the bytes of the regular files under ``root``."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total
