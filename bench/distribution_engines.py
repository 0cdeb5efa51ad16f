"""The engines themselves, without cid, on the network bed: how BitTorrent (libtorrent), multicast (udpcast) and
plain HTTP spread one file from the head namespace to N node namespaces on equal shaped links.

    .venv/bin/python bench/distribution_engines.py --engine lt|udpcast|http -n 16 [--rate 50] [--mib 32]
        [--seq] [--super] [--slots -1] [--piece-kib 256]

Root only. ``lt`` needs ``pip install libtorrent`` in the virtualenv (only this benchmark uses it): the head
seeds, every node leeches with an explicit peer list (the head and every other node; no tracker, DHT, LSD or
PEX), ``--seq`` downloads in order (what streaming needs), ``--super`` makes the head a super-seed, ``--slots``
is libtorrent's unchoke slots (-1: unlimited). ``udpcast``: udp-sender in the head, udp-receiver piped into
sha256sum in every node. ``http``: Python's http.server in the head, curl piped into sha256sum in every node.
Prints one ``RESULT`` line: T (time until the last node has the whole file), T over the ideal single transfer,
the head's bytes sent over the file size, and both CPUs' use. These figures chose the engine
(docs/distribution.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.netbed import CpuMeter, NetBed, remove_stale  # noqa: E402

PEER = r'''
import json, sys, time
import libtorrent as lt
cfg = json.loads(sys.argv[1])
ses = lt.session({"listen_interfaces": f"{cfg['addr']}:6881", "enable_dht": False, "enable_lsd": False,
                  "enable_upnp": False, "enable_natpmp": False, "enable_incoming_utp": False,
                  "enable_outgoing_utp": False, "unchoke_slots_limit": cfg["slots"], "connections_limit": 500,
                  "close_redundant_connections": False, "min_reconnect_time": 1, "peer_connect_timeout": 3})
atp = lt.add_torrent_params()
atp.ti = lt.torrent_info(cfg["torrent"])
atp.save_path = cfg["save"]
flags = lt.torrent_flags.disable_dht | lt.torrent_flags.disable_lsd | lt.torrent_flags.disable_pex
if cfg.get("seed"):
    flags |= lt.torrent_flags.seed_mode | (lt.torrent_flags.super_seeding if cfg.get("super") else 0)
if cfg.get("seq"):
    flags |= lt.torrent_flags.sequential_download
atp.flags = flags
h = ses.add_torrent(atp)
t0 = last = time.monotonic()
for p in cfg["peers"]:
    h.connect_peer((p, 6881))
while True:
    time.sleep(0.05)
    now = time.monotonic()
    if now - last > 2:
        last = now
        for p in cfg["peers"]:
            h.connect_peer((p, 6881))
    if not cfg.get("seed") and h.status().is_seeding:
        print(json.dumps({"done": round(now - t0, 3)}), flush=True)
        cfg["seed"] = True  # keep seeding for the others until stopped
'''


def _stop(*_: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("lt", "udpcast", "http"), default="udpcast")
    parser.add_argument("-n", type=int, default=4)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--mib", type=int, default=32)
    parser.add_argument("--piece-kib", type=int, default=256)
    parser.add_argument("--seq", action="store_true")
    parser.add_argument("--super", action="store_true")
    parser.add_argument("--slots", type=int, default=8)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    remove_stale()
    work = Path(tempfile.mkdtemp(prefix="cid-engines-"))
    try:
        image = work / "image.bin"
        image.write_bytes(os.urandom(args.mib << 20))
        size = image.stat().st_size
        with NetBed(args.n, rate_mbit=args.rate) as bed:
            meter = CpuMeter()
            python = sys.executable
            if args.engine == "lt":
                import libtorrent as lt

                files = lt.file_storage()
                lt.add_files(files, str(image))
                torrent = lt.create_torrent(files, args.piece_kib * 1024, flags=lt.create_torrent.v1_only)
                lt.set_piece_hashes(torrent, str(work))
                (work / "image.torrent").write_bytes(lt.bencode(torrent.generate()))
                common = {"torrent": str(work / "image.torrent"), "slots": args.slots}
                bed.popen(bed.head, [python, "-c", PEER, json.dumps({**common, "addr": bed.head.address,
                                                                     "save": str(work), "seed": True,
                                                                     "super": args.super, "peers": []})])
                time.sleep(1.0)
                sent = bed.tx_bytes(bed.head)
                meter.start()
                t0 = time.monotonic()
                procs = []
                for host in bed.nodes:
                    (work / host.name).mkdir()
                    peers = [bed.head.address] + [h.address for h in bed.nodes if h is not host]
                    cfg = {**common, "addr": host.address, "save": str(work / host.name), "seq": args.seq,
                           "peers": peers}
                    procs.append(bed.popen(host, [python, "-c", PEER, json.dumps(cfg)], stdout=subprocess.PIPE,
                                           text=True))
            elif args.engine == "udpcast":
                procs = [bed.popen(host, ["sh", "-c", "udp-receiver --nokbd --interface eth0 2>/dev/null | "
                                          "sha256sum"], stdout=subprocess.PIPE, text=True) for host in bed.nodes]
                time.sleep(0.5)
                sent = bed.tx_bytes(bed.head)
                meter.start()
                t0 = time.monotonic()
                bed.popen(bed.head, ["udp-sender", "--nokbd", "--interface", "eth0", "--file", str(image),
                                     "--min-receivers", str(args.n), "--max-wait", "20", "--max-bitrate",
                                     f"{int(args.rate * 0.95)}m"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
            else:
                bed.popen(bed.head, [python, "-m", "http.server", "--bind", bed.head.address, "--directory",
                                     str(work), "8000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
                sent = bed.tx_bytes(bed.head)
                meter.start()
                t0 = time.monotonic()
                procs = [bed.popen(host, ["sh", "-c", f"curl -s http://{bed.head.address}:8000/image.bin | "
                                          "sha256sum"], stdout=subprocess.PIPE, text=True) for host in bed.nodes]
            times = []
            for proc in procs:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError("a node ended without the file")
                times.append(time.monotonic() - t0)
            busy = meter.stop()
            head = bed.tx_bytes(bed.head) - sent
        ideal = size * 8 / (args.rate * 1e6)
        total = max(times)
        print(f"RESULT engine={args.engine} n={args.n} T={total:.2f} ideal={ideal:.2f} T/ideal={total / ideal:.2f} "
              f"head_bytes_ratio={head / size:.2f} cpu={busy} options={vars(args)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
