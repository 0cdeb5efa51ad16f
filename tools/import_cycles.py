#!/usr/bin/env python3
"""Fail when cid's product packages import each other in a cycle (imports inside functions and under
``TYPE_CHECKING`` count too). Run by ``make lint`` beside import-linter's contracts (``.importlinter``).

usage: tools/import_cycles.py   -- prints each cycle, then ``import_cycles=N``; exit 0 when N is 0, else 1.
"""

from __future__ import annotations

import sys

import grimp

PACKAGES = ("cidd", "cidkid", "cidinstall", "cidcapt", "cidcommon", "cidcatalog", "cidmkimg", "cidsim", "blancmange")


def strongly_connected(nodes: set[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def main() -> int:
    """Print the cycles among the product modules; return 1 when there is any."""
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    nodes = set(graph.modules)
    edges = {m: {d for d in graph.find_modules_directly_imported_by(m) if d in nodes} for m in nodes}
    cycles = strongly_connected(nodes, edges)
    for cycle in cycles:
        print("cycle: " + " <-> ".join(cycle))
    print(f"import_cycles={len(cycles)}")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
