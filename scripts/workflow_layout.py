"""Left-to-right layout of a UI workflow with no overlaps and as few link crossings as the graph allows.

Why not the frontend's ``graph.arrange()``: it stacks each column in node-id order, so links cross where a
different order would not, and it runs before image previews have grown the output nodes, so nodes overlap
after the first run. :func:`arrange` takes the node sizes measured *after* the page has shown the outputs (see
``scripts/export_ui_workflows.py``), the slot positions the frontend reports, and:

* puts each node one column right of its furthest input (nodes without inputs move next to their first user),
  so every link runs left to right;
* tries every order of the nodes within each column (the bundled graphs are small; above ``MAX_ORDERINGS``
  orderings it falls back to barycentre sorting) and keeps the one with the fewest link crossings, then the
  fewest links drawn through another node, then the shortest vertical link runs;
* stacks each column with a gap that includes the title bar, and puts the "model files" Note in a column of
  its own on the left, where a user starts reading.

:func:`crossings` and :func:`links_through_nodes` are also what the export's checks use on a finished file.
Standard library only, like the export script.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

GAP_X = 80  # horizontal room between columns, so links are visible and titles do not touch
GAP_Y = 40  # vertical gap between nodes (the title bar comes on top of it)
MAX_ORDERINGS = 5040


@dataclass
class Node:
    """A node's measured geometry: size without title, and slot positions relative to ``pos``."""

    size: tuple[float, float]
    inputs: list[tuple[float, float]]
    outputs: list[tuple[float, float]]


Link = tuple[str, int, str, int]  # origin id, origin slot, target id, target slot


def _columns(nodes: dict[str, Node], links: list[Link], free: set[str]) -> list[list[str]]:
    preds: dict[str, set[str]] = {n: set() for n in nodes}
    succs: dict[str, set[str]] = {n: set() for n in nodes}
    for origin, _o, target, _t in links:
        preds[target].add(origin)
        succs[origin].add(target)
    depth: dict[str, int] = {}

    def layer(n: str, seen: frozenset = frozenset()) -> int:
        if n in seen:
            raise ValueError(f"the graph has a cycle through node {n}")
        if n not in depth:
            depth[n] = 1 + max((layer(p, seen | {n}) for p in preds[n]), default=-1)
        return depth[n]

    for n in nodes:
        if n not in free:
            layer(n)
    for n in nodes:  # sources sit right before their first user
        if n not in free and not preds[n] and succs[n]:
            depth[n] = min(depth[s] for s in succs[n]) - 1
    count = max(depth.values(), default=-1) + 1
    columns: list[list[str]] = [[] for _ in range(count)]
    for n in sorted(depth, key=order_key):
        columns[depth[n]].append(n)
    return [c for c in columns if c]


def order_key(node_id) -> tuple:
    return (0, int(node_id), "") if str(node_id).isdigit() else (1, 0, str(node_id))


def place(nodes: dict[str, Node], columns: list[list[str]], title_height: float,
          free: list[str]) -> dict[str, tuple[float, float]]:
    """Positions (LiteGraph ``pos``: the body's top-left; the title bar is above it) for columns in order."""
    positions: dict[str, tuple[float, float]] = {}
    x = 0.0
    for group in ([free] if free else []) + columns:
        y = title_height
        for n in group:
            positions[n] = (x, y)
            y += nodes[n].size[1] + title_height + GAP_Y
        x += max(nodes[n].size[0] for n in group) + GAP_X
    return positions


def segments(nodes: dict[str, Node], links: list[Link], positions: dict) -> list[tuple]:
    """Each link as a straight segment (its drawn spline stays close to it) between its two slots."""
    out = []
    for origin, o_slot, target, t_slot in links:
        ox, oy = positions[origin]
        tx, ty = positions[target]
        dx, dy = nodes[origin].outputs[o_slot]
        ex, ey = nodes[target].inputs[t_slot]
        out.append(((origin, o_slot), (target, t_slot), (ox + dx, oy + dy), (tx + ex, ty + ey)))
    return out


def _orient(a, b, c) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def _cross(p1, p2, q1, q2) -> bool:
    d1, d2 = _orient(q1, q2, p1), _orient(q1, q2, p2)
    d3, d4 = _orient(p1, p2, q1), _orient(p1, p2, q2)
    return d1 * d2 < 0 and d3 * d4 < 0


def crossings(nodes: dict[str, Node], links: list[Link], positions: dict) -> int:
    """Pairs of links that cross (links sharing an output or an input slot never count)."""
    segs = segments(nodes, links, positions)
    count = 0
    for (a_from, a_to, a1, a2), (b_from, b_to, b1, b2) in itertools.combinations(segs, 2):
        if a_from != b_from and a_to != b_to and _cross(a1, a2, b1, b2):
            count += 1
    return count


def _hits_box(p1, p2, box) -> bool:
    x0, y0, x1, y1 = box
    for t in (i / 16 for i in range(1, 16)):  # sample the segment: enough for boxes hundreds of pixels wide
        x, y = p1[0] + t * (p2[0] - p1[0]), p1[1] + t * (p2[1] - p1[1])
        if x0 < x < x1 and y0 < y < y1:
            return True
    return False


def links_through_nodes(nodes: dict[str, Node], links: list[Link], positions: dict, title_height: float) -> int:
    """Links drawn across a node other than their two ends (they hide its widgets)."""
    count = 0
    for (origin, _), (target, _), p1, p2 in segments(nodes, links, positions):
        for n, (x, y) in positions.items():
            if n in (origin, target):
                continue
            w, h = nodes[n].size
            if _hits_box(p1, p2, (x, y - title_height, x + w, y + h)):
                count += 1
    return count


def score(nodes, links, positions, title_height) -> tuple:
    vertical = sum(abs(p2[1] - p1[1]) for _a, _b, p1, p2 in segments(nodes, links, positions))
    return (crossings(nodes, links, positions), links_through_nodes(nodes, links, positions, title_height),
            round(vertical))


def _barycentre(columns: list[list[str]], links: list[Link]) -> list[list[str]]:
    columns = [list(c) for c in columns]
    for _sweep in range(4):
        index = {n: i for c in columns for i, n in enumerate(c)}
        for c in columns[1:]:
            def mean_source(n, index=index):
                sources = [index[o] for o, _s, t, _u in links if t == n and o in index]
                return sum(sources) / len(sources) if sources else index[n]
            c.sort(key=mean_source)
    return columns


def arrange(nodes: dict[str, Node], links: list[Link], title_height: float,
            free: list[str] | tuple = ()) -> tuple[dict[str, tuple[float, float]], tuple]:
    """Best positions for ``nodes`` and their score (crossings, links through nodes, vertical run).

    ``free`` nodes (notes: no links) go in a first column of their own, in the given order."""
    free = list(free)
    columns = _columns(nodes, links, set(free))
    total = math.prod(math.factorial(len(c)) for c in columns)
    if total <= MAX_ORDERINGS:
        candidates = (list(map(list, combo)) for combo in itertools.product(*(itertools.permutations(c)
                                                                               for c in columns)))
    else:
        candidates = iter([_barycentre(columns, links)])
    best, best_score = None, None
    for candidate in candidates:
        positions = place(nodes, candidate, title_height, free)
        value = score(nodes, links, positions, title_height)
        if best_score is None or value < best_score:
            best, best_score = positions, value
    return best, best_score


def overlaps(nodes: dict[str, Node], positions: dict, title_height: float) -> list[tuple[str, str]]:
    """Pairs of nodes whose boxes (title bars included) overlap."""
    boxes = {n: (x, y - title_height, x + nodes[n].size[0], y + nodes[n].size[1]) for n, (x, y) in positions.items()}
    found = []
    for a, b in itertools.combinations(sorted(boxes, key=order_key), 2):
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
        if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
            found.append((a, b))
    return found
