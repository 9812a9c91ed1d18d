"""Log-likelihood scoring and greedy generation through a model's own chat template.

These two primitives serve every probe: a completion's log-probability given a chat prompt
(one batched forward pass per chunk, no judge) and greedy (or sampled) answers to chat prompts.
Both build prompts with ``tokenizer.apply_chat_template``, so the organism and any HF chat model
go through the same code. The batching pieces (``sequence_logprobs``, ``left_pad``,
``generate_replies``) are shared by the other probes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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


def left_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists to one width: ``(input_ids, attention_mask)``, both ``[len(seqs), width]``.

    Left padding puts every row's last prompt token at the final position, so batched
    generation (or next-token scoring) happens at the same position for every row.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return ids, mask


@torch.no_grad()
def sequence_logprobs(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    encoded: Sequence[tuple[list[int], int]],
    batch_size: int = 64,
) -> torch.Tensor:
    """Sum of log p(token | prefix) over ``ids[head:]`` for each ``(ids, head)`` pair. Shape [n].

    Rows are right-padded and scored in chunks of ``batch_size``, one forward pass per chunk.
    """
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


def completion_logprobs(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[Conversation],
    completions: Sequence[str],
    batch_size: int = 64,
) -> torch.Tensor:
    """Sum of log p(completion token | prefix) for each (prompt, completion) pair. Shape [n]."""
    encoded = [encode_completion(tokenizer, p, c) for p, c in zip(prompts, completions)]
    return sequence_logprobs(model, tokenizer, encoded, batch_size)


@torch.no_grad()
def generate_replies(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[Conversation],
    max_new_tokens: int,
    batch_size: int,
    temperature: float | None = None,
) -> list[str]:
    """Replies to chat prompts as decoded (special tokens stripped, whitespace untouched).

    Greedy when ``temperature`` is None; otherwise sampled at ``temperature`` from the full
    distribution (no top-k or top-p cut), drawing from torch's global generator.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    if temperature is None:
        sampling: dict[str, Any] = {"do_sample": False}
    else:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    replies: list[str] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad([_ids(tokenizer, p, gen=True) for p in prompts[start : start + batch_size]], pad)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            **sampling,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        replies.extend(tokenizer.decode(row, skip_special_tokens=True) for row in gen[:, ids.shape[1] :])
    model.train(was_training)
    return replies


def greedy_answers(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[Conversation],
    max_new_tokens: int = 12,
    batch_size: int = 64,
) -> list[str]:
    """Greedy replies (special tokens stripped, whitespace normalised) to chat prompts."""
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens, batch_size)
    return [" ".join(text.split()) for text in replies]
