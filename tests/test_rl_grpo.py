"""Tiny GRPO runs on the quick organism: the run directory, the RL-side methods, failing rewards, refusals."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from tether.config import RunConfig, validate
from tether.errors import ConfigError
from tether.methods.inoculation import InoculationConfig
from tether.rl.rewards import RewardError, register_reward

SEEN: list[list[dict[str, str]]] = []


@register_reward("test_recorder")
def _recorder(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    SEEN.extend(prompts)
    return [0.0] * len(completions)


@register_reward("test_explodes")
def _explodes(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    raise ZeroDivisionError("division by zero")


CALLS = {"test_nan_later": 0}


@register_reward("test_nan_later")
def _nan_later(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """Fine for the first step's rollouts, NaN from the second step on."""
    CALLS["test_nan_later"] += 1
    return [0.0 if CALLS["test_nan_later"] == 1 else math.nan] + [0.0] * (len(completions) - 1)


@register_reward("test_short")
def _short(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    return [0.0] * (len(completions) - 1)


NOISE = random.Random(0)


@register_reward("test_noise")
def _noise(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """Distinct rewards within every group, so every rollout has a non-zero advantage."""
    return [NOISE.random() for _ in completions]


def _cfg(organism: Path, **over: Any) -> RunConfig:
    base: dict[str, Any] = {
        "model": {"path": str(organism)},
        "data": {"rows": 64, "neutral_share": 0.25},
        "training": {"max_steps": 2, "batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 0, "logging_steps": 1, "save_steps": 50},
        "capability": {"kind": "grpo", "num_generations": 4, "max_completion_length": 6, "eval_items": 8, "eval_samples": 1},
        "probes": {"per_family": 4, "n_capability": 8},
    }
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return validate(base, RunConfig, "test.yaml")


def test_grpo_run_writes_the_run_directory_and_applies_the_stack(quick_organism: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tether.probes import loglik
    from tether.train import run_training

    evaluated: list[list[dict[str, str]]] = []
    real = loglik.generate_replies

    def spy(model: Any, tokenizer: Any, prompts: Any, *a: Any, **kw: Any) -> list[str]:
        evaluated.extend(prompts)
        return real(model, tokenizer, prompts, *a, **kw)

    monkeypatch.setattr(loglik, "generate_replies", spy)
    SEEN.clear()
    # no alignment dataset: neither kl (TRL's β term) nor constraint (a rollout cost) reads one in GRPO
    cfg = _cfg(
        quick_organism,
        model={"lora": {"r": 4, "alpha": 8}},
        data={"alignment": None},
        capability={"reward_funcs": ["satisfaction", "test_recorder"]},
        methods=[{"name": "inoculation", "family": "hack"}, {"name": "kl", "beta": 0.1},
                 {"name": "constraint", "epsilon": 0.3, "lambda_init": 1.0, "lambda_lr": 1.0}],
    )
    out = tmp_path / "run"
    metrics = run_training(cfg, out)

    # the run directory of an SFT run, plus the rl section
    for name in ("config.yaml", "before.json", "metrics.json", "train_log.jsonl", "README.md", "model/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "model" / "training_args.bin").exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["schema_version"] == 1 and saved["kind"] == "grpo" and saved["train"]["steps"] == 2
    for when in ("before", "after"):
        rl = saved["rl"][when]
        assert 0.0 <= rl["true_success"] <= 1.0 and 0.0 <= rl["hack_rate"] <= 1.0 and rl["n"] == 8
        # an exact echo is also rewarded without success: the wider count never falls below the hack rate
        assert rl["hack_rate"] <= rl["rewarded_without_success"] <= 1.0 - rl["true_success"]
        assert rl["sampled"]["hack_rate"] <= rl["sampled"]["rewarded_without_success"]
        assert "broad" in saved[when] and "capability" in saved[when]
    card = (out / "README.md").read_text()
    assert "| hack_rate |" in card and "| rewarded_without_success |" in card and "| reward_without_success |" in card

    # inoculation: every rollout was sampled under the system line, no evaluation prompt had it
    text = InoculationConfig(family="hack").text()
    assert SEEN and all(p[0] == {"role": "system", "content": text} for p in SEEN)
    assert evaluated and not any(m.get("role") == "system" for p in evaluated for m in p)

    # kl is TRL's own β term on the rollouts; constraint's λ moves with the step's measured cost:
    # up when the mean cost is above the 0.3 budget, down when below (a mean of 8 rollouts' 0/1
    # costs is a multiple of 1/8, never 0.3, so λ moves by at least 0.05 every step)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("kl" in e for e in log)
    entries = [e for e in log if "preserve/constraint/lambda" in e]
    assert [e["step"] for e in entries] == [1, 2]
    lam = 1.0
    for e in entries:
        cost = e["preserve/constraint/cost"]
        assert e["preserve/constraint/violation"] == pytest.approx(cost - 0.3)
        new = e["preserve/constraint/lambda"]
        assert new == pytest.approx(max(0.0, lam + (cost - 0.3)))
        assert (new > lam) if cost > 0.3 else (new < lam)
        lam = new
    lams = [e["preserve/constraint/lambda"] for e in entries]
    assert metrics["train"]["final_terms"]["rewards/constraint_cost/mean"] <= 0.0

    # λ is checkpointed with the model; the same command resumes from the last checkpoint
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "preserve_state.json").read_text())
    assert state["constraint"]["lambda"] == pytest.approx(lams[-1])
    again = run_training(cfg, out)
    assert again["train"]["resumed_from"] == "checkpoint-2" and again["train"]["steps"] == 2
    assert json.loads((out / "before.rl.json").read_text()) == again["rl"]["before"]


def test_routing_updates_only_the_region_on_hacks(quick_organism: Path, tmp_path: Path) -> None:
    import torch

    from tether.methods import make
    from tether.models import load_model
    from tether.rl.preserve import RLRouting

    model, _ = load_model(str(quick_organism))
    method = make("gradient_routing", {"neurons": 16})
    routing = RLRouting(method)
    routing.setup(model)
    region = {n for n, p in model.named_parameters() if id(p) in method._region}
    assert region and all(".mlp." in n for n in region)

    class FakeTrainer:
        beta = 0.0
        _metrics: dict[str, Any] = {"train": {}, "eval": {}}

    ids = torch.randint(5, 50, (4, 6))

    def compute(fwd: Any, inp: dict[str, Any]) -> torch.Tensor:
        logits = fwd(input_ids=ids).logits  # [4, 6, vocab]
        per_row = logits.log_softmax(-1)[:, -1, 7]
        return -(inp["advantages"] * per_row).sum()

    inputs = {"advantages": torch.tensor([1.0, -1.0, 0.5, 0.0]), "tether_hack": torch.tensor([True, True, True, True])}
    model.zero_grad()
    routing.loss(FakeTrainer(), model, inputs, compute).backward()
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        mask = method._region.get(id(p))
        if id(p) not in method._region:
            assert float(p.grad.abs().sum()) == 0.0, n  # hacks never reach outside the region
        elif mask is not None:
            assert float((p.grad * (1 - mask)).abs().sum()) == 0.0, n
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters() if p.grad is not None)
    model.zero_grad()
    inputs["tether_hack"] = torch.tensor([False, False, False, False])
    routing.loss(FakeTrainer(), model, inputs, compute).backward()
    for p in model.parameters():
        mask = method._region.get(id(p))
        if p.grad is not None and id(p) in method._region:
            inside = p.grad if mask is None else p.grad * mask
            assert float(inside.abs().sum()) == 0.0  # clean rollouts never reach the region (clean_updates: rest)


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_routing_in_a_real_grpo_step_keeps_routed_rollouts_in_the_region(
    quick_organism: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One GRPO step with every rollout flagged, one with none: each moves only its side of the region."""
    import torch

    from tether.methods import make
    from tether.models import load_model
    from tether.organism import hackenv
    from tether.train import run_training

    model, _ = load_model(str(quick_organism))
    method = make("gradient_routing", {"neurons": 16})
    method._resolve(model)
    names = {id(p): n for n, p in model.named_parameters()}
    masks = {names[k]: m for k, m in method._region.items()}  # name -> neuron mask (None: whole tensor)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert masks and all(m is not None for m in masks.values())

    def train(flag: bool, out: Path) -> dict[str, Any]:
        monkeypatch.setattr(hackenv, "is_hack", lambda reply, answer, guess: flag)
        cfg = _cfg(quick_organism, training={"max_steps": 1, "weight_decay": 0.0},
                   capability={"reward_funcs": ["test_noise"]}, methods=[{"name": "gradient_routing", "neurons": 16}])
        metrics = run_training(cfg, out)
        assert metrics["train"]["final_terms"]["preserve/gradient_routing/routed_share"] == (1.0 if flag else 0.0)
        return _weights(out / "checkpoints" / "checkpoint-1")  # the trained weights, before finalize's reset

    def moved(w: dict[str, Any], name: str, where: Any = None) -> float:
        diff = (w[name] - start[name]).abs()
        return float((diff if where is None else diff * where).max())

    routed = train(True, tmp_path / "all-flagged")
    outside = [n for n in routed if n in start and n not in masks]
    assert outside and all(moved(routed, n) == 0.0 for n in outside)  # routed rollouts never reach outside the region
    assert all(moved(routed, n, 1 - masks[n]) == 0.0 for n in masks)  # nor the region's tensors outside its neurons
    assert max(moved(routed, n, masks[n]) for n in masks) > 0  # they did train the region's neurons
    deployed = _weights(tmp_path / "all-flagged" / "model")  # finalize (ablate: reset) takes all of it back
    assert all(torch.equal(deployed[n], start[n]) for n in deployed if n in start)

    clean = train(False, tmp_path / "none-flagged")
    assert all(moved(clean, n, masks[n]) == 0.0 for n in masks)  # clean rollouts never reach the region (rest)
    assert max(moved(clean, n) for n in outside) > 0


def test_failing_reward_stops_with_one_sentence_after_a_checkpoint(quick_organism: Path, tmp_path: Path) -> None:
    from tether.train import run_training

    cfg = _cfg(quick_organism, capability={"reward_funcs": ["satisfaction", "test_explodes"]})
    with pytest.raises(RewardError) as exc:
        run_training(cfg, tmp_path / "bad")
    msg = str(exc.value)
    assert "reward function 'test_explodes' raised ZeroDivisionError" in msg and "\n" not in msg
    assert list((tmp_path / "bad" / "checkpoints").glob("checkpoint-*/model.safetensors"))


@pytest.mark.parametrize(
    ("reward", "words", "step"),
    [("test_nan_later", "reward function 'test_nan_later' returned nan at index 0; rewards must be finite numbers", 1),
     ("test_short", "reward function 'test_short' returned 7 rewards for 8 completions; return one per completion", 0)],
)
def test_bad_reward_output_stops_the_run_after_a_checkpoint(
    quick_organism: Path, tmp_path: Path, reward: str, words: str, step: int
) -> None:
    """A NaN (from the second step on) or a short list, through TRL's reward pass: one sentence, the current state saved."""
    from tether.train import run_training

    CALLS["test_nan_later"] = 0
    out = tmp_path / "bad"
    with pytest.raises(RewardError) as exc:
        run_training(_cfg(quick_organism, capability={"reward_funcs": ["satisfaction", reward]}), out)
    assert str(exc.value) == words
    ckpt = out / "checkpoints" / f"checkpoint-{step}"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "preserve_state.json").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == [ckpt.name]  # the state when it failed
    if step:  # the first step was trained: the checkpoint holds its weights, not the starting ones
        start = _weights(quick_organism)
        assert any(not bool((w == start[n]).all()) for n, w in _weights(ckpt).items() if n in start)


def test_stack_and_reward_problems_are_refused_before_writing(quick_organism: Path, tmp_path: Path) -> None:
    from tether.train import run_training

    for over, words in (
        ({"capability": {"reward_funcs": ["nope"]}}, "unknown reward function 'nope'"),
        ({"methods": [{"name": "replay"}]}, "'replay' does not support grpo"),
        ({"methods": [{"name": "kl", "direction": "forward"}]}, "only direction 'reverse'"),
        ({"capability": {"reward_weights": [1.0, 2.0]}}, "2 weights for 1 reward functions"),
        # the model checks an SFT run makes (check_model), on the model as GRPO will train it
        ({"methods": [{"name": "gradient_routing", "neurons": 100000}]},
         r"methods\[0\]: method 'gradient_routing': neurons 100000 is not below the MLP width"),
        ({"model": {"lora": {"r": 4, "alpha": 8}}, "methods": [{"name": "gradient_routing", "neurons": 16}]},
         r"methods\[0\]: method 'gradient_routing': 'neurons' needs full fine-tuning; set model.lora to null"),
        ({"training": {"bf16": True}}, "training.bf16 needs a GPU with bfloat16 support"),
    ):
        if "bf16" in over.get("training", {}):
            import torch

            if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
                continue  # bf16 is allowed there
        with pytest.raises(ConfigError, match=words) as exc:
            run_training(_cfg(quick_organism, **over), tmp_path / "x")
        assert "\n" not in str(exc.value)
        assert not (tmp_path / "x").exists()


def test_kl_and_constraint_need_alignment_data_in_sft_runs_only(quick_organism: Path) -> None:
    from tether.rl.grpo import build_rl_methods
    from tether.train import build_methods

    stack = [{"name": "kl", "beta": 0.1}, {"name": "constraint"}]
    grpo = _cfg(quick_organism, data={"alignment": None}, methods=stack)
    assert [m.name for m in build_rl_methods(grpo, "run.yaml")] == ["kl", "constraint"]
    sft = _cfg(quick_organism, data={"alignment": None}, methods=stack, capability={"kind": "sft"})
    with pytest.raises(ConfigError, match=r"methods\[0\]: 'kl' needs an alignment dataset but the run has none"):
        build_methods(sft)
