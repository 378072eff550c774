"""Retake the screenshots in docs/images: the real viewer, the plugin docked, on the built-in sample.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshots.py [--iterations 400] [--only 2d|ovule]

Trains the default method for ``--iterations`` steps in the Train tab (as a user presses Train),
asks "Where to label next?" and segments, taking one screenshot per tab; then the same training
and segmentation on the real ovule stack (File > Open Sample; downloaded on first use, or from
``$SPARSESEG_CACHE``). Run it on an idle machine: training shares the CPU with the viewer.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

OUT = Path(__file__).resolve().parent / "images"


def wait_until(condition, timeout: float = 1800.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the viewer did not finish in time")
        QApplication.processEvents()
        time.sleep(0.05)


def settle(seconds: float = 1.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.05)


def shot(viewer, name: str) -> None:
    settle()
    viewer.screenshot(str(OUT / name), canvas_only=False, flash=False)
    print("wrote", OUT / name, flush=True)


def open_and_train(sample: str, iterations: int):
    viewer = napari.Viewer()
    viewer.window._qt_window.resize(1400, 900)
    viewer.open_sample("napari-sparseseg", sample)
    _, w = viewer.window.add_plugin_dock_widget("napari-sparseseg", "SparseSeg")
    w.train.preset.value = "Fixed iterations"
    w.train.iterations.value = iterations
    w.tabs.setCurrentIndex(1)
    w.train.start()
    wait_until(lambda: w.train.worker is None)
    return viewer, w


def segment(viewer, w) -> None:
    w.tabs.setCurrentIndex(2)
    w.segment.run()
    wait_until(lambda: w.segment.worker is None and any(ly.name.endswith("segmentation") for ly in viewer.layers))


def ovule(iterations: int) -> None:
    """The real 3D sample: trained and segmented, seen at its middle slice."""
    viewer, w = open_and_train("ovule", iterations)
    if "sparseseg preview" in viewer.layers:
        viewer.layers["sparseseg preview"].visible = False
    segment(viewer, w)
    viewer.layers["ovule cells segmentation"].opacity = 0.45
    viewer.dims.set_current_step(0, viewer.dims.nsteps[0] // 2)
    shot(viewer, "4-ovule-3d.png")
    w.cleanup_model_folder()
    viewer.close()


def cells_2d(iterations: int) -> None:
    viewer, w = open_and_train("cells_2d", iterations)
    shot(viewer, "2-train.png")

    w.tabs.setCurrentIndex(0)
    w.suggest.run()
    wait_until(lambda: w.suggest.worker is None)
    viewer.layers.selection.active = viewer.layers[f"{w.annotate.image.value.name} label next"]
    shot(viewer, "1-annotate.png")

    for name in (f"{w.annotate.image.value.name} uncertainty", f"{w.annotate.image.value.name} label next",
                 "sparseseg preview"):
        if name in viewer.layers:
            viewer.layers[name].visible = False
    segment(viewer, w)
    shot(viewer, "3-segment.png")
    w.cleanup_model_folder()
    viewer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--only", choices=["2d", "ovule"])
    args = p.parse_args()
    if args.only != "ovule":
        cells_2d(args.iterations)
    if args.only != "2d":
        ovule(args.iterations)


if __name__ == "__main__":
    main()
