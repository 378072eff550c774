"""Model folders: ``config.json`` (everything needed to rebuild the model) + safetensors weights.

Weights never go through pickle: they load with safetensors, the optimiser state with
``torch.load(weights_only=True)``. A save writes new, versioned files first and replaces
``config.json`` last (atomically, with the files' SHA-256), so a crash at any moment leaves the
previous checkpoint intact, and a file changed behind our back is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import SparseSegError
from .network import UNet, build_network

FORMAT = "napari-sparseseg-model"
VERSION = 1
CONFIG = "config.json"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file (hex), as model configs record it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Model:
    """A trained model: the embedding network f, its EMA g (may be None) and the config."""

    net: UNet
    config: dict[str, Any]
    ema: UNet | None = None
    optimizer_state: dict | None = None
    path: Path | None = None

    @property
    def ndim(self) -> int:
        return int(self.config["network"]["ndim"])

    @property
    def in_channels(self) -> int:
        return int(self.config["network"]["in_channels"])


def _previous_files(folder: Path) -> set[str]:
    """The file names the checkpoint now in ``folder`` uses (empty if there is none or it is unreadable).

    Only plain names inside the folder count, so a damaged or hand-edited config.json can never
    make a save delete something elsewhere.
    """
    try:
        entries = json.loads((folder / CONFIG).read_text()).get("files", {})
        names = {str(e["name"]) for e in entries.values()}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return set()
    return {n for n in names if n and n != CONFIG and Path(n).name == n and n not in (".", "..")}


def _free_name(folder: Path, stem: str, suffix: str) -> str:
    """``stem + suffix``, or ``stem-1 + suffix``, ... : the first name no file in ``folder`` has yet,
    so that a save never overwrites a file (the current checkpoint's or anybody else's)."""
    name, k = f"{stem}{suffix}", 0
    while (folder / name).exists() or (folder / f".{name}.tmp").exists():
        k += 1
        name = f"{stem}-{k}{suffix}"
    return name


def save(folder: str | os.PathLike, model: Model) -> Path:
    """Write ``model`` into ``folder`` atomically; returns the folder.

    New files go under names no file in the folder has yet, ``config.json`` is replaced last, and
    only then are the files the previous ``config.json`` named (and the new one no longer uses)
    deleted. Nothing else in the folder is touched.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    previous = _previous_files(folder)
    it = int(model.config.get("training", {}).get("iteration", 0))

    def tensors(net):
        return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}

    def write(stem, suffix, dump):
        name = _free_name(folder, f"{stem}-{it:08d}", suffix)
        tmp = folder / f".{name}.tmp"
        dump(tmp)
        os.replace(tmp, folder / name)
        return name

    files = {"weights": write("weights", ".safetensors", lambda p: save_file(tensors(model.net), str(p)))}
    if model.ema is not None:
        files["ema"] = write("ema", ".safetensors", lambda p: save_file(tensors(model.ema), str(p)))
    if model.optimizer_state is not None:
        files["optimizer"] = write("optimizer", ".pt", lambda p: torch.save(model.optimizer_state, p))
    config = dict(model.config)
    config["format"] = FORMAT
    config["version"] = VERSION
    config["files"] = {role: {"name": name, "sha256": file_sha256(folder / name)} for role, name in files.items()}
    _atomic_write_bytes(folder / CONFIG, json.dumps(config, indent=2).encode())
    # only now that config.json points to the new files may the previous checkpoint's files go
    for name in previous - set(files.values()):
        path = folder / name
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
    model.path = folder
    return folder


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked ``config.json`` of a model folder."""
    folder = Path(folder)
    cfg_path = folder / CONFIG
    if not folder.exists():
        raise SparseSegError(f"model folder {folder}: not found")
    if not cfg_path.exists():
        raise SparseSegError(f"model folder {folder}: has no {CONFIG}; expected a folder written by 'sparseseg train'")
    return parse_config(cfg_path.read_bytes(), f"model folder {folder}", CONFIG)


def parse_config(data: bytes, where: str, name: str) -> dict[str, Any]:
    """Parse and check a model config (``name`` inside ``where``, for messages): ours, not newer."""
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SparseSegError(f"{where}: {name} is not valid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise SparseSegError(f"{where}: {name} is not a napari-sparseseg model")
    if int(config.get("version", 0)) > VERSION:
        raise SparseSegError(
            f"{where}: written by a newer napari-sparseseg (format {config['version']}); please upgrade"
        )
    return config


def _checked(folder: Path, config: dict, role: str) -> Path | None:
    entry = config.get("files", {}).get(role)
    if entry is None:
        return None
    path = folder / entry["name"]
    if not path.exists():
        raise SparseSegError(f"model folder {folder}: {entry['name']} is missing")
    if file_sha256(path) != entry["sha256"]:
        raise SparseSegError(
            f"model folder {folder}: {entry['name']} does not match the checksum in {CONFIG} "
            "(the file was changed or damaged); refusing to load it"
        )
    return path


def load(folder: str | os.PathLike, device: str | torch.device = "cpu", with_optimizer: bool = False) -> Model:
    """Load a model folder, or a bioimage.io package written by ``sparseseg export`` (a .zip file;
    see :mod:`.package`), without executing any code from it."""
    folder = Path(folder)
    if folder.is_file():
        from .package import PACKAGE_CONFIG, read_package

        config, states = read_package(folder)
        return _build(folder, config, states, device, None, f"model package {folder}", PACKAGE_CONFIG)
    config = read_config(folder)
    weights = _checked(folder, config, "weights")
    if weights is None:
        raise SparseSegError(f"model folder {folder}: {CONFIG} names no weights file")
    states = {"weights": (weights.name, load_file(str(weights)))}
    ema_path = _checked(folder, config, "ema")
    if ema_path is not None:
        states["ema"] = (ema_path.name, load_file(str(ema_path)))
    opt_state = None
    opt_path = _checked(folder, config, "optimizer") if with_optimizer else None
    if opt_path is not None:
        opt_state = torch.load(opt_path, map_location="cpu", weights_only=True)
    return _build(folder, config, states, device, opt_state, f"model folder {folder}", CONFIG)


def _build(source: Path, config: dict, states: dict[str, tuple[str, dict]], device, opt_state: dict | None,
           where: str, cfg_name: str) -> Model:
    """The model of ``config`` (``cfg_name`` in ``where``, for messages) with the state dicts
    ``states`` (role -> (file name, tensors))."""

    def restore(role):
        name, state = states[role]
        try:
            target = build_network(config["network"])
        except (KeyError, TypeError, ValueError) as err:
            raise SparseSegError(f"{where}: invalid network description in {cfg_name} ({err})") from err
        try:
            target.load_state_dict(state)
        except Exception as err:
            raise SparseSegError(f"{where}: {name} does not fit the network ({err})") from err
        return target.to(device).eval()

    net = restore("weights")
    ema = None
    if "ema" in states:
        ema = restore("ema")
        for p in ema.parameters():
            p.requires_grad_(False)
    return Model(net=net, config=config, ema=ema, optimizer_state=opt_state, path=source)


def check_compatible(config: dict, ndim: int, channels: int, what: str) -> None:
    """Refuse a model for another dimensionality or channel count, naming both."""
    net = config["network"]
    if int(net["ndim"]) != ndim:
        raise SparseSegError(
            f"{what}: is {ndim}D but the model was trained on {net['ndim']}D images; "
            f"use a {ndim}D model (train one on {ndim}D data)"
        )
    if int(net["in_channels"]) != channels and not (channels == 1 and int(net["in_channels"]) == 3):
        # a grey image for a colour model is repeated into its channels (io.to_channels_first)
        hint = "; convert it to greyscale first" if channels == 3 and int(net["in_channels"]) == 1 else ""
        raise SparseSegError(
            f"{what}: has {channels} channel(s) but the model expects {net['in_channels']}{hint}"
        )
