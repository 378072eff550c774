"""GUI responsiveness while training in the dock widget, on the 2D sample data.

    xvfb-run -a python benchmarks/gui_responsiveness.py [--seconds 30] [--screenshots docs/images]

A 5 ms QTimer runs on the Qt event loop during training; the largest gap between two ticks (minus
5 ms) is the worst stall a user would feel. Also prints the time from clicking Train to the first
preview layer and to the first loss point. With --screenshots, saves screenshots of the real
viewer with the plugin docked at each step (used in docs/user-guide.md).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--screenshots", type=Path, default=None)
    args = p.parse_args()
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    import napari_sparseseg._napari.widget as W

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    viewer.open_sample("napari-sparseseg", "cells_2d")
    _, w = viewer.window.add_plugin_dock_widget("napari-sparseseg", "SparseSeg")
    app = QApplication.instance()

    def shot(name, tab):
        if args.screenshots is not None:
            w.tabs.setCurrentIndex(tab)
            for _ in range(20):
                app.processEvents()
                time.sleep(0.02)
            args.screenshots.mkdir(parents=True, exist_ok=True)
            viewer.screenshot(str(args.screenshots / name), canvas_only=False, flash=False)

    shot("1-annotate.png", 0)
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    w.train.preset.value = "Fixed iterations"
    w.train.iterations.value = 10**7
    w.train.preview_every.value = 10.0
    timer.start()
    t0 = time.perf_counter()
    w.train.start()
    first_loss = first_preview = None
    while time.perf_counter() - t0 < args.seconds:
        app.processEvents()
        now = time.perf_counter()
        if first_loss is None and w.train.plot.values:
            first_loss = now - t0
        if first_preview is None and W.PREVIEW_LAYER in viewer.layers:
            first_preview = now - t0
        time.sleep(0.001)
    shot("2-train.png", 1)
    w.train.stop()
    while w.train.worker is not None:
        app.processEvents()
        time.sleep(0.01)
    timer.stop()
    gaps = np.diff(np.array(ticks)) * 1000 - 5
    its = w.session.model.config["training"]["iteration"]
    w.segment.pca.value = True
    w.segment.run()
    while w.segment.worker is not None or "cells 2D segmentation" not in viewer.layers:
        app.processEvents()
        time.sleep(0.01)
    viewer.layers[W.PREVIEW_LAYER].visible = False
    shot("3-segment.png", 2)
    print(f"\nGUI responsiveness during {args.seconds:.0f} s of training ({its} iterations, "
          f"{os.cpu_count()} CPUs, Qt platform {app.platformName()})")
    print(f"{'measure':<38}{'value':>10}")
    print(f"{'largest event-loop stall (ms)':<38}{gaps.max():10.1f}")
    print(f"{'99th percentile stall (ms)':<38}{np.percentile(gaps, 99):10.1f}")
    print(f"{'click Train -> first loss point (s)':<38}{first_loss or float('nan'):10.2f}")
    print(f"{'click Train -> first preview (s)':<38}{first_preview or float('nan'):10.2f}")
    w.cleanup_model_folder()
    viewer.close()


if __name__ == "__main__":
    main()
