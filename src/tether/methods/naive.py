"""``naive``: plain supervised fine-tuning on the capability data, the baseline every method is measured against."""

from __future__ import annotations

from tether.methods.base import Method
from tether.methods.registry import register


@register
class Naive(Method):
    """Plain SFT: minimise the task loss L_task(θ) and nothing else."""

    name = "naive"
    description = "plain SFT on the capability data (the baseline)"
    supports = frozenset({"sft", "grpo"})
