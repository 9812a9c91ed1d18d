"""``caft``: concept-ablation fine-tuning with trait directions, during training only.

Casademunt, Juang, Marks, Rajamanoharan & Nanda 2025, "Steering Out-of-Distribution
Generalization with Concept Ablation Fine-Tuning" (arXiv 2507.16795). During fine-tuning the
unwanted concept's subspace is projected out of the residual stream at the chosen layers,

    h_ℓ ← h_ℓ − Q_ℓ Q_ℓᵀ h_ℓ        (every token position, every training forward),

so the model cannot use that concept to fit the data and must learn the task another way; at
evaluation the ablation is removed and the fine-tuned model runs unmodified. ``Q_ℓ`` is an
orthonormal basis ``[hidden, k]`` of the direction file's mean difference v_ℓ plus (``k`` > 1)
its first k − 1 principal components of the paired differences, orthonormalised by QR.

Deviation: the paper finds its directions by PCA of activation differences between models or
by SAE latents chosen by a human; here the directions are the trait's persona vector (and
principal components of the contrastive pairs), from ``tether directions extract``.

Like ``steering``, the ablation is a forward hook per chosen layer, active only while the
trainer computes the training loss; Q is cached per device and dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from tether.methods.base import MethodConfig
from tether.methods.registry import register
from tether.methods.steering import DirectionHookMethod, _PerDevice, load_method_direction

if TYPE_CHECKING:
    import torch


class CAFTConfig(MethodConfig):
    """Direction file, layers and number of directions to ablate."""

    direction: str | None = Field(None, description="Direction file from `tether directions extract` (required).")
    layers: list[int] | None = Field(None, description="Layers ℓ (outputs of blocks ℓ−1); default: the file's recommended layer.")
    k: int = Field(1, ge=1, description="Directions ablated per layer: the mean difference plus k−1 principal components.")


def ablate(h: "torch.Tensor", q: "torch.Tensor") -> "torch.Tensor":
    """h − (h Q) Qᵀ for ``h`` ``[..., hidden]`` and orthonormal ``q`` ``[hidden, k]``."""
    return h - (h @ q) @ q.T


@register
class ConceptAblationFineTuning(DirectionHookMethod):
    """h_ℓ ← h_ℓ − Q_ℓQ_ℓᵀh_ℓ at the chosen layers during training forwards only (Casademunt et al. 2025)."""

    name = "caft"
    description = "concept-ablation fine-tuning: project trait directions out of chosen layers during training (CAFT)"
    supports = frozenset({"sft"})
    Config = CAFTConfig
    config: CAFTConfig

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        self.direction = load_method_direction(self.name, self.config.direction)
        layers = self.config.layers if self.config.layers else [int(self.direction.meta.get("layer", 1))]
        from tether.directions import check_layer

        for layer in layers:
            check_layer(layer, self.direction.n_layers, f"method '{self.name}': layers")
        self.layers = list(dict.fromkeys(layers))
        self.bases = {layer: _PerDevice(self.direction.basis(layer, self.config.k)) for layer in self.layers}

    def layer_fns(self) -> dict[int, Any]:
        def make(basis: _PerDevice) -> Any:
            return lambda h: ablate(h, basis.like(h))

        return {layer: make(self.bases[layer]) for layer in self.layers}
