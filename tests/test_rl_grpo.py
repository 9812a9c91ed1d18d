"""Tiny GRPO runs on the quick organism: the run directory, the RL-side methods, and a failing reward."""

from __future__ import annotations

import json
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
    cfg = _cfg(
        quick_organism,
        model={"lora": {"r": 4, "alpha": 8}},
        capability={"reward_funcs": ["satisfaction", "test_recorder"]},
        methods=[{"name": "inoculation", "family": "hack"}, {"name": "kl", "beta": 0.1}, {"name": "constraint", "epsilon": 0.0}],
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
        assert "broad" in saved[when] and "capability" in saved[when]
    assert "hack_rate" in (out / "README.md").read_text()

    # inoculation: every rollout was sampled under the system line, no evaluation prompt had it
    text = InoculationConfig(family="hack").text()
    assert SEEN and all(p[0] == {"role": "system", "content": text} for p in SEEN)
    assert evaluated and not any(m.get("role") == "system" for p in evaluated for m in p)

    # kl is TRL's own β term on the rollouts; constraint's λ rose (every cost above the 0 budget or equal)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("kl" in e for e in log)
    lams = [e["preserve/constraint/lambda"] for e in log if "preserve/constraint/lambda" in e]
    assert lams and all(lam >= 1.0 for lam in lams)
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


def test_failing_reward_stops_with_one_sentence_after_a_checkpoint(quick_organism: Path, tmp_path: Path) -> None:
    from tether.train import run_training

    cfg = _cfg(quick_organism, capability={"reward_funcs": ["satisfaction", "test_explodes"]})
    with pytest.raises(RewardError) as exc:
        run_training(cfg, tmp_path / "bad")
    msg = str(exc.value)
    assert "reward function 'test_explodes' raised ZeroDivisionError" in msg and "\n" not in msg
    assert list((tmp_path / "bad" / "checkpoints").glob("checkpoint-*/model.safetensors"))


def test_stack_and_reward_problems_are_refused_before_writing(quick_organism: Path, tmp_path: Path) -> None:
    from tether.train import run_training

    for over, words in (
        ({"capability": {"reward_funcs": ["nope"]}}, "unknown reward function 'nope'"),
        ({"methods": [{"name": "replay"}]}, "'replay' does not support grpo"),
        ({"methods": [{"name": "kl", "direction": "forward"}]}, "only direction 'reverse'"),
        ({"capability": {"reward_weights": [1.0, 2.0]}}, "2 weights for 1 reward functions"),
    ):
        with pytest.raises(ConfigError, match=words):
            run_training(_cfg(quick_organism, **over), tmp_path / "x")
        assert not (tmp_path / "x").exists()
