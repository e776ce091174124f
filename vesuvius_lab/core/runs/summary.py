"""The summary of a finished run: the record the leaderboard reads."""

from __future__ import annotations

from vesuvius_lab.core.config.spec import Experiment
from vesuvius_lab.core.runs.folder import Run


def write_summary(run: Run, spec: Experiment, *, wall_time: float, parameters: int | None,
                  epochs_done: int | None, best_epoch: int | None, kind: str,
                  components: dict[str, str] | None = None, extra: dict | None = None) -> None:
    """Write ``summary.json`` from ``scores.json``, then mark the run finished.

    ``kind`` is the run's kind (:data:`vesuvius_lab.core.inference.run_kinds.RUN_KINDS`);
    ``components`` names what the run used in place of the spec's components, e.g. a backend's own
    loss, so that the leaderboard shows what really ran; ``extra`` adds keys of the run's kind.
    """
    scores = run.read("scores.json", {})
    previous = run.read("summary.json", {})
    run.write("summary.json", {
        "experiment": spec.name, "fold": spec.data.fold, "run": run.id, "kind": kind,
        **(scores.get("mean") or {}), "steps": scores.get("steps", {}),
        "best_epoch": best_epoch, "epochs": epochs_done,
        "wall_time_s": previous.get("wall_time_s", 0.0) + wall_time, "parameters": parameters,
        **({"components": dict(components)} if components else {}),
        **({"init": spec.train.init} if spec.train.init else {}),  # fine-tuned from this run or file
        **({"validated": False} if not scores.get("mean") else {}),  # e.g. fold "all": no held-out volume
        **(extra or {}),
    })
    run.set_status("finished")
