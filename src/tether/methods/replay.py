"""``replay``: experience replay — a fixed share of every batch is alignment data.

Rehearsal / experience replay (Robins 1995; Rolnick et al. 2019, "Experience replay for
continual learning"; the "mixed training" baseline of Azarbal et al. 2025, "Selective
Generalization"): minimise

    (1 − s) · L_task(θ) + s · L_align(θ)

by drawing a share ``s`` of each batch from the alignment set. The replayed rows take the place
of neutral rows first (both exist to stop forgetting), then of capability rows; the batch size
is unchanged.
"""

from __future__ import annotations

from pydantic import Field

from tether.methods.base import Method, MethodConfig, TrainingData
from tether.methods.registry import register


class ReplayConfig(MethodConfig):
    """How much of each batch is replayed alignment data."""

    share: float = Field(0.25, gt=0, lt=1, description="Share of every batch drawn from the alignment set.")


@register
class Replay(Method):
    """Mix a share ``s`` of alignment rows into every batch."""

    name = "replay"
    description = "mix a share of alignment data into every batch (experience replay)"
    supports = frozenset({"sft"})
    needs = frozenset({"alignment"})
    Config = ReplayConfig
    config: ReplayConfig

    def prepare_data(self, data: TrainingData) -> TrainingData:
        share = self.config.share
        neutral = data.shares.get("neutral", 0.0)
        taken = min(neutral, share)
        if taken:
            data.shares["neutral"] = neutral - taken
        data.shares["alignment"] = data.shares.get("alignment", 0.0) + share
        return data
