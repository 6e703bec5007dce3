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
  its own on the left, where a user starts reading;
* with a :class:`View` (the canvas a template opens on, and the smallest zoom at which the frontend still
  draws node text), prefers arrangements the whole graph fits into at that zoom: the Note under the first
  columns instead of beside them, and, for long chains, the columns wrapped into a second row below the first
  (the link into the second row then runs down and back to the left).

:func:`crossings` and :func:`links_through_nodes` are also what the export's checks use on a finished file.
Standard library only, like the export script.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

GAP_X = 64  # horizontal room between columns, so links are visible and titles do not touch
GAP_Y = 40  # vertical gap between nodes (the title bar comes on top of it)
MAX_ORDERINGS = 5040


@dataclass(frozen=True)
class View:
    """The canvas a template opens on (screen pixels), the smallest zoom that still draws node text, and the
    overlays in its bottom right corner (the frontend's minimap and canvas tool bar) no node may sit under."""

    width: float
    height: float
    min_scale: float
    corner: tuple[float, float] = (0.0, 0.0)  # width, height of the covered bottom-right corner
    margin: float = 12.0  # screen pixels kept free along the canvas edges
    pad: float = 40.0  # graph units kept free around the graph


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
          free: list[str], note_below: bool = False, split: int | None = None) -> dict[str, tuple[float, float]]:
    """Positions (LiteGraph ``pos``: the body's top-left; the title bar is above it) for columns in order.

    ``free`` nodes (notes) form a first column, or with ``note_below`` sit under the first columns; ``split``
    starts a second row of columns (below the first) at that column index."""
    positions: dict[str, tuple[float, float]] = {}

    def stack(group: list[str], x: float, top: float) -> float:
        y = top + title_height
        for n in group:
            positions[n] = (x, y)
            y += nodes[n].size[1] + title_height + GAP_Y
        return max(nodes[n].size[0] for n in group)

    left = 0.0
    if free and not note_below:
        left = stack(free, 0.0, 0.0) + GAP_X
    rows = [columns] if split is None else [columns[:split], columns[split:]]
    top = 0.0
    for row in rows:
        x = left
        for group in row:
            x += stack(group, x, top) + GAP_X
        top = bottom(nodes, positions, row) + GAP_Y * 2
    if free and note_below:
        width = max(nodes[n].size[0] for n in free)
        under = [n for n in positions if positions[n][0] < width + GAP_X]
        stack(free, 0.0, max((positions[n][1] + nodes[n].size[1] for n in under), default=-GAP_Y) + GAP_Y)
    return positions


def bottom(nodes: dict[str, Node], positions: dict, groups: list[list[str]]) -> float:
    return max(positions[n][1] + nodes[n].size[1] for group in groups for n in group)


def bounds(nodes: dict[str, Node], positions: dict, title_height: float) -> tuple[float, float, float, float]:
    """The graph's extent, title bars included: (x0, y0, x1, y1)."""
    return (min(x for x, _y in positions.values()), min(y - title_height for _x, y in positions.values()),
            max(x + nodes[n].size[0] for n, (x, _y) in positions.items()),
            max(y + nodes[n].size[1] for n, (_x, y) in positions.items()))


def fit_scale(nodes: dict[str, Node], positions: dict, title_height: float, view: View) -> float:
    """The largest zoom (at most 1) at which the whole graph, placed at the view's top left with ``view.pad``
    around it, lies inside the view and no node lies under the covered corner."""
    x0, y0, x1, y1 = bounds(nodes, positions, title_height)
    room_w, room_h = view.width - 2 * view.margin, view.height - 2 * view.margin
    scale = min(1.0, room_w / (x1 - x0 + 2 * view.pad), room_h / (y1 - y0 + 2 * view.pad))
    free_w, free_h = view.width - view.corner[0] - view.margin, view.height - view.corner[1] - view.margin
    for n, (x, y) in positions.items():  # a node reaching into the corner needs a zoom that keeps it out
        right, below = x + nodes[n].size[0] - x0 + view.pad, y + nodes[n].size[1] - y0 + view.pad
        if right * scale > free_w and below * scale > free_h:
            scale = min(scale, max(free_w / right, free_h / below))
    return scale


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
            free: list[str] | tuple = (), view: View | None = None) -> tuple[dict[str, tuple[float, float]], tuple]:
    """Best positions for ``nodes`` and their score (fits the view or not, crossings, links through nodes,
    how far from the plain layout, vertical run).

    ``free`` nodes (notes: no links) go in a first column of their own, in the given order; with a ``view`` they
    may go under the first columns, and the columns may wrap into a second row, when only that fits the view."""
    free = list(free)
    columns = _columns(nodes, links, set(free))
    total = math.prod(math.factorial(len(c)) for c in columns)
    if total <= MAX_ORDERINGS:
        orders = [list(map(list, combo)) for combo in itertools.product(*(itertools.permutations(c)
                                                                          for c in columns))]
    else:
        orders = [_barycentre(columns, links)]
    # (note below?, row split) in order of preference: the plain layout first
    variants = [(False, None)]
    if view is not None:
        variants += [(True, None)] if free else []
        variants += [(below, k) for below in ([False, True] if free else [False]) for k in range(1, len(columns))]
    best, best_score = None, None
    for candidate in orders:
        for rank, (below, split) in enumerate(variants):
            positions = place(nodes, candidate, title_height, free, below, split)
            fits = view is None or fit_scale(nodes, positions, title_height, view) >= view.min_scale
            crossing, through, vertical = score(nodes, links, positions, title_height)
            value = (not fits, crossing, through, rank, vertical)
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
