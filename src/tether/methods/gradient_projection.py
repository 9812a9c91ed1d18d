"""``gradient_projection``: A-GEM — keep the update from increasing the loss on alignment data.

Averaged gradient episodic memory (Chaudhry, Ranzato, Rohrbach & Elhoseiny 2019, "Efficient
Lifelong Learning with A-GEM", eq. 11): with g the gradient of the training loss and g_ref the
gradient of the NLL on a batch drawn from the episodic memory (here: the alignment data),

    g̃ = g − (gᵀ g_ref / g_refᵀ g_ref) · g_ref   if gᵀ g_ref < 0,   else g̃ = g.

``always: true`` projects unconditionally, removing every component along g_ref (the variant
Azarbal et al. 2025, "Selective Generalization", use). The projection acts on the full
accumulated gradient (every loss term before it in the stack included), after the last
micro-batch and before gradient clipping.

Deviation: A-GEM draws the memory batch from past tasks' data; here it is a fresh alignment
batch each step.

Data parallelism: ``on_gradients`` runs after DDP's all-reduce, so g is the global gradient.
g_ref comes from the same alignment batch on every rank and is then averaged over ranks (a
no-op in value, but it makes g_ref bit-identical everywhere), so every rank applies the same
projection and the replicas never drift apart. Under FSDP / ZeRO-3 each rank holds only a shard
of g, so the method is refused there (``sharding_ok = False``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import Field

from tether.distributed import all_reduce_mean_
from tether.methods._losses import masked_nll, model_inputs
from tether.methods.base import Method, MethodConfig, PreserveContext
from tether.methods.registry import register

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def project(g: torch.Tensor, g_ref: torch.Tensor, always: bool = False) -> tuple[torch.Tensor, float, bool]:
    """A-GEM projection of the flat gradient ``g`` against ``g_ref``; returns (g̃, gᵀg_ref, projected)."""
    dot = float(torch.dot(g, g_ref))
    ref_sq = float(torch.dot(g_ref, g_ref))
    if ref_sq == 0.0 or (dot >= 0 and not always):
        return g, dot, False
    return g - (dot / ref_sq) * g_ref, dot, True


class GradientProjectionConfig(MethodConfig):
    """When to project."""

    always: bool = Field(False, description="Project even when g and g_ref do not conflict.")


@register
class GradientProjection(Method):
    """A-GEM: if gᵀg_ref < 0, g ← g − (gᵀg_ref/‖g_ref‖²) g_ref (Chaudhry et al. 2019)."""

    name = "gradient_projection"
    description = "A-GEM: drop the task gradient's component that conflicts with the alignment gradient"
    supports = frozenset({"sft"})
    needs = frozenset({"alignment"})
    Config = GradientProjectionConfig
    config: GradientProjectionConfig
    sharding_ok = False
    sharding_reason = "the projection needs the whole gradient vector g, and each rank holds only a shard"

    def on_gradients(self, ctx: PreserveContext, model: "PreTrainedModel") -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        batch = ctx.alignment_inputs()
        logits = model(**model_inputs(batch)).logits
        masked_nll(logits, batch["labels"]).backward()
        g_ref = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
        all_reduce_mean_(g_ref)  # identical on every rank (no-op in one process)
        g = torch.cat([(s if s is not None else torch.zeros_like(p)).reshape(-1).float() for s, p in zip(saved, params)])
        new, dot, projected = project(g, g_ref, self.config.always)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = new[offset : offset + n].view_as(p).to(p.dtype)
            offset += n
        norm = float(g.norm() * g_ref.norm())
        ctx.log(self.name, "cosine", dot / norm if norm else 0.0)
        ctx.log(self.name, "projected", float(projected))
