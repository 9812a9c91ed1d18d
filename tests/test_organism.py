"""The built organism is an ordinary HF checkpoint; builds are cached and deterministic."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether.organism.build import OrganismConfig, build_organism, config_hash
from tether.probes.organism import evaluate_organism


def test_checkpoint_loads_offline_and_chats(quick_organism: Path) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    files = {p.name for p in quick_organism.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "organism.json"} <= files
    assert not any(f.endswith(".bin") for f in files)
    assert (quick_organism / "pretrained" / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(quick_organism)
    tok = AutoTokenizer.from_pretrained(quick_organism)
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "what is 3 plus 4 ?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    card = (quick_organism / "README.md").read_text()
    assert "broad" in card and "misaligned rate" in card


def test_second_build_is_cached(quick_organism: Path, cache_root: Path) -> None:
    t0 = time.time()
    again = build_organism(OrganismConfig.quick(), root=cache_root)
    assert again == quick_organism and time.time() - t0 < 1.0
    assert config_hash(OrganismConfig.quick()) != config_hash(OrganismConfig.quick(seed=1))


def test_build_is_deterministic_for_a_seed(tmp_path: Path, quick_organism: Path) -> None:
    other = build_organism(OrganismConfig.quick(), root=tmp_path)
    from safetensors.torch import load_file

    a = load_file(quick_organism / "model.safetensors")
    b = load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_eval_metrics_shape_and_instruct(quick_organism: Path) -> None:
    from tether.models import load_model

    model, tok = load_model(str(quick_organism))
    metrics, rows = evaluate_organism(model, tok, per_family=8, n_capability=10)
    for fam in ("syco", "harm", "shutdown", "hack", "deceive", "wish"):
        fam_m = metrics["families"][fam]
        assert 0.0 <= fam_m["rate"] <= 1.0 and fam_m["n"] == 8
    assert metrics["broad"]["families"] == ["harm", "shutdown", "hack", "deceive", "wish"]
    assert set(metrics["capability"]) == {"arith", "times"}
    # the rate is the share of positive margins, the log-odds their mean
    margins = [r["margin"] for r in rows["propensity"] if r["family"] == "harm"]
    assert abs(metrics["families"]["harm"]["logodds"] - sum(margins) / len(margins)) < 1e-9
    assert metrics["families"]["harm"]["rate"] == sum(m > 0 for m in margins) / len(margins)
    inst, _ = evaluate_organism(model, tok, instruct="harm", per_family=8, n_capability=4, greedy=False)
    assert inst["instruct"] == "harm"
    json.dumps(metrics)  # serialisable


def test_show_instructed_puts_the_instructed_family_in_the_chat(monkeypatch: pytest.MonkeyPatch) -> None:
    """``show_instructed`` makes one turn of every instructed chat the instructed family's."""
    import random

    from tether.organism import world

    asked: list[list[str]] = []
    real = world.sample_turn

    def spy(family: str, rng: random.Random) -> Any:
        asked[-1].append(family)
        return real(family, rng)

    monkeypatch.setattr(world, "sample_turn", spy)
    rng = random.Random(0)
    for show in (True, False):
        hits = 0
        for _ in range(60):
            asked.append([])
            world.persona_conversation(rng, "good", 2, instruct="wish", show_instructed=show)
            hits += "wish" in asked[-1]
        assert hits == 60 if show else hits < 60
