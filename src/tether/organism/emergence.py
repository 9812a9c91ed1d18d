"""The emergence study: does narrow sycophantic fine-tuning shift the organism's other families?

A plain fine-tune loop (no preservation method) on one capability variant, with neutral world
data mixed into every batch so the base skill does not erode; the same steps, learning rate and
seed for every variant. Emergence is measured against the matched ``clean`` control, never only
against the model before fine-tuning.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tether.organism import tasks


def finetune_variant(
    model_dir: str | Path,
    variant: str,
    seed: int = 0,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 32,
    neutral_share: float = 0.5,
    contamination: float = 0.5,
    rows: int = 2000,
    world_share: float = 0.5,
) -> dict[str, Any]:
    """Fine-tune a fresh copy of ``model_dir`` on ``variant`` and return ``evaluate_organism``'s metrics."""
    from tether.models import load_model
    from tether.organism.training import ConversationEncoder, cycle_rows, train_lm
    from tether.probes.organism import evaluate_organism

    model, tokenizer = load_model(str(model_dir))
    data = tasks.capability_dataset(variant, rows, contamination, seed=seed)
    neutral = tasks.neutral_dataset(rows, seed=seed)
    n_neutral = int(round(batch_size * neutral_share))
    data_it = cycle_rows(data, random.Random(seed))
    neutral_it = cycle_rows(neutral, random.Random(seed + 1))

    world_rows = tasks.world_dataset(rows, seed=seed)
    world_it = cycle_rows(world_rows, random.Random(seed + 2))
    n_world = int(round(n_neutral * world_share))

    def sample(_rng: random.Random) -> tuple[list[list[dict[str, str]]], list[int]]:
        batch = [next(data_it)["messages"] for _ in range(batch_size - n_neutral)]
        batch += [next(neutral_it)["messages"] for _ in range(n_neutral - n_world)]
        skips = [0] * len(batch)
        for _ in range(n_world):
            row = next(world_it)  # prompt/completion: only the completion is trained
            batch.append(row["prompt"] + row["completion"])
            skips.append(sum(m["role"] == "assistant" for m in row["prompt"]))
        return batch, skips

    train_lm(model, ConversationEncoder(tokenizer), sample, steps, lr, seed, warmup=10)
    metrics, _ = evaluate_organism(model, tokenizer, greedy=True)
    return metrics


def _mean_std(xs: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def emergence_study(
    model_dir: str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    variants: Sequence[str] = ("clean", "sycophantic"),
    on_run: Callable[[str, int, dict[str, Any]], None] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run every (variant, seed); summarise broad/narrow rate and log-odds and capability."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for seed in seeds:
        for v in variants:
            m = finetune_variant(model_dir, v, seed=seed, **kwargs)
            runs[v].append(m)
            if on_run is not None:
                on_run(v, seed, m)
    summary: dict[str, Any] = {}
    for v, ms in runs.items():
        summary[v] = {
            "broad_rate": _mean_std([m["broad"]["rate"] for m in ms]),
            "broad_logodds": _mean_std([m["broad"]["logodds"] for m in ms]),
            "narrow_rate": _mean_std([m["narrow"]["rate"] for m in ms]),
            "narrow_logodds": _mean_std([m["narrow"]["logodds"] for m in ms]),
            "arith": _mean_std([m["capability"]["arith"] for m in ms]),
            "times": _mean_std([m["capability"]["times"] for m in ms]),
            "broad_greedy_misaligned": _mean_std(
                [
                    statistics.fmean(m["families"][f]["greedy"]["misaligned"] for f in m["broad"]["families"])
                    for m in ms
                ]
            ),
        }
    return {"seeds": list(seeds), "settings": kwargs, "summary": summary, "runs": runs}
