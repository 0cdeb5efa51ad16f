"""Image distribution on the network bed: T(N) of HTTP and of multicast (udpcast) on equal shaped links.

    .venv/bin/python bench/distribution.py [--nodes 1,4,16,32] [--rate 30] [--mib 16] [--methods http,multicast]

Root only (network namespaces; tests/netbed.py). For each method and each N, a new bed: cidd in the head
namespace, N real installers (``cidkid --mode installer``, directory targets), every link (the head's too) shaped
to ``--rate`` Mbit/s both ways. T(N) is the time from cidd accepting the capture (``capture.started``) to the
last node's ``installing -> to_image`` (the image written, verified and synced on every node); the system agents
that start afterwards are not timed. ``head_bytes_ratio`` is what the head node's link sent during the capture
over the image's size. Both CPUs' utilisation during each capture is printed, to show that the network, not the
two CPUs, was the limit (``cpu``: over T, whole machine, so other work on the machine counts too). The last
lines are the figures (docs/distribution.md).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.distbed import IMAGE_ID, CidBed, _when, make_image  # noqa: E402
from tests.netbed import CpuMeter, NetBed, remove_stale  # noqa: E402


def _stop(*_: Any) -> None:
    raise KeyboardInterrupt  # so that the bed's context manager removes the namespaces


def run_once(method: str, nodes: int, rate: float, image: tuple[Path, str, int], work: Path) -> dict[str, Any]:
    """Switch ``nodes`` nodes to the image with ``method``; return T, head bytes ratio, CPU use, sources."""
    path, sha256, size = image
    distribution = {"method": method}
    if method == "multicast":
        distribution.update(rate_mbit=rate * 0.92, gather=1.0, wait=5, drop_after=10, stall=5)
    root = work / f"{method}-{nodes}"
    with NetBed(nodes, rate_mbit=rate) as bed:
        cid = CidBed(bed, root, distribution=distribution, install_timeout=1800)
        cid.image_dir.mkdir(parents=True)
        shutil.copy(path, cid.image_dir / path.name)
        cid.images = [(IMAGE_ID, cid.image_dir / path.name, sha256, size, {})]
        cid.start_cidd()
        for host in bed.nodes:
            cid.start_installer(host)
        cid.wait_online(nodes, timeout=180)
        time.sleep(1.0)
        sent = bed.tx_bytes(bed.head)
        meter = CpuMeter()
        meter.start()
        done = cid.cidcapt("-j", "bench", "-n", f"node[01-{nodes:02d}]", "-i", IMAGE_ID, "--timeout", "3000",
                           timeout=3600)
        busy = meter.stop()
        head = bed.tx_bytes(bed.head) - sent
        if done.returncode != 0:
            raise RuntimeError(f"{method} N={nodes}: cidcapt exited {done.returncode}: {done.stderr[-2000:]}")
        events = cid.events()
        started = min(_when(e) for e in events if e.get("event") == "capture.started")
        installed = cid.installed_times()
        sources = {}
        for name in cid.nodes:
            for event in cid.node_events(name):
                if event.get("event") == "installer.finished":
                    sources[name] = event.get("source")
        window = meter.busy_between(started, max(installed.values()))
        return {"T": max(installed.values()) - started, "head_ratio": head / size, "cpu": window, "cpu_all": busy,
                "sources": sorted(set(sources.values()))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,4,16,32", help="the N to measure (default 1,4,16,32)")
    parser.add_argument("--rate", type=float, default=30.0, help="every link's rate in Mbit/s (default 30)")
    parser.add_argument("--mib", type=int, default=16, help="image size in MiB of random data (default 16)")
    parser.add_argument("--methods", default="http,multicast")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    remove_stale()
    counts = [int(n) for n in args.nodes.split(",")]
    methods = args.methods.split(",")
    work = Path(tempfile.mkdtemp(prefix="cid-dist-bench-"))
    try:
        image = make_image(work / "image", args.mib)
        print(f"image {image[2]} bytes, links {args.rate:g} Mbit/s, ideal transfer "
              f"{image[2] * 8 / (args.rate * 1e6):.2f} s", flush=True)
        results: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in methods}
        for method in methods:
            for n in counts:
                result = run_once(method, n, args.rate, image, work)
                results[method][n] = result
                print(f"{method} N={n}: T={result['T']:.2f} s head_bytes_ratio={result['head_ratio']:.2f} "
                      f"cpu={result['cpu']} sources={result['sources']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    for method in methods:
        row = results[method]
        print(f"T_{method}: " + " ".join(f"T{n}={row[n]['T']:.2f}" for n in counts))
        print(f"cpu_{method}: " + " ".join(f"N{n}={row[n]['cpu']}" for n in counts))
    if "http" in results and {1, 16} <= set(results["http"]):
        print(f"http_scale16={results['http'][16]['T'] / results['http'][1]['T']:.2f}")
    engine = next((m for m in methods if m != "http"), None)
    if engine is not None and 1 in results[engine]:
        row = results[engine]
        for n in (16, 32):
            if n in row:
                print(f"engine_scale{n}={row[n]['T'] / row[1]['T']:.2f}  (engine={engine}, udpcast)")
        biggest = max(row)
        print(f"head_bytes_ratio={row[biggest]['head_ratio']:.2f}  (N={biggest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
