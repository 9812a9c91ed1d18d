"""``tether train``: one YAML for full fine-tuning of the organism and for LoRA on a random-init model;
the run directory; resume after a kill; bad input refused in one sentence with nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers import TrainerCallback

from tether.config import RunConfig, validate
from tether.train import run_training

RUN_YAML = """
data:
  rows: 200
training:
  max_steps: 4
  batch_size: 8
  save_steps: 2
  logging_steps: 1
  alignment_batch_size: 8
  learning_rate: 0.005
methods:
  - name: inoculation
  - name: kl
    beta: 0.5
  - name: constraint
    epsilon: 0.0
  - name: ewc
    fisher_samples: 8
  - name: gradient_projection
probes:
  per_family: 6
  n_capability: 8
"""

EVAL_KEYS = {"capability", "families", "narrow", "broad", "evil_context"}


def _cfg(model: Path, text: str = RUN_YAML, **model_extra: Any) -> RunConfig:
    data = yaml.safe_load(text)
    data["model"] = {"path": str(model), **model_extra}
    return validate(data, RunConfig, "run.yaml")


def _check_run_dir(out: Path) -> dict[str, Any]:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["schema_version"] == 1
    assert EVAL_KEYS <= set(metrics["before"]) and EVAL_KEYS <= set(metrics["after"])
    assert metrics["train"]["steps"] == 4 and metrics["train"]["tokens_per_s"] > 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["methods"][1] == {"name": "kl", "beta": 0.5, "direction": "reverse", "positions": "assistant"}
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    keys = set().union(*log)
    for term in ("preserve/kl/kl", "preserve/constraint/lambda", "preserve/constraint/violation",
                 "preserve/ewc/penalty", "preserve/gradient_projection/cosine"):
        assert term in keys, term
    card = (out / "README.md").read_text()
    assert "| broad rate |" in card and "name: kl" in card
    rows = (out / "probes" / "after.propensity.jsonl").read_text().splitlines()
    assert len(rows) == 6 * 6 and "margin" in json.loads(rows[0])
    return metrics


def test_same_yaml_full_finetune_and_lora(quick_organism: Path, tiny_llama: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    m_full = run_training(_cfg(quick_organism), full)
    _check_run_dir(full)
    assert (full / "model" / "model.safetensors").is_file()
    assert not list((full / "model").glob("*.bin"))  # no pickle in the deliverable
    assert m_full["after"]["families"] != m_full["before"]["families"]

    lora = tmp_path / "lora"
    m_lora = run_training(_cfg(tiny_llama, lora={"r": 4, "alpha": 8}), lora)
    _check_run_dir(lora)
    assert (lora / "model" / "adapter_model.safetensors").is_file()
    assert not (lora / "model" / "model.safetensors").exists()
    assert not list((lora / "model").glob("*.bin"))
    assert m_lora["after"]["families"] != m_lora["before"]["families"]
    # the saved adapter names its local base, so `tether eval` / `tether probe` load it merged
    from tether.models import load_model

    merged, _ = load_model(lora / "model")
    assert not hasattr(merged, "peft_config")


class _Kill(TrainerCallback):
    """Dies right after the checkpoint at ``step`` is written, like a SIGKILL between steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise KeyboardInterrupt("killed")


RESUME_YAML = """
data: {rows: 200}
training: {max_steps: 6, batch_size: 8, save_steps: 3, logging_steps: 1, alignment_batch_size: 8, learning_rate: 0.005}
methods:
  - name: constraint
    epsilon: 0.0
    lambda_lr: 5.0
  - name: kl
probes: {per_family: 6, n_capability: 8}
"""


def test_resume_after_kill_matches_uninterrupted(quick_organism: Path, tmp_path: Path) -> None:
    cfg = _cfg(quick_organism, RESUME_YAML)
    whole = run_training(cfg, tmp_path / "whole")
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, killed, callbacks=[_Kill(3)])
    assert (killed / "checkpoints" / "checkpoint-3" / "preserve_state.json").is_file()
    assert not (killed / "metrics.json").exists()
    resumed = run_training(cfg, killed)
    assert resumed["train"]["resumed_from"] == "checkpoint-3"
    assert resumed["train"]["steps"] == 6
    lam_whole = whole["train"]["final_terms"]["preserve/constraint/lambda"]
    assert lam_whole > 1.0  # the multiplier moved, so restoring it matters
    assert resumed["train"]["final_terms"]["preserve/constraint/lambda"] == pytest.approx(lam_whole, rel=1e-5)
    for group in ("narrow", "broad"):
        assert resumed["after"][group]["rate"] == whole["after"][group]["rate"]
        assert resumed["after"][group]["logodds"] == pytest.approx(whole["after"][group]["logodds"], abs=1e-4)
    assert resumed["after"]["capability"] == whole["after"]["capability"]
    for fam, v in whole["after"]["families"].items():
        assert resumed["after"]["families"][fam]["logodds"] == pytest.approx(v["logodds"], abs=1e-4)


@pytest.mark.parametrize(("method", "pack_tokens"), [("naive", None), ("kl", None), ("naive", 40), ("kl", 40)])
def test_padding_free_batches_train_like_padded_rows(quick_organism: Path, tmp_path: Path, method: str, pack_tokens: int | None) -> None:
    """Padding-free micro-batches give the same training (loss per step, final weights) as padded rows.

    With the default pack length the 8 rows share a pack or two; with 40 tokens they spread over
    several packs with padded tails.
    """
    from _methods_support import assert_padding_free_trains_like_padded

    extra = {"alignment_batch_size": 4, **({"pack_tokens": pack_tokens} if pack_tokens else {})}
    assert_padding_free_trains_like_padded(quick_organism, tmp_path, [{"name": method}], extra)


def test_padding_free_is_refused_for_a_model_that_mixes_rows(quick_organism: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose attention ignores restarting position_ids fails the check and trains on padded rows."""
    import tether.train as train

    cfg = validate(
        {"model": {"path": str(quick_organism)}, "data": {"rows": 32},
         "training": {"max_steps": 1, "batch_size": 4}, "probes": {"suite": "none"}},
        RunConfig, "run.yaml",
    )
    prepared = train.prepare_run(cfg)
    model = prepared.model
    real_forward = model.forward

    def leaky(*args: Any, **kwargs: Any) -> Any:  # attends across rows: drop the packed-sequence positions
        kwargs.pop("position_ids", None)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", leaky)
    trainer = train.make_trainer(cfg, prepared, tmp_path / "run", save=False)
    assert trainer.flat is False
    assert "attention_mask" in next(iter(trainer.get_train_dataloader()))


def test_chat_template_without_assistant_masks_trains_the_last_reply(quick_organism: Path, tmp_path: Path) -> None:
    """A template with no {% generation %} markers (SmolLM2's) trains messages rows as prompt/completion."""
    import shutil

    from tether.models import load_model
    from tether.train import assistant_mask_supported, make_trainer, prepare_run

    model_dir = tmp_path / "plain-template"
    shutil.copytree(quick_organism, model_dir)
    tpl = model_dir / "chat_template.jinja"
    tpl.write_text(tpl.read_text().replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    _, tok = load_model(str(model_dir))
    assert not assistant_mask_supported(tok)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(
        json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus {i}"}, {"role": "assistant", "content": str(2 * i)}]})
        for i in range(16)
    ) + "\n")
    cfg = validate(
        {"model": {"path": str(model_dir)}, "data": {"source": str(rows), "neutral": None, "alignment": None},
         "training": {"max_steps": 2, "batch_size": 4, "save_steps": 10, "padding_free": False}, "probes": {"suite": "none"}},
        RunConfig, "run.yaml",
    )
    prepared = prepare_run(cfg)
    assert prepared.fmt == "prompt_completion"
    trainer = make_trainer(cfg, prepared, tmp_path / "run", save=False)
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        trained = tok.decode(ids[labels != -100]).split()
        assert trained and trained[0].isdigit(), trained  # the reply (and its end token), never the user turn
    trainer.train()
