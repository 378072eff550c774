"""Real 3D microscopy samples, downloaded on first use from their authors' repositories.

Nothing here ships with the package: the files are fetched once with pooch from a pinned commit
of the repository that publishes them, cached (``$SPARSESEG_CACHE``, else the user cache folder
``napari-sparseseg``) and checked against the SHA-256 of their contents. The contents are hashed
rather than the files, so a re-encoded copy of the same arrays is accepted; label ids are hashed as
a partition (renumbering the objects does not change it). A few of the dense ground-truth objects
are painted (:func:`..sparsify.sparsify`), the rest of the stack is left unlabeled, as a user
would start.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SparseSegError
from .sparsify import sparsify


@dataclass(frozen=True)
class Remote:
    """One array in an HDF5 file at ``url``: its dataset ``key`` and :func:`content_hash`."""

    url: str
    key: str
    sha256: str
    labels: bool = False


@dataclass(frozen=True)
class RealSample:
    title: str
    image: Remote
    labels: Remote
    voxel_size: tuple[float, float, float] | None
    #: share of the ground-truth objects painted, and the seed that picks them
    fraction: float
    seed: int
    attribution: str


_PLANTSEG = ("https://raw.githubusercontent.com/kreshuklab/plant-seg/"
             "9d748063cc9de8d8025aaf691a11483b94a5894c/tests/resources/")
_GALA = ("https://raw.githubusercontent.com/jni/gala/"
         "975ed783a6cb3c0afe24a921afdacf2f27184fcf/tests/example-data/")

#: the samples File > Open Sample offers, by key
REAL_SAMPLES = {
    "ovule": RealSample(
        title="Arabidopsis ovule, confocal, cell-boundary stain (32 x 128 x 128)",
        image=Remote(_PLANTSEG + "sample_ovule.h5", "raw",
                     "e9de4fb3f5d0ab661154bc4f85fc51b7161212e8344777740352e7080437b123"),
        labels=Remote(_PLANTSEG + "sample_ovule.h5", "label",
                      "c3f2f482cd25f912e662f6b8b471530861b626b1ec0707e3cfebb7146ba6df20", labels=True),
        voxel_size=(0.235, 0.15, 0.15), fraction=0.1, seed=0,
        attribution=("PlantSeg test data (Wolny et al., eLife 2020; github.com/kreshuklab/plant-seg, "
                     "MIT licence)")),
    "fibsem": RealSample(
        title="Drosophila neuropil, FIB-SEM (50 x 100 x 200)",
        image=Remote(_GALA + "train-image.h5", "stack",
                     "06a4c19c597739a31678389b6f7c6926dbce5e90c9179fe3d23c3b7d9cb5f931"),
        labels=Remote(_GALA + "train-gt.lzf.h5", "stack",
                      "fd2707d401373f99d55d0da97900fc2ce3f3b3bc04c987aa5cff4ac67ac84b20", labels=True),
        voxel_size=None, fraction=0.1, seed=0,
        attribution=("gala test data, Janelia FlyEM (Nunez-Iglesias et al., PLoS ONE 2013; "
                     "github.com/jni/gala, BSD licence, Copyright 2012 HHMI)")),
}


def renumber(labels: np.ndarray, keep_zero: bool = True) -> np.ndarray:
    """Label ids renumbered 1, 2, ... in the order the objects first appear (C order), 0 kept as 0
    (``keep_zero``; else 0 is numbered like any other id, from 0): the same objects under any ids
    give the same array."""
    flat = np.asarray(labels).ravel()
    ids, first = np.unique(flat, return_index=True)
    rank = np.empty(len(ids), np.int64)
    if keep_zero and ids.size and ids[0] == 0:
        rank[0] = 0
        rank[1 + np.argsort(first[1:])] = np.arange(1, len(ids))
    else:
        rank[np.argsort(first)] = np.arange(len(ids))
    return rank[np.searchsorted(ids, flat)].reshape(np.shape(labels))


def content_hash(arr: np.ndarray, labels: bool = False) -> str:
    """SHA-256 of an integer array's shape and values (as little-endian int64, C order). For
    ``labels`` the ids are first renumbered in the order they first appear (:func:`renumber`), so
    the same objects under other ids hash the same."""
    a = np.asarray(arr)
    if not np.issubdtype(a.dtype, np.integer):
        raise SparseSegError(f"expected an integer array, got {a.dtype}")
    if labels:
        a = renumber(a, keep_zero=False)
    a = np.ascontiguousarray(a, dtype="<i8")
    h = hashlib.sha256(repr(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def cache_dir() -> Path:
    """Where downloaded samples are kept: ``$SPARSESEG_CACHE``, else the user cache folder."""
    env = os.environ.get("SPARSESEG_CACHE")
    if env:
        return Path(env)
    import pooch

    return Path(pooch.os_cache("napari-sparseseg"))


def _local_name(url: str) -> str:
    # the repository and commit in the name, so two sources of one file name never collide
    parts = url.split("/")
    return f"{parts[4]}-{parts[5][:8]}-{parts[-1]}"


def fetch(url: str, folder: Path | None = None) -> Path:
    """The file at ``url``, downloaded once into ``folder`` (default :func:`cache_dir`)."""
    folder = Path(folder) if folder is not None else cache_dir()
    path = folder / _local_name(url)
    if path.exists():
        return path
    import pooch

    try:
        return Path(pooch.retrieve(url, known_hash=None, fname=path.name, path=folder, progressbar=False))
    except Exception as err:  # noqa: BLE001 - any failure to download reads the same to a user
        raise SparseSegError(
            f"could not download {url} ({type(err).__name__}: {err}); try again, or download that file "
            f"where there is a network, copy it to {path} and open the sample again") from err


def read_remote(remote: Remote, folder: Path | None = None) -> np.ndarray:
    """The array ``remote`` names, checked against its content hash."""
    import h5py

    path = fetch(remote.url, folder)
    try:
        with h5py.File(path, "r") as f:
            if remote.key not in f:
                raise SparseSegError(f"{path}: no dataset {remote.key!r} (it has {', '.join(sorted(f))}); "
                                     "delete the file to download it again")
            arr = f[remote.key][...]
    except OSError as err:
        raise SparseSegError(f"{path}: not a readable HDF5 file ({err}); delete it to download it "
                             "again") from err
    got = content_hash(arr, remote.labels)
    if got != remote.sha256:
        raise SparseSegError(
            f"{path}: dataset {remote.key!r} is not the published one (content SHA-256 {got[:16]}..., "
            f"expected {remote.sha256[:16]}...); delete the file to download it again")
    return arr


def load_real_sample(key: str, folder: Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, RealSample]:
    """The sample ``key`` of :data:`REAL_SAMPLES`: its image; its sparse labels (int32, a few
    complete ground-truth objects painted, the rest 0); its dense ground truth (ids renumbered
    1, 2, ... in the order the objects appear, 0 where the authors left voxels unlabeled); and its
    description."""
    if key not in REAL_SAMPLES:
        raise SparseSegError(f"real sample {key!r}: expected one of {', '.join(REAL_SAMPLES)}")
    sample = REAL_SAMPLES[key]
    image = read_remote(sample.image, folder)
    gt = renumber(read_remote(sample.labels, folder)).astype(np.int32)
    return image, sparsify(gt, sample.fraction, np.random.default_rng(sample.seed)), gt, sample
