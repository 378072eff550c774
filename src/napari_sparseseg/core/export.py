"""Export a model as a bioimage.io model package (``sparseseg export``).

The package is a zip holding a bioimage.io model description (format 0.5) with
``pytorch_state_dict`` weights (architecture: :class:`..network.UNet` or :class:`..network.TwinNet`
with the model's recorded constructor arguments) and TorchScript weights (traced), a test input
(a synthetic sample) and the network's output on it, percentile normalisation as preprocessing,
a README on how the outputs become instances, and the model's own config as the attachment
``sparseseg_config.json``, so that :func:`..checkpoint.load` reads the package back (:mod:`.package`).

Needs the optional ``[bioimageio]`` extra (bioimageio.spec); reading a package back does not.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from safetensors.torch import save_file

from . import checkpoint
from . import scale as scales
from .errors import SparseSegError
from .io import normalize
from .package import EMA, PACKAGE_CONFIG, TORCHSCRIPT, WEIGHTS
from .samples import synthetic_cells
from .segment import foreground_fraction, foreground_threshold

#: the package's test image, per spatial axis before rounding up to the network's divisor
TEST_SHAPE = {2: (64, 64), 3: (16, 32, 32)}
SPOCO_CITE = ("Wolny, Yu, Pape, Kreshuk: Sparse Object-level Supervision for Instance Segmentation "
              "with Pixel Embeddings. CVPR 2022", "https://arxiv.org/abs/2103.14572")
CRAC_CITE = ("Liu, Huang, Xiong, Zhou, Zhang, Chen, Zha, Wu: Learning Cross-Representation Affinity "
             "Consistency for Sparsely Supervised Biomedical Instance Segmentation. ICCV 2023",
             "https://github.com/liuxy1103/CRAC")


def _bioimageio():
    """The bioimageio.spec modules export needs, or a clear message on how to get them."""
    try:
        import bioimageio.spec
        from bioimageio.spec.model import v0_5
    except ImportError as err:
        raise SparseSegError(
            "export needs bioimageio.spec, which is not installed; install the extra: "
            "pip install 'napari-sparseseg[bioimageio]'"
        ) from err
    return bioimageio.spec, v0_5


def channel_names(net_config: dict[str, Any]) -> list[str]:
    """Names of the network's output channels in order: embeddings, foreground logit, affinity logits."""
    names = [f"embedding{i}" for i in range(int(net_config["out_channels"]))]
    if net_config.get("foreground"):
        names.append("foreground_logit")
    names += [f"affinity_logit{k}" for k in range(int(net_config.get("affinities", 0)))]
    return names


def test_input(model: checkpoint.Model) -> np.ndarray:
    """The package's test input (1, C, *S), float32, not normalised: the built-in synthetic sample
    (repeated over the model's channels), each axis a multiple of the network's divisor."""
    div = model.net.divisor
    shape = tuple(max(d, -(-s // d) * d) for s, d in zip(TEST_SHAPE[model.ndim], div))
    image, _ = synthetic_cells(shape, seed=0)
    x = np.repeat(image[None].astype(np.float32), model.in_channels, axis=0)
    return x[None]


@torch.no_grad()
def network_output(net: torch.nn.Module, x: np.ndarray, norm: dict[str, float]) -> np.ndarray:
    """What the network outputs for the raw (1, C, *S) ``x`` after the model's normalisation."""
    xn = normalize(x[0], norm["low"], norm["high"])[None]
    return net.eval()(torch.from_numpy(xn)).float().numpy()


def _safe_name(text: str) -> str:
    """A bioimage.io model name: letters, digits and ``_+- ()`` only."""
    return re.sub(r"[^A-Za-z0-9_+\- ()]", "-", text).strip()[:128] or "sparseseg model"


#: what c of a model's foreground head is (methods.base.ForegroundConstant)
C_MEANING = "the head's mean on labeled objects held out of its training (else on the labeled objects)"


def _readme(model: checkpoint.Model, name: str, zoom: float, channels: list[str]) -> str:
    cfg = model.config
    method = cfg.get("method", "spoco")
    ndim = model.ndim
    net = cfg["network"]
    offsets = cfg.get("offsets") or []
    fg_c = (cfg.get("foreground") or {}).get("c")
    d = scales.TARGET_DIAMETER[ndim]
    diameter = d / zoom if zoom else None
    coords = float(net.get("coord_scale") or 0)
    lines = [
        f"# {name}",
        "",
        f"A {ndim}D instance segmentation model trained with **{method.upper()}** by "
        "napari-sparseseg from sparse object masks (a few complete objects per image).",
        "",
        "## What the network outputs",
        "",
        f"One tensor `embeddings` (batch, channel, {'z, ' if ndim == 3 else ''}y, x), same spatial size as the "
        f"input, {len(channels)} channels, no activation:",
        "",
        f"- `embedding0` .. `embedding{int(net['out_channels']) - 1}`: pixel embeddings; pixels of one object are close, "
        "of different objects far apart"
        + (f" (the first {ndim} channels include the pixel coordinates times {coords:.4g}, counted from the "
           "centre of the input block)" if coords else "")
        + (" (for CRAC, their cosine similarity across an offset is the explicit affinity)" if method == "crac" else ""),
    ]
    if net.get("foreground"):
        thr = foreground_threshold(cfg)
        lines.append("- `foreground_logit`: logit of 'inside an object' (positive-unlabeled); `sparseseg segment` keeps "
                     "a segment whose mean sigmoid(logit) is at least "
                     + (f"{thr:.4f} ({foreground_fraction(cfg):g} c, c = {fg_c:.4f}, {C_MEANING})"
                        if thr is not None else f"a fraction of c, {C_MEANING}"))
    if net.get("affinities"):
        lines.append("- `affinity_logit0` ..: logits of 'same object' for each pixel and its partner at the offsets "
                     f"{offsets} (in the order of the axes, z first in 3D)")
    lines += [
        "",
        "## Input",
        "",
        f"{model.in_channels} channel(s); each spatial size a multiple of {list(model.net.divisor)}, at least twice that. "
        f"Preprocessing: per-image, per-channel percentile normalisation ({cfg['normalization']['low']} -> 0, "
        f"{cfg['normalization']['high']} -> 1), described as `scale_range`.",
        "",
        "The network works at a fixed object scale: objects should be about "
        f"{d:.0f} pixels across{' in y/x' if ndim == 3 else ''}. The training images were zoomed by {zoom:.3g} "
        + (f"(objects of about {diameter:.0f} pixels)" if diameter else "")
        + ". bioimage.io has no resizing step, so resize images of other scales yourself; "
        "`sparseseg segment` does it for you (`--diameter` to override).",
        "",
        "## From outputs to instances",
        "",
        "The outputs are not labels. napari-sparseseg turns them into instances (mutex watershed or multicut "
        "on affinities, background from the foreground head and from how much segments stand out, size filters), "
        "at the model's scale and back:",
        "",
        "```bash",
        "# with napari-sparseseg installed",
        "sparseseg segment --model this-model.zip --images 'images/*.tif' --out seg/",
        "sparseseg train --from this-model.zip --images 'img/*.tif' --labels 'sparse/*.tif' --out tuned/  # fine-tune",
        "```",
        "",
        "or in Python `napari_sparseseg.segment(napari_sparseseg.load_model('this-model.zip'), image)`, and in "
        "napari: Train tab, *Load bioimage.io package…*. The package's `sparseseg_config.json` holds everything "
        "napari-sparseseg needs (normalisation, scale, offsets, post-processing defaults); its weights are read "
        "from the `pytorch_state_dict` file (and, for SPOCO, the EMA network's `ema.safetensors`) without running code.",
        "",
        "## Validation",
        "",
        "The test input (a synthetic sample image) and the network's output on it are included; "
        "`bioimageio.core`'s test reproduces that output with both weight formats. No accuracy figure is claimed "
        "for this model: score it on your own annotated images with `sparseseg evaluate --pred seg/ --gt gt/`.",
        "",
        "## Limitations",
        "",
        "- Trained from sparse annotations of specific images; check results on new data before relying on them.",
        "- Tiled prediction needs overlapping tiles (napari-sparseseg uses a 32-pixel halo)"
        + ("; the coordinate channels are counted from each block's centre, so tiles of other tools do not agree "
           "with each other there" if coords else "") + ".",
        "",
        f"Method: {SPOCO_CITE[0] if method == 'spoco' else CRAC_CITE[0]}.",
        "",
    ]
    return "\n".join(lines)


def export_bioimageio(
    model_folder: str | os.PathLike,
    out_zip: str | os.PathLike,
    name: str | None = None,
    authors: list[str] | None = None,
    license: str = "CC-BY-4.0",
    description: str | None = None,
) -> Path:
    """Write the model in ``model_folder`` (or a package this function wrote) as a bioimage.io
    model package ``out_zip``; returns its path. ``authors`` default to the login name,
    ``license`` is the weights' SPDX identifier."""
    out_zip = Path(out_zip)
    if out_zip.suffix.lower() != ".zip":
        raise SparseSegError(f"--out {out_zip}: expected a file name ending in .zip")
    model = checkpoint.load(model_folder)
    spec, v = _bioimageio()
    method = str(model.config.get("method", "spoco"))
    name = _safe_name(name or f"sparseseg {method} {model.ndim}D {Path(model_folder).stem}")
    authors = [a.strip() for a in (authors or [getpass.getuser() or "unknown"]) if a.strip()]
    with tempfile.TemporaryDirectory(prefix="sparseseg-export-") as tmp:
        tmp = Path(tmp)
        files = _write_files(model, tmp, name)
        try:
            descr = _description(v, model, tmp, files, name, authors, license, description)
        except ValueError as err:  # pydantic's ValidationError, e.g. an unknown licence
            raise SparseSegError(_invalid(model_folder, license, err)) from err
        out_zip.parent.mkdir(parents=True, exist_ok=True)
        partial = out_zip.with_name(f".{out_zip.name}.tmp.zip")
        try:
            spec.save_bioimageio_package(descr, output_path=partial)
            os.replace(partial, out_zip)
        finally:
            partial.unlink(missing_ok=True)
    return out_zip


def _invalid(model_folder, license: str, err: ValueError) -> str:
    """A one-line message for a description bioimageio.spec refused."""
    errors = err.errors() if hasattr(err, "errors") else []
    fields = sorted({str(e["loc"][0]) for e in errors if e.get("loc")})
    if "license" in fields:
        return f"--license {license!r}: not an SPDX licence identifier (e.g. CC-BY-4.0, MIT, BSD-3-Clause)"
    first = errors[0]["msg"][:200] if errors else str(err)[:200]
    return f"export of {model_folder}: bioimageio.spec refused the description ({', '.join(fields)}: {first})"


def _write_files(model: checkpoint.Model, tmp: Path, name: str) -> dict[str, str]:
    """Write the package's files into ``tmp``; returns the weight files napari-sparseseg reads, by role."""
    net, norm = model.net.cpu().eval(), model.config["normalization"]
    torch.save({k: t.detach().cpu().contiguous() for k, t in net.state_dict().items()}, tmp / WEIGHTS)
    files = {"weights": WEIGHTS}
    if model.ema is not None:
        save_file({k: t.detach().cpu().contiguous() for k, t in model.ema.state_dict().items()}, str(tmp / EMA))
        files["ema"] = EMA
    x = test_input(model)
    y = network_output(net, x, norm)
    np.save(tmp / "test_input.npy", x)
    np.save(tmp / "test_output.npy", y)
    # sample tensors (TIFF) for people and viewers; the .npy test tensors are what tests read
    tifffile.imwrite(tmp / "sample_input.tif", x)
    tifffile.imwrite(tmp / "sample_output.tif", y)
    xn = torch.from_numpy(normalize(x[0], norm["low"], norm["high"])[None])
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.13 deprecates tracing, but TorchScript is the format bioimage.io tools run;
        # the shape checks it freezes are GroupNorm's (the traced net runs on every size, tested)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.jit.trace(net, xn, check_trace=False).save(str(tmp / TORCHSCRIPT))
    package_cfg = {k: val for k, val in model.config.items() if k != "files"}
    package_cfg["files"] = {role: {"name": n, "sha256": checkpoint.file_sha256(tmp / n)} for role, n in files.items()}
    (tmp / PACKAGE_CONFIG).write_text(json.dumps(package_cfg, indent=2))
    (tmp / "README.md").write_text(_readme(model, name, scales.model_zoom(model.config), channel_names(net.config)))
    return files


def _description(v, model: checkpoint.Model, tmp: Path, files: dict[str, str], name: str, authors: list[str],
                 license: str, description: str | None):
    """The bioimage.io ``ModelDescr`` of the files in ``tmp`` (``v``: bioimageio.spec.model.v0_5)."""
    ndim, net, norm = model.ndim, model.net, model.config["normalization"]
    method = str(model.config.get("method", "spoco"))
    axes_ids = ["z", "y", "x"][-ndim:]
    space_in = [v.SpaceInputAxis(id=v.AxisId(a), size=v.ParameterizedSize(min=2 * d, step=d))
                for a, d in zip(axes_ids, net.divisor)]
    space_out = [v.SpaceOutputAxis(id=v.AxisId(a), size=v.SizeReference(tensor_id=v.TensorId("raw"), axis_id=v.AxisId(a)))
                 for a in axes_ids]
    inp = v.InputTensorDescr(
        id=v.TensorId("raw"),
        description=f"image, {model.in_channels} channel(s), objects about {scales.TARGET_DIAMETER[ndim]:.0f} px across",
        axes=[v.BatchAxis(), v.ChannelAxis(channel_names=[f"channel{i}" for i in range(model.in_channels)]), *space_in],
        test_tensor=v.FileDescr(source=tmp / "test_input.npy"),
        sample_tensor=v.FileDescr(source=tmp / "sample_input.tif"),
        data=v.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[v.ScaleRangeDescr(kwargs=v.ScaleRangeKwargs(
            axes=[v.AxisId(a) for a in axes_ids], min_percentile=float(norm["low"]),
            max_percentile=float(norm["high"])))],
    )
    out = v.OutputTensorDescr(
        id=v.TensorId("embeddings"),
        description="embeddings, then foreground/affinity logits; instances: sparseseg segment (README)",
        axes=[v.BatchAxis(), v.ChannelAxis(channel_names=channel_names(net.config)), *space_out],
        test_tensor=v.FileDescr(source=tmp / "test_output.npy"),
        sample_tensor=v.FileDescr(source=tmp / "sample_output.tif"),
        data=v.IntervalOrRatioDataDescr(type="float32"),
    )
    # the architecture is the network class itself: it records its constructor arguments
    arch = v.ArchitectureFromLibraryDescr(import_from="napari_sparseseg.core.network", callable=type(net).__name__,
                                          kwargs=dict(net.config))
    torch_version = v.Version(torch.__version__.split("+")[0])
    weights = v.WeightsDescr(
        pytorch_state_dict=v.PytorchStateDictWeightsDescr(
            source=tmp / WEIGHTS, architecture=arch, pytorch_version=torch_version,
            comment="state dict of the network; needs napari-sparseseg installed"),
        torchscript=v.TorchscriptWeightsDescr(
            source=tmp / TORCHSCRIPT, pytorch_version=torch_version, parent="pytorch_state_dict",
            comment="traced from the state-dict network (CPU code path)"),
    )
    cite = SPOCO_CITE if method == "spoco" else CRAC_CITE
    return v.ModelDescr(
        name=name,
        description=description or (f"{ndim}D instance segmentation ({method.upper()} from sparse object masks, "
                                    "napari-sparseseg): embeddings and affinities; instances via sparseseg segment"),
        authors=[v.Author(name=a) for a in authors],
        cite=[v.CiteEntry(text=cite[0], url=cite[1])],
        license=license,
        documentation=v.FileDescr(source=tmp / "README.md"),
        tags=["instance-segmentation", "napari-sparseseg", method, f"{ndim}d", "pytorch", "sparse-annotation"],
        inputs=[inp],
        outputs=[out],
        weights=weights,
        attachments=[v.FileDescr(source=tmp / PACKAGE_CONFIG)] + ([v.FileDescr(source=tmp / EMA)] if "ema" in files else []),
    )


def check_package(path: str | os.PathLike) -> tuple[str, list[str]]:
    """Run bioimageio.core's test of a package (format, both weight formats reproducing the test
    output, several input sizes): its status (``"passed"`` when all passed) and the failed checks."""
    try:
        from bioimageio.core import test_model
    except ImportError as err:
        raise SparseSegError(
            "checking a package needs bioimageio.core, which is not installed; install the extra: "
            "pip install 'napari-sparseseg[bioimageio]'"
        ) from err
    summary = test_model(str(path))
    failures = [f"{d.name}: {'; '.join(str(e.msg) for e in d.errors)}" for d in summary.details if d.status != "passed"]
    return str(summary.status), failures
