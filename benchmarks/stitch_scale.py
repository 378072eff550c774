"""The steps of blockwise segmentation that grow with the stack (stitch and write), at full size.

    python benchmarks/stitch_scale.py [--size-gib 0.02] [--workers 2] [--seed 0] [--model MODEL] [--tmp DIR]

``benchmarks/large.py`` measures the whole run; on two CPU cores its 4 GiB stack takes longer than
a working session, and most of that is the prediction and clustering of its 5632 blocks, whose
memory is per block. What grows with the stack is the client's record of every block's fragments
and the stitching graph over every block face, then the write of the whole label image. This
script measures those at any size in minutes: it writes the synthetic stack of ``large.py`` and,
instead of predicting and clustering each block, records the block's **true** objects (the stack's
own labels, block + halo, as :func:`.blocks.cluster_block` would record a clustering) with the
same markers a finished block leaves, so that ``sparseseg segment`` (run in a subprocess, its
process tree's memory sampled as in ``large.py``) resumes at the stitch. The truth has many more
fragments than a barely trained model finds (a harder test of the stitch), and the result must be
the truth again: the script checks that on sampled blocks of the output (every output object one
true object and the other way round).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from large import GEN_BLOCK, make_stack, run, stack_plan, stack_pool, tiny_model  # noqa: E402

#: the output regions :func:`check` compares with the truth
REGION = (48, 128, 128)
#: ids of one generated block's objects are offset by its index times this (a pool block has fewer)
ID_STRIDE = 1024


class Truth:
    """The true labels of any region of the stack :func:`large.make_stack` writes, from its plan."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0):
        self.plan = stack_plan(shape, seed)
        self.pool = [gt.astype(np.int64) for _, gt in stack_pool(seed)]
        if max(int(gt.max()) for gt in self.pool) >= ID_STRIDE:
            raise SystemExit(f"a synthetic block has {ID_STRIDE} objects or more; raise ID_STRIDE")
        self.grid = tuple(-(-s // g) for s, g in zip(shape, GEN_BLOCK))

    def __call__(self, region: tuple[slice, ...]) -> np.ndarray:
        out = np.zeros([r.stop - r.start for r in region], np.int64)
        ranges = [range(r.start // g, -(-r.stop // g)) for r, g in zip(region, GEN_BLOCK)]
        for idx in ((a, b, c) for a in ranges[0] for b in ranges[1] for c in ranges[2]):
            k = int(np.ravel_multi_index(idx, self.grid))
            gen, which, flips = self.plan[k]
            both = tuple(slice(max(r.start, g.start), min(r.stop, g.stop)) for r, g in zip(region, gen))
            src = self.pool[which][flips][tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(both, gen))]
            out[tuple(slice(b.start - r.start, b.stop - r.start) for b, r in zip(both, region))] = np.where(
                src > 0, src + k * ID_STRIDE, 0)
        return out


_state: dict = {}


def _init(job, truth: Truth):
    _state.update(job=job, truth=truth)


def _fill(i: int) -> int:
    """Record block ``i`` as predicted and clustered, its fragments the true objects."""
    from napari_sparseseg.core import blocks as B

    job, truth = _state["job"], _state["truth"]
    if B.done(job, "cluster", i) is not None:
        return i
    inner = B.block_region(i, job.scaled, job.block)
    outer = B.grow(inner, job.cluster_halo, job.scaled)
    B.store_fragments(job, i, truth(outer).astype(np.uint32), inner, outer)
    B.mark(job, "predict", i, {"voxels": int(np.prod([r.stop - r.start for r in inner])), "foreground": 0})
    return i


def check(out: Path, truth: Truth, n: int, seed: int = 1) -> tuple[int, int]:
    """(exact, n): of ``n`` random :data:`REGION` regions of the output, how many hold exactly the
    true objects (one output id per true id and the other way round, background the same)."""
    import zarr

    arr = zarr.open_array(str(out), mode="r")
    rng = np.random.default_rng(seed)
    exact = 0
    for _ in range(n):
        corner = [int(rng.integers(0, max(1, s - b + 1))) for s, b in zip(arr.shape, REGION)]
        region = tuple(slice(c, min(c + b, s)) for c, b, s in zip(corner, REGION, arr.shape))
        a, t = np.asarray(arr[region], np.int64).ravel(), truth(region).ravel()
        if np.array_equal(a > 0, t > 0):
            pairs = np.unique(np.stack([a[a > 0], t[t > 0]]), axis=1).shape[1]
            exact += pairs == np.unique(a[a > 0]).size == np.unique(t[t > 0]).size
    return exact, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=0.02, help="stack size in GiB (uint8 voxels)")
    p.add_argument("--workers", type=int, default=2, help="of sparseseg segment")
    p.add_argument("--fill-processes", type=int, default=2, help="processes recording the true fragments")
    p.add_argument("--model", type=Path, default=None, help="default: large.py's small model (base 4, depth 2)")
    p.add_argument("--seed", type=int, default=0, help="of the synthetic stack (and its truth)")
    p.add_argument("--check", type=int, default=24, help="output regions compared with the truth")
    p.add_argument("--tmp", type=Path, default=None, help="folder for the stack and outputs (default: a temp dir)")
    args = p.parse_args()

    from napari_sparseseg.core import blocks as B
    from napari_sparseseg.core.blockwise import BLOCK
    from napari_sparseseg.core.checkpoint import read_config

    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="sparseseg-stitch-"))
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stack = tmp / f"stack-{args.size_gib:g}.zarr"
    shape = make_stack(stack, args.size_gib, seed=args.seed)
    n = int(np.prod(shape))
    print(f"stack {shape} = {n / 1e6:.1f} M voxels, written in {time.perf_counter() - t0:.1f} s", flush=True)
    model = args.model or tmp / "model"
    if not (model / "config.json").exists():
        tiny_model(model, 4, 2)
    config = read_config(str(model))
    out = tmp / f"stitch-{args.size_gib:g}-{args.workers}.zarr"
    work = tmp / f".{out.name}.sparseseg-work"
    # the stack is segmented at the model's scale (zoom 1: the cells are as large as those it was
    # trained on); sparseseg segment refuses fragments of another shape than the grid it works on
    job = B.Job(volume=B.open_volume(stack, 3, 1), work=str(work), predictor=None, bounds=[], zoom=1.0,
                block=BLOCK[3], config=config, cluster_halo=B.cluster_halo(config, 3))
    if not (work / "fragments.zarr").exists():
        import zarr

        work.mkdir(parents=True, exist_ok=True)
        zarr.create_array(str(work / "fragments.zarr"), shape=shape, chunks=BLOCK[3], dtype="uint32", fill_value=0)
    truth = Truth(shape, args.seed)  # the synthetic blocks are slow to make: once, for the fill and the check
    t, ids = time.perf_counter(), list(range(job.n_blocks()))
    with Pool(args.fill_processes, initializer=_init, initargs=(job, truth)) as pool:
        for k, _ in enumerate(pool.imap_unordered(_fill, ids, chunksize=8), 1):
            if k % 500 == 0 or k == len(ids):
                print(f"true fragments of {k} / {len(ids)} blocks recorded", flush=True)
    counts = [B.done(job, "cluster", i)["fragments"] for i in ids]
    print(f"{sum(counts)} fragments recorded in {time.perf_counter() - t:.1f} s", flush=True)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "napari_sparseseg.cli", "segment", "--model", str(model), "--device", "cpu", "--quiet",
           "--images", str(stack), "--out", str(out), "--workers", str(args.workers), "--clustering", "multicut",
           "--min-size", "0"]
    record = tmp / f"peaks-stitch-{args.size_gib:g}-{args.workers}.json"
    record.unlink(missing_ok=True)  # a short run: no earlier part to add up
    secs, peak, log = run(cmd, env, record, work)
    exact, tried = check(out, truth, args.check)
    print("\n| stack | blocks | fragments | seconds (stitch + write) | peak RSS (GiB) | peak PSS (GiB) "
          "| largest process (GiB) | regions equal to the truth |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {n / 1e6:.0f} M voxels {shape} | {len(ids)} | {sum(counts)} | {secs:.1f} | {peak['rss'] / 2**30:.2f} "
          f"| {peak['pss'] / 2**30:.2f} | {peak['largest'] / 2**30:.2f} | {exact} / {tried} |")
    print(log.strip().splitlines()[-1])
    (tmp / f"stitch-{args.size_gib:g}-{args.workers}.json").write_text(json.dumps(
        {"shape": shape, "seed": args.seed, "blocks": len(ids), "fragments": sum(counts), "seconds": secs, **peak,
         "exact": exact, "checked": tried, "log": log}))


if __name__ == "__main__":
    main()
