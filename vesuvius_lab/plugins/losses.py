"""Loss plugins. Every loss ignores voxels where ``valid`` is False (the ignore label).

Contract (see :mod:`vesuvius_lab.core.registry`): the factory returns a callable
``(logits (B, C, D, H, W), target (B, 1, D, H, W) in {0, 1}, valid bool) -> scalar``.
C = 1 means a sigmoid model; C = 2 a softmax model whose channel 1 is the surface.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from vesuvius_lab.core.registry import plugin


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def surface_probability(logits):
    """Per-voxel surface probability (B, 1, ...) from 1-channel (sigmoid) or 2-channel (softmax) logits."""
    import torch

    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)[:, 1:2]


class DiceParams(_Params):
    smooth: float = Field(1.0, ge=0, description="Added to numerator and denominator.")
    batch: bool = Field(True, description="Sum over the whole batch (nnU-Net's batch Dice) rather than per sample.")


@plugin(DiceParams)
def dice(params: DiceParams, **context):
    """Soft Dice loss on the surface probability, over valid voxels."""

    def loss(logits, target, valid):
        prob = surface_probability(logits.float()) * valid
        target = target.float() * valid
        dims = tuple(range(0 if params.batch else 1, prob.ndim))
        intersection = (prob * target).sum(dims)
        total = prob.sum(dims) + target.sum(dims)
        return (1 - (2 * intersection + params.smooth) / (total + params.smooth)).mean()

    return loss


class BCEParams(_Params):
    pos_weight: float = Field(1.0, gt=0, description="Weight of positive (surface) voxels.")


@plugin(BCEParams)
def bce(params: BCEParams, **context):
    """Binary cross-entropy with logits, averaged over valid voxels (1-channel models)."""
    import torch
    import torch.nn.functional as F

    def loss(logits, target, valid):
        if logits.shape[1] != 1:
            raise ValueError("bce needs a 1-channel model; use the 'ce' loss for 2-channel models")
        pos_weight = torch.tensor(params.pos_weight, device=logits.device)
        per_voxel = F.binary_cross_entropy_with_logits(
            logits.float(), target.float(), pos_weight=pos_weight, reduction="none")
        valid = valid.float()
        return (per_voxel * valid).sum() / valid.sum().clamp_min(1.0)

    return loss
