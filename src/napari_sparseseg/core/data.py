"""Training crops from sparse labels, with the geometric and photometric augmentations SPOCO needs.

Geometric augmentations (crop, flips, 90-degree rotations, elastic deformation) are drawn once
per crop and shared by both views; photometric ones (a smooth gain field, noise, blur, contrast
and colour jitter) are drawn independently for the view of f and the view of the EMA network g.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .errors import SparseSegError


@dataclass
class Sample:
    """One training image at the model's scale: ``image`` (C, *S) float32, ``labels`` (*S) int32
    (0 = unlabeled), ``valid`` (*S) bool (False: ignored), ``objects`` bounding boxes of annotated
    objects, ``zoom`` the factor the image was zoomed by in y/x, ``z_zoom`` in z, ``heldout`` the
    ids of the objects held out of the foreground loss (:func:`hold_out`)."""

    image: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    objects: list
    zoom: float = 1.0
    z_zoom: float = 1.0
    heldout: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: the image's name and its objects' ids as the user gave them (id j here is ``ids[j - 1]``)
    name: str = ""
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def relabel_consecutive(labels: np.ndarray) -> np.ndarray:
    """Ids 1..C in sorted order, 0 stays 0 (even when a crop has no 0 pixel)."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    out = np.zeros(labels.shape, dtype=np.int64)
    pos = labels > 0
    out[pos] = np.searchsorted(ids, labels[pos]) + 1
    return out


def rescale(array: np.ndarray, scale: float, order: int, z_scale: float = 1.0) -> np.ndarray:
    """Zoom the last two (y, x) axes of ``array`` by ``scale`` and, for a (C, Z, Y, X) image or a
    (Z, Y, X) label stack, z by ``z_scale``; order 0 for labels (nearest), else bilinear when
    enlarging and area averaging when shrinking."""
    spatial = array.ndim if order == 0 else array.ndim - 1
    zs = float(z_scale) if spatial == 3 else 1.0
    if scale == 1.0 and zs == 1.0:
        return array
    if order == 0:
        factors = [1.0] * (array.ndim - 3) + [zs, scale, scale] if spatial == 3 else [1.0] * (array.ndim - 2) + [scale, scale]
        return ndimage.zoom(array, factors, order=0, grid_mode=True, mode="grid-constant")
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if scale != 1.0:
        t = _resize_last(t, 2, scale)
    if zs != 1.0:  # z: the third axis from the end, moved last and resized in 1D
        t = _resize_last(t.movedim(-3, -1), 1, zs).movedim(-1, -3)
    return t.contiguous().numpy()


def _resize_last(t: torch.Tensor, n: int, scale: float) -> torch.Tensor:
    """Resize the last ``n`` axes of ``t`` by ``scale`` (area when shrinking, else (bi)linear)."""
    lead = t.shape[:-n]
    flat = t.reshape(1, -1, *t.shape[-n:])
    size = [max(1, int(round(s * scale))) for s in t.shape[-n:]]
    mode = "area" if scale < 1 else ("bilinear" if n == 2 else "linear")
    return F.interpolate(flat, size=size, mode=mode).reshape(*lead, *size)


def check_shapes(images: list[np.ndarray], labels: list[np.ndarray], names: list[str] | None = None,
                 ignore: list[np.ndarray | None] | None = None) -> None:
    """Raise a SparseSegError naming the image whose labels (or ignore mask) do not match its
    spatial shape; images are (C, *S)."""
    names = names or [f"image {i}" for i in range(len(images))]
    for img, lab, name, ign in zip(images, labels, names, ignore or [None] * len(images)):
        if img.shape[1:] != lab.shape:
            raise SparseSegError(
                f"{name}: image has spatial shape {img.shape[1:]} but its labels have shape {lab.shape}")
        if ign is not None and np.shape(ign) != lab.shape:
            raise SparseSegError(f"{name}: ignore mask has shape {np.shape(ign)} but the labels have shape {lab.shape}")


def prepare(
    images: list[np.ndarray],
    labels: list[np.ndarray],
    zooms: float | list[float] = 1.0,
    background_id: int | None = None,
    names: list[str] | None = None,
    ignore: list[np.ndarray | None] | None = None,
    z_zooms: list[float] | None = None,
) -> list[Sample]:
    """Check and zoom (image, labels) pairs, each image by its own factor. Images are normalised
    (C, *S) arrays.

    ``background_id``: pixels with that label are background, not an object: they count as
    unlabeled, which they are for the losses (every annotated object is pushed away from them, and
    the foreground head learns them as negatives), so dense labels with a background id train
    exactly as dense labels with background 0. ``ignore``: per image, a mask whose nonzero pixels
    take no part in training. ``z_zooms``: per 3D image, its z zoom (:func:`.scale.z_zoom`; default 1).
    """
    names = names or [f"image {i}" for i in range(len(images))]
    zooms = list(zooms) if isinstance(zooms, (list, tuple)) else [float(zooms)] * len(images)
    ignore = ignore or [None] * len(images)
    z_zooms = z_zooms or [1.0] * len(images)
    check_shapes(images, labels, names, ignore)
    samples = []
    n_objects = 0
    for img, lab, name, zoom, ign, zz in zip(images, labels, names, zooms, ignore, z_zooms):
        lab = lab.astype(np.int64)
        valid = np.ones(lab.shape, dtype=bool) if ign is None else ~np.asarray(ign).astype(bool)
        if background_id is not None:
            lab = np.where(lab == background_id, 0, lab)
        user_ids = np.unique(lab)
        user_ids = user_ids[user_ids > 0]
        lab = relabel_consecutive(lab)
        img_s = rescale(img, zoom, 1, zz)
        lab_s = rescale(lab, zoom, 0, zz)
        valid_s = rescale(valid.astype(np.uint8), zoom, 0, zz).astype(bool)
        common = tuple(min(a, b) for a, b in zip(img_s.shape[1:], lab_s.shape))  # rounding may differ by 1
        crop = tuple(slice(0, c) for c in common)
        img_s, lab_s, valid_s = img_s[(slice(None),) + crop], lab_s[crop], valid_s[crop]
        lab_s = np.where(valid_s, lab_s, 0)
        objects = [s for s in ndimage.find_objects(lab_s) if s is not None]
        n_objects += len(objects)
        samples.append(Sample(img_s.astype(np.float32), lab_s.astype(np.int32), valid_s, objects, zoom, zz,
                              name=name, ids=user_ids.astype(np.int64)))
    if n_objects == 0:
        raise SparseSegError(NO_OBJECT)
    return samples


NO_OBJECT = "no labeled object in any label image: paint at least one complete object (id > 0) before training"


def hold_out(samples: list[Sample], fraction: float, seed: int = 0, keep: dict[str, list[int]] | None = None) -> int:
    """Hold a random ``fraction`` of all annotated objects (rounded half up; at least one when
    there are three or more, none with fewer) out of the foreground loss, setting each sample's
    ``heldout`` ids; returns how many.

    The foreground head learns annotated against unlabeled pixels, and unlabeled objects are among
    the negatives: with enough steps it learns *which* objects were annotated, and its probability
    on them (c) overstates what it gives an object it has not seen. Its mean on objects it never
    learned from calibrates the threshold for the objects a user wants found (Elkan & Noto 2008
    estimate c on held-out positives for this reason). Held-out objects still train everything else.

    ``keep`` (:func:`heldout_objects` of the run being resumed): those objects stay held out and no
    other is, so an object trained on before never becomes a held-out one when more are painted.
    """
    present = [np.unique(smp.labels[smp.labels > 0]) for smp in samples]  # zooming can lose a tiny object
    ids = [(i, j) for i, p in enumerate(present) for j in p]
    n = len(ids)
    if keep and fraction > 0 and n >= 3:
        for smp, p in zip(samples, present):
            wanted = np.flatnonzero(np.isin(smp.ids, keep.get(smp.name, []))) + 1
            smp.heldout = np.intersect1d(wanted, p).astype(np.int64)
        kept = sum(len(smp.heldout) for smp in samples)
        if 0 < kept < n:
            return kept
    k = 0 if n < 3 or fraction <= 0 else max(1, min(n - 1, int(np.floor(fraction * n + 0.5))))
    chosen = np.random.default_rng(seed).permutation(n)[:k]
    for i, smp in enumerate(samples):
        smp.heldout = np.array(sorted(int(ids[c][1]) for c in chosen if ids[c][0] == i), dtype=np.int64)
    return k


def heldout_objects(samples: list[Sample]) -> dict[str, list[int]]:
    """The held-out objects by image name, with the user's ids (stored in the model for resuming)."""
    return {smp.name: [int(smp.ids[j - 1]) for j in smp.heldout] for smp in samples if len(smp.heldout)}


def require_objects(labels: list[np.ndarray], background_id: int | None = None) -> None:
    """Raise the error training would raise when no label image holds an object (a quick check
    that a caller can make before it starts training elsewhere)."""
    if not any(np.any((lab != 0) & (lab != (0 if background_id is None else background_id))) for lab in labels):
        raise SparseSegError(NO_OBJECT)


def _pad_to(arr: np.ndarray, shape: tuple[int, ...], value=0, mode="constant") -> np.ndarray:
    pad = [(0, 0)] * (arr.ndim - len(shape)) + [(0, max(0, s - a)) for a, s in zip(arr.shape[-len(shape):], shape)]
    if all(p == (0, 0) for p in pad):
        return arr
    if mode == "reflect":
        return np.pad(arr, pad, mode="reflect")
    return np.pad(arr, pad, mode="constant", constant_values=value)


def _zoom_crop(img: np.ndarray, lab: np.ndarray, val: np.ndarray, patch: tuple[int, ...]):
    """Resize a crop to ``patch`` in y/x: the image bilinearly, labels and mask by nearest neighbour."""
    size = list(patch[-2:])
    t = torch.from_numpy(np.ascontiguousarray(img, np.float32))
    t = t.reshape(1, -1, *t.shape[-2:])
    img = F.interpolate(t, size=size, mode="bilinear", align_corners=False).reshape(*img.shape[:-2], *size).numpy()
    both = torch.from_numpy(np.stack([lab.astype(np.float64), val.astype(np.float64)]))
    both = both.reshape(1, -1, *both.shape[-2:])
    both = F.interpolate(both, size=size, mode="nearest-exact").reshape(2, *lab.shape[:-2], *size).numpy()
    return img, both[0].astype(np.int64), both[1] > 0.5


def elastic_fields(shape: tuple[int, ...], rng: np.random.Generator, alpha: float = 8.0, grid: int = 4):
    """Smooth random displacement fields (one per axis, in pixels), from a coarse random grid."""
    coarse = rng.normal(0, alpha, size=(len(shape),) + (grid,) * len(shape))
    zoom = [s / grid for s in shape]
    return [ndimage.zoom(c, zoom, order=3)[tuple(slice(0, s) for s in shape)] for c in coarse]


class CropSampler:
    """Draws augmented training crops around annotated objects (with probability ``p_object``).

    ``zoom_jitter`` J > 1 zooms each crop by a random factor in [1/J, J] (log-uniform, in y/x), so
    the network tolerates objects somewhat larger or smaller than the target diameter (the zoom of a
    new image is estimated, not known). ``object_gain`` >= 1 and ``object_dim`` <= 1 bound the factor
    by which :func:`object_contrast` changes some annotated objects' contrast (1 and 1: never).
    """

    def __init__(
        self,
        samples: list[Sample],
        patch_shape: tuple[int, ...],
        seed: int = 0,
        p_object: float = 0.9,
        elastic: bool = True,
        zoom_jitter: float = 1.0,
        object_gain: float = 1.0,
        object_dim: float = 1.0,
    ):
        self.samples = samples
        self.object_gain = float(object_gain)
        self.object_dim = float(object_dim)
        self.patch = tuple(int(p) for p in patch_shape)
        self.rng = np.random.default_rng(seed)
        self.p_object = p_object
        self.elastic = elastic
        self.zoom_jitter = float(zoom_jitter)
        self.objects = [(i, s) for i, smp in enumerate(samples) for s in smp.objects]

    def crop(self):
        """One crop: image (C, *P) float32, labels (*P) int64, valid (*P) bool, heldout (*P) bool
        (pixels of objects held out of the foreground loss, :func:`hold_out`)."""
        if self.objects and self.rng.random() < self.p_object:
            idx, sl = self.objects[self.rng.integers(len(self.objects))]
            centre = [self.rng.integers(s.start, s.stop) for s in sl]
        else:
            idx = int(self.rng.integers(len(self.samples)))
            centre = [self.rng.integers(0, s) for s in self.samples[idx].labels.shape]
        smp = self.samples[idx]
        jitter = 1.0
        if self.zoom_jitter > 1:
            jitter = float(np.exp(self.rng.uniform(-np.log(self.zoom_jitter), np.log(self.zoom_jitter))))
        # the region that becomes the patch after zooming by ``jitter`` (y/x only)
        region = list(self.patch)
        region[-2:] = [max(4, int(round(p / jitter))) for p in self.patch[-2:]]
        # the chosen pixel lands anywhere in the crop: were it always near the centre, a network with
        # zero padding could learn "the labeled object is the one in the middle" and ignore the rest
        corner = [
            int(np.clip(c - self.rng.integers(0, p), 0, max(0, s - p)))
            for c, p, s in zip(centre, region, smp.labels.shape)
        ]
        sl = tuple(slice(c, c + p) for c, p in zip(corner, region))
        img = _pad_to(smp.image[(slice(None),) + sl], tuple(region), mode="reflect")
        lab = _pad_to(smp.labels[sl], tuple(region))
        val = _pad_to(smp.valid[sl], tuple(region), value=False)
        if tuple(region) != self.patch:
            img, lab, val = _zoom_crop(img, lab, val, self.patch)
        img, lab, val = self._geometric(img, lab, val)
        if self.object_gain > 1 or self.object_dim < 1:
            img = object_contrast(img, lab, self.rng, self.object_gain, low=self.object_dim, skip=smp.heldout)
        held = np.isin(lab, smp.heldout)  # held-out ids are > 0
        return img, relabel_consecutive(lab), val, held

    def _geometric(self, img, lab, val):
        nd = lab.ndim
        for ax in range(nd):
            if self.rng.random() < 0.5:
                img, lab, val = np.flip(img, ax + 1), np.flip(lab, ax), np.flip(val, ax)
        if self.patch[-1] == self.patch[-2]:
            k = int(self.rng.integers(4))
            img = np.rot90(img, k, axes=(-2, -1))
            lab, val = np.rot90(lab, k, axes=(-2, -1)), np.rot90(val, k, axes=(-2, -1))
        if self.elastic and self.rng.random() < 0.5:
            disp = elastic_fields(lab.shape[-2:], self.rng)
            grid = np.meshgrid(*[np.arange(s) for s in lab.shape[-2:]], indexing="ij")
            coords = [g + d for g, d in zip(grid, disp)]

            def warp(a, order, cval=0):
                flat = a.reshape(-1, *a.shape[-2:])
                out = np.stack([ndimage.map_coordinates(p, coords, order=order, mode="reflect" if order else "constant", cval=cval) for p in flat])
                return out.reshape(a.shape)
            img = warp(img, 1)
            lab = warp(lab, 0)
            val = warp(val.astype(np.uint8), 0).astype(bool)
        return np.ascontiguousarray(img), np.ascontiguousarray(lab), np.ascontiguousarray(val)

    def batch(self, size: int):
        """A batch as torch tensors: image (B, C, *P), labels, valid and heldout (B, *P)."""
        crops = [self.crop() for _ in range(size)]
        return tuple(torch.from_numpy(np.stack([c[k] for c in crops])) for k in range(4))


#: share of annotated objects whose contrast :func:`object_contrast` changes
OBJECT_GAIN_P = 0.5
#: the width of :func:`object_contrast`'s bump in object radii
OBJECT_GAIN_SPREAD = 2.0


def object_contrast(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator, gain: float,
                    p: float = OBJECT_GAIN_P, low: float = 1.0, skip=None) -> np.ndarray:
    """``img`` (C, *S) with the contrast to the crop's median changed around some annotated objects
    of ``lab`` (*S), each (with probability ``p``) by its own factor, log-uniform in [low, gain]
    (``low`` <= 1 <= ``gain``). Objects whose ids are in ``skip`` (those held out of the foreground
    loss, whose mean calibrates its threshold) keep their contrast.

    The factor is a smooth bump on the object: a Gaussian at its centroid whose width along each
    axis is :data:`OBJECT_GAIN_SPREAD` times the object's extent there (twice the standard deviation
    of its coordinates, the radius of a disc), so it is nearly flat over the object and its
    neighbours share most of it.

    Why: with a few labeled objects, the positive-unlabeled foreground head learns "as bright as the
    labeled ones" and calls much brighter or dimmer unlabeled objects background (docs/method.md). A
    gain field on the whole crop (:func:`intensity_field`) does not break that: every real bright or
    dim object is unlabeled. Changing the contrast of the labeled objects themselves does, whatever
    the polarity (the contrast is to the median: about the background on sparse images, the tissue
    on dense ones). Dimming stops at ``low`` (a third with ``--object-dim``): an object dimmed to
    the background would teach the head that background can be an object."""
    ids = np.unique(lab)
    ids = ids[ids > 0]
    if skip is not None and len(skip):
        ids = ids[~np.isin(ids, skip)]
    ids = ids[rng.random(ids.size) < p]
    if ids.size == 0:
        return img
    out = img.astype(np.float32, copy=True)
    flat = out.reshape(out.shape[0], -1)
    ref = np.median(flat[:, :: max(1, flat.shape[1] // 4096)], axis=1).reshape((-1,) + (1,) * lab.ndim)
    log_gain = np.zeros(lab.shape, np.float32)
    boxes = ndimage.find_objects(lab)
    for i in ids:
        box = boxes[i - 1]
        coords = np.nonzero(lab[box] == i)  # within the object's box, not the whole crop
        bump = np.float32(rng.uniform(np.log(low), np.log(gain)))
        for ax, c in enumerate(coords):
            width = OBJECT_GAIN_SPREAD * 2 * max(float(c.std()), 0.5)
            t = (np.arange(lab.shape[ax], dtype=np.float32) - (box[ax].start + float(c.mean()))) / width
            shape = [1] * lab.ndim
            shape[ax] = -1
            bump = bump * np.exp(-0.5 * t**2).reshape(shape)
        log_gain += bump
    return ref + np.exp(log_gain) * (out - ref)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    nd = x.ndim - 2
    conv = F.conv2d if nd == 2 else F.conv3d
    for ax in range(nd):
        shape = [1] * nd
        shape[ax] = k.numel()
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - ax)] = pad[2 * (nd - 1 - ax) + 1] = radius
        x = conv(F.pad(x, pad, mode="replicate"), k.reshape(1, 1, *shape).repeat(c, 1, *[1] * nd), groups=c)
    return x


#: log-amplitude (largest standard deviation) and grid of :func:`intensity_field`
FIELD_SIGMA = 0.7
FIELD_GRID = 4


def intensity_field(x: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (B, C, *S) times a smooth random gain field exp(N(0, sigma^2)) interpolated from a
    coarse grid (:data:`FIELD_GRID` nodes per axis, ``sigma`` (B, 1, ...) per crop), the same for
    every channel: neighbouring objects of one crop get different brightness, so the network cannot
    learn that objects are exactly as bright as the few that were labeled."""
    b, nd = x.shape[0], x.ndim - 2
    coarse = torch.randn((b, 1) + (FIELD_GRID,) * nd, generator=generator) * sigma
    mode = "bilinear" if nd == 2 else "trilinear"
    gain = torch.exp(F.interpolate(coarse, size=tuple(x.shape[2:]), mode=mode, align_corners=True))
    return x * gain.to(x.dtype)


def photometric(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent photometric view of a batch (B, C, *S): a smooth gain field
    (:func:`intensity_field`), contrast/brightness and colour jitter, Gaussian blur and additive
    Gaussian noise. Geometry is untouched."""
    b, c = x.shape[:2]
    nd = x.ndim - 2
    shape = (b, 1) + (1,) * nd

    def u(lo, hi, s=shape):
        return lo + (hi - lo) * torch.rand(s, generator=generator)

    x = intensity_field(x, u(0.0, FIELD_SIGMA), generator)
    mean = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
    x = (x - mean) * u(0.7, 1.3) + mean + u(-0.15, 0.15)
    if c > 1:
        x = x * u(0.9, 1.1, (b, c) + (1,) * nd)
    out = []
    for i in range(b):
        xi = x[i : i + 1]
        if torch.rand(1, generator=generator).item() < 0.3:
            xi = _gaussian_blur(xi, float(u(0.5, 1.5, (1,))))
        out.append(xi)
    x = torch.cat(out)
    return x + torch.randn(x.shape, generator=generator) * u(0.0, 0.08)
