"""``[train] ema``: an exponential moving average of the weights, as the top teams validated with.

The average is updated after every optimizer step. Its decay warms up as ``min(decay, (1 + n) /
(10 + n))`` after n updates (timm's ModelEmaV3 does the same), so that a short run is not
dominated by its random initial weights. Floating-point buffers (norm statistics) are averaged
too; integer ones (counters) are copied.
"""

from __future__ import annotations

import copy

import torch


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        weight = 1 - self.current_decay()
        for average, value in zip(self.model.state_dict().values(), model.state_dict().values()):
            if average.dtype.is_floating_point:
                average.lerp_(value.detach().to(average.dtype), weight)
            else:
                average.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"weights": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
