"""The blockwise prediction store's layout: one zarr chunk per block, against one shard per block
made of inner chunks (``blocks.inner_chunks``, what ``segment_blockwise`` writes).

    python benchmarks/store_layout.py --stack STACK.zarr --model MODEL [--repeats 5]

Segments a crop of 3 x 3 x 3 blocks of the stack keeping its prediction store, copies the store into
each layout and times, per layout: writing the 27 blocks (what prediction does) and reading the
central block with the halo its clustering reads (the model's longest offsets), as mean (sd) over
``--repeats``; and the bytes on disk. A clustering of an interior block reads parts of 27 blocks:
with one chunk per block it decompresses all 27 whole.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    import zarr

    from napari_sparseseg.core import blocks as B
    from napari_sparseseg.core.blockwise import BLOCK, segment_blockwise
    from napari_sparseseg.core.checkpoint import read_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stack", type=Path, required=True, help="a 3D zarr stack (e.g. benchmarks/large.py's)")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    block = BLOCK[3]
    tmp = Path(tempfile.mkdtemp(prefix="sparseseg-store-"))
    try:
        crop = zarr.create_array(str(tmp / "crop.zarr"), shape=tuple(3 * b for b in block), chunks=(32, 128, 128),
                                 dtype=zarr.open_array(str(args.stack)).dtype)
        crop[:] = zarr.open_array(str(args.stack))[tuple(slice(0, 3 * b) for b in block)]
        res = segment_blockwise(args.model, tmp / "crop.zarr", tmp / "seg.zarr", workers=0, keep_work=True,
                                work=tmp / "work", block_shape=block)
        data = zarr.open_array(str(tmp / "work" / "prediction.zarr"))[:]
        if res.zoom != 1.0 or data.shape[1:] != crop.shape:
            raise SystemExit(f"the model zooms this stack ({res.zoom:g}): give a stack at the model's scale")
        halo = B.cluster_halo(read_config(args.model), 3)
        inner = B.block_region(13, data.shape[1:], block)
        region = (slice(None),) + B.grow(inner, halo, data.shape[1:])
        n = data.shape[0]
        print(f"store {data.shape} float16, block {block}, clustering halo {halo}, {args.repeats} repeats")
        print("| layout | write 27 blocks (s) | read the central block + halo (s) | MiB on disk |")
        print("|---|---|---|---|")
        for name, kw in (("one chunk per block", dict(chunks=(n, *block))),
                         (f"shard per block, inner chunks {B.inner_chunks(block)}",
                          dict(chunks=(n, *B.inner_chunks(block)), shards=(n, *block)))):
            writes, reads = [], []
            for _ in range(args.repeats):
                shutil.rmtree(tmp / "layout.zarr", ignore_errors=True)
                arr = zarr.create_array(str(tmp / "layout.zarr"), shape=data.shape, dtype="float16", fill_value=0, **kw)
                t = time.perf_counter()
                for i in range(27):
                    r = (slice(None),) + B.block_region(i, data.shape[1:], block)
                    arr[r] = data[r]
                writes.append(time.perf_counter() - t)
                os.sync()  # the disk's write-back not timed as reading
                t = time.perf_counter()  # as a clustering does: open the store, read one region
                np.asarray(zarr.open_array(str(tmp / "layout.zarr"), mode="r")[region], np.float32)
                reads.append(time.perf_counter() - t)
            print(f"| {name} | {np.mean(writes):.2f} ({np.std(writes):.2f}) | {np.mean(reads):.3f} ({np.std(reads):.3f}) "
                  f"| {disk(tmp / 'layout.zarr') / 2**20:.0f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
