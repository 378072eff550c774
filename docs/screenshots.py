"""Retake the screenshots in docs/images: the real viewer, the plugin docked, on the built-in sample.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshots.py [--iterations 400]

Trains the default method for ``--iterations`` steps in the Train tab (as a user presses Train),
asks "Where to label next?" and segments, taking one screenshot per tab. Run it on an idle machine:
training shares the CPU with the viewer.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=400)
    args = p.parse_args()
    viewer = napari.Viewer()
    viewer.window._qt_window.resize(1400, 900)
    viewer.open_sample("napari-sparseseg", "cells_2d")
    _, w = viewer.window.add_plugin_dock_widget("napari-sparseseg", "SparseSeg")
    w.train.preset.value = "Fixed iterations"
    w.train.iterations.value = args.iterations
    w.tabs.setCurrentIndex(1)
    w.train.start()
    wait_until(lambda: w.train.worker is None)
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
    w.tabs.setCurrentIndex(2)
    w.segment.run()
    wait_until(lambda: w.segment.worker is None and any(ly.name.endswith("segmentation") for ly in viewer.layers))
    shot(viewer, "3-segment.png")
    w.cleanup_model_folder()
    viewer.close()


if __name__ == "__main__":
    main()
