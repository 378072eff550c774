"""CRAC's loss (Liu et al., SPEC §4): affinities supervised where sparse labels annotate them, and
two affinity maps supervising each other where they are confident.

- IAM: the implicit affinity map, one sigmoid channel per offset, predicted directly.
- EAM: the explicit affinity map, the cosine similarity of embeddings across each offset,
  clamped to [0, 1] (:func:`explicit_affinities`).
- ``L = L_s + lambda L_c``: ``L_s`` the masked MSE of both maps on annotated pairs
  (:func:`..losses.affinity_targets`); ``L_c`` on the unannotated pairs, each map's confident
  pairs (entropy below the ``1 - alpha_t`` quantile) giving the other map its target, with the
  gradient stopped on the target.

The public code's defects (SPEC §4) are absent: long-range z targets use the offset's real length
(:func:`..losses.affinity_targets`), pseudo-targets are detached, and it works in 2D and 3D.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .losses import _pair_slices

#: the confidence quantile is taken over at most about this many pairs; more are subsampled evenly
QUANTILE_SAMPLE = 1 << 16


@dataclass
class CracLossConfig:
    """Hyper-parameters of the CRAC loss; the defaults are the paper's."""

    alpha0: float = 0.05
    power: float = 1.5
    w_cross: float = 0.1  # lambda
    #: not CRAC: the positive-unlabeled foreground head's weight (methods/crac.py)
    w_foreground: float = 1.0
    eps: float = 1e-6

    def __post_init__(self):
        if not 0 <= self.alpha0 < 1:
            raise ValueError(f"alpha0 must be in [0, 1), got {self.alpha0}")

    def to_dict(self) -> dict:
        return asdict(self)


def explicit_affinities(embeddings: torch.Tensor, offsets) -> torch.Tensor:
    """Cosine similarity of the embeddings (B, D, *S) of each pixel pair i, i + o, clamped to
    [0, 1]: (B, K, *S), defined at the first pixel i of each pair (0 where the partner leaves the
    block)."""
    unit = torch.nn.functional.normalize(embeddings, dim=1, eps=1e-8)
    return _CosinePairs.apply(unit, tuple(tuple(int(o) for o in off) for off in offsets))


class _CosinePairs(torch.autograd.Function):
    """The clamped dot products of unit vectors (B, D, *S) across each offset, with a backward
    that adds every offset's gradient into one buffer. Autograd's own backward of the pair slices
    allocates and zero-fills a full-size gradient per slice (two per offset) and sums them: a 3D
    CRAC step took ~620 ms with it on the CPU, ~500 ms with this (docs/method.md, Precision and
    devices)."""

    @staticmethod
    def forward(ctx, unit: torch.Tensor, offsets: tuple) -> torch.Tensor:
        b, _, *spatial = unit.shape
        out = unit.new_zeros((b, len(offsets), *spatial))
        passes = torch.zeros(out.shape, dtype=torch.bool, device=unit.device)
        for k, off in enumerate(offsets):
            if any(abs(o) >= s for o, s in zip(off, spatial)):
                continue
            a, c = _pair_slices(off, spatial)
            cos = (unit[(slice(None), slice(None)) + a] * unit[(slice(None), slice(None)) + c]).sum(1)
            out[(slice(None), k) + a] = cos.clamp(0.0, 1.0)
            passes[(slice(None), k) + a] = (cos >= 0) & (cos <= 1)  # where clamp passes the gradient
        ctx.save_for_backward(unit, passes)
        ctx.offsets = offsets
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        unit, passes = ctx.saved_tensors
        spatial = unit.shape[2:]
        grad = torch.zeros_like(unit)
        g = grad_out * passes
        for k, off in enumerate(ctx.offsets):
            if any(abs(o) >= s for o, s in zip(off, spatial)):
                continue
            a, c = _pair_slices(off, spatial)
            ia, ic = (slice(None), slice(None)) + a, (slice(None), slice(None)) + c
            gk = g[(slice(None), slice(k, k + 1)) + a]
            grad[ia] += gk * unit[ic]
            grad[ic] += gk * unit[ia]
        return grad, None


def pair_valid(valid: torch.Tensor, offsets) -> torch.Tensor:
    """(B, K, *S): both pixels of the pair i, i + o lie in the block and are not ignored."""
    b, *spatial = valid.shape
    out = torch.zeros((b, len(offsets), *spatial), dtype=torch.bool, device=valid.device)
    for k, off in enumerate(offsets):
        if any(abs(o) >= s for o, s in zip(off, spatial)):
            continue
        a, c = _pair_slices(off, spatial)
        out[(slice(None), k) + a] = valid[(slice(None),) + a] & valid[(slice(None),) + c]
    return out


def alpha_schedule(progress: float, alpha0: float = 0.05, power: float = 1.5) -> float:
    """alpha_t = alpha0 (1 - t/T)^p, ``progress`` = t/T in [0, 1] (with a time budget: the
    fraction of the budget spent)."""
    return float(alpha0 * (1.0 - min(max(progress, 0.0), 1.0)) ** power)


def entropy(a: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Binary entropy -a log a - (1 - a) log(1 - a) (nats)."""
    a = a.clamp(eps, 1 - eps)
    return -(a * a.log() + (1 - a) * (1 - a).log())


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation between the two nearest order
    statistics) of a 1D tensor by two selections (``kthvalue``) instead of a full sort: the same
    number, ~9x faster on a million values on the CPU, where the sort took a sixth of a CRAC step."""
    n = values.numel()
    pos = q * (n - 1)
    lo = int(pos)
    a = torch.kthvalue(values, lo + 1).values
    if lo + 1 >= n or pos == lo:
        return a
    b = torch.kthvalue(values, lo + 2).values
    return a + (b - a) * (pos - lo)


def confident(a: torch.Tensor, region: torch.Tensor, alpha: float) -> torch.Tensor:
    """The pairs of ``region`` whose entropy lies below the (1 - alpha) quantile of the entropies
    in ``region`` (over the batch): the map's confident part. ``alpha`` = 0 keeps all of it.

    The binary entropy falls as ``|a - 1/2|`` grows, so the pairs kept are those whose distance
    from 1/2 reaches the alpha quantile of the distances: the same set, without a logarithm. The
    quantile is taken on an even subsample of at most ``QUANTILE_SAMPLE`` pairs of the region
    (its rank is then off by about 1e-3): selecting the region's values from every pair of a 3D
    batch took a sixth of a CRAC step on the CPU."""
    if alpha <= 0:
        return region
    d = (a.detach() - 0.5).abs()
    flat_d, flat_r = d.reshape(-1), region.reshape(-1)
    step = flat_d.numel() // QUANTILE_SAMPLE + 1
    step += 1 - step % 2  # odd: an even stride could follow one column of the crop
    values = flat_d[::step][flat_r[::step]]
    if values.numel() == 0:  # a region sparser than the stride
        values = flat_d[flat_r]
    if values.numel() == 0:
        return region
    q = quantile(values.float(), alpha)
    return region & (d >= q)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def supervised_term(a: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """L_s for one map: mean squared error on the annotated pairs."""
    return _masked_mean((a - target) ** 2, annotated)


def cross_term(a_iam: torch.Tensor, a_eam: torch.Tensor, region: torch.Tensor, alpha: float) -> torch.Tensor:
    """L_c: on the unannotated ``region``, EAM's confident pairs supervise IAM and IAM's confident
    pairs supervise EAM; each target is detached (no gradient flows into a pseudo-target)."""
    conf_iam = confident(a_iam, region, alpha)
    conf_eam = confident(a_eam, region, alpha)
    return (_masked_mean((a_iam - a_eam.detach()) ** 2, conf_eam)
            + _masked_mean((a_eam - a_iam.detach()) ** 2, conf_iam))


def crac_loss(iam_logits: torch.Tensor, embeddings: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
              valid_pairs: torch.Tensor, offsets, config: CracLossConfig, progress: float) -> dict[str, torch.Tensor]:
    """Every term and the total ``loss``: ``iam_logits`` (B, K, *S), ``embeddings`` (B, D, *S),
    ``target``/``annotated`` from :func:`..losses.affinity_targets`, ``valid_pairs`` from
    :func:`pair_valid`; ``progress`` = t/T sets alpha_t."""
    a_iam = torch.sigmoid(iam_logits)
    a_eam = explicit_affinities(embeddings, offsets)
    s_iam = supervised_term(a_iam, target, annotated)
    s_eam = supervised_term(a_eam, target, annotated)
    alpha = alpha_schedule(progress, config.alpha0, config.power)
    cross = cross_term(a_iam, a_eam, valid_pairs & ~annotated, alpha)
    return {"supervised_iam": s_iam, "supervised_eam": s_eam, "cross": cross,
            "loss": s_iam + s_eam + config.w_cross * cross}
