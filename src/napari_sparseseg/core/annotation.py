"""Checks on a user's sparse annotation that predict trouble in training."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

#: objects with fewer pixels than this are reported as specks
SPECK_SIZE = 20


@dataclass
class AnnotationReport:
    n_objects: int
    ids: list[int]
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.n_objects == 0:
            return "No objects annotated yet: paint a few complete objects, one id each."
        return f"{self.n_objects} object{'s' if self.n_objects != 1 else ''} annotated"


def check_annotations(labels: np.ndarray, background_id: int | None = None) -> AnnotationReport:
    """Count annotated objects and warn about pieces sharing one id, specks and border cuts."""
    labels = np.asarray(labels)
    ids = [int(i) for i in np.unique(labels) if i != 0 and i != background_id]
    report = AnnotationReport(len(ids), ids)
    slices = ndimage.find_objects(labels)
    split, specks, border = [], [], []
    for i in ids:
        sl = slices[i - 1] if i - 1 < len(slices) else None
        if sl is None:
            continue
        mask = labels[sl] == i
        size = int(mask.sum())
        if size < SPECK_SIZE:
            specks.append(i)
            continue
        if ndimage.label(mask)[1] > 1:
            split.append(i)
        if any(s.start == 0 or s.stop == n for s, n in zip(sl, labels.shape)):
            border.append(i)

    def fmt(v):
        return ", ".join(map(str, v[:8])) + (" ..." if len(v) > 8 else "")

    if split:
        report.warnings.append(
            f"Label(s) {fmt(split)} consist of separate pieces: touching or distant objects need their own id."
        )
    if specks:
        report.warnings.append(f"Label(s) {fmt(specks)} have fewer than {SPECK_SIZE} pixels: stray brush strokes?")
    if border:
        report.warnings.append(
            f"Label(s) {fmt(border)} touch the image border: they are treated as complete objects."
        )
    return report
