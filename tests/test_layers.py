"""The house's structure: stage packages in layers, no import circle, the public import paths."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_linter_contracts_pass():
    """pyproject.toml's contracts: stages import only lower stages; the root and core import no plugin."""
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), i.e. import circles."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module) & modules:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return groups


def test_core_has_no_import_circle():
    graph = grimp.build_graph("vesuvius_lab", cache_dir=None)  # a fresh graph: never a stale cache
    # A package imports its own modules to re-export names; that is not a circle between modules.
    modules = {m for m in graph.modules if m.startswith("vesuvius_lab.core.")}
    packages = {m for m in modules if (ROOT / m.replace(".", "/") / "__init__.py").is_file()}
    assert _cycles(graph, modules - packages) == []


def test_the_contract_sees_a_lower_stage_importing_a_higher_one(tmp_path):
    """The layers contract is not vacuous: a copy of the package with one upward import breaks it."""
    import shutil

    copy = tmp_path / "vesuvius_lab"
    shutil.copytree(ROOT / "vesuvius_lab", copy, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    metric = copy / "core" / "metric" / "voi.py"
    metric.write_text(metric.read_text() + "\n\ndef _upward():\n    from vesuvius_lab.core.training import trainer\n")
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "vesuvius_lab.core.metric.voi -> vesuvius_lab.core.training.trainer" in result.stdout


@pytest.mark.parametrize("path", [
    "vesuvius_lab.core.metric.score_volume",
    "vesuvius_lab.core.metric.mean_scores",
    "vesuvius_lab.core.inference.sliding_window",
    "vesuvius_lab.core.inference.predict_volume",
    "vesuvius_lab.core.inference.load_run",
    "vesuvius_lab.core.registry.build",
    "vesuvius_lab.core.registry.plugin",
    "vesuvius_lab.core.registry.Plugin",
    "vesuvius_lab.core.contract.backend.SelfTrainingModel",
    "vesuvius_lab.core.contract.backend.TrainJob",
    "vesuvius_lab.core.contract.models.Depth2D",
    "vesuvius_lab.core.data.corruption.punch_holes",
    "vesuvius_lab.core.inference.stitch_merge.merge_stitched",
    "vesuvius_lab.core.inference.postprocess.to_mask",
    "vesuvius_lab.core.contract.windows.window_problems",
    "vesuvius_lab.core.config.spec.Experiment",
])
def test_public_import_paths(path):
    module, _, name = path.rpartition(".")
    assert callable(getattr(importlib.import_module(module), name))


def test_every_core_module_is_in_a_stage_or_the_root():
    """The root of core holds only what every stage uses; a module one stage owns lives in that stage."""
    root = {"__init__", "registry", "errors", "files", "console", "interrupts", "children"}
    stages = {"contract", "config", "data", "metric", "runs", "inference", "training", "tuning", "launch", "reports"}
    core = ROOT / "vesuvius_lab" / "core"
    assert {p.stem for p in core.glob("*.py")} == root
    assert {p.name for p in core.iterdir() if p.is_dir() and p.name != "__pycache__"} == stages
    for stage in stages:
        doc = importlib.import_module(f"vesuvius_lab.core.{stage}").__doc__
        assert doc and "May import" in doc, stage


def _documented_paths() -> set[str]:
    """Every ``vesuvius_lab.core...`` name and ``from vesuvius_lab.core... import a, b`` that the README, the
    docs and the example plugin package show."""
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").rglob("*.md"),
             *(ROOT / "examples").rglob("*.py")]
    found = set()
    for page in pages:
        text = page.read_text()
        for module, names in re.findall(r"from (vesuvius_lab\.core[\w.]*) import ([\w, ]+)", text):
            found.update(f"{module}.{name.strip()}" for name in names.split(",") if name.strip())
        found.update(path.rstrip(".") for path in re.findall(r"vesuvius_lab\.core[\w.]*", text))
    return found


def _resolves(path: str) -> bool:
    module, name = path, None
    while module:
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError:
            module, _, last = module.rpartition(".")
            name = last if name is None else f"{last}.{name}"
            continue
        target = imported
        for part in (name or "").split(".") if name else []:
            if not hasattr(target, part):
                return False
            target = getattr(target, part)
        return True
    return False


def test_every_import_path_the_docs_show_resolves():
    paths = _documented_paths()
    assert "vesuvius_lab.core.metric.score_volume" in paths  # the collector reads the pages
    assert [path for path in sorted(paths) if not _resolves(path)] == []


def test_the_cli_and_the_trainer_load_no_heavy_library_before_a_run_needs_it():
    """A mistake in a file is reported at once: MONAI, nnU-Net and SMP (seconds each to import) load
    when a run samples patches or builds its model, not when the command or the trainer is imported."""
    code = ("import sys, vesuvius_lab.cli, vesuvius_lab.core.training.trainer, vesuvius_lab.core.inference.predict\n"
            "print(sorted(m for m in ('monai', 'nnunetv2', 'segmentation_models_pytorch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]"]
