"""Blender plugins: MONAI's Gaussian exactly, the shapes of ramp and center, and the weight contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map
from pydantic import ValidationError

from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.registry import build, load, names

WINDOWS = [(1, 1, 1), (1, 3, 2), (5, 8, 9), (7, 7, 7), (16, 32, 32)]


def test_builtin_blenders_are_registered():
    assert {"mean", "gaussian", "ramp", "center"} <= set(names("blenders"))


@pytest.mark.parametrize("name", ["mean", "gaussian", "ramp", "center"])
@pytest.mark.parametrize("window", WINDOWS)
def test_weights_have_the_window_shape_and_are_strictly_positive(name, window):
    weights = build("blenders", name, {}, window=window)
    assert isinstance(weights, np.ndarray) and weights.dtype == np.float32
    assert weights.shape == window
    assert np.isfinite(weights).all() and weights.min() > 0


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("sigma_scale", [0.125, 0.3, (0.1, 0.2, 0.5)])
def test_gaussian_is_monais_importance_map(window, sigma_scale):
    ours = build("blenders", "gaussian", {"sigma_scale": sigma_scale}, window=window)
    monai = compute_importance_map(window, mode="gaussian", sigma_scale=sigma_scale, device="cpu",
                                   dtype=torch.float32).numpy()
    np.testing.assert_allclose(ours, monai, rtol=1e-6, atol=0)


def test_gaussian_peaks_at_the_centre_and_is_floored():
    weights = build("blenders", "gaussian", {"sigma_scale": 0.05}, window=(9, 9, 9))
    assert weights[4, 4, 4] == weights.max() == 1
    assert weights.min() == pytest.approx(1e-3)  # the floor: far corners would underflow otherwise


def test_mean_is_uniform():
    assert (build("blenders", "mean", {}, window=(3, 4, 5)) == 1).all()


def test_ramp_rises_linearly_over_the_margin():
    weights = build("blenders", "ramp", {"margin": 0.25}, window=(16, 16, 16))
    # Along one axis through the centre: 4 ramp voxels at each edge (0.25 * 16), 1 in between.
    np.testing.assert_allclose(weights[8, 8, :5], [0.2, 0.4, 0.6, 0.8, 1.0], rtol=1e-6)
    np.testing.assert_allclose(weights[8, 8, -5:], [1.0, 0.8, 0.6, 0.4, 0.2], rtol=1e-6)
    assert (weights[4:12, 4:12, 4:12] == 1).all()
    assert weights[0, 0, 0] == pytest.approx(0.2**3)
    assert (build("blenders", "ramp", {"margin": 0}, window=(4, 5, 6)) == 1).all()


def test_center_keeps_the_central_block():
    weights = build("blenders", "center", {"keep": 0.5, "edge_weight": 0.01}, window=(8, 8, 8))
    assert (weights[2:6, 2:6, 2:6] == 1).all()
    outside = np.ones(weights.shape, bool)
    outside[2:6, 2:6, 2:6] = False
    np.testing.assert_allclose(weights[outside], 0.01, rtol=1e-6)  # corners too: floored, not 0.01**3
    assert (build("blenders", "center", {"keep": 1.0}, window=(3, 4, 5)) == 1).all()


@pytest.mark.parametrize("name, params", [
    ("gaussian", {"sigma_scale": 0}),
    ("gaussian", {"sigma_scale": (0.1, -0.1, 0.1)}),
    ("gaussian", {"sigma": 0.1}),
    ("ramp", {"margin": 0.6}),
    ("center", {"keep": 0}),
    ("mean", {"anything": 1}),
])
def test_invalid_params_are_rejected(name, params):
    with pytest.raises(ValidationError):
        load("blenders", name).Params.model_validate(params)
    with pytest.raises(UserError, match="Invalid params for this plugin"):
        build("blenders", name, params, window=(4, 4, 4))
