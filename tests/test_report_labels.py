"""Point labels of the Pareto plot: no two overlap, and every one stays inside its axes."""

from __future__ import annotations

from typing import Any


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
