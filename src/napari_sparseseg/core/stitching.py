"""Globally consistent ids from per-block fragments (:mod:`.blockwise`), by the rule of python-elf's
``elf.segmentation.stitching.stitch_segmentation``: on the band around each face two neighbouring
blocks share, a fragment is linked to the fragments of the other block it overlaps, with the
disaffinity 1 - (the fraction of its band pixels they share); fragments of one block that touch a
common partner get elf's default disaffinity 0.9; elf's multicut (``compute_edge_costs``,
``multicut_decomposition``) decides. elf's function keeps the whole segmentation in memory; here
only ids, sizes and the face bands of two blocks at a time are.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

#: elf's disaffinity for fragments that do not overlap across a face (stitch_segmentation)
NO_OVERLAP = 0.9
#: elf's boundary bias: merge when more than half of a fragment's band lies in the other
BETA = 0.5


def _overlaps(a: np.ndarray, b: np.ndarray, na: int, nb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids in a, ids in b, fraction of the id in a's band pixels lying on the id in b) for every
    overlapping pair of fragments (ids 1..na and 1..nb; 0 and halo-only ids take no part)."""
    a, b = a.ravel().astype(np.int64), b.ravel().astype(np.int64)
    valid_a = (a > 0) & (a <= na)
    size_a = np.bincount(a[valid_a], minlength=na + 1)
    keep = valid_a & (b > 0) & (b <= nb)
    pairs, counts = np.unique(a[keep] * (nb + 1) + b[keep], return_counts=True)
    ua, ub = pairs // (nb + 1), pairs % (nb + 1)
    return ua, ub, counts / size_a[ua]


def _repulsive(u: np.ndarray, v: np.ndarray) -> list[tuple[int, int]]:
    """Pairs of ``u`` (global ids of one block) that share a partner in ``v``."""
    out = []
    order = np.argsort(v, kind="stable")
    u, v = u[order], v[order]
    for part in np.split(u, np.flatnonzero(np.diff(v)) + 1):
        out += [(int(x), int(y)) for x, y in itertools.combinations(np.unique(part), 2)]
    return out


def stitch(blocks_dir: str | Path, grid_shape: tuple[int, ...], counts: list[int]) -> np.ndarray:
    """Node labels (index: global fragment id, 0 = background) merging the fragments of the
    blocks of ``grid_shape`` (C order; block ``i`` has ``counts[i]`` fragments, its files
    ``blocks_dir/<i>.npz`` from :func:`.blockwise.cluster_block`). Ids: block ``i``'s fragment
    ``k`` is ``offsets[i] + k`` with ``offsets = cumsum([0] + counts[:-1])``."""
    import bioimage_cpp as bic
    from elf.segmentation.multicut import compute_edge_costs, multicut_decomposition

    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    n = int(np.sum(counts)) + 1
    edges: dict[tuple[int, int], float] = {}
    ndim = len(grid_shape)
    for i in range(int(np.prod(grid_shape))):
        idx = np.unravel_index(i, grid_shape)
        for ax in range(ndim):
            if idx[ax] == 0:
                continue
            lower = list(idx)
            lower[ax] -= 1
            j = int(np.ravel_multi_index(lower, grid_shape))
            with np.load(Path(blocks_dir, f"{i}.npz")) as fi, np.load(Path(blocks_dir, f"{j}.npz")) as fj:
                a, b = fi[f"lower{ax}"], fj[f"upper{ax}"]
            if a.shape != b.shape:  # cannot happen for files of one run
                raise RuntimeError(f"blocks {i} and {j}: face bands differ in shape {a.shape} vs {b.shape}")
            for (x, y, ox, oy, nx, ny) in ((a, b, offsets[i], offsets[j], counts[i], counts[j]),
                                           (b, a, offsets[j], offsets[i], counts[j], counts[i])):
                ua, ub, frac = _overlaps(x, y, nx, ny)
                gu, gv = ua + ox, ub + oy
                for u, v, f in zip(gu, gv, frac):
                    key = (int(min(u, v)), int(max(u, v)))
                    edges[key] = min(edges.get(key, 1.0), 1.0 - float(f))  # the larger overlap decides
                for u, v in _repulsive(gu, gv) + _repulsive(gv, gu):
                    edges.setdefault((min(u, v), max(u, v)), NO_OVERLAP)
    if not edges:
        return np.arange(n, dtype=np.uint64)
    uv = np.array(list(edges), dtype="uint64")
    costs = compute_edge_costs(np.array(list(edges.values()), np.float32), beta=BETA)
    graph = bic.graph.UndirectedGraph.from_edges(n, uv)
    labels = np.asarray(multicut_decomposition(graph, costs), np.int64)
    # background stays 0; every other node takes an id > 0 (multicut labels count from 0)
    labels = labels + 1
    labels[0] = 0
    return labels.astype(np.uint64)
