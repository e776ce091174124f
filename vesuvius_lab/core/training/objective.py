"""The training objective: the weighted sum of an experiment's ``[[loss]]`` terms.

Each term is a loss plugin (see :mod:`vesuvius_lab.plugins.losses` for the contract). The
objective returns the total to back-propagate and every term's own value for logging, named
after its plugin ("dice", "bce"; a plugin used twice gives "dice" and "dice#2").

A loss may ask for more than ``(logits, target, valid)`` by naming keyword parameters:
``inputs`` (the network's input batch) and ``skeleton`` (the label's medial surface, computed in
the DataLoader workers, see :mod:`vesuvius_lab.core.data.skeleton`). A term with ``start_epoch``
steers training only from that epoch on; before, it is computed and logged only. A network with
deep supervision returns a list of logits in training; each head's loss is weighted by the
network's ``deep_supervision_weights`` (nnU-Net's 1/2^i scheme) and the terms logged are the
main head's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from vesuvius_lab.core import registry
from vesuvius_lab.core.config.spec import LossTerm

LossFn = Callable[[Any, Any, Any], Any]


#: Keywords a loss may name to receive more than (logits, target, valid).
EXTRAS = ("inputs", "skeleton")


@dataclass(frozen=True)
class WeightedLoss:
    name: str
    weight: float
    fn: LossFn
    start_epoch: int = 0

    def wants(self, extra: str) -> bool:
        """Does the loss take the keyword ``extra`` (one of :data:`EXTRAS`)?"""
        try:
            return extra in inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            return False

    def steers(self, epoch: int) -> bool:
        return self.weight > 0 and epoch >= self.start_epoch


class Objective:
    """``objective(logits, target, valid) -> (total, {name: detached value})``.

    A term of weight 0 is still computed (without gradient) so that it can be watched in the
    logs without steering training.
    """

    def __init__(self, terms: Sequence[WeightedLoss]):
        if not terms:
            raise ValueError("an objective needs at least one loss term")
        self.terms = tuple(terms)
        # Which extra keywords each term takes, read once: the call below runs every training step.
        self.extras = tuple(frozenset(key for key in EXTRAS if term.wants(key)) for term in self.terms)

    @property
    def names(self) -> list[str]:
        return [term.name for term in self.terms]

    def wants(self, extra: str) -> bool:
        """Does any term take the keyword ``extra`` (e.g. ``"skeleton"``, so the loader must make it)?"""
        return any(extra in keys for keys in self.extras)

    def __call__(self, logits, target, valid, inputs=None, skeleton=None, *, epoch: int = 0,
                 head_weights: Sequence[float] | None = None):
        """``logits`` is a tensor, or a list of them (deep supervision) weighted by ``head_weights``."""
        if isinstance(logits, (list, tuple)):
            weights = list(head_weights) if head_weights is not None else [1.0] + [0.0] * (len(logits) - 1)
            if len(weights) != len(logits):
                raise ValueError(f"the network returned {len(logits)} deep-supervision outputs but "
                                 f"{len(weights)} weights")
            total, values = None, {}
            for index, (head, weight) in enumerate(zip(logits, weights)):
                head_total, head_values = self._terms(head, target, valid, inputs, skeleton, epoch)
                total = weight * head_total if total is None else total + weight * head_total
                if index == 0:
                    values = head_values
            return total, values
        return self._terms(logits, target, valid, inputs, skeleton, epoch)

    def _terms(self, logits, target, valid, inputs, skeleton, epoch):
        import torch

        given = {"inputs": inputs, "skeleton": skeleton}
        total, values = None, {}
        for term, keys in zip(self.terms, self.extras):
            extra = {key: value for key, value in given.items() if value is not None and key in keys}
            if not term.steers(epoch):
                with torch.no_grad():
                    value = term.fn(logits, target, valid, **extra)
            else:
                value = term.fn(logits, target, valid, **extra)
                total = term.weight * value if total is None else total + term.weight * value
            values[term.name] = value.detach()
        if total is None:  # no term steers yet: nothing to learn from, but keep the graph valid
            total = logits.sum() * 0.0
        return total, values


def term_names(plugins: Sequence[str]) -> list[str]:
    """Unique log names: the plugin name, then ``name#2``, ``name#3`` for repeats."""
    seen: dict[str, int] = {}
    names = []
    for name in plugins:
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names


def build_objective(loss_terms: Sequence[LossTerm], **context: Any) -> Objective:
    """Resolve and build each term's loss plugin (params validated by the plugin) into an objective."""
    names = term_names([term.plugin for term in loss_terms])
    return Objective([
        WeightedLoss(name, term.weight, registry.build("losses", term.plugin, term.params, **context),
                     term.start_epoch)
        for name, term in zip(names, loss_terms)
    ])
