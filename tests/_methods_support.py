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
