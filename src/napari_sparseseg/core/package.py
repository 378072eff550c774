"""Reading a bioimage.io model package (.zip) written by ``sparseseg export`` (:mod:`.export`).

Such a package carries, besides what bioimage.io needs, the model's own ``config.json`` as the
attachment ``sparseseg_config.json``, whose ``files`` name the package's weight files with their
SHA-256. Loading reads that config and the state dicts straight from the zip: the
``pytorch_state_dict`` weights with ``torch.load(weights_only=True)`` (tensors only, no code),
the EMA network's (SPOCO) with safetensors. The TorchScript weights (code) are never loaded here.
Reading needs neither bioimageio.spec nor bioimageio.core.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from .checkpoint import parse_config
from .errors import SparseSegError

#: the model's config.json inside a package, as an attachment
PACKAGE_CONFIG = "sparseseg_config.json"
#: file names inside a package, by role
WEIGHTS = "weights.pt"
EMA = "ema.safetensors"
TORCHSCRIPT = "weights_torchscript.pt"
#: the description bioimage.io tools read
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")


EXPECTED = "expected a model folder or a bioimage.io model package (.zip) written by 'sparseseg export'"


def read_package(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[str, dict[str, torch.Tensor]]]]:
    """The checked config of the package at ``path`` and its state dicts by role
    (``"weights"``, and ``"ema"`` when the package has one): role -> (file name, tensors)."""
    path = Path(path)
    where = f"model package {path}"
    if not zipfile.is_zipfile(path):
        raise SparseSegError(f"{path}: is a file but not a zip archive; {EXPECTED}")
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        if PACKAGE_CONFIG not in names:
            what = "a bioimage.io package from another tool" if names & set(RDF_NAMES) else "a zip archive"
            raise SparseSegError(
                f"{path}: {what} without {PACKAGE_CONFIG}; {EXPECTED} "
                "(bioimage.io models of other tools cannot be fine-tuned or segmented with here)"
            )
        config = parse_config(zf.read(PACKAGE_CONFIG), where, PACKAGE_CONFIG)
        files = config.get("files") or {}
        if "weights" not in files:
            raise SparseSegError(f"{where}: {PACKAGE_CONFIG} names no weights file")
        states = {}
        for role, entry in files.items():
            if role not in ("weights", "ema"):
                continue
            name = str(entry["name"])
            if name not in names:
                raise SparseSegError(f"{where}: {name} is missing")
            data = zf.read(name)
            if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                raise SparseSegError(
                    f"{where}: {name} does not match the checksum in {PACKAGE_CONFIG} "
                    "(the file was changed or damaged); refusing to load it"
                )
            states[role] = (name, _state_dict(data, name, where))
    return config, states


def _state_dict(data: bytes, name: str, where: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or of a pure PyTorch state dict (weights_only: no code runs)."""
    try:
        if name.endswith(".safetensors"):
            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise SparseSegError(f"{where}: {name} could not be read as weights ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SparseSegError(f"{where}: {name} is not a state dict (name -> tensor)")
    return state
