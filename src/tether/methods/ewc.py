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

Data parallelism: the penalty depends on the weights alone, so every rank adds the same term and
DDP's all-reduce averages identical gradients. θ* and F are computed on every rank from the same
seeded alignment batches and then broadcast from rank 0, so they are identical bit for bit.
Under FSDP / ZeRO-3 the anchored parameters would be shards (or flattened), so both methods are
refused there (``sharding_ok = False``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from tether.distributed import broadcast_tensors_
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


class _QuadraticAnchor(torch.autograd.Function):
    """(coef/2) Σ_i w_i (θ_i − θ*_i)² with its analytic gradient coef · w_i (θ_i − θ*_i).

    One fused ``_foreach`` pass over all parameters instead of an autograd graph of a few ops per
    tensor; the value and the gradient are exactly those of the expression above.
    """

    @staticmethod
    def forward(ctx: Any, coef: float, anchors: list[torch.Tensor], weights: list[torch.Tensor] | None, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        diffs = torch._foreach_sub([p.detach().float() for p in params], anchors)
        scaled = torch._foreach_mul(diffs, weights) if weights is not None else diffs
        value = torch.stack([t.sum() for t in torch._foreach_mul(scaled, diffs)]).sum()
        ctx.coef = coef
        ctx.dtypes = [p.dtype for p in params]
        ctx.save_for_backward(*scaled)
        return 0.5 * coef * value

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        scale = grad * ctx.coef
        grads = torch._foreach_mul(list(ctx.saved_tensors), scale)
        return (None, None, None, *(g.to(dt) for g, dt in zip(grads, ctx.dtypes)))


def quadratic_anchor(
    params: list[torch.Tensor], anchors: list[torch.Tensor], weights: list[torch.Tensor] | None, coef: float
) -> torch.Tensor:
    """(coef/2) Σ_i w_i (θ_i − θ*_i)²; ``weights=None`` means w ≡ 1."""
    return _QuadraticAnchor.apply(coef, anchors, weights, *params)


class EWCConfig(MethodConfig):
    """Penalty strength and the size of the Fisher estimate."""

    lam: float = Field(1000.0, ge=0, description="Penalty strength λ.")
    fisher_samples: int = Field(128, ge=1, description="Alignment examples in the Fisher estimate.")


@register
class EWC(Method):
    """(λ/2) Σ F (θ − θ*)² with a per-example diagonal Fisher (Kirkpatrick et al. 2017)."""

    name = "ewc"
    description = "elastic weight consolidation: (λ/2)·Σ F(θ−θ*)², per-example Fisher on alignment data"
    supports = frozenset({"sft"})
    needs = frozenset({"alignment"})
    Config = EWCConfig
    config: EWCConfig
    sharding_ok = False
    sharding_reason = "θ* and the Fisher are per-parameter tensors taken before the model is sharded"

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
        broadcast_tensors_(self.anchors + self.fisher)  # identical on every rank (no-op in one process)
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
    supports = frozenset({"sft"})
    Config = L2SPConfig
    config: L2SPConfig
    sharding_ok = False
    sharding_reason = "θ* is a per-parameter copy taken before the model is sharded"

    def __init__(self, config: L2SPConfig | None = None) -> None:
        super().__init__(config)
        self.params: list[torch.nn.Parameter] = []
        self.anchors: list[torch.Tensor] = []

    def setup(self, ctx: PreserveContext) -> None:
        self.params = [p for _, p in trainable(ctx.model)]
        self.anchors = [p.detach().clone().float() for p in self.params]
        broadcast_tensors_(self.anchors)

    def loss_terms(self, ctx: PreserveContext, model: "PreTrainedModel", inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"penalty": quadratic_anchor(self.params, self.anchors, None, self.config.alpha)}
