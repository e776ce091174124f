"""Prediction with nnU-Net's own predictor, configured from the experiment's ``[inference]`` table.

nnU-Net's sliding window stays in charge (its preprocessing, padding and blending); our settings
map onto it: ``overlap`` -> ``tile_step_size = 1 - overlap``, blender ``mean`` -> uniform
weights, ``gaussian`` -> nnU-Net's Gaussian (sigma = 1/8 of the patch, our default
``sigma_scale``), the ``flip<axis>`` entries of ``tta`` -> nnU-Net's mirroring along those axes
(nnU-Net averages every combination of the listed flips). ``[inference] window`` and
``batch_size`` do not apply: the window is the plan's patch, predicted one at a time.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vesuvius_lab.core.errors import UserError
from vesuvius_lab.plugins.nnunet.conversion import LABELS, SPACING
from vesuvius_lab.plugins.nnunet.params import NnUNetParams

NNUNET_SIGMA_SCALE = 0.125
BLENDERS = {"mean": False, "gaussian": True}  # our blender -> nnU-Net's use_gaussian


@dataclass(frozen=True)
class PredictionSettings:
    """What nnUNetPredictor is told. ``mirror_axes`` None with mirroring on = the trainer's axes."""

    tile_step_size: float = 0.5
    use_gaussian: bool = True
    use_mirroring: bool = False
    mirror_axes: tuple[int, ...] | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "PredictionSettings":
        axes = data.get("mirror_axes")
        return cls(data["tile_step_size"], data["use_gaussian"], data["use_mirroring"],
                   tuple(axes) if axes is not None else None)


def prediction_problems(params: NnUNetParams, inference: Any) -> Iterator[tuple[str, str]]:
    """(params key, message) for every ``[inference]`` setting nnU-Net's predictor cannot honour."""
    blend = inference.blend
    if blend.plugin not in BLENDERS:
        yield "", (f'[inference] blend = "{blend.plugin}": nnU-Net blends its windows itself and knows only '
                   f'"mean" and "gaussian". Use one of those with the nnunet model.')
    elif blend.plugin == "gaussian" and blend.params.get("sigma_scale", NNUNET_SIGMA_SCALE) != NNUNET_SIGMA_SCALE:
        yield "", (f"[inference] blend sigma_scale = {blend.params['sigma_scale']}: nnU-Net's Gaussian has "
                   f"sigma_scale {NNUNET_SIGMA_SCALE}. Remove the setting for the nnunet model.")
    overlap = inference.overlap
    if isinstance(overlap, (tuple, list)) and len(set(overlap)) > 1:
        yield "", (f"[inference] overlap = {list(overlap)}: nnU-Net uses one overlap for every axis. "
                   "Give a single number.")
    if "rot90" in inference.tta:
        yield "mirroring", ('[inference] tta contains "rot90": nnU-Net\'s predictor only mirrors. Remove "rot90" '
                            "(flips are kept as nnU-Net's mirroring).")
    if params.mirroring is not None and inference.tta:
        yield "mirroring", ("set either params.mirroring (nnU-Net's mirroring on/off) or [inference] tta (which "
                            "flips), not both.")


def prediction_settings(params: NnUNetParams, inference: Any) -> PredictionSettings:
    """Translate ``[inference]`` and the plugin's params into nnU-Net predictor settings."""
    for key, message in prediction_problems(params, inference):
        raise UserError(f"model.params{'.' + key if key else ''}: {message}")
    overlap = inference.overlap[0] if isinstance(inference.overlap, (tuple, list)) else inference.overlap
    if params.mirroring is not None:
        use_mirroring, axes = params.mirroring, None
    else:
        flips = sorted({int(name[-1]) for name in inference.tta if name.startswith("flip")})
        use_mirroring, axes = bool(flips), tuple(flips) or None
    return PredictionSettings(round(1.0 - float(overlap), 6), BLENDERS[inference.blend.plugin], use_mirroring, axes)


class NnUNetPredictorRunner:
    """A trained nnU-Net model loaded for prediction: uint8 (D, H, W) in, surface probabilities out."""

    def __init__(self, results_folder: Path, fold: int, trainer: str, checkpoint: str,
                 settings: PredictionSettings, device: str):
        import torch
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from vesuvius_lab.plugins.nnunet.trainers import trainer_class

        results_folder = Path(results_folder)
        checkpoint_file = results_folder / f"fold_{fold}" / f"checkpoint_{checkpoint}.pth"
        if not checkpoint_file.is_file():
            raise UserError(f"{checkpoint_file}: checkpoint not found; the nnU-Net training of this run did not "
                            "finish. Resume or rerun the training.")
        plans_manager = PlansManager(load_json(results_folder / "plans.json"))
        dataset_json = load_json(results_folder / "dataset.json")
        saved = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
        configuration = plans_manager.get_configuration(saved["init_args"]["configuration"])
        network = trainer_class(trainer).build_network_architecture(
            plans_manager, configuration, determine_num_input_channels(plans_manager, configuration, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
        network.load_state_dict(saved["network_weights"])
        axes = saved.get("inference_allowed_mirroring_axes")
        if settings.mirror_axes is not None:  # ours are (D, H, W) axes; nnU-Net's are after its transpose
            axes = tuple(sorted(plans_manager.transpose_forward.index(a) for a in settings.mirror_axes))
        with contextlib.redirect_stdout(io.StringIO()):  # its CPU notice about perform_everything_on_device
            self.predictor = nnUNetPredictor(
                tile_step_size=settings.tile_step_size, use_gaussian=settings.use_gaussian,
                use_mirroring=settings.use_mirroring, perform_everything_on_device=str(device).startswith("cuda"),
                device=torch.device(device), verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        self.predictor.manual_initialization(network, plans_manager, configuration, [saved["network_weights"]],
                                             dataset_json, saved["trainer_name"], axes)
        self.settings = settings
        self.mirror_axes = axes  # nnU-Net's frame

    def window_network(self) -> tuple[Any, tuple[int, int, int]]:
        """nnU-Net's network behind its intensity normalisation, as a window predictor for the core's sliding
        windows (block-wise prediction of large volumes), and its patch in our (D, H, W) frame.

        Windows come scaled to [0, 1] (uint8 / 255); the network sees them as its preprocessing would: the
        CT normalisation (clip to the training foreground's 0.5 and 99.5 percentiles, z-score with its mean
        and std; voxel-wise, so a block gives what the whole volume gives) and its axis order.
        """
        predictor = self.predictor
        scheme = predictor.configuration_manager.normalization_schemes[0]
        if scheme != "CTNormalization":
            raise UserError(f"this nnU-Net run normalises intensities with {scheme}, which depends on the whole "
                            "image; block-wise prediction needs CTNormalization (the one vesuvius-lab plans with).")
        properties = predictor.plans_manager.foreground_intensity_properties_per_channel["0"]
        low, high = float(properties["percentile_00_5"]), float(properties["percentile_99_5"])
        mean, std = float(properties["mean"]), max(float(properties["std"]), 1e-8)
        forward = tuple(predictor.plans_manager.transpose_forward)
        backward = tuple(predictor.plans_manager.transpose_backward)
        network = predictor.network.eval()

        def logits(windows):
            x = (windows * 255).clamp_(low, high).sub_(mean).div_(std)
            out = network(x.permute(0, 1, *(2 + a for a in forward)))
            return out.permute(0, 1, *(2 + a for a in backward))

        patch = [0, 0, 0]
        for theirs, ours in enumerate(forward):
            patch[ours] = int(predictor.configuration_manager.patch_size[theirs])
        return logits, tuple(patch)

    def predict_probabilities(self, volume: np.ndarray) -> np.ndarray:
        """Surface probability per voxel, float32 (D, H, W), through nnU-Net's preprocessing and sliding window."""
        if volume.ndim != 3:
            raise ValueError(f"expected a (D, H, W) volume, got shape {volume.shape}")
        _, probabilities = self.predictor.predict_single_npy_array(
            volume[None].astype(np.float32), dict(SPACING), None, None, True)
        return np.ascontiguousarray(probabilities[LABELS["surface"]], dtype=np.float32)
