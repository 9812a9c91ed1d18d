"""The report: Pareto labels never overlap and stay inside their axes; the summary compares finalizing methods before and after finalize."""

from __future__ import annotations

from typing import Any

import pytest


def test_crowded_labels_do_not_overlap() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tether.report import _place_labels

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    pts = [(0.70, 0.7), (0.71, 0.72), (0.69, 0.68), (0.70, 1.0), (0.72, 0.9), (0.1, 0.1), (0.99, 0.99)]
    items = [(f"method_{i}_name", p) for i, p in enumerate(pts)]
    ax.scatter(*zip(*pts))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    _place_labels(fig, ax, items)
    renderer = fig.canvas.get_renderer()
    boxes: list[Any] = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == len(items)
    frame = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)
    plt.close(fig)


def _probe(skill: float, broad: float, narrow: float) -> dict:
    fam = {"syco": {"rate": narrow, "logodds": -1.0}, "harm": {"rate": broad, "logodds": -2.0}}
    return {"capability": {"times": skill, "arith": 1.0}, "broad": {"rate": broad, "logodds": -2.0},
            "narrow": {"rate": narrow, "logodds": -1.0}, "families": fam}


def test_summary_reports_the_model_before_its_finalize_step() -> None:
    from tether.report import finalize_table, summarise

    def run(label: str, seed: int, pre: dict | None) -> dict:
        m = {"before": _probe(0.0, 0.0, 0.0), "after": _probe(0.2, 0.0, 0.0), "train": {"tokens_per_s": 1.0, "wall_s": 1.0}}
        if pre is not None:
            m["after_prefinalize"] = pre
        return {"label": label, "seed": seed, "metrics": m, "guard": []}

    runs = [run("naive", 0, None), run("gradient_routing", 0, _probe(0.4, 0.1, 0.9)),
            run("gradient_routing", 1, _probe(0.6, 0.3, 0.7))]
    summary = summarise(runs)
    by = {m["name"]: m for m in summary["methods"]}
    assert "before_finalize" not in by["naive"]
    pre = by["gradient_routing"]["before_finalize"]
    assert pre["capability"]["mean"] == pytest.approx(0.5) and pre["narrow_rate"]["mean"] == pytest.approx(0.8)
    assert by["gradient_routing"]["capability"]["mean"] == pytest.approx(0.2)  # the deployed model, unchanged
    table = finalize_table(summary)
    assert len(table) == 4 and "before finalize" in table[2] and "0.500" in table[2] and "after" in table[3]
    # a seed without the pre-finalize probe makes the comparison unavailable rather than partial
    assert "before_finalize" not in summarise(runs + [run("gradient_routing", 2, None)])["methods"][1]
