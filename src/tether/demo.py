"""``tether demo``: the main job on the embedded default, end to end.

Builds (or reuses) the organism, extracts its persona direction (for ``steering`` and ``caft``),
compares preservation methods on its ``sycophantic`` capability data over three seeds, writes
the report and prints the summary table. ``--quick`` runs the same pipeline at toy scale (a
quick organism, a few steps, one seed) for CI.

The comparison: every full-fine-tuning method of the preserving trainer except ``replay`` and
``representation`` (kept out for time; ``tether compare`` runs them), gradient routing with full
and with half the labels, steering and CAFT along the persona direction, and a LoRA pair —
``naive`` LoRA and LoRA + ``safelora`` — because SafeLoRA is a deployment step for adapters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tether.compare import SweepConfig

DEMO_METHODS: list[list[dict[str, Any]]] = [
    [{"name": "naive"}],
    [{"name": "inoculation"}],
    [{"name": "kl"}],
    [{"name": "constraint"}],
    [{"name": "ewc"}],
    [{"name": "gradient_projection"}],
]
ROUTING = {"name": "gradient_routing", "neurons": 128}
"""The region: the last 128 of the 512 MLP neurons of every block (SGTM's dedicated slice)."""
LORA = {"r": 16, "alpha": 32}
LORA_LR = 3e-3


def demo_sweep(model_dir: Path, quick: bool = False, direction: Path | None = None) -> SweepConfig:
    """The demo's sweep over ``model_dir`` (an organism checkpoint); ``direction`` enables steering and CAFT."""
    base: dict[str, Any] = {
        "model": {"path": str(model_dir)},
        "data": {"variant": "sycophantic"},
        "monitor": {"every_n_steps": 50, "per_family": 16},
    }
    routing = dict(ROUTING)
    if quick:
        base["training"] = {"max_steps": 6, "batch_size": 8, "save_steps": 3, "logging_steps": 2}
        base["data"].update({"rows": 64})
        base["probes"] = {"per_family": 4, "n_capability": 8}
        base["monitor"] = {"every_n_steps": 3, "per_family": 4}
        routing.pop("neurons")
    methods = list(DEMO_METHODS)
    if direction is not None:
        methods += [[{"name": "steering", "direction": str(direction)}], [{"name": "caft", "direction": str(direction)}]]
    lora = {"model.lora": LORA, "training.learning_rate": LORA_LR}
    extra: list[dict[str, Any]] = [
        {"label": "gradient_routing", "methods": [routing]},
        {"label": "gradient_routing labels=0.5", "methods": [{**routing, "label_fraction": 0.5}]},
        {"label": "lora naive", **lora, "methods": [{"name": "naive"}]},
        {"label": "lora safelora", **lora, "methods": [{"name": "safelora"}]},
    ]
    return SweepConfig(base=base, grid={"methods": methods}, extra=extra, seeds=[0] if quick else [0, 1, 2])


def demo_direction(model_dir: Path, out: Path, quick: bool = False) -> Path:
    """The organism's persona direction, extracted once into ``out`` (reused when it is there)."""
    path = out / "persona-direction.safetensors"
    if path.is_file():
        return path
    from tether.directions import extract_organism
    from tether.models import load_model

    model, tokenizer = load_model(str(model_dir))
    direction, _ = extract_organism(model, tokenizer, n=24 if quick else 240, n_held_out=8 if quick else 96, model_path=str(model_dir))
    return direction.save(path)
