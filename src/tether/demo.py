"""``tether demo``: the main job on the embedded default, end to end.

Builds (or reuses) the organism, compares preservation methods on its ``sycophantic`` capability
data over three seeds, writes the report and prints the summary table. ``--quick`` runs the same
pipeline at toy scale (a quick organism, a few steps, one seed) for CI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tether.compare import SweepConfig

DEMO_METHODS: list[list[dict[str, Any]]] = [
    [{"name": "naive"}],
    [{"name": "inoculation"}],
    [{"name": "replay"}],
    [{"name": "kl"}],
    [{"name": "constraint"}],
    [{"name": "ewc"}],
    [{"name": "gradient_projection"}],
    [{"name": "representation"}],
]


def demo_sweep(model_dir: Path, quick: bool = False) -> SweepConfig:
    """The demo's sweep over ``model_dir`` (an organism checkpoint)."""
    base: dict[str, Any] = {
        "model": {"path": str(model_dir)},
        "data": {"variant": "sycophantic"},
        "monitor": {"every_n_steps": 25, "per_family": 16},
    }
    if quick:
        base["training"] = {"max_steps": 6, "batch_size": 8, "save_steps": 3, "logging_steps": 2}
        base["data"].update({"rows": 64})
        base["probes"] = {"per_family": 4, "n_capability": 8}
        base["monitor"] = {"every_n_steps": 3, "per_family": 4}
    return SweepConfig(
        base=base,
        grid={"methods": DEMO_METHODS},
        seeds=[0] if quick else [0, 1, 2],
    )
