"""SPOCO loss terms (Wolny et al., CVPR 2022), vectorised in plain torch.

Every term works on one image at a time: ``emb`` is (D, N) (a flattened crop), ``labels`` is (N,)
with 0 = unlabeled and 1..C = annotated objects (complete), ``valid`` is (N,) bool (False = ignored).
:func:`spoco_loss` applies them over a batch and returns every term, so each can be logged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

EPS = 1e-6


@dataclass
class SpocoLossConfig:
    """Hyper-parameters of the SPOCO loss; the defaults are the paper's."""

    delta_var: float = 0.5
    delta_dist: float = 2.0
    kernel_threshold: float = 0.9
    anchor: str = "pixel"  # "pixel": an embedding sampled inside the object (paper); "mean": mu_k (official code)
    w_pull: float = 1.0
    w_push: float = 1.0
    w_reg: float = 0.001
    w_obj: float = 1.0
    w_unlabeled_push: float = 1.0
    w_consistency: float = 1.0
    w_foreground: float = 1.0
    w_affinity: float = 1.0
    max_anchors: int = 20
    min_uncovered: float = 0.05

    def __post_init__(self):
        if not 0 < self.kernel_threshold < 1:
            raise ValueError(f"kernel_threshold must be in (0, 1), got {self.kernel_threshold}")
        if self.anchor not in ("pixel", "mean"):
            raise ValueError(f"anchor must be 'pixel' or 'mean', got {self.anchor!r}")

    @property
    def sigma2(self) -> float:
        """Kernel width so that exp(-dv^2 / (2 s^2)) = t: s^2 = -dv^2 / (2 ln t)."""
        return -self.delta_var**2 / (2 * math.log(self.kernel_threshold))

    def to_dict(self) -> dict:
        return asdict(self)


def dice_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """D(S, I) = 1 - 2 sum(S I) / (sum S^2 + sum I^2), over the last axis (one value per row)."""
    num = 2 * (pred * target).sum(-1)
    den = (pred * pred).sum(-1) + (target * target).sum(-1)
    return 1 - num / den.clamp_min(EPS)


def sq_distances(anchors: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """||a_k - e_i||^2 for ``anchors`` (K, D) and ``emb`` (D, N) -> (K, N), via one matmul."""
    d2 = (anchors**2).sum(1)[:, None] - 2 * anchors @ emb + (emb**2).sum(0)[None]
    return d2.clamp_min(0)


def kernel(emb: torch.Tensor, anchors: torch.Tensor, sigma2: float) -> torch.Tensor:
    """Soft masks exp(-||e_i - a_k||^2 / (2 s^2)): ``emb`` (D, N), ``anchors`` (K, D) -> (K, N)."""
    return torch.exp(-sq_distances(anchors, emb) / (2 * sigma2))


def instance_means(emb: torch.Tensor, labels: torch.Tensor, n_objects: int):
    """Mean embedding mu_k (C, D) and pixel count N_k (C,) of objects 1..C, by index_add."""
    obj = labels > 0
    idx = labels[obj] - 1
    counts = torch.zeros(n_objects, device=emb.device, dtype=emb.dtype).index_add_(
        0, idx, torch.ones_like(idx, dtype=emb.dtype)
    )
    sums = torch.zeros(n_objects, emb.shape[0], device=emb.device, dtype=emb.dtype).index_add_(
        0, idx, emb[:, obj].t()
    )
    return sums / counts.clamp_min(1)[:, None], counts


def pull_term(emb, labels, mu, counts, delta_var: float) -> torch.Tensor:
    """1/C sum_k 1/N_k sum_{i in k} [||mu_k - e_i|| - dv]_+^2."""
    obj = labels > 0
    idx = labels[obj] - 1
    dist = torch.norm(emb[:, obj].t() - mu[idx], dim=1)
    hinge = torch.clamp(dist - delta_var, min=0) ** 2
    per_obj = torch.zeros_like(counts).index_add_(0, idx, hinge) / counts.clamp_min(1)
    return per_obj.mean()


def push_term(mu: torch.Tensor, delta_dist: float) -> torch.Tensor:
    """1/(C(C-1)) sum_{k != l} [2 dd - ||mu_k - mu_l||]_+^2 (0 for fewer than two objects)."""
    c = mu.shape[0]
    if c < 2:
        return mu.sum() * 0
    diff = mu[:, None] - mu[None]
    # the epsilon keeps the gradient of the norm finite on the (masked) diagonal
    dist = torch.sqrt((diff**2).sum(-1) + EPS)
    hinge = torch.clamp(2 * delta_dist - dist, min=0) ** 2
    off_diag = ~torch.eye(c, dtype=torch.bool, device=mu.device)
    return hinge[off_diag].sum() / (c * (c - 1))


def reg_term(mu: torch.Tensor) -> torch.Tensor:
    """1/C sum_k ||mu_k||."""
    return torch.norm(mu, dim=1).mean()


def sample_in_objects(labels: torch.Tensor, n_objects: int, generator=None) -> torch.Tensor:
    """Index of one pixel drawn uniformly inside each object 1..C (no loop over pixels)."""
    obj = torch.nonzero(labels > 0).squeeze(1)
    score = torch.rand(obj.shape[0], generator=generator, device="cpu").to(labels.device)
    # the pixel with the largest random score in each object is a uniform draw from it
    best = torch.full((n_objects,), -1.0, device=labels.device).scatter_reduce(
        0, labels[obj] - 1, score, reduce="amax"
    )
    is_best = score == best[labels[obj] - 1]
    chosen = torch.zeros(n_objects, dtype=torch.long, device=labels.device)
    chosen[labels[obj][is_best] - 1] = obj[is_best]
    return chosen


def object_term(emb, labels, valid, mu, n_objects: int, cfg: SpocoLossConfig, generator=None) -> torch.Tensor:
    """Differentiable instance selection: 1/C sum_k Dice(S_k, I_k), S_k from the Gaussian kernel."""
    if cfg.anchor == "mean":
        anchors = mu
    else:
        anchors = emb[:, sample_in_objects(labels, n_objects, generator)].t()
    masks = kernel(emb[:, valid], anchors, cfg.sigma2)
    ids = torch.arange(1, n_objects + 1, device=labels.device)
    target = (labels[valid][None] == ids[:, None]).to(emb.dtype)
    return dice_loss(masks, target).mean()


def unlabeled_push_term(emb, unlabeled, mu, delta_dist: float) -> torch.Tensor:
    """1/C sum_k 1/|U| sum_{i in U} [dd - ||mu_k - e_i||]_+^2."""
    if not unlabeled.any():
        return mu.sum() * 0
    dist = torch.sqrt(sq_distances(mu, emb[:, unlabeled]) + EPS)
    return (torch.clamp(delta_dist - dist, min=0) ** 2).mean()


def consistency_term(emb_f, emb_g, unlabeled, valid, cfg: SpocoLossConfig, generator=None) -> torch.Tensor:
    """Embedding consistency: 1/K sum_k Dice(S^f_k, stopgrad(S^g_k)) over anchors sampled from U.

    Anchors are drawn one at a time from the still-uncovered part of U; the pixels within dv of an
    anchor (in f or g) are then covered. Sampling stops at ``max_anchors`` or when less than
    ``min_uncovered`` of U is left.
    """
    n_unl = int(unlabeled.sum())
    if n_unl == 0:
        return emb_f.sum() * 0
    ef, eg = emb_f[:, valid], emb_g[:, valid].detach()
    uncovered = unlabeled[valid].clone()
    anchors = []
    dv2 = cfg.delta_var**2
    with torch.no_grad():
        ef_d = ef.detach()
        nf, ng = (ef_d**2).sum(0), (eg**2).sum(0)

        def near(e, n, a):
            return n - 2 * (e[:, a] @ e) + n[a] < dv2

        while len(anchors) < cfg.max_anchors and int(uncovered.sum()) > cfg.min_uncovered * n_unl:
            cand = torch.nonzero(uncovered).squeeze(1)
            a = cand[torch.randint(cand.shape[0], (1,), generator=generator).item()]
            anchors.append(a)
            uncovered &= ~(near(ef_d, nf, a) | near(eg, ng, a))
            uncovered[a] = False
    idx = torch.stack(anchors)
    sf = kernel(ef, ef[:, idx].t(), cfg.sigma2)
    sg = kernel(eg, eg[:, idx].t(), cfg.sigma2)
    return dice_loss(sf, sg).mean()


def foreground_term(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Annotated (> 0) against unlabeled pixels, binary cross-entropy on the logits (B, *S).

    Not a SPOCO term: a positive-unlabeled "non-traditional" classifier (Elkan & Noto, KDD 2008).
    Annotated objects are picked at random among all objects, so the classifier's probability is
    c * P(object | pixel), c being its mean over annotated pixels; P > 1/2 (a foreground mask that
    separates unlabeled background from unlabeled objects) is then probability > c / 2. c is
    estimated on annotated objects left out of this term (``valid`` False on them; data.hold_out).
    """
    target = (labels > 0).to(logits.dtype)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    v = valid.to(logits.dtype)
    return (loss * v).sum() / v.sum().clamp_min(1)


def _pair_slices(offset, spatial):
    """Slices (a, b) of a spatial block so that a[i] and b[i] are the pixel pair i, i + offset."""
    a = tuple(slice(max(0, -o), s - max(0, o)) for o, s in zip(offset, spatial))
    b = tuple(slice(max(0, o), s - max(0, -o)) for o, s in zip(offset, spatial))
    return a, b


def affinity_targets(labels: torch.Tensor, valid: torch.Tensor, offsets) -> tuple[torch.Tensor, torch.Tensor]:
    """Affinity labels from sparse labels (B, *S): for each offset o, target 1 where pixel i and
    i + o carry the same object id, and a mask of the pairs the labels say something about.

    The unlabeled region counts as one more id; a pair is annotated when at least one of its pixels
    lies in an annotated object (objects are complete, so its partner is known to be in it or not)
    and both are valid. Pairs leaving the crop are not annotated. Returns (target, mask), each
    (B, K, *S), defined at the first pixel i of each pair.
    """
    spatial = labels.shape[1:]
    target = torch.zeros((labels.shape[0], len(offsets)) + tuple(spatial), dtype=torch.float32, device=labels.device)
    mask = torch.zeros(target.shape, dtype=torch.bool, device=labels.device)
    for k, off in enumerate(offsets):
        if any(abs(o) >= s for o, s in zip(off, spatial)):
            continue
        a, b = _pair_slices(off, spatial)
        la, lb = labels[(slice(None),) + a], labels[(slice(None),) + b]
        va, vb = valid[(slice(None),) + a], valid[(slice(None),) + b]
        target[(slice(None), k) + a] = ((la == lb) & (la > 0)).float()
        mask[(slice(None), k) + a] = ((la > 0) | (lb > 0)) & va & vb
    return target, mask


def foreground_prior(labels: torch.Tensor, valid: torch.Tensor, heldout: torch.Tensor) -> float:
    """The annotated share of the pixels :func:`foreground_term` sees on a batch (B, *S) (valid,
    not held out): what its classifier outputs where it has learned nothing else."""
    seen = valid & ~heldout
    return float(((labels > 0) & seen).sum()) / max(1, int(seen.sum()))


def affinity_term(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of affinity logits (B, K, *S) on the annotated pairs, each offset
    weighted equally (long offsets have fewer pairs)."""
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    m = mask.to(logits.dtype)
    dims = (0,) + tuple(range(2, logits.ndim))
    per_offset = (loss * m).sum(dims) / m.sum(dims).clamp_min(1)
    present = m.sum(dims) > 0
    return per_offset[present].mean() if bool(present.any()) else logits.sum() * 0


TERMS = ("pull", "push", "reg", "obj", "unlabeled_push", "consistency", "foreground", "affinity")


def spoco_loss(
    emb_f: torch.Tensor,
    emb_g: torch.Tensor | None,
    labels: torch.Tensor,
    valid: torch.Tensor | None = None,
    cfg: SpocoLossConfig | None = None,
    generator: torch.Generator | None = None,
    fg_logits: torch.Tensor | None = None,
    aff_logits: torch.Tensor | None = None,
    offsets: list[list[int]] | None = None,
    fg_valid: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All SPOCO terms for a batch: ``emb_f``/``emb_g`` (B, D, *S), ``labels`` (B, *S) with
    consecutive ids (0 = unlabeled), ``valid`` (B, *S) bool; ``fg_logits`` (B, *S) adds
    :func:`foreground_term` (0 without) on ``fg_valid`` (default ``valid``: pass it without the
    objects held out of the foreground loss); ``aff_logits`` (B, K, *S) with ``offsets`` adds
    :func:`affinity_term`.

    Returns a dict with every term (averaged over the images that have it) and ``"loss"``, the
    weighted sum. ``emb_g`` (the EMA network's view) may be None: no consistency term then.
    """
    cfg = cfg or SpocoLossConfig()
    b, d = emb_f.shape[:2]
    ef_all = emb_f.reshape(b, d, -1)
    eg_all = None if emb_g is None else emb_g.reshape(b, d, -1)
    lab_all = labels.reshape(b, -1).long()
    val_all = torch.ones_like(lab_all, dtype=torch.bool) if valid is None else valid.reshape(b, -1).bool()
    acc: dict[str, list[torch.Tensor]] = {t: [] for t in TERMS}
    for i in range(b):
        emb, lab, val = ef_all[i], lab_all[i] * val_all[i], val_all[i]
        unlabeled = (lab == 0) & val
        n_obj = int(lab.max())
        if n_obj > 0:
            # ids may skip values after cropping; empty objects get count 0 and are dropped
            mu, counts = instance_means(emb, lab, n_obj)
            present = counts > 0
            if not bool(present.all()):
                remap = torch.cumsum(present.long(), 0)
                lab = torch.where(lab > 0, remap[(lab - 1).clamp_min(0)], lab)
                mu, counts, n_obj = mu[present], counts[present], int(present.sum())
            acc["pull"].append(pull_term(emb, lab, mu, counts, cfg.delta_var))
            acc["push"].append(push_term(mu, cfg.delta_dist))
            acc["reg"].append(reg_term(mu))
            acc["obj"].append(object_term(emb, lab, val, mu, n_obj, cfg, generator))
            acc["unlabeled_push"].append(unlabeled_push_term(emb, unlabeled, mu, cfg.delta_dist))
        if eg_all is not None and cfg.w_consistency > 0:
            acc["consistency"].append(consistency_term(emb, eg_all[i], unlabeled, val, cfg, generator))
    if fg_logits is not None:
        fv = val_all if fg_valid is None else fg_valid.reshape(b, -1).bool()
        acc["foreground"].append(foreground_term(fg_logits.reshape(b, -1), lab_all * fv, fv))
    if aff_logits is not None:
        spatial = labels.shape[1:]
        lab_s, val_s = (lab_all * val_all).reshape(b, *spatial), val_all.reshape(b, *spatial)
        acc["affinity"].append(affinity_term(aff_logits, *affinity_targets(lab_s, val_s, offsets)))
    zero = emb_f.sum() * 0
    out = {t: (torch.stack(v).mean() if v else zero) for t, v in acc.items()}
    weights = dict(
        pull=cfg.w_pull, push=cfg.w_push, reg=cfg.w_reg, obj=cfg.w_obj,
        unlabeled_push=cfg.w_unlabeled_push, consistency=cfg.w_consistency, foreground=cfg.w_foreground,
        affinity=cfg.w_affinity,
    )
    out["loss"] = sum(weights[t] * out[t] for t in TERMS)
    return out
