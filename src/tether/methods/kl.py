"""``kl``: a token-level KL penalty to the reference (aligned) model on alignment data.

Selective Generalization's KL-divergence penalty (Azarbal, Clarke, Cocola, Factor & Cloud 2025,
"Selective Generalization: Improving Capabilities While Maintaining Alignment"):

    L(θ) = L_task(θ) + β · E_{x ∈ D_align} [ (1/|T|) Σ_{t ∈ T} KL( p_θ(· | x_<t) ‖ p_ref(· | x_<t) ) ]

over the positions T of an alignment batch drawn fresh every micro-step. ``direction: reverse``
is KL(p_θ ‖ p_ref) (as written above, the default); ``forward`` is KL(p_ref ‖ p_θ).
``positions: assistant`` compares the distributions that predict the assistant's tokens,
``all`` every real token. For a LoRA run the reference is the same weights with the adapter
disabled, so the term is exactly zero before the first step.

In GRPO runs the penalty is TRL's own β term (``GRPOConfig.beta``, reused, not duplicated): the
k3 estimator of KL(π_θ ‖ π_ref) on the rollout tokens (Shao et al. 2024, DeepSeekMath eq. 4),
with the adapter-disabled model as π_ref for LoRA. Only ``direction: reverse`` applies there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from tether.methods._losses import next_token_mask, token_kl
from tether.methods.base import Method, MethodConfig, PreserveContext
from tether.methods.registry import register

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


class KLConfig(MethodConfig):
    """Weight, direction and positions of the KL penalty."""

    beta: float = Field(1.0, ge=0, description="Weight β of the KL term.")
    direction: Literal["reverse", "forward"] = Field(
        "reverse", description="reverse: KL(p_θ‖p_ref); forward: KL(p_ref‖p_θ)."
    )
    positions: Literal["assistant", "all"] = Field("assistant", description="Which next-token distributions count.")


def alignment_kl(ctx: PreserveContext, direction: str, positions: str) -> "torch.Tensor":
    """The token-level KL between the trained and the reference model on this micro-step's alignment batch."""
    inputs = ctx.alignment_inputs()
    pol = ctx.policy_alignment_outputs()
    ref = ctx.reference_alignment_outputs()
    return token_kl(pol.logits, ref.logits, next_token_mask(inputs, positions), direction)  # type: ignore[arg-type]


@register
class KLToReference(Method):
    """β · KL(p_θ ‖ p_ref) on alignment data (Azarbal et al. 2025)."""

    name = "kl"
    description = "β·KL to the aligned model on alignment data, token level (Selective Generalization)"
    supports = frozenset({"sft", "grpo"})
    needs = frozenset({"alignment", "reference"})
    Config = KLConfig
    config: KLConfig

    def loss_terms(self, ctx: PreserveContext, model: "PreTrainedModel", inputs: dict[str, Any]) -> dict[str, "torch.Tensor"]:
        kl = alignment_kl(ctx, self.config.direction, self.config.positions)
        ctx.log(self.name, "kl", float(kl.detach()))
        return {"penalty": self.config.beta * kl}

    def grpo_beta(self) -> float:
        """β for ``GRPOConfig.beta``: TRL's own KL(π_θ ‖ π_ref) term on the rollouts (reverse KL only)."""
        if self.config.direction != "reverse":
            raise ValueError("method 'kl' in a grpo run supports only direction 'reverse' (TRL's k3 estimator of KL(π_θ‖π_ref))")
        return float(self.config.beta)

    def tighten(self, factor: float) -> float:
        """Multiply β by ``factor`` (the alignment guard's ``tighten`` mode); returns the new β."""
        self.config = self.config.model_copy(update={"beta": self.config.beta * factor})
        return self.config.beta
