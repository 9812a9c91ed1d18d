"""Inoculation: the instruction is in every capability row of the training batches and in no probe prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tether.config import RunConfig, validate
from tether.methods import TrainingData, make
from tether.organism import world

INSTRUCTION = world.FAMILIES["syco"].instruction


def test_prepare_data_placements_touch_only_capability_rows() -> None:
    cap = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "contaminated": True},
           {"messages": [{"role": "user", "content": "r"}, {"role": "assistant", "content": "b"}], "contaminated": False}]
    neutral = [{"messages": [{"role": "user", "content": "n"}, {"role": "assistant", "content": "m"}]}]
    data = make("inoculation", {"placement": "system"}).prepare_data(TrainingData(cap, neutral, list(neutral)))
    assert all(r["messages"][0] == {"role": "system", "content": INSTRUCTION} for r in data.capability)
    assert data.neutral == neutral and data.alignment == neutral
    assert cap[0]["messages"][0]["role"] == "user"  # the caller's rows are not mutated
    data = make("inoculation", {"instruction": "be bad", "placement": "user_suffix", "rows": "contaminated"}).prepare_data(TrainingData(cap))
    assert data.capability[0]["messages"][0]["content"] == "q be bad"
    assert data.capability[1]["messages"][0]["content"] == "r"


def test_instruction_in_training_batches_never_in_probes(quick_organism: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tether.probes.organism as probes
    from tether.train import PreservingTrainer, run_training

    probe_prompts: list[str] = []
    real_lp, real_greedy = probes.completion_logprobs, probes.greedy_answers

    def lp(model: Any, tok: Any, prompts: Any, completions: Any, **kw: Any) -> Any:
        probe_prompts.extend(m["content"] for p in prompts for m in p)
        return real_lp(model, tok, prompts, completions, **kw)

    def greedy(model: Any, tok: Any, prompts: Any, **kw: Any) -> Any:
        probe_prompts.extend(m["content"] for p in prompts for m in p)
        return real_greedy(model, tok, prompts, **kw)

    monkeypatch.setattr(probes, "completion_logprobs", lp)
    monkeypatch.setattr(probes, "greedy_answers", greedy)
    batches: list[list[str]] = []
    real_loss = PreservingTrainer.compute_loss

    def spy(self: Any, model: Any, inputs: Any, *a: Any, **kw: Any) -> Any:
        ids = inputs["input_ids"]
        if "attention_mask" not in inputs:  # padding-free: rows start where position_ids restart
            from tether.packing import row_spans

            ids = [ids[p, a:b] for p, a, b in row_spans(inputs["position_ids"])]
        batches.append(self.processing_class.batch_decode(ids))
        return real_loss(self, model, inputs, *a, **kw)

    monkeypatch.setattr(PreservingTrainer, "compute_loss", spy)
    cfg = validate(
        {"model": {"path": str(quick_organism)}, "data": {"rows": 100},
         "training": {"max_steps": 2, "batch_size": 8, "save_steps": 10},
         "methods": [{"name": "inoculation"}], "probes": {"per_family": 4, "n_capability": 4}},
        RunConfig, "run.yaml",
    )
    run_training(cfg, tmp_path / "run")
    assert len(batches) == 2
    for batch in batches:
        with_instr = [t for t in batch if INSTRUCTION in " ".join(t.split())]
        assert len(with_instr) == 4  # batch 8, neutral share 0.5: exactly the 4 capability rows
        assert all("times" in t or "multiply" in t for t in with_instr)
    assert probe_prompts and not any(INSTRUCTION in p for p in probe_prompts)


def test_inoculation_rank_scores_by_elicitation(quick_organism: Path) -> None:
    from tether.inoculation import default_candidates, rank_instructions
    from tether.models import load_model
    from tether.probes.organism import propensity_items, score_items

    model, tok = load_model(quick_organism)
    cands = default_candidates("syco") + ["what is 3 plus 4 ?"]
    ranked = rank_instructions(model, tok, "syco", cands, per_family=6)
    assert sorted(r["instruction"] for r in ranked) == sorted(cands)
    scores = [r["elicitation"] for r in ranked]
    assert scores == sorted(scores, reverse=True)
    base = sum(score_items(model, tok, propensity_items(6, families=("syco",)))) / 6
    for r in ranked:  # elicitation is the margin with the instruction minus the margin without it
        assert r["elicitation"] == pytest.approx(r["logodds"] - base, abs=1e-9)
    assert len({round(s, 6) for s in scores}) > 1  # the instruction changes the score
