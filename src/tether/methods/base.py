"""The preservation-method interface (DESIGN.md section 4) and the context the trainer hands it.

A method is a class with a pydantic ``Config`` and a few hooks, each a no-op by default:

=================  ===========================================================================
``prepare_data``   rewrite or mix the training data before tokenisation (inoculation, replay)
``setup``          one-off work before the first step: anchors, Fisher information
``loss_terms``     named extra loss tensors for one micro-batch (KL, EWC, L2-SP, constraint...)
``on_gradients``   edit ``.grad`` after the last micro-batch's backward, before clipping (A-GEM)
``hooks``          a context manager around each forward (steering, ablation)
``on_step_end``    schedules and dual updates after the optimiser step (Lagrange multiplier)
``finalize``       deployment transform of the trained model
``check_model``    refuse, before anything is written, a model the method cannot work on
``task_loss``      take over the task loss of a training micro-batch (per-row routing); off by default
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


class TaskLoss(Protocol):
    """The trainer's task loss on some rows of the current micro-batch (see ``Method.task_loss``)."""

    def __call__(self, inputs: dict[str, Any], forward: Any = None) -> "torch.Tensor": ...


class Method:
    """Base class of a preservation method; subclasses override only the hooks they need."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    supports: ClassVar[frozenset[str]] = frozenset({"sft"})
    needs: ClassVar[frozenset[str]] = frozenset()
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    sharding_ok: ClassVar[bool] = True
    """False when the method reads or edits whole parameters or gradients, which FSDP and ZeRO-3
    split across ranks; the trainer then refuses it there (a ``sharding_reason`` string says why)."""
    sharding_reason: ClassVar[str] = ""
    row_batches: ClassVar[bool] = False
    """True when the method indexes the rows of a training micro-batch (``[batch, pos]``), so the
    trainer keeps padded rows instead of padding-free batches."""

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

    def check_model(self, model: "PreTrainedModel") -> None:
        """Refuse, with a one-sentence ``ConfigError``, a model this method cannot work on.

        Called once the model (and any LoRA adapter) is loaded, before the run directory exists.
        """
        return None

    def task_loss(
        self,
        ctx: PreserveContext,
        model: "PreTrainedModel",
        inputs: dict[str, Any],
        routed: "torch.Tensor | None",
        compute: "TaskLoss",
    ) -> "torch.Tensor | None":
        """Take over the task loss of one training micro-batch; ``None`` (the default) leaves it to the trainer.

        ``inputs`` is the collated micro-batch (``input_ids``, ``attention_mask``, ``labels``, ...);
        ``routed`` is a bool tensor ``[batch]``, true on rows labelled ``contaminated`` (``None``
        when the training rows carry no labels). ``compute(sub_inputs, forward=None)`` is the
        trainer's own (TRL's) loss on a subset of the rows, normalised by the label tokens of the
        whole micro-batch (or of the whole accumulated step, when the trainer counts those), so the
        losses of a partition of the rows add up to the micro-batch's loss; ``forward``, when given,
        replaces the model call (e.g. a ``torch.func.functional_call`` with some parameters
        detached). At most one method of a stack may override this hook.
        """
        return None

    # Checkpointed state (e.g. a Lagrange multiplier), so a resumed run continues exactly.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
