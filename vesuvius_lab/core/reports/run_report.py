"""``vlab report RUN``: pictures of a run's validation volumes and training, and an index.html linking them.

The volumes pictured are the worst, median and best scoring of the run's validation fold (from
scores.json), predicted again with the run's best checkpoint and post-processing chain.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vesuvius_lab.core.console import err
from vesuvius_lab.core.data.dataset import Dataset
from vesuvius_lab.core.data.tiff import read_volume
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.files import write_text_atomic
from vesuvius_lab.core.inference.run_kinds import load_run
from vesuvius_lab.core.reports.leaderboard_view import format_count, format_duration
from vesuvius_lab.core.reports.pictures import training_curves, tuning_curves, volume_figure
from vesuvius_lab.core.runs.folder import Run
from vesuvius_lab.core.runs.records import RunRecord, read_run


@dataclass
class ReportFiles:
    index: Path
    curves: Path
    volumes: dict[str, Path] = field(default_factory=dict)  # volume id -> PNG


def pick_volumes(scored: list[dict], count: int) -> list[dict]:
    """Up to ``count`` scored volumes spread from worst to best (worst, median, best for three)."""
    ordered = sorted((v for v in scored if isinstance(v.get("score"), (int, float))), key=lambda v: v["score"])
    if len(ordered) <= count:
        return ordered
    positions = np.linspace(0, len(ordered) - 1, count).round().astype(int)
    return [ordered[p] for p in dict.fromkeys(positions.tolist())]


def write_report(run: Run, output: Path, *, device: str = "cpu", data_root: Path | None = None,
                 volumes: int = 3) -> ReportFiles:
    """Write ``volume-<id>.png`` for a few validation volumes, ``training.png`` and ``index.html``."""
    record = read_run(run)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    name = f"{record.experiment} / {run.id}"
    trials = run.read("trials.json", {}).get("trials")
    if isinstance(trials, list):  # a tuning run: its trials instead of training curves
        tuning = run.read("tuning.json", {})
        curves = tuning_curves(output / "tuning.png", trials, title=f"{name}: tuning",
                               untuned=tuning.get("untuned_objective", record.summary.get("untuned_score")),
                               chosen=tuning.get("best"), notices=tuning.get("notices") or [],
                               objective=tuning.get("objective") or "mean score", profiles=tuning.get("profiles"))
    else:
        curves = training_curves(output / "training.png", run.metrics(), title=f"{name}: training",
                                 best_epoch=record.summary.get("best_epoch"))
    files = ReportFiles(output / "index.html", curves)
    scores = run.read("scores.json") or {}
    chosen = pick_volumes(scores.get("volumes") or [], volumes) if isinstance(scores, dict) else []
    if chosen:
        dataset = _dataset(record, data_root)
        predictor = load_run(run.path, device=device)
        ignore = predictor.spec.data.ignore_label
        from rich.progress import Progress

        with Progress(console=err, transient=True) as progress:
            task = progress.add_task("pictures", total=len(chosen))
            for volume in chosen:
                volume_id = str(volume["id"])
                progress.update(task, description=f"predicting {volume_id}")
                image = read_volume(dataset.image_path(volume_id))
                label = read_volume(dataset.label_path(volume_id))
                probabilities = predictor.probabilities(image)
                mask = predictor.chain.apply(probabilities)
                files.volumes[volume_id] = volume_figure(
                    output / f"volume-{volume_id}.png", image, label, probabilities, mask,
                    title=f"{name}: volume {volume_id}, {_score_line(volume)}", ignore_label=ignore)
                progress.advance(task)
    write_text_atomic(files.index, index_html(record, files, scores if isinstance(scores, dict) else {}))
    return files


def _dataset(record: RunRecord, data_root: Path | None) -> Dataset:
    root = data_root or Path(str((record.spec.get("data") or {}).get("root", "")))
    if not (root / "train.csv").is_file():
        raise UserError(f"{root}: the run's data folder is not there any more. Point `vlab --data DIR report ...` "
                        "at the folder holding train.csv, train_images/ and train_labels/.")
    return Dataset.open(root)


def _score_line(volume: dict) -> str:
    def number(key: str) -> str:
        value = volume.get(key)
        return f"{value:.3f}" if isinstance(value, (int, float)) else "?"

    return (f"score {number('score')} (TopoScore {number('topo_score')}, SurfaceDice {number('surface_dice')}, "
            f"VOI {number('voi_score')})")


# --------------------------------------------------------------------------- index.html


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { padding: 3px 12px; border-bottom: 1px solid #ddd; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.pictured td { background: #f3f8ff; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0 2em; }
.muted { color: #777; } pre { background: #f6f6f6; padding: 1em; overflow: auto; }
"""


def _number(value, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—" if value is None else html.escape(str(value))
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _formatted(value, formatter) -> str:
    return formatter(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def index_html(record: RunRecord, files: ReportFiles, scores: dict) -> str:
    e = html.escape
    summary = record.summary
    plugins = record.plugins
    head_rows = [
        ("state", e(record.state)), ("fold", _number(record.fold)),
        ("score", _number(summary.get("score"))), ("TopoScore", _number(summary.get("topo_score"))),
        ("SurfaceDice", _number(summary.get("surface_dice"))), ("VOI score", _number(summary.get("voi_score"))),
        ("best epoch / epochs", f"{_number(summary.get('best_epoch'))} / {_number(summary.get('epochs'))}"),
        ("wall time", _formatted(summary.get("wall_time_s"), format_duration)),
        ("parameters", _formatted(summary.get("parameters"), format_count)),
        *((k, e(v)) for k, v in plugins.items()), ("git", e(record.commit or "—")),
    ]
    steps = "".join(f"<tr><td>{e(str(step))}</td><td class='num'>{_number(value)}</td></tr>"
                    for step, value in (summary.get("steps") or {}).items())
    volume_rows = []
    for volume in scores.get("volumes") or []:
        volume_id = str(volume.get("id"))
        link = f"<a href='#v{e(volume_id)}'>{e(volume_id)}</a>" if volume_id in files.volumes else e(volume_id)
        volume_rows.append(f"<tr class='{'pictured' if volume_id in files.volumes else ''}'><td>{link}</td>" + "".join(
            f"<td class='num'>{_number(volume.get(k))}</td>" for k in ("score", "topo_score", "surface_dice", "voi_score"))
            + "</tr>")
    pictures = "".join(f"<h3 id='v{e(volume_id)}'>volume {e(volume_id)}</h3><img src='{e(path.name)}' alt='volume {e(volume_id)}'>"
                       for volume_id, path in files.volumes.items())
    spec = e(json.dumps(record.spec, indent=2))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{e(record.experiment)} {e(record.run.id)}</title><style>{STYLE}</style></head>
<body>
<h1>{e(record.experiment)} <span class="muted">/ {e(record.run.id)}</span></h1>
<p class="muted">{e(str(record.run.path))}</p>
<table>{''.join(f'<tr><th>{e(k)}</th><td>{v}</td></tr>' for k, v in head_rows)}</table>
<h2>Score after each post-processing step</h2>
<table><tr><th>step</th><th>score</th></tr>{steps or '<tr><td colspan=2>none recorded</td></tr>'}</table>
<h2>Validation volumes</h2>
<table><tr><th>volume</th><th>score</th><th>TopoScore</th><th>SurfaceDice</th><th>VOI</th></tr>
{''.join(volume_rows) or '<tr><td colspan=5>no scores.json yet</td></tr>'}</table>
{pictures or '<p class="muted">No validation volume pictured (no scored volumes).</p>'}
<h2>{e(files.curves.stem.capitalize())}</h2>
<img src="{e(files.curves.name)}" alt="{e(files.curves.stem)} curves">
<details><summary>Resolved spec</summary><pre>{spec}</pre></details>
</body></html>
"""
