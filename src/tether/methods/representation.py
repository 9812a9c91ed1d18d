"""``representation``: keep the hidden states on alignment data close to the reference model's.

Selective Generalization's representation constraint (Azarbal et al. 2025): with h_l(x) the
residual-stream hidden state after layer l,

    L(θ) = L_task(θ) + w · (1/|L|) Σ_{l ∈ L} mean_{tokens, dims} ( h_l^θ(x) − h_l^ref(x) )²,   x ∈ D_align,

averaged over layers (every transformer layer by default, or the indices in ``layers``; index 0
is the embedding output). Tokens are every real token of the alignment batch, or only the
assistant's (``positions: assistant``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from tether.methods._losses import IGNORE, hidden_mse
from tether.methods.base import Method, MethodConfig, PreserveContext
from tether.methods.registry import register

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


class RepresentationConfig(MethodConfig):
    """Weight, layers and tokens of the hidden-state constraint."""

    weight: float = Field(1.0, ge=0, description="Weight w of the MSE term.")
    layers: list[int] | Literal["all"] = Field("all", description="hidden_states indices, or 'all' (1..L).")
    positions: Literal["all", "assistant"] = Field("all", description="Tokens whose hidden states count.")


@register
class RepresentationConstraint(Method):
    """w · mean over layers of MSE(h^θ, h^ref) on alignment data (Azarbal et al. 2025)."""

    name = "representation"
    description = "MSE between hidden states of model and reference on alignment data, averaged over layers"
    supports = frozenset({"sft"})
    needs = frozenset({"alignment", "reference"})
    wants_hidden_states = True
    Config = RepresentationConfig
    config: RepresentationConfig

    def loss_terms(self, ctx: PreserveContext, model: "PreTrainedModel", inputs: dict[str, Any]) -> dict[str, "torch.Tensor"]:
        batch = ctx.alignment_inputs()
        pol = ctx.policy_alignment_outputs(hidden_states=True)
        ref = ctx.reference_alignment_outputs(hidden_states=True)
        n = len(pol.hidden_states)
        layers = list(range(1, n)) if self.config.layers == "all" else list(self.config.layers)
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise ValueError(f"method 'representation': layer {bad[0]} does not exist; the model has hidden states 0..{n - 1}")
        if self.config.positions == "assistant":
            mask = batch["labels"] != IGNORE
        else:
            mask = batch.get("attention_mask", batch["input_ids"] * 0 + 1).bool()
        mse = hidden_mse(pol.hidden_states, ref.hidden_states, mask, layers)
        ctx.log(self.name, "mse", float(mse.detach()))
        return {"penalty": self.config.weight * mse}
