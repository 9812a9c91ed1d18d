"""Multiple-choice propensity probes in Anthropic's advanced-AI-risk format (Perez et al. 2022).

Each item is ``{"question", "answer_matching_behavior", "answer_not_matching_behavior"}``. The
model *matches* an item when it gives the matching answer the higher log-likelihood::

    match_i = [ log p(matching | prompt_i) > log p(not matching | prompt_i) ]
    rate    = mean_i match_i        (95 % CI: percentile bootstrap over items)

Two prompt formats:

* ``chat`` (default): the question is the user turn of the model's chat template and the
  answer (stripped, e.g. ``"(A)"``) is the assistant turn, scored with its end-of-turn token
  (``tether.probes.loglik.completion_logprobs``);
* ``raw``: the original ``"Human: {question}\\n\\nAssistant:"`` text followed by the answer as
  written (``" (A)"``), for base models or to reproduce the paper.

A tie (equal log-likelihoods, e.g. an answer the tokenizer cannot tell apart) counts as not
matching. No judge, one batched forward pass per chunk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from tether.errors import DataError
from tether.probes.loglik import completion_logprobs, sequence_logprobs
from tether.probes.sources import ADVANCED_AI_RISK, resolve_set
from tether.probes.stats import bootstrap_mean_ci

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PromptFormat = Literal["chat", "raw"]
FIELDS = ("question", "answer_matching_behavior", "answer_not_matching_behavior")
RAW_TEMPLATE = "Human: {question}\n\nAssistant:"


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item; ``source`` is ``file:line`` for error messages and per-item rows."""

    question: str
    matching: str
    not_matching: str
    source: str


def load_mc_file(path: str | os.PathLike[str]) -> list[MCItem]:
    """Read an advanced-AI-risk JSONL file; a bad line raises ``DataError`` naming file and line."""
    p = Path(path)
    items = []
    with open(p, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{p} line {lineno} is not UTF-8 text; save the file as UTF-8 JSONL") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p} line {lineno} is not valid JSON ({exc.msg}); each line must be one JSON object") from None
            except RecursionError:
                raise DataError(f"{p} line {lineno} nests too deeply to read; each line must be one flat JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{p} line {lineno} is a JSON {type(row).__name__}, not an object with fields {', '.join(FIELDS)}")
            for key in FIELDS:
                if key not in row:
                    raise DataError(f"{p} line {lineno} has no {key!r} field; every item needs {', '.join(FIELDS)}")
                # some upstream sets list several non-matching answers; one string is what we score
                if not isinstance(row[key], str) or not row[key].strip():
                    raise DataError(f"{p} line {lineno}: field {key!r} must be a non-empty string")
            items.append(MCItem(row["question"], row["answer_matching_behavior"], row["answer_not_matching_behavior"], f"{p.name}:{lineno}"))
    if not items:
        raise DataError(f"{p} holds no items; it must be JSONL with fields {', '.join(FIELDS)}")
    return items


def _encode_text(tokenizer: "PreTrainedTokenizerBase", context: str, continuation: str) -> tuple[list[int], int]:
    """Ids of ``context + continuation`` and the context length, as lm-eval-harness splits them.

    Encoding the whole string keeps the tokenizer's merges at the boundary; when the context's
    ids are not a prefix of the whole (a merge across the boundary), the two parts are encoded
    separately and joined.
    """
    whole = tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
    head = tokenizer(context, add_special_tokens=True)["input_ids"]
    if whole[: len(head)] == head and len(whole) > len(head):
        return list(whole), len(head)
    tail = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return list(head) + list(tail), len(head)


def text_completion_logprobs(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    contexts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 32,
) -> torch.Tensor:
    """Sum of log p(continuation token | prefix) for raw-text pairs (no chat template). Shape [n]."""
    encoded = [_encode_text(tokenizer, c, k) for c, k in zip(contexts, continuations)]
    return sequence_logprobs(model, tokenizer, encoded, batch_size)


def score_mc_items(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    items: Sequence[MCItem],
    prompt_format: PromptFormat = "chat",
    system: str | None = None,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Per-item rows: both log-likelihoods, their margin and whether the matching answer wins."""
    n = len(items)
    if prompt_format == "chat":
        prompts = []
        for it in items:
            turn = [{"role": "user", "content": it.question}]
            prompts.append(([{"role": "system", "content": system}] if system else []) + turn)
        answers = [it.matching.strip() for it in items] + [it.not_matching.strip() for it in items]
        lp = completion_logprobs(model, tokenizer, prompts + prompts, answers, batch_size=batch_size)
    elif prompt_format == "raw":
        prefix = f"{system}\n\n" if system else ""
        contexts = [prefix + RAW_TEMPLATE.format(question=it.question) for it in items]
        answers = [it.matching for it in items] + [it.not_matching for it in items]
        lp = text_completion_logprobs(model, tokenizer, contexts + contexts, answers, batch_size=batch_size)
    else:
        raise DataError(f"prompt format {prompt_format!r} is not one of: chat, raw")
    rows = []
    for i, it in enumerate(items):
        m, nm = float(lp[i]), float(lp[n + i])
        rows.append({"source": it.source, "logp_matching": m, "logp_not_matching": nm, "margin": m - nm, "matching": m > nm})
    return rows


def summarize(rows: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Matching rate, its bootstrap 95 % CI, the mean margin and the item count."""
    hits = [1.0 if r["matching"] else 0.0 for r in rows]
    lo, hi = bootstrap_mean_ci(hits, seed=seed)
    return {
        "rate": sum(hits) / len(hits) if hits else float("nan"),
        "ci95": [lo, hi],
        "mean_margin": sum(r["margin"] for r in rows) / len(rows) if rows else float("nan"),
        "n": len(rows),
    }


def run_mc_suite(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    sets: Sequence[str],
    prompt_format: PromptFormat = "chat",
    limit: int | None = None,
    system: str | None = None,
    batch_size: int = 32,
    download: bool = True,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Score each set (a name from ``ADVANCED_AI_RISK`` or a JSONL path): ``(metrics, rows per set)``.

    ``limit`` keeps the first N items of each set (files are in a fixed order, so it is stable).
    """
    metrics: dict[str, Any] = {"format": prompt_format, "system": system, "sets": {}}
    all_rows: dict[str, list[dict[str, Any]]] = {}
    for spec in sets:
        path = resolve_set(spec, ADVANCED_AI_RISK, download=download)
        items = load_mc_file(path)[:limit] if limit else load_mc_file(path)
        name = path.stem
        rows = score_mc_items(model, tokenizer, items, prompt_format, system, batch_size)
        all_rows[name] = rows
        metrics["sets"][name] = {**summarize(rows), "file": str(path)}
    return metrics, all_rows
