"""Model plugins: they build, honour the window contract, train, load local weights, and their
checks explain at validation time which windows a network cannot take."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from vesuvius_lab.core import registry
from vesuvius_lab.core.config.experiment import SpecError, load_experiment
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.contract.models import Depth2D, count_parameters

#: name -> (params, tiny window): small enough to train a few steps on 2 CPU cores.
TINY = {
    "smp_unet25d": ({"encoder_depth": 3, "decoder_attention_type": "scse"}, (8, 32, 32)),
    "smp_unetpp25d": ({"encoder_depth": 3, "decoder_channels": [32, 16, 8]}, (4, 32, 32)),
    "monai_swinunetr": ({"feature_size": 12, "depths": [1, 1, 1, 1]}, (64, 64, 64)),
    "monai_unet": ({"channels": [8, 16, 32], "strides": [2, [1, 2, 2]], "num_res_units": 1}, (6, 32, 32)),
    "monai_segresnet": ({"blocks_down": [1, 1, 1], "blocks_up": [1, 1]}, (16, 32, 32)),
    "monai_dynunet": ({"base_filters": 4, "max_filters": 16, "deep_supervision": 0}, (16, 32, 32)),
}


def build(name: str, params: dict, window, out_channels: int = 1):
    return registry.build("models", name, params, window=window, in_channels=1, out_channels=out_channels)


def test_every_builtin_model_plugin_is_covered():
    builtin = {info.name for info in registry.describe("models") if info.target.startswith("vesuvius_lab.plugins.models.")}
    assert builtin == set(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_model_trains_a_few_steps_and_keeps_the_window_contract(name):
    torch.manual_seed(0)
    params, window = TINY[name]
    batch = 1 if name == "monai_swinunetr" else 2
    model = build(name, params, window)
    assert count_parameters(model) > 0
    x = torch.rand(batch, 1, *window)
    target = (torch.rand(batch, 1, *window) < 0.2).float()
    valid = torch.rand(batch, 1, *window) < 0.8
    loss_fn = registry.build("losses", "bce", {})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {key: value.detach().clone() for key, value in model.state_dict().items()}
    model.train()
    for _ in range(2):
        logits = model(x)
        assert logits.shape == (batch, 1, *window)
        loss = loss_fn(logits, target, valid)
        optimizer.zero_grad()
        loss.backward()
        unused = [name for name, p in model.named_parameters() if p.grad is None]
        assert not unused, f"parameters without a gradient break DDP: {unused[:5]}"
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert torch.isfinite(loss)
        optimizer.step()
    changed = [key for key, value in model.state_dict().items()
               if value.is_floating_point() and not torch.equal(value, before[key])]
    assert len(changed) > len(before) // 2
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 1, *window)  # inference: eval mode, batch 1


@pytest.mark.parametrize("name", ["smp_unet25d", "monai_unet"])
def test_two_output_channels_for_softmax_models(name):
    params, window = TINY[name]
    model = build(name, params, window, out_channels=2).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, *window)).shape == (1, 2, *window)


def test_swinunetr_arguments_follow_the_installed_signature():
    """MONAI before 1.5 required img_size and had no use_v2: the arguments adapt to the signature."""
    from monai.networks.nets import SwinUNETR

    from vesuvius_lab.plugins.models.monai3d import SwinUNETRParams, swinunetr_kwargs

    class OlderSignature:  # the constructor signature of MONAI 1.3's SwinUNETR, abridged
        def __init__(self, img_size, in_channels, out_channels, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24),
                     feature_size=24, norm_name="instance", drop_rate=0.0, attn_drop_rate=0.0,
                     dropout_path_rate=0.0, normalize=True, use_checkpoint=False, spatial_dims=3):
            pass

    params = SwinUNETRParams(feature_size=12, depths=(1, 1, 1, 1))
    old = swinunetr_kwargs(OlderSignature, params, (64, 96, 128))
    assert old["img_size"] == (64, 96, 128) and "use_v2" not in old and old["feature_size"] == 12
    assert "img_size" not in swinunetr_kwargs(SwinUNETR, params, (64, 96, 128))  # the installed MONAI
    with pytest.raises(UserError, match='no "use_v2" argument'):
        swinunetr_kwargs(OlderSignature, SwinUNETRParams(use_v2=True), (64, 64, 64))


# --------------------------------------------------------------------------- Depth2D


class _PlusMinus(torch.nn.Module):
    """A 2D 'network' whose outputs are known: channels [x, -x]."""

    def forward(self, x):
        return torch.cat([x, -x], dim=1)


def test_depth2d_maps_slices_to_channels_and_classes():
    x = torch.rand(3, 1, 5, 4, 6)
    y = Depth2D(_PlusMinus(), depth=5, out_channels=2)(x)
    assert y.shape == (3, 2, 5, 4, 6)
    assert torch.equal(y[:, 0], x[:, 0]) and torch.equal(y[:, 1], -x[:, 0])


def test_depth2d_refuses_a_window_of_another_depth():
    with pytest.raises(ValueError, match=r"\(B, 1, 5, H, W\).*inference.window"):
        Depth2D(_PlusMinus(), depth=5)(torch.rand(1, 1, 6, 4, 4))


def test_count_parameters_skips_frozen_ones():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net[1].requires_grad_(False)
    assert count_parameters(net) == 16
    assert count_parameters(net, trainable_only=False) == 26


# --------------------------------------------------------------------------- SMP local weights


def _rgb_encoder_state(tmp_path):
    """A resnet18 encoder state dict for 3 input channels, as ImageNet weights are saved."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(1)
    rgb = smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=[64, 32, 16], in_channels=3)
    path = tmp_path / "resnet18_rgb.pt"
    torch.save(rgb.encoder.state_dict(), path)
    return rgb.encoder.state_dict(), path


def test_smp_loads_a_local_rgb_encoder_file_and_spreads_the_first_conv_over_slices(tmp_path):
    saved, path = _rgb_encoder_state(tmp_path)
    model = build("smp_unet25d", {"encoder_depth": 3, "encoder_weights": str(path)}, (8, 32, 32))
    loaded = model.net2d.encoder.state_dict()
    first = loaded["conv1.weight"]
    assert first.shape[1] == 8
    torch.testing.assert_close(first, saved["conv1.weight"].sum(1, keepdim=True).expand_as(first) / 8)
    for key in ("layer1.0.conv1.weight", "bn1.running_mean", "layer2.1.conv2.weight"):
        assert torch.equal(loaded[key], saved[key])


def test_smp_reloads_the_encoder_of_a_whole_trained_model(tmp_path):
    params, window = TINY["smp_unet25d"]
    trained = build("smp_unet25d", params, window)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": trained.state_dict(), "epoch": 3}, path)
    fresh = build("smp_unet25d", {**params, "encoder_weights": str(path)}, window)
    for key, value in trained.net2d.encoder.state_dict().items():
        assert torch.equal(fresh.net2d.encoder.state_dict()[key], value), key


def test_smp_prunes_the_encoder_stages_a_shallow_encoder_never_runs():
    shallow = build("smp_unet25d", {"encoder_depth": 3}, (8, 32, 32))
    names = {name.split(".")[0] for name, _ in shallow.net2d.encoder.named_parameters()}
    assert {"conv1", "layer1", "layer2"} <= names and not names & {"layer3", "layer4"}
    assert count_parameters(shallow) < count_parameters(build("smp_unet25d", {"encoder_depth": 5}, (8, 32, 32))) / 3


@pytest.mark.parametrize("encoder", ["efficientnet-b0", "mobilenet_v2"])
def test_smp_shallow_encoders_leave_no_parameter_without_gradient(encoder):
    """EfficientNet and MobileNet even run a block past the last used stage: pruned as well."""
    model = build("smp_unet25d", {"encoder": encoder, "encoder_depth": 3}, (4, 32, 32))
    model(torch.rand(2, 1, 4, 32, 32)).sum().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_smp_pruning_works_when_built_for_prediction():
    trained = build("smp_unet25d", {"encoder_depth": 3}, (4, 32, 32))
    with torch.inference_mode():
        model = build("smp_unet25d", {"encoder_depth": 3}, (4, 32, 32)).eval()
        model.load_state_dict(trained.state_dict())  # the same pruned layout whatever the grad mode
        assert model(torch.rand(1, 1, 4, 32, 32)).shape == (1, 1, 4, 32, 32)


def test_smp_explains_an_unsupported_encoder():
    with pytest.raises(UserError, match="cannot build UnetPlusPlus"):
        build("smp_unetpp25d", {"encoder": "mit_b0"}, (4, 32, 32))


def test_smp_refuses_weights_of_another_encoder(tmp_path):
    import segmentation_models_pytorch as smp

    other = smp.Unet("resnet34", encoder_weights=None, encoder_depth=3, decoder_channels=[64, 32, 16])
    path = tmp_path / "resnet34.pt"
    torch.save(other.encoder.state_dict(), path)
    with pytest.raises(UserError, match="does not fit this encoder"):
        build("smp_unet25d", {"encoder_depth": 3, "encoder_weights": str(path)}, (8, 32, 32))


def test_smp_names_a_misspelt_encoder():
    with pytest.raises(UserError, match='Did you mean "resnet18"'):
        build("smp_unet25d", {"encoder": "resnet-18", "encoder_depth": 3}, (8, 32, 32))


# --------------------------------------------------------------------------- validation-time checks


def experiment(tmp_path, model: str, window, params: str = "", inference_window=None, name="exp"):
    text = f"""
        name = "{name}"
        [data]
        window = {list(window)}
        [model]
        plugin = "{model}"
        params = {{ {params} }}
    """
    if inference_window is not None:
        text += f"""
        [inference]
        window = {list(inference_window)}
        """
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(path) -> str:
    with pytest.raises(SpecError) as caught:
        load_experiment(path)
    return str(caught.value)


def test_swinunetr_window_check_names_the_nearest_valid_windows(tmp_path):
    text = problems(experiment(tmp_path, "monai_swinunetr", (16, 100, 100)))
    assert "model.params: data.window = [16, 100, 100] cannot be taken by SwinUNETR" in text
    assert "multiple of 32 and at least 64" in text
    assert "nearest valid windows are [64, 96, 96] or [64, 128, 128]" in text


def test_swinunetr_check_covers_the_inference_window(tmp_path):
    text = problems(experiment(tmp_path, "monai_swinunetr", (64, 64, 64), inference_window=(64, 64, 80)))
    assert "inference.window = [64, 64, 80]" in text and "data.window" not in text
    assert "nearest valid windows are [64, 64, 64] or [64, 64, 96]" in text
    load_experiment(experiment(tmp_path, "monai_swinunetr", (64, 64, 64), inference_window=(96, 128, 128), name="ok"))


def test_swinunetr_feature_size_must_be_a_multiple_of_12(tmp_path):
    text = problems(experiment(tmp_path, "monai_swinunetr", (64, 64, 64), "feature_size = 18"))
    assert "model.params.feature_size" in text and "multiple of 12" in text and "try 12 or 24" in text


def test_validating_a_swinunetr_experiment_imports_neither_torch_nor_monai(tmp_path):
    path = experiment(tmp_path, "monai_swinunetr", (64, 128, 128), "feature_size = 48")
    code = ("import sys; from vesuvius_lab.core.config.experiment import load_experiment; "
            f"load_experiment({str(path)!r}); "
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_monai_unet_window_must_divide_by_the_stride_product(tmp_path):
    text = problems(experiment(tmp_path, "monai_unet", (8, 60, 64), "strides = [2, 2, 2, 2]"))
    assert "every side a multiple of 16" in text
    assert "nearest valid windows are [16, 48, 64] or [16, 64, 64]" in text


def test_monai_unet_anisotropic_strides(tmp_path):
    load_experiment(experiment(tmp_path, "monai_unet", (5, 64, 64),
                               "channels = [8, 16, 32], strides = [[1, 2, 2], [1, 2, 2]]", name="ok"))
    text = problems(experiment(tmp_path, "monai_unet", (5, 64, 62),
                               "channels = [8, 16, 32], strides = [[1, 2, 2], [1, 2, 2]]"))
    assert "W a multiple of 4" in text and "nearest valid windows are [5, 64, 60] or [5, 64, 64]" in text


def test_monai_unet_strides_must_match_channels(tmp_path):
    text = problems(experiment(tmp_path, "monai_unet", (16, 64, 64), "channels = [8, 16, 32], strides = [2]"))
    assert "one entry per step between levels" in text


def test_monai_unet_single_voxel_bottleneck_with_instance_norm(tmp_path):
    text = problems(experiment(tmp_path, "monai_unet", (8, 8, 8), "channels = [8, 16, 32, 64], strides = [2, 2, 2]"))
    assert "model.params.strides" in text and "single voxel" in text


def test_segresnet_window_must_divide_by_its_levels(tmp_path):
    text = problems(experiment(tmp_path, "monai_segresnet", (12, 64, 64), "blocks_down = [1, 2, 2, 4]"))
    assert "SegResNet with 4 levels" in text and "multiple of 8" in text
    assert "nearest valid windows are [8, 64, 64] or [16, 64, 64]" in text


def test_smp_checks_depth_and_window(tmp_path):
    text = problems(experiment(tmp_path, "smp_unet25d", (16, 100, 128), "depth = 8", inference_window=(12, 128, 128)))
    assert "model.params.depth: depth = 8 but data.window = [16, 100, 128] has 16 slices" in text
    assert "inference.window = [12, 128, 128] has 12 slices" in text
    assert "H a multiple of 32, W a multiple of 32" in text
    assert "nearest valid windows are [16, 96, 128] or [16, 128, 128]" in text


def test_smp_encoder_depth_sets_the_multiple(tmp_path):
    load_experiment(experiment(tmp_path, "smp_unet25d", (16, 48, 48), "encoder_depth = 4", name="ok"))
    assert "multiple of 32" in problems(experiment(tmp_path, "smp_unet25d", (16, 48, 48)))


def test_smp_encoder_weights_must_be_a_local_file(tmp_path):
    text = problems(experiment(tmp_path, "smp_unet25d", (16, 64, 64), 'encoder_weights = "imagenet"'))
    assert "never downloads" in text
    text = problems(experiment(tmp_path, "smp_unet25d", (16, 64, 64), f'encoder_weights = "{tmp_path}/none.pt"'))
    assert "model.params.encoder_weights" in text and "no file" in text


def test_smp_decoder_channels_must_match_encoder_depth(tmp_path):
    text = problems(experiment(tmp_path, "smp_unet25d", (16, 64, 64), "encoder_depth = 3, decoder_channels = [64, 32]"))
    assert "one width per encoder stage" in text
