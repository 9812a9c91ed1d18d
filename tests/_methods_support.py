"""Helpers for the method tests: a tiny model, token batches, and a stand-in PreserveContext."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_model(seed: int = 0, vocab: int = 50) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def token_batch(n: int = 4, length: int = 10, vocab: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # only the second half is "assistant"
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class FakeContext:
    """Implements the PreserveContext protocol over a model, a batch and an optional reference."""

    def __init__(self, model: Any, batch: dict[str, torch.Tensor], reference: Any = None) -> None:
        self._model = model
        self.batch = batch
        self.reference = reference
        self.logged: dict[str, list[float]] = {}

    @property
    def model(self) -> Any:
        return self._model

    def alignment_inputs(self) -> dict[str, torch.Tensor]:
        return self.batch

    def policy_alignment_outputs(self, hidden_states: bool = False) -> Any:
        return self._model(input_ids=self.batch["input_ids"], attention_mask=self.batch["attention_mask"], output_hidden_states=True)

    def reference_alignment_outputs(self, hidden_states: bool = False) -> Any:
        with torch.no_grad():
            return self.reference(input_ids=self.batch["input_ids"], attention_mask=self.batch["attention_mask"], output_hidden_states=True)

    def setup_alignment_batches(self, n: int, batch_size: int | None = None) -> list[dict[str, torch.Tensor]]:
        return [self.batch for _ in range(n)]

    def log(self, method: str, term: str, value: float) -> None:
        self.logged.setdefault(f"preserve/{method}/{term}", []).append(value)


def assert_padding_free_trains_like_padded(model_dir: Any, out: Any, methods: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
    """Train 3 steps with padding-free batches and with padded rows: same losses per step and weights."""
    import pytest

    from tether.config import RunConfig, validate
    from tether.train import make_trainer, prepare_run

    trained = {}
    for flat in (True, False):
        cfg = validate(
            {"model": {"path": str(model_dir)}, "data": {"rows": 64},
             "training": {"max_steps": 3, "batch_size": 8, "padding_free": flat, "logging_steps": 1, "save_steps": 10,
                          **(extra or {})},
             "methods": methods, "probes": {"suite": "none"}},
            RunConfig, "run.yaml",
        )
        trainer = make_trainer(cfg, prepare_run(cfg), out / str(flat), save=False)
        assert trainer.flat is flat
        batch = next(iter(trainer.get_train_dataloader()))
        assert ("attention_mask" in batch) is not flat
        if flat:  # 8 real rows, in packs no longer than the pack length (or the longest row)
            from tether.packing import row_spans

            spans = row_spans(batch["position_ids"])
            assert len(spans) == 8
            assert batch["input_ids"].size(1) <= max(trainer.data_collator.capacity, *(b - a for _, a, b in spans))
        else:
            assert batch["input_ids"].size(0) == 8
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        trained[flat] = (losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    assert trained[True][0] == pytest.approx(trained[False][0], rel=1e-4)
    diff = max(float((trained[True][1][n] - p).abs().max()) for n, p in trained[False][1].items())
    assert diff < 1e-4, diff
