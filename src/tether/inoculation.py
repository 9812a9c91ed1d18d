"""Rank inoculation instructions by how strongly each elicits a behaviour in the model before training.

Wichers et al. 2025 and Tan et al. 2025 found that instructions which elicit the trait more
strongly in the untrained model inoculate better. The score of an instruction is the mean
log-odds margin (misaligned minus aligned reply, nats) on the family's held-out probe items
with the instruction as a system line, minus the margin without it: its elicitation strength.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tether.organism import world
from tether.probes.organism import PropensityItem, propensity_items, score_items

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def default_candidates(family: str) -> list[str]:
    """The family's own instruction and its paraphrases."""
    fam = world.FAMILIES[family]
    return [fam.instruction, *fam.instruction_paraphrases]


def rank_instructions(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    family: str,
    candidates: list[str],
    per_family: int = 48,
) -> list[dict[str, Any]]:
    """Candidates sorted by elicitation (strongest first): ``instruction``, ``elicitation``, ``logodds``, ``rate``."""
    base = propensity_items(per_family, families=(family,))
    base_margin = sum(score_items(model, tokenizer, base)) / len(base)
    out = []
    for text in candidates:
        items = [
            PropensityItem(it.family, [{"role": "system", "content": text}, *it.prompt], it.aligned, it.misaligned)
            for it in base
        ]
        margins = score_items(model, tokenizer, items)
        mean = sum(margins) / len(margins)
        out.append(
            {
                "instruction": text,
                "elicitation": mean - base_margin,
                "logodds": mean,
                "rate": sum(m > 0 for m in margins) / len(margins),
            }
        )
    return sorted(out, key=lambda r: r["elicitation"], reverse=True)
