"""``[train] init`` for nnU-Net: start from an earlier nnU-Net model, as ``nnUNetv2_train -pretrained_weights``.

The source is an nnU-Net run of vesuvius-lab (its ``backend/nnunet.json`` names the checkpoint: the one
that run predicts with, ``params.checkpoint``, default ``final``) or an nnU-Net checkpoint file
(``checkpoint_final.pth``; anything ``torch.save``d with ``network_weights``). nnU-Net's
``load_pretrained_weights`` then copies every layer except the segmentation heads (``.seg_layers.``,
which start fresh, as nnU-Net does). Convolutions do not depend on the patch, so a network trained at
128^3 can start one at 192^3; every other layer must exist with the same shape, checked before training
so that a mismatch (e.g. another number of stages) is one clear error listing the layers.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from vesuvius_lab.core.errors import UserError

SKIPPED = (".seg_layers.",)  # nnU-Net's load_pretrained_weights never transfers these
SHOWN = 8  # mismatching layers listed per kind; the rest are counted


def checkpoint_file(init: Path) -> Path:
    """The nnU-Net checkpoint that ``init`` (a run directory or a checkpoint file) names, or a UserError."""
    init = Path(init)
    if init.is_file():
        return init
    record_file = init / "backend" / "nnunet.json"
    if init.is_dir() and record_file.is_file():
        try:
            record = json.loads(record_file.read_text())
            results, fold_number = record["results"], record["fold"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"train.init = {init}: its record {record_file} is damaged ({type(exc).__name__}: {exc}), "
                            "so its checkpoint cannot be found. Start from another run or a checkpoint file.") from None
        checkpoint = _run_checkpoint_name(init)
        fold = init / "backend" / results / f"fold_{fold_number}"
        path = fold / f"checkpoint_{checkpoint}.pth"
        if not path.is_file():
            raise UserError(f"train.init = {init}: {path} does not exist, so that nnU-Net run did not finish its "
                            "training. Resume it (vlab train --resume) or start from another run.")
        return path
    if init.is_dir():
        raise UserError(f"train.init = {init}: not an nnU-Net run (it has no backend/nnunet.json). The nnunet model "
                        "starts only from nnU-Net weights: give an nnU-Net run of this project or an nnU-Net "
                        "checkpoint file (checkpoint_final.pth).")
    raise UserError(f"train.init = {init}: no such run directory or checkpoint file.")


def header_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a torch checkpoint, from its first bytes (torch.save writes a zip archive,
    older torch a pickle); None when it may be one. Cheap: made before planning and preprocessing."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(2)
        if not start:
            return "the file is empty"
        if zipfile.is_zipfile(path) or start[:1] == b"\x80":
            return None
    except OSError as exc:
        return f"the file cannot be read ({exc.strerror or exc})"
    return "not a torch checkpoint (neither a torch archive nor a pickle: damaged, truncated or another kind of file)"


def init_problem(init: Path) -> str | None:
    """What keeps an existing ``train.init`` (an nnU-Net run or a checkpoint file) from being used, found
    without loading the weights; None when nothing does."""
    try:
        path = checkpoint_file(init)
    except UserError as exc:
        return str(exc)
    problem = header_problem(path)
    return f"train.init = {init}: {path}: {problem}. Give checkpoint_final.pth of an nnU-Net training or an nnU-Net " \
           "run folder." if problem else None


def _run_checkpoint_name(run_dir: Path) -> str:
    """The checkpoint a run predicts with (its params.checkpoint), default ``final``."""
    try:
        spec = json.loads((run_dir / "spec.json").read_text())
        return spec["model"]["params"].get("checkpoint") or "final"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "final"


def read_weights(path: Path) -> tuple[dict, set[str]]:
    """The ``network_weights`` of an nnU-Net checkpoint, on the CPU, and the devices they were saved from."""
    import torch

    devices: set[str] = set()

    def to_cpu(storage, location):
        devices.add(str(location).split(":")[0])
        return storage

    try:
        saved = torch.load(path, map_location=to_cpu, weights_only=False)
    except Exception as exc:  # any unreadable file is the user's to fix
        raise UserError(f"train.init: {path} cannot be read as an nnU-Net checkpoint ({type(exc).__name__}: {exc}). "
                        "Give checkpoint_final.pth of an nnU-Net training or an nnU-Net run folder.") from None
    weights = saved.get("network_weights") if isinstance(saved, dict) else None
    if not isinstance(weights, dict):
        raise UserError(f"train.init: {path} holds no nnU-Net network weights (no 'network_weights'). Give "
                        "checkpoint_final.pth of an nnU-Net training or an nnU-Net run folder.")
    return weights, devices


def mismatches(own: dict, pretrained: dict) -> tuple[list[str], list[str]]:
    """(layers of ``own`` missing from ``pretrained``, layers whose shapes differ), seg heads excepted."""
    missing, reshaped = [], []
    for name, tensor in own.items():
        if any(skip in name for skip in SKIPPED):
            continue
        if name not in pretrained:
            missing.append(name)
        elif tuple(pretrained[name].shape) != tuple(tensor.shape):
            reshaped.append(f"{name} ({tuple(pretrained[name].shape)} there, {tuple(tensor.shape)} here)")
    return missing, reshaped


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def check_compatible(network, path: Path, pretrained: dict) -> None:
    """A UserError listing the layers of ``network`` that the checkpoint cannot fill."""
    missing, reshaped = mismatches(network.state_dict(), pretrained)
    if not missing and not reshaped:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} layer(s) of this network are not in it: {_listed(missing)}")
    if reshaped:
        parts.append(f"{len(reshaped)} layer(s) have another shape: {_listed(reshaped)}")
    raise UserError(f"train.init: the weights in {path} do not fit this nnU-Net network; " + "; ".join(parts) + ". "
                    "Another patch size is fine, but the planner, configuration, number of stages and features per "
                    "stage (params.shrink) must be those the weights were trained with.")


def build_network(plans: dict, configuration: str, dataset_json: dict, trainer: str):
    """The network a training of these plans would build (deep supervision on, as in training)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from vesuvius_lab.plugins.nnunet.trainers import trainer_class

    plans_manager = PlansManager(plans)
    config = plans_manager.get_configuration(configuration)
    return trainer_class(trainer).build_network_architecture(
        plans_manager, config, determine_num_input_channels(plans_manager, config, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=True)


def check_init(init: Path, plans: dict, configuration: str, dataset_json: dict, trainer: str) -> Path:
    """The checkpoint of ``init``, checked against the network of these plans (before any training)."""
    path = checkpoint_file(init)
    pretrained, _ = read_weights(path)
    check_compatible(build_network(plans, configuration, dataset_json, trainer), path, pretrained)
    return path


def load_into(network, path: Path, scratch: Path) -> str:
    """nnU-Net's ``load_pretrained_weights`` into ``network``; returns a line for the run's log.

    A checkpoint saved on a GPU is first copied to the CPU (``scratch``) when no GPU is here, since
    nnU-Net's loader maps it to the devices it was saved from."""
    import torch
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    pretrained, devices = read_weights(path)
    module = getattr(network, "module", network)  # DDP
    module = getattr(module, "_orig_mod", module)  # torch.compile
    check_compatible(module, path, pretrained)
    source = path
    if "cuda" in devices and not torch.cuda.is_available():
        source = Path(scratch)
        torch.save({"network_weights": pretrained}, source)
    try:
        load_pretrained_weights(network, str(source), verbose=False)
    finally:
        if source != path:
            source.unlink(missing_ok=True)
    own = module.state_dict()
    loaded = [name for name in own if name in pretrained and not any(skip in name for skip in SKIPPED)]
    fresh = [name for name in own if any(skip in name for skip in SKIPPED)]
    return (f"nnU-Net: initialised from {path} ({len(loaded)} tensors loaded; {len(fresh)} segmentation-head "
            "tensors start fresh, as with nnUNetv2_train -pretrained_weights)")
