"""Every table of ``vlab`` fits any page and a log: essential cells whole on their row's line, the others
whole, ellipsized or on a table below, no word broken, no line wider than the page; ``--wide`` keeps all."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console
from rich.text import Text
from test_leaderboard import make_run

from vesuvius_lab.cli import _type_name
from vesuvius_lab.core import registry
from vesuvius_lab.core.data.synthetic import write_dataset
from vesuvius_lab.core.metric.score import VolumeScore
from vesuvius_lab.core.reports import leaderboard_view as view
from vesuvius_lab.core.reports.compare import compare_runs, tables
from vesuvius_lab.core.reports.leaderboard import build_leaderboard
from vesuvius_lab.core.reports.score_view import scores_table
from vesuvius_lab.core.reports.tables import ESSENTIAL, KEY, OPTIONAL, WRAP, Col, FittedTable
from vesuvius_lab.core.runs.folder import Run

WIDTHS = (80, 120, 160)
LOG_WIDTH = 120  # a pipe or a log file without COLUMNS
ANSI = re.compile(r"\x1b\[[0-9;]*m")
CHAIN_A = [{"plugin": "remove_small_components", "params": {"min_voxels": 50}}, {"plugin": "fill_holes"},
           {"plugin": "plug_holes"}]
CHAIN_B = [{"plugin": "threshold", "params": {"low": 0.3, "high": 0.6}}, {"plugin": "close"},
           {"plugin": "plug_holes"}, {"plugin": "remove_small_components", "params": {"min_voxels": 500}}]
SKELETON = [{"plugin": "dice", "weight": 1.0}, {"plugin": "bce", "weight": 1.0},
            {"plugin": "skeleton_recall", "weight": 1.0}]
EXPERIMENTS = {  # name: (fold scores, run settings)
    "quick-unet25d-stitched": ((0.5722, 0.5845, 0.5968), dict(loss=SKELETON, postprocess=CHAIN_A)),
    "quick-monai-unet": ((0.5101, 0.5233, 0.5467), dict(model="monai_unet", lr=3e-4, loss=[{"plugin": "dice"}],
                                                         postprocess=CHAIN_A[:1])),
    "quick-unetpp25d-topology-cldice": ((0.4412, 0.4533, 0.4654), dict(
        model="smp_unetpp25d", encoder="resnet34", lr=1e-4, postprocess=CHAIN_B,
        loss=[{"plugin": "cldice", "weight": 0.5}, {"plugin": "tversky", "weight": 0.5}])),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Three experiments of three folds each (so ± std), long names, long chains, several differing keys,
    a tuned row, and a failed run (a notice below the table)."""
    runs_dir = tmp_path_factory.mktemp("tables") / "runs"
    for name, (scores, settings) in EXPERIMENTS.items():
        for fold, score in enumerate(scores):
            make_run(runs_dir, name, fold, score, wall=3725 + fold, **settings)
    tuned = make_run(runs_dir, "quick-unet25d-stitched-tuned", 0, 0.6012, **EXPERIMENTS[
        "quick-unet25d-stitched"][1])
    summary = json.loads((tuned / "summary.json").read_text())
    (tuned / "summary.json").write_text(json.dumps(summary | {"kind": "tuned", "estimate": "cross-validated"}))
    make_run(runs_dir, "quick-monai-unet", 1, None, state="failed",
             status={"error": "RuntimeError: CUDA out of memory while predicting the validation volumes"})
    return runs_dir


@pytest.fixture(scope="module")
def single_fold_runs(tmp_path_factory) -> Path:
    """One fold per experiment, named as `make demo` names them: no std, so the essential columns fit 80."""
    runs_dir = tmp_path_factory.mktemp("single") / "runs"
    for name, (scores, settings) in zip(("quick-unet25d", "quick-monai-unet", "quick-ensemble-tuned"),
                                        EXPERIMENTS.values()):
        make_run(runs_dir, name, 0, scores[1], **settings)
    return runs_dir


# --------------------------------------------------------------------------- checks, for any fitted table


def render(renderable, width: int, terminal: bool) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=terminal,
                      color_system="truecolor" if terminal else None)
    console.print(renderable, crop=False)
    return ANSI.sub("", console.file.getvalue())


def row_lines(text: str, keys: list[str]) -> list[str]:
    """The lines that start with a row's key cells (one per table it is on)."""
    pattern = re.compile(r"^\s*" + r"\s+".join(map(re.escape, keys)) + r"(\s|$)")
    return [line for line in text.splitlines() if pattern.match(line)]


def shortened(text: str, line: str) -> bool:
    """``text`` is on ``line`` whole, or as a prefix ending in an ellipsis."""
    return text in line or any(f"{text[:k]}…" in line for k in range(1, len(text)))


def words(text: str) -> set[str]:
    return {word for word in text.split() if word.strip("─")}


def assert_no_word_broken(text: str, whole: str) -> None:
    """Every word of ``text`` is a word of ``whole`` (the same output with room for everything), or a
    prefix of one ending in an ellipsis."""
    vocabulary = words(whole)
    for word in words(text):
        stem = word[:-1] if word.endswith("…") else None
        assert word in vocabulary or (stem is not None and any(w.startswith(stem) for w in vocabulary)), word


def assert_fits(text: str, width: int) -> None:
    widest = max(text.splitlines(), key=cell_len)
    assert cell_len(widest) <= width, f"{cell_len(widest)} > {width}: {widest!r}"


def assert_fitted(table: FittedTable, text: str, *, one_line: bool) -> None:
    """Each row's essential cells whole on its first line (``one_line``) or on one of its lines; the
    optional cells whole or ellipsized on one of them; the words of wrapped cells whole."""
    keys = [i for i, c in enumerate(table.columns) if c.role == KEY]
    for row in table.rows:
        lines = row_lines(text, [row.cells[i].plain for i in keys])
        assert lines, [row.cells[i].plain for i in keys]
        for index, column in enumerate(table.columns):
            cell = row.cells[index].plain
            if not cell or column.role == KEY:
                continue
            if column.role == ESSENTIAL:
                assert cell in (lines[0] if one_line else "\n".join(lines)), (cell, lines)
            elif column.role == OPTIONAL:
                assert any(shortened(cell, line) for line in lines), (cell, lines)
            else:
                assert words(cell) <= words(text), cell


# --------------------------------------------------------------------------- the leaderboard


def leaderboard_text(board, width: int, terminal: bool, wide: bool = False) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=terminal,
                      color_system="truecolor" if terminal else None)
    view.print_leaderboard(board, console, console, wide=wide)
    return ANSI.sub("", console.file.getvalue())


def essentials(board, row) -> list[str]:
    return [view.cell(board, row, key) for key in ("score", "topo_score", "surface_dice", "voi_score", "folds")]


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "no-terminal"])
@pytest.mark.parametrize("width", WIDTHS)
def test_leaderboard_fits_the_page_with_scores_whole(runs, width, terminal):
    board = build_leaderboard(runs)
    text = leaderboard_text(board, width, terminal)
    assert_fits(text, width)
    assert_no_word_broken(text, leaderboard_text(board, 1000, False))
    # rank, experiment, score ± std, its parts and folds whole on one line once the page has room for them
    assert_fitted(view.rich_table(board), text, one_line=width >= 120)
    for row in board.rows:
        first = row_lines(text, [str(row.rank), row.experiment])[0]
        assert "0.5845 ± 0.0123" in text and view.cell(board, row, "score") in first
        if width >= 120:
            assert all(cell in first for cell in essentials(board, row)), first
    if width >= 120:  # settings move whole to a table below where they can; at 80 the chain is ellipsized
        assert "threshold → close → plug_holes → remove_small_components" in text
    assert "CUDA out of memory while predicting the validation volumes" in " ".join(text.split())


def test_without_the_std_every_essential_cell_fits_80_columns(single_fold_runs):
    board = build_leaderboard(single_fold_runs)
    text = leaderboard_text(board, 80, False)
    assert_fits(text, 80)
    for row in board.rows:
        first = row_lines(text, [str(row.rank), row.experiment])[0]
        assert all(cell in first for cell in essentials(board, row)), first


def test_one_row_per_run_is_keyed_by_rank_experiment_and_fold(runs):
    board = build_leaderboard(runs, per_run=True)
    table = view.rich_table(board)
    assert [c.header for c in table.columns if c.role == KEY] == ["#", "experiment", "fold"]
    text = leaderboard_text(board, 80, False)
    assert_fits(text, 80)
    assert_fitted(table, text, one_line=True)  # one fold: no std, so the scores fit beside the keys


def test_settings_move_to_a_table_below_keyed_by_rank_and_experiment(runs):
    board = build_leaderboard(runs)
    table = view.rich_table(board)
    layout = table.layout(80)
    assert len(layout) > 1
    headers = [[table.columns[p.index].header for p in placed] for placed in layout]
    assert all(h[:2] == ["#", "experiment"] for h in headers)  # every table starts with the keys
    shown = [h for placed in headers for h in placed[2:]]
    assert sorted(shown) == sorted(c.header for c in table.columns[2:])  # each column once, none dropped
    assert all(p.width > 0 for placed in layout for p in placed)
    loss = next(i for i, c in enumerate(table.columns) if c.header == "loss")
    assert next(p for placed in layout for p in placed if p.index == loss).mode == "whole"


def test_wide_prints_one_table_with_every_value_whole(runs):
    board = build_leaderboard(runs)
    assert len(board.spec_keys) > view.MAX_TERMINAL_SPEC_COLUMNS
    text = leaderboard_text(board, 80, False, wide=True)
    assert max(map(cell_len, text.splitlines())) > 80
    assert "not shown here" not in text
    for row, cells in zip(board.rows, view.text_rows(board)):
        (line,) = row_lines(text, [str(row.rank), row.experiment])
        for key, (cell, _) in zip([c.key for c in board.columns] + board.spec_keys, cells):
            if key not in ("experiment", "blend", "commit"):  # the name is the key; blend and git are the same in all
                assert cell in line, (key, cell, line)


# --------------------------------------------------------------------------- through the command line


def vlab(args: list[str], columns: int | None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "VLAB_RUNS", "VLAB_DATA")}
    env |= {"COLUMNS": str(columns)} if columns else {}
    result = subprocess.run([sys.executable, "-m", "vesuvius_lab", *args], capture_output=True, text=True,
                            timeout=120, env=env)  # stdout is a pipe, as in a log
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("columns", [80, 120, 160, None], ids=["80", "120", "160", "log"])
def test_cli_leaderboard_in_a_pipe(runs, columns):
    text = vlab(["leaderboard", str(runs)], columns).stdout
    width = columns or LOG_WIDTH
    assert_fits(text, width)
    board = build_leaderboard(runs)
    assert_fitted(view.rich_table(board), text, one_line=width >= 120)
    assert_no_word_broken(text, vlab(["leaderboard", str(runs)], 1000).stdout)


def test_cli_wide_and_the_exports_ignore_the_page_width(runs):
    wide = vlab(["leaderboard", str(runs), "--wide"], 80).stdout
    board = build_leaderboard(runs)
    for row in board.rows:
        (line,) = row_lines(wide, [str(row.rank), row.experiment])
        assert all(view.cell(board, row, key) in line for key in ("loss", "postprocess", "score", "wall_time"))
    assert vlab(["leaderboard", str(runs), "--md"], 80).stdout == view.markdown(board)
    assert vlab(["leaderboard", str(runs), "--csv"], 80).stdout == view.to_csv(board)


# --------------------------------------------------------------------------- the other tables


def scored(runs: Path, name: str, fold: int) -> Path:
    path = next((runs / name).glob(f"fold{fold}-*"))
    volumes = [{"id": f"scroll{n}_chunk_{n * 7:03d}_with_a_long_id", "score": 0.5 + n / 10, "topo_score": 0.3,
                "surface_dice": 0.7, "voi_score": 0.6 - n / 10} for n in range(3)]
    (path / "scores.json").write_text(json.dumps({"volumes": volumes}))
    return path


@pytest.mark.parametrize("width", WIDTHS)
def test_compare_tables_fit(runs, width):
    comparison = compare_runs(Run(scored(runs, "quick-unet25d-stitched", 0)),
                              Run(scored(runs, "quick-unetpp25d-topology-cldice", 1)))
    for table in tables(comparison):
        text = render(table, width, True)
        assert_fits(text, width)
        assert_no_word_broken(text, render(table, 1000, False))
        assert_fitted(table, text, one_line=True)
    wide = tables(comparison, wide=True)[1]  # "what each run used": both chains whole on their lines
    text = render(wide, 80, False)
    assert "threshold → close → plug_holes → remove_small_components" in text


@pytest.mark.parametrize("width", WIDTHS)
def test_evaluate_table_fits(width):
    scores = [(f"{volume}_{n:03d}", VolumeScore(0.5 + n / 100, 0.25, 0.625, 0.5, 0.125, 0.25,
                                                  {0: (4, 15, 4), 1: (120, 300, 150), 2: (0, 3, 1)}))
              for n, volume in enumerate(("case101_03_merge", "case101_06_noise", "hand_odd_shape"))]
    table = scores_table(scores)
    for terminal in (True, False):
        text = render(table, width, terminal)
        assert_fits(text, width)
        assert_no_word_broken(text, render(table, 1000, False))
        assert_fitted(table, text, one_line=True)
        assert "0.5000 (0.375)" in row_lines(text, ["case101_03_merge_000"])[0]


@pytest.mark.parametrize("columns", [80, 120])
def test_cli_plugins_keep_group_name_package_status_whole(columns):
    listing = json.loads(vlab(["plugins", "--json"], None).stdout)
    text = vlab(["plugins"], columns).stdout
    assert_fits(text, columns)
    assert_no_word_broken(text, vlab(["plugins"], 1000).stdout)
    for plugin in listing:
        lines = row_lines(text, [plugin["group"], plugin["name"]])
        assert f"{plugin['package']} {plugin['version']}" in lines[0] and plugin["status"] in lines[0]
        assert any(shortened(plugin["summary"], line) for line in lines)


def test_cli_plugins_show_wraps_help_between_words():
    found = registry.load("models", "smp_unet25d")
    text = vlab(["plugins", "show", "models", "smp_unet25d"], 80).stdout
    assert_fits(text, 80)
    assert_no_word_broken(text, vlab(["plugins", "show", "models", "smp_unet25d"], 1000).stdout)
    for name, info in found.Params.model_fields.items():
        assert row_lines(text, [name]), name
        assert words(_type_name(info.annotation) + " " + (info.description or "")) <= words(text)


def test_cli_data_check_fits(tmp_path):
    write_dataset(tmp_path / "data", n=24, shape=(8, 16, 16), seed=0, scrolls=24, n_test=1)
    text = vlab(["data", "check", str(tmp_path / "data")], 80).stdout
    assert_fits(text, 80)
    assert_no_word_broken(text, vlab(["data", "check", str(tmp_path / "data")], 1000).stdout)
    assert row_lines(text, ["training", "volumes", "24"]) and row_lines(text, ["shapes", "8x16x16", "(25)"])
    assert len(row_lines(text, ["scrolls"])) == 1 and text.count("(1)") == 24  # 24 scrolls, wrapped between them


# --------------------------------------------------------------------------- the rule itself


def table_of(*columns: Col) -> FittedTable:
    table = FittedTable(columns)
    table.add_row("3", "an-experiment-name", "0.5845 ± 0.0123", "a long chain → of several → post-processing steps",
                  "prose that wraps between its words")
    return table


def test_essential_columns_never_shrink_optional_ones_move_or_shorten():
    columns = (Col("#", KEY), Col("experiment", KEY), Col("score", ESSENTIAL), Col("chain"), Col("note", WRAP))
    table = table_of(*columns)
    (first, second) = table.layout(76)  # the chain does not fit beside the score: whole, on a table below
    assert [p.index for p in first] == [0, 1, 2, 4] and [p.index for p in second] == [0, 1, 3]
    assert next(p for p in second if p.index == 3).mode == "whole"
    narrow = table.layout(40)  # the chain fits beside nothing: a table of its own, ellipsized
    chain = next(p for placed in narrow for p in placed if p.index == 3)
    assert chain.mode == "ellipsis" and all(sum(p.width for p in placed) + 2 * (len(placed) - 1) <= 40
                                            for placed in narrow)
    text = render(table, 40, False)
    assert_fits(text, 40)
    assert "0.5845 ± 0.0123" in text and re.search(r"a long chain → \S*…", text)
    assert_no_word_broken(text, render(table, 200, False))  # the prose wraps between its words
    in_place = table_of(*columns[:3], Col("chain", OPTIONAL, min_width=12), columns[4])
    assert len(in_place.layout(70)) == 1 and "…" in render(in_place, 70, False)


def test_wide_is_one_table_at_whole_widths():
    table = table_of(Col("#", KEY), Col("experiment", KEY), Col("score", ESSENTIAL), Col("chain"), Col("note", WRAP))
    table.wide = True
    (placed,) = table.layout(20)
    assert [p.width for p in placed] == [table.natural(i) for i in range(5)]
    text = render(table, 20, False)
    assert "a long chain → of several → post-processing steps" in text and "prose that wraps between its words" in text


def test_a_cell_is_one_line():
    table = FittedTable([Col("k", KEY), Col("v", ESSENTIAL)])
    table.add_row("a", Text("first line\nsecond line"))
    assert "first line second line" in render(table, 80, False)


def test_an_essential_cell_stays_whole_even_beside_a_key_too_wide_for_the_page():
    table = FittedTable([Col("experiment", KEY), Col("score", ESSENTIAL), Col("note", WRAP)])
    table.add_row("x" * 70, "0.5845 ± 0.0123", "prose that wraps between its words")
    text = render(table, 80, False)
    assert any("0.5845 ± 0.0123" in line for line in row_lines(text, ["x" * 70]))  # a line wider than the page
    assert_no_word_broken(text, render(table, 200, False))
