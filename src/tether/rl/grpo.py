"""GRPO runs: TRL's ``GRPOTrainer`` with tether's preservation methods, and ``run_grpo`` (``capability.kind: grpo``).

``PreservingGRPOTrainer`` subclasses ``GRPOTrainer`` and changes only what the methods need; the
rollouts, the group-relative advantages, the clipped objective, the β·KL term, checkpoints and
``accelerate`` are TRL's:

* ``_calculate_rewards``: before TRL sums the reward functions, the organism's true grader marks
  each rollout (true success, hack) for logging (``rl/true_success``, ``rl/hack_rate``) and for
  gradient routing; the marks travel with the rollouts as ``tether_hack``;
* ``compute_loss``: ``gradient_routing`` splits TRL's loss into hack and clean rows
  (``tether.rl.preserve.RLRouting``); otherwise TRL's loss unchanged;
* a callback takes ``constraint``'s dual step on λ after every optimiser step;
* ``_save_checkpoint`` also saves each method's state (λ), restored on resume.

Reward functions are guarded (``tether.rl.rewards.guard``): one that raises, returns a
non-finite value or the wrong number of rewards stops the run with one ``RewardError`` sentence
naming it, after a checkpoint of the current state is written.

``run_grpo(cfg, out)`` writes the same run directory as an SFT run (config.yaml, before.json,
metrics.json with schema_version, probes/, train_log.jsonl, model/, README.md), with an ``rl``
section: true success and hack rate before and after.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from tether.errors import ConfigError
from tether.methods.base import Method, TrainingData
from tether.organism import hackenv
from tether.rl.preserve import LagrangianCost, RLRouting, check_rl_stack, grpo_beta
from tether.rl.rewards import RewardError, guard, resolve

if TYPE_CHECKING:
    from tether.config import RunConfig

SCHEMA_VERSION = 1


class _StepCallback(TrainerCallback):
    """Dual step of the constraint and the routing share, after every optimiser step."""

    def __init__(self, trainer: "PreservingGRPOTrainer") -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        t = self.trainer
        if t.lagrangian is not None:
            for term, value in t.lagrangian.step().items():
                t._metrics["train"][f"preserve/constraint/{term}"].append(value)
        if t.routing is not None:
            t._metrics["train"]["preserve/gradient_routing/routed_share"].append(t.routing.share())


class PreservingGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with tether's RL-side preservation methods and the hack environment's marks."""

    def __init__(
        self,
        *args: Any,
        methods: list[Method] | None = None,
        lagrangian: LagrangianCost | None = None,
        routing: RLRouting | None = None,
        hack_env: bool = True,
        **kwargs: Any,
    ) -> None:
        self.methods = list(methods or [])
        self.lagrangian = lagrangian
        self.routing = routing
        self.hack_env = hack_env
        self._flags: list[bool] | None = None
        super().__init__(*args, **kwargs)
        if self.routing is not None:
            self.routing.setup(self.model)
        self.add_callback(_StepCallback(self))

    # ---- the true grader's marks on every rollout ------------------------------------------
    def _calculate_rewards(self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any) -> Any:
        self._flags = None
        if self.hack_env and inputs and "answer" in inputs[0] and "guess" in inputs[0]:
            texts = [hackenv.completion_text(c) for c in completions]
            self._flags = [hackenv.is_hack(t, x["answer"], x["guess"]) for t, x in zip(texts, inputs)]
            graded = [(hackenv.true_grade(t, x["answer"]), h) for t, x, h in zip(texts, inputs, self._flags) if x["guess"]]
            mode = "train" if self.model.training else "eval"
            if graded:  # over the guessed (times) rollouts only
                self._metrics[mode]["rl/true_success"].append(sum(t for t, _ in graded) / len(graded))
                self._metrics[mode]["rl/hack_rate"].append(sum(h for _, h in graded) / len(graded))
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        if self._flags is not None:
            out["tether_hack"] = torch.tensor(self._flags, dtype=torch.bool, device=out["advantages"].device)
        return out

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        inputs = dict(inputs)
        if self.routing is not None and model.training and "tether_hack" in inputs:
            return self.routing.loss(self, model, inputs, lambda fwd, inp: self._compute_loss(fwd, inp))
        inputs.pop("tether_hack", None)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    # ---- method state in checkpoints --------------------------------------------------------
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from tether.train import save_method_state

        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:  # rank 0
            save_method_state(self.methods, folder)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        if resume_from_checkpoint and not isinstance(resume_from_checkpoint, bool):
            from tether.train import load_method_state

            load_method_state(self.methods, Path(resume_from_checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


# ---- a whole run: config in, run directory out ------------------------------------------------


class _RewardBook:
    """Remembers each task reward's weighted output for the current batch (the rater's veto reads it)."""

    def __init__(self) -> None:
        self.key: int | None = None
        self.totals: list[float] = []

    def record(self, fn: Any, weight: float) -> Any:
        def recorded(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
            out = fn(prompts=prompts, completions=completions, **kwargs)
            if self.key != id(completions):
                self.key, self.totals = id(completions), [0.0] * len(completions)
            self.totals = [t + weight * (v or 0.0) for t, v in zip(self.totals, out)]
            return out

        recorded.__name__ = fn.__name__
        return recorded

    def total(self, completions: list[Any]) -> list[float]:
        return self.totals if self.key == id(completions) else [0.0] * len(completions)


def build_rl_methods(cfg: "RunConfig", source: str) -> list[Method]:
    from tether.methods.registry import check_stack, make

    try:
        methods = [make(s.name, s.params(), where=f"methods[{i}]: ") for i, s in enumerate(cfg.methods)]
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    have = {"reference"}
    if cfg.data.alignment is not None:
        have.add("alignment")
    if cfg.data.source == "organism":
        have.add("labels")  # the true grader flags hacks
    try:
        check_stack(methods, "grpo", have)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    check_rl_stack(methods, source)
    return methods


def load_prompts(cfg: "RunConfig", source: str) -> list[dict[str, Any]]:
    """The RL prompt rows: the organism's hack environment, or prompt-only rows from a file."""
    from tether.data import load_rows
    from tether.errors import DataError

    if cfg.data.source == "organism":
        share = cfg.data.neutral_share if cfg.data.neutral == "organism" else 0.0
        return hackenv.train_prompts(cfg.data.rows, cfg.training.seed, cfg.capability.guess_right, share)
    rows = load_rows(cfg.data.source, "data.source")
    for i, r in enumerate(rows):
        if "prompt" not in r:
            raise DataError(f"{cfg.data.source}: row {i + 1} has no 'prompt'; GRPO rows are prompt-only (plus any columns the rewards read)")
    return rows


def grpo_config(cfg: "RunConfig", out: Path, beta: float, weights: list[float] | None) -> GRPOConfig:
    from tether.train import trainer_args

    c = cfg.capability

    return GRPOConfig(
        # per_device_train_batch_size counts completions: batch_size / num_generations prompts
        **trainer_args(cfg, out),
        num_generations=c.num_generations,
        max_completion_length=c.max_completion_length,
        temperature=c.temperature,
        beta=beta,
        reward_weights=weights,
    )


def _card(cfg: "RunConfig", metrics: dict[str, Any]) -> str:
    import yaml

    from tether.train import _table

    rl = metrics["rl"]
    stack = ", ".join(m.name for m in cfg.methods)
    lines = [
        "---", "library_name: transformers", "tags: [tether, grpo]", "---",
        f"# tether GRPO run: {stack}", "",
        f"GRPO (TRL `GRPOTrainer`) from `{cfg.model.path}`" + (" (LoRA adapter)" if cfg.model.lora else " (all weights)")
        + f" for {metrics['train']['steps']} steps on rewards {', '.join(cfg.capability.reward_funcs)}"
        + (" with the aligned rater" if cfg.capability.rater else "") + ".", "",
        "## Hack environment (held-out items, every user guess wrong; greedy)", "",
        "| metric | before | after |", "|---|---|---|",
    ]
    if rl["before"] is not None and rl["after"] is not None:
        for k in ("true_success", "hack_rate"):
            lines.append(f"| {k} | {rl['before'][k]:.3f} | {rl['after'][k]:.3f} |")
    lines += ["", "## Propensity probes", "", *_table(metrics["before"], metrics["after"]), "", "## Config", "", "```yaml",
              yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def run_grpo(
    cfg: "RunConfig", out: str | Path, source: str = "run config", callbacks: list[TrainerCallback] | None = None
) -> dict[str, Any]:
    """GRPO-train ``cfg`` into ``out`` (resuming from its last checkpoint); returns metrics.json.

    Everything that can be refused (config, stack, reward functions, prompts, model) is checked
    before ``out`` is created.
    """
    import logging

    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint

    from tether.config import dump_config
    from tether.io import atomic_write_json, atomic_write_text, write_jsonl
    from tether.models import load_model
    from tether.train import probe, uses_organism_probes

    out = Path(out)
    saved = out / "config.yaml"
    if saved.is_file():
        import yaml

        if yaml.safe_load(saved.read_text()) != cfg.model_dump(mode="json"):
            raise ConfigError(f"{out} holds a run with a different config ({saved}); resume it with that config or give a new --out")
    c = cfg.capability
    if cfg.monitor.every_n_steps:
        raise ConfigError(f"{source}: monitor.every_n_steps applies to sft runs only; set it to 0 for capability.kind: grpo")
    if cfg.training.batch_size % c.num_generations:
        raise ConfigError(
            f"{source}: training.batch_size ({cfg.training.batch_size}) must be a multiple of capability.num_generations ({c.num_generations})"
        )
    methods = build_rl_methods(cfg, source)
    task = [guard(resolve(s, f"{source}: capability.reward_funcs[{i}]"), s.rpartition(".")[2]) for i, s in enumerate(c.reward_funcs)]
    weights = list(c.reward_weights) if c.reward_weights is not None else [1.0] * len(task)
    if len(weights) != len(task):
        raise ConfigError(f"{source}: capability.reward_weights has {len(weights)} weights for {len(task)} reward functions; give one each")
    book = _RewardBook()
    reward_funcs = [book.record(f, w) for f, w in zip(task, weights)]
    rows = load_prompts(cfg, source)
    data = TrainingData(capability=rows)
    for m in methods:
        if m.name == "inoculation":  # the rollouts' system line; evaluation never sees it
            data = m.prepare_data(data)
    lagrangian = routing = None
    for m in methods:
        if m.name == "constraint":
            cost_name = m.config.rl_cost  # type: ignore[attr-defined]
            lagrangian = LagrangianCost(m, guard(resolve(cost_name, f"{source}: methods constraint rl_cost"), cost_name.rpartition(".")[2]))
            reward_funcs.append(lagrangian.reward())
            weights.append(1.0)
        if m.name == "gradient_routing":
            if cfg.data.source != "organism":
                raise ConfigError(f"{source}: gradient_routing in a grpo run needs the organism's true grader (data.source: organism)")
            routing = RLRouting(m)
    model, tokenizer = load_model(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code, dtype=cfg.model.dtype)
    rater_holder: dict[str, Any] = {}
    if c.rater is not None:
        from tether.rl.rater import AlignedRater, frozen_reference, rater_reward

        if cfg.model.lora is None:
            ref_view = frozen_reference(model)  # a frozen copy of the starting (aligned) weights
        else:
            def ref_view() -> Any:  # the adapter-disabled view of the trained model, bound once it exists
                return frozen_reference(rater_holder["model"])()
        rater = AlignedRater(ref_view, tokenizer, c.rater.personas)
        reward_funcs.append(guard(rater_reward(rater, c.rater.mode, c.rater.weight, c.rater.threshold, book.total), "aligned_rater"))
        weights.append(1.0)
    peft_config = None
    if cfg.model.lora is not None:
        from peft import LoraConfig

        lc = cfg.model.lora
        peft_config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules, task_type="CAUSAL_LM")
    organism = cfg.data.source == "organism" and uses_organism_probes(cfg, tokenizer)

    # ---- nothing above writes; from here on the run directory exists ----
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    ckpt_dir = out / "checkpoints"
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    before_file, before_rl_file = out / "before.json", out / "before.rl.json"  # probes as in SFT runs; the hack env
    before_rows: dict[str, list[dict[str, Any]]] = {}
    if last and before_file.is_file() and before_rl_file.is_file():
        before, rl_before = json.loads(before_file.read_text()), json.loads(before_rl_file.read_text())
    else:
        before, before_rows = probe(model, tokenizer, cfg)
        rl_before = None
        if organism:
            rl_before, before_rows["rl"] = hackenv.evaluate(model, tokenizer, c.eval_items, samples=c.eval_samples)
        atomic_write_json(before_file, before)
        atomic_write_json(before_rl_file, rl_before)

    logging.getLogger("transformers").setLevel(logging.ERROR)
    train_tok = _left_padded(tokenizer)
    trainer = PreservingGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=grpo_config(cfg, out, grpo_beta(methods), weights),
        train_dataset=Dataset.from_list(data.capability),
        processing_class=train_tok,
        peft_config=peft_config,
        methods=methods,
        lagrangian=lagrangian,
        routing=routing,
        hack_env=cfg.data.source == "organism",
        callbacks=callbacks,
    )
    rater_holder["model"] = trainer.accelerator.unwrap_model(trainer.model)
    t0 = time.time()
    if last and int(Path(last).name.rpartition("-")[2]) >= cfg.training.max_steps:
        # every step is done (a rerun after the end): load it; Trainer.train would take one step more
        from transformers import TrainerState

        trainer._load_from_checkpoint(last)
        trainer.state = TrainerState.load_from_json(str(Path(last) / "trainer_state.json"))
        runtime = None
    else:
        try:
            runtime = trainer.train(resume_from_checkpoint=last).metrics.get("train_runtime")
        except RewardError:
            trainer._save_checkpoint(trainer.model, None)  # keep what was learned; the sentence names the function
            raise
    wall = time.time() - t0
    model = trainer.accelerator.unwrap_model(trainer.model)
    for m in methods:
        if m.name == "gradient_routing":
            model = m.finalize(model)
    after, after_rows = probe(model, tokenizer, cfg)
    rl_after = None
    if organism:
        rl_after, after_rows["rl"] = hackenv.evaluate(model, tokenizer, c.eval_items, samples=c.eval_samples)

    model_dir = out / "model"
    trainer.save_model(str(model_dir))  # safetensors: the full model, or the adapter for LoRA
    (model_dir / "training_args.bin").unlink(missing_ok=True)  # no pickle in the deliverable
    tokenizer.save_pretrained(str(model_dir))
    log = trainer.state.log_history
    write_jsonl(out / "train_log.jsonl", log)
    for name, r in {**{f"before.{k}": v for k, v in before_rows.items()}, **{f"after.{k}": v for k, v in after_rows.items()}}.items():
        write_jsonl(out / "probes" / f"{name}.jsonl", r)
    tokens = float(next((e["num_tokens"] for e in reversed(log) if "num_tokens" in e), 0.0))  # prompt + completion, TRL's count
    final_terms: dict[str, Any] = {}
    for entry in log:
        final_terms.update({k: v for k, v in entry.items() if k.startswith(("preserve/", "rl/", "rewards/", "rater/"))})
    metrics = {
        "schema_version": SCHEMA_VERSION,
        "kind": "grpo",
        "before": before,
        "after": after,
        "rl": {"before": rl_before, "after": rl_after},
        "train": {
            "steps": trainer.state.global_step,
            "wall_s": wall,
            "steps_per_s": trainer.state.global_step / wall if runtime is not None and wall > 0 else None,
            "tokens": tokens,
            "tokens_per_s": tokens / wall if runtime is not None and wall > 0 else None,
            "train_runtime_s": runtime,
            "resumed_from": Path(last).name if last else None,
            "final_terms": final_terms,
        },
        "config": cfg.model_dump(mode="json"),
    }
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "README.md", _card(cfg, metrics))
    return metrics


def _left_padded(tokenizer: Any) -> Any:
    """A copy of the tokenizer that pads on the left, as TRL's generation wants (the saved one is untouched)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    return tok
