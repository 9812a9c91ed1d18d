"""The preservation-method interface (DESIGN.md section 4) and the context the trainer hands it.

A method is a class with a pydantic ``Config`` and up to six hooks, each a no-op by default:

=================  ===========================================================================
``prepare_data``   rewrite or mix the training data before tokenisation (inoculation, replay)
``setup``          one-off work before the first step: anchors, Fisher information
``loss_terms``     named extra loss tensors for one micro-batch (KL, EWC, L2-SP, constraint...)
``on_gradients``   edit ``.grad`` after the last micro-batch's backward, before clipping (A-GEM)
``hooks``          a context manager around each forward (steering, ablation)
``on_step_end``    schedules and dual updates after the optimiser step (Lagrange multiplier)
``finalize``       deployment transform of the trained model
=================  ===========================================================================

Methods talk to the trainer only through ``PreserveContext``: the reference model, the
alignment batch of the current micro-step (shared by every method that asks), and ``log``,
which sends ``preserve/<method>/<term>`` through the trainer's own ``log`` to ``report_to``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

Mode = Literal["sft", "grpo", "dpo"]
Need = Literal["reference", "alignment", "labels", "direction"]
Rows = list[dict[str, Any]]


class MethodConfig(BaseModel):
    """Base of every method's hyperparameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class TrainingData:
    """The row sets a run trains on, before tokenisation, and how each batch mixes them.

    ``shares`` maps a row set to the share of every batch drawn from it; the capability rows
    fill what is left. Rows are TRL conversational (``messages``) or ``prompt``/``completion``.
    """

    capability: Rows
    neutral: Rows = field(default_factory=list)
    alignment: Rows = field(default_factory=list)
    shares: dict[str, float] = field(default_factory=dict)
    world: Rows = field(default_factory=list)
    """Persona-neutral organism chats (prompt/completion), part of the neutral mix."""


class PreserveContext(Protocol):
    """What the trainer offers a method during training."""

    @property
    def model(self) -> "PreTrainedModel": ...

    def alignment_inputs(self) -> dict[str, "torch.Tensor"]:
        """Tokenised alignment batch of the current micro-step (``input_ids``, ``attention_mask``, ``labels``)."""

    def policy_alignment_outputs(self, hidden_states: bool = False) -> Any:
        """The trained model's forward on the alignment batch, with grad (cached per micro-step)."""

    def reference_alignment_outputs(self, hidden_states: bool = False) -> Any:
        """The reference model's forward on the alignment batch, without grad (cached per micro-step)."""

    def alignment_nll(self) -> "torch.Tensor":
        """Mean next-token NLL of the trained model on the alignment batch's labelled tokens."""

    def setup_alignment_batches(self, n: int, batch_size: int | None = None) -> list[dict[str, "torch.Tensor"]]:
        """``n`` tokenised alignment batches for one-off work before training (seeded, fixed)."""

    def log(self, method: str, term: str, value: float) -> None:
        """Record ``preserve/<method>/<term>`` for the next logging step."""


class Method:
    """Base class of a preservation method; subclasses override only the hooks they need."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    supports: ClassVar[frozenset[str]] = frozenset({"sft"})
    needs: ClassVar[frozenset[str]] = frozenset()
    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def requires(self) -> frozenset[str]:
        """What this instance needs (may depend on its config; defaults to the class's ``needs``)."""
        return self.needs

    def prepare_data(self, data: TrainingData) -> TrainingData:
        return data

    def setup(self, ctx: PreserveContext) -> None:
        return None

    def loss_terms(self, ctx: PreserveContext, model: "PreTrainedModel", inputs: dict[str, Any]) -> dict[str, "torch.Tensor"]:
        return {}

    def on_gradients(self, ctx: PreserveContext, model: "PreTrainedModel") -> None:
        return None

    @contextlib.contextmanager
    def hooks(self, model: "PreTrainedModel") -> Iterator[None]:
        yield

    def on_step_end(self, ctx: PreserveContext, step: int) -> None:
        return None

    def finalize(self, model: "PreTrainedModel") -> "PreTrainedModel":
        return model

    # Checkpointed state (e.g. a Lagrange multiplier), so a resumed run continues exactly.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
