"""Where the networks run, and in which precision: one place for training and inference."""

from __future__ import annotations

import contextlib

import torch

from .errors import SparseSegError

PRECISIONS = ("auto", "float32", "bfloat16")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA if present, else Apple MPS, else CPU. An unavailable device is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SparseSegError(f"device {device!r}: no CUDA GPU is available here; use --device cpu or auto")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise SparseSegError(f"device {device!r}: expected auto, cpu, cuda (or cuda:N) or mps")
    return torch.device(device)


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 convolutions are fast here: CUDA GPUs that support bfloat16, and CPUs with
    AMX tiles (Intel Sapphire Rapids and later), where oneDNN runs them several times faster than
    float32. Elsewhere bfloat16 is emulated and slower."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        check = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(check and check())
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: float32 throughout).

    "auto" takes bfloat16 on CUDA GPUs that support it, float32 elsewhere: on AMX CPUs bfloat16
    is faster per step but its effect on accuracy is not yet measured there (ask for it explicitly).
    """
    if precision not in PRECISIONS:
        raise SparseSegError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "float32" or (precision == "auto" and not (device.type == "cuda" and fast_bfloat16(device))):
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for the network's forward pass (a no-op context for float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
