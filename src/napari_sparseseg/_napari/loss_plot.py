"""The live loss curve of the Train tab: matplotlib (already installed with napari's stack) on
its Qt Agg canvas, with axes; redrawn at most a few times a second so training events never wait
for drawing."""

from __future__ import annotations

import math
import time

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from qtpy.QtWidgets import QSizePolicy

#: at most one redraw per this many seconds (an Agg draw of this canvas takes ~20 ms)
REDRAW_SECONDS = 1.0
#: smoothing of the drawn curve (exponential moving average weight of the newest value)
SMOOTHING = 0.1

_BG, _FG, _LINE = "#262930", "#c8c8c8", "#00aaff"


class LossPlot(FigureCanvasQTAgg):
    """Total training loss (raw and smoothed) against iteration, log scale."""

    def __init__(self, parent=None):
        # a fixed layout: constrained layout would re-solve on every draw (~100 ms; this: ~20 ms)
        fig = Figure(figsize=(3.2, 1.6), dpi=100, facecolor=_BG)
        fig.subplots_adjust(left=0.16, right=0.97, bottom=0.26, top=0.86)
        super().__init__(fig)
        self.setParent(parent)
        ax = self.ax = fig.add_subplot()
        ax.set_facecolor(_BG)
        for side in ax.spines.values():
            side.set_color(_FG)
        ax.tick_params(colors=_FG, labelsize=7)
        ax.set_xlabel("iteration", color=_FG, fontsize=8)
        ax.set_ylabel("loss", color=_FG, fontsize=8)
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())  # minor labels on a short log axis overlap
        (self._raw,) = ax.plot([], [], color=_LINE, alpha=0.3, linewidth=0.8)
        (self._smooth,) = ax.plot([], [], color=_LINE, linewidth=1.6)
        self._title = ax.set_title("", color=_FG, fontsize=8, loc="left")
        self._hint = ax.text(0.5, 0.5, "the loss curve appears when training starts", color=_FG, fontsize=8,
                             ha="center", va="center", transform=ax.transAxes)
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
        its = range(1, len(self.values) + 1)
        self._raw.set_data(its, self.values)
        self._smooth.set_data(its, self.smoothed)
        shown = len(self.values) >= 2
        self._hint.set_visible(not shown)
        self._title.set_text(f"loss {self.smoothed[-1]:.3f}" if shown else "")
        if shown:
            self.ax.set_xlim(1, len(self.values))
            lo, hi = min(self.values), max(self.values)
            self.ax.set_ylim(lo / 1.2, hi * 1.2)
        self.draw_idle()
        self._last_draw = time.monotonic()
