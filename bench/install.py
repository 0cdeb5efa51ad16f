"""Image path benchmark: mkimg and the streaming installer against the plain shell pipelines, same run.

    python bench/install.py [--extra-mb 512] [--repeat 3] [--catalog-size 1000]

1. Builds a real root filesystem (tests/rootfs.py: busybox-static plus --extra-mb MiB of data, half text,
   half random) — at least 500 MB unpacked.
2. mkimg: `cid-mkimg` against `tar -c ... | zstd -T0 -3 > file` on the same tree; `mkimg_ratio` = medians.
3. install: the cid installer (cidkid.installer.stream_install) pulling the image from a real cidd's HTTP
   port into an empty directory, against `curl URL | zstd -dc | tar -x` into an equal empty directory,
   alternating; `install_ratio` = medians.
4. catalog: a catalog of --catalog-size images; adding one entry (atomic rewrite), `cidcapt --reload`, and a
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

from cidd.catalog import Image, load_catalog, render_entry, upsert_entry_text  # noqa: E402
from cidkid.installer import stream_install  # noqa: E402
from cidkid.platform import InstallRequest  # noqa: E402
from tests.procs import free_port, wait_port  # noqa: E402
from tests.rootfs import build_rootfs  # noqa: E402

TAR_C = ["tar", "-c", "-f", "-", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "--sparse"]
TAR_X = ["tar", "-x", "-f", "-", "--numeric-owner", "--same-owner", "--preserve-permissions", "--xattrs",
         "--xattrs-include=*", "--acls"]


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def tree_bytes(root: Path) -> int:
    return sum(f.lstat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extra-mb", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--catalog-size", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new directory under /var/tmp")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cid-bench-install-", dir="/var/tmp"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "CID_STATE_DIR": str(work / "state")}
    procs: list[subprocess.Popen] = []
    try:
        src = build_rootfs(fresh(work / "src"), extra_mb=args.extra_mb)
        print(f"rootfs: {tree_bytes(src) / 2**20:.0f} MiB unpacked in {src}", flush=True)
        images = fresh(work / "images")
        catalog = work / "images.yaml"
        catalog.write_text("images:\n")

        # --- mkimg against tar | zstd -T0 ---
        mk, base = [], []
        for i in range(args.repeat):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "cidkid.mkimg", "--root", str(src), "--name", "bench",
                            "--version", "1", "--subversion", str(i), "--image-dir", str(images), "--catalog",
                            str(catalog)], check=True, env=env, stdout=subprocess.DEVNULL)
            mk.append(time.perf_counter() - start)
            start = time.perf_counter()
            subprocess.run(f"{' '.join(TAR_C)} -C {src} . | zstd -T0 -3 -q -f -o {work / 'baseline.tar.zst'}",
                           shell=True, check=True)
            base.append(time.perf_counter() - start)
        mkimg_ratio = statistics.median(mk) / statistics.median(base)
        print(f"mkimg runs={[round(x, 2) for x in mk]} baseline(tar|zstd -T0)={[round(x, 2) for x in base]}",
              flush=True)
        image = load_catalog(catalog).get("bench-1-0")
        assert image is not None

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
        for _ in range(args.repeat):
            target = fresh(work / "target-cid")
            start = time.perf_counter()
            result = stream_install(request, target, lambda *a: None)
            ours.append(time.perf_counter() - start)
            assert result.ok, result.reason
            target = fresh(work / "target-shell")
            start = time.perf_counter()
            subprocess.run(f"curl -sf {url} | zstd -dc | {' '.join(TAR_X)} -C {target}", shell=True, check=True)
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
        procs.append(subprocess.Popen([sys.executable, "-m", "cidkid.main", "--sim", "cat01", "--server",
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
            tmp = catalog.with_suffix(".tmp")
            tmp.write_text(upsert_entry_text(catalog.read_text(), new))
            os.replace(tmp, catalog)
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
