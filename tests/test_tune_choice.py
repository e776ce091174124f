"""How `vlab tune` scores and chooses a chain: objectives over groups, plateaus, and the notices a careful
user would check by eye, on constructed studies."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli, tiny_experiment

from vesuvius_lab.core.config.experiment import load_experiment
from vesuvius_lab.core.config.spec import TuneRange
from vesuvius_lab.core.tuning import plateau
from vesuvius_lab.core.tuning.notices import (all_notices, disagreement_notices, edge_notices, flat_notices,
                                                profiles)
from vesuvius_lab.core.tuning.space import position
from vesuvius_lab.core.tuning.objective import Objective, volume_groups

GROUPS = {"a1": "A", "a2": "A", "b1": "B", "c1": "C"}


# --------------------------------------------------------------------------- objectives


def test_the_objectives_reduce_per_volume_scores_over_groups():
    scores = {"a1": 0.8, "a2": 0.6, "b1": 0.5, "c1": 0.9}  # group means: A 0.7, B 0.5, C 0.9
    assert Objective("mean", GROUPS).value(scores) == pytest.approx(0.7)
    assert Objective("worst_group", GROUPS).value(scores) == pytest.approx(0.5)
    means = np.array([0.7, 0.5, 0.9])
    assert Objective("mean_minus_std", GROUPS, k=2).value(scores) == pytest.approx(means.mean() - 2 * means.std())
    # on a subset (a cross-validation search), only the groups present count
    assert Objective("worst_group", GROUPS).value({"a1": 0.8, "c1": 0.9}) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        Objective("median", GROUPS)


def test_volumes_are_grouped_by_scroll_unless_they_come_from_one():
    folds = {"x": 0, "y": 1, "z": 1}
    groups, by = volume_groups({"x": "s1", "y": "s2", "z": "s2"}, folds, "scroll")
    assert by == "scroll" and groups == {"x": "scroll s1", "y": "scroll s2", "z": "scroll s2"}
    groups, by = volume_groups({"x": "s1", "y": "s1", "z": "s1"}, folds, "scroll")
    assert by == "fold" and groups["y"] == groups["z"] != groups["x"]
    assert volume_groups({"x": "s1", "y": "s2", "z": "s2"}, folds, "fold")[1] == "fold"


# --------------------------------------------------------------------------- plateaus


def test_neighbours_move_one_key_at_a_time_within_its_range_and_kind():
    space = {"t": TuneRange(low=0.0, high=1.0), "n": TuneRange(low=1.0, high=1000.0, log=True),
             "i": TuneRange(low=0, high=4), "c": TuneRange(choices=[0.2, 0.3, 0.4])}
    around = plateau.neighbours(space, {"t": 0.95, "n": 10, "i": 0, "c": 0.2}, 0.1)
    moved = {key: sorted(n[key] for n in around if n[key] != {"t": 0.95, "n": 10, "i": 0, "c": 0.2}[key])
             for key in space}
    assert moved["t"] == pytest.approx([0.85, 1.0])  # clipped at the high end
    assert moved["n"] == pytest.approx([10 / 1000 ** 0.1, 10 * 1000 ** 0.1])  # on the log scale
    assert moved["i"] == [1]  # a radius below one step still moves an integer by one
    assert moved["c"] == [0.3]  # the adjacent choice; none below the first
    assert all(isinstance(n["i"], int) for n in around)


def test_a_plateau_is_preferred_to_a_narrow_peak():
    space = {"x": TuneRange(low=0.0, high=1.0)}

    def landscape(x: float) -> float:  # a broad hill at 0.3 (0.75), a needle at 0.9 (0.80)
        return max(0.75 - 2 * (x - 0.3) ** 2, 0.80 if abs(x - 0.9) < 0.02 else 0.0)

    trials = [({"x": x}, landscape(x)) for x in (0.9, 0.3, 0.5, 0.1, 0.7)]
    chosen, record = plateau.choose(space, trials, 0.1, lambda values: landscape(values["x"]))
    assert chosen == {"x": 0.3}
    assert record["candidates"][record["chosen"]]["values"] == {"x": 0.3}
    assert record["drop"] == pytest.approx(0.75 - np.mean([0.75, 0.75 - 0.02, 0.75 - 0.02]))
    # the needle's neighbourhood is recorded as the drop it is
    needle = next(c for c in record["candidates"] if c["values"] == {"x": 0.9})
    assert needle["score"] - needle["neighbourhood"] > 0.2


def test_a_refused_neighbour_counts_as_the_worst_score_around_a_candidate():
    space = {"low": TuneRange(low=0.0, high=1.0), "high": TuneRange(low=0.0, high=1.0)}

    def hysteresis(values: dict) -> float | None:  # refused where low > high; a needle on the low = high cliff
        low, high = values["low"], values["high"]
        if low > high:
            return None
        if (low, high) == (0.6, 0.6):
            return 0.62
        return 0.60 if max(abs(low - 0.6), abs(high - 0.6)) <= 0.15 else 0.605

    corner, inner = {"low": 0.6, "high": 0.6}, {"low": 0.3, "high": 0.4}
    chosen, record = plateau.choose(space, [(corner, 0.62), (inner, 0.605)], 0.1, hysteresis)
    at_corner = record["candidates"][0]
    assert at_corner["refused"] == 2 and at_corner["neighbours"] == 2
    assert at_corner["neighbourhood"] == pytest.approx(np.mean([0.62, 0.60, 0.60, 0.60, 0.60]))
    # the corner's two scored neighbours alone would average 0.6067 and win; its cliff makes it 0.604
    assert chosen == inner and record["neighbourhood"] == pytest.approx(0.605)
    _, alone = plateau.choose(space, [({"low": 0.5, "high": 0.5}, 0.6)], 0.1, lambda values: None)
    assert alone["neighbourhood"] == pytest.approx(0.6) and alone["candidates"][0]["neighbours"] == 0


# --------------------------------------------------------------------------- notices


def test_a_chosen_value_at_an_edge_is_noticed_only_where_the_step_accepts_more():
    space = {"low": TuneRange(low=0.05, high=0.5), "n": TuneRange(low=10, high=2000, log=True),
             "r": TuneRange(low=0, high=2), "mid": TuneRange(low=0.0, high=1.0),
             "c": TuneRange(choices=[0.3, 0.4, 0.5])}
    chosen = {"low": 0.49, "n": 10, "r": 0, "mid": 0.5, "c": 0.5}
    notices = {n.key: n for n in edge_notices(space, chosen, accepts=lambda key, value: not (key == "r" and value < 0))}
    assert set(notices) == {"low", "n", "c"}  # r cannot go below 0; mid is inside
    assert notices["low"].detail["side"] == "high" and notices["low"].detail["try"] > 0.5
    assert notices["n"].detail["side"] == "low" and notices["n"].detail["try"] < 10
    # the step is asked about a value just past the edge: one that only a wide move would break still widens
    probed = edge_notices(space, chosen, accepts=lambda key, value: not (key == "low" and value > 0.52))
    assert "low" in {n.key for n in probed}
    assert "widen the range" in notices["low"].message and "upper edge" in notices["low"].message
    assert position(space["n"], 10) == 0.0 and position(space["n"], 2000) == 1.0


def test_past_an_edge_is_an_integer_for_integers_and_never_below_1_on_an_integer_log_range():
    from vesuvius_lab.core.tuning.notices import beyond

    radius = TuneRange(choices=[0, 1, 2])
    assert beyond(radius, "high", share=0.01) == 3 and beyond(radius, "high") == 3 and beyond(radius, "low") == -1
    notices = edge_notices({"r": radius}, {"r": 2}, accepts=lambda key, value: isinstance(value, int))
    assert [n.detail["try"] for n in notices] == [3]
    voxels = TuneRange(low=1, high=100, log=True)
    assert beyond(voxels, "low") is None and edge_notices({"v": voxels}, {"v": 1}) == []
    assert beyond(voxels, "high") > 100


def test_a_stepped_range_ends_at_its_last_step():
    stepped = TuneRange(low=0.1, high=0.5, step=0.15)  # Optuna's values: 0.1, 0.25, 0.4
    assert position(stepped, 0.4) == pytest.approx(1.0)
    assert [n.key for n in edge_notices({"s": stepped}, {"s": 0.4})] == ["s"]
    from vesuvius_lab.core.tuning.space import value_at

    assert value_at(stepped, 1.0) == pytest.approx(0.4) and value_at(TuneRange(low=0, high=10, step=4), 1.0) == 8


def test_a_key_that_does_not_change_the_score_is_flat_and_one_that_does_is_not():
    space = {"strong": TuneRange(low=0.0, high=1.0), "idle": TuneRange(low=1, high=500, log=True),
             "pick": TuneRange(choices=["a", "b"])}

    def landscape(values: dict) -> float | None:  # "idle" moves the score by 0.001 at most; "pick" b is refused
        if values["pick"] == "b":
            return None
        return 0.4 + 0.3 * values["strong"] + 0.001 * (values["idle"] > 100)

    found = profiles(space, {"strong": 0.5, "idle": 10, "pick": "a"}, landscape)
    assert [v for v, _ in found["strong"]] == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert [v for v, _ in found["idle"]][0] == 1 and [v for v, _ in found["idle"]][-1] == 500
    assert all(isinstance(v, int) for v, _ in found["idle"])
    notices = flat_notices(space, found)
    assert [n.key for n in notices] == ["idle"] and "does not matter" in notices[0].message
    assert notices[0].detail["effect"] == pytest.approx(0.001)  # "pick": one scored choice, nothing to compare
    # at the edge of its range, but flat: widening it gains nothing, so only the flat notice is given
    at_edge = {"strong": 0.5, "idle": 500, "pick": "a"}
    assert [n.key for n in edge_notices(space, at_edge)] == ["idle"]
    assert [(n.kind, n.key) for n in all_notices(space, at_edge, [], profiles(space, at_edge, landscape), {})] == \
        [("flat", "idle")]


def test_groups_best_at_far_apart_values_are_noticed_with_what_each_loses():
    space = {"x": TuneRange(low=0.0, high=1.0), "y": TuneRange(low=0.0, high=1.0)}
    groups = {"a": "scroll A", "b": "scroll B"}
    trials = []
    for number, x in enumerate(np.linspace(0, 1, 11)):
        volumes = {"a": 0.8 - abs(x - 0.1), "b": 0.8 - abs(x - 0.9)}  # A best at 0.1, B at 0.9
        trials.append({"number": number, "values": {"x": float(x), "y": 0.5}, "score": float(np.mean(list(volumes.values()))),
                       "volumes": volumes})
    chosen = trials[5]["values"]
    (notice,) = disagreement_notices(space, trials, groups, chosen)
    assert notice.kind == "groups disagree" and set(notice.detail["best"]) == {"x"}
    assert notice.detail["losses"] == pytest.approx({"scroll A": 0.4, "scroll B": 0.4})
    agreeing = [{**t, "volumes": {"a": t["volumes"]["a"], "b": t["volumes"]["a"]}} for t in trials]
    assert disagreement_notices(space, agreeing, groups, chosen) == []
    # far apart, but the chosen chain loses under 0.005 on each group: nothing to say
    shallow = [{**t, "volumes": {g: 0.8 - 0.004 * abs(t["values"]["x"] - centre) for g, centre in
                                 (("a", 0.1), ("b", 0.9))}} for t in trials]
    assert disagreement_notices(space, shallow, groups, chosen) == []


# --------------------------------------------------------------------------- the file


def test_tune_options_are_written_in_tune_beside_the_ranges(tmp_path):
    file = tmp_path / "e.toml"
    file.write_text(tiny_experiment() + '\n[tune]\nobjective = "worst_group"\nplateau = 0.1\n'
                    '"inference.threshold" = { low = 0.2, high = 0.7 }\n')
    spec = load_experiment(file).spec
    assert spec.tune_options.objective == "worst_group" and spec.tune_options.plateau == 0.1
    assert list(spec.tune) == ["inference.threshold"]
    assert load_experiment(file, ["tune.objective=\"mean_minus_std\""]).spec.tune_options.objective == "mean_minus_std"
    from vesuvius_lab.cli import cli
    from vesuvius_lab.core.tuning.objective import OBJECTIVES

    options = {p.name: p for p in cli.commands["tune"].params}  # the command line offers what the file accepts
    assert tuple(options["objective"].type.choices) == OBJECTIVES and options["plateau"].type.max == 0.5


def test_a_bad_tune_option_is_reported_at_its_line(tmp_path):
    file = tmp_path / "e.toml"
    text = tiny_experiment() + '\n[tune]\nobjective = "worst"\n"inference.threshold" = { low = 0.2, high = 0.7 }\n'
    file.write_text(text)
    line = text.splitlines().index('objective = "worst"') + 1
    result = run_cli(["validate", str(file)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"e.toml:{line}" in result.stderr and "tune.objective" in result.stderr
    assert "worst_group" in result.stderr


def test_the_tuning_picture_draws_profiles_and_marks_the_notices(tmp_path):
    from vesuvius_lab.core.reports.pictures import tuning_curves

    trials = [{"number": i, "score": 0.5 + 0.01 * i, "values": {"a": 0.1 * i, "b": 10 * (i + 1)}} for i in range(8)]
    notices = [{"kind": "edge", "key": "a", "message": "a = 0.7 is at the upper edge"},
               {"kind": "groups disagree", "key": None, "message": "the groups are best at far-apart values " * 8}]
    path = tuning_curves(tmp_path / "t.png", trials, title="t", untuned=0.5, chosen={"a": 0.7, "b": 80},
                         notices=notices, objective="worst group's mean",
                         profiles={"a": [[0.0, 0.5], [0.5, 0.55], [1.0, None]], "b": [[10, 0.56], [80, 0.57]]})
    plain = tuning_curves(tmp_path / "plain.png", trials, title="t")
    import matplotlib.image

    drawn, bare = matplotlib.image.imread(path), matplotlib.image.imread(plain)
    assert drawn.shape[0] > bare.shape[0]  # the general notice is written above the panels
    assert drawn.shape[1] == bare.shape[1] and not np.array_equal(drawn[-bare.shape[0]:], bare)


def test_a_killed_tuning_is_continued_only_by_a_tune_that_chooses_the_same_way(tmp_path):
    from vesuvius_lab.core.config.spec import Experiment
    from vesuvius_lab.core.runs.folder import new_run
    from vesuvius_lab.core.tuning.tuner import _resumable, tuning_identity

    base = {"name": "x", "model": {"plugin": "smp_unet25d"}, "tune": {"inference.threshold": {"low": 0.2, "high": 0.7}}}
    default = Experiment.model_validate(base)
    robust = Experiment.model_validate({**base, "tune_options": {"objective": "worst_group"}})
    mean_k = Experiment.model_validate({**base, "tune_options": {"k": 3.0, "group_by": "fold"}})
    assert "choice" not in tuning_identity(default, []) and tuning_identity(mean_k, []) == tuning_identity(default, [])

    def killed(spec: Experiment):
        run = new_run(tmp_path / "runs", "x-tuned", 0)
        run.write("spec.json", {"name": "x-tuned"})
        run.write("tuning.json", tuning_identity(spec, []))
        run.set_status("interrupted", signal="SIGINT")
        return run

    earlier = killed(robust)
    assert _resumable(tmp_path / "runs", "x-tuned", tuning_identity(default, []), "x.toml") is None
    assert _resumable(tmp_path / "runs", "x-tuned", tuning_identity(robust, []), "x.toml") == earlier
    old = killed(default)  # as a tuning from before choices were recorded: no "choice" in tuning.json
    assert _resumable(tmp_path / "runs", "x-tuned", tuning_identity(default, []), "x.toml") == old
