"""Stop signals are taken at safe points: SIGINT and SIGTERM only record a request while a long command
runs, and the command stops at its next safe point (between trials, volumes, jobs, training steps) with
130 / 143. A signal never raises inside a library call; a second one stops at once."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import optuna
import pytest
from conftest import run_cli, tiny_experiment
from test_tune import TUNE  # the same [tune] table as the tune tests

from vesuvius_lab.core import interrupts
from vesuvius_lab.core.data.tiff import read_volume
from vesuvius_lab.core.runs.folder import effective_state, find_runs

# --------------------------------------------------------------------------- the mechanism


def _library_call(done: list) -> None:
    """Stands for an SQLite commit or a checkpoint write: a signal arrives in the middle of it."""
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)  # Python runs the handler here, inside the call
    done.append("the call finished")


def test_a_signal_inside_a_library_call_is_taken_at_the_next_check_not_inside_it():
    done: list = []
    with interrupts.stop_signals():
        _library_call(done)
        assert done == ["the call finished"] and interrupts.pending() == signal.SIGINT
        with pytest.raises(interrupts.Interrupted) as raised:
            interrupts.check()
    assert raised.value.exit_code == 130
    assert interrupts.pending() is None and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    interrupts.check()  # outside a command: nothing recorded, nothing raised


def test_the_same_signal_twice_is_one_request_and_a_second_one_later_stops_at_once(monkeypatch):
    done: list = []
    with interrupts.stop_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        _library_call(done)  # a second signal right after the first: the same request delivered twice
        assert done and interrupts.pending() == signal.SIGTERM
        monkeypatch.setattr(interrupts, "REPEAT_WINDOW_S", 0.0)  # now any further signal is a new request
        with pytest.raises(interrupts.Interrupted) as raised:
            _library_call(done)
        assert len(done) == 1 and raised.value.signum == signal.SIGINT  # stopped at once, inside the call


def test_a_wait_on_children_passes_every_signal_on_and_never_stops_at_once(monkeypatch):
    monkeypatch.setattr(interrupts, "REPEAT_WINDOW_S", 0.0)
    with interrupts.stop_signals():
        with interrupts.passed_on() as new_signals:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGINT):
                os.kill(os.getpid(), signum)
                time.sleep(0.05)
            assert new_signals() == [signal.SIGINT, signal.SIGTERM, signal.SIGINT] and new_signals() == []
        with pytest.raises(interrupts.Interrupted) as raised:
            interrupts.check()  # the command stops once its children have
        assert raised.value.signum == signal.SIGINT


# --------------------------------------------------------------------------- vlab tune

TRIALS = 8


def _project_with(tiny_run: Path, root: Path, synth_data: Path) -> Path:
    """A project holding a copy of the tiny trained run and an experiment file with a [tune] table."""
    shutil.copytree(tiny_run, root / "runs" / "tiny" / tiny_run.name)
    (root / "vesuvius.toml").write_text(f'data_root = "{synth_data}"\nruns_dir = "runs"\ndevice = "cpu"\n')
    (root / "tiny.toml").write_text(tiny_experiment() + TUNE)
    return root


def _states(db: Path) -> dict[str, list[str]]:
    """Every study's trial states, read-only (the tuner may be writing)."""
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as connection:
            rows = connection.execute("SELECT studies.study_name, trials.state FROM trials JOIN studies "
                                      "ON trials.study_id = studies.study_id").fetchall()
    except sqlite3.OperationalError:  # not created yet, or locked for a moment
        return {}
    states: dict[str, list[str]] = {}
    for study, state in rows:
        states.setdefault(study, []).append(state)
    return states


def _mid_trial(states: list[str]) -> bool:
    """Some trials done and one being scored now."""
    return states.count("COMPLETE") >= 2 and "RUNNING" in states


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_vlab_tune_stopped_by_a_signal_is_continued_with_no_trial_lost_and_none_left_running(
        tiny_run, synth_data, tmp_path, signum):
    """SIGINT as a terminal's Ctrl-C sends it (to the whole process group, workers included), SIGTERM as
    `kill` does (to the command only)."""
    root = _project_with(tiny_run, tmp_path, synth_data)
    command = [sys.executable, "-m", "vesuvius_lab", "--project", str(root / "vesuvius.toml"), "tune",
               str(root / "tiny.toml"), "--trials", str(TRIALS), "--workers", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline, db = time.time() + 300, None
        while db is None or not _mid_trial(_states(db).get("tiny-tuned", [])):  # the signal lands in a trial
            assert time.time() < deadline and process.poll() is None, process.communicate()
            runs = [r for r in find_runs(root / "runs") if r.experiment == "tiny-tuned"]
            db = runs[0].path / "study.db" if runs else None
            time.sleep(0.005)
        if signum == signal.SIGINT:
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr and "run the same `vlab tune` again" in " ".join(stderr.split())
    (run,) = [r for r in find_runs(root / "runs") if r.experiment == "tiny-tuned"]
    assert effective_state(run) == "interrupted"
    stopped = _states(db)
    assert all(state == "COMPLETE" for states in stopped.values() for state in states), stopped  # none cut short
    assert sum(map(len, stopped.values())) < TRIALS * 3  # it stopped mid-way
    before = {t.number: (t.params, t.value) for t in optuna.load_study(
        study_name="tiny-tuned", storage=f"sqlite:///{db}").trials}

    again = run_cli(command[3:])  # continued in this process: only the stop needed one of its own
    assert again.returncode == 0, again.stderr
    assert f"continuing {run.path}" in " ".join(again.stderr.split())
    finished = _states(db)
    assert set(finished) == {"tiny-tuned", "tiny-tuned-cv0", "tiny-tuned-cv1"}
    assert all(states == ["COMPLETE"] * TRIALS for states in finished.values()), finished
    kept = {t.number: (t.params, t.value) for t in optuna.load_study(
        study_name="tiny-tuned", storage=f"sqlite:///{db}").trials}
    assert all(kept[number] == values for number, values in before.items())  # every trial before the stop kept
    assert effective_state(run) == "finished"


class _StoppedInItsThirdTrial:
    """A CaseScorer whose third trial gets a second stop signal, one that stops at once."""

    def __init__(self, scorer):
        self.scorer, self.calls = scorer, 0

    def score(self, chain, ids):
        self.calls += 1
        if self.calls == 3:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        return self.scorer.score(chain, ids)


def test_a_trial_a_forced_stop_cuts_short_is_run_again(synth_data, tmp_path, monkeypatch):
    """A second signal stops at once, inside a trial; Optuna records that trial as failed, and the next
    search runs it again instead of counting it."""
    import numpy as np

    from vesuvius_lab.core.config.experiment import load_experiment
    from vesuvius_lab.core.tuning.cases import Case
    from vesuvius_lab.core.tuning.scoring import CaseScorer
    from vesuvius_lab.core.tuning.objective import Objective
    from vesuvius_lab.core.tuning.study import Search, finished

    (tmp_path / "tiny.toml").write_text(tiny_experiment() + TUNE)
    spec = load_experiment(tmp_path / "tiny.toml").spec
    probabilities = tmp_path / "p.npy"
    np.save(probabilities, np.random.default_rng(0).random((32, 48, 48)).astype(np.float16))
    label = sorted((synth_data / "train_labels").glob("*.tif"))[0]
    cases = [Case("a", 0, str(probabilities), str(label))]
    search = Search("forced", spec.tune, spec, ["a"], f"sqlite:///{tmp_path / 'study.db'}", 0,
                    Objective("mean", {"a": "fold 0"}))
    monkeypatch.setattr(interrupts, "REPEAT_WINDOW_S", 0.0)
    with CaseScorer(cases, ignore_label=2, workers=1, runs_dir=tmp_path) as scorer:
        with interrupts.stop_signals(), pytest.raises(interrupts.Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)  # the first request: the trials go on to a safe point
            time.sleep(0.2)
            search.run(_StoppedInItsThirdTrial(scorer), 4, lambda best: None)
        study = optuna.load_study(study_name="forced", storage=search.storage)
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL"]
        assert len(finished(study)) == 2
        study = search.run(scorer, 4, lambda best: None)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]


# --------------------------------------------------------------------------- nnU-Net, which trains itself


@pytest.mark.slow
def test_nnunet_training_stops_at_the_end_of_an_epoch_saving_it_and_resumes_there(nnunet_data, tmp_path):
    """nnU-Net saves its latest checkpoint every 50 epochs only; a stop saves the epoch it ends."""
    import torch
    from test_nnunet import TINY_PARAMS, fold_folder, make_job

    from vesuvius_lab.core import registry

    log: list[str] = []
    data, cache = nnunet_data
    job = make_job(data, tmp_path / "run", cache, 0, TINY_PARAMS, log, epochs=3)
    model = registry.build("models", "nnunet", job.spec.model.params)
    with interrupts.stop_signals(), pytest.raises(interrupts.Interrupted):
        os.kill(os.getpid(), signal.SIGTERM)  # asked for before the first epoch ends
        model.train(job)
    fold = fold_folder(job.run_dir)
    assert not (fold / "checkpoint_final.pth").exists()
    assert torch.load(fold / "checkpoint_latest.pth", weights_only=False)["current_epoch"] == 1

    log.clear()
    model.train(job)
    assert any("resuming from epoch 1" in line for line in log)
    assert [line.split(":")[0] for line in log if line.startswith("epoch ")] == ["epoch 2", "epoch 3"]
    assert torch.load(fold / "checkpoint_final.pth", weights_only=False)["current_epoch"] == 3


# --------------------------------------------------------------------------- vlab predict


def test_vlab_predict_stopped_by_sigterm_keeps_every_finished_mask_and_exits_143(tiny_run, synth_data, tmp_path):
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    image = sorted((synth_data / "test_images").glob("*.tif"))[0]
    for i in range(60):  # volumes of a fraction of a second each: the signal comes mid-way
        shutil.copy(image, inputs / f"v{i:02d}.tif")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "vesuvius_lab", "--device", "cpu", "predict", str(tiny_run),
                                "--input", str(inputs), "--output", str(output)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while len(list(output.glob("*.tif"))) < 2:
            assert time.time() < deadline and process.poll() is None, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr
    assert "stopping after this volume" in stderr and "Traceback" not in stderr
    written = sorted(output.iterdir())
    assert 2 <= len(written) < 60 and all(not p.name.startswith(".") for p in written)  # no temporary left
    shape = read_volume(image).shape
    for path in written:  # each one whole
        assert read_volume(path).shape == shape
