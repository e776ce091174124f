"""The training objective: the weighted sum of an experiment's ``[[loss]]`` terms.

Each term is a loss plugin (see :mod:`vesuvius_lab.plugins.losses` for the contract). The
objective returns the total to back-propagate and every term's own value for logging, named
after its plugin ("dice", "bce"; a plugin used twice gives "dice" and "dice#2").
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from vesuvius_lab.core import registry
from vesuvius_lab.core.config.spec import LossTerm

LossFn = Callable[[Any, Any, Any], Any]


@dataclass(frozen=True)
class WeightedLoss:
    name: str
    weight: float
    fn: LossFn

    @property
    def wants_inputs(self) -> bool:
        """A loss may take an ``inputs`` keyword: the network's input batch (e.g. to weight what it got wrong)."""
        try:
            return "inputs" in inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            return False


class Objective:
    """``objective(logits, target, valid) -> (total, {name: detached value})``.

    A term of weight 0 is still computed (without gradient) so that it can be watched in the
    logs without steering training.
    """

    def __init__(self, terms: Sequence[WeightedLoss]):
        if not terms:
            raise ValueError("an objective needs at least one loss term")
        self.terms = tuple(terms)

    @property
    def names(self) -> list[str]:
        return [term.name for term in self.terms]

    def __call__(self, logits, target, valid, inputs=None):
        import torch

        total, values = None, {}
        for term in self.terms:
            extra = {"inputs": inputs} if term.wants_inputs else {}
            if term.weight == 0:
                with torch.no_grad():
                    value = term.fn(logits, target, valid, **extra)
            else:
                value = term.fn(logits, target, valid, **extra)
                total = term.weight * value if total is None else total + term.weight * value
            values[term.name] = value.detach()
        if total is None:  # every weight is 0: nothing to learn from, but keep the graph valid
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
        WeightedLoss(name, term.weight, registry.build("losses", term.plugin, term.params, **context))
        for name, term in zip(names, loss_terms)
    ])
