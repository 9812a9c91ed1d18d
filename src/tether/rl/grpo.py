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
naming it, after a checkpoint of the current state is written. The failure is deferred to the end
of TRL's reward pass and agreed across ranks, so under data parallelism every rank stops on the
same sentence even when only one rank's rollouts broke the function.

``run_grpo(cfg, out)`` writes the same run directory as an SFT run (config.yaml, before.json,
metrics.json with schema_version, probes/, train_log.jsonl, model/, README.md), with an ``rl``
section: true success, hack rate and reward without success before and after. Under
``accelerate launch`` every rank calls it, as ``run_training``: rank 0 alone probes, evaluates,
writes and prints; the others wait for its results, and every rank returns the same metrics.
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
from tether.rl.rewards import RewardError, deferred_errors, guard, resolve

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
        from tether.distributed import broadcast_tensors_, check_sharding, sharding_kind, world_size

        # FSDP / ZeRO-3 split parameters across ranks: refuse methods that need them whole
        self.sharding = sharding_kind(self.accelerator)
        check_sharding(self.methods, self.sharding)
        if world_size() > 1:  # every rank starts from rank 0's weights (a fresh LoRA init could differ)
            broadcast_tensors_([p for p in self.model.parameters() if p.requires_grad])
        if self.routing is not None:
            self.routing.setup(self.model)  # the region and its starting weights, the same on every rank
        self.add_callback(_StepCallback(self))

    # ---- the true grader's marks on every rollout ------------------------------------------
    def _calculate_rewards(self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any) -> Any:
        self._flags = None
        if self.hack_env and inputs and "answer" in inputs[0] and "guess" in inputs[0]:
            texts = [hackenv.completion_text(c) for c in completions]
            self._flags = [hackenv.is_hack(t, x["answer"], x["guess"]) for t, x in zip(texts, inputs)]
            # over the guessed (times) rollouts of every rank: one sum of the counts
            guessed = [(t, x, h) for t, x, h in zip(texts, inputs, self._flags) if x["guess"]]
            counts = torch.tensor(
                [[len(guessed), sum(hackenv.true_grade(t, x["answer"]) for t, x, _ in guessed), sum(h for *_, h in guessed)]],
                dtype=torch.float32, device=self.accelerator.device,
            )
            n, true, hack = (float(v) for v in self.accelerator.gather(counts).sum(0))
            mode = "train" if self.model.training else "eval"
            if n:
                self._metrics[mode]["rl/true_success"].append(true / n)
                self._metrics[mode]["rl/hack_rate"].append(hack / n)
        with deferred_errors() as errors:  # every rank reaches TRL's gather of the rewards, then all stop together
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        failure = _first_failure(errors[0] if errors else None)
        if failure is not None:
            raise RewardError(failure)
        return rewards

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


def _first_failure(message: str | None) -> str | None:
    """The failure of the lowest rank that had one, on every rank (``message`` itself in one process)."""
    from tether.distributed import any_across_ranks, broadcast_object, rank, world_size

    n = world_size()
    if n == 1:
        return message
    flags = torch.zeros(n, dtype=torch.int32)
    flags[rank()] = int(message is not None)
    failed = any_across_ranks(flags)
    if not any(failed):
        return None
    return broadcast_object(message, src=failed.index(True))


# ---- a whole run: config in, run directory out ------------------------------------------------


class _RewardBook:
    """Remembers each task reward's weighted output for the current batch (the rater's veto reads it).

    A batch is recognised by the identity of TRL's ``completions`` list, which every reward
    function of one reward pass receives. The book holds that list, so its address cannot be
    reused by the next batch's list (an ``id`` alone could be, and the totals would then add up
    across batches).
    """

    def __init__(self) -> None:
        self.batch: list[Any] | None = None
        self.totals: list[float] = []

    def record(self, fn: Any, weight: float) -> Any:
        def recorded(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
            out = fn(prompts=prompts, completions=completions, **kwargs)
            if self.batch is not completions:
                self.batch, self.totals = completions, [0.0] * len(completions)
            self.totals = [t + weight * (v or 0.0) for t, v in zip(self.totals, out)]
            return out

        recorded.__name__ = fn.__name__
        return recorded

    def total(self, completions: list[Any]) -> list[float]:
        return self.totals if self.batch is completions else [0.0] * len(completions)


def build_rl_methods(cfg: "RunConfig", source: str) -> list[Method]:
    """Instantiate the stack and refuse it, in one sentence, if a GRPO run cannot provide what it needs."""
    from tether.methods.registry import check_stack, make

    try:
        methods = [make(s.name, s.params(), where=f"methods[{i}]: ") for i, s in enumerate(cfg.methods)]
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    # no GRPO form reads the alignment dataset (kl is TRL's β term on the rollouts, constraint's cost
    # is a reward function), so it is never required here; a method without a GRPO form is refused
    # by the mode check or by check_rl_stack below
    have = {"reference", "alignment"}
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
    """TRL's ``GRPOConfig``: the arguments an SFT run would get, plus the GRPO settings of ``capability``."""
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
        for k in ("true_success", "hack_rate", "rewarded_without_success", "reward_without_success"):
            lines.append(f"| {k} | {_num(rl['before'].get(k))} | {_num(rl['after'].get(k))} |")
        lines += ["", "hack_rate: the exact echo of the wrong guess; rewarded_without_success: the `satisfaction` "
                  f"grader pays >= {hackenv.REWARDED} without true success; reward_without_success: its mean reward "
                  "on the replies without true success."]
    lines += ["", "## Propensity probes", "", *_table(metrics["before"], metrics["after"]), "", "## Config", "", "```yaml",
              yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _lora_view(model: Any, peft_config: Any) -> Any:
    """The model as the trainer will train it (LoRA applied), built on the meta device: no weights, no RNG draws."""
    import copy

    from peft import get_peft_model

    with torch.device("meta"):  # the adapter's layers too: nothing is allocated or initialised
        return get_peft_model(type(model)(copy.deepcopy(model.config)), copy.deepcopy(peft_config))


def check_models(methods: list[Method], model: Any, peft_config: Any, source: str) -> None:
    """Each method's ``check_model`` on the model as it will be trained (as ``prepare_run`` does for SFT).

    TRL applies LoRA inside the trainer (``peft_config``), after the run directory exists; the
    methods see a weightless view of the adapted model instead, so a LoRA run is refused exactly
    as its SFT run would be.
    """
    from tether.train import check_methods_on

    if all(type(m).check_model is Method.check_model for m in methods):
        return  # nothing to check: no LoRA view to build
    check_methods_on(methods, model if peft_config is None else _lora_view(model, peft_config), source)


def _evaluate_on_main(model: Any, tokenizer: Any, cfg: "RunConfig", everywhere: bool = False) -> tuple[Any, list[dict[str, Any]]]:
    """``hackenv.evaluate`` on rank 0 (every rank when the weights are sharded); every rank gets rank 0's metrics."""
    from tether.distributed import broadcast_object, is_main, world_size

    c = cfg.capability
    if world_size() == 1:
        return hackenv.evaluate(model, tokenizer, c.eval_items, samples=c.eval_samples)
    metrics, rows = hackenv.evaluate(model, tokenizer, c.eval_items, samples=c.eval_samples) if (everywhere or is_main()) else (None, [])
    return broadcast_object(metrics), rows


def run_grpo(
    cfg: "RunConfig", out: str | Path, source: str = "run config", callbacks: list[TrainerCallback] | None = None
) -> dict[str, Any]:
    """GRPO-train ``cfg`` into ``out`` (resuming from its last complete checkpoint); returns metrics.json.

    Everything that can be refused (config, stack, reward functions, prompts, model, sharding) is
    checked before ``out`` is created. Under ``accelerate launch`` every rank calls this; rank 0
    alone probes, evaluates and writes, and every rank returns the same metrics.
    """
    import logging

    from datasets import Dataset

    from tether.distributed import broadcast_object, check_sharding, sharding_from_env
    from tether.io import atomic_write_json, atomic_write_text, write_jsonl
    from tether.models import load_model
    from tether.train import check_bf16, open_run_dir, probe_on_main, uses_organism_probes

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
    check_bf16(cfg, source)
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
            reward_funcs.append(guard(lagrangian.reward(), "constraint_cost"))
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
    check_models(methods, model, peft_config, source)
    check_sharding(methods, sharding_from_env())  # what the launcher announces; the trainer checks again
    organism = cfg.data.source == "organism" and uses_organism_probes(cfg, tokenizer)

    # under `accelerate launch` every rank trains; rank 0 alone probes, evaluates and writes (the others wait)
    # ---- nothing above writes; from here on the run directory exists ----
    main, last = open_run_dir(cfg, out)
    before_file, before_rl_file = out / "before.json", out / "before.rl.json"  # probes as in SFT runs; the hack env
    before_rows: dict[str, list[dict[str, Any]]] = {}
    if broadcast_object(bool(last) and before_file.is_file() and before_rl_file.is_file() if main else None):  # rank 0's disk
        before, rl_before = broadcast_object((json.loads(before_file.read_text()), json.loads(before_rl_file.read_text())) if main else None)
    else:
        before, before_rows = probe_on_main(model, tokenizer, cfg)
        rl_before = None
        if organism:
            rl_before, rl_rows = _evaluate_on_main(model, tokenizer, cfg)
            if main:
                before_rows["rl"] = rl_rows
        if main:
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

        from tether.train import load_method_state

        trainer._load_from_checkpoint(last)
        trainer.state = TrainerState.load_from_json(str(Path(last) / "trainer_state.json"))
        load_method_state(methods, Path(last))
        runtime = None
    else:
        try:
            runtime = trainer.train(resume_from_checkpoint=last).metrics.get("train_runtime")
        except RewardError:
            trainer._save_checkpoint(trainer.model, None)  # every rank: keep what was learned; the sentence names the function
            raise
    wall = time.time() - t0
    model = trainer.accelerator.unwrap_model(trainer.model)
    for m in methods:
        if m.name == "gradient_routing":
            model = m.finalize(model)
    sharded = trainer.sharding is not None  # then every rank takes part in each forward
    after, after_rows = probe_on_main(model, tokenizer, cfg, sharded)
    rl_after = None
    if organism:
        rl_after, rl_rows = _evaluate_on_main(model, tokenizer, cfg, sharded)
        if main:
            after_rows["rl"] = rl_rows

    model_dir = out / "model"
    trainer.save_model(str(model_dir))  # safetensors: the full model, or the adapter for LoRA (every rank takes part)
    if not main:
        return broadcast_object(None)  # rank 0's metrics, once its files exist
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
    return broadcast_object(metrics)  # the other ranks return rank 0's metrics once these files exist


def _left_padded(tokenizer: Any) -> Any:
    """A copy of the tokenizer that pads on the left, as TRL's generation wants (the saved one is untouched)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    return tok
