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
