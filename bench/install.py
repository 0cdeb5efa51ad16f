"""Image path benchmark: mkimg and the streaming installer against the plain shell pipelines, same run.

    python bench/install.py [--system-mb 512] [--extra-mb 0] [--repeat 9] [--catalog-size 1000]

1. Builds a real root filesystem (tests/rootfs.py: busybox-static with every kind of file, plus --system-mb
   MiB of this machine's own /usr files -- real binaries, libraries and text, which compress like an OS image
   -- plus --extra-mb MiB of synthetic data, half text, half random) — at least 500 MB unpacked.
2. mkimg: `cid-mkimg` against `tar -c ... | zstd -T0 -3 > file` on the same tree, alternating which goes
   first; `mkimg_ratio` = medians. Every timed run (here and in 3) starts after an untimed `sync`, so that no
   run pays for the writeback of the file the run before it left dirty in the page cache.
3. install: the cid installer (cidinstall.stream.stream_install) pulling the image from a real cidd's HTTP
   port into an empty directory, against `curl URL | zstd -dc | tar -x` into an equal empty directory,
   alternating; `install_ratio` = medians.
4. catalog: a catalog of --catalog-size images; adding one entry as cid-mkimg does (cidcatalog.edit:
   lock, rewrite, fsync, rename), `cidcapt --reload`, and a
   capture with it on one simulated node (zero reboot and install time): `catalog_add_s`.

Targets: install_ratio <= 1.1, mkimg_ratio <= 1.1, catalog_add_s < 1. Needs root (device nodes) and
Debian's busybox-static, acl, zstd and curl (`make test` installs them). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cidcatalog.catalog import Image, load_catalog, render_entry  # noqa: E402
from cidcatalog.edit import update_catalog  # noqa: E402
from cidcommon.logs import configure as configure_logs  # noqa: E402
from cidinstall.stream import stream_install  # noqa: E402
from cidkid.platform import InstallRequest  # noqa: E402
from tests.procs import free_port, wait_port  # noqa: E402
from tests.rootfs import build_rootfs  # noqa: E402

PACKAGES = ("cidd", "cidkid", "cidcapt", "cidcommon")
TAR_C = ["tar", "-c", "-f", "-", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "--sparse"]
TAR_X = ["tar", "-x", "-f", "-", "--numeric-owner", "--same-owner", "--preserve-permissions", "--xattrs",
         "--xattrs-include=*", "--acls"]


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def settle() -> None:
    """Write every dirty page out before a timed run (untimed).

    Without it, each run pays for the writeback of the image the run before it left in the page cache: the
    baseline's `zstd -o` returns with ~350 MiB still dirty, and the kernel flushes it during the next run.
    """
    os.sync()


def tree_bytes(root: Path) -> int:
    return sum(f.lstat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system-mb", type=int, default=512, help="MiB of this machine's /usr files")
    parser.add_argument("--extra-mb", type=int, default=0, help="MiB of synthetic data, half of it random")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--catalog-size", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new directory under /var/tmp")
    args = parser.parse_args()
    configure_logs(json=False, level="warning")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cid-bench-install-", dir="/var/tmp"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "CID_STATE_DIR": str(work / "state")}
    procs: list[subprocess.Popen] = []
    # Byte-compile the packages first, as an installed package is: otherwise, with $PYTHONDONTWRITEBYTECODE
    # set, every cid-mkimg run would compile its modules again.
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(str(REPO / p) for p in PACKAGES)], check=True)
    try:
        src = build_rootfs(fresh(work / "src"), extra_mb=args.extra_mb, system_mb=args.system_mb)
        unpacked = tree_bytes(src)
        print(f"rootfs: {unpacked / 2**20:.0f} MiB unpacked in {src} (up to {args.system_mb} MiB of /usr files, "
              f"{args.extra_mb} MiB synthetic)", flush=True)
        if unpacked < 500 * 10**6:
            print(f"bench/install.py: error: the tree is {unpacked / 10**6:.0f} MB, under the 500 MB the figures "
                  "need: raise --system-mb (this machine's /usr may hold less) or add --extra-mb", file=sys.stderr)
            return 2
        images = fresh(work / "images")
        catalog = work / "images.yaml"
        catalog.write_text("images:\n")

        # --- mkimg against tar | zstd -T0, alternating which goes first; each writes a new file, deleted
        # (untimed) after the run except the image the install part uses ---
        mk, base = [], []
        for i in range(args.repeat):
            for which in ("mkimg", "baseline") if i % 2 == 0 else ("baseline", "mkimg"):
                settle()
                start = time.perf_counter()
                if which == "mkimg":
                    subprocess.run([sys.executable, "-m", "cidmkimg.main", "--root", str(src), "--name", "bench",
                                    "--version", "1", "--subversion", str(i), "--image-dir", str(images),
                                    "--catalog", str(catalog)], check=True, env=env, stdout=subprocess.DEVNULL)
                    mk.append(time.perf_counter() - start)
                    if i:
                        (images / f"bench-1-{i}.tar.zst").unlink()
                else:
                    out = images / f"baseline-{i}.tar.zst"
                    subprocess.run(f"{' '.join(TAR_C)} -C {src} . | zstd -T0 -3 -q -f -o {out}", shell=True,
                                   check=True)
                    base.append(time.perf_counter() - start)
                    out.unlink()
        mkimg_ratio = statistics.median(mk) / statistics.median(base)
        print(f"mkimg runs={[round(x, 2) for x in mk]} baseline(tar|zstd -T0)={[round(x, 2) for x in base]}",
              flush=True)
        image = load_catalog(catalog).get("bench-1-0")
        assert image is not None
        print(f"image {image.size / 2**20:.0f} MiB, compression ratio {unpacked / image.size:.2f}", flush=True)

        # --- install through cidd's HTTP against curl | zstd -dc | tar -x ---
        port, http = free_port(), free_port()
        config = {"state_dir": str(work / "state"), "catalog": str(catalog), "image_dir": str(images),
                  "listen": {"host": "127.0.0.1", "port": port}, "http": {"host": "127.0.0.1", "port": http},
                  "log": {"level": "warning"}}
        (work / "cidd.yaml").write_text(yaml.safe_dump(config))
        procs.append(subprocess.Popen([sys.executable, "-m", "cidd.main", "--config", str(work / "cidd.yaml")],
                                      env=env, stderr=open(work / "cidd.log", "wb")))  # noqa: SIM115
        wait_port(http)
        url = f"http://127.0.0.1:{http}/images/{image.file}"
        request = InstallRequest(image=image.id, url=url, sha256=image.sha256, size=image.size, format="tar.zst")
        ours, theirs = [], []
        for i in range(args.repeat):  # alternating which goes first
            for which in ("cid", "shell") if i % 2 == 0 else ("shell", "cid"):
                target = fresh(work / f"target-{which}")
                settle()
                start = time.perf_counter()
                if which == "cid":
                    result = stream_install(request, target, lambda *a: None)
                    ours.append(time.perf_counter() - start)
                    assert result.ok, result.reason
                else:
                    subprocess.run(f"curl -sf {url} | zstd -dc | {' '.join(TAR_X)} -C {target}", shell=True,
                                   check=True)
                    theirs.append(time.perf_counter() - start)
        install_ratio = statistics.median(ours) / statistics.median(theirs)
        print(f"install runs={[round(x, 2) for x in ours]} baseline(curl|zstd|tar)={[round(x, 2) for x in theirs]}"
              f" image={image.size / 2**20:.0f} MiB", flush=True)

        # --- catalog of N images: add one and capture with it ---
        entries = "".join(render_entry(Image(f"img{i}", "1", "0", f"img{i}-1-0.tar.zst"))
                          for i in range(args.catalog_size))
        catalog.write_text("images:\n" + entries)
        capt = [sys.executable, "-m", "cidcapt.main", "--server", f"127.0.0.1:{port}"]
        subprocess.run([*capt, "--reload"], env=env, check=True, capture_output=True)
        procs.append(subprocess.Popen([sys.executable, "-m", "cidsim.main", "cat01", "--server",
                                       f"127.0.0.1:{port}", "--sim-dir", str(work / "sim"), "--reboot-delay", "0",
                                       "--install-time", "0", "--initial-image", "img0-1-0"],
                                      env=env, stderr=open(work / "fleet.log", "wb")))  # noqa: SIM115
        while subprocess.run([*capt, "-j", "warm", "-n", "cat01", "-i", "img0-1-0", "--quiet"], env=env,
                             capture_output=True).returncode != 0:
            time.sleep(0.2)
        adds = []
        for i in range(args.repeat):
            start = time.perf_counter()
            new = Image("added", "1", str(i), f"added-1-{i}.tar.zst")
            update_catalog(catalog, new)  # what cid-mkimg does: lock, rewrite, fsync, rename
            subprocess.run([*capt, "--reload"], env=env, check=True, capture_output=True)
            done = subprocess.run([*capt, "-j", f"add{i}", "-n", "cat01", "-i", new.id, "--quiet"], env=env,
                                  capture_output=True, text=True)
            adds.append(time.perf_counter() - start)
            assert done.returncode == 0, done.stderr
        print(f"catalog_add runs={[round(x, 3) for x in adds]} with {args.catalog_size} images", flush=True)
        print(f"mkimg_ratio={mkimg_ratio:.2f}")
        print(f"catalog_add_s={statistics.median(adds):.3f}")
        print(f"install_ratio={install_ratio:.2f}")
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
