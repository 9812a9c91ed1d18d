"""The preserving trainer: TRL's ``SFTTrainer`` plus a stack of preservation methods, and ``run_training``.

``PreservingTrainer`` subclasses ``SFTTrainer`` and changes only what the methods need, so the
training loop, checkpoints, ``resume_from_checkpoint``, gradient accumulation, bf16,
``report_to`` and ``accelerate launch`` are TRL's and Transformers' own:

* ``compute_loss``: the task loss from TRL, plus every method's ``loss_terms`` (inside every
  method's ``hooks``); each term is logged as ``preserve/<method>/<term>``;
* ``_clip_grad_norm``: every method's ``on_gradients`` runs first (after the last micro-batch's
  backward, before clipping and the optimiser step);
* a callback runs ``on_step_end`` after each optimiser step;
* ``_save_checkpoint`` also saves each method's state (e.g. a Lagrange multiplier), which
  ``train(resume_from_checkpoint=...)`` restores.

Alignment batches for loss terms are a pure function of (seed, step, micro-step), so a resumed
run sees the same ones. The reference model of a LoRA run is the same weights with the adapter
disabled; for full fine-tuning it is a frozen copy, made only when a method needs it.

``run_training(cfg, out)`` is what ``tether train`` runs: validate everything, probe, train,
probe again, and write the run directory (DESIGN.md section 7).
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from tether.errors import ConfigError
from tether.methods.base import Method, TrainingData

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel

    from tether.config import RunConfig

SCHEMA_VERSION = 1
PRESERVE_STATE = "preserve_state.json"


@dataclass
class PreservingConfig(SFTConfig):
    """``SFTConfig`` plus the settings of the preservation stack."""

    alignment_batch_size: int = field(default=32, metadata={"help": "Alignment rows per micro-batch for loss terms."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward (TRL turns it on; small models only lose speed)."}
    )
    sequential_batches: bool = field(
        default=True, metadata={"help": "Read the (pre-mixed) training rows in order instead of shuffling."}
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

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for m in self.trainer.methods:
            m.on_step_end(_Context(self.trainer), state.global_step)


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

    # ---- the PreserveContext the methods use ---------------------------------------------
    def _collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        assert self._align is not None
        batch = self.data_collator([self._align[i] for i in indices])
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
            out.append(self._collate(idx))
        return out

    def log_term(self, method: str, term: str, value: float) -> None:
        self._metrics["train"][f"preserve/{method}/{term}"].append(float(value))

    # ---- training-loop overrides ---------------------------------------------------------
    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.args.sequential_batches:
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        if not self.methods or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with contextlib.ExitStack() as stack:
            for m in self.methods:
                stack.enter_context(m.hooks(model))
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
        state = {m.name: m.state_dict() for m in self.methods}
        (folder / PRESERVE_STATE).write_text(json.dumps(state))

    def setup_methods(self) -> None:
        """Run every method's ``setup`` once, on the weights the run starts from."""
        if self._setup_done:
            return
        ctx = _Context(self)
        for m in self.methods:
            m.setup(ctx)
        self._setup_done = True

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        # Anchors (θ*, Fisher) come from the starting weights, before a checkpoint replaces them.
        self.setup_methods()
        if resume_from_checkpoint:
            path = resume_from_checkpoint
            if path is True:
                from transformers.trainer_utils import get_last_checkpoint

                path = get_last_checkpoint(self.args.output_dir)
            state_file = Path(str(path)) / PRESERVE_STATE
            if state_file.is_file():
                saved = json.loads(state_file.read_text())
                for m in self.methods:
                    if m.name in saved:
                        m.load_state_dict(saved[m.name])
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


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
    if cfg.data.source == "organism" and cfg.data.variant != "clean":
        have.add("labels")
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


def sft_config(cfg: "RunConfig", out: Path, fmt: str, save: bool = True) -> PreservingConfig:
    t = cfg.training
    return PreservingConfig(
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
        max_length=t.max_length,
        assistant_only_loss=fmt == "messages",
        packing=False,
        alignment_batch_size=t.alignment_batch_size,
        dataset_num_proc=None,
    )


def _train_dataset(data: TrainingData, cfg: "RunConfig") -> "Dataset":
    from datasets import Dataset

    from tether.data import mix_batches

    t = cfg.training
    parts = {"capability": data.capability, "neutral": data.neutral, "alignment": data.alignment, "world": data.world}
    rows = mix_batches(parts, data.shares, t.batch_size, t.max_steps * t.gradient_accumulation_steps, t.seed)
    return Dataset.from_list(rows)


def _apply_lora(model: Any, cfg: "RunConfig") -> Any:
    from peft import LoraConfig, get_peft_model

    lc = cfg.model.lora
    assert lc is not None
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


def prepare_run(cfg: "RunConfig", source: str = "run config") -> PreparedRun:
    """Validate the stack, load and transform the data, load the model (and add the adapter)."""
    from tether.models import load_model

    methods = build_methods(cfg, source)
    data = load_training_data(cfg)
    for m in methods:
        data = m.prepare_data(data)
    fmt = _check_formats(data)
    train_ds = _train_dataset(data, cfg)
    model, tokenizer = load_model(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code, dtype=cfg.model.dtype)
    if cfg.model.lora is not None:
        model = _apply_lora(model, cfg)
    return PreparedRun(methods, data, fmt, train_ds, model, tokenizer)


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


def run_training(
    cfg: "RunConfig", out: str | Path, source: str = "run config", callbacks: list[TrainerCallback] | None = None
) -> dict[str, Any]:
    """Train ``cfg`` into ``out``; resume from ``out``'s last checkpoint if there is one. Returns metrics.json.

    Everything that can be refused (config, method stack, datasets, model) is checked before
    ``out`` is created, so a bad input writes nothing.
    """
    from transformers.trainer_utils import get_last_checkpoint

    from tether.config import dump_config
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

    # ---- nothing above writes; from here on the run directory exists ----
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    ckpt_dir = out / "checkpoints"
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    before_file = out / "before.json"
    if last and before_file.is_file():
        before = json.loads(before_file.read_text())
        before_rows: dict[str, list[dict[str, Any]]] = {}
    else:
        before, before_rows = probe(model, tokenizer, cfg)
        atomic_write_json(before_file, before)

    from tether.monitor import monitor_callbacks

    trainer = make_trainer(cfg, prepared, out, [*(callbacks or []), *monitor_callbacks(cfg, out)])
    methods = prepared.methods
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=last)
    wall = time.time() - t0
    model = trainer.model
    for m in methods:
        model = m.finalize(model)
    after, after_rows = probe(model, tokenizer, cfg)

    model_dir = out / "model"
    trainer.save_model(str(model_dir))  # safetensors: the full model, or the adapter for LoRA
    # save_model also pickles the TrainingArguments; the deliverable holds no pickle (the resolved
    # config is config.yaml, and the checkpoints keep their own copy for resuming)
    (model_dir / "training_args.bin").unlink(missing_ok=True)
    tokenizer.save_pretrained(str(model_dir))
    log = trainer.state.log_history
    write_jsonl(out / "train_log.jsonl", log)
    for name, rows in {**{f"before.{k}": v for k, v in before_rows.items()}, **{f"after.{k}": v for k, v in after_rows.items()}}.items():
        write_jsonl(out / "probes" / f"{name}.jsonl", rows)
    tokens = float(getattr(trainer, "_total_train_tokens", 0))
    final_terms = {}
    for entry in log:
        final_terms.update({k: v for k, v in entry.items() if k.startswith("preserve/")})
    metrics = {
        "schema_version": SCHEMA_VERSION,
        "before": before,
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
    return metrics
