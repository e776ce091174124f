"""Pictures of a run: validation slices with errors coloured, and training curves (matplotlib, Agg).

Errors are judged as the metric's SurfaceDice judges them, with its 2-voxel tolerance in 3D: a
labelled surface voxel with no predicted voxel within the tolerance is *missed*, a predicted
voxel with no labelled surface within it is *extra*, the rest of both is *found*. Voxels the
label ignores (label 2) are shown in grey: nothing there counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from vesuvius_lab.core.files import atomic_path
from vesuvius_lab.core.metric.score import SURFACE_TOLERANCE

# Classes of a voxel in an overlay: the errors of a prediction, and LABELLED for the label panel.
BACKGROUND, FOUND, MISSED, EXTRA, IGNORED, LABELLED = range(6)
#: Okabe-Ito colours, distinguishable with the common colour-vision deficiencies.
COLOURS = {
    LABELLED: (0.34, 0.71, 0.91),  # sky blue
    FOUND: (0.0, 0.62, 0.45),  # bluish green
    MISSED: (0.84, 0.37, 0.0),  # vermillion
    EXTRA: (0.94, 0.89, 0.26),  # yellow
    IGNORED: (0.55, 0.55, 0.58),  # neutral grey
}
ALPHA = {LABELLED: 0.8, FOUND: 0.8, MISSED: 0.95, EXTRA: 0.95, IGNORED: 0.55}
LEGEND = {
    LABELLED: "labelled surface (label panel)",
    IGNORED: "ignored region (label 2, not scored)",
    FOUND: "surface found (within 2 voxels)",
    MISSED: "missed surface",
    EXTRA: "extra surface (none labelled within 2 voxels)",
}
AXIS_NAMES = ("z (axis 0)", "y (axis 1)", "x (axis 2)")
DPI = 100


def _ball(radius: float) -> np.ndarray:
    r = int(np.floor(radius))
    grid = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return (grid ** 2).sum(axis=0) <= radius ** 2


def error_classes(label: np.ndarray, mask: np.ndarray, *, ignore_label: int | None = 2,
                  tolerance: float = SURFACE_TOLERANCE) -> np.ndarray:
    """Per voxel: BACKGROUND, FOUND, MISSED, EXTRA or IGNORED (uint8, the shape of ``label``)."""
    from scipy.ndimage import binary_dilation

    ignored = label == ignore_label if ignore_label is not None else np.zeros(label.shape, bool)
    truth = (label == 1) & ~ignored
    predicted = (mask != 0) & ~ignored
    ball = _ball(tolerance)
    near_prediction = binary_dilation(predicted, ball) if predicted.any() else predicted
    near_truth = binary_dilation(truth, ball) if truth.any() else truth
    classes = np.zeros(label.shape, np.uint8)
    classes[truth | predicted] = FOUND
    classes[truth & ~near_prediction] = MISSED
    classes[predicted & ~near_truth] = EXTRA
    classes[ignored] = IGNORED
    return classes


def slice_classes(label: np.ndarray, mask: np.ndarray, axis: int, index: int, *, ignore_label: int | None = 2,
                  tolerance: float = SURFACE_TOLERANCE) -> np.ndarray:
    """:func:`error_classes` of one slice, computed on a slab just thick enough for the 3D tolerance."""
    reach = int(np.floor(tolerance))
    low, high = max(index - reach, 0), min(index + reach + 1, label.shape[axis])
    slab = [slice(None)] * 3
    slab[axis] = slice(low, high)
    classes = error_classes(label[tuple(slab)], mask[tuple(slab)], ignore_label=ignore_label, tolerance=tolerance)
    return np.take(classes, index - low, axis=axis)


def overlay_rgb(ct: np.ndarray, classes: np.ndarray, *, contrast: tuple[float, float] | None = None) -> np.ndarray:
    """A 2D CT slice in grey with each error class blended in its colour; float RGB in [0, 1]."""
    low, high = contrast or (float(ct.min()), float(ct.max()))
    grey = np.clip((ct.astype(np.float32) - low) / max(high - low, 1e-6), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for cls, colour in COLOURS.items():
        where = classes == cls
        rgb[where] = (1 - ALPHA[cls]) * rgb[where] + ALPHA[cls] * np.asarray(colour, np.float32)
    return rgb


def best_slices(label: np.ndarray) -> tuple[int, int, int]:
    """Along each axis, the slice with the most labelled surface (the middle one when there is none)."""
    surface = label == 1
    indices = []
    for axis in range(3):
        counts = surface.sum(axis=tuple(a for a in range(3) if a != axis))
        indices.append(int(counts.argmax()) if counts.any() else label.shape[axis] // 2)
    return tuple(indices)


def _contrast(image: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(image, (1, 99.5))
    return float(low), float(max(high, low + 1))


def volume_figure(path: Path, image: np.ndarray, label: np.ndarray, probabilities: np.ndarray,
                  mask: np.ndarray, *, title: str, ignore_label: int | None = 2) -> Path:
    """One PNG: for each axis, CT | label | probability | errors at the slice richest in surface."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    contrast = _contrast(image)
    indices = best_slices(label)
    shapes = [np.take(image, 0, axis=axis).shape for axis in range(3)]
    ratios = [h / w for h, w in shapes]
    panel = 3.2
    fig, axes = plt.subplots(3, 4, figsize=(4 * panel, panel * sum(ratios) + 1.6),
                             gridspec_kw={"height_ratios": ratios}, layout="constrained", dpi=DPI)
    for axis, index in enumerate(indices):
        ct = np.take(image, index, axis=axis)
        lab = np.take(label, index, axis=axis)
        prob = np.take(probabilities, index, axis=axis).astype(np.float32)
        classes = slice_classes(label, mask, axis, index, ignore_label=ignore_label)
        label_classes = np.where(lab == 1, LABELLED, np.where(lab == ignore_label, IGNORED, BACKGROUND))
        row = axes[axis]
        row[0].imshow(ct, cmap="gray", vmin=contrast[0], vmax=contrast[1], interpolation="nearest")
        row[1].imshow(overlay_rgb(ct, label_classes.astype(np.uint8), contrast=contrast), interpolation="nearest")
        row[2].imshow(ct, cmap="gray", vmin=contrast[0], vmax=contrast[1], interpolation="nearest")
        heat = row[2].imshow(np.ma.masked_less(prob, 0.05), cmap="magma", vmin=0, vmax=1, alpha=0.8,
                             interpolation="nearest")
        row[3].imshow(overlay_rgb(ct, classes, contrast=contrast), interpolation="nearest")
        counts = {name: int((classes == cls).sum()) for cls, name in ((MISSED, "missed"), (EXTRA, "extra"))}
        titles = (f"CT, {AXIS_NAMES[axis]} = {index}", "label", "probability",
                  f"errors: {counts['missed']} missed, {counts['extra']} extra voxels")
        for ax, text in zip(row, titles):
            ax.set_title(text, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(heat, ax=axes[:, 2], location="bottom", shrink=0.8, aspect=30, pad=0.02, label="surface probability")
    handles = [Patch(color=COLOURS[cls], label=text) for cls, text in LEGEND.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def training_curves(path: Path, metrics: Sequence[dict], *, title: str, best_epoch: int | None = None) -> Path:
    """One PNG: loss terms, learning rate, validation scores, and the score after each post-processing step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), layout="constrained", dpi=DPI)
    epochs = [m.get("epoch") for m in metrics]
    loss_ax, lr_ax, val_ax, step_ax = axes.ravel()
    _plot(loss_ax, epochs, {"loss": [m.get("loss") for m in metrics],
                            **_series(metrics, lambda m: m.get("loss_terms"))}, "training loss", first_bold=True)
    _plot(lr_ax, epochs, {"learning rate": [m.get("lr") for m in metrics]}, "learning rate (at the end of each epoch)")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    names = {"score": "score", "topo_score": "TopoScore", "surface_dice": "SurfaceDice", "voi_score": "VOI score"}
    _plot(val_ax, epochs, {label: [(m.get("val") or {}).get(key) for m in metrics] for key, label in names.items()},
          "validation (competition score)", first_bold=True)
    val_ax.set_ylim(0, 1.02)
    _plot(step_ax, epochs, _series(metrics, lambda m: (m.get("val") or {}).get("steps")),
          "validation score after each post-processing step")
    for ax in (val_ax, step_ax):
        if best_epoch:
            ax.axvline(best_epoch, color="0.5", linestyle="--", linewidth=1)
            ax.annotate("best checkpoint", (best_epoch, 0.02), xycoords=("data", "axes fraction"), fontsize=8,
                        color="0.4", ha="right", va="bottom", xytext=(-3, 0), textcoords="offset points")
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def tuning_curves(path: Path, trials: Sequence[dict], *, title: str, untuned: float | None = None,
                  chosen: dict | None = None, notices: Sequence[dict] = (), objective: str = "mean score",
                  profiles: dict | None = None) -> Path:
    """One PNG for a ``vlab tune`` run: the score of each trial with the best so far, and one panel per
    tuned key showing the score against its value (each key's effect), the chosen value marked and the
    chosen chain's profile through it; the tune's notices (an edge, a flat key, groups that disagree) are
    written on the panels they concern, and those of no one key above them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in trials if isinstance(t.get("score"), (int, float))]
    keys = list(dict.fromkeys(k for t in done for k in t.get("values", {})))
    by_key = {n.get("key"): n for n in notices if n.get("key")}
    general = [n for n in notices if not n.get("key")]
    columns = min(3, len(keys) + 1)
    rows = -(-(len(keys) + 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows + 0.5 * len(general)),
                             layout="constrained", dpi=DPI, squeeze=False)
    history = axes[0][0]
    numbers, scores = [t["number"] for t in done], [t["score"] for t in done]
    history.scatter(numbers, scores, s=12, color="tab:blue", label="trial")
    history.plot(numbers, np.maximum.accumulate(scores) if scores else [], color="tab:orange", label="best so far")
    if untuned is not None:
        history.axhline(untuned, color="0.5", linestyle="--", linewidth=1, label="untuned")
    history.set(title="score per trial", xlabel="trial", ylabel=objective)
    history.legend(fontsize=8)
    for ax, key in zip(axes.ravel()[1:], keys):
        points = [(t["values"][key], t["score"]) for t in done if key in t.get("values", {})]
        values = [v for v, _ in points]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            ax.scatter(values, [s for _, s in points], s=12, color="tab:green")
        else:  # choices: one column per choice
            labels = list(dict.fromkeys(map(str, values)))
            ax.scatter([labels.index(str(v)) for v in values], [s for _, s in points], s=12, color="tab:green")
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        profile = [(v, p) for v, p in (profiles or {}).get(key, []) if isinstance(p, (int, float))]
        if profile and numeric:  # the chosen chain with this key alone moved across its range
            ax.plot(*zip(*profile), color="tab:purple", marker="o", markersize=3, linewidth=1.2, label="profile")
        if chosen and key in chosen and numeric:
            ax.axvline(chosen[key], color="tab:red", linewidth=1, label="chosen")
        if profile and numeric:
            ax.legend(fontsize=7)
        notice = by_key.get(key)
        ax.set(title=key + (f"  [{notice['kind']}]" if notice else ""), xlabel="value", ylabel=objective)
        ax.title.set_fontsize(9)
        if notice:
            ax.title.set_color("tab:red")
            hint = "widen the range" if notice["kind"] == "edge" else "its value does not matter"
            ax.text(0.02, 0.03, hint, transform=ax.transAxes, fontsize=8, color="tab:red")
    for ax in axes.ravel()[len(keys) + 1:]:
        ax.axis("off")
    fig.suptitle(title + "".join(f"\n{n['kind']}: {_wrapped(n['message'])}" for n in general), fontsize=9 if general
                 else 11)
    return _save(fig, path)


def _wrapped(text: str, width: int = 150) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _series(metrics: Sequence[dict], pick) -> dict[str, list]:
    """Named series from a dict inside each record (loss terms, step scores), None where absent."""
    names = list(dict.fromkeys(name for m in metrics for name in (pick(m) or {})))
    return {name: [(pick(m) or {}).get(name) for m in metrics] for name in names}


def _plot(ax, epochs: list, series: dict[str, list], title: str, *, first_bold: bool = False) -> None:
    drawn = 0
    for position, (name, values) in enumerate(series.items()):
        points = [(e, v) for e, v in zip(epochs, values) if isinstance(e, (int, float)) and isinstance(v, (int, float))]
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3, label=name,
                linewidth=2.2 if first_bold and position == 0 else 1.2)
        drawn += 1
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, framealpha=0.85)
    else:
        ax.text(0.5, 0.5, "nothing recorded", transform=ax.transAxes, ha="center", color="0.5")
    ax.xaxis.get_major_locator().set_params(integer=True)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
