"""``constraint``: minimise the task loss subject to an alignment-loss bound, by a Lagrange multiplier.

The constrained problem  min_θ L_task(θ)  s.t.  L_align(θ) ≤ ε  is solved on its Lagrangian

    L(θ, λ) = L_task(θ) + λ · (L_align(θ) − ε),   λ ≥ 0,

by descent on θ (the trainer's optimiser) and projected gradient *ascent* on λ after every
optimiser step, as in Safe RLHF's Lagrangian method (Dai et al. 2023, "Safe RLHF: Safe
Reinforcement Learning from Human Feedback", eq. 13–14):

    parametrisation ``lambda``:     λ ← max(0, λ + η (L̄_align − ε))
    parametrisation ``log_lambda``: ln λ ← ln λ + η (L̄_align − ε)   (λ = e^{ln λ} > 0)

with plain SGD (not Adam: Adam's normalised steps move λ by ±η whatever the size of the
violation). L̄_align is the mean over the step's micro-batches. ``alignment_loss: kl`` is the
token-level KL(p_θ ‖ p_ref) on alignment data (zero at the start, so ε is an absolute bound);
``nll`` is the NLL on alignment data, bounded by ``L_nll(θ₀) + ε`` (the aligned model's NLL
measured before training plus a slack ε).

In GRPO runs (``tether.rl.preserve``) the constraint is Safe RLHF's own: an expected cost of
the rollouts, E[c] ≤ d with d = ε and c the ``rl_cost`` function, entering as the shaped reward
r − λc (GRPO's group normalisation of it equals (A_R − λA_C) up to the positive scale that
Safe RLHF writes as 1/(1+λ)), with the same projected SGD step on λ from the step's mean cost.

Deviations: Safe RLHF bounds an expected cost of RL samples and divides the Lagrangian by
(1 + λ); here the constraint is on a supervised alignment loss and the objective is not
rescaled (a rescale only changes the effective learning rate of θ).

Data parallelism: every rank computes the term on the same alignment batch (the trainer's draw
depends only on seed and step), DDP averages the gradients, and the violation is averaged over
ranks before the λ step, so λ (and the ``nll`` bound, broadcast from rank 0) is identical on every
rank. The term only needs forwards, so it also runs under FSDP / ZeRO-3.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from tether.distributed import broadcast_object, mean_across_ranks
from tether.methods._losses import masked_nll, model_inputs
from tether.methods.base import Method, MethodConfig, PreserveContext
from tether.methods.kl import alignment_kl
from tether.methods.registry import register

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


class ConstraintConfig(MethodConfig):
    """The bound, the alignment loss it applies to, and the multiplier's update."""

    epsilon: float = Field(0.02, ge=0, description="Bound ε on the alignment loss (slack over θ₀ for nll).")
    alignment_loss: Literal["kl", "nll"] = Field("kl", description="KL to the reference, or NLL on alignment data.")
    lambda_init: float = Field(1.0, ge=0, description="Initial multiplier λ₀.")
    lambda_lr: float = Field(1.0, gt=0, description="SGD step η of the multiplier.")
    parametrization: Literal["lambda", "log_lambda"] = Field("lambda", description="Ascend on λ or on ln λ.")
    baseline_batches: int = Field(4, ge=1, description="Alignment batches that measure L_nll(θ₀) (nll only).")
    rl_cost: str = Field(
        "guess_echo",
        description="GRPO only: the per-rollout cost c ∈ [0, 1], a reward-function name or dotted path; ε is its budget d.",
    )

    @model_validator(mode="after")
    def _positive_for_log(self) -> "ConstraintConfig":
        if self.parametrization == "log_lambda" and self.lambda_init <= 0:
            raise ValueError("'lambda_init' must be > 0 with parametrization 'log_lambda'")
        return self


@register
class LagrangianConstraint(Method):
    """min L_task s.t. L_align ≤ ε via λ ≥ 0 updated by projected SGD ascent (Dai et al. 2023)."""

    name = "constraint"
    description = "Lagrangian: task loss s.t. alignment loss ≤ ε, multiplier by projected SGD ascent"
    supports = frozenset({"sft", "grpo"})
    Config = ConstraintConfig
    config: ConstraintConfig

    def __init__(self, config: ConstraintConfig | None = None) -> None:
        super().__init__(config)
        self.lam = float(self.config.lambda_init)
        self.bound = float(self.config.epsilon)
        self._sum = 0.0
        self._n = 0

    def requires(self) -> frozenset[str]:
        base = {"alignment"}
        return frozenset(base | {"reference"}) if self.config.alignment_loss == "kl" else frozenset(base)

    def setup(self, ctx: PreserveContext) -> None:
        if self.config.alignment_loss == "nll":
            import torch

            with torch.no_grad():
                vals = []
                for batch in ctx.setup_alignment_batches(self.config.baseline_batches):
                    vals.append(float(masked_nll(ctx.model(**model_inputs(batch)).logits, batch["labels"])))
            self.bound = broadcast_object(sum(vals) / len(vals) + self.config.epsilon)

    def alignment_loss(self, ctx: PreserveContext) -> "torch.Tensor":
        if self.config.alignment_loss == "kl":
            return alignment_kl(ctx, "reverse", "assistant")
        return masked_nll(ctx.policy_alignment_outputs().logits, ctx.alignment_inputs()["labels"])

    def loss_terms(self, ctx: PreserveContext, model: "PreTrainedModel", inputs: dict[str, Any]) -> dict[str, "torch.Tensor"]:
        loss = self.alignment_loss(ctx)
        self._sum += float(loss.detach())
        self._n += 1
        ctx.log(self.name, "alignment_loss", float(loss.detach()))
        # λ is a constant for θ's step; the −λε part has no gradient and is left out of the loss
        return {"lagrangian": self.lam * loss}

    def on_step_end(self, ctx: PreserveContext, step: int) -> None:
        if not self._n:
            return
        violation = mean_across_ranks(self._sum / self._n) - self.bound
        self._sum, self._n = 0.0, 0
        self.update(violation)
        ctx.log(self.name, "violation", violation)
        ctx.log(self.name, "lambda", self.lam)

    def update(self, violation: float) -> float:
        """One projected ascent step on the multiplier; returns the new λ (always ≥ 0)."""
        eta = self.config.lambda_lr
        if self.config.parametrization == "lambda":
            self.lam = max(0.0, self.lam + eta * violation)
        else:
            self.lam = math.exp(math.log(self.lam) + eta * violation)
        return self.lam

    def tighten(self, factor: float) -> float:
        """Multiply λ by ``factor`` (the alignment guard's ``tighten`` mode); returns the new λ."""
        self.lam *= factor
        return self.lam

    def state_dict(self) -> dict[str, Any]:
        return {"lambda": self.lam, "bound": self.bound}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = float(state["lambda"])
        self.bound = float(state["bound"])

