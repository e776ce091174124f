"""The first thing to run on a new GPU machine: every CUDA path of vesuvius-lab in a few minutes, one table.

For three models (the 2.5D UNet of experiments/unet25d.toml, MONAI's SwinUNETR of experiments/swinunetr.toml
and nnU-Net's ResEncM network for a 128^3 patch), a few training steps each way:

- ``fp32``: float32, the reference;
- ``bf16``: AMP with bfloat16 (autocast);
- ``fp16+scaler``: AMP with float16 and the gradient scaler, as the trainer does where bf16 is missing;
- ``channels-last``: bf16 with the model and batch in channels-last memory format (NDHWC; NHWC for the 2.5D
  net's 2D convolutions), which tensor cores prefer;
- ``compile``: bf16 through ``torch.compile`` (inductor); the first steps' compile time is its own column;

then sliding-window inference of a volume with the model in bf16, this project's engine against MONAI's
``sliding_window_inference`` (same windows, overlap, Gaussian weights), their seconds and the largest
difference between the two; and last the trainer itself (``vlab train``'s code on a small synthetic dataset,
AMP "auto") with DDP over every visible GPU (nccl; one rank on one GPU). Each row says ok, failed (the error)
or skipped (why), with steps per second, the speed against the fp32 or bf16 row, and the peak GPU memory the
check added to what the process held before it. A failed check does not stop the others; the exit status is
1 when one failed.

Without CUDA (or with ``--device cpu``) the same checks run tiny on the CPU, in under a minute: smaller models
and windows, ``torch.compile`` with the ``aot_eager`` backend (dynamo and AOT autograd trace the model as
inductor would, without generating code), one rank, and SwinUNETR in float32 only (training never uses AMP on
the CPU, where torch's bf16 attention gives NaN now and then and fp16 is emulated). The test suite runs it this
way, so the script cannot rot between GPU loans.

    python benchmarks/gpu_check.py                    # CUDA if there is one, else the tiny CPU run
    python benchmarks/gpu_check.py --json checks.json # the rows as JSON too
    python benchmarks/gpu_check.py --budget 420       # checks not started after 420 s are skipped
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from models import PeakMemory, _sync

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
TRAINING_MODES = ("fp32", "bf16", "fp16+scaler", "channels-last", "compile")


@dataclass
class Row:
    model: str
    check: str
    status: str = "ok"  # ok, failed, skipped
    steps_per_s: float | None = None
    speed: float | None = None  # against the fp32 row (bf16, fp16) or the bf16 row (channels-last, compile)
    peak_gib: float | None = None
    seconds: float | None = None  # compile time; inference time; training time
    note: str = ""


@dataclass
class Model:
    """A model to check: how to build it, its training window and batch, and how to reach its full-size output."""

    name: str
    build: Callable[[], torch.nn.Module]
    window: tuple[int, int, int]
    batch: int
    two_d: bool = False  # a 2.5D net: its convolutions are 2D
    attention: bool = False  # its mixed precision is checked on CUDA only (see _skip_reason)
    heads: Callable[[object], torch.Tensor] = field(default=lambda out: out)  # deep supervision: the first head


# --------------------------------------------------------------------------- the models, full size or tiny


def _from_experiment(name: str, file: str, tiny: dict | None) -> Model:
    from vesuvius_lab.core import registry
    from vesuvius_lab.core.config.experiment import load_experiment

    spec = load_experiment(EXPERIMENTS / file).spec
    plugin, params = spec.model.plugin, dict(spec.model.params)
    window, batch = tuple(spec.data.window), spec.train.batch_size
    if tiny is not None:
        params, window, batch = tiny["params"], tuple(tiny["window"]), tiny["batch"]

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return registry.build("models", plugin, params, window=window, in_channels=1, out_channels=1)

    return Model(name, build, window, batch, two_d=plugin.startswith("smp_"), attention="swin" in plugin)


def _resenc(tiny: bool) -> Model:
    """nnU-Net's ResEncM network as its planner lays it out for an isotropic patch (128^3: 6 stages of
    32..320 features, 1-3-4-6-6-6 residual blocks), deep supervision on as in training."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    stages = 3 if tiny else 6
    features = [8, 16, 32] if tiny else [32, 64, 128, 256, 320, 320]
    window = (32, 32, 32) if tiny else (128, 128, 128)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return ResidualEncoderUNet(
            1, stages, features, torch.nn.Conv3d, 3, [1] + [2] * (stages - 1), [1, 3, 4, 6, 6, 6][:stages], 1,
            [1] * (stages - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
            norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
            deep_supervision=True)

    return Model("nnunet-resencm", build, window, 1 if tiny else 2, heads=lambda out: out[0])


def models(tiny: bool) -> list[Model]:
    unet = {"params": {"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8]},
            "window": (8, 32, 32), "batch": 2} if tiny else None
    # 64^3: SwinUNETR's bottleneck is 1/32 of the window, and instance norm needs more than one voxel there
    swin = {"params": {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 6, 12, 24]},
            "window": (64, 64, 64), "batch": 1} if tiny else None
    return [_from_experiment("unet25d", "unet25d.toml", unet), _from_experiment("swinunetr", "swinunetr.toml", swin),
            _resenc(tiny)]


# --------------------------------------------------------------------------- measuring


def train_steps(model: Model, mode: str, device: torch.device, warmup: int, steps: int) -> Row:
    """Time ``steps`` training steps (forward, Dice + BCE, backward, AdamW) after ``warmup`` ones."""
    from vesuvius_lab.core.config.spec import LossTerm
    from vesuvius_lab.core.training.objective import build_objective

    row = Row(model.name, mode)
    net = model.build().to(device).train()
    layout = torch.channels_last if model.two_d else torch.channels_last_3d
    x = torch.rand(model.batch, 1, *model.window, device=device)
    target = (torch.rand(model.batch, 1, *model.window, device=device) < 0.1).float()
    valid = torch.ones_like(target, dtype=torch.bool)
    if mode == "channels-last":
        net = net.to(memory_format=layout)
        if not model.two_d:  # the 2.5D net turns (B, 1, D, H, W) into (B, D, H, W) itself
            x = x.contiguous(memory_format=layout)
    if mode == "compile":
        net = torch.compile(net, backend="inductor" if device.type == "cuda" else "aot_eager")
    objective = build_objective([LossTerm(plugin="dice"), LossTerm(plugin="bce")])
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    dtype = {"fp32": None, "fp16+scaler": torch.float16}.get(mode, torch.bfloat16)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    losses = []

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = objective(model.heads(net(x)).float(), target, valid)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())

    started = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    if mode == "compile":
        row.seconds = time.perf_counter() - started  # mostly compiling
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    row.steps_per_s = steps / (time.perf_counter() - started)
    if not all(math.isfinite(value) for value in losses):
        raise FloatingPointError(f"a loss was not finite: {losses}")
    return row


def sliding_windows(model: Model, device: torch.device, side: tuple[int, int, int]) -> Row:
    """This project's engine against MONAI's on one uint8 volume, the model in bf16 autocast."""
    import numpy as np
    from monai.inferers import sliding_window_inference

    from vesuvius_lab.core.inference.engine import sliding_window

    row = Row(model.name, "sliding window")
    net = model.build().to(device).eval()
    volume = np.random.default_rng(0).integers(0, 256, side, dtype=np.uint8)
    batch = max(2, model.batch)

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model.heads(net(windows)).float()

    _sync(device)
    started = time.perf_counter()
    ours = sliding_window(volume, predictor, window=model.window, overlap=0.25, blender="gaussian",
                          batch_size=batch, scale=1 / 255, device=device)
    _sync(device)
    row.seconds = time.perf_counter() - started
    started = time.perf_counter()
    with torch.inference_mode():
        inputs = torch.from_numpy(volume).to(device).float().div_(255)[None, None]
        peer = sliding_window_inference(inputs, model.window, batch, predictor, overlap=0.25, mode="gaussian",
                                        sigma_scale=0.125)[0].cpu().numpy()
    _sync(device)
    monai_s = time.perf_counter() - started
    row.speed = monai_s / row.seconds
    difference = float(np.abs(ours - peer).max())
    row.note = f"MONAI {monai_s:.2f} s, largest difference {difference:.1e} (bf16 windows)"
    if not difference < 0.05:
        raise AssertionError(f"the two engines differ by {difference:.3g}")
    return row


def trainer(device: torch.device, tiny: bool, folder: Path, ranks: int) -> Row:
    """`vlab train`'s own code: a short run of a 2.5D UNet, AMP "auto", on ``ranks`` GPUs (DDP, nccl)."""
    from vesuvius_lab.core.config.experiment import load_experiment
    from vesuvius_lab.core.config.project import load_project
    from vesuvius_lab.core.data.synthetic import write_dataset
    from vesuvius_lab.core.training.trainer import train

    row = Row("unet25d", f"trainer, {ranks} rank(s)")
    data = write_dataset(folder / "data", n=3 if tiny else 6, shape=(32, 64, 64) if tiny else (64, 256, 256),
                         scrolls=3, n_test=1, progress=False)
    window = [8, 32, 32] if tiny else [16, 256, 256]
    (folder / "check.toml").write_text(f"""name = "gpu-check"
[data]
window = {window}
folds = 3
fold = "all"
[model]
plugin = "smp_unet25d"
params = {{ encoder = "resnet18", encoder_depth = 3, decoder_channels = [16, 8, 8] }}
[train]
epochs = 1
iterations_per_epoch = {4 if tiny else 40}
batch_size = 2
workers = {0 if tiny else 2}
amp = "auto"
""")
    (folder / "vesuvius.toml").write_text(f'data_root = "{data}"\nruns_dir = "runs"\ndevice = "{device.type}"\n')
    started = time.perf_counter()
    run = train(load_experiment(folder / "check.toml"), load_project(folder / "vesuvius.toml"), nproc=ranks)
    row.seconds = time.perf_counter() - started
    (record,) = run.metrics()
    row.steps_per_s = record["samples_per_s"] / 2
    log = (run.path / "log.txt").read_text()
    row.note = next((line.split("] ")[-1] for line in log.splitlines() if "DDP processes" in line),
                    "one process, no DDP") + f"; world size {run.read('env.json').get('world_size')}"
    if not math.isfinite(record["loss"]):
        raise FloatingPointError(f"the loss was {record['loss']}")
    return row


# --------------------------------------------------------------------------- running every check


def _guarded(row_of: Callable[[], Row], model: str, check: str, device: torch.device, deadline: float) -> Row:
    if time.monotonic() > deadline:
        return Row(model, check, "skipped", note="the time budget was spent")
    try:
        memory = PeakMemory(device) if device.type == "cuda" else None  # the CPU run checks paths, not memory
        if memory:
            memory.start()
        row = row_of()
        _sync(device)
        row.peak_gib = memory.peak_mib() / 1024 if memory else None
        return row
    except Exception as exc:  # a failed check is a row; the others go on
        lines = traceback.format_exception_only(type(exc), exc)
        return Row(model, check, "failed", note=" ".join(lines[-1].split())[:300])
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _skip_reason(model: Model, mode: str, device: torch.device) -> str | None:
    if device.type == "cuda" and mode not in ("fp32", "fp16+scaler") and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    if device.type == "cpu" and mode != "fp32" and model.attention:
        # Training never uses AMP on the CPU; there, torch's bf16 attention turns a step's loss into NaN now
        # and then, and fp16 is emulated (half a minute a step). The CUDA run checks these.
        return "mixed precision of attention is a CUDA path (AMP is off on the CPU)"
    return None


def run_checks(device: torch.device, budget_s: float, warmup: int, steps: int, volume_side: int) -> list[Row]:
    tiny = device.type != "cuda"
    deadline = time.monotonic() + budget_s
    rows: list[Row] = []
    for model in models(tiny):
        speeds: dict[str, float] = {}
        for mode in TRAINING_MODES:
            reason = _skip_reason(model, mode, device)
            if reason:
                rows.append(Row(model.name, mode, "skipped", note=reason))
                continue
            row = _guarded(lambda: train_steps(model, mode, device, warmup, steps), model.name, mode, device, deadline)
            if row.steps_per_s:
                speeds[mode] = row.steps_per_s
                reference = speeds.get("bf16" if mode in ("channels-last", "compile") else "fp32")
                row.speed = row.steps_per_s / reference if reference and mode != "fp32" else None
            rows.append(row)
        side = tuple(max(volume_side, w) for w in model.window)
        rows.append(_guarded(lambda: sliding_windows(model, device, side), model.name, "sliding window", device,
                             deadline))
    ranks = max(1, torch.cuda.device_count()) if device.type == "cuda" else 1  # every visible GPU
    with tempfile.TemporaryDirectory(prefix="vlab-gpu-check-") as folder:
        rows.append(_guarded(lambda: trainer(device, tiny, Path(folder), ranks), "unet25d",
                             f"trainer, {ranks} rank(s)", device, deadline))
    return rows


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[Row], device: torch.device, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (tiny models)"
    table = Table(title=f"vesuvius-lab GPU check: {name}, torch {torch.__version__}, {seconds:.0f} s")
    for column, justify in (("model", "left"), ("check", "left"), ("status", "left"), ("steps/s", "right"),
                            ("speed", "right"), ("peak GiB", "right"), ("s", "right"), ("note", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    styles = {"ok": "green", "failed": "bold red", "skipped": "yellow"}
    for row in rows:
        table.add_row(row.model, row.check, f"[{styles[row.status]}]{row.status}[/]", _number(row.steps_per_s),
                      "-" if row.speed is None else f"{row.speed:.2f}x", _number(row.peak_gib),
                      _number(row.seconds, 1), row.note)
    Console(width=max(120, Console().width)).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when there is one")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    parser.add_argument("--budget", type=float, default=420, help="seconds after which no check starts (default 420)")
    parser.add_argument("--steps", type=int, help="timed training steps per check (default 10 on CUDA, 2 on the CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    tiny = device.type != "cuda"
    started = time.monotonic()
    rows = run_checks(device, args.budget, warmup=1 if tiny else 3, steps=args.steps or (2 if tiny else 10),
                      volume_side=48 if tiny else 320)
    print_table(rows, device, time.monotonic() - started)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
            "seconds": time.monotonic() - started, "rows": [asdict(row) for row in rows]}, indent=1) + "\n")
    return 1 if any(row.status == "failed" for row in rows) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main())
