"""Pixel-pair offsets shared by training (affinity targets) and clustering (mutex watershed)."""

from __future__ import annotations


def default_offsets(ndim: int) -> list[list[int]]:
    """Nearest neighbours first, then distances 3, 9 and 27 along every axis (8 in 2D, 12 in 3D)."""
    offsets = []
    for dist in (1, 3, 9, 27):
        for ax in range(ndim):
            o = [0] * ndim
            o[ax] = -dist
            offsets.append(o)
    return offsets


def crac_offsets(ndim: int) -> list[list[int]]:
    """CRAC's offsets (SPEC §4), nearest neighbours first: in 2D [-s, 0], [0, -s] for s in 1, 3, 5,
    9, 27; in 3D (z, y, x) z steps 1-4 beside y/x steps 1, 3, 9, 27 (anisotropic EM)."""
    if ndim == 2:
        return [o for s in (1, 3, 5, 9, 27) for o in ([-s, 0], [0, -s])]
    return [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-2, 0, 0], [0, -3, 0], [0, 0, -3],
            [-3, 0, 0], [0, -9, 0], [0, 0, -9], [-4, 0, 0], [0, -27, 0], [0, 0, -27]]
