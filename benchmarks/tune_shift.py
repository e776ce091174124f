"""Tuning under a shift: chains tuned with each objective on some style families, scored on the others.

The synthetic generator's scroll styles come in families (``vlab data synth --family``): base,
contrast (a faint, soft scan), noise, spacing (tightly wound sheets) and damage (holed, crumpled).
A quick 2.5D UNet is trained on scrolls of the ``--tuned-on`` families (fold 0 of 2, so that the
other fold's scrolls are out-of-fold), its chain is tuned with every objective, with and without a
plateau, and every chain, the untuned one included, post-processes the same probabilities of fresh
volumes: of the same families (in family) and of the ``--shifted`` families (out of family).

    .venv/bin/python benchmarks/tune_shift.py --workdir /tmp/shift [--trials 30] [--seeds 101 202]

Every step goes through the `vlab` command line, as a user would; what exists in ``--workdir`` is
reused (the trained run, the tunings, the predictions), so a second run only scores again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _summary
from rich.console import Console
from rich.table import Table

from vesuvius_lab.core.data.synthetic import FAMILIES, MARKER, write_dataset

ROOT = Path(__file__).resolve().parents[1]
#: The quick ensemble's repair chain and its [tune] space: everything from its [inference] table on.
ENSEMBLE = ROOT / "experiments/quick/ensemble.toml"


def chain_and_space() -> str:
    text = ENSEMBLE.read_text()
    return "\n[data]\nfolds = 2\n\n" + text[text.index("[inference]"):]


#: (label, objective, plateau) of every tuning compared.
CHOICES = [("mean", "mean", 0.0), ("worst_group", "worst_group", 0.0), ("mean_minus_std", "mean_minus_std", 0.0),
           ("mean + plateau", "mean", 0.1), ("worst_group + plateau", "worst_group", 0.1),
           ("mean_minus_std + plateau", "mean_minus_std", 0.1)]


class Project:
    def __init__(self, root: Path, data: Path):
        self.root, self.file = root, root / "vesuvius.toml"
        root.mkdir(parents=True, exist_ok=True)
        self.file.write_text(f'data_root = "{data}"\nruns_dir = "runs"\ndevice = "cpu"\n')

    def vlab(self, *args: str) -> str:
        command = [sys.executable, "-m", "vesuvius_lab", "--project", str(self.file), *args]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
        if result.returncode:
            sys.exit(f"vlab {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
        return result.stdout


def dataset(path: Path, *, n: int, seed: int, families: list[str], scrolls: int) -> Path:
    if not (path / "train.csv").is_file():
        write_dataset(path, n=n, seed=seed, scrolls=scrolls, n_test=1, families=families, progress=False)
    return path


def family_of_volumes(data: Path) -> dict[str, str]:
    """volume id -> its scroll's style family, from the dataset's marker and train.csv."""
    marker = json.loads((data / MARKER).read_text())
    rows = [line.split(",") for line in (data / "train.csv").read_text().splitlines()[1:]]
    return {volume: marker["families"][scroll] for volume, scroll in rows}


def tuning_record(runs: Path, file: Path) -> dict:
    """The tuning.json of the newest tuning run of ``file``."""
    records = [json.loads(path.read_text()) for path in sorted(runs.glob("*-tuned/*/tuning.json"))]
    return [record for record in records if record.get("target") == str(file)][-1]


def scores(project: Project, chain_file: Path, probabilities: Path, labels: Path, out: Path) -> dict[str, float]:
    """Per volume: the score of ``chain_file``'s chain applied to the cached probabilities."""
    if not (out / "scores.json").is_file():
        project.vlab("postprocess", str(chain_file), "--input", str(probabilities), "--output", str(out / "masks"))
        evaluated = json.loads(project.vlab("evaluate", str(out / "masks"), str(labels), "--json"))
        (out / "scores.json").write_text(json.dumps({v["id"]: v["score"] for v in evaluated["volumes"]}))
    return json.loads((out / "scores.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--tuned-on", nargs="+", default=["base", "noise"], choices=list(FAMILIES))
    parser.add_argument("--shifted", nargs="+", default=["contrast", "spacing", "damage"], choices=list(FAMILIES))
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--n", type=int, default=12, help="training volumes (over 6 scrolls)")
    parser.add_argument("--held", type=int, default=6, help="fresh volumes per set (in family, out of family)")
    parser.add_argument("--seeds", type=int, nargs=2, default=(101, 202), help="seeds of the two fresh sets")
    _summary.add_argument(parser)
    args = parser.parse_args()
    console = Console(width=150)
    work = args.workdir.resolve()
    started = time.perf_counter()
    train = dataset(work / "train", n=args.n, seed=0, families=args.tuned_on, scrolls=6)
    project = Project(work / "project", train)
    base = work / "project" / "shift.toml"
    base.write_text(f'extends = "{ROOT / "experiments/quick/unet25d.toml"}"\nname = "shift-unet25d"\n' + chain_and_space())
    if not list((work / "project" / "runs").glob("shift-unet25d/*/summary.json")):
        console.print("training the quick 2.5D UNet on fold 0 of 2 ...")
        project.vlab("train", str(base), "--fold", "0")
    (run,) = [p.parent for p in (work / "project" / "runs").glob("shift-unet25d/*/summary.json")]

    chains: dict[str, Path] = {"untuned": base}
    estimates: dict[str, float] = {}
    for label, objective, plateau in CHOICES:
        file = work / "project" / f"shift-{label.replace(' + ', '-')}.toml"
        file.write_text(f'extends = "shift.toml"\n[tune]\nobjective = "{objective}"\nplateau = {plateau}\n')
        tuned = file.with_name(f"{file.stem}.tuned.toml")
        if not tuned.is_file():
            console.print(f"tuning: {label} ...")
            project.vlab("tune", str(file), "--trials", str(args.trials))
        chains[label] = tuned
        estimates[label] = tuning_record(work / "project" / "runs", file)["cross_validated"]

    sets = {"in family": dataset(work / f"held-{args.seeds[0]}", n=args.held, seed=args.seeds[0],
                                 families=args.tuned_on, scrolls=len(args.tuned_on) * 2),
            "out of family": dataset(work / f"held-{args.seeds[1]}", n=args.held, seed=args.seeds[1],
                                     families=args.shifted, scrolls=len(args.shifted) * 2)}
    results: dict[str, dict[str, dict[str, float]]] = {}
    families: dict[str, str] = {}
    for name, data in sets.items():
        predicted = work / f"pred-{data.name}"
        if not (predicted / "probabilities").is_dir():
            project.vlab("predict", str(run), "--input", str(data / "train_images"), "--output", str(predicted),
                         "--probabilities")
        families.update(family_of_volumes(data))
        for label, file in chains.items():
            results.setdefault(label, {})[name] = scores(project, file, predicted / "probabilities",
                                                         data / "train_labels", work / "scored" / data.name / label)
    wall = time.perf_counter() - started

    table = Table(title=f"Chains tuned on {'+'.join(args.tuned_on)}, scored in and out of family "
                        f"({args.trials} trials per search; {wall:.0f} s)")
    shifted = list(args.shifted)
    for column in ("chain", "cross-validated", "in family", "out of family", *shifted):
        table.add_column(column, justify="right" if column != "chain" else "left")
    rows = []
    for label in chains:
        inside = statistics.fmean(results[label]["in family"].values())
        outside = statistics.fmean(results[label]["out of family"].values())
        per_family = [statistics.fmean(s for v, s in results[label]["out of family"].items() if families[v] == f)
                      for f in shifted]
        estimate = f"{estimates[label]:.4f}" if label in estimates else ""
        table.add_row(label, estimate, f"{inside:.4f}", f"{outside:.4f}", *(f"{s:.4f}" for s in per_family))
        rows.append((label, inside, outside))
    console.print(table)
    by_label = {label: (inside, outside) for label, inside, outside in rows}
    untuned, mean = by_label["untuned"], by_label["mean"]
    for label, inside, outside in rows[1:]:
        console.print(f"{label:>26}: out of family {outside - untuned[1]:+.4f} against the untuned chain; "
                      f"in family {inside - mean[0]:+.4f} against the mean objective")
    _summary.write(args.summary, [
        _summary.row("tune_shift", f"out-of-family score, {label}", outside, "score", peer=untuned[1],
                     peer_name="untuned chain", ratio=outside - untuned[1],
                     target="+0.01 over the untuned chain", note=f"in family {inside:.4f} (mean objective "
                                                                 f"{mean[0]:.4f})")
        for label, inside, outside in rows[1:]])


if __name__ == "__main__":
    main()
