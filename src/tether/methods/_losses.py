"""Tensor helpers shared by the loss-based methods: position masks, token-level KL, hidden-state MSE, NLL."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE = -100
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of a collated batch that the model's forward takes (padded or padding-free form)."""
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


def next_token_mask(inputs: dict[str, torch.Tensor], positions: Literal["assistant", "all"]) -> torch.Tensor:
    """Bool mask [batch, pos-1] of positions whose next-token distribution is compared.

    Position t predicts token t+1, so ``assistant`` keeps t where ``labels[t+1]`` is trained and
    ``all`` keeps t where token t+1 is a real (non-padding) token of the same row (in a
    padding-free batch, rows lie end to end with ``position_ids`` restarting at 0 for each, and a
    pack's padded tail has position 0 throughout — see :mod:`tether.packing`).
    """
    if positions == "assistant":
        return inputs["labels"][:, 1:] != IGNORE
    mask = inputs.get("attention_mask")
    if mask is not None:
        return mask[:, 1:].bool()
    if "position_ids" in inputs:  # padding-free: skip each row's first token and every padding token
        return inputs["position_ids"][:, 1:] != 0
    return torch.ones_like(inputs["input_ids"][:, 1:], dtype=torch.bool)


def token_kl(
    logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor, direction: Literal["reverse", "forward"]
) -> torch.Tensor:
    """Mean over masked positions of KL between next-token distributions.

    ``reverse``: KL(p_θ ‖ p_ref) = Σ_v p_θ(v) (log p_θ(v) − log p_ref(v));
    ``forward``: KL(p_ref ‖ p_θ). ``logits`` [batch, pos, vocab] (pos-1 compared), ``mask`` [batch, pos-1].
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    logq = F.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    if direction == "reverse":
        per_pos = (logp.exp() * (logp - logq)).sum(-1)
    else:
        per_pos = (logq.exp() * (logq - logp)).sum(-1)
    m = mask.to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp(min=1)


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood over labelled tokens."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )


def hidden_mse(
    hidden: tuple[torch.Tensor, ...], ref_hidden: tuple[torch.Tensor, ...], mask: torch.Tensor, layers: list[int]
) -> torch.Tensor:
    """Mean over ``layers`` of the mean squared difference of hidden states at masked tokens.

    ``hidden[i]`` is [batch, pos, d_model]; ``mask`` [batch, pos].
    """
    m = mask.to(hidden[0].dtype).unsqueeze(-1)  # [batch, pos, 1]
    denom = m.sum().clamp(min=1) * hidden[0].size(-1)
    terms = [(((hidden[i] - ref_hidden[i].detach()) ** 2) * m).sum() / denom for i in layers]
    return torch.stack(terms).mean()
