"""What durability against power loss costs cidd's control plane: SQLite ``synchronous=FULL`` against NORMAL.

cidd commits every machine step (node row + history row) on the reactor thread before acting on it. This
times N such steps (the same ``Store`` calls the engine makes) with each setting, alternating rounds in one
run (the machine is noisy), on the file system of --dir. Prints per-step medians and their ratio.

usage: python bench/store_sync.py [--steps 2000] [--rounds 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cidd.core.machine import Node, State, Transition  # noqa: E402
from cidd.store import Store  # noqa: E402


def one_round(path: Path, synchronous: str, steps: int) -> float:
    """Return the median seconds of one committed step over ``steps`` steps with ``synchronous``."""
    path.unlink(missing_ok=True)
    store = Store(path, synchronous=synchronous)
    times = []
    try:
        for i in range(steps):
            node = Node(f"n{i % 500:04d}", state=State.INSTALLING, target="alma-9-1", job="j1", attempt=1)
            transition = Transition(node.name, "j1", "alma-9-1", "to_installer", "installing", 1, 0, 1.0, "bench")
            start = time.perf_counter()
            with store.transaction():
                store.save_node(node)
                store.add_event(1000.0 + i, transition)
            times.append(time.perf_counter() - start)
    finally:
        store.close()
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, help="where the database goes (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bench.sqlite"
        results: dict[str, list[float]] = {"normal": [], "full": []}
        for _ in range(args.rounds):
            for mode in ("normal", "full"):
                results[mode].append(one_round(path, mode, args.steps))
    normal, full = statistics.median(results["normal"]), statistics.median(results["full"])
    print(f"step_normal_us={normal * 1e6:.1f}")
    print(f"step_full_us={full * 1e6:.1f}")
    print(f"full_over_normal={full / normal:.2f}")
    print(f"steps_per_s_full={1 / full:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
