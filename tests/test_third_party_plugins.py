"""Third-party plugins installed as real distributions with entry points, as a user would install them.

Each package is installed with pip into its own folder, which the `vlab` subprocess sees on its
path: nothing in vesuvius-lab changes for them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_experiment

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "vlab-plugin-example"
VLAB = [sys.executable, "-m", "vesuvius_lab"]


def pip_install(source: Path, target: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True)


def make_package(root: Path, name: str, entry_points: str, module: str | None = None) -> Path:
    """A minimal distribution: pyproject.toml with entry points and, optionally, one module."""
    (root / "src").mkdir(parents=True)
    (root / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{name}"
        version = "1.2.3"
        {entry_points}
        [tool.setuptools]
        package-dir = {{"" = "src"}}
        py-modules = [{'"' + module + '"' if module else ''}]
    """))
    if module:
        (root / "src" / f"{module}.py").write_text("from vesuvius_lab.plugins.losses import dice as dice\n")
    return root


def vlab(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(VLAB + args, capture_output=True, text=True, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example package and a broken one (its module is missing) installed side by side."""
    site = tmp_path_factory.mktemp("site")
    pip_install(EXAMPLE, site)
    broken = make_package(tmp_path_factory.mktemp("broken"), "vlab-broken-plugin",
                          '[project.entry-points."vesuvius_lab.losses"]\nghost = "no_such_module:ghost"')
    pip_install(broken, site)
    return site


def test_listing_shows_broken_plugin_under_its_package_and_the_rest_ok(site, tmp_path):
    result = vlab(["plugins", "--json"], site, tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {(r["group"], r["name"]): r for r in json.loads(result.stdout)}
    ghost = rows[("losses", "ghost")]
    assert ghost["package"] == "vlab-broken-plugin" and ghost["version"] == "1.2.3"
    assert ghost["status"].startswith("broken: ") and "no_such_module" in ghost["status"]
    assert rows[("losses", "log_cosh_dice")]["status"] == "ok"
    assert rows[("losses", "log_cosh_dice")]["package"] == "vlab-plugin-example"
    assert rows[("blenders", "hann")]["summary"].startswith("Raised-cosine weights")
    others = [r for key, r in rows.items() if key != ("losses", "ghost")]
    assert others and all(r["status"] == "ok" for r in others)


def test_experiment_uses_third_party_plugins(site, tmp_path):
    exp = tmp_path / "third.toml"
    exp.write_text(textwrap.dedent("""
        name = "third-party"
        [model]
        plugin = "smp_unet25d"
        [[loss]]
        plugin = "log_cosh_dice"
        params = { smooth = 0.5 }
        [inference]
        blend = { plugin = "hann", params = { floor = 0.01 } }
    """))
    result = vlab(["validate", str(exp)], site, tmp_path)
    assert result.returncode == 0, result.stderr
    built = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import torch
        from vesuvius_lab.core import registry
        w = registry.build("blenders", "hann", {"floor": 0.01}, window=(4, 8, 8))
        assert w.shape == (4, 8, 8) and w.min() >= 0.01 and w.max() == 1.0
        loss = registry.build("losses", "log_cosh_dice", {})
        logits = torch.zeros(1, 1, 2, 4, 4, requires_grad=True)
        value = loss(logits, torch.ones(1, 1, 2, 4, 4), torch.ones(1, 1, 2, 4, 4, dtype=torch.bool))
        value.backward()
        assert value.item() > 0 and logits.grad.abs().sum() > 0
        print("built")
    """)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)})
    assert built.returncode == 0 and "built" in built.stdout, built.stderr


def test_using_a_broken_plugin_is_a_clear_error(site, tmp_path):
    exp = tmp_path / "ghost.toml"
    exp.write_text('name = "g"\n[model]\nplugin = "smp_unet25d"\n[[loss]]\nplugin = "ghost"\n')
    result = vlab(["validate", str(exp)], site, tmp_path)
    assert result.returncode == 2
    assert "vlab-broken-plugin" in result.stderr and "no_such_module" in result.stderr
    assert "Traceback" not in result.stderr


def test_same_name_from_two_packages_is_an_error_naming_both(site, tmp_path):
    clash_site = tmp_path / "clash-site"
    clash = make_package(tmp_path / "clash", "vlab-clashing-plugin",
                         '[project.entry-points."vesuvius_lab.losses"]\ndice = "clashing:dice"', module="clashing")
    pip_install(clash, clash_site)
    exp = tmp_path / "clash.toml"
    exp.write_text('name = "c"\n[model]\nplugin = "smp_unet25d"\n[[loss]]\nplugin = "dice"\n')
    env_site = f"{clash_site}{os.pathsep}{site}"
    result = vlab(["validate", str(exp)], Path(env_site), tmp_path)
    assert result.returncode == 2
    assert "vlab-clashing-plugin" in result.stderr and "vesuvius-lab" in result.stderr
    listing = json.loads(vlab(["plugins", "--json", "--group", "losses"], Path(env_site), tmp_path).stdout)
    assert any(r["name"] == "dice" and r["status"].startswith("broken") for r in listing)


def test_example_tracker_is_found_through_entry_points_and_records_a_run(site, synth_data, tmp_path):
    listing = json.loads(vlab(["plugins", "--json", "--group", "trackers"], site, tmp_path).stdout)
    row = next(r for r in listing if r["name"] == "jsonl_events")
    assert row["package"] == "vlab-plugin-example" and row["status"] == "ok"
    exp = tmp_path / "tracked.toml"
    exp.write_text(tiny_experiment(epochs=1, iterations=1) + '[[tracker]]\nplugin = "jsonl_events"\n'
                   'params = { file = "calls.jsonl" }\n')
    env = {**os.environ, "PYTHONPATH": str(site), "VLAB_DATA": str(synth_data), "VLAB_RUNS": str(tmp_path / "runs"),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(VLAB + ["train", str(exp)], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 0 and "failed" not in result.stderr, result.stderr
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    calls = [json.loads(line) for line in (run_dir / "calls.jsonl").read_text().splitlines()]
    assert [c["event"] for c in calls] == ["start", "metrics", "finish"]
    assert calls[0]["run"] == run_dir.name and calls[0]["params"]["train.epochs"] == 1
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert calls[1]["step"] == 1 and calls[1]["metrics"]["val/score"] == record["val"]["score"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert calls[2]["status"] == "finished" and calls[2]["summary"]["score"] == summary["score"]


CHECK_AGAINST_MEMORY = """
import sys
from pathlib import Path

import numpy as np
import zarr

from vesuvius_lab.core.data.volumes import open_volume
from vesuvius_lab.core.inference.run_kinds import load_run

run, scroll, out = map(Path, sys.argv[1:])
source = open_volume(scroll)
volume = source.read(tuple(slice(0, n) for n in source.shape))
predictor = load_run(run)
probabilities = predictor.probabilities(volume)
probabilities[volume == 0] = 0  # --support-mask auto
expected = predictor.chain.apply(probabilities) * 255
plain = (probabilities > predictor.chain.threshold) * 255
written = zarr.open_group(out, mode="r")["0"][:]
print("equal" if np.array_equal(written, expected) else "different", "changed" if (expected != plain).any() else "same")
"""


def test_a_third_partys_global_post_processor_runs_chunked_in_the_global_pass(site, tiny_run, tmp_path):
    """The example's keep_largest needs the whole volume: through `vlab predict ... OUT.zarr` its chunked form
    runs in the global pass over chunks it crosses, and gives what the chain gives in memory."""
    import shutil

    from vesuvius_lab.core.data.synthetic_zarr import write_scroll_zarr

    scroll = write_scroll_zarr(tmp_path / "scroll.zarr", (40, 72, 68), seed=3, chunks=(16,) * 3, progress=False)
    run = tmp_path / "runs" / "tiny-largest" / Path(tiny_run).name
    shutil.copytree(tiny_run, run)
    spec = json.loads((run / "spec.json").read_text())
    spec["postprocess"] = [{"plugin": "erode", "params": {"radius": 1}}, {"plugin": "keep_largest", "params": {"count": 1}}]
    (run / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "largest.zarr"
    result = vlab(["--device", "cpu", "predict", str(run), "--input", str(scroll), "--output", str(out), "--chunk", "16",
                   "--block", "32", "--pass-chunk", "32"], site, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "global pass: keep_largest" in " ".join(result.stdout.split())
    check = subprocess.run([sys.executable, "-c", CHECK_AGAINST_MEMORY, str(run), str(scroll), str(out)],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)})
    assert check.stdout.split() == ["equal", "changed"], check.stdout + check.stderr
