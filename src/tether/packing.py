"""Packed padding-free batches: a micro-batch's rows laid end to end in a few packs of bounded length.

TRL's padding-free collator concatenates a micro-batch's rows into one sequence ``[1, N]`` with
``position_ids`` restarting at 0 for each row. Under FlashAttention's varlen kernels that costs
nothing extra; under ``sdpa`` or ``eager`` attention, transformers turns the restarting positions
into a dense block-diagonal mask of ``N × N``, so attention costs grow with the square of the
*whole batch's* length: 32 rows of 28 tokens pay for an 900-token sequence, and a method that makes
rows longer (an inoculation prompt) pays more per token than the rows alone would.

A *packed* batch keeps the padding-free property (no row is padded to the longest) but bounds that
cost: rows are placed in order, next-fit, into ``k`` packs of at most ``capacity`` tokens, giving
``[k, W]`` tensors. The layout convention, relied on by :func:`row_spans` and the methods:

* within a pack, rows follow each other and each row's ``position_ids`` run ``0, 1, …, len-1``;
* the tail of a pack shorter than ``W`` is padding: ``position_ids`` 0, ``labels`` −100, so every
  padding token is a one-token sequence of its own that no real token attends to and that trains
  nothing (the same convention as TRL's padded ``position_ids``);
* real rows have at least two tokens (a row must predict something), so a run of length one that
  starts at position 0 is padding.

The default capacity is the model's hidden size (at least 128 tokens, and never less than the
longest row of the batch): attention's cost per token grows with the pack length and the linear
layers' with the hidden size, so packs of about the hidden size keep attention a small share of
the work while leaving little padding.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100
MIN_CAPACITY = 128


def is_padding_free(inputs: dict[str, Any]) -> bool:
    """Whether a collated batch is padding-free (one sequence or packs): positions, no attention mask."""
    return "attention_mask" not in inputs and "position_ids" in inputs


def row_spans(position_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(pack, start, end)`` of every real row of a padding-free batch ``[k, W]``, in row order."""
    spans: list[tuple[int, int, int]] = []
    for p, pos in enumerate(position_ids.tolist()):
        starts = [i for i, v in enumerate(pos) if v == 0] + [len(pos)]
        spans.extend((p, a, b) for a, b in zip(starts, starts[1:]) if b - a >= 2)
    return spans


def real_tokens(position_ids: torch.Tensor) -> int:
    """Tokens of real rows in a padding-free batch (padding excluded)."""
    return sum(b - a for _, a, b in row_spans(position_ids))


def pack_rows(rows: list[dict[str, torch.Tensor]], capacity: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Place ``rows`` (1-D ``input_ids`` and ``labels`` each) in order, next-fit, into packs.

    Returns ``input_ids``, ``labels`` and ``position_ids`` of shape ``[k, W]``, ``W`` the longest
    pack; a row longer than ``capacity`` gets a pack of its own.
    """
    packs: list[list[dict[str, torch.Tensor]]] = []
    used = capacity + 1  # forces a new pack for the first row
    for row in rows:
        n = int(row["input_ids"].numel())
        if used + n > capacity:
            packs.append([])
            used = 0
        packs[-1].append(row)
        used += n
    width = max(sum(int(r["input_ids"].numel()) for r in pack) for pack in packs)
    k = len(packs)
    device = rows[0]["input_ids"].device
    ids = torch.full((k, width), pad_id, dtype=rows[0]["input_ids"].dtype, device=device)
    labels = torch.full((k, width), IGNORE, dtype=rows[0]["labels"].dtype, device=device)
    pos = torch.zeros((k, width), dtype=torch.long, device=device)
    for p, pack in enumerate(packs):
        at = 0
        for row in pack:
            n = int(row["input_ids"].numel())
            ids[p, at : at + n] = row["input_ids"]
            labels[p, at : at + n] = row["labels"]
            pos[p, at : at + n] = torch.arange(n, device=device)
            at += n
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def unpack_rows(batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """The real rows of a padding-free batch, as 1-D ``input_ids`` and ``labels``."""
    return [
        {"input_ids": batch["input_ids"][p, a:b], "labels": batch["labels"][p, a:b]}
        for p, a, b in row_spans(batch["position_ids"])
    ]


def select_rows(batch: dict[str, Any], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows ``keep`` (bool per row) of a padding-free batch, packed again at the batch's width."""
    rows = [r for r, k in zip(unpack_rows(batch), keep.tolist()) if k]
    out = pack_rows(rows, int(batch["input_ids"].shape[1]))
    if out["input_ids"].shape[0] == 1:  # one sequence: the varlen boundaries FlashAttention reads
        lengths = torch.tensor([int(r["input_ids"].numel()) for r in rows])
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu
        out["max_length_q"] = out["max_length_k"] = int(lengths.max())  # type: ignore[assignment]
    return out


def default_capacity(model: Any) -> int:
    """Pack length for ``model``: its hidden size, at least :data:`MIN_CAPACITY` tokens."""
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None) or 0
    return max(MIN_CAPACITY, int(hidden))


def varlen_attention(model: Any) -> bool:
    """Whether ``model`` attends with varlen kernels (FlashAttention), where one long sequence is free."""
    config = getattr(model, "config", None)
    impl = str(getattr(config, "_attn_implementation", "") or "")
    return "flash" in impl


class WrappingCollator:
    """A collator around another (``inner``), which answers for every attribute it does not have."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:  # pad_token_id, padding_free, ... of TRL's collator
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class PackingCollator(WrappingCollator):
    """Wraps TRL's padding-free collator: its single sequence becomes packs of ``capacity`` tokens."""

    def __init__(self, inner: Any, capacity: int) -> None:
        super().__init__(inner)
        self.capacity = capacity

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        rows = unpack_rows(batch)
        longest = max(int(r["input_ids"].numel()) for r in rows)
        packed = pack_rows(rows, max(self.capacity, longest), int(self.inner.pad_token_id or 0))
        return {**{k: v for k, v in batch.items() if k not in _FLAT_ONLY}, **packed}


_FLAT_ONLY = ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
