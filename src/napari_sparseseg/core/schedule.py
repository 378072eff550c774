"""Where and in what order the block tasks of :mod:`.blockwise` run.

Execution: a dask.distributed cluster (a LocalCluster of single-threaded processes, or a running
scheduler given by its address) or this process. Tasks exchange only paths (:mod:`.blocks`).

Order: predicting the whole stack before clustering any of it would keep the prediction of every
block on disk at once (about 43 bytes per model-scale voxel, docs/large-data.md). Instead the
blocks go in *slabs* (blocks that share their index along the axis with the most blocks, or one of
a few consecutive indices: enough blocks for every worker of the cluster), in
waves: a wave predicts the next slab while it clusters a slab whose clustering halo is already
predicted, and after the wave the prediction of every slab that no clustering needs any more is
deleted. The store then holds a few slabs (four where the halo reaches into the neighbouring
slabs only) whatever the size of the stack. The labels are those of predicting everything first:
each block reads the same stored prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .blocks import ProgressFn
from .errors import SparseSegError

#: how long to try to reach a dask scheduler given by its address
CONNECT_TIMEOUT = "30s"

#: a slab holds at least this many blocks per worker thread: each wave then keeps every worker busy
#: (a wave ends when its slowest block does; more blocks per wave, less waiting at its end)
TASKS_PER_THREAD = 4


# -- the order ------------------------------------------------------------------------------------
@dataclass
class Wave:
    """Block ids to predict and to cluster (both may run at once), then whose prediction to delete."""

    predict: list[int]
    cluster: list[int]
    free: list[int]


@dataclass
class Plan:
    """The waves of a blockwise run and the most blocks whose prediction is stored at once."""

    waves: list[Wave]
    peak_blocks: int
    axis: int | None  # the slab axis; None: everything predicted first, nothing deleted
    thickness: int = 1  # blocks along the axis per slab

    @property
    def rolling(self) -> bool:
        return self.axis is not None


def slab_plan(grid: tuple[int, ...], block: tuple[int, ...], halo: tuple[int, ...], keep: bool = False,
              min_blocks: int = 1) -> Plan:
    """The waves for a grid of ``grid`` blocks of ``block`` voxels whose clustering reads ``halo``
    voxels around each block, with slabs of at least ``min_blocks`` blocks (enough tasks for every
    worker in each wave: :data:`TASKS_PER_THREAD`). ``keep`` (or a grid too small for slabs to save
    anything): one wave that predicts every block, one that clusters every block, nothing deleted."""
    n = int(np.prod(grid))
    ids = np.arange(n).reshape(grid)
    axis = int(np.argmax(grid))  # the first of the axes with the most blocks
    thickness = max(1, -(-int(min_blocks) // (n // int(grid[axis]))))
    n_slabs = -(-int(grid[axis]) // thickness)
    reach = -(-int(halo[axis]) // (thickness * int(block[axis])))  # slabs on each side a clustering reads
    window = 2 * reach + 2  # slabs stored at once: those one clustering reads, and the one predicted
    if keep or n_slabs <= window:
        everything = ids.ravel().tolist()
        return Plan([Wave(everything, [], []), Wave([], everything, [])], n, None)
    slab = [np.take(ids, range(s * thickness, min((s + 1) * thickness, grid[axis])), axis=axis).ravel().tolist()
            for s in range(n_slabs)]
    waves, stored, peak = [], 0, 0
    clustered = freed = 0  # slabs clustered (deleted) so far: always a prefix
    for w in range(n_slabs + reach + 1):
        predict = slab[w] if w < n_slabs else []
        todo = []  # clustering slab c reads slabs up to c + reach: predicted in earlier waves
        while clustered < n_slabs and min(clustered + reach, n_slabs - 1) <= w - 1:
            todo += slab[clustered]
            clustered += 1
        stored += len(predict)
        peak = max(peak, stored)
        free = []  # slab s is read by the clusterings of slabs s - reach .. s + reach
        while freed < n_slabs and (freed + reach < clustered or clustered == n_slabs):
            free += slab[freed]
            freed += 1
        stored -= len(free)
        waves.append(Wave(predict, todo, free))
        if clustered == n_slabs:
            break
    return Plan(waves, peak, axis, thickness)


# -- the execution --------------------------------------------------------------------------------
def client(workers: int, scheduler: str | None):
    """A dask.distributed client: on ``scheduler`` (an address) if given, else on a LocalCluster
    of ``workers`` single-threaded processes; None for ``workers == 0`` (run in this process)."""
    if scheduler:
        from distributed import Client

        try:
            return Client(scheduler, timeout=CONNECT_TIMEOUT)
        except OSError as err:
            raise SparseSegError(f"scheduler {scheduler!r}: could not connect ({err})") from err
    if workers == 0:
        return None
    from distributed import Client, LocalCluster

    # no dashboard; the scheduler's health endpoint on a free local port, not dask's 8787 (which
    # another run, or the user's own dask, may hold: a warning otherwise)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
    return Client(cluster)


def threads(client_) -> int:
    """Worker threads of the cluster (0 in this process: blocks run one after another, no wave waits)."""
    return 0 if client_ is None else max(1, sum(client_.nthreads().values()))


def close(client_, scheduler: str | None) -> None:
    """Close the client, and the LocalCluster if we started it (never a scheduler we were given)."""
    cluster = None if scheduler else client_.cluster
    client_.close()
    if cluster is not None:
        cluster.close()


class Progress:
    """Counts the blocks finished per step across waves; reports ``progress(step, done, total)``."""

    def __init__(self, progress: ProgressFn | None, totals: dict[str, int]):
        self.progress, self.totals = progress, totals
        self.done: dict[str, set] = {step: set() for step in totals}
        for step in totals:
            self._report(step)

    def _report(self, step: str) -> None:
        if self.progress is not None:
            self.progress(step, len(self.done[step]), self.totals[step])

    def one(self, step: str, i: int) -> None:
        """Block ``i`` finished ``step`` (a block met again, e.g. predicted early, counts once)."""
        if i not in self.done[step]:
            self.done[step].add(i)
            self._report(step)


def execute(groups: list[tuple[str, Callable, list[int]]], client_, progress: Progress | None = None) -> dict:
    """``fn(i)`` for every block id of every (step, fn, ids) group, all at once on the cluster's
    workers (or here, in order, without ``client_``); returns {step: results in the order of ids}.
    The first failing block stops the run (finished blocks stay recorded)."""
    results: dict[tuple[str, int], Any] = {}
    if client_ is None:
        for step, fn, ids in groups:
            for i in ids:
                results[step, i] = fn(i)
                if progress is not None:
                    progress.one(step, i)
    else:
        from distributed import as_completed

        key, futures = {}, []
        for step, fn, ids in groups:
            mapped = client_.map(fn, ids, pure=False) if ids else []
            key.update({f.key: (step, i) for f, i in zip(mapped, ids)})
            futures += mapped
        try:
            for fut in as_completed(futures):
                results[key[fut.key]] = fut.result()
                if progress is not None:
                    progress.one(*key[fut.key])
        finally:
            client_.cancel([f for f in futures if not f.done()])
    return {step: [results[step, i] for i in ids] for step, _, ids in groups}
