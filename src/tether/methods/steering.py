"""``steering``: preventative steering with a trait direction, during training only.

Chen, Arditi, Sleight, Evans & Lindsey 2025, "Persona Vectors: Monitoring and Controlling
Character Traits in Language Models" (arXiv 2507.21509), section 5.2. During fine-tuning the
residual stream at layer ℓ is pushed *towards* the trait,

    h_ℓ ← h_ℓ + α · v_ℓ        (every token position, every training forward),

so the optimiser no longer needs to move the weights along v_ℓ to fit trait-expressing data;
at evaluation and deployment the addition is removed. ``v_ℓ`` is the direction file's row ℓ
(the mean difference, unnormalised, as in the paper; ``unit: true`` uses v̂_ℓ instead), and
"layer ℓ" is the output of decoder block ℓ − 1 (``tether.directions``' convention).

The trainer enters ``hooks`` only around training forwards (``PreservingTrainer.compute_loss``
when the model is in training mode), so probes, the monitor and the saved model never see it.
One forward hook on one block; the vector is cached per device and dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import Field

from tether.methods.base import Method, MethodConfig, PreserveContext
from tether.methods.registry import register

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from tether.directions import Direction


class SteeringConfig(MethodConfig):
    """Direction file, layer and coefficient of preventative steering."""

    direction: str | None = Field(None, description="Direction file from `tether directions extract` (required).")
    layer: int | None = Field(None, description="Layer ℓ (output of block ℓ−1); default: the file's recommended layer.")
    alpha: float = Field(1.0, description="Coefficient α of the added vector (positive steers towards the trait).")
    unit: bool = Field(False, description="Add α·v̂ (unit vector) instead of α·v (the paper's raw mean difference).")


def load_method_direction(name: str, path: str | None) -> "Direction":
    """The direction a method's config names; one-sentence errors for a missing key or file."""
    from tether.directions import DirectionError, load_direction

    if not path:
        raise DirectionError(f"method '{name}' needs a trait direction: set `direction: PATH` to a file from `tether directions extract`")
    return load_direction(path, f"method '{name}': direction")


def refuse_checkpointing(model: Any, name: str) -> None:
    """A forward hook active only inside ``hooks`` is missing when activation checkpointing recomputes
    the forward during backward, so the gradients would be the unhooked model's: refuse the combination."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        on = getattr(model, "is_activation_checkpointing", None)
        if on is None:
            on = getattr(model, "is_gradient_checkpointing", False)
    if on:
        from tether.errors import ConfigError

        raise ConfigError(
            f"method '{name}' edits activations with a forward hook that activation checkpointing would skip in "
            "backward; set training.gradient_checkpointing to false"
        )


class _PerDevice:
    """A CPU tensor and its copies on the devices/dtypes the forward asks for (made once each)."""

    def __init__(self, value: "torch.Tensor") -> None:
        self.value = value
        self._copies: dict[tuple[Any, Any], "torch.Tensor"] = {}

    def like(self, h: "torch.Tensor") -> "torch.Tensor":
        key = (h.device, h.dtype)
        t = self._copies.get(key)
        if t is None:
            t = self._copies[key] = self.value.to(device=h.device, dtype=h.dtype)
        return t


class DirectionHookMethod(Method):
    """A method that edits the residual stream at some layers during training forwards only.

    Subclasses set ``self.direction`` and ``self.layers`` in ``__init__`` and return, from
    ``layer_fns``, one function ``h -> h'`` per layer; the forward hooks are entered only around
    training forwards and are always removed (``tether.directions.block_output_hooks``).
    """

    direction: "Direction"
    layers: list[int]

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        self._blocks: dict[int, Any] = {}  # decoder blocks per model, checked once

    def check_model(self, model: "PreTrainedModel") -> None:
        """Refuse a direction of the wrong width or a layer out of range before the run directory exists."""
        from tether.directions import DirectionError
        from tether.errors import ConfigError

        try:
            self.direction.check_model(model, self.layers, f"method '{self.name}'")
        except DirectionError as exc:  # a config error of this run: the trainer names the file and method
            raise ConfigError(str(exc)) from None

    def setup(self, ctx: PreserveContext) -> None:
        refuse_checkpointing(ctx.model, self.name)
        self._check(ctx.model)

    def _check(self, model: Any) -> Any:
        """The model's decoder blocks, after checking width and layers once per model."""
        blocks = self._blocks.get(id(model))
        if blocks is None:
            from tether.directions import decoder_blocks

            self.direction.check_model(model, self.layers, f"method '{self.name}'")
            blocks = self._blocks[id(model)] = decoder_blocks(model)
        return blocks

    def layer_fns(self) -> dict[int, Any]:
        raise NotImplementedError

    @contextlib.contextmanager
    def hooks(self, model: "PreTrainedModel") -> Iterator[None]:
        from tether.directions import block_output_hooks

        blocks = self._check(model)
        with block_output_hooks(model, self.layer_fns(), blocks):
            yield


@register
class PreventativeSteering(DirectionHookMethod):
    """h_ℓ ← h_ℓ + α·v_ℓ during training forwards only (Chen et al. 2025)."""

    name = "steering"
    description = "preventative steering: add α·v (trait direction) at one layer during training only (Persona Vectors)"
    supports = frozenset({"sft"})
    Config = SteeringConfig
    config: SteeringConfig

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        self.direction = load_method_direction(self.name, self.config.direction)
        self.layer = self.config.layer if self.config.layer is not None else int(self.direction.meta.get("layer", 1))
        from tether.directions import check_layer

        check_layer(self.layer, self.direction.n_layers, f"method '{self.name}': layer")
        vec = self.direction.unit(self.layer) if self.config.unit else self.direction.vectors[self.layer].float()
        self.vector = _PerDevice(self.config.alpha * vec)  # [hidden]
        self.layers = [self.layer]

    def layer_fns(self) -> dict[int, Any]:
        vec = self.vector
        return {self.layer: lambda h: h + vec.like(h)}
