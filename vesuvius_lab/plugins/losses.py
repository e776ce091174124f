"""Loss plugins. Every loss ignores voxels where ``valid`` is False (the ignore label).

Contract (see :mod:`vesuvius_lab.core.registry`): the factory returns a callable
``(logits (B, C, D, H, W), target (B, 1, D, H, W) in {0, 1}, valid bool) -> scalar``.
C = 1 means a sigmoid model; C = 2 a softmax model whose channel 1 is the surface.

Ignored voxels contribute nothing: logits and targets there are replaced by constants *before*
any arithmetic, so neither their values (even inf or NaN) nor their gradients can leak into the
loss, and the gradient reaching an ignored logit is exactly zero. Losses are computed in float32
with autocast disabled, so they behave the same inside a bf16/fp16 autocast region.
"""

from __future__ import annotations

from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vesuvius_lab.core.registry import plugin


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- shared pieces


def _masked(logits, target, valid):
    """Float32 logits and target with ignored voxels set to 0 (before any arithmetic), and a bool mask."""
    import torch

    valid = valid.bool()
    logits = torch.where(valid, logits.float(), 0.0)
    target = torch.where(valid, target.float(), 0.0)
    return logits, target, valid


def surface_logit(logits):
    """The surface logit (B, 1, ...): the logit itself for 1 channel, ``l1 - l0`` for 2 channels.

    For a 2-channel softmax, ``softmax(l)[1] == sigmoid(l1 - l0)`` exactly, so every binary loss
    below serves both kinds of model.
    """
    if logits.shape[1] == 1:
        return logits
    if logits.shape[1] == 2:
        return logits[:, 1:2] - logits[:, 0:1]
    raise ValueError(f"expected 1 (sigmoid) or 2 (softmax) logit channels, got {logits.shape[1]}")


def surface_probability(logits):
    """Per-voxel surface probability (B, 1, ...) from 1-channel (sigmoid) or 2-channel (softmax) logits."""
    import torch

    return torch.sigmoid(surface_logit(logits))


def _keep(valid, values):
    """``values`` where valid, exactly 0 elsewhere (and a zero gradient there)."""
    import torch

    return torch.where(valid, values, 0.0)


def _valid_mean(per_voxel, valid):
    """Mean over valid voxels (0 when there are none)."""
    valid = valid.expand_as(per_voxel)
    return _keep(valid, per_voxel).sum() / valid.sum().clamp_min(1)


def _float32_loss(compute: Callable) -> Callable:
    """Run ``compute(logits, target, valid)`` on masked float32 inputs with autocast off."""
    import torch

    def loss(logits, target, valid):
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return compute(*_masked(logits, target, valid))

    return loss


def _overlap_counts(logits, target, valid, batch: bool):
    """Soft true positives, false positives and false negatives, summed per sample or per batch."""
    prob = _keep(valid, surface_probability(logits))
    dims = tuple(range(0 if batch else 1, prob.ndim))
    tp = (prob * target).sum(dims)
    fp = (prob * (1 - target)).sum(dims)
    fn = ((1 - prob) * target).sum(dims)  # target is 0 at ignored voxels
    return tp, fp, fn


class _OverlapParams(_Params):
    smooth: float = Field(1.0, ge=0, description="Added to numerator and denominator (keeps empty patches finite).")
    batch: bool = Field(True, description="Count over the whole batch (nnU-Net's batch Dice) rather than per sample.")


# --------------------------------------------------------------------------- overlap losses


class DiceParams(_OverlapParams):
    pass


@plugin(DiceParams)
def dice(params: DiceParams, **context):
    """Soft Dice loss on the surface probability, over valid voxels."""

    def compute(logits, target, valid):
        tp, fp, fn = _overlap_counts(logits, target, valid, params.batch)
        score = (2 * tp + params.smooth) / (2 * tp + fp + fn + params.smooth).clamp_min(1e-8)
        return (1 - score).mean()

    return _float32_loss(compute)


class FBetaParams(_OverlapParams):
    beta: float = Field(1.0, gt=0, description="Recall is beta times as important as precision (1 = Dice).")


@plugin(FBetaParams)
def fbeta(params: FBetaParams, **context):
    """Soft F-beta loss: beta > 1 favours recall (fewer missed surface voxels), beta < 1 precision."""
    b2 = params.beta ** 2

    def compute(logits, target, valid):
        tp, fp, fn = _overlap_counts(logits, target, valid, params.batch)
        score = ((1 + b2) * tp + params.smooth) / ((1 + b2) * tp + b2 * fn + fp + params.smooth).clamp_min(1e-8)
        return (1 - score).mean()

    return _float32_loss(compute)


class TverskyParams(_OverlapParams):
    alpha: float = Field(0.3, ge=0, description="Weight of false positives.")
    beta: float = Field(0.7, ge=0, description="Weight of false negatives (alpha = beta = 0.5 is Dice).")

    @model_validator(mode="after")
    def _not_both_zero(self):
        if self.alpha + self.beta == 0:
            raise ValueError("alpha and beta cannot both be 0 (the loss would ignore every error)")
        return self


@plugin(TverskyParams)
def tversky(params: TverskyParams, **context):
    """Tversky loss: Dice with separate weights for false positives (alpha) and false negatives (beta)."""

    def compute(logits, target, valid):
        tp, fp, fn = _overlap_counts(logits, target, valid, params.batch)
        score = (tp + params.smooth) / (tp + params.alpha * fp + params.beta * fn + params.smooth).clamp_min(1e-8)
        return (1 - score).mean()

    return _float32_loss(compute)


# --------------------------------------------------------------------------- per-voxel losses


class BCEParams(_Params):
    pos_weight: float = Field(1.0, gt=0, description="Weight of positive (surface) voxels.")


@plugin(BCEParams)
def bce(params: BCEParams, **context):
    """Binary cross-entropy with logits, averaged over valid voxels (2-channel models: on l1 - l0)."""
    import torch.nn.functional as F

    def compute(logits, target, valid):
        logit = surface_logit(logits)
        # pos_weight scales the positive term only: -(w * t * log p + (1 - t) * log(1 - p))
        per_voxel = -(params.pos_weight * target * F.logsigmoid(logit) + (1 - target) * F.logsigmoid(-logit))
        return _valid_mean(per_voxel, valid)

    return _float32_loss(compute)


class CEParams(_Params):
    class_weights: tuple[float, float] = Field(
        (1.0, 1.0), description="Weights of (background, surface), as in torch's CrossEntropyLoss.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Share of the target spread evenly over both classes.")

    @model_validator(mode="after")
    def _positive_weights(self):
        if min(self.class_weights) <= 0:
            raise ValueError("class_weights must both be positive")
        return self


@plugin(CEParams)
def ce(params: CEParams, **context):
    """Two-class softmax cross-entropy over valid voxels (a 1-channel model counts as logits [0, l])."""
    import torch

    def compute(logits, target, valid):
        if logits.shape[1] == 1:
            logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
        elif logits.shape[1] != 2:
            raise ValueError(f"ce expects 1 or 2 logit channels, got {logits.shape[1]}")
        log_prob = torch.log_softmax(logits, dim=1)
        w_bg, w_fg = params.class_weights
        # Matches torch's CrossEntropyLoss(weight, ignore_index, label_smoothing): each voxel's loss
        # is weighted by its class weight and the sum is divided by the sum of those weights.
        soft = target * (1 - params.label_smoothing) + params.label_smoothing / 2
        nll = -(w_bg * (1 - soft) * log_prob[:, 0:1] + w_fg * soft * log_prob[:, 1:2])
        voxel_weight = torch.where(valid, w_bg + (w_fg - w_bg) * target, 0.0)
        return _keep(valid, nll).sum() / voxel_weight.sum().clamp_min(1e-8)

    return _float32_loss(compute)


class FocalParams(_Params):
    gamma: float = Field(2.0, ge=0, description="Focusing: down-weights well-classified voxels (0 = BCE).")
    alpha: float | None = Field(
        None, ge=0, le=1, description="Weight of surface voxels (background: 1 - alpha); None = no class weighting.")


@plugin(FocalParams)
def focal(params: FocalParams, **context):
    """Sigmoid focal loss (Lin et al.), averaged over valid voxels (2-channel models: on l1 - l0)."""
    import torch
    import torch.nn.functional as F

    def compute(logits, target, valid):
        logit = surface_logit(logits)
        log_p = F.logsigmoid(logit)
        log_not_p = F.logsigmoid(-logit)
        ce_voxel = -(target * log_p + (1 - target) * log_not_p)
        # 1 - p(true class), computed without cancellation; the floor keeps gamma < 1 finite.
        miss = (-torch.expm1(-ce_voxel)).clamp_min(torch.finfo(torch.float32).tiny)
        per_voxel = miss.pow(params.gamma) * ce_voxel if params.gamma else ce_voxel
        if params.alpha is not None:
            per_voxel = (params.alpha * target + (1 - params.alpha) * (1 - target)) * per_voxel
        return _valid_mean(per_voxel, valid)

    return _float32_loss(compute)


# --------------------------------------------------------------------------- skeleton losses
#
# Both reward predictions that keep a sheet whole: a sheet cut in two loses recall on the
# medial surface wherever the cut is, however few voxels it costs Dice.


class SkeletonRecallParams(_Params):
    smooth: float = Field(1.0, ge=0, description="Added to numerator and denominator (keeps empty patches finite).")
    thicken: int = Field(1, ge=0, le=3, description=(
        "Dilations of the medial surface (inside the label) when the target is computed here; the data "
        "loader's targets use 1."))


@plugin(SkeletonRecallParams)
def skeleton_recall(params: SkeletonRecallParams, **context):
    """Skeleton Recall (Kirchhoff et al., ECCV 2024): 1 - soft recall of the surface probability on the
    label's medial surface, thickened, over valid voxels and the whole batch.

    The trainer passes ``skeleton``, computed in the DataLoader workers
    (:mod:`vesuvius_lab.core.data.skeleton`); called without it, the loss computes it from the
    target on the CPU (right for a test, slow in a training loop)."""
    import torch

    def loss(logits, target, valid, skeleton=None):
        with torch.autocast(device_type=logits.device.type, enabled=False):
            if skeleton is None:
                skeleton = _skeleton_of(target, valid, params.thicken)
            logits, target, valid = _masked(logits, target, valid)
            on_skeleton = torch.where(valid, skeleton.float() * target, 0.0)  # inside the valid label only
            prob = _keep(valid, surface_probability(logits))
            recall = ((prob * on_skeleton).sum() + params.smooth) / (on_skeleton.sum() + params.smooth)
            return 1 - recall

    return loss


def _skeleton_of(target, valid, thicken: int):
    """The skeleton target of each sample of a batch (B, 1, D, H, W), computed on the CPU."""
    import numpy as np
    import torch

    from vesuvius_lab.core.data.skeleton import skeleton_target

    label = np.where(valid.detach().cpu().numpy(), target.detach().cpu().numpy() > 0.5, 2).astype(np.uint8)
    skeletons = [skeleton_target(sample[0], thicken=thicken)[None] for sample in label]
    return torch.from_numpy(np.stack(skeletons)).to(target.device)


class CLDiceParams(_Params):
    iterations: int = Field(3, ge=1, le=20, description=(
        "Erosions of the soft skeleton; at least half the thickest sheet in voxels."))
    smooth: float = Field(1.0, ge=0, description="Added to numerator and denominator (keeps empty patches finite).")


@plugin(CLDiceParams)
def cldice(params: CLDiceParams, **context):
    """Soft clDice (Shit et al., CVPR 2021): the harmonic mean of the predicted soft skeleton's precision
    (inside the label) and the label's soft skeleton's recall (inside the prediction), over valid voxels.

    Ignored voxels are 0 in both prediction and label before the skeletons are taken, so neither
    their values nor their gradients reach the loss."""

    def compute(logits, target, valid):
        prob = _keep(valid, surface_probability(logits))
        skeleton_pred = soft_skeleton(prob, params.iterations)
        skeleton_true = soft_skeleton(target, params.iterations)
        precision = ((skeleton_pred * target).sum() + params.smooth) / (skeleton_pred.sum() + params.smooth)
        sensitivity = ((skeleton_true * prob).sum() + params.smooth) / (skeleton_true.sum() + params.smooth)
        return 1 - 2 * precision * sensitivity / (precision + sensitivity)

    return _float32_loss(compute)


def _soft_erode(x):
    import torch.nn.functional as F

    # The minimum over a 6-neighbour cross, one axis at a time (as the clDice authors do in 3D).
    return -_maximum(*(F.max_pool3d(-x, kernel, 1, pad) for kernel, pad in (
        ((3, 1, 1), (1, 0, 0)), ((1, 3, 1), (0, 1, 0)), ((1, 1, 3), (0, 0, 1)))))


def _maximum(*tensors):
    import torch

    result = tensors[0]
    for tensor in tensors[1:]:
        result = torch.maximum(result, tensor)
    return result


def _soft_dilate(x):
    import torch.nn.functional as F

    return F.max_pool3d(x, 3, 1, 1)


def soft_skeleton(x, iterations: int):
    """The soft skeleton of probabilities (B, 1, D, H, W) by iterated soft opening (Shit et al.)."""
    import torch.nn.functional as F

    skeleton = F.relu(x - _soft_dilate(_soft_erode(x)))
    for _ in range(iterations):
        x = _soft_erode(x)
        delta = F.relu(x - _soft_dilate(_soft_erode(x)))
        skeleton = skeleton + F.relu(delta - skeleton * delta)
    return skeleton
