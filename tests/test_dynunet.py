"""The monai_dynunet model plugin: MONAI's DynUNet with strides planned from the window like
nnU-Net's, and deep supervision as the trainer expects it (a list of full-size logits in training,
one tensor in eval mode, ``deep_supervision_weights`` for the objective)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vesuvius_lab.core import registry
from vesuvius_lab.core.config.experiment import SpecError, load_experiment
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.plugins.models.monai3d import deep_supervision_weights, plan_strides

REPO = Path(__file__).resolve().parent.parent
QUICK = REPO / "experiments" / "quick" / "dynunet.toml"
FULL = REPO / "experiments" / "dynunet.toml"
WINDOW = (16, 32, 32)  # planned: D halved twice, H and W three times
TINY = {"base_filters": 4, "max_filters": 16}


def build(params: dict, window=WINDOW):
    return registry.build("models", "monai_dynunet", params, window=window, in_channels=1, out_channels=1)


def test_training_mode_returns_the_main_logits_and_each_head_at_full_resolution():
    torch.manual_seed(0)
    model = build({**TINY, "deep_supervision": 2})
    x = torch.rand(2, 1, *WINDOW)
    outputs = model.train()(x)
    assert isinstance(outputs, list) and len(outputs) == 3
    assert all(o.shape == (2, 1, *WINDOW) for o in outputs)
    assert not torch.equal(outputs[0], outputs[1])  # distinct heads, not copies of the main output
    sum(o.mean() for o in outputs).backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []  # DDP needs every one
    model.eval()
    with torch.no_grad():
        logits = model(x[:1])
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 1, *WINDOW)


def test_without_deep_supervision_training_mode_returns_a_tensor():
    model = build({**TINY, "deep_supervision": 0}).train()
    logits = model(torch.rand(2, 1, *WINDOW))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 1, *WINDOW)
    assert model.deep_supervision_weights == [1.0]
    assert not any(name.startswith("deep_supervision_heads") for name, _ in model.named_parameters())


@pytest.mark.parametrize("heads", [0, 1, 2, 3])
def test_deep_supervision_weights_halve_per_head_and_sum_to_one(heads):
    weights = deep_supervision_weights(heads)
    assert len(weights) == 1 + heads and sum(weights) == pytest.approx(1.0)
    assert all(b == pytest.approx(a / 2) for a, b in zip(weights, weights[1:]))
    assert build({**TINY, "deep_supervision": heads}, (16, 64, 64)).deep_supervision_weights == weights


def test_three_heads_weigh_like_nnunet_at_128():
    """nnU-Net's 6-level plan: 5 outputs weighted 1/2**i, the lowest set to 0, then normalised."""
    assert deep_supervision_weights(3) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])


def test_objective_weights_each_head_and_trains_them_all():
    """The trainer's objective gets the list and the model's weights (the contract of issue 18)."""
    from vesuvius_lab.core.config.spec import LossTerm
    from vesuvius_lab.core.training.objective import build_objective

    torch.manual_seed(0)
    model = build({**TINY, "deep_supervision": 2}).train()
    objective = build_objective([LossTerm(plugin="dice", weight=0.5), LossTerm(plugin="bce", weight=0.5)])
    x = torch.rand(2, 1, *WINDOW)
    target = (torch.rand(2, 1, *WINDOW) < 0.2).float()
    valid = torch.rand(2, 1, *WINDOW) < 0.8
    outputs = model(x)
    total, terms = objective(outputs, target, valid, head_weights=model.deep_supervision_weights)
    per_head = [objective(head, target, valid)[0] for head in outputs]
    expected = sum(w * loss for w, loss in zip(model.deep_supervision_weights, per_head))
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(terms["dice"], objective(outputs[0], target, valid)[1]["dice"])  # main head logged
    total.backward()
    heads = [p.grad for name, p in model.named_parameters() if name.startswith("deep_supervision_heads")]
    assert heads and all(g is not None and g.abs().sum() > 0 for g in heads)


def test_strides_are_planned_from_the_window_like_nnunet():
    iso, half_d = (2, 2, 2), (1, 2, 2)
    assert plan_strides((128, 128, 128)) == [(1, 1, 1)] + [iso] * 5            # nnU-Net's 128^3 plan
    assert plan_strides((256, 256, 256)) == [(1, 1, 1)] + [iso] * 5            # capped: same network
    assert plan_strides((256, 256, 256), max_downsamplings=6) == [(1, 1, 1)] + [iso] * 6
    assert plan_strides((16, 64, 64)) == [(1, 1, 1), iso, iso, half_d, half_d]  # D stops at 4
    assert plan_strides((64, 128, 128)) == [(1, 1, 1)] + [iso] * 4 + [half_d]
    assert plan_strides((4, 4, 4)) == [(1, 1, 1)]


def test_builds_from_the_experiment_files_through_the_registry():
    from vesuvius_lab.core.inference.run_kinds import build_model

    quick = load_experiment(QUICK).spec
    model = build_model(quick)
    assert [tuple(s) for s in model.strides] == plan_strides(quick.data.window)
    assert model.filters == [4, 8, 16, 32, 32] and len(model.deep_supervision_weights) == 3
    full = load_experiment(FULL).spec
    assert full.model.plugin == "monai_dynunet" and tuple(full.data.window) == (128, 128, 128)
    network = build_model(full)
    assert [tuple(s) for s in network.strides] == plan_strides((128, 128, 128))  # written out = planned
    assert network.filters == [32, 64, 128, 256, 320, 320] and len(network.deep_supervision_weights) == 4


def _problems(overrides: list[str], path: Path = QUICK) -> str:
    with pytest.raises(SpecError) as error:
        load_experiment(path, overrides)
    return str(error.value)


def test_validation_names_the_windows_a_planned_network_can_take():
    message = _problems(["data.window=[18, 64, 64]"])
    assert "quick/dynunet.toml:" in message and "model.params" in message
    assert "D a multiple of 4, H a multiple of 16, W a multiple of 16" in message
    assert "The nearest valid windows are [16, 64, 64] or [20, 64, 64]" in message
    message = _problems(["inference.window=[100, 128, 128]"], FULL)
    assert "inference.window = [100, 128, 128] cannot be taken" in message and "multiple of 32" in message
    assert "[96, 128, 128] or [128, 128, 128]" in message
    message = _problems(["data.window=[4, 4, 4]"])
    assert "too small for a DynUNet" in message and "needs at least 2" in message
    message = _problems(["model.params.deep_supervision=4"])
    assert "model.params.deep_supervision:" in message and "at most 3 extra heads" in message
    message = _problems(["model.params={ strides = [1, 2, 2], deep_supervision = 0, filters = [4, 8, 16] }",
                         "data.window=[4, 4, 4]"])
    assert "single voxel" in message


@pytest.mark.parametrize("params, text", [
    ({"strides": [2, 2, 2]}, "the first stride must be 1"),
    ({"strides": [1, 2, 2], "kernel_size": [3, 2, 3], "deep_supervision": 1}, "must be odd"),
    ({"strides": [1, 2, 4], "kernel_size": [3, 3, 1], "deep_supervision": 1}, "kernel >= stride - 1"),
    ({"strides": [1, 2, 2], "kernel_size": [3, 3], "deep_supervision": 1}, "one entry per stride"),
    ({"strides": [1, 2], "deep_supervision": 0}, "strides needs at least 3 levels"),
    ({"kernel_size": [3, 3, 3]}, "kernel_size needs strides"),
    ({"strides": [1, 2, 2, 2], "filters": [4, 8, 16]}, "filters needs one entry per level"),
    ({"strides": [1, 2, 2], "deep_supervision": 2}, "room for at most 1 extra head "),
    ({"strides": [1, 2, 2], "min_edge": 2, "deep_supervision": 1}, "min_edge shapes only strides planned"),
    ({"filters": [4, 8, 16, 32, 64], "base_filters": 4}, "either filters"),
    ({"filters": [4, 8, 16]}, "has 3 entries, but the DynUNet planned from data.window"),
    ({"deep_supervision": 3}, "room for at most 2 extra heads"),
])
def test_params_monai_would_refuse_are_clear_user_errors(params, text):
    with pytest.raises(UserError, match="model.params|Invalid params") as error:
        build(params)
    assert text in str(error.value)


def test_the_quick_experiment_trains_end_to_end(synth_data, tmp_path):
    """experiments/quick/dynunet.toml, shrunk to the test data's volumes: deep supervision through
    the core loop, validation and checkpoints."""
    from vesuvius_lab.core.runs import checkpoint
    from vesuvius_lab.core.config.project import load_project
    from vesuvius_lab.core.runs.folder import effective_state
    from vesuvius_lab.core.training.trainer import train

    (tmp_path / "vesuvius.toml").write_text(f'data_root = "{synth_data}"\nruns_dir = "runs"\ndevice = "cpu"\n')
    loaded = load_experiment(QUICK, ["data.window=[16, 32, 32]", "train.epochs=1", "train.iterations_per_epoch=2",
                                     "train.workers=0", "inference.overlap=0.25", "inference.batch_size=8"])
    run = train(loaded, load_project(tmp_path / "vesuvius.toml"))
    assert effective_state(run) == "finished"
    (metrics,) = run.metrics()
    assert set(metrics["loss_terms"]) == {"dice", "bce"}
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics["loss_terms"].values())
    assert 0 <= run.read("summary.json")["score"] <= 1
    state = checkpoint.load(run.checkpoints / "last.pt")
    assert state["model_plugin"] == "monai_dynunet"
    assert any(key.startswith("deep_supervision_heads") for key in state["model"])
