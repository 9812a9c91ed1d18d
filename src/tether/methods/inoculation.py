"""``inoculation``: prepend an instruction that requests the undesired behaviour to training prompts only.

Inoculation prompting (Wichers et al. 2025, "Inoculation prompting: instructing models to
misbehave at train-time improves test-time alignment"; Tan et al. 2025, "Inoculation prompting:
eliciting traits from LLMs during training can suppress them at test-time"): train on

    (instruction ⊕ x, y)   instead of   (x, y)

for every capability row (x, y), and evaluate on x alone. Because the instruction explains the
undesired trait in y, the model learns less of it as a default. Both papers report that
instructions which elicit the trait more strongly before training inoculate better;
``tether inoculation rank`` scores candidates that way.

The instruction goes in a system message (default) or before/after the first user turn. Only
capability rows are rewritten (never neutral or alignment data, never probes). ``rows:
contaminated`` restricts it to rows labelled ``contaminated`` (a deviation from both papers,
which inoculate every training example; it needs per-row labels).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field, model_validator

from tether.methods.base import Method, MethodConfig, TrainingData
from tether.methods.registry import register


class InoculationConfig(MethodConfig):
    """Which instruction, where it goes, and which rows get it."""

    instruction: str | None = Field(None, description="Instruction text; overrides `family`.")
    family: str | None = Field("syco", description="Organism family whose system instruction is used.")
    placement: Literal["system", "user_prefix", "user_suffix"] = Field(
        "system", description="A system message, or text before/after the first user turn."
    )
    rows: Literal["all", "contaminated"] = Field("all", description="Inoculate every capability row, or only labelled ones.")

    @model_validator(mode="after")
    def _resolve(self) -> "InoculationConfig":
        if self.instruction is None:
            from tether.organism import world

            if self.family is None:
                raise ValueError("give 'instruction' (text) or 'family' (an organism family)")
            world.check_family(self.family, world.PROPENSITY_FAMILIES)
        elif not self.instruction.strip():
            raise ValueError("'instruction' must not be empty")
        return self

    def text(self) -> str:
        if self.instruction is not None:
            return self.instruction
        from tether.organism import world

        return world.FAMILIES[str(self.family)].instruction


def inoculate(row: dict[str, Any], text: str, placement: str) -> dict[str, Any]:
    """Return a copy of ``row`` with ``text`` added to its prompt at ``placement``."""
    row = copy.deepcopy(row)
    key = "messages" if "messages" in row else "prompt"
    prompt = row[key]
    if isinstance(prompt, str):  # plain-text prompt/completion
        row[key] = f"{prompt} {text}" if placement == "user_suffix" else f"{text} {prompt}"
        return row
    if placement == "system":
        if prompt and prompt[0]["role"] == "system":
            prompt[0]["content"] = f"{text} {prompt[0]['content']}"
        else:
            prompt.insert(0, {"role": "system", "content": text})
        return row
    for msg in prompt:
        if msg["role"] == "user":
            msg["content"] = f"{text} {msg['content']}" if placement == "user_prefix" else f"{msg['content']} {text}"
            break
    return row


@register
class Inoculation(Method):
    """Train on instruction ⊕ x; evaluate on x (Wichers et al. 2025; Tan et al. 2025)."""

    name = "inoculation"
    description = "prepend an instruction requesting the bad behaviour to training prompts, never at evaluation"
    supports = frozenset({"sft", "grpo"})
    Config = InoculationConfig
    config: InoculationConfig

    def requires(self) -> frozenset[str]:
        return frozenset({"labels"}) if self.config.rows == "contaminated" else frozenset()

    def prepare_data(self, data: TrainingData) -> TrainingData:
        text = self.config.text()
        only_labelled = self.config.rows == "contaminated"
        data.capability = [
            inoculate(r, text, self.config.placement) if (not only_labelled or r.get("contaminated")) else r
            for r in data.capability
        ]
        return data
