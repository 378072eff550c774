"""SPOCO (Wolny et al., CVPR 2022) as a training method: a pixel-embedding U-Net f and its EMA
copy g, the SPOCO loss (:func:`..losses.spoco_loss`) with the foreground and affinity heads
(docs/method.md), and the positive-unlabeled constant c of the foreground head."""

from __future__ import annotations

from typing import Any

import torch

from .. import scale as scales
from ..data import photometric
from ..device import autocast
from ..losses import spoco_loss
from ..network import UNet, ema_update, make_ema, set_foreground_prior, split_output
from .base import ForegroundConstant, Method


class SpocoMethod(Method):
    name = "spoco"

    def __init__(self, config, ndim, channels, offsets, device, autocast_dtype=None, init=None):
        super().__init__(config, ndim, channels, offsets, device, autocast_dtype, init)
        if init is not None:
            self.net = init.net
            self.ema = init.ema if init.ema is not None else make_ema(init.net)
            self.fg = ForegroundConstant.from_config(init.config)
        else:
            coord_scale = config.coord_scale if config.coord_scale is not None else scales.coordinate_scale(ndim)
            self.net = UNet(ndim, channels, 16, config.base_channels, config.depth, coord_scale=coord_scale,
                            padding_mode=config.padding_mode, foreground=config.foreground,
                            affinities=len(offsets) if config.affinities else 0)
            self.ema = make_ema(self.net)
            self.fg = ForegroundConstant()
        self.net.to(device).train()
        self.ema.to(device).eval()

    @property
    def networks(self) -> dict[str, torch.nn.Module]:
        return {"f": self.net, "g": self.ema}

    def start_heads(self, foreground):
        set_foreground_prior(self.net, foreground)
        set_foreground_prior(self.ema, foreground)

    def losses(self, image, labels, valid, generator, progress, heldout=None):
        # two photometric views: f sees one, its EMA g the other (the consistency term)
        x_f = photometric(image, generator).to(self.device)
        x_g = photometric(image, generator).to(self.device)
        with autocast(self.device, self.autocast_dtype):
            out_f = self.net(x_f)
            with torch.no_grad():
                out_g = self.ema(x_g)
        # the losses in float32 whatever the network ran in
        emb_f, fg, aff = split_output(out_f.float(), self.net.config)
        emb_g = split_output(out_g.float(), self.net.config).embeddings
        terms = spoco_loss(emb_f, emb_g, labels, valid, self.config.loss, generator, fg_logits=fg,
                           aff_logits=aff, offsets=self.offsets,
                           fg_valid=None if heldout is None else valid & ~heldout)
        if fg is not None:
            self.fg.update(fg, labels, valid, heldout)
        return terms

    def _momentum(self, iteration: int) -> float:
        # ramp up so that g tracks f early on; capped at the configured m (0.999)
        return min(self.config.ema_momentum, (1 + iteration) / (10 + iteration))

    def after_step(self, iteration: int) -> None:
        ema_update(self.ema, self.net, self._momentum(iteration))

    def model_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name, "network": self.net.config, "loss": self.config.loss.to_dict()}
        if self.net.config.get("foreground"):
            out["foreground"] = self.fg.to_config()
        return out
