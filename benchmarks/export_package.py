"""bioimage.io export of default-sized models: package size, time, bioimageio.core's test, round trip.

    python benchmarks/export_package.py [--out /tmp/sparseseg-export-bench] [--skip-test]

For each method and dimensionality, trains a model of the default size for one step on the
synthetic sample (the weights' values do not change the size), exports it, runs bioimageio.core's
test of the package, and compares, on a synthetic image of another size, the embeddings of the
package loaded back with ``checkpoint.load`` against the model folder's (f, and SPOCO's EMA g), the
TorchScript weights against the state-dict network, and the labels ``segment`` gives. Prints a table.
"""

from __future__ import annotations

import argparse
import io
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from napari_sparseseg.core import checkpoint
from napari_sparseseg.core.export import check_package, export_bioimageio
from napari_sparseseg.core.package import TORCHSCRIPT
from napari_sparseseg.core.prediction import predict
from napari_sparseseg.core.samples import synthetic_cells
from napari_sparseseg.core.segment import segment
from napari_sparseseg.core.training import TrainConfig, Trainer

SHAPES = {2: ((256, 256), (200, 312)), 3: ((32, 96, 96), (24, 80, 104))}


def run(method: str, ndim: int, root: Path, test: bool) -> dict:
    train_shape, test_shape = SHAPES[ndim]
    img, lab = synthetic_cells(train_shape, seed=0)
    folder = root / f"{method}{ndim}d"
    trainer = Trainer([img], [lab], TrainConfig(iterations=1, method=method, device="cpu"), out=folder)
    for _ in trainer.run():
        pass
    t0 = time.perf_counter()
    pkg = export_bioimageio(folder, root / f"{method}{ndim}d.zip", authors=["benchmark"])
    seconds = time.perf_counter() - t0
    native, loaded = checkpoint.load(folder), checkpoint.load(pkg)
    image = synthetic_cells(test_shape, seed=3)[0]
    diffs = [float(np.abs(predict(native, image, device="cpu", use_ema=g) - predict(loaded, image, device="cpu", use_ema=g)).max())
             for g in ((False, True) if native.ema is not None else (False,))]
    with zipfile.ZipFile(pkg) as zf:
        scripted = torch.jit.load(io.BytesIO(zf.read(TORCHSCRIPT)))
    x = torch.rand((1, native.in_channels) + tuple(2 * d for d in native.net.divisor))
    with torch.no_grad():
        ts_diff = float((scripted(x) - loaded.net(x)).abs().max())
    same_labels = bool(np.array_equal(segment(native, image, device="cpu"), segment(loaded, image, device="cpu")))
    status, t_test = "not run", 0.0
    if test:
        t0 = time.perf_counter()
        status, failures = check_package(pkg)
        t_test = time.perf_counter() - t0
        status += "" if not failures else f" ({'; '.join(failures)[:60]})"
    return dict(model=f"{method.upper()} {ndim}D", params=sum(p.numel() for p in native.net.parameters()),
                mb=pkg.stat().st_size / 1e6, export_s=seconds, diff=max(diffs), ts_diff=ts_diff,
                labels="equal" if same_labels else "DIFFER", test=status, test_s=t_test)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("/tmp/sparseseg-export-bench"))
    p.add_argument("--skip-test", action="store_true", help="do not run bioimageio.core's test")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows = [run(m, d, args.out, not args.skip_test) for d in (2, 3) for m in ("crac", "spoco")]
    head = f"{'model':10}{'parameters':>12}{'package MB':>12}{'export s':>10}{'round trip':>12}{'TorchScript':>13}{'labels':>8}  bioimageio.core test"
    print(head)
    for r in rows:
        print(f"{r['model']:10}{r['params']:>12,}{r['mb']:>12.2f}{r['export_s']:>10.1f}{r['diff']:>12.1e}"
              f"{r['ts_diff']:>13.1e}{r['labels']:>8}  {r['test']} ({r['test_s']:.0f} s)")


if __name__ == "__main__":
    main()
