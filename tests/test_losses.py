"""Loss plugins and the weighted objective: ignored voxels contribute nothing, known values hold."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from vesuvius_lab.core import registry
from vesuvius_lab.core.config.spec import LossTerm
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.training.objective import build_objective, term_names

#: What building a plugin with invalid params raises (the registry may wrap pydantic's error).
BAD_PARAMS = (UserError, ValidationError)

#: Every loss plugin with default and non-default params.
CASES = [
    ("dice", {}),
    ("dice", {"batch": False, "smooth": 0.0}),
    ("bce", {}),
    ("bce", {"pos_weight": 3.0}),
    ("ce", {}),
    ("ce", {"class_weights": (0.3, 2.0), "label_smoothing": 0.1}),
    ("fbeta", {"beta": 2.0}),
    ("tversky", {}),
    ("tversky", {"alpha": 0.7, "beta": 0.3, "batch": False}),
    ("focal", {}),
    ("focal", {"gamma": 0.5, "alpha": 0.25}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in params.items()) or 'default'}" for name, params in CASES]


def build(name: str, **params):
    return registry.build("losses", name, params)


def sample(channels: int = 1, shape=(2, 1, 4, 6, 6), seed: int = 0):
    """Random logits, a {0, 1} target and a validity mask with about 40% ignored voxels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape[0], channels, *shape[2:], generator=g) * 2
    target = (torch.rand(shape, generator=g) < 0.3).float()
    valid = torch.rand(shape, generator=g) > 0.4
    return logits, target, valid


def loss_and_grad(fn, logits, target, valid):
    logits = logits.clone().requires_grad_(True)
    value = fn(logits, target, valid)
    value.backward()
    return value.detach(), logits.grad


def test_every_registered_loss_is_covered():
    assert set(registry.names("losses")) >= {"dice", "bce", "ce", "fbeta", "tversky", "focal"}
    assert {name for name, _ in CASES} == set(registry.names("losses")) & {name for name, _ in CASES}
    assert {"dice", "bce", "ce", "fbeta", "tversky", "focal"} <= {name for name, _ in CASES}


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_ignored_voxels_contribute_nothing(name, params, channels):
    fn = build(name, **params)
    logits, target, valid = sample(channels)
    value, grad = loss_and_grad(fn, logits, target, valid)

    # Anything at ignored voxels: extreme, infinite or NaN logits and flipped targets.
    invalid = (~valid).expand_as(logits)
    junk = torch.tensor([1e4, -1e4, float("inf"), float("-inf"), float("nan")])
    wild = logits.clone()
    wild[invalid] = junk[torch.arange(int(invalid.sum())) % len(junk)]
    flipped = torch.where(valid, target, 1 - target)
    wild_value, wild_grad = loss_and_grad(fn, wild, flipped, valid)

    assert torch.isfinite(value) and torch.isfinite(wild_value)
    assert torch.equal(value, wild_value)
    assert torch.equal(grad[~invalid], wild_grad[~invalid])
    assert torch.all(grad[invalid] == 0) and torch.all(wild_grad[invalid] == 0)
    assert grad[~invalid].abs().max() > 0  # the loss does depend on the valid voxels


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_perfect_prediction_is_near_minimal(name, params, channels):
    fn = build(name, **params)
    _, target, valid = sample(channels)
    smoothing = params.get("label_smoothing", 0)
    # +30 on surface, -30 elsewhere; with label smoothing the best logit is the smoothed target's
    confidence = 30.0 if not smoothing else torch.log(torch.tensor((1 - smoothing / 2) / (smoothing / 2)))
    sure = (2 * target - 1) * confidence
    perfect = sure if channels == 1 else torch.cat([-sure / 2, sure / 2], dim=1)
    random_logits, _, _ = sample(channels, seed=1)
    perfect_value = fn(perfect, target, valid)
    assert perfect_value < fn(random_logits, target, valid)
    assert perfect_value < fn(-perfect, target, valid)
    assert perfect_value < fn(perfect * 1.5, target, valid) if smoothing else perfect_value < 1e-3


def test_ignore_everything_gives_zero_loss_and_zero_gradient():
    logits, target, _ = sample()
    nothing = torch.zeros_like(target, dtype=torch.bool)
    for name, params in CASES:
        value, grad = loss_and_grad(build(name, **params), logits, target, nothing)
        assert torch.isfinite(value), name
        assert torch.all(grad == 0), name


def _valid_flat(logits, target, valid):
    keep = valid[:, 0]
    return logits[:, 0][keep], target[:, 0][keep]


def test_dice_known_value():
    logits, target, valid = sample()
    p, t = _valid_flat(torch.sigmoid(logits), target, valid)
    expected = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    torch.testing.assert_close(build("dice")(logits, target, valid), expected)
    per_sample = []
    for b in range(2):
        p, t = _valid_flat(torch.sigmoid(logits[b:b + 1]), target[b:b + 1], valid[b:b + 1])
        per_sample.append(1 - 2 * (p * t).sum() / (p.sum() + t.sum()))
    torch.testing.assert_close(build("dice", batch=False, smooth=0.0)(logits, target, valid), torch.stack(per_sample).mean())


@pytest.mark.parametrize("smooth", [0.0, 1.0])
def test_fbeta_with_beta_1_is_dice(smooth):
    logits, target, valid = sample()
    torch.testing.assert_close(build("fbeta", beta=1.0, smooth=smooth)(logits, target, valid),
                               build("dice", smooth=smooth)(logits, target, valid))


def test_fbeta_beta_weighs_recall():
    """An under-segmentation (missed surface) costs more with beta = 2 than with beta = 0.5."""
    _, target, valid = sample()
    missing = torch.where(torch.rand_like(target) < 0.5, -30.0, (2 * target - 1) * 30)
    assert build("fbeta", beta=2.0)(missing, target, valid) > build("fbeta", beta=0.5)(missing, target, valid)


def test_tversky_with_equal_weights_is_dice():
    logits, target, valid = sample()
    torch.testing.assert_close(build("tversky", alpha=0.5, beta=0.5, smooth=0.0)(logits, target, valid),
                               build("dice", smooth=0.0)(logits, target, valid))


def test_tversky_known_value():
    logits, target, valid = sample()
    p, t = _valid_flat(torch.sigmoid(logits), target, valid)
    tp, fp, fn = (p * t).sum(), (p * (1 - t)).sum(), ((1 - p) * t).sum()
    expected = 1 - (tp + 1) / (tp + 0.3 * fp + 0.7 * fn + 1)
    torch.testing.assert_close(build("tversky")(logits, target, valid), expected)


def test_bce_matches_torch_on_valid_voxels():
    logits, target, valid = sample()
    x, t = _valid_flat(logits, target, valid)
    expected = F.binary_cross_entropy_with_logits(x, t, pos_weight=torch.tensor(3.0))
    torch.testing.assert_close(build("bce", pos_weight=3.0)(logits, target, valid), expected)


def test_ce_matches_torch_cross_entropy_with_ignore_index():
    logits, target, valid = sample(channels=2)
    labels = torch.where(valid, target, -100).long()[:, 0]
    weights = torch.tensor([0.3, 2.0])
    expected = F.cross_entropy(logits, labels, weight=weights, ignore_index=-100, label_smoothing=0.1)
    actual = build("ce", class_weights=(0.3, 2.0), label_smoothing=0.1)(logits, target, valid)
    torch.testing.assert_close(actual, expected)


def test_ce_of_a_one_channel_model_is_two_class_ce_of_zero_and_logit():
    logits, target, valid = sample(channels=1)
    two = torch.cat([torch.zeros_like(logits), logits], dim=1)
    ce = build("ce", class_weights=(0.5, 1.5))
    torch.testing.assert_close(ce(logits, target, valid), ce(two, target, valid))
    torch.testing.assert_close(build("ce")(logits, target, valid), build("bce")(logits, target, valid))


def test_binary_losses_treat_two_channels_as_softmax():
    logits, target, valid = sample(channels=2)
    difference = logits[:, 1:2] - logits[:, 0:1]
    for name in ("bce", "focal", "dice", "tversky"):
        torch.testing.assert_close(build(name)(logits, target, valid), build(name)(difference, target, valid))
    torch.testing.assert_close(build("bce")(logits, target, valid), build("ce")(logits, target, valid))


def test_focal_known_values():
    from torchvision.ops import sigmoid_focal_loss

    logits, target, valid = sample()
    x, t = _valid_flat(logits, target, valid)
    for gamma, alpha in [(2.0, 0.25), (1.5, None)]:
        expected = sigmoid_focal_loss(x, t, alpha=-1 if alpha is None else alpha, gamma=gamma, reduction="mean")
        torch.testing.assert_close(build("focal", gamma=gamma, alpha=alpha)(logits, target, valid), expected)
    torch.testing.assert_close(build("focal", gamma=0.0)(logits, target, valid), build("bce")(logits, target, valid))


def test_focal_with_small_gamma_has_finite_gradients_on_confident_voxels():
    _, target, valid = sample()
    confident = (2 * target - 1) * 100.0
    _, grad = loss_and_grad(build("focal", gamma=0.5), confident, target, valid)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_losses_under_bf16_autocast(name, params, channels):
    fn = build(name, **params)
    x, target, valid = sample(channels)
    conv = torch.nn.Conv3d(channels, channels, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16
        value = fn(logits, target, valid)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
    torch.testing.assert_close(value.detach(), fn(logits.detach().float(), target, valid))


def test_more_than_two_channels_is_refused():
    logits, target, valid = sample(channels=3)
    for name, params in CASES:
        with pytest.raises(ValueError, match="channels"):
            build(name, **params)(logits, target, valid)


@pytest.mark.parametrize(("name", "params", "words"), [
    ("tversky", {"alpha": 0, "beta": 0}, "both be 0"),
    ("ce", {"class_weights": (0, 1)}, "positive"),
    ("fbeta", {"beta": 0}, "greater than 0"),
    ("focal", {"alpha": 1.5}, "less than or equal to 1"),
    ("dice", {"smoth": 1}, "Extra inputs"),
])
def test_bad_params_are_rejected(name, params, words):
    with pytest.raises(BAD_PARAMS, match=words):
        build(name, **params)


# --------------------------------------------------------------------------- objective


def test_term_names_number_repeats():
    assert term_names(["dice", "bce", "dice", "dice"]) == ["dice", "bce", "dice#2", "dice#3"]


def test_objective_is_the_weighted_sum_and_logs_every_term():
    logits, target, valid = sample()
    objective = build_objective([
        LossTerm(plugin="dice", weight=0.5),
        LossTerm(plugin="bce", weight=0.25, params={"pos_weight": 2.0}),
        LossTerm(plugin="dice", weight=2.0, params={"smooth": 0.0}),
    ])
    total, values = objective(logits, target, valid)
    assert list(values) == objective.names == ["dice", "bce", "dice#2"]
    expected = (0.5 * build("dice")(logits, target, valid)
                + 0.25 * build("bce", pos_weight=2.0)(logits, target, valid)
                + 2.0 * build("dice", smooth=0.0)(logits, target, valid))
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(values["dice#2"], build("dice", smooth=0.0)(logits, target, valid))
    assert not any(v.requires_grad for v in values.values())


def test_a_zero_weight_term_is_logged_but_does_not_steer():
    logits, target, valid = sample()
    with_watch = build_objective([LossTerm(plugin="bce", weight=1.0), LossTerm(plugin="focal", weight=0.0)])
    without = build_objective([LossTerm(plugin="bce", weight=1.0)])
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    total_a, values = with_watch(a, target, valid)
    total_b, _ = without(b, target, valid)
    total_a.backward()
    total_b.backward()
    assert values["focal"] > 0
    assert torch.equal(total_a, total_b) and torch.equal(a.grad, b.grad)


def test_objective_resolves_plugins_and_validates_params():
    with pytest.raises(registry.UnknownPluginError, match='Did you mean "dice"'):
        build_objective([LossTerm(plugin="dise")])
    with pytest.raises(BAD_PARAMS, match="gama"):
        build_objective([LossTerm(plugin="focal", params={"gama": 2})])
