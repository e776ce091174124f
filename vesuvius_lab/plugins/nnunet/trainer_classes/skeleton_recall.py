"""nnU-Net with Skeleton Recall (Kirchhoff et al., ECCV 2024): CE + Dice + skeleton recall in equal parts.

The 7th-place recipe of the Vesuvius Surface Detection challenge (ResEncM 3d_lowres, 128^3). The
loss adds ``1 - soft recall`` of the foreground probability on the label's skeleton, thickened, to
nnU-Net's Dice + cross-entropy; for papyrus sheets the skeleton is their medial surface
(:func:`vesuvius_lab.core.data.skeleton.skeleton_target`).

The skeleton of each patch is computed in nnU-Net's data augmentation pipeline (its workers), after
the spatial augmentation, and travels as a second channel of the segmentation target: channel 0 is
the label (0, 1 and the ignore label), channel 1 the skeleton (0/1). For deep supervision the label
is downsampled as nnU-Net does (nearest) and the skeleton by max-pooling, which keeps a thin surface
at every scale. The ignore label is masked out of the recall term as it is out of Dice and CE.
"""

from __future__ import annotations

from typing import List, Tuple, Union

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, SegOnlyTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn
from torch.nn import functional as F

from vesuvius_lab.core.data.skeleton import skeleton_target

SURFACE = 1  # the label whose skeleton is the target


class SkeletonTargetTransform(SegOnlyTransform):
    """Append the skeleton of the label (segmentation channel 0) as a second channel, uint8 0/1 cast to the
    segmentation's dtype. Runs per sample in nnU-Net's augmentation workers."""

    def __init__(self, ignore_label: int | None, thicken: int = 1):
        super().__init__()
        self.ignore_label, self.thicken = ignore_label, thicken

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        label = segmentation[0].numpy()
        flat = label.ndim == 2  # 2d configuration: one slice
        skeleton = skeleton_target(label[None] if flat else label, self.ignore_label, self.thicken)
        skeleton = torch.from_numpy(skeleton[0] if flat else skeleton).to(segmentation.dtype)
        return torch.cat((segmentation[:1], skeleton[None]), 0)


class DownsampleLabelAndSkeletonForDS(SegOnlyTransform):
    """Deep-supervision targets of a (label, skeleton) segmentation: the label channel as nnU-Net downsamples
    it (nearest), the skeleton by max-pooling, so a one-voxel surface is still there at every scale."""

    def __init__(self, ds_scales: Union[List, Tuple]):
        super().__init__()
        self.ds_scales = ds_scales
        self.labels = DownsampleSegForDSTransform(ds_scales)

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> List[torch.Tensor]:
        labels = self.labels._apply_to_segmentation(segmentation[:1])
        skeleton = segmentation[1:2].float()[None]
        pool = F.adaptive_max_pool3d if skeleton.ndim == 5 else F.adaptive_max_pool2d
        return [torch.cat((label, pool(skeleton, label.shape[1:])[0].to(label.dtype)), 0) for label in labels]


def with_skeleton_target(transforms: BasicTransform, deep_supervision_scales, ignore_label: int | None,
                         thicken: int) -> ComposeTransforms:
    """nnU-Net's pipeline (built without deep supervision) followed by the skeleton and the per-scale targets."""
    steps = [*transforms.transforms, SkeletonTargetTransform(ignore_label, thicken)]
    if deep_supervision_scales is not None:
        steps.append(DownsampleLabelAndSkeletonForDS(deep_supervision_scales))
    return ComposeTransforms(steps)


class SkeletonRecallLoss(nn.Module):
    """``1 - recall``: the foreground probability summed over the skeleton voxels, divided by their count,
    over the whole batch; voxels outside ``mask`` (the ignore label) count for nothing."""

    def __init__(self, smooth: float = 1e-5):
        super().__init__()
        self.smooth = smooth

    def forward(self, foreground: torch.Tensor, skeleton: torch.Tensor, mask: torch.Tensor | None = None):
        skeleton = skeleton.to(foreground.dtype)
        if mask is not None:
            skeleton = skeleton * mask
        recall = ((foreground * skeleton).sum() + self.smooth) / (skeleton.sum() + self.smooth)
        return 1 - recall


class DiceCEAndSkeletonRecallLoss(nn.Module):
    """nnU-Net's Dice + CE loss on the label channel plus ``weight`` x skeleton recall on the skeleton channel."""

    def __init__(self, dice_ce: nn.Module, ignore_label: int | None, weight: float = 1.0):
        super().__init__()
        self.dice_ce, self.ignore_label, self.weight = dice_ce, ignore_label, weight
        self.skeleton_recall = SkeletonRecallLoss()

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.shape[1] != 2:
            raise ValueError(f"expected (label, skeleton) targets with 2 channels, got {target.shape[1]}")
        label, skeleton = target[:, :1], target[:, 1:2]
        loss = self.dice_ce(net_output, label)
        if self.weight:
            mask = (label != self.ignore_label) if self.ignore_label is not None else None
            foreground = torch.softmax(net_output.float(), 1)[:, SURFACE:SURFACE + 1]
            loss = loss + self.weight * self.skeleton_recall(foreground, skeleton, mask)
        return loss


def label_channel(target):
    """The label channel of (label, skeleton) targets, per deep-supervision scale."""
    return [t[:, :1] for t in target] if isinstance(target, list) else target[:, :1]


class nnUNetTrainerSkeletonRecall(nnUNetTrainer):
    """nnUNetTrainer whose loss is CE + Dice + Skeleton Recall in equal parts (weights 1, 1, 1)."""

    weight_skeleton_recall = 1.0
    skeleton_thicken = 1  # voxels the medial surface is thickened by (Kirchhoff et al.'s "tubed" skeleton)

    def _build_loss(self):
        if self.label_manager.has_regions:
            raise RuntimeError(f"{type(self).__name__} trains labels, not regions: its skeleton target is that of "
                               f"label {SURFACE}.")
        loss = super()._build_loss()  # nnU-Net's Dice + CE, deep-supervision weights and all
        inner = loss.loss if isinstance(loss, DeepSupervisionWrapper) else loss
        combined = DiceCEAndSkeletonRecallLoss(inner, self.label_manager.ignore_label, self.weight_skeleton_recall)
        if isinstance(loss, DeepSupervisionWrapper):
            loss.loss = combined
            return loss
        return combined

    @classmethod
    def get_training_transforms(cls, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None) -> BasicTransform:
        if regions is not None or is_cascaded:
            raise RuntimeError(f"{cls.__name__} supports neither regions nor the cascade.")
        transforms = nnUNetTrainer.get_training_transforms(
            patch_size, rotation_for_DA, None, mirror_axes, do_dummy_2d_data_aug, use_mask_for_norm=use_mask_for_norm,
            is_cascaded=is_cascaded, foreground_labels=foreground_labels, regions=regions, ignore_label=ignore_label)
        return with_skeleton_target(transforms, deep_supervision_scales, ignore_label, cls.skeleton_thicken)

    @classmethod
    def get_validation_transforms(cls, deep_supervision_scales, is_cascaded=False, foreground_labels=None,
                                  regions=None, ignore_label=None) -> BasicTransform:
        transforms = nnUNetTrainer.get_validation_transforms(None, is_cascaded=is_cascaded,
                                                             foreground_labels=foreground_labels, regions=regions,
                                                             ignore_label=ignore_label)
        return with_skeleton_target(transforms, deep_supervision_scales, ignore_label, cls.skeleton_thicken)

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step (loss, pseudo-Dice) on the label channel; the loss still sees the skeleton."""
        target = batch["target"]
        device_target = ([t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list)
                         else target.to(self.device, non_blocking=True))
        loss = self.loss
        self.loss = lambda output, _labels: loss(output, device_target)
        try:
            return super().validation_step({**batch, "target": label_channel(target)})
        finally:
            self.loss = loss
