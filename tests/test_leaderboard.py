"""The leaderboard over run records written directly: aggregation, ranking, differing keys, warnings, exports."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from vesuvius_lab.cli import main
from vesuvius_lab.core.config.spec import Experiment
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.reports import leaderboard_view as view
from vesuvius_lab.core.reports.leaderboard import build_leaderboard
from vesuvius_lab.core.reports.row_filter import parse_filter

_started = iter(range(1_000_000, 2_000_000))


def spec_of(name: str, fold: int, *, folds: int = 3, lr: float = 1e-3, encoder: str = "resnet18",
            root: str = "/data/a", postprocess: list | None = None, model: str = "smp_unet25d",
            loss: list | None = None) -> dict:
    return Experiment.model_validate({
        "name": name, "description": f"about {name}",
        "data": {"root": root, "folds": folds, "fold": fold},
        "model": {"plugin": model, "params": {"encoder": encoder} if model.startswith("smp_") else {}},
        "train": {"lr": lr, "epochs": 4},
        "postprocess": postprocess or [],
    } | ({"loss": loss} if loss else {})).model_dump(mode="json")


def make_run(runs_dir: Path, name: str, fold: int, score: float | None = None, *, state: str = "finished",
             status: dict | None = None, wall: float = 100.0, commit: str = "abc1234", **spec_args) -> Path:
    """A run folder as core.train leaves it, written directly; ``score=None`` leaves no summary."""
    path = runs_dir / name / f"fold{fold}-{next(_started)}"
    (path / "checkpoints").mkdir(parents=True)
    (path / "spec.json").write_text(json.dumps(spec_of(name, fold, **spec_args)))
    (path / "env.json").write_text(json.dumps({"git": {"commit": commit, "dirty": False},
                                               "started_unix": float(next(_started))}))
    record = {"state": state, "pid": os.getpid(), "host": socket.gethostname(), "epoch": 2} | (status or {})
    (path / "status.json").write_text(json.dumps(record))
    if score is not None:
        (path / "summary.json").write_text(json.dumps({
            "experiment": name, "fold": fold, "run": path.name, "score": score, "topo_score": score / 2,
            "surface_dice": min(1.0, score + 0.1), "voi_score": score, "voi_split": 0.1, "voi_merge": 0.2,
            "steps": {"threshold": score}, "best_epoch": 3, "epochs": 4, "wall_time_s": wall,
            "parameters": 1_000_000}))
    return path


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def runs(tmp_path) -> Path:
    """a: 3 folds (0.5, 0.6, 0.7); b: 3 folds at 0.4, another lr and encoder; c: fold 0 only, min_voxels 50."""
    runs_dir = tmp_path / "runs"
    for fold, score in enumerate((0.5, 0.6, 0.7)):
        make_run(runs_dir, "a", fold, score, wall=100 + fold)
    for fold in range(3):
        make_run(runs_dir, "b", fold, 0.4, lr=3e-4, encoder="resnet34", wall=50, root="/elsewhere")
    make_run(runs_dir, "c", 0, 0.45, postprocess=[{"plugin": "remove_small_components", "params": {"min_voxels": 50}}])
    return runs_dir


def names(board) -> list[str]:
    return [row.experiment for row in board.rows]


# --------------------------------------------------------------------------- model


def test_folds_are_aggregated_as_mean_std_and_n(runs):
    board = build_leaderboard(runs)
    a = board.rows[0]
    assert a.experiment == "a"
    assert a.stats["score"].mean == pytest.approx(0.6)
    assert a.stats["score"].std == pytest.approx(0.1)  # sample standard deviation
    assert a.stats["score"].n == 3 and a.folds == [0, 1, 2] and a.folds_total == 3
    b = next(row for row in board.rows if row.experiment == "b")
    assert b.stats["score"].std == pytest.approx(0.0)
    c = next(row for row in board.rows if row.experiment == "c")
    assert c.stats["score"].n == 1 and c.stats["score"].std is None


def test_rows_are_ranked_by_score_with_delta_to_the_best_or_a_baseline(runs):
    board = build_leaderboard(runs)
    assert names(board) == ["a", "c", "b"]
    assert [row.rank for row in board.rows] == [1, 2, 3]
    assert [round(row.delta, 6) for row in board.rows] == [0.0, -0.15, -0.2]
    against_b = build_leaderboard(runs, baseline="b")
    assert [round(row.delta, 6) for row in against_b.rows] == [0.2, 0.05, 0.0]
    with pytest.raises(UserError, match='no finished, scored experiment or run.*Did you mean "b"'):
        build_leaderboard(runs, baseline="bb")


def test_equal_scores_share_a_rank(tmp_path):
    for name, score in (("x", 0.5), ("y", 0.5), ("z", 0.4)):
        make_run(tmp_path, name, 0, score, folds=2)
    assert [row.rank for row in build_leaderboard(tmp_path).rows] == [1, 1, 3]


def test_only_differing_settings_become_columns(runs):
    board = build_leaderboard(runs)
    # name, description, data.root and data.fold differ too but are never columns; the
    # post-processing plugin has its own column, its params are a setting.
    assert set(board.spec_keys) == {"model.params.encoder", "train.lr", "postprocess.0.params.min_voxels"}
    only_a = build_leaderboard(runs, filters=["experiment=a"])
    assert only_a.spec_keys == []


def test_runs_mode_has_one_row_per_run(runs):
    board = build_leaderboard(runs, per_run=True)
    assert len(board.rows) == 7
    assert [row.rank for row in board.rows] == [1, 2, 3, 4, 5, 5, 5]  # b's three folds tie
    assert board.rows[0].records[0].fold == 2 and board.rows[0].stats["score"].std is None


def test_runs_that_cannot_be_ranked_are_listed_never_dropped(runs):
    make_run(runs, "a", 0, None, state="failed", status={"error": "RuntimeError: CUDA out of memory"})
    make_run(runs, "d", 1, None, state="running", status={"pid": dead_pid()})  # killed with SIGKILL
    make_run(runs, "e", 0, None, state="running")  # this test's own process: alive
    make_run(runs, "f", 2, None, state="interrupted")
    make_run(runs, "g", 0, None, state="finished")  # finished, but no summary
    board = build_leaderboard(runs)
    assert names(board) == ["a", "c", "b"]
    kinds = {(n.experiment, n.kind) for n in board.notices}
    assert {("a", "failed"), ("d", "killed"), ("e", "running"), ("f", "interrupted"), ("g", "no score")} <= kinds
    failed = next(n for n in board.notices if n.kind == "failed")
    assert "CUDA out of memory" in failed.message
    killed = next(n for n in board.notices if n.kind == "killed")
    assert "vlab train --resume" in killed.message and str(killed.path) in killed.message


def test_missing_folds_are_warned_about(runs):
    make_run(runs, "c", 2, None, state="failed", status={"error": "boom"})
    board = build_leaderboard(runs)
    missing = [n for n in board.notices if n.kind == "missing folds"]
    assert [n.experiment for n in missing] == ["c"]
    assert "1 of 3 folds" in missing[0].message and "1, 2 (failed)" in missing[0].message


def test_newest_run_of_a_fold_counts_and_older_ones_are_noted(runs):
    make_run(runs, "b", 0, 0.9, lr=3e-4, encoder="resnet34", root="/elsewhere")  # a rerun of fold 0
    board = build_leaderboard(runs)
    b = next(row for row in board.rows if row.experiment == "b")
    assert b.stats["score"].mean == pytest.approx((0.9 + 0.4 + 0.4) / 3) and b.stats["score"].n == 3
    assert any(n.kind == "superseded" and n.experiment == "b" for n in board.notices)


def test_folds_with_different_settings_are_noted(tmp_path):
    make_run(tmp_path, "m", 0, 0.5, folds=2)
    make_run(tmp_path, "m", 1, 0.5, folds=2, lr=0.01)
    (notice,) = [n for n in build_leaderboard(tmp_path).notices if n.kind == "mixed settings"]
    assert "train.lr" in notice.message


def test_half_written_and_garbage_records_do_not_break_reading(runs):
    torn = make_run(runs, "h", 0, 0.3)
    (torn / "summary.json").write_text('{"experiment": "h", "score": 0.')
    binary = make_run(runs, "i", 0, 0.3)
    (binary / "summary.json").write_bytes(b"\xff\xfe\x00garbage")
    (binary / "status.json").write_bytes(b"\x89PNG\xff")
    (binary / "env.json").write_text("[1, 2")
    board = build_leaderboard(runs)
    assert names(board) == ["a", "c", "b"]
    assert {("h", "no score"), ("i", "unfinished")} <= {(n.experiment, n.kind) for n in board.notices}
    text = render_rich(board)
    assert "h/" in text and "i/" in text


# --------------------------------------------------------------------------- filters, sort, top


def test_filters_sort_and_top(runs):
    assert names(build_leaderboard(runs, filters=["score>0.45"])) == ["a"]
    assert names(build_leaderboard(runs, filters=["score>=0.45"])) == ["a", "c"]
    assert names(build_leaderboard(runs, filters=["train.lr<=1e-3", "train.lr>1e-4"])) == ["a", "c", "b"]
    assert names(build_leaderboard(runs, filters=["model.params.encoder=resnet3*"])) == ["b"]
    assert names(build_leaderboard(runs, filters=["experiment!=a"])) == ["c", "b"]
    assert names(build_leaderboard(runs, filters=["postprocess~SMALL"])) == ["c"]
    assert names(build_leaderboard(runs, filters=["model=smp_unet25d"])) == ["a", "c", "b"]
    assert names(build_leaderboard(runs, filters=["postprocess.0.params.min_voxels=50"])) == ["c"]
    filtered = build_leaderboard(runs, filters=["experiment!=a"])
    assert [row.rank for row in filtered.rows] == [1, 2]  # rank among the rows compared
    assert names(build_leaderboard(runs, sort="wall")) == ["b", "c", "a"]  # lower is better
    assert names(build_leaderboard(runs, sort="train.lr")) == ["b", "a", "c"]
    top = build_leaderboard(runs, top=2)
    assert names(top) == ["a", "c"] and top.hidden_rows == 1


@pytest.mark.parametrize("text", ["score", "score>>0.5", "=3", "score>abc"])
def test_bad_filters_explain_the_grammar(text):
    with pytest.raises(UserError, match="--filter"):
        parse_filter(text)


def test_unknown_keys_get_a_suggestion(runs):
    with pytest.raises(UserError, match='Did you mean "score"'):
        build_leaderboard(runs, sort="scroe")
    with pytest.raises(UserError, match="train.lrr"):
        build_leaderboard(runs, filters=["train.lrr>1"])


def test_a_missing_runs_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such runs folder"):
        build_leaderboard(tmp_path / "nope")


# --------------------------------------------------------------------------- exports


def render_rich(board) -> str:
    console = Console(file=io.StringIO(), width=250, color_system=None)
    view.print_leaderboard(board, console, console)
    return console.file.getvalue()


def experiments_in_order(text: str, candidates: list[str]) -> list[str]:
    found = sorted((match.start(), name) for name in candidates
                   for match in re.finditer(rf"(?<![\w-]){name}(?![\w-])", text))
    return list(dict.fromkeys(name for _, name in found))


def test_every_export_carries_the_same_rows(runs):
    board = build_leaderboard(runs, filters=["score<0.65"])
    order = names(board)
    assert order == ["a", "c", "b"]
    rich = render_rich(board).split("same in every row")[0]
    assert experiments_in_order(rich, order) == order
    md_rows = [line for line in view.markdown(board).splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[1] for line in md_rows] == order
    csv_rows = list(csv.DictReader(io.StringIO(view.to_csv(board))))
    assert [r["experiment"] for r in csv_rows] == order
    assert float(csv_rows[0]["score"]) == pytest.approx(0.6) and float(csv_rows[0]["score_std"]) == pytest.approx(0.1)
    document = json.loads(view.to_json(board))
    assert [r["experiment"] for r in document["rows"]] == order
    assert document["rows"][1]["postprocess.0.params.min_voxels"] == 50
    html_rows = re.findall(r"<tr class=\"[^\"]*\">(.*?)</tr>", view.html_page(board))
    assert [re.findall(r"<td[^>]*>(.*?)</td>", row)[1] for row in html_rows] == order


def test_the_best_value_of_each_scored_column_is_highlighted(runs):
    board = build_leaderboard(runs)
    md = view.markdown(board)
    a_line = next(line for line in md.splitlines() if line.startswith("| 1 | a |"))
    assert "**0.6000 ± 0.1000**" in a_line  # best score
    b_line = next(line for line in md.splitlines() if "| b |" in line)
    assert "**50 s /fold**" in b_line  # fastest
    assert "**1.0 M**" not in md  # the same in every row: nothing to highlight
    assert 'class="num best"' in view.html_page(board)


def test_cli_leaderboard_formats_and_html_file(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLAB_RUNS", "")  # --runs writes it; undone after the test
    main(["leaderboard", str(runs), "--json", "--filter", "score>0.42"])
    document = json.loads(capsys.readouterr().out)
    assert [r["experiment"] for r in document["rows"]] == ["a", "c"]
    main(["leaderboard", str(runs), "--runs", "--csv", "--top", "2", "--html", str(tmp_path / "board.html")])
    captured = capsys.readouterr()
    assert [r["run"].startswith("fold") for r in csv.DictReader(io.StringIO(captured.out))] == [True, True]
    assert "<table>" in (tmp_path / "board.html").read_text()
    main(["--runs", str(runs), "leaderboard", "--md", "--baseline", "b"])
    assert "| +0.2000 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["leaderboard", str(runs), "--filter", "score=>1"])
    assert exit_info.value.code == 2


def test_runs_of_another_task_are_named_not_ranked(runs):
    stitcher = make_run(runs, "stitcher", 0, 0.99)
    spec = json.loads((stitcher / "spec.json").read_text())
    spec["data"]["task"] = "hole_stitching"
    (stitcher / "spec.json").write_text(json.dumps(spec))
    board = build_leaderboard(runs)
    assert "stitcher" not in names(board)
    assert any(n.kind == "other task" and n.experiment == "stitcher" for n in board.notices)
    assert names(build_leaderboard(runs, task="hole_stitching")) == ["stitcher"]
