"""The search: Optuna (TPE) over a ``[tune]`` space, each trial the objective over the scores of some cases.

Studies live in Optuna storage (SQLite inside the tuning run by default, or any Optuna RDB URL,
so that several machines can work on one study). Every finished trial is stored at once, so a
killed or interrupted search resumes with none lost: it runs only the trials still missing. Each
finished trial is also handed to ``on_record`` (the tuning run keeps them in ``trials.json``), so a
damaged study can be rebuilt (:mod:`vesuvius_lab.core.tuning.storage`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
from pydantic import ValidationError

from vesuvius_lab.core.config.spec import Experiment, TuneRange
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.tuning.objective import Objective
from vesuvius_lab.core.tuning.scoring import CaseScorer, ChainSpec
from vesuvius_lab.core.tuning.space import apply_values, current_values, suggest, values_of
from vesuvius_lab.core.tuning.storage import journal, open_storage, storage_errors, tag

optuna.logging.set_verbosity(logging.WARNING)

#: What a chain's steps raise for values they refuse together (a hysteresis low above its high).
REFUSED = (ValidationError, UserError)


def chain_of(spec: Experiment) -> ChainSpec:
    return [step.model_dump(mode="json") for step in spec.postprocess], spec.inference.threshold


@dataclass
class Search:
    """One study: the space, the spec it changes, and the cases its trials are scored on."""

    name: str
    space: dict[str, TuneRange]
    spec: Experiment
    ids: list[str]
    storage: str
    seed: int
    objective: Objective
    identity: dict = field(default_factory=dict)  # which tuning the study belongs to (storage.tag)
    on_record: Callable[[optuna.Study], None] | None = None  # called with the study after each trial

    def run(self, scorer: CaseScorer, trials: int, on_trial: Callable[[float | None], None]) -> optuna.Study:
        """Run the trials this study still lacks; ``on_trial(best score so far)`` after each."""
        storage = open_storage(self.storage)
        with storage_errors(self.storage):
            study = optuna.create_study(study_name=self.name, storage=storage, direction="maximize",
                                        load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=self.seed))
            if self.identity:
                tag(study, self.identity)
            if not study.trials:  # start from the untuned chain, so the search never ends below it
                untuned = current_values(self.spec, self.space)
                if len(untuned) == len(self.space):
                    study.enqueue_trial(untuned, skip_if_exists=True)
            for _ in range(len(finished(study))):
                on_trial(best_value(study))
            missing = trials - len(finished(study))
            if missing > 0:
                study.optimize(lambda trial: self.score_trial(trial, scorer), n_trials=missing,
                               callbacks=[lambda s, _t: self._after_trial(s, on_trial)])
        return study

    def _after_trial(self, study: optuna.Study, on_trial: Callable[[float | None], None]) -> None:
        if self.on_record is not None:
            self.on_record(study)
        on_trial(best_value(study))

    def score_trial(self, trial: optuna.Trial, scorer: CaseScorer) -> float:
        values = {key: suggest(trial, key, dimension) for key, dimension in self.space.items()}
        try:
            scores = scorer.score(chain_of(apply_values(self.spec, values)), self.ids)
        except REFUSED as exc:
            trial.set_user_attr("refused", str(exc).splitlines()[0][:300])
            raise optuna.TrialPruned() from None  # not a failure: the sampler learns to avoid it
        except KeyboardInterrupt:  # stopped at once (a second Ctrl-C): Optuna records a failure; run it again
            trial.set_user_attr("interrupted", True)
            raise
        volumes = {i: s.score for i, s in scores.items()}
        trial.set_user_attr("volumes", volumes)
        return self.objective.value(volumes)


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count: complete, or refused by the steps (pruned); not the one a kill or a forced stop
    interrupted."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return [t for t in study.trials if t.state in states and not t.user_attrs.get("interrupted")]


def best_value(study: optuna.Study) -> float | None:
    complete = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return max(complete) if complete else None


def best_values(study: optuna.Study, space: dict[str, TuneRange]) -> dict[str, Any]:
    """The values of the best trial; a UserError when no trial was scored (every one refused by the steps)."""
    if best_value(study) is None:
        refused = next((t.user_attrs["refused"] for t in study.trials if t.user_attrs.get("refused")), None)
        raise UserError(f"every trial of the search {study.study_name!r} ({len(study.trials)}) was refused by the "
                        f"post-processing steps{f' (the first: {refused})' if refused else ''}, so no chain was "
                        "scored. Narrow the [tune] ranges to values the steps accept.")
    return values_of(study.best_trial.params, space)


def trial_records(study: optuna.Study, space: dict[str, TuneRange]) -> list[dict]:
    """Every finished trial of a study, for the run's ``trials.json`` and the report's pictures (with the
    params and distributions that rebuild the trial, see :func:`vesuvius_lab.core.tuning.storage.rebuild`)."""
    by_number = {t.number: t for t in study.trials}
    return [{**record, "values": values_of(record["params"], space),
             "volumes": record["user_attrs"].get("volumes", {}), "refused": record["user_attrs"].get("refused"),
             "seconds": _seconds(by_number[record["number"]])} for record in journal(study)]


def _seconds(trial: optuna.trial.FrozenTrial) -> float | None:
    if trial.datetime_complete and trial.datetime_start:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None

