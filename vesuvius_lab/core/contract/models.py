"""The 2.5D wrapper for model plugins, and parameter counting.

Every model plugin maps (B, 1, D, H, W) windows to (B, C, D, H, W) logits. A 2.5D model is a 2D
network that reads the D slices of a window as D input channels and predicts D x C output
channels; :class:`Depth2D` wraps it into that 3D contract so blending, TTA and post-processing
treat it like any 3D network. (Importing this module imports torch: plugins import it inside
their factories; cheap window arithmetic for ``check`` hooks is in :mod:`vesuvius_lab.core.contract.windows`.)
"""

from __future__ import annotations

import torch
from torch import nn


class Depth2D(nn.Module):
    """(B, 1, D, H, W) -> (B, C, D, H, W) around a 2D net that takes D channels and gives C * D.

    Output channel ``c * D + d`` of the 2D net is class ``c`` at slice ``d``.
    """

    def __init__(self, net2d: nn.Module, depth: int, out_channels: int = 1):
        super().__init__()
        self.net2d, self.depth, self.out_channels = net2d, int(depth), int(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 1 or x.shape[2] != self.depth:
            raise ValueError(
                f"this 2.5D model takes windows of shape (B, 1, {self.depth}, H, W); got {tuple(x.shape)}. "
                "Its depth is fixed when it is built: data.window and inference.window must have "
                "that first side.")
        b, _, d, h, w = x.shape
        return self.net2d(x[:, 0]).reshape(b, self.out_channels, d, h, w)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, out_channels={self.out_channels}"


class Pruned(nn.Module):
    """Stands in for a submodule whose result never reaches the output: passes its input on."""

    def forward(self, x, *args, **kwargs):
        return x


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters of a module (only those that require grad, by default)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
