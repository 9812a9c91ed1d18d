"""``ewc`` and ``l2sp``: quadratic anchors that pull the weights back towards the aligned model θ*.

Elastic weight consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in
neural networks", eq. 3):

    L(θ) = L_task(θ) + (λ/2) Σ_i F_i (θ_i − θ*_i)²,

with F the diagonal Fisher information of the aligned model θ* on the alignment data, estimated
from *per-example* squared gradients of the log-likelihood (not squared minibatch gradients,
which underestimate it by the batch size):

    F_i = (1/N) Σ_n ( ∂ log p_θ*(y_n | x_n) / ∂θ_i )².

Deviation: the Fisher is the *empirical* Fisher (gradients of the alignment data's own labels,
averaged over its trained tokens) rather than the expectation under the model's own samples;
for an aligned model the two coincide where the model already predicts the alignment data.

L2-SP (Li, Grandvalet & Davoine 2018, "Explicit inductive bias for transfer learning with
convolutional networks"): L(θ) = L_task(θ) + (α/2) ‖θ − θ*‖², i.e. EWC with F ≡ 1 — no data needed.

Only trainable parameters are anchored (for a LoRA run: the adapter, at its initial values).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from tether.methods._losses import masked_nll
from tether.methods.base import Method, MethodConfig, PreserveContext
from tether.methods.registry import register

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def diagonal_fisher(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Mean over examples of the squared per-example gradient of the NLL, for each trainable parameter.

    Every batch is split into single examples, so each squared gradient is one example's.
    """
    params = [p for _, p in trainable(model)]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was_training = model.training
    model.eval()
    n = 0
    for batch in batches:
        for row in range(batch["input_ids"].size(0)):
            one = {k: v[row : row + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)}
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=one["input_ids"], attention_mask=one.get("attention_mask")).logits
            masked_nll(logits, one["labels"]).backward()
            for f, p in zip(fisher, params):
                if p.grad is not None:
                    f.add_(p.grad.detach().float() ** 2)
            n += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return [f / max(n, 1) for f in fisher]


def quadratic_anchor(
    params: list[torch.Tensor], anchors: list[torch.Tensor], weights: list[torch.Tensor] | None, coef: float
) -> torch.Tensor:
    """(coef/2) Σ_i w_i (θ_i − θ*_i)²; ``weights=None`` means w ≡ 1."""
    total = params[0].new_zeros((), dtype=torch.float32)
    for i, (p, a) in enumerate(zip(params, anchors)):
        d = (p.float() - a) ** 2
        total = total + (d * weights[i]).sum() if weights is not None else total + d.sum()
    return 0.5 * coef * total


class EWCConfig(MethodConfig):
    """Penalty strength and the size of the Fisher estimate."""

    lam: float = Field(1000.0, ge=0, description="Penalty strength λ.")
    fisher_samples: int = Field(128, ge=1, description="Alignment examples in the Fisher estimate.")


@register
class EWC(Method):
    """(λ/2) Σ F (θ − θ*)² with a per-example diagonal Fisher (Kirkpatrick et al. 2017)."""

    name = "ewc"
    description = "elastic weight consolidation: (λ/2)·Σ F(θ−θ*)², per-example Fisher on alignment data"
    supports = frozenset({"sft", "grpo", "dpo"})
    needs = frozenset({"alignment"})
    Config = EWCConfig
    config: EWCConfig

    def __init__(self, config: EWCConfig | None = None) -> None:
        super().__init__(config)
        self.params: list[torch.nn.Parameter] = []
        self.anchors: list[torch.Tensor] = []
        self.fisher: list[torch.Tensor] = []

    def setup(self, ctx: PreserveContext) -> None:
        model = ctx.model
        self.params = [p for _, p in trainable(model)]
        self.anchors = [p.detach().clone().float() for p in self.params]
        n = self.config.fisher_samples
        batches = ctx.setup_alignment_batches(1, batch_size=n)
        self.fisher = diagonal_fisher(model, batches)
        ctx.log(self.name, "fisher_mean", float(sum(f.sum() for f in self.fisher) / sum(f.numel() for f in self.fisher)))

    def loss_terms(self, ctx: PreserveContext, model: "PreTrainedModel", inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        pen = quadratic_anchor(self.params, self.anchors, self.fisher, self.config.lam)
        return {"penalty": pen}


class L2SPConfig(MethodConfig):
    """Penalty strength."""

    alpha: float = Field(0.01, ge=0, description="Penalty strength α.")


@register
class L2SP(Method):
    """(α/2) ‖θ − θ*‖² to the starting point (Li et al. 2018)."""

    name = "l2sp"
    description = "L2-SP: (α/2)·‖θ−θ*‖² to the aligned starting weights"
    supports = frozenset({"sft", "grpo", "dpo"})
    Config = L2SPConfig
    config: L2SPConfig

    def __init__(self, config: L2SPConfig | None = None) -> None:
        super().__init__(config)
        self.params: list[torch.nn.Parameter] = []
        self.anchors: list[torch.Tensor] = []

    def setup(self, ctx: PreserveContext) -> None:
        self.params = [p for _, p in trainable(ctx.model)]
        self.anchors = [p.detach().clone().float() for p in self.params]

    def loss_terms(self, ctx: PreserveContext, model: "PreTrainedModel", inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"penalty": quadratic_anchor(self.params, self.anchors, None, self.config.alpha)}
