"""A small live loss curve drawn with QPainter (no plotting dependency)."""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget


class LossPlot(QWidget):
    """Total training loss against iteration, smoothed, on a log scale."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.values: list[float] = []
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("training loss (log scale, smoothed)")

    def clear(self) -> None:
        self.values = []
        self.update()

    def add(self, value: float) -> None:
        if math.isfinite(value) and value > 0:
            prev = self.values[-1] if self.values else value
            self.values.append(0.9 * prev + 0.1 * value if self.values else value)
            self.update()

    def paintEvent(self, event):  # noqa: N802 (Qt API)
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        p.fillRect(0, 0, w, h, QColor(38, 41, 48))
        p.setPen(QColor(180, 180, 180))
        if len(self.values) < 2:
            p.drawText(8, h // 2, "loss curve appears when training starts")
            return
        logs = [math.log10(v) for v in self.values]
        lo, hi = min(logs), max(logs)
        span = max(hi - lo, 1e-6)
        n = len(logs)
        step = max(1, n // max(w, 1))
        pts = QPolygonF()
        for i in range(0, n, step):
            x = 6 + (w - 12) * i / (n - 1)
            y = 16 + (h - 28) * (1 - (logs[i] - lo) / span)
            pts.append(QPointF(x, y))
        p.setPen(QPen(QColor(0, 170, 255), 2))
        p.drawPolyline(pts)
        p.setPen(QColor(200, 200, 200))
        p.drawText(6, 12, f"loss {self.values[-1]:.3f}   (max {10 ** hi:.2f}, min {10 ** lo:.2f})")
        p.drawText(w - 80, h - 2, f"{n} it", )
        p.end()
