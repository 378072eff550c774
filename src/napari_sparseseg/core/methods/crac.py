"""CRAC (Liu et al., SPEC §4) as a training method: two networks of one architecture (a
:class:`..network.TwinNet`), an implicit affinity map from one and an explicit one from the other's
embeddings, supervised on the annotated pixel pairs and supervising each other elsewhere
(:mod:`..crac_loss`). No EMA network; segmentation runs the mutex watershed on the affinities.

As for SPOCO here, the implicit network also predicts a positive-unlabeled foreground logit
(``TrainConfig.foreground``, on by default): the affinities of two unlabeled background pixels are
never annotated, so the background would otherwise come out in pieces (docs/method.md)."""

from __future__ import annotations

from typing import Any

import torch

from ..crac_loss import crac_loss, pair_valid
from ..data import photometric
from ..device import autocast
from ..errors import SparseSegError
from ..losses import affinity_targets, foreground_term
from ..network import TwinNet, set_foreground_prior, split_output
from ..offsets import crac_offsets
from .base import ForegroundConstant, Method


class CracMethod(Method):
    name = "crac"

    @staticmethod
    def default_offsets(ndim: int) -> list[list[int]]:
        return crac_offsets(ndim)

    def __init__(self, config, ndim, channels, offsets, device, autocast_dtype=None, init=None):
        if config.coord_scale:
            raise SparseSegError(f"coord_scale {config.coord_scale:g}: CRAC's networks have no coordinate channels; "
                                 "it applies to SPOCO (--method spoco)")
        super().__init__(config, ndim, channels, offsets, device, autocast_dtype, init)
        if init is not None:
            self.net = init.net
            self.fg = ForegroundConstant.from_config(init.config)
        else:
            self.net = TwinNet(ndim, channels, 16, len(offsets), config.base_channels, config.depth,
                               padding_mode=config.padding_mode, foreground=config.foreground)
            self.fg = ForegroundConstant()
        self.net.to(device).train()

    @property
    def networks(self) -> dict[str, torch.nn.Module]:
        return {"f": self.net}

    def start_heads(self, foreground):
        set_foreground_prior(self.net, foreground)

    def losses(self, image, labels, valid, generator, progress, heldout=None):
        x = photometric(image, generator).to(self.device)
        with autocast(self.device, self.autocast_dtype):
            out = self.net(x)
        emb, fg, iam = split_output(out.float(), self.net.config)
        target, annotated = affinity_targets(labels, valid, self.offsets)
        terms = crac_loss(iam, emb, target, annotated, pair_valid(valid, self.offsets), self.offsets,
                          self.config.crac, progress)
        if fg is not None:
            fg_valid = valid if heldout is None else valid & ~heldout
            terms["foreground"] = foreground_term(fg, labels, fg_valid)
            terms["loss"] = terms["loss"] + self.config.crac.w_foreground * terms["foreground"]
            self.fg.update(fg, labels, valid, heldout)
        return terms

    def model_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name, "network": self.net.config, "loss": self.config.crac.to_dict()}
        if self.net.config.get("foreground"):
            out["foreground"] = self.fg.to_config()
        return out
