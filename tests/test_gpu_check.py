"""benchmarks/gpu_check.py, the first thing to run on a GPU machine, run here as it runs without CUDA (tiny
models on the CPU, the same checks), so that it still works when a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
MODELS = ("unet25d", "swinunetr", "nnunet-resencm")
CHECKS = ("fp32", "bf16", "fp16+scaler", "channels-last", "compile", "sliding window")


@pytest.mark.slow
def test_the_gpu_check_runs_every_check_on_the_cpu_and_prints_one_table(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--steps", "1",
                             "--json", str(tmp_path / "c.json")],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    record = json.loads((tmp_path / "c.json").read_text())
    rows = {(row["model"], row["check"]): row for row in record["rows"]}
    failed = {key: row["note"] for key, row in rows.items() if row["status"] != "ok"}
    cuda_only = {("swinunetr", mode) for mode in ("bf16", "fp16+scaler", "channels-last", "compile")}
    assert result.returncode == 0 and set(failed) == cuda_only, (failed, result.stderr[-3000:])
    assert all(rows[key]["status"] == "skipped" for key in cuda_only)  # attention's mixed precision: CUDA only
    assert set(rows) == {(model, check) for model in MODELS for check in CHECKS} | {("unet25d", "trainer, 1 rank(s)")}
    assert all(rows[(model, "bf16")]["speed"] > 0 for model in ("unet25d", "nnunet-resencm"))
    assert "one process, no DDP" in rows[("unet25d", "trainer, 1 rank(s)")]["note"]
    assert "largest difference" in rows[("swinunetr", "sliding window")]["note"]
    table = " ".join(result.stdout.split())
    assert "vesuvius-lab GPU check: CPU (tiny models)" in table and "channels-last" in table
