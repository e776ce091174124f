"""Sliding-window inference: vesuvius_lab's engine against MONAI's sliding_window_inference.

Both run in this process on the same uint8 volume, with the same small 3D conv net, window,
overlap, batch size and Gaussian weights, each starting from the uint8 volume and ending with a
float32 numpy result. Printed per engine: the best wall time over the repeats, the share of
that time spent outside the predictor (tiling, copying, weighting, accumulating, dividing), and
the peak memory above what the process held before the call:

- CPU: the peak resident set size (VmHWM of /proc/self/status, reset through
  /proc/self/clear_refs before each call) minus the resident size just before the call, after
  freed heap memory was handed back to the OS (malloc_trim) so that runs do not hide each
  other's peaks. This
  counts everything the call touched: accumulators, windows, the net's activations, and for
  MONAI the float32 copy of the input it needs.
- CUDA: torch.cuda.max_memory_allocated above the allocation before the call.

Targets: time ratio (ours / MONAI) at most 1.0, our share outside the predictor at most 5%.
The predictor dominates both engines, so on a busy machine the time ratio mostly reflects noise
in the predictor's time; the seconds outside the predictor compare the engines themselves.

    OMP_NUM_THREADS=1 python benchmarks/inference.py              # 320^3, the competition size
    OMP_NUM_THREADS=1 python benchmarks/inference.py --size 96    # a quick run
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import _summary
import numpy as np
import torch

from vesuvius_lab.core.inference.engine import sliding_window

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def small_net(channels: int = 16) -> torch.nn.Module:
    """Three 3x3x3 convolutions, 16 channels: cheap enough that engine overhead would show."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, channels, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(channels, channels, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(channels, 1, 3, padding=1),
    ).eval()


class TimedPredictor:
    """Calls the net and adds up the seconds spent inside it."""

    def __init__(self, net: torch.nn.Module, device: torch.device):
        self.net, self.device, self.seconds = net, device, 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        self._sync()
        start = time.perf_counter()
        out = self.net(windows)
        self._sync()
        self.seconds += time.perf_counter() - start
        return out


def _status_kib(key: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _release_free_heap() -> None:
    """Return freed heap pages to the OS, so that one run's leftovers do not hide the next run's peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block above the level before it, in MiB (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device, self.mib = device, float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            try:
                CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident size
            except OSError:
                self._before = None
                return self
            self._before = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._before) / 2**20
        elif self._before is not None:
            self.mib = (_status_kib("VmHWM") - self._before) / 1024


def run_ours(volume: np.ndarray, predictor, args, device) -> np.ndarray:
    return sliding_window(volume, predictor, window=args.window, overlap=args.overlap, blender="gaussian",
                          batch_size=args.batch_size, scale=1 / 255, device=device)


def run_monai(volume: np.ndarray, predictor, args, device) -> np.ndarray:
    from monai.inferers import sliding_window_inference

    with torch.inference_mode():
        inputs = torch.from_numpy(volume).to(device).to(torch.float32).div_(255)[None, None]
        out = sliding_window_inference(inputs, args.window, args.batch_size, predictor, overlap=args.overlap,
                                       mode="gaussian", sigma_scale=0.125)
        return out[0].cpu().numpy()


def measure(run, volume, net, args, device) -> dict:
    predictor = TimedPredictor(net, device)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        result = run(volume, predictor, args, device)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "outside_s": seconds - predictor.seconds, "outside": 1 - predictor.seconds / seconds,
            "mib": memory.mib, "result": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=320, help="side of the cubic uint8 volume")
    parser.add_argument("--window", type=int, nargs=3, default=(64, 128, 128))
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per engine, alternating; the best counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--net", choices=("conv", "identity"), default="conv",
                        help="identity: no network at all, so the times compare the engines alone")
    _summary.add_argument(parser)
    args = parser.parse_args()

    device = torch.device(args.device)
    net = (small_net() if args.net == "conv" else torch.nn.Identity()).to(device)
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 256, (args.size,) * 3, dtype=np.uint8)
    print(f"volume {args.size}^3 uint8, window {tuple(args.window)}, overlap {args.overlap}, "
          f"batch {args.batch_size}, net {args.net}, device {device}, torch threads {torch.get_num_threads()}")

    small = volume[:args.window[0], :args.window[1], :args.window[2]]
    for run in (run_ours, run_monai):  # warm-up: first calls pay for kernel selection and imports
        run(small, TimedPredictor(net, device), args, device)

    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        # Alternating, so that a slow spell of a shared machine does not fall on one engine only.
        for name, run in (("vesuvius_lab", run_ours), ("monai", run_monai)):
            result = measure(run, volume, net, args, device)
            if name not in best or result["seconds"] < best[name]["seconds"]:
                best[name] = result
            print(f"  {name:12s} {result['seconds']:8.2f} s")

    ours, monai = best["vesuvius_lab"], best["monai"]
    difference = float(np.abs(ours['result'] - monai['result']).max())
    print(f"max |ours - monai| = {difference:.2e}")
    print(f"{'engine':12s} {'time s':>8s} {'outside predictor':>24s} {'peak MiB':>9s}")
    for name, r in best.items():
        print(f"{name:12s} {r['seconds']:8.2f} {r['outside_s']:14.3f} s {r['outside']:6.1%} {r['mib']:9.0f}")
    print(f"time ratio vesuvius_lab / monai = {ours['seconds'] / monai['seconds']:.3f} (target <= 1.0); "
          f"share outside the predictor = {ours['outside']:.1%} (target <= 5%)")
    setting = f"{args.size}^3 uint8, window {'x'.join(map(str, args.window))}, net {args.net}, {device}"
    _summary.write(args.summary, [
        _summary.row("inference", f"sliding window time, {setting}", ours["seconds"], "s", peer=monai["seconds"],
                     peer_name="MONAI sliding_window_inference", target="<= 1.0",
                     note=f"best of {args.repeats}; max |ours - MONAI| {difference:.1e}"),
        _summary.row("inference", "share of time outside the predictor", 100 * ours["outside"], "%",
                     peer=100 * monai["outside"], peer_name="MONAI sliding_window_inference", target="<= 5%",
                     note=f"{ours['outside_s']:.2f} s ours, {monai['outside_s']:.2f} s MONAI"),
        _summary.row("inference", "peak memory above the start", ours["mib"], "MiB", peer=monai["mib"],
                     peer_name="MONAI sliding_window_inference"),
    ])


if __name__ == "__main__":
    main()
