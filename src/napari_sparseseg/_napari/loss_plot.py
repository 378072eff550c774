"""The live loss curve of the Train tab: matplotlib (already installed with napari's stack) on
its Qt Agg canvas, with axes; redrawn at most a few times a second so training events never wait
for drawing."""

from __future__ import annotations

import math
import time

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QSizePolicy

#: at most one redraw per this many seconds (an Agg draw takes ~20-50 ms)
REDRAW_SECONDS = 0.5
#: smoothing of the drawn curve (exponential moving average weight of the newest value)
SMOOTHING = 0.1

_BG, _FG, _LINE = "#262930", "#c8c8c8", "#00aaff"


class LossPlot(FigureCanvasQTAgg):
    """Total training loss (raw and smoothed) against iteration, log scale."""

    def __init__(self, parent=None):
        fig = Figure(figsize=(3.2, 1.6), dpi=100, facecolor=_BG, layout="constrained")
        super().__init__(fig)
        self.setParent(parent)
        self.ax = fig.add_subplot()
        self.values: list[float] = []  # raw losses, one per iteration
        self.smoothed: list[float] = []
        self._last_draw = 0.0
        self.setMinimumHeight(150)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("training loss per iteration (light: raw; bright: smoothed), log scale")
        self._redraw()

    def clear(self) -> None:
        self.values, self.smoothed = [], []
        self._redraw()

    def add(self, value: float) -> None:
        """Append one iteration's loss; non-finite or non-positive values are skipped."""
        if not (math.isfinite(value) and value > 0):
            return
        self.values.append(value)
        prev = self.smoothed[-1] if self.smoothed else value
        self.smoothed.append((1 - SMOOTHING) * prev + SMOOTHING * value)
        if time.monotonic() - self._last_draw >= REDRAW_SECONDS:
            self._redraw()

    def flush(self) -> None:
        """Draw what has not been drawn yet (at the end of training)."""
        self._redraw()

    def _redraw(self) -> None:
        ax = self.ax
        ax.clear()
        ax.set_facecolor(_BG)
        for side in ax.spines.values():
            side.set_color(_FG)
        ax.tick_params(colors=_FG, labelsize=7)
        ax.set_xlabel("iteration", color=_FG, fontsize=8)
        ax.set_ylabel("loss", color=_FG, fontsize=8)
        if len(self.values) >= 2:
            its = range(1, len(self.values) + 1)
            ax.plot(its, self.values, color=_LINE, alpha=0.3, linewidth=0.8)
            ax.plot(its, self.smoothed, color=_LINE, linewidth=1.6)
            ax.set_yscale("log")
            ax.set_xlim(1, len(self.values))
            ax.set_title(f"loss {self.smoothed[-1]:.3f}", color=_FG, fontsize=8, loc="left")
        else:
            ax.text(0.5, 0.5, "the loss curve appears when training starts", color=_FG, fontsize=8,
                    ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        self.draw_idle()
        self._last_draw = time.monotonic()
