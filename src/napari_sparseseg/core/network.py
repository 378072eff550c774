"""Embedding networks: a plain 2D/3D U-Net that records its own constructor arguments."""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

import torch
from torch import nn


class SliceConv3d(nn.Conv3d):
    """A Conv3d (same parameters, same state dict) that on the CPU computes a kz x ky x kx
    convolution as one 2D convolution of each output z-slice's kz input slices stacked as
    channels (kz * C_in -> C_out). PyTorch's CPU conv3d kernels are several times slower per
    operation than its conv2d ones for the small channel counts of these networks (torch 2.13,
    1 thread, 8 -> 8 channels on 32x64x64: forward 1.39 s vs 0.19 s, forward + backward 3.9 s vs
    0.8 s). One stacked conv2d instead of kz summed ones made a 3D training step 22-39 % faster
    under bfloat16 (nuclei 3D 502 -> 389 ms, ovule 573 -> 349 ms; docs/method.md); on GPUs the
    native conv3d is used."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.groups != 1 or self.stride != (1, 1, 1) or self.dilation != (1, 1, 1):
            return super().forward(x)
        if any(self.padding):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = nn.functional.pad(x, self._reversed_padding_repeated_twice, mode=mode)
        b, c, zp, yp, xp = x.shape
        kz = self.kernel_size[0]
        z = zp - kz + 1
        xt = x.transpose(1, 2)  # (B, Z, C, Y, X): a z-slice's channels are contiguous
        stacked = torch.cat([xt[:, dz:dz + z] for dz in range(kz)], 2)
        # weight (C_out, C_in, kz, ky, kx) -> (C_out, kz * C_in, ky, kx), in the order of the stack
        w = self.weight.transpose(1, 2).reshape(self.out_channels, kz * c, *self.kernel_size[1:])
        out = nn.functional.conv2d(stacked.reshape(b * z, kz * c, yp, xp), w, self.bias)
        return out.reshape(b, z, self.out_channels, *out.shape[-2:]).transpose(1, 2)


def _conv(ndim: int):
    return nn.Conv2d if ndim == 2 else SliceConv3d


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class ConvBlock(nn.Module):
    """Two 3x3(x3) convolutions, each followed by GroupNorm and ReLU."""

    def __init__(self, ndim: int, cin: int, cout: int, padding_mode: str = "zeros"):
        super().__init__()
        conv = _conv(ndim)
        self.block = nn.Sequential(
            conv(cin, cout, 3, padding=1, bias=False, padding_mode=padding_mode),
            nn.GroupNorm(_groups(cout), cout),
            nn.ReLU(inplace=True),
            conv(cout, cout, 3, padding=1, bias=False, padding_mode=padding_mode),
            nn.GroupNorm(_groups(cout), cout),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UNet(nn.Module):
    """A dense U-Net producing ``out_channels`` embedding channels without output activation.

    ``config`` holds every constructor argument, so ``UNet(**net.config)`` rebuilds the network
    (that is how checkpoints are restored, without pickling code).
    """

    def __init__(
        self,
        ndim: int = 2,
        in_channels: int = 1,
        out_channels: int = 16,
        base_channels: int = 16,
        depth: int = 4,
        anisotropic: bool = False,
        coord_scale: float = 0.0,
        padding_mode: str = "zeros",
        foreground: bool = False,
        affinities: int = 0,
    ):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"UNet: ndim must be 2 or 3, got {ndim}")
        self.config: dict[str, Any] = dict(
            ndim=ndim,
            in_channels=in_channels,
            out_channels=out_channels,
            base_channels=base_channels,
            depth=depth,
            anisotropic=anisotropic,
            coord_scale=coord_scale,
            padding_mode=padding_mode,
            foreground=foreground,
            affinities=affinities,
        )
        self.ndim = ndim
        self.coord_scale = float(coord_scale)
        conv = _conv(ndim)
        # In anisotropic 3D stacks (few z slices) the first pooling keeps z.
        pool = (1, 2, 2) if (ndim == 3 and anisotropic) else 2
        self.pool_factors = [pool if i == 0 else 2 for i in range(depth - 1)]
        chans = [base_channels * 2**i for i in range(depth)]
        self.encoders = nn.ModuleList()
        self.pools = nn.ModuleList()
        cin = in_channels
        for i, c in enumerate(chans):
            self.encoders.append(ConvBlock(ndim, cin, c, padding_mode))
            cin = c
        pool_cls = nn.MaxPool2d if ndim == 2 else nn.MaxPool3d
        for f in self.pool_factors:
            self.pools.append(pool_cls(f))
        self.upsamples = nn.ModuleList()
        self.decoders = nn.ModuleList()
        up_cls = nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d
        for i in reversed(range(depth - 1)):
            f = self.pool_factors[i]
            self.upsamples.append(up_cls(chans[i + 1], chans[i], kernel_size=f, stride=f))
            self.decoders.append(ConvBlock(ndim, 2 * chans[i], chans[i], padding_mode))
        # one more channel with foreground: a logit of "inside an annotated object" (losses.foreground_term);
        # ``affinities`` more: logits of "same object" for the pixel pairs of each offset (losses.affinity_term)
        self.head = conv(chans[0], out_channels + int(foreground) + affinities, 1)

    @property
    def divisor(self) -> tuple[int, ...]:
        """Each spatial input size must be a multiple of this (per axis)."""
        div = [1] * self.ndim
        for f in self.pool_factors:
            fs = (f,) * self.ndim if isinstance(f, int) else f
            div = [d * s for d, s in zip(div, fs)]
        return tuple(div)

    def coordinates(self, shape, origin=None, device=None, dtype=None) -> torch.Tensor:
        """(ndim, *shape) pixel coordinates times ``coord_scale``, counted from ``origin``
        (default: the centre of the block, so a training crop is centred on 0)."""
        if origin is None:
            origin = [-(s // 2) for s in shape]
        axes = [(torch.arange(s, device=device, dtype=dtype) + o) * self.coord_scale for s, o in zip(shape, origin)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"))

    def forward(self, x: torch.Tensor, origin=None) -> torch.Tensor:
        """Embeddings of ``x`` (B, C, *S) -> (B, out_channels, *S), followed by the foreground logit
        when the network has one (split them with :func:`split_output`). With ``coord_scale`` > 0
        the pixel coordinates are added to the first ``ndim`` channels ("spatial embeddings"):
        separate objects then start apart and the network learns to pull each object together.
        ``origin`` places a tile in its image."""
        out = self._unet(x).float()  # float32 also under autocast: coordinates need its precision
        if self.coord_scale:
            grid = self.coordinates(out.shape[2:], origin, out.device, out.dtype)
            out = torch.cat([out[:, : self.ndim] + grid[None], out[:, self.ndim :]], dim=1)
        return out

    def encoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's output at every level, finest first (B, channels, *S / 2^level): what the
        size model reads (:mod:`.scale`)."""
        out = []
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            out.append(x)
            if i < len(self.pools):
                x = self.pools[i](x)
        return out

    def _unet(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            if i < len(self.pools):
                skips.append(x)
                x = self.pools[i](x)
        for up, dec in zip(self.upsamples, self.decoders):
            x = up(x)
            x = dec(torch.cat([skips.pop(), x], dim=1))
        return self.head(x)


class Outputs(NamedTuple):
    """A network output split by role: embeddings (B, D, *S), foreground logit (B, *S) or None,
    affinity logits (B, K, *S) or None."""

    embeddings: torch.Tensor
    foreground: torch.Tensor | None
    affinities: torch.Tensor | None


def split_output(out: torch.Tensor, config: dict[str, Any]) -> Outputs:
    """Split a network output (B, D [+1] [+K], *S) into its :class:`Outputs`."""
    d = config["out_channels"]
    fg = bool(config.get("foreground"))
    k = int(config.get("affinities", 0))
    # torch.split, not slicing: its backward concatenates the parts' gradients, where each
    # slice's backward would allocate and zero-fill a gradient the size of the whole output
    sizes = [d, int(fg), k]
    rest = out.shape[1] - sum(sizes)
    parts = torch.split(out, sizes + [rest] if rest > 0 else sizes, dim=1)
    return Outputs(parts[0], parts[1].squeeze(1) if fg else None, parts[2] if k else None)


class TwinNet(nn.Module):
    """CRAC's two networks of one architecture (SPEC §4): ``eam`` predicts ``out_channels``
    embeddings (whose cosine similarities across each offset are the explicit affinity map) and
    ``iam`` one affinity logit per offset (the implicit affinity map). The output is the
    embeddings followed by the affinity logits, so :func:`split_output` splits it like a UNet's
    with an affinity head. With ``foreground``, ``iam`` also predicts the foreground logit
    (positive-unlabeled, as SPOCO's head here), placed between the two as :func:`split_output` expects."""

    def __init__(self, ndim: int = 2, in_channels: int = 1, out_channels: int = 16, affinities: int = 8,
                 base_channels: int = 16, depth: int = 4, anisotropic: bool = False,
                 padding_mode: str = "zeros", foreground: bool = False, kind: str = "twin"):
        super().__init__()
        if affinities < 1:
            raise ValueError(f"affinities must be >= 1, got {affinities}")
        common = dict(ndim=ndim, in_channels=in_channels, base_channels=base_channels, depth=depth,
                      anisotropic=anisotropic, padding_mode=padding_mode)
        self.eam = UNet(out_channels=out_channels, **common)
        self.iam = UNet(out_channels=affinities, foreground=foreground, **common)
        self.ndim = ndim
        self.affinities = affinities
        self.foreground = foreground
        self.config = {"kind": "twin", "out_channels": out_channels, "affinities": affinities,
                       "foreground": foreground, **common}

    @property
    def divisor(self) -> tuple[int, ...]:
        return self.eam.divisor

    def forward(self, x: torch.Tensor, origin=None) -> torch.Tensor:
        iam = self.iam(x)  # K affinity logits [, foreground logit]
        k = self.affinities
        return torch.cat([self.eam(x), iam[:, k:], iam[:, :k]], dim=1)

    def encoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.eam.encoder_features(x)


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-3), 1 - 1e-3)
    return math.log(p / (1 - p))


@torch.no_grad()
def set_foreground_prior(net: nn.Module, prior: float) -> None:
    """Start the foreground logit of a fresh network at the log-odds of ``prior``, the annotated
    share of the pixels its loss sees: the prior initialisation of Lin et al. (ICCV 2017) for a
    head trained by cross-entropy. Started at probability 1/2, a head spends its first hundreds of
    Adam steps only moving its bias: in 3D, where a CPU budget buys a few hundred steps, the
    foreground head was still near its starting point when training stopped."""
    unet = net.iam if isinstance(net, TwinNet) else net
    if not unet.config["foreground"]:
        return
    unet.head.bias[unet.config["out_channels"]] = _logit(prior)


def build_network(config: dict[str, Any]) -> nn.Module:
    """Rebuild a network from the ``config`` a previous one recorded (a UNet, or a TwinNet when
    ``config["kind"]`` says so)."""
    if config.get("kind") == "twin":
        return TwinNet(**config)
    return UNet(**config)


def make_ema(net: nn.Module) -> nn.Module:
    """A frozen copy of ``net`` to be updated as its exponential moving average."""
    ema = copy.deepcopy(net)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, momentum: float) -> None:
    """theta_g <- m * theta_g + (1 - m) * theta_f; buffers are copied.

    Call after each optimiser step of ``net``, never during evaluation.
    """
    for pg, pf in zip(ema.parameters(), net.parameters()):
        pg.mul_(momentum).add_(pf.detach(), alpha=1.0 - momentum)
    for bg, bf in zip(ema.buffers(), net.buffers()):
        bg.copy_(bf)
