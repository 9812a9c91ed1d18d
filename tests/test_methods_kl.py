"""KL to the reference (and the representation constraint): zero before the first step or with the
adapter disabled, positive after training; the LoRA reference is the adapter switched off, not a copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tether.methods import make
from tether.train import PreservingConfig, PreservingTrainer, _Context


def _trainer(model_dir: Path, tmp_path: Path, methods: list[str], lora: bool) -> PreservingTrainer:
    from datasets import Dataset

    from tether.models import load_model
    from tether.organism import tasks

    model, tok = load_model(model_dir)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [{"messages": r["messages"]} for r in tasks.capability_dataset("sycophantic", 32, seed=0)]
    align = [{"messages": r["messages"]} for r in tasks.alignment_dataset(32, seed=0)]
    args = PreservingConfig(
        output_dir=str(tmp_path / "ckpt"), max_steps=3, per_device_train_batch_size=8, learning_rate=2e-2,
        report_to="none", save_strategy="no", disable_tqdm=True, bf16=False, assistant_only_loss=True,
        alignment_batch_size=8, logging_steps=1, seed=0,
    )
    return PreservingTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
        methods=[make(m, {}) for m in methods], alignment_dataset=Dataset.from_list(align),
    )


def _term(trainer: PreservingTrainer, method: Any) -> float:
    trainer._cache = {}
    with torch.no_grad():
        return float(method.loss_terms(_Context(trainer), trainer.model, {})["penalty"])


def test_kl_lora_zero_before_and_with_adapter_disabled_positive_after(tiny_llama: Path, tmp_path: Path) -> None:
    trainer = _trainer(tiny_llama, tmp_path, ["kl", "representation"], lora=True)
    kl, rep = trainer.methods
    assert trainer._ref is None  # no second copy of the weights
    assert _term(trainer, kl) == 0.0 and _term(trainer, rep) == 0.0
    trainer.train()
    assert _term(trainer, kl) > 1e-4 and _term(trainer, rep) > 1e-6
    with trainer.model.disable_adapter():  # the policy *is* the reference with the adapter off
        assert _term(trainer, kl) == 0.0
    logged = [e for e in trainer.state.log_history if "preserve/kl/kl" in e]
    assert logged and logged[0]["preserve/kl/kl"] == 0.0 and logged[-1]["preserve/kl/kl"] > 0.0
    assert "preserve/representation/mse" in logged[-1]


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_kl_full_finetune_frozen_reference(quick_organism: Path, tmp_path: Path, direction: str) -> None:
    trainer = _trainer(quick_organism, tmp_path, ["kl"], lora=False)
    trainer.methods = [make("kl", {"direction": direction})]
    assert trainer._ref is not None and all(not p.requires_grad for p in trainer._ref.parameters())
    assert _term(trainer, trainer.methods[0]) == pytest.approx(0.0, abs=1e-7)
    trainer.train()
    assert _term(trainer, trainer.methods[0]) > 1e-4
