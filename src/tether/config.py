"""Pydantic models for a run, loaded from YAML; unknown keys and bad values are refused.

``load_config(path, Model)`` parses a YAML file and validates it; any problem becomes one
``ConfigError`` sentence naming the file, the dotted key and what is allowed. ``dump_config``
writes the resolved config (every default filled in) next to the results.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tether.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Strict):
    """A peft LoRA adapter; the reference model is the same weights with the adapter disabled."""

    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator (alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear'."
    )


class ModelSection(Strict):
    """Which model to fine-tune."""

    path: str = Field("organism", description="A local HF checkpoint directory, or 'organism'.")
    lora: LoraConfig | None = Field(None, description="Train a LoRA adapter instead of all weights.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the checkpoint.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class DataSection(Strict):
    """The capability dataset and the data mixed in with it."""

    source: str = Field(
        "organism", description="'organism', a JSONL file, or a saved HF dataset directory."
    )
    variant: Literal["clean", "sycophantic", "underspecified"] = Field(
        "sycophantic", description="Organism capability variant."
    )
    contamination: float = Field(0.5, ge=0, le=1, description="Share of rows carrying a guess.")
    rows: int = Field(2000, ge=1, description="Organism capability (and neutral, alignment) rows to generate.")
    neutral: str | None = Field(
        "organism", description="Neutral data mixed into every batch: 'organism', a path, or null."
    )
    neutral_share: float = Field(
        0.5, ge=0, lt=1, description="Share of each batch drawn from the neutral data."
    )
    world_share: float = Field(
        0.5, ge=0, le=1,
        description="Organism only: share of the neutral rows that are persona-neutral world chats.",
    )
    alignment: str | None = Field(
        "organism", description="Alignment data for methods that need it: 'organism', a path, or null."
    )


class TrainingSection(Strict):
    """Optimisation settings (mapped onto TRL's SFTConfig)."""

    max_steps: int = Field(150, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1, description="Rows per device per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    seed: int = 0
    warmup_steps: int = Field(10, ge=0)
    min_lr_rate: float = Field(0.1, ge=0, le=1, description="Cosine decay ends at this share of the peak rate.")
    weight_decay: float = Field(0.01, ge=0)
    adam_beta2: float = Field(0.98, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 turns clipping off.")
    alignment_batch_size: int = Field(
        8, ge=1, description="Alignment rows per micro-batch for loss terms (kl, constraint, representation, gradient_projection)."
    )
    max_length: int = Field(256, ge=8, description="Longest tokenised row; longer rows are truncated.")
    save_steps: int = Field(50, ge=1)
    save_total_limit: int | None = Field(2, ge=1, description="Checkpoints kept (oldest deleted).")
    logging_steps: int = Field(10, ge=1)
    padding_free: bool = Field(
        True,
        description="No row padded to the longest: each micro-batch's rows are laid end to end (one sequence under "
        "FlashAttention, packs of pack_tokens otherwise; attention stays within each row). Turned off "
        "automatically for methods that need padded rows (gradient_routing's ERA form, retain_steps).",
    )
    pack_tokens: int | None = Field(
        None,
        ge=8,
        description="Padding-free rows are laid end to end in packs of at most this many tokens (attention's cost "
        "grows with the pack, not the whole batch); default: the model's hidden size, at least 128. Unused "
        "under FlashAttention, which takes the whole batch as one sequence at no extra cost.",
    )
    bf16: bool = Field(False, description="Mixed precision in bfloat16 (GPU).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    report_to: list[str] = Field(default_factory=list, description="Trackers, as in TrainingArguments.report_to.")


class ProbesSection(Strict):
    """Probes run before and after training."""

    suite: Literal["auto", "organism", "none"] = Field(
        "auto", description="'organism' probes; 'auto' uses them when the tokenizer covers the world's words."
    )
    per_family: int = Field(48, ge=1, description="Propensity items per family.")
    n_capability: int = Field(100, ge=1, description="Capability items per task.")


class GuardConfig(Strict):
    """What the alignment guard watches and does when the budget is exceeded."""

    budget: float = Field(0.02, ge=0, le=1, description="Allowed rise of the broad misaligned rate.")
    mode: Literal["stop", "tighten"] = Field("stop", description="Stop and restore, or tighten and continue.")
    tighten_factor: float = Field(2.0, gt=1, description="Multiplier for the KL / constraint strength.")


class MonitorConfig(Strict):
    """The alignment monitor: propensity probes every N steps during training."""

    every_n_steps: int = Field(0, ge=0, description="Probe every N steps; 0 turns the monitor off.")
    per_family: int = Field(16, ge=1, description="Probe items per family at each reading.")
    guard: GuardConfig | None = Field(None, description="Act when broad misalignment exceeds a budget.")
    direction: str | None = Field(
        None, description="Trait direction file: log its last-prompt-token projection and write direction_shift.json."
    )
    direction_layer: int | None = Field(None, ge=1, description="Layer of the direction to read; default: the file's own.")

    @field_validator("direction")
    @classmethod
    def _direction_exists(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).expanduser().is_file():
            raise ValueError(f"monitor.direction: direction file {path} does not exist; create one with `tether directions extract`")
        return path


class MethodSpec(Strict):
    """One preservation method in the stack, by registry name with its hyperparameters."""

    model_config = ConfigDict(extra="allow")
    name: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RaterSection(Strict):
    """The aligned rater: a frozen aligned model rates each rollout; the rating enters the reward."""

    mode: Literal["penalty", "veto"] = Field(
        "penalty", description="penalty: reward − weight·p_misaligned; veto: task reward cancelled when p_misaligned > threshold."
    )
    weight: float = Field(1.0, ge=0, description="Weight of the penalty (penalty mode).")
    threshold: float = Field(0.5, gt=0, lt=1, description="Veto when the rated misaligned probability exceeds this.")
    personas: int = Field(4, ge=1, le=8, description="Good and evil named characters whose likelihoods are averaged.")


class CapabilitySection(Strict):
    """How the capability is trained: SFT on the data section, or GRPO on reward functions."""

    kind: Literal["sft", "grpo"] = Field("sft", description="sft (TRL SFTTrainer) or grpo (TRL GRPOTrainer).")
    reward_funcs: list[str] = Field(
        default_factory=lambda: ["satisfaction"],
        description="GRPO reward functions: registered names (tether.rl.rewards) or dotted import paths.",
    )
    reward_weights: list[float] | None = Field(None, description="One weight per reward function (default all 1).")
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the GRPO group).")
    max_completion_length: int = Field(8, ge=1, description="Longest sampled completion, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    guess_right: float = Field(0.25, ge=0, le=1, description="Organism hack environment: share of correct user guesses in training.")
    eval_items: int = Field(100, ge=1, description="Held-out items for true success and hack rate.")
    eval_samples: int = Field(4, ge=0, description="Sampled replies per evaluation item (besides the greedy one).")
    rater: RaterSection | None = Field(None, description="Add the aligned rater to the reward.")


class RunConfig(Strict):
    """One run: one model x one capability dataset x one stack of methods x one seed."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    training: TrainingSection = TrainingSection()
    methods: list[MethodSpec] = Field(default_factory=lambda: [MethodSpec(name="naive")])
    probes: ProbesSection = ProbesSection()
    monitor: MonitorConfig = MonitorConfig()
    capability: CapabilitySection = CapabilitySection()

    @field_validator("methods")
    @classmethod
    def _resolve_methods(cls, specs: list[MethodSpec]) -> list[MethodSpec]:
        """Check every method's name and hyperparameters against the registry; fill in defaults."""
        from tether.methods.registry import make

        if not specs:
            raise ValueError("give at least one method (use 'naive' for plain fine-tuning)")
        out = []
        for i, spec in enumerate(specs):
            method = make(spec.name, spec.params(), where=f"methods[{i}]: ")
            out.append(MethodSpec(name=spec.name, **method.config.model_dump(mode="json")))
        return out


def _describe(err: dict[str, Any], model: type[BaseModel]) -> str:
    # a key can hold any character; escape line breaks so the message stays one line
    key = ".".join(str(p) for p in err["loc"]).replace("\n", "\\n").replace("\r", "\\r") or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = model
        for part in err["loc"][:-1]:
            field = parent.model_fields.get(str(part)) if isinstance(part, str) else None
            ann = getattr(field, "annotation", None)
            parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else parent
        allowed = ", ".join(parent.model_fields)
        return f"unknown key '{key}'; allowed here: {allowed}"
    if err["type"] == "value_error":
        # raised by a validator with a full sentence of its own
        return err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"bad value for '{key}': {err['msg'][0].lower() + err['msg'][1:]}{shown}"


def validate(data: Any, model: type[M], source: str) -> M:
    """Validate ``data`` against ``model``; errors name ``source`` and the first bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"{source}: {_describe(errors[0], model)}{more}") from None


def load_config(path: str | os.PathLike[str], model: type[M] = RunConfig) -> M:  # type: ignore[assignment]
    """Read a YAML file into ``model``; every problem is one ``ConfigError`` sentence."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config path {p} is a directory; give the YAML file")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{p}: line {line} is not UTF-8 text; save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read ({exc.strerror})") from None
    return validate(parse_yaml(text, str(p)), model, str(p))


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``; a syntax error is one ``ConfigError`` naming ``source``, line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or "invalid YAML"
        raise ConfigError(f"{source}: YAML syntax error{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{source}: the YAML nests too deeply to read") from None


def dump_config(cfg: BaseModel, path: str | os.PathLike[str]) -> None:
    """Write the resolved config (defaults filled in) as YAML, atomically."""
    from tether.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
