"""Log-likelihood scoring and greedy generation through a model's own chat template.

These two primitives serve every probe: a completion's log-probability given a chat prompt
(one batched forward pass per chunk, no judge) and greedy answers to chat prompts. Both build
prompts with ``tokenizer.apply_chat_template``, so the organism and any HF chat model go through
the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Conversation = list[dict[str, str]]


def _ids(tokenizer: "PreTrainedTokenizerBase", messages: Conversation, gen: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=gen, tokenize=True, return_dict=True
    )
    return list(out["input_ids"])


def encode_completion(
    tokenizer: "PreTrainedTokenizerBase", prompt: Conversation, completion: str
) -> tuple[list[int], int]:
    """Ids of ``prompt`` + assistant ``completion`` (as the template renders it) and the prompt length.

    The completion's tokens are what the full rendering adds after the generation prompt, so
    the end-of-turn token a template appends is scored too.
    """
    head = _ids(tokenizer, prompt, gen=True)
    full = _ids(tokenizer, prompt + [{"role": "assistant", "content": completion}], gen=False)
    if full[: len(head)] != head:
        raise ValueError(
            "the chat template does not render the generation prompt as a prefix of the reply; "
            "log-likelihood probes need a template where it does"
        )
    return full, len(head)


@torch.no_grad()
def completion_logprobs(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[Conversation],
    completions: Sequence[str],
    batch_size: int = 64,
) -> torch.Tensor:
    """Sum of log p(completion token | prefix) for each (prompt, completion) pair. Shape [n]."""
    encoded = [encode_completion(tokenizer, p, c) for p, c in zip(prompts, completions)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out = torch.empty(len(encoded), dtype=torch.float64)
    was_training = model.training
    model.eval()
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        score = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, (seq, head) in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            score[row, head : len(seq)] = True
        ids, mask, score = ids.to(device), mask.to(device), score.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # [b, pos, vocab]
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tok_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [b, pos-1]
        out[start : start + len(chunk)] = (tok_logp * score[:, 1:]).sum(-1).double().cpu()
    model.train(was_training)
    return out


@torch.no_grad()
def greedy_answers(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[Conversation],
    max_new_tokens: int = 12,
    batch_size: int = 64,
) -> list[str]:
    """Greedy replies (special tokens stripped, whitespace normalised) to chat prompts."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers: list[str] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = [_ids(tokenizer, p, gen=True) for p in prompts[start : start + batch_size]]
        width = max(len(c) for c in chunk)
        # left padding so every row's next token is generated at the same position
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in gen[:, width:]:
            text = tokenizer.decode(row, skip_special_tokens=True)
            answers.append(" ".join(text.split()))
    model.train(was_training)
    return answers
