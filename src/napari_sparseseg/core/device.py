"""Where the networks run, and in which precision: one place for training and inference."""

from __future__ import annotations

import contextlib
import ctypes
import platform
import sys

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
    """Whether bfloat16 autocast makes this package's networks faster here: CPUs with native
    bfloat16 instructions (AVX512-BF16: AMD Zen 4 and later, Intel Cooper Lake; AMX tiles: Intel
    Sapphire Rapids and later), where oneDNN runs the convolutions faster than float32
    (docs/method.md). Elsewhere bfloat16 is emulated and slower.

    Not CUDA GPUs, although they support it: the networks are small enough that a GPU step is
    bound by kernel launches, and autocast's casts add launches. On an H200 bfloat16 made training
    steps 9-24 % slower in three settings of four (8 % faster in the fourth), prediction 3-7 %
    faster, and segmentations no better
    (benchmarks/gpu.py, docs/benchmarks.md §11); ``precision="bfloat16"`` still asks for it."""
    if device.type == "cpu":
        checks = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
        return any(bool(check and check()) for check in checks)
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: float32 throughout).

    "auto" takes bfloat16 where it is faster (:func:`fast_bfloat16`: CPUs with native bfloat16
    instructions) and float32 elsewhere, CUDA GPUs included.
    """
    if precision not in PRECISIONS:
        raise SparseSegError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "float32" or (precision == "auto" and not fast_bfloat16(device)):
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for the network's forward pass (a no-op context for float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


#: glibc ``mallopt`` parameters (malloc.h) and the values :func:`tune_allocator` sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum: arrays up to 32 MiB come from the heap
TRIM_THRESHOLD = 256 << 20  # free memory kept at the heap's top for the next step


def tune_allocator() -> bool:
    """Let glibc's malloc reuse freed memory for the large arrays a CPU training step allocates.

    By default glibc maps every block over a few MiB freshly from the kernel and unmaps it when
    freed, so each of a step's tensors (and each gradient autograd zero-fills) pays page faults
    on first touch: up to a fifth of a 3D step here (docs/method.md). With these thresholds freed
    blocks go back to the heap and are reused. Process-wide and harmless elsewhere (at most
    ``TRIM_THRESHOLD`` of free memory stays with the process); a no-op off glibc. Returns whether
    the thresholds were set."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
