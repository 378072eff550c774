"""napari-sparseseg: instance segmentation from a few labeled objects (SPOCO).

The Python API needs neither Qt nor napari::

    from napari_sparseseg import Trainer, TrainConfig, load_model, predict, segment, segment_embeddings
"""

from .core.checkpoint import Model, load as load_model, save as save_model
from .core.clustering import segment_embeddings
from .core.errors import SparseSegError
from .core.metrics import evaluate
from .core.prediction import predict
from .core.segment import segment
from .core.sparsify import sparsify
from .core.training import TrainConfig, Trainer, TrainEvent, train

__version__ = "0.1.0"

__all__ = [
    "Model", "SparseSegError", "TrainConfig", "TrainEvent", "Trainer", "evaluate", "load_model",
    "predict", "save_model", "segment", "segment_embeddings", "sparsify", "train",
]
