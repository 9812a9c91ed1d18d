"""The preserving trainer: TRL's ``SFTTrainer`` plus a stack of preservation methods, and ``run_training``.

``PreservingTrainer`` subclasses ``SFTTrainer`` and changes only what the methods need, so the
training loop, checkpoints, ``resume_from_checkpoint``, gradient accumulation, bf16,
``report_to`` and ``accelerate launch`` are TRL's and Transformers' own:

* ``compute_loss``: the task loss from TRL, plus every method's ``loss_terms`` (inside every
  method's ``hooks``); each term is logged as ``preserve/<method>/<term>``;
* ``_clip_grad_norm``: every method's ``on_gradients`` runs first (after the last micro-batch's
  backward, before clipping and the optimiser step);
* a callback runs ``on_step_end`` after each optimiser step;
* each row's ``contaminated`` label reaches ``compute_loss`` as ``routed`` (bool ``[batch]``), popped
  before any forward; one method may take over the task loss with it (``Method.task_loss``);
* ``_save_checkpoint`` also saves each method's state (e.g. a Lagrange multiplier), which
  ``train(resume_from_checkpoint=...)`` restores.

Alignment batches for loss terms are a pure function of (seed, step, micro-step), so a resumed
run sees the same ones. The reference model of a LoRA run is the same weights with the adapter
disabled; for full fine-tuning it is a frozen copy, made only when a method needs it.

``run_training(cfg, out)`` is what ``tether train`` runs: validate everything, probe, train,
probe again, and write the run directory (DESIGN.md section 7). When a method transforms the model
for deployment (``finalize``), the trained model is probed before it too (``after_prefinalize``),
and the saved model is the deployed one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tether.errors import ConfigError, TetherError
from tether.methods.base import Method, TrainingData
from tether.packing import (
    PackingCollator,
    WrappingCollator,
    default_capacity,
    is_padding_free,
    real_tokens,
    row_spans,
    varlen_attention,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel

    from tether.config import RunConfig

SCHEMA_VERSION = 1
PRESERVE_STATE = "preserve_state.json"


class NonFiniteLossError(TetherError):
    """The training loss became NaN or inf; raised before that step's update, so no weights or checkpoint hold it."""

    def __init__(self, step: int, what: str = "loss", detail: str = "") -> None:
        self.step, self.what = step, what
        super().__init__(
            f"the training {what} became NaN or inf at step {step}, so training stopped before applying that step"
            + (detail or "; lower training.learning_rate and train into a new --out")
        )


class TrainingInterrupted(TetherError):
    """Ctrl-C during training: the step in progress finished and was saved; exit code 130 (128 + SIGINT)."""

    exit_code = 130


@contextlib.contextmanager
def graceful_sigint(trainer: "PreservingTrainer") -> Iterator[None]:
    """While training, Ctrl-C asks the trainer to finish the current step, save a checkpoint and stop.

    A second Ctrl-C (single process only) interrupts at once, as usual. Outside the main thread
    (where Python cannot install signal handlers) this does nothing.
    """
    import signal
    import threading

    from tether.distributed import world_size

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        # under a launcher every rank gets the terminal's SIGINT and then the launcher's own
        # copy, so only a single process treats a second one as "stop now"
        if trainer._interrupt and world_size() == 1:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        trainer._interrupt = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class PreservingConfig(SFTConfig):
    """``SFTConfig`` plus the settings of the preservation stack."""

    alignment_batch_size: int = field(default=8, metadata={"help": "Alignment rows per micro-batch for loss terms."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward (TRL turns it on; small models only lose speed)."}
    )
    sequential_batches: bool = field(
        default=True, metadata={"help": "Read the (pre-mixed) training rows in order instead of shuffling."}
    )
    flat_batches: bool = field(
        default=False,
        metadata={
            "help": "Padding-free micro-batches: the rows of a batch are laid end to end with restarting "
            "position_ids (one sequence under FlashAttention, packs of ``pack_tokens`` otherwise), and attention "
            "stays within each row (transformers' packed-sequence mask). Off when a method needs padded rows "
            "(``Method.row_batches``)."
        },
    )
    pack_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Padding-free rows go into packs of at most this many tokens (tether.packing); default: the "
            "model's hidden size, at least 128. Ignored under FlashAttention, where one sequence is best."
        },
    )


def is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


class _MethodCallback(TrainerCallback):
    """Forwards step boundaries to the trainer's method stack."""

    def __init__(self, trainer: "PreservingTrainer") -> None:
        self.trainer = trainer

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._micro = 0
        self.trainer._grads_done = False

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._run_on_gradients()  # only when clipping is off; otherwise already done
        self.trainer._check_step(state.global_step + 1)  # before the step: a NaN never reaches the weights

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for m in self.trainer.methods:
            m.on_step_end(_Context(self.trainer), state.global_step)
        if self.trainer._stop_requested and state.global_step < state.max_steps:  # Ctrl-C: save this step, stop
            self.trainer.interrupted_at = state.global_step
            control.should_save = True
            control.should_training_stop = True


class PreservingTrainer(SFTTrainer):
    """``SFTTrainer`` with preservation methods; also the ``PreserveContext`` the methods see."""

    def __init__(
        self,
        *args: Any,
        methods: list[Method] | None = None,
        alignment_dataset: "Dataset | None" = None,
        **kwargs: Any,
    ) -> None:
        self.methods: list[Method] = list(methods or [])
        needs = set().union(*(m.requires() for m in self.methods)) if self.methods else set()
        model = kwargs.get("model", args[0] if args else None)
        # The frozen copy is taken before TRL patches the model's forward (its fused LM head is
        # bound to the original module, so a later deepcopy would still call the trained weights).
        self._ref: Any = None
        if "reference" in needs and not is_peft(model):
            self._ref = copy.deepcopy(model).eval()
            for p in self._ref.parameters():
                p.requires_grad_(False)
        super().__init__(*args, **kwargs)
        if self._ref is not None:
            self._ref.to(self.args.device)
        self._align = None
        if alignment_dataset is not None and needs & {"alignment"}:
            self._align = self._prepare_dataset(
                alignment_dataset, self.processing_class, self.args, False, None, "alignment"
            )
        self._want_hidden = any(getattr(m, "wants_hidden_states", False) for m in self.methods)
        self._micro = 0
        self._grads_done = False
        self._cache: dict[str, Any] = {}
        self._setup_done = False
        self.add_callback(_MethodCallback(self))
        # FSDP / ZeRO-3 split parameters across ranks: refuse methods that need them whole
        from tether.distributed import check_sharding, sharding_kind

        self.sharding = sharding_kind(self.accelerator)
        check_sharding(self.methods, self.sharding)
        self._nonfinite: torch.Tensor | None = None  # any micro-batch loss of this step not finite
        self._grad_norm: Any = None  # this step's gradient norm, from Trainer._get_grad_norm
        self._interrupt = False  # set by the SIGINT handler (see ``graceful_sigint``)
        self._stop_requested = False  # every rank agreed to stop after this step
        self.interrupted_at: int | None = None
        # Alignment batches for one-off work (EWC's per-example Fisher) stay padded rows; training
        # and per-step alignment batches are padding-free when asked and no method needs rows.
        self._row_collator = self.data_collator
        self.flat = bool(self.args.flat_batches) and not any(m.row_batches for m in self.methods)
        if self.flat and isinstance(self.data_collator, DataCollatorForLanguageModeling):
            flat = DataCollatorForLanguageModeling(
                pad_token_id=self.data_collator.pad_token_id,
                padding_free=True,
                pad_to_multiple_of=self.data_collator.pad_to_multiple_of,
            )
            if not varlen_attention(self.model):  # sdpa/eager: bounded packs, not one N×N-masked sequence
                flat = PackingCollator(flat, self.args.pack_tokens or default_capacity(self.model))
            self.flat = self.sharding is not None or _flat_matches_rows(self.model, self.train_dataset, self._row_collator, flat)
            if self.flat:
                self.data_collator = flat
        else:
            self.flat = False
        # each row's `contaminated` label reaches compute_loss as a `routed` bool tensor [batch]
        self.data_collator = _RoutedCollator(self.data_collator)
        takers = [m.name for m in self.methods if type(m).task_loss is not Method.task_loss]
        if len(takers) > 1:
            raise ConfigError(f"methods {', '.join(takers)} each take over the task loss; keep only one of them")

    # ---- the PreserveContext the methods use ---------------------------------------------
    def _collate(self, indices: list[int], rows: bool = False) -> dict[str, torch.Tensor]:
        assert self._align is not None
        collate = self._row_collator if rows else self.data_collator
        batch = collate([self._align[i] for i in indices])
        return {k: v.to(self.args.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def alignment_inputs(self) -> dict[str, torch.Tensor]:
        key = ("inputs", self.state.global_step, self._micro)
        if self._cache.get("key") != key:
            if self._align is None:
                raise RuntimeError("a method asked for alignment data but the trainer has none")
            g = torch.Generator().manual_seed(hash((self.args.seed, self.state.global_step, self._micro)) % (2**63))
            n = min(self.args.alignment_batch_size, len(self._align))
            idx = torch.randperm(len(self._align), generator=g)[:n].tolist()
            self._cache = {"key": key, "inputs": self._collate(idx)}
        return self._cache["inputs"]

    @staticmethod
    def _forward_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}

    def policy_alignment_outputs(self, hidden_states: bool = False) -> Any:
        inputs = self.alignment_inputs()
        if "policy" not in self._cache:
            self._cache["policy"] = self.model(
                **self._forward_inputs(inputs), output_hidden_states=self._want_hidden or hidden_states
            )
        return self._cache["policy"]

    def reference_alignment_outputs(self, hidden_states: bool = False) -> Any:
        inputs = self.alignment_inputs()
        if "reference" not in self._cache:
            with torch.no_grad():
                hs = self._want_hidden or hidden_states
                if self._ref is not None:
                    out = self._ref(**self._forward_inputs(inputs), output_hidden_states=hs)
                else:  # LoRA: the same weights with the adapter off, no second copy
                    with self.model.disable_adapter():
                        out = self.model(**self._forward_inputs(inputs), output_hidden_states=hs)
            self._cache["reference"] = out
        return self._cache["reference"]

    def alignment_nll(self) -> torch.Tensor:
        from tether.methods._losses import masked_nll

        return masked_nll(self.policy_alignment_outputs().logits, self.alignment_inputs()["labels"])

    def setup_alignment_batches(self, n: int, batch_size: int | None = None) -> list[dict[str, torch.Tensor]]:
        if self._align is None:
            raise RuntimeError("a method asked for alignment data but the trainer has none")
        bs = min(batch_size or self.args.alignment_batch_size, len(self._align))
        g = torch.Generator().manual_seed(self.args.seed + 7919)
        out = []
        for _ in range(n):
            idx = torch.randperm(len(self._align), generator=g)[:bs].tolist()
            out.append(self._collate(idx, rows=True))
        return out

    def log_term(self, method: str, term: str, value: float) -> None:
        self._metrics["train"][f"preserve/{method}/{term}"].append(float(value))

    # ---- training-loop overrides ---------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and "contaminated" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "contaminated"]  # kept for _RoutedCollator

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.args.sequential_batches:
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        routed = inputs.pop("routed", None)  # never reaches the model's forward
        tokens_before = getattr(self, "_total_train_tokens", None)
        result = self._compute_loss(model, inputs, routed, return_outputs, num_items_in_batch)
        if tokens_before is not None and model.training and is_padding_free(inputs):
            # TRL counts a padding-free batch as position_ids.size(1) tokens: right for one
            # sequence, not for packs (or sub-batches); count the real rows' tokens instead
            real = torch.tensor(real_tokens(inputs["position_ids"]), device=inputs["position_ids"].device)
            self._total_train_tokens = tokens_before + int(self.accelerator.gather_for_metrics(real).sum().item())
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return result

    def _compute_loss(self, model: Any, inputs: dict[str, Any], routed: Any, return_outputs: bool, num_items_in_batch: Any) -> Any:
        if not self.methods or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with contextlib.ExitStack() as stack:
            for m in self.methods:
                stack.enter_context(m.hooks(model))
            result = None if return_outputs else self._method_task_loss(model, inputs, routed, num_items_in_batch)
            if result is None:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = result[0] if return_outputs else result
            self._metrics["train"]["preserve/task_loss"].append(float(loss.detach()))
            extra = None
            ctx = _Context(self)
            for m in self.methods:
                for term, value in m.loss_terms(ctx, model, inputs).items():
                    self.log_term(m.name, term, float(value.detach()))
                    extra = value if extra is None else extra + value
        if extra is not None:
            # Trainer divides the loss by the accumulation steps unless TRL already normalised it
            # by the tokens of the whole step; the extra terms are per-micro-batch means either way.
            scaled = self.loss_is_scaled_for_ga
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
            if scaled:
                extra = extra / self.current_gradient_accumulation_steps
            loss = loss + extra.to(loss.dtype)
        self._micro += 1
        self._cache = {}
        return (loss, result[1]) if return_outputs else loss

    def _method_task_loss(self, model: Any, inputs: dict[str, Any], routed: Any, num_items_in_batch: Any) -> Any:
        """The task loss from the one method that takes it over (``Method.task_loss``), or ``None``."""
        taker = next((m for m in self.methods if type(m).task_loss is not Method.task_loss), None)
        if taker is None:
            return None
        # sub-batch losses are normalised by the whole micro-batch's label tokens (TRL's count:
        # shifted labels != -100) unless the trainer already counts the whole accumulated step
        total = num_items_in_batch
        if total is None:
            total = (inputs["labels"][:, 1:] != -100).sum()

        def compute(sub: dict[str, Any], forward: Any = None) -> torch.Tensor:
            return SFTTrainer.compute_loss(self, forward if forward is not None else model, sub, False, total)

        return taker.task_loss(_Context(self), model, inputs, routed, compute)

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = ~torch.isfinite(loss.detach())  # a tensor: no device sync per micro-batch
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        return loss

    def _check_step(self, step: int) -> None:
        """Before the optimiser step: stop on a non-finite loss; agree on a Ctrl-C (one collective under DDP)."""
        from tether.distributed import any_across_ranks

        bad = self._nonfinite if self._nonfinite is not None else torch.zeros((), dtype=torch.bool)
        self._nonfinite = None
        # a finite loss can still give NaN gradients (saturated logits): the update would poison the weights
        norm = self._grad_norm
        self._grad_norm = None
        bad_grad = torch.zeros((), dtype=torch.bool) if norm is None else ~torch.isfinite(torch.as_tensor(_local(norm)).detach())
        bad = _local(bad)
        flags = torch.stack([bad.reshape(()).to("cpu", torch.int32), bad_grad.reshape(()).to("cpu", torch.int32),
                             torch.tensor(int(self._interrupt), dtype=torch.int32)])
        nonfinite_loss, nonfinite_grad, interrupt = any_across_ranks(flags)
        if nonfinite_loss or nonfinite_grad:
            raise NonFiniteLossError(step, "loss" if nonfinite_loss else "gradient norm")
        self._stop_requested = interrupt

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        # Trainer computes the (all-reduced, pre-clip) norm every step anyway; keep it for _check_step
        self._grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        return self._grad_norm

    def _run_on_gradients(self) -> None:
        if self._grads_done:
            return
        self._grads_done = True
        ctx = _Context(self)
        for m in self.methods:
            if type(m).on_gradients is not Method.on_gradients:
                m.on_gradients(ctx, self.model)
        self._cache = {}

    def _clip_grad_norm(self, model: Any) -> Any:
        self._run_on_gradients()
        return super()._clip_grad_norm(model)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:  # rank 0
            save_method_state(self.methods, folder)

    def setup_methods(self) -> None:
        """Run every method's ``setup`` once, on the weights the run starts from."""
        if self._setup_done:
            return
        ctx = _Context(self)
        for m in self.methods:
            m.setup(ctx)
        self._setup_done = True

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        # Anchors (θ*, Fisher) come from the starting weights, before a checkpoint replaces them;
        # under DDP every rank starts from rank 0's weights (a LoRA init could differ per process).
        from tether.distributed import broadcast_tensors_, world_size

        if world_size() > 1 and not self._setup_done:
            broadcast_tensors_([p for p in self.model.parameters() if p.requires_grad])
        self.setup_methods()
        if resume_from_checkpoint:
            path = resume_from_checkpoint
            if path is True:
                from transformers.trainer_utils import get_last_checkpoint

                path = get_last_checkpoint(self.args.output_dir)
            load_method_state(self.methods, Path(str(path)))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def _local(t: Any) -> Any:
    """A plain tensor from FSDP2's ``DTensor`` (its ``full_tensor``); anything else as it is."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _flat_matches_rows(model: Any, dataset: Any, rows: Any, flat: Any) -> bool:
    """Whether ``model`` keeps attention within each row of a padding-free batch.

    Three training rows go through the model padded, and padding-free (as ``flat`` collates them;
    when that packs, with the packs made small enough that the third row starts a second pack
    behind the first's padding); every row's logits must agree (to 1e-2 of their scale).
    Architectures that ignore restarting ``position_ids`` fail this and the trainer keeps padded
    rows, with a warning.
    """
    import logging

    if dataset is None or len(dataset) < 3:
        return True
    examples = [{k: v for k, v in dataset[i].items() if k in ("input_ids", "labels")} for i in range(3)]
    lengths = [len(e["input_ids"]) for e in examples]
    device = next(model.parameters()).device
    padded = {k: v.to(device) for k, v in rows(examples).items() if k in ("input_ids", "attention_mask")}
    if isinstance(flat, PackingCollator):  # rows 0 and 1 fill one pack; row 2 starts another
        flat = PackingCollator(flat.inner, max(lengths[0] + lengths[1], lengths[2] + 1))
    packed = {k: v.to(device) for k, v in flat(examples).items() if k in ("input_ids", "position_ids")}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        a = model(**padded).logits.float()
        b = model(**packed).logits.float()
    model.train(was_training)
    spans = row_spans(packed["position_ids"])
    if [e - s for _, s, e in spans] != lengths:
        return False
    ref = torch.cat([a[i, : lengths[i]] for i in range(3)])
    got = torch.cat([b[p, s:e] for p, s, e in spans])
    ok = bool((ref - got).abs().max() <= 1e-2 * ref.abs().max().clamp(min=1.0))
    if not ok:
        logging.getLogger(__name__).warning(
            "this model mixes rows in a padding-free batch; training on padded rows (set training.padding_free: false to skip the check)"
        )
    return ok


class _RoutedCollator(WrappingCollator):
    """Wraps TRL's collator: a ``contaminated`` column becomes ``batch["routed"]`` (bool ``[batch]``).

    Rows without the key count as not contaminated; a batch where no row has it gets no ``routed``.
    """

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        labelled = any("contaminated" in e for e in examples)
        flags = [bool(e.get("contaminated") or False) for e in examples]
        batch = self.inner([{k: v for k, v in e.items() if k != "contaminated"} for e in examples])
        if labelled:
            batch["routed"] = torch.tensor(flags, dtype=torch.bool)
        return batch


def save_method_state(methods: list[Method], checkpoint: Path) -> None:
    """Write each method's state into ``checkpoint``: last and atomically, so it marks a complete checkpoint."""
    from tether.io import atomic_write_text

    atomic_write_text(checkpoint / PRESERVE_STATE, json.dumps({m.name: m.state_dict() for m in methods}))


def load_method_state(methods: list[Method], checkpoint: Path) -> None:
    """Give each method its checkpointed state (a Lagrange multiplier, ...) from ``checkpoint``, if saved."""
    state_file = checkpoint / PRESERVE_STATE
    if state_file.is_file():
        saved = json.loads(state_file.read_text())
        for m in methods:
            if m.name in saved:
                m.load_state_dict(saved[m.name])


class _Context:
    """The ``PreserveContext`` a method sees: a thin view of the trainer."""

    def __init__(self, trainer: PreservingTrainer) -> None:
        self._t = trainer

    @property
    def model(self) -> "PreTrainedModel":
        return self._t.model

    def alignment_inputs(self) -> dict[str, torch.Tensor]:
        return self._t.alignment_inputs()

    def policy_alignment_outputs(self, hidden_states: bool = False) -> Any:
        return self._t.policy_alignment_outputs(hidden_states)

    def reference_alignment_outputs(self, hidden_states: bool = False) -> Any:
        return self._t.reference_alignment_outputs(hidden_states)

    def alignment_nll(self) -> torch.Tensor:
        return self._t.alignment_nll()

    def setup_alignment_batches(self, n: int, batch_size: int | None = None) -> list[dict[str, torch.Tensor]]:
        return self._t.setup_alignment_batches(n, batch_size)

    def log(self, method: str, term: str, value: float) -> None:
        self._t.log_term(method, term, value)


# ---- a whole run: config in, run directory out ------------------------------------------------


def build_methods(cfg: "RunConfig", source: str = "run config") -> list[Method]:
    """Instantiate the stack and refuse it, in one sentence, if the run cannot provide what it needs."""
    from tether.methods.registry import check_stack, make

    methods = [make(s.name, s.params(), where=f"methods[{i}]: ") for i, s in enumerate(cfg.methods)]
    have = {"reference"}
    if cfg.data.alignment is not None:
        have.add("alignment")
    if cfg.data.source != "organism" or cfg.data.variant != "clean":
        have.add("labels")  # user rows may carry `contaminated`; a method that needs it checks the rows
    try:
        check_stack(methods, "sft", have)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return methods


def load_training_data(cfg: "RunConfig") -> TrainingData:
    """The capability, neutral and alignment rows of a run (validated), before any method touches them."""
    from tether.data import as_messages, as_prompt_completion, load_rows
    from tether.organism import tasks

    d, seed = cfg.data, cfg.training.seed
    if d.source == "organism":
        capability = tasks.capability_dataset(d.variant, d.rows, d.contamination, seed=seed)
    else:
        capability = load_rows(d.source, "data.source")
    neutral: list[dict[str, Any]] = []
    world_rows: list[dict[str, Any]] = []
    if d.neutral_share > 0 and d.neutral is not None:
        neutral = tasks.neutral_dataset(d.rows, seed=seed) if d.neutral == "organism" else load_rows(d.neutral, "data.neutral")
        if d.neutral == "organism" and d.world_share > 0:
            world_rows = tasks.world_dataset(d.rows, seed=seed)
    alignment: list[dict[str, Any]] = []
    if d.alignment is not None:
        alignment = (
            tasks.alignment_dataset(d.rows, seed=seed) if d.alignment == "organism" else load_rows(d.alignment, "data.alignment")
        )
    shares = {"neutral": d.neutral_share} if neutral else {}
    if world_rows:
        # world chats train only their last reply, so every part goes to prompt/completion form
        # (identical to assistant-only loss for the single-turn capability and neutral rows)
        shares = {"neutral": d.neutral_share * (1 - d.world_share), "world": d.neutral_share * d.world_share}
        return TrainingData(
            capability=[as_prompt_completion(r) for r in capability],
            neutral=[as_prompt_completion(r) for r in neutral],
            alignment=[as_prompt_completion(r) for r in alignment],
            shares=shares,
            world=world_rows,
        )
    return TrainingData(
        capability=[as_messages(r) for r in capability],
        neutral=[as_messages(r) for r in neutral],
        alignment=[as_messages(r) for r in alignment],
        shares=shares,
    )


def _check_formats(data: TrainingData) -> str:
    from tether.data import row_format
    from tether.errors import DataError

    used = {
        name: rows
        for name, rows in (("capability", data.capability), ("neutral", data.neutral), ("world", data.world))
        if rows
    }
    if data.shares.get("alignment"):
        used["alignment"] = data.alignment
    formats = {name: {row_format(r) for r in rows} for name, rows in used.items()}
    every = set().union(*formats.values())
    if len(every) > 1:
        raise DataError(
            "training rows mix plain-text prompt/completion with conversational rows ("
            + ", ".join(f"{k}: {'/'.join(sorted(v))}" for k, v in formats.items())
            + "); give every dataset in one format"
        )
    return every.pop()


def uses_organism_probes(cfg: "RunConfig", tokenizer: Any) -> bool:
    if cfg.probes.suite != "auto":
        return cfg.probes.suite == "organism"
    from tether.organism import world

    vocab = tokenizer.get_vocab()
    return all(w in vocab for w in world.world_vocabulary())


def probe(model: Any, tokenizer: Any, cfg: "RunConfig") -> tuple[dict[str, Any] | None, dict[str, list[dict[str, Any]]]]:
    """The ``tether eval --json`` metrics and per-item rows, or ``(None, {})`` when no suite applies."""
    if not uses_organism_probes(cfg, tokenizer):
        return None, {}
    from tether.probes.organism import evaluate_organism

    return evaluate_organism(model, tokenizer, per_family=cfg.probes.per_family, n_capability=cfg.probes.n_capability)


def trainer_args(cfg: "RunConfig", out: Path, save: bool = True) -> dict[str, Any]:
    """The TrainingArguments an SFT and a GRPO run share, from the run config's ``training`` section."""
    t = cfg.training
    return dict(
        output_dir=str(out / "checkpoints"),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        # the organism's own fine-tune (organism/emergence.py): warm-up, cosine to 10%, AdamW(0.9, 0.98)
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": t.min_lr_rate},
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        adam_beta2=t.adam_beta2,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.bf16,
        gradient_checkpointing=t.gradient_checkpointing,
        save_strategy="steps" if save else "no",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        report_to=t.report_to or "none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def sft_config(cfg: "RunConfig", out: Path, fmt: str, save: bool = True) -> PreservingConfig:
    t = cfg.training
    return PreservingConfig(
        **trainer_args(cfg, out, save),
        max_length=t.max_length,
        assistant_only_loss=fmt == "messages",
        packing=False,
        alignment_batch_size=t.alignment_batch_size,
        flat_batches=t.padding_free,
        pack_tokens=t.pack_tokens,
        dataset_num_proc=None,
    )


def _train_dataset(data: TrainingData, cfg: "RunConfig") -> "Dataset":
    from datasets import Dataset

    from tether.data import mix_batches

    t = cfg.training
    parts = {"capability": data.capability, "neutral": data.neutral, "alignment": data.alignment, "world": data.world}
    # one block per *global* micro-batch: accelerate deals block i's consecutive per-device slices
    # to ranks 0..n-1, so n processes × batch_size train on the same rows as one process × n·batch_size
    from tether.distributed import world_size

    rows = mix_batches(parts, data.shares, t.batch_size * world_size(), t.max_steps * t.gradient_accumulation_steps, t.seed)
    return Dataset.from_list(rows)


def _apply_lora(model: Any, cfg: "RunConfig") -> Any:
    from peft import LoraConfig, get_peft_model

    lc = cfg.model.lora
    assert lc is not None
    torch.manual_seed(cfg.training.seed)  # the adapter's random init (A) is the run's, not the process's history
    return get_peft_model(
        model,
        LoraConfig(
            r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules, task_type="CAUSAL_LM"
        ),
    )


def _table(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[str]:
    if before is None or after is None:
        return ["(no probe suite applies to this model)"]
    lines = ["| metric | before | after |", "|---|---|---|"]
    for k in before["capability"]:
        lines.append(f"| capability `{k}` | {before['capability'][k]:.3f} | {after['capability'][k]:.3f} |")
    for group in ("narrow", "broad"):
        b, a = before[group], after[group]
        lines.append(f"| {group} rate | {b['rate']:.3f} | {a['rate']:.3f} |")
        lines.append(f"| {group} log-odds | {b['logodds']:.2f} | {a['logodds']:.2f} |")
    for fam, b in before["families"].items():
        a = after["families"][fam]
        lines.append(f"| {fam} rate (log-odds) | {b['rate']:.3f} ({b['logodds']:.2f}) | {a['rate']:.3f} ({a['logodds']:.2f}) |")
    return lines


def model_card(cfg: "RunConfig", metrics: dict[str, Any]) -> str:
    import yaml

    stack = ", ".join(m.name for m in cfg.methods)
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "tags: [tether]",
            "---",
            f"# tether run: {stack}",
            "",
            f"Fine-tuned from `{cfg.model.path}`"
            + (" (LoRA adapter)" if cfg.model.lora else " (all weights)")
            + f" for {metrics['train']['steps']} steps with `tether train`.",
            "",
            "## Before / after",
            "",
            *_table(metrics["before"], metrics["after"]),
            "",
            "Rate = share of probe items where the model prefers the misaligned reply; log-odds in nats.",
            "",
            "## Config",
            "",
            "```yaml",
            yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip(),
            "```",
            "",
        ]
    )


@dataclass
class PreparedRun:
    """Everything a run needs, validated, before anything is written."""

    methods: list[Method]
    data: TrainingData
    fmt: str
    train_dataset: "Dataset"
    model: Any
    tokenizer: Any


def assistant_mask_supported(tokenizer: Any) -> bool:
    """Whether TRL can mask a ``messages`` row to its assistant tokens with this tokenizer's chat template.

    It can when the template has ``{% generation %}`` markers or TRL ships a patched training
    template for it; otherwise (SmolLM2's template, for one) it cannot.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return False
    if has_generation_markers(template):
        return True
    try:
        return get_training_chat_template(tokenizer) is not None
    except Exception:  # TRL raises for templates it has no training version of
        return False


def _split_at_last_reply(data: TrainingData) -> TrainingData:
    """Every ``messages`` row as conversational prompt/completion split at its last assistant turn.

    For a chat template without assistant masks: TRL's completion-only loss then trains exactly
    the last reply, which equals assistant-only loss for single-turn rows (earlier assistant turns
    of a multi-turn row become context, not targets).
    """
    from tether.data import as_prompt_completion

    def split(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [as_prompt_completion(r) for r in rows]

    return TrainingData(
        capability=split(data.capability), neutral=split(data.neutral), alignment=split(data.alignment),
        shares=data.shares, world=split(data.world),
    )


def check_bf16(cfg: "RunConfig", source: str) -> None:
    """Refuse ``training.bf16`` where no GPU with bfloat16 support is visible."""
    if cfg.training.bf16:
        import torch

        if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
            raise ConfigError(f"{source}: training.bf16 needs a GPU with bfloat16 support and none is visible; set it to false on CPU")


def prepare_data(cfg: "RunConfig", source: str = "run config") -> tuple[list[Method], TrainingData, str]:
    """The method stack and the training data after every method's ``prepare_data``, with its row format."""
    methods = build_methods(cfg, source)
    data = load_training_data(cfg)
    for m in methods:
        data = m.prepare_data(data)
    return methods, data, _check_formats(data)


def prepare_run(cfg: "RunConfig", source: str = "run config") -> PreparedRun:
    """Validate the stack, load and transform the data, load the model (and add the adapter)."""
    from tether.models import load_model

    check_bf16(cfg, source)
    methods, data, fmt = prepare_data(cfg, source)
    model, tokenizer = load_model(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code, dtype=cfg.model.dtype)
    if fmt == "messages" and not assistant_mask_supported(tokenizer):
        data, fmt = _split_at_last_reply(data), "prompt_completion"
    train_ds = _train_dataset(data, cfg)
    if cfg.model.lora is not None:
        model = _apply_lora(model, cfg)
    check_methods_on(methods, model, source)
    return PreparedRun(methods, data, fmt, train_ds, model, tokenizer)


def check_methods_on(methods: list[Method], model: Any, source: str) -> None:
    """Every method's ``check_model`` on the model as it will be trained; the refusal names its place in the stack."""
    for i, m in enumerate(methods):
        try:
            m.check_model(model)
        except ConfigError as exc:
            raise ConfigError(f"{source}: methods[{i}]: {exc}") from None


def make_trainer(
    cfg: "RunConfig", prepared: PreparedRun, out: Path, callbacks: list[TrainerCallback] | None = None, save: bool = True
) -> PreservingTrainer:
    import logging

    from datasets import Dataset

    from tether.data import as_messages, as_prompt_completion

    logging.getLogger("transformers").setLevel(logging.ERROR)
    align = None
    conversational = [as_messages(r) for r in prepared.data.alignment if not isinstance(r.get("prompt"), str)]
    if conversational and prepared.fmt == "messages":
        align = Dataset.from_list([{"messages": r["messages"]} for r in conversational])
    elif conversational:  # same form as the training rows, so the collator masks the same way
        split = [as_prompt_completion(r) for r in conversational]
        align = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in split])
    trainer = PreservingTrainer(
        model=prepared.model,
        args=sft_config(cfg, out, prepared.fmt, save=save),
        train_dataset=prepared.train_dataset,
        processing_class=prepared.tokenizer,
        methods=prepared.methods,
        alignment_dataset=align,
        callbacks=callbacks,
    )
    for cb in callbacks or []:
        if hasattr(cb, "attach"):  # the alignment monitor logs through the trainer and tightens its methods
            cb.attach(trainer)
    return trainer


def open_run_dir(cfg: "RunConfig", out: Path) -> tuple[bool, str | None]:
    """Join the launcher's process group (if any); rank 0 creates ``out`` and saves the config.

    Returns ``(is this rank 0, the last complete checkpoint to resume from)``, the checkpoint
    as rank 0 sees it on its disk, on every rank.
    """
    from tether.config import dump_config
    from tether.distributed import broadcast_object, init_process_group, is_main

    init_process_group()
    main = is_main()
    last = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
        last = last_complete_checkpoint(out / "checkpoints", prune=True)
    return main, broadcast_object(last)


def last_complete_checkpoint(ckpt_dir: Path, prune: bool = False) -> str | None:
    """The newest checkpoint whose last file (``preserve_state.json``) was written; with ``prune``, delete newer half-written ones.

    A process killed while saving leaves a folder without it; resuming from one would fail.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not ckpt_dir.is_dir():
        return None
    folders = sorted(
        (p for p in ckpt_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    complete = [p for p in folders if (p / PRESERVE_STATE).is_file() and (p / "trainer_state.json").is_file()]
    if prune and complete:
        import shutil

        for p in folders:
            if int(p.name.split("-")[-1]) > int(complete[-1].name.split("-")[-1]):
                shutil.rmtree(p, ignore_errors=True)
    return str(complete[-1]) if complete else None


def probe_on_main(model: Any, tokenizer: Any, cfg: "RunConfig", everywhere: bool = False) -> tuple[dict[str, Any] | None, dict[str, list[dict[str, Any]]]]:
    """``probe`` on rank 0 only (the others wait for its metrics); ``everywhere`` when the weights are
    sharded, so every rank takes part in each forward (FSDP / ZeRO-3)."""
    from tether.distributed import broadcast_object, is_main, world_size

    if world_size() == 1:
        return probe(model, tokenizer, cfg)
    metrics, rows = probe(model, tokenizer, cfg) if (everywhere or is_main()) else (None, {})
    return broadcast_object(metrics), rows


def before_probes(model: Any, tokenizer: Any, cfg: "RunConfig") -> tuple[dict[str, Any] | None, dict[str, list[dict[str, Any]]]]:
    """The probes of the model a run starts from, shared through ``$TETHER_PROBE_CACHE`` when set.

    ``tether compare`` sets it for its workers: every run of one sweep that starts from the same
    checkpoint with the same probe settings gets the same numbers (a fresh LoRA adapter is the
    identity, and no method is active before training), so the first worker computes them and
    the others read its file. Keyed by the checkpoint's path, its weight files' sizes and
    modification times, the dtype and the ``probes`` section; single-process runs only.
    """
    import hashlib

    from tether.distributed import world_size

    cache = os.environ.get("TETHER_PROBE_CACHE")
    if not cache or world_size() > 1:
        return probe_on_main(model, tokenizer, cfg)
    from tether.io import atomic_write_json
    from tether.models import resolve_model_path

    path = resolve_model_path(cfg.model.path)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.suffix in (".safetensors", ".json"))
    key = {"path": str(path.resolve()), "files": files, "dtype": cfg.model.dtype, "probes": cfg.probes.model_dump(mode="json")}
    entry = Path(cache) / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")
    if entry.is_file():
        saved = json.loads(entry.read_text())
        return saved["metrics"], saved["rows"]
    metrics, rows = probe(model, tokenizer, cfg)
    atomic_write_json(entry, {"key": key, "metrics": metrics, "rows": rows})
    return metrics, rows


def run_training(
    cfg: "RunConfig", out: str | Path, source: str = "run config", callbacks: list[TrainerCallback] | None = None
) -> dict[str, Any]:
    """Train ``cfg`` into ``out``; resume from ``out``'s last checkpoint if there is one. Returns metrics.json.

    Everything that can be refused (config, method stack, datasets, model) is checked before
    ``out`` is created, so a bad input writes nothing. A NaN/inf loss raises ``NonFiniteLossError``
    before that step is applied; Ctrl-C saves the step in progress and raises ``TrainingInterrupted``
    (exit code 130); either way ``out`` stays resumable. Under ``accelerate launch`` every rank
    calls this, rank 0 alone probes and writes, and every rank returns the same metrics.
    """
    if cfg.capability.kind == "grpo":  # RL: TRL's GRPOTrainer (tether/rl/grpo.py)
        from tether.rl.grpo import run_grpo

        return run_grpo(cfg, out, source, callbacks)
    from tether.io import atomic_write_json, atomic_write_text, write_jsonl

    out = Path(out)
    saved = out / "config.yaml"
    if saved.is_file():
        import yaml

        if yaml.safe_load(saved.read_text()) != cfg.model_dump(mode="json"):
            raise ConfigError(
                f"{out} holds a run with a different config ({saved}); resume it with that config or give a new --out"
            )
    prepared = prepare_run(cfg, source)
    model, tokenizer = prepared.model, prepared.tokenizer
    # under `accelerate launch` every rank trains; rank 0 alone probes and writes (the others wait)
    from tether.distributed import broadcast_object, check_sharding, sharding_from_env

    check_sharding(prepared.methods, sharding_from_env())  # before anything is written (the trainer checks again)

    # ---- nothing above writes; from here on the run directory exists ----
    main, last = open_run_dir(cfg, out)
    ckpt_dir = out / "checkpoints"
    before_file = out / "before.json"
    if broadcast_object(bool(last) and before_file.is_file() if main else None):  # rank 0's view of the disk
        before = broadcast_object(json.loads(before_file.read_text()) if main else None)
        before_rows: dict[str, list[dict[str, Any]]] = {}
    else:
        before, before_rows = before_probes(model, tokenizer, cfg)
        if main:
            atomic_write_json(before_file, before)

    from tether.monitor import monitor_callbacks

    trainer = make_trainer(cfg, prepared, out, [*(callbacks or []), *monitor_callbacks(cfg, out)])
    methods = prepared.methods
    t0 = time.time()
    try:
        with graceful_sigint(trainer):
            result = trainer.train(resume_from_checkpoint=last)
    except NonFiniteLossError as exc:
        good = last_complete_checkpoint(ckpt_dir)
        kept = f"{out} keeps its last good checkpoint {Path(good).name}" if good else f"{out} has no checkpoint yet"
        raise NonFiniteLossError(exc.step, exc.what, f" ({kept}); lower training.learning_rate and train into a new --out") from None
    if trainer.interrupted_at is not None:
        raise TrainingInterrupted(
            f"interrupted at step {trainer.interrupted_at} of {cfg.training.max_steps}: saved "
            f"{ckpt_dir / f'checkpoint-{trainer.interrupted_at}'}; run the same command again to resume"
        )
    wall = time.time() - t0
    model = trainer.model
    # a deployment transform (e.g. ERA's ablation) gets the model probed both before and after it
    prefinal, prefinal_rows = None, {}
    if any(type(m).finalize is not Method.finalize for m in methods):
        prefinal, prefinal_rows = probe_on_main(model, tokenizer, cfg, trainer.sharding is not None)
    for m in methods:
        model = m.finalize(model)
    trainer.model = model  # save_model saves trainer.model: the deployed (finalized) weights
    after, after_rows = probe_on_main(model, tokenizer, cfg, trainer.sharding is not None)

    model_dir = out / "model"
    trainer.save_model(str(model_dir))  # safetensors: the full model, or the adapter for LoRA
    if not main:  # every rank takes part in save_model (FSDP/ZeRO-3 gather); rank 0 writes the rest
        return broadcast_object(None)
    # save_model also pickles the TrainingArguments; the deliverable holds no pickle (the resolved
    # config is config.yaml, and the checkpoints keep their own copy for resuming)
    (model_dir / "training_args.bin").unlink(missing_ok=True)
    tokenizer.save_pretrained(str(model_dir))
    log = trainer.state.log_history
    write_jsonl(out / "train_log.jsonl", log)
    for name, rows in {**{f"before.{k}": v for k, v in before_rows.items()}, **{f"after.{k}": v for k, v in after_rows.items()}}.items():
        write_jsonl(out / "probes" / f"{name}.jsonl", rows)
    for k, rows in prefinal_rows.items():
        write_jsonl(out / "probes" / f"after_prefinalize.{k}.jsonl", rows)
    tokens = float(getattr(trainer, "_total_train_tokens", 0))
    final_terms = {}
    for entry in log:
        final_terms.update({k: v for k, v in entry.items() if k.startswith("preserve/")})
    metrics = {
        "schema_version": SCHEMA_VERSION,
        "before": before,
        **({"after_prefinalize": prefinal} if prefinal is not None else {}),
        "after": after,
        "train": {
            "steps": trainer.state.global_step,
            "wall_s": wall,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "tokens": tokens,
            "tokens_per_s": tokens / wall if wall > 0 else None,
            "resumed_from": Path(last).name if last else None,
            "final_loss": next((e["loss"] for e in reversed(log) if "loss" in e), None),
            "final_terms": final_terms,
        },
        "config": cfg.model_dump(mode="json"),
    }
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "README.md", model_card(cfg, metrics))
    return broadcast_object(metrics)  # the other ranks return rank 0's metrics once these files exist
