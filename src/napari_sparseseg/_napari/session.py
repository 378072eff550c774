"""What the tabs share: the current model and where it came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core import checkpoint


@dataclass
class Session:
    model: checkpoint.Model | None = None
    origin: str = ""  # "trained" (continue with resume) or "loaded" (fine-tune)
    folder: Path | None = None
