"""Trackers: a tiny run reported to real TensorBoard event files and a real MLflow store, read back with
their own readers; a tracker that fails warns once and training goes on; [[tracker]] tables in
vesuvius.toml and experiment files, validated like every plugin's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import tiny_experiment

from vesuvius_lab.core import registry
from vesuvius_lab.core.config.experiment import SpecError, load_experiment
from vesuvius_lab.core.config.project import load_project
from vesuvius_lab.core.config.spec import Experiment
from vesuvius_lab.core.launch.batch import finished_run
from vesuvius_lab.core.runs.folder import Run, effective_state, read_spec
from vesuvius_lab.core.training import tracking

BOTH = """
[[tracker]]
plugin = "tensorboard"
[[tracker]]
plugin = "mlflow"
"""
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")


def train_tiny(root: Path, data: Path, *, experiment: str, project: str = "", epochs: int = 2) -> Run:
    from vesuvius_lab.core.training.trainer import train

    root.mkdir(parents=True, exist_ok=True)
    (root / "tiny.toml").write_text(tiny_experiment(epochs=epochs, iterations=2) + experiment)
    (root / "vesuvius.toml").write_text(f'data_root = "{data}"\nruns_dir = "runs"\ndevice = "cpu"\n' + project)
    return train(load_experiment(root / "tiny.toml"), load_project(root / "vesuvius.toml"))


@pytest.fixture(scope="module")
def tracked_run(synth_data, tmp_path_factory) -> Run:
    """A finished 2-epoch run reported to TensorBoard and to MLflow's default local store."""
    with pytest.MonkeyPatch.context() as patch:
        for name in MLFLOW_ENV:
            patch.delenv(name, raising=False)
        return train_tiny(tmp_path_factory.mktemp("tracked"), synth_data, experiment=BOTH)


@pytest.fixture
def clean_mlflow_env(monkeypatch):
    for name in MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)


def store_uri(run: Run) -> str:
    return f"sqlite:///{run.path.parent.parent / '.mlflow' / 'mlflow.db'}"


def expected_scalars(record: dict) -> dict[str, float]:
    """metrics.jsonl's record as scalar names, written out independently of the code under test."""
    names = {"loss": record["loss"], "lr": record["lr"], "samples_per_s": record["samples_per_s"],
             "time_s": record["time_s"]}
    names.update({f"loss/{term}": value for term, value in record["loss_terms"].items()})
    for key, value in (record.get("val") or {}).items():
        if isinstance(value, dict):
            names.update({f"val/{key}/{step}": score for step, score in value.items()})
        else:
            names[f"val/{key}"] = value
    return names


# --------------------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_equal_metrics_jsonl(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run.path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    records = tracked_run.metrics()
    assert [r["epoch"] for r in records] == [1, 2]
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for name, value in expected_scalars(record).items():
            expected.setdefault(name, {})[record["epoch"]] = value
    assert {"loss", "loss/dice", "loss/bce", "lr", "samples_per_s", "val/score", "val/topo_score",
            "val/surface_dice", "val/voi_score", "val/steps/threshold"} <= set(expected)
    tags = set(events.Tags()["scalars"])
    assert {t for t in tags if not t.startswith("summary/")} == set(expected)
    for name, by_epoch in expected.items():
        logged = {event.step: event.value for event in events.Scalars(name)}
        assert logged == pytest.approx(by_epoch, rel=1e-6), name  # TensorBoard keeps scalars as float32
    summary = tracked_run.read("summary.json")
    assert events.Scalars("summary/score")[-1].value == pytest.approx(summary["score"], rel=1e-6)
    assert "params" in {tag.split("/")[0] for tag in events.Tags()["tensors"]}


# --------------------------------------------------------------------------- MLflow


def test_mlflow_search_runs_lists_the_run_with_its_params_and_final_score(tracked_run):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = store_uri(tracked_run)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tiny"])
    assert len(runs) == 1
    row = runs.iloc[0]
    summary = tracked_run.read("summary.json")
    assert row["status"] == "FINISHED" and row["tags.mlflow.runName"] == tracked_run.id
    assert row["metrics.summary/score"] == summary["score"]
    assert row["metrics.summary/best_epoch"] == summary["best_epoch"]
    spec = tracked_run.read("spec.json")
    assert row["params.train.epochs"] == "2" and row["params.model.plugin"] == "smp_unet25d"
    assert row["params.data.root"] == spec["data"]["root"]
    assert row["params.model.params.decoder_channels"] == json.dumps(spec["model"]["params"]["decoder_channels"])
    assert not [column for column in runs.columns if column.startswith("params.tracker")]
    client = MlflowClient(tracking_uri=uri)
    history = {m.step: m.value for m in client.get_metric_history(row["run_id"], "val/score")}
    assert history == {r["epoch"]: r["val"]["score"] for r in tracked_run.metrics()}
    assert "summary.json" in {a.path for a in client.list_artifacts(row["run_id"])}
    assert json.loads((tracked_run.path / "mlflow.json").read_text())["run_id"] == row["run_id"]


def test_a_resumed_run_continues_its_mlflow_run_and_pictures_are_logged(tracked_run, tmp_path, clean_mlflow_env):
    """tracked() as training calls it: interrupted once, then resumed in the same run folder."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs_dir = tracked_run.path.parent.parent  # the store exists already
    run_dir = runs_dir / "resumed" / "fold0-1"
    run_dir.mkdir(parents=True)
    spec = Experiment.model_validate({"name": "resumed", "model": {"plugin": "smp_unet25d"},
                                      "tracker": [{"plugin": "mlflow"}, {"plugin": "tensorboard"}]})
    with pytest.raises(KeyboardInterrupt):
        with tracking.tracked(spec, run_dir, runs_dir) as trackers:
            trackers.log_epoch({"epoch": 1, "loss": 0.5, "loss_terms": {"dice": 0.5}, "lr": 0.1})
            raise KeyboardInterrupt
    client = MlflowClient(tracking_uri=store_uri(tracked_run))
    run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    (run_dir / "report").mkdir()
    _png(run_dir / "report" / "training.png")
    Run(run_dir).write("summary.json", {"score": 0.25, "epochs": 2})
    resumed = spec.model_copy(update={"train": spec.train.model_copy(update={"nproc": 2})})  # a changed param
    with tracking.tracked(resumed, run_dir, runs_dir) as trackers:
        trackers.log_epoch({"epoch": 2, "loss": 0.25, "loss_terms": {"dice": 0.25}, "lr": 0.05})
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and json.loads((run_dir / "mlflow.json").read_text())["run_id"] == run_id
    assert {m.step: m.value for m in client.get_metric_history(run_id, "loss")} == {1: 0.5, 2: 0.25}
    assert run.data.metrics["summary/score"] == 0.25 and run.data.params["train.nproc"] == "1"
    assert [a.path for a in client.list_artifacts(run_id, "pictures")] == ["pictures/training.png"]
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert events.Tags()["images"] == ["pictures/training"]


def _png(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (12, 8), (200, 30, 30)).save(path)


# --------------------------------------------------------------------------- failures never stop training


def test_unreachable_tracking_server_in_vesuvius_toml_warns_once_and_the_run_finishes(synth_data, tmp_path, capsys,
                                                                                      clean_mlflow_env):
    project = textwrap.dedent("""
        [[tracker]]
        plugin = "mlflow"
        params = { tracking_uri = "http://127.0.0.1:9", retries = 0, timeout_s = 2 }
        [[tracker]]
        plugin = "tensorboard"
        params = { folder = "tb-project" }
    """)
    experiment = '\n[[tracker]]\nplugin = "tensorboard"\n'  # replaces the project's tensorboard
    run = train_tiny(tmp_path, synth_data, experiment=experiment, project=project, epochs=1)
    assert effective_state(run) == "finished" and "score" in run.read("summary.json")
    stderr = capsys.readouterr().err
    assert stderr.count('tracker "mlflow" failed') == 1, stderr
    assert "Training goes on" in stderr
    assert (run.path / "log.txt").read_text().count('tracker "mlflow" failed') == 1
    assert [(t["plugin"], t["params"]) for t in run.read("spec.json")["tracker"]] == [
        ("mlflow", {"tracking_uri": "http://127.0.0.1:9", "retries": 0, "timeout_s": 2}), ("tensorboard", {})]
    assert list((run.path / "tensorboard").glob("events.out.tfevents.*"))
    assert not (run.path / "tb-project").exists()


class Failing:
    """A tracker that starts, then raises at every call; it records the calls it got."""

    def __init__(self):
        self.calls = []

    def _fail(self, name):
        self.calls.append(name)
        raise RuntimeError("the service is down")

    def start(self, run_dir, params):
        self.calls.append("start")

    def log_metrics(self, metrics, step):
        self._fail("log_metrics")

    def log_artifact(self, path):
        self._fail("log_artifact")

    def finish(self, summary, status):
        self._fail("finish")


def test_a_tracker_that_raises_warns_once_and_is_dropped(tmp_path, monkeypatch, capsys):
    failing = Failing()
    monkeypatch.setattr(registry, "build", lambda group, name, params, **context:
                        failing if name == "flaky" else object())
    spec = Experiment.model_validate({"name": "x", "model": {"plugin": "smp_unet25d"},
                                      "tracker": [{"plugin": "flaky"}, {"plugin": "not_a_tracker"},
                                                  {"plugin": "off", "enabled": False}]})
    with tracking.tracked(spec, tmp_path, tmp_path) as trackers:
        for epoch in (1, 2, 3):
            trackers.log_epoch({"epoch": epoch, "loss": 1.0})
        assert not trackers
    assert failing.calls == ["start", "log_metrics"]
    stderr = " ".join(capsys.readouterr().err.split())
    assert stderr.count('tracker "flaky" failed (log_metrics): RuntimeError: the service is down.') == 1
    assert 'tracker "not_a_tracker" failed (building it): TypeError' in stderr and "without start" in stderr
    assert '"off"' not in stderr and stderr.count("Training goes on") == 2


# --------------------------------------------------------------------------- [[tracker]] tables


def test_bad_tracker_params_are_validation_errors_naming_the_key(tmp_path):
    (tmp_path / "e.toml").write_text('name = "e"\n[model]\nplugin = "smp_unet25d"\n[[tracker]]\nplugin = "mlflow"\n'
                                     'params = { tracking_url = "http://x" }\n[[tracker]]\nplugin = "tensorbord"\n')
    with pytest.raises(SpecError) as caught:
        load_experiment(tmp_path / "e.toml")
    bad_key, unknown = caught.value.problems
    assert bad_key.path == "tracker.0.params.tracking_url" and bad_key.line == 6
    assert 'Did you mean "tracking_uri"' in bad_key.message
    assert unknown.path == "tracker.1.plugin" and 'Did you mean "tensorboard"' in unknown.message
    (tmp_path / "vesuvius.toml").write_text('[[tracker]]\nplugin = "tensorboard"\nparams = { folder = "../out" }\n')
    with pytest.raises(SpecError) as caught:
        load_project(tmp_path / "vesuvius.toml")
    (problem,) = caught.value.problems
    assert problem.path == "tracker.0.params.folder" and problem.line == 3 and "inside the run folder" in problem.message


def test_an_experiment_tracker_replaces_the_projects_of_the_same_plugin(tmp_path):
    (tmp_path / "vesuvius.toml").write_text('[[tracker]]\nplugin = "mlflow"\n[[tracker]]\nplugin = "tensorboard"\n'
                                            'params = { folder = "tb" }\n')
    (tmp_path / "e.toml").write_text('name = "e"\n[model]\nplugin = "smp_unet25d"\n'
                                     '[[tracker]]\nplugin = "mlflow"\nenabled = false\n')
    project = load_project(tmp_path / "vesuvius.toml")
    resolved = project.resolve(load_experiment(tmp_path / "e.toml").spec)
    assert [(t.plugin, t.params, t.enabled) for t in resolved.tracker] == [
        ("tensorboard", {"folder": "tb"}, True), ("mlflow", {}, False)]
    assert project.resolve(resolved).tracker == resolved.tracker  # resolving twice changes nothing


def test_adding_a_tracker_does_not_make_a_finished_run_train_again(tracked_run):
    spec = read_spec(tracked_run)
    assert spec.tracker and finished_run(tracked_run.path.parent.parent, spec.model_copy(update={"tracker": []})) \
        == tracked_run


def test_listing_trackers_imports_neither_tensorboard_nor_mlflow(tmp_path):
    code = ("import sys; from vesuvius_lab.core import registry; rows = registry.describe('trackers'); "
            "assert {r.name for r in rows} >= {'tensorboard', 'mlflow'} and all(r.status == 'ok' for r in rows); "
            "print(sorted(m for m in ('torch', 'tensorboard', 'mlflow') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


# --------------------------------------------------------------------------- what the user gives each library


@pytest.mark.parametrize("uri, words", [
    ("foo://bar", 'unknown kind of tracking URI "foo:"'),
    ("/tmp/mlruns-folder", "MLFLOW_ALLOW_FILE_STORE"),
    ("file:///tmp/mlruns-folder", "MLFLOW_ALLOW_FILE_STORE"),
    ("http://:5000", "no host in the URL"),
])
def test_a_bad_tracking_uri_is_refused_by_validate_and_train_with_its_line(tmp_path, uri, words, clean_mlflow_env,
                                                                           capsys):
    from vesuvius_lab.cli import main

    (tmp_path / "vesuvius.toml").write_text(f'data_root = "{tmp_path}"\nruns_dir = "runs"\ndevice = "cpu"\n')
    file = tmp_path / "e.toml"
    file.write_text(tiny_experiment() + f'\n[[tracker]]\nplugin = "mlflow"\nparams = {{ tracking_uri = "{uri}" }}\n')
    with pytest.raises(SpecError) as caught:
        load_experiment(file)
    (problem,) = caught.value.problems
    assert problem.path == "tracker.0.params.tracking_uri" and problem.line == 21 and words in problem.message
    for command in ("validate", "train"):
        with pytest.raises(SystemExit) as exit_:
            main(["--project", str(tmp_path / "vesuvius.toml"), command, str(file)])
        assert exit_.value.code == 2
        stderr = capsys.readouterr().err
        assert words in stderr and "Traceback" not in stderr
    assert not (tmp_path / "runs").exists()


def test_a_store_that_is_not_a_database_is_refused_in_vesuvius_toml_and_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "notes.db").write_text("my notes, not a database")
    (tmp_path / "vesuvius.toml").write_text(f'[[tracker]]\nplugin = "mlflow"\n'
                                            f'params = {{ tracking_uri = "sqlite:///{tmp_path / "notes.db"}" }}\n')
    with pytest.raises(SpecError) as caught:
        load_project(tmp_path / "vesuvius.toml")
    (problem,) = caught.value.problems
    assert problem.line == 3 and "is not an SQLite database" in problem.message
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "ftp://somewhere")
    (tmp_path / "e.toml").write_text('name = "e"\n[model]\nplugin = "smp_unet25d"\n[[tracker]]\nplugin = "mlflow"\n')
    with pytest.raises(SpecError) as caught:
        load_experiment(tmp_path / "e.toml")
    assert "MLFLOW_TRACKING_URI environment variable" in caught.value.problems[0].message
    (tmp_path / "off.toml").write_text('name = "e"\n[model]\nplugin = "smp_unet25d"\n[[tracker]]\nplugin = "mlflow"\n'
                                       'enabled = false\n')
    load_experiment(tmp_path / "off.toml")  # a tracker turned off is not checked


def _tracked_epochs(spec: Experiment, run_dir: Path, runs_dir: Path, epochs: int = 3) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with tracking.tracked(spec, run_dir, runs_dir) as trackers:
        for epoch in range(1, epochs + 1):
            trackers.log_epoch({"epoch": epoch, "loss": 1.0 / epoch})


def _one_warning(stderr: str, name: str) -> str:
    assert stderr.count(f'tracker "{name}" failed') == 1, stderr
    assert "Traceback" not in stderr and "Exception in thread" not in stderr and "retried" not in stderr, stderr
    return " ".join(stderr.split())


def test_an_unreachable_server_with_async_logging_is_one_warning(tmp_path, capsys, clean_mlflow_env, monkeypatch):
    import socket

    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "true")  # MLflow would log from its own threads
    spec = Experiment.model_validate({"name": "x", "model": {"plugin": "smp_unet25d"}, "tracker": [
        {"plugin": "mlflow", "params": {"tracking_uri": f"http://127.0.0.1:{port}", "retries": 0, "timeout_s": 2}}]})
    _tracked_epochs(spec, tmp_path / "x" / "fold0-1", tmp_path)
    text = _one_warning(capsys.readouterr().err, "mlflow")
    assert f"the tracking server http://127.0.0.1:{port} cannot be reached" in text and "Training goes on" in text


def test_a_damaged_local_store_is_one_warning_at_once(tmp_path, capsys, clean_mlflow_env):
    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".mlflow" / "mlflow.db").write_bytes(b"\x00garbage" * 100)
    spec = Experiment.model_validate({"name": "x", "model": {"plugin": "smp_unet25d"},
                                      "tracker": [{"plugin": "mlflow"}]})
    _tracked_epochs(spec, tmp_path / "x" / "fold0-1", tmp_path)
    text = _one_warning(capsys.readouterr().err, "mlflow")
    assert "mlflow.db is not an SQLite database" in text


def test_a_log_folder_that_cannot_be_written_is_one_warning(tmp_path, capsys):
    run_dir = tmp_path / "x" / "fold0-1"
    run_dir.mkdir(parents=True)
    (run_dir / "events").write_text("a file where the log folder should be")
    spec = Experiment.model_validate({"name": "x", "model": {"plugin": "smp_unet25d"},
                                      "tracker": [{"plugin": "tensorboard", "params": {"folder": "events/tb"}}]})
    _tracked_epochs(spec, run_dir, tmp_path)
    text = _one_warning(capsys.readouterr().err, "tensorboard")
    assert "its event files cannot be written" in text and "events" in text


class ThreadWriter:
    """A tracker whose writes happen in a background thread that fails, as a library's writer thread may."""

    def __init__(self):
        self.threads = []

    def start(self, run_dir, params):
        pass

    def log_metrics(self, metrics, step):
        def write():
            raise OSError(28, "No space left on device")

        thread = threading.Thread(target=write, name=f"writer-{step}")
        thread.start()
        self.threads.append(thread)

    def log_artifact(self, path):
        pass

    def finish(self, summary, status):
        for thread in self.threads:
            thread.join()


def test_exceptions_in_a_trackers_threads_are_one_warning(tmp_path, monkeypatch, capsys):
    writer, hook = ThreadWriter(), threading.excepthook
    monkeypatch.setattr(registry, "build", lambda group, name, params, **context: writer)
    spec = Experiment.model_validate({"name": "x", "model": {"plugin": "smp_unet25d"},
                                      "tracker": [{"plugin": "threaded"}]})
    with tracking.tracked(spec, tmp_path, tmp_path) as trackers:
        trackers.log_epoch({"epoch": 1, "loss": 1.0})
        writer.threads[0].join()
        trackers.log_epoch({"epoch": 2, "loss": 0.5})  # dropped: no second thread, no second warning
    assert len(writer.threads) == 1
    text = _one_warning(capsys.readouterr().err, "threaded")
    assert "in its thread writer-1" in text and "No space left on device" in text
    assert threading.excepthook is hook  # other threads' exceptions are left as they were
