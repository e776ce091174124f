"""How scores are shown: a rich table per volume with the mean, or the JSON of ``vlab evaluate``."""

from __future__ import annotations

from vesuvius_lab.core.metric.score import VolumeScore, mean_scores
from vesuvius_lab.core.reports.tables import ESSENTIAL, KEY, OPTIONAL, Col, FittedTable


def scores_json(scores: list[tuple[str, VolumeScore]]) -> dict:
    """``{"volumes": [{"id", "score", ..., "betti": {"0": [m, p, g], ...}}], "mean": {...}}``."""
    return {"volumes": [{"id": volume_id, **score.to_dict()} for volume_id, score in scores],
            "mean": mean_scores([score for _, score in scores])}


def scores_table(scores: list[tuple[str, VolumeScore]]) -> FittedTable:
    """One row per volume, then the mean; Betti counts as matched/pred/label for dimensions 0, 1, 2. Fitted to
    the page: ids and scores whole on one line, the Betti counts on a table below when they do not fit."""
    table = FittedTable([Col("id", KEY), Col("score", ESSENTIAL, "right"), Col("TopoScore", ESSENTIAL, "right"),
                         Col("Betti", OPTIONAL, "right"), Col("SurfaceDice", ESSENTIAL, "right"),
                         Col("VOI", ESSENTIAL, "right")],
                        title="competition score",
                        caption="Betti: matched/predicted/label features of dimension 0 | 1 | 2, summed over "
                                "the 2x2x2 tiles. VOI: VOI_score (split + merge).")
    for volume_id, s in scores:
        counts = " | ".join("/".join(str(n) for n in s.betti.get(k, (0, 0, 0))) for k in (0, 1, 2))
        table.add_row(volume_id, f"{s.score:.4f}", f"{s.topo_score:.4f}", counts, f"{s.surface_dice:.4f}",
                      f"{s.voi_score:.4f} ({s.voi_split + s.voi_merge:.3f})")
    mean = mean_scores([s for _, s in scores])
    table.add_section()
    table.add_row(f"mean of {mean['n_volumes']}", f"{mean['score']:.4f}", f"{mean['topo_score']:.4f}", "",
                  f"{mean['surface_dice']:.4f}",
                  f"{mean['voi_score']:.4f} ({mean['voi_split'] + mean['voi_merge']:.3f})", style="bold")
    return table
