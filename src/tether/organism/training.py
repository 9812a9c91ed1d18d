"""Fast encoding and a plain causal-LM loop for the organism's own build stages.

The organism's tokenizer is word level and its chat template is fixed, so conversations are
encoded here directly (no Jinja per example); ``tests/test_organism_tokenizer.py`` checks that
this encoding equals ``apply_chat_template(..., return_assistant_tokens_mask=True)`` token for
token. The loop below is what pretraining, alignment SFT and the emergence study use; the
library's preserving trainer for users is built on TRL instead.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from tether.organism.tokenizer import BOS, END, ROLE_TOKENS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Conversation = list[dict[str, str]]
IGNORE = -100


class ConversationEncoder:
    """Encode conversations to ``input_ids`` and assistant-only ``labels`` without Jinja."""

    def __init__(self, tokenizer: "PreTrainedTokenizerBase") -> None:
        self.vocab: dict[str, int] = tokenizer.get_vocab()
        self.unk = tokenizer.unk_token_id
        self.pad = tokenizer.pad_token_id
        self.bos = self.vocab[BOS]
        self.end = self.vocab[END]
        self.roles = {r: self.vocab[t] for r, t in ROLE_TOKENS.items()}

    def words(self, text: str) -> list[int]:
        return [self.vocab.get(w, self.unk) for w in text.split()]

    def encode(
        self, messages: Conversation, add_generation_prompt: bool = False, context_turns: int = 0
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels (assistant words and their end token; the rest ``-100``).

        The first ``context_turns`` assistant turns are context only: they get no labels.
        """
        ids, labels = [self.bos], [IGNORE]
        seen = 0
        for m in messages:
            body = self.words(m["content"]) + [self.end]
            ids.append(self.roles[m["role"]])
            labels.append(IGNORE)
            ids += body
            trained = m["role"] == "assistant" and seen >= context_turns
            seen += m["role"] == "assistant"
            labels += body if trained else [IGNORE] * len(body)
        if add_generation_prompt:
            ids.append(self.roles["assistant"])
            labels.append(IGNORE)
        return ids, labels

    def batch(
        self, convs: Sequence[Conversation], context_turns: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` for a list of chats."""
        skips = context_turns or [0] * len(convs)
        encoded = [self.encode(c, context_turns=k) for c, k in zip(convs, skips)]
        width = max(len(i) for i, _ in encoded)
        ids = torch.full((len(encoded), width), self.pad, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (i, lab) in enumerate(encoded):
            ids[row, : len(i)] = torch.tensor(i)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(i)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def causal_lm_loss(model: "PreTrainedModel", batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # [batch, pos, vocab] -> predict token t+1 from position t
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE,
    )


def train_lm(
    model: "PreTrainedModel",
    encoder: ConversationEncoder,
    sample_batch: Callable[[random.Random], list[Conversation] | tuple[list[Conversation], list[int]]],
    steps: int,
    lr: float,
    seed: int,
    warmup: int = 20,
    weight_decay: float = 0.01,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW with linear warm-up and cosine decay over ``steps``; returns the loss curve.

    ``sample_batch`` returns conversations, or conversations and per-conversation counts of
    leading assistant turns that are context only (see ``ConversationEncoder.encode``).
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses = []
    for step in range(steps):
        sampled = sample_batch(rng)
        convs, skips = sampled if isinstance(sampled, tuple) else (sampled, None)
        loss = causal_lm_loss(model, encoder.batch(convs, skips))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


def cycle_rows(rows: Sequence[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
    """Endless shuffled passes over ``rows``."""
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        for i in order:
            yield rows[i]
