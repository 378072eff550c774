import os

# Under Xvfb (as in .ci/run) Qt uses the virtual display and vispy gets an OpenGL context;
# without any display, fall back to the offscreen platform (the widget tests then need a GL).
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import pytest
import torch

from napari_sparseseg.core.samples import synthetic_cells

# at most 2 threads; fewer when OMP_NUM_THREADS says so (an oversubscribed CPU slows torch 10x and more)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1, int(os.environ.get("OMP_NUM_THREADS") or 2))))

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _temporary_folders_in_tmp_path(tmp_path, monkeypatch):
    """Folders the widgets make with :mod:`tempfile` (a model in training, a large stack's
    annotations or labels) go under the test's own tmp_path, which pytest clears, not /tmp; so
    does the cache of downloaded samples."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # downloaded samples go to the test's folder, never the user's cache
    monkeypatch.setenv("SPARSESEG_CACHE", str(tmp_path / "sample-cache"))


@pytest.fixture(scope="session")
def cells2d():
    """Four small synthetic 2D images with dense labels."""
    return [synthetic_cells((128, 128), seed=s) for s in range(4)]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def errors(monkeypatch):
    """The error messages the plugin shows its user (napari notifications), in order."""
    import napari_sparseseg._napari.layers as L

    seen = []
    monkeypatch.setattr(L, "notify_error", seen.append)
    return seen
