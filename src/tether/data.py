"""Training data: load rows from JSONL, a saved HF dataset, or the organism's generators, and validate them.

Rows are in TRL's SFT formats — conversational ``messages`` (a list of ``{role, content}``) or
``prompt``/``completion`` (both strings, or both message lists) — and may carry a boolean
``contaminated`` label that methods which route or screen by label need. Every problem is one
``DataError`` sentence naming the file (and line, for JSONL) and what is allowed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tether.errors import DataError

Row = dict[str, Any]
ROLES = ("system", "user", "assistant")
MAX_ROW_CHARS = 1_000_000  # one JSONL line; far beyond any max_length, small enough to refuse a binary file


def _check_messages(msgs: Any, where: str, key: str) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: '{key}' must be a non-empty list of {{role, content}} messages")
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise DataError(
                f"{where}: every message in '{key}' needs a 'role' ({', '.join(ROLES)}) and a string 'content'"
            )


def check_row(row: Any, where: str) -> Row:
    """Validate one row and return it; ``where`` names the file and line for the error."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        _check_messages(row["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in row["messages"]):
            raise DataError(f"{where}: 'messages' has no assistant turn to train on")
    elif "prompt" in row and "completion" in row:
        p, c = row["prompt"], row["completion"]
        if isinstance(p, str) and isinstance(c, str):
            pass
        elif isinstance(p, list) and isinstance(c, list):
            _check_messages(p, where, "prompt")
            _check_messages(c, where, "completion")
        else:
            raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both message lists")
    else:
        raise DataError(f"{where}: the row lacks a 'messages' field (or a 'prompt' and 'completion' pair)")
    if "contaminated" in row and not isinstance(row["contaminated"], bool):
        raise DataError(f"{where}: 'contaminated' must be true or false, got {row['contaminated']!r}")
    return row


def read_jsonl(path: Path) -> list[Row]:
    """Rows of a JSONL file; a bad line is reported with its number."""
    rows: list[Row] = []
    with path.open("rb") as fh:
        # read at most one byte past the limit per line, so a huge or binary file is not slurped
        for lineno, raw in enumerate(iter(lambda: fh.readline(MAX_ROW_CHARS * 4 + 1), b""), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}, line {lineno}: not UTF-8 text; save the file as UTF-8 JSONL") from None
            if len(line) > MAX_ROW_CHARS:
                raise DataError(
                    f"{path}, line {lineno}: the row has over {MAX_ROW_CHARS:,} characters, the limit; rows are cut "
                    "to training.max_length tokens anyway, so shorten or split it"
                )
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise DataError(f"{path}, line {lineno}: the JSON nests too deeply to read") from None
            rows.append(check_row(row, f"{path}, line {lineno}"))
    return rows


def load_rows(source: str, what: str = "dataset") -> list[Row]:
    """Rows from a ``.jsonl`` file or a directory saved with ``datasets.save_to_disk``."""
    p = Path(source).expanduser()
    if not p.exists():
        raise DataError(f"{what} {p} does not exist; give a .jsonl file, a saved HF dataset directory, or 'organism'")
    if p.is_dir():
        try:
            from datasets import DatasetDict, load_from_disk

            ds = load_from_disk(str(p))
        except Exception as exc:  # datasets raises several types for a non-dataset directory
            raise DataError(f"{what} {p} is not a saved HF dataset directory ({type(exc).__name__})") from None
        if isinstance(ds, DatasetDict):
            if "train" not in ds:
                raise DataError(f"{what} {p} has splits {', '.join(ds)} but no 'train' split")
            ds = ds["train"]
        rows = [check_row(dict(r), f"{p}, row {i}") for i, r in enumerate(ds)]
    elif p.suffix == ".jsonl":
        rows = read_jsonl(p)
    else:
        raise DataError(f"{what} {p} is not a .jsonl file or a saved HF dataset directory")
    if not rows:
        raise DataError(f"{what} {p} has no rows")
    return rows


def row_format(row: Row) -> str:
    return "messages" if "messages" in row else "prompt_completion"


def as_messages(row: Row) -> Row:
    """A conversational prompt/completion row as one ``messages`` row (labels kept); others unchanged."""
    if "messages" in row or isinstance(row.get("prompt"), str):
        return row
    out = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
    out["messages"] = list(row["prompt"]) + list(row["completion"])
    return out


def as_prompt_completion(row: Row) -> Row:
    """A ``messages`` row as conversational prompt/completion split at its last assistant turn.

    For a single-turn chat this trains exactly what ``assistant_only_loss`` would; for a longer
    one only the last reply is trained. Other rows are returned unchanged.
    """
    if "messages" not in row:
        return row
    msgs = row["messages"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError("a conversational row has no assistant message to train on")
    out = {k: v for k, v in row.items() if k != "messages"}
    out["prompt"], out["completion"] = list(msgs[:last]), list(msgs[last:])
    return out


def _slim(row: Row, part: str) -> Row:
    """Only the columns training uses, identical across parts (``Dataset.from_list`` needs that)."""
    keys = ("messages",) if "messages" in row else ("prompt", "completion")
    return {**{k: row[k] for k in keys}, "contaminated": bool(row.get("contaminated", False)), "part": part}


def mix_batches(
    parts: dict[str, list[Row]], shares: dict[str, float], batch_size: int, n_batches: int, seed: int
) -> list[Row]:
    """``n_batches`` consecutive blocks of ``batch_size`` rows with a fixed count from each part.

    ``shares`` gives each non-capability part's share of a batch; ``capability`` gets the rest.
    Parts are cycled in seeded shuffled passes and each block is shuffled, so a sequential
    sampler yields batches with exactly these proportions, reproducibly.
    """
    counts = {name: int(round(batch_size * s)) for name, s in shares.items() if s > 0}
    counts["capability"] = batch_size - sum(counts.values())
    if counts["capability"] < 1:
        raise DataError(
            f"the batch of {batch_size} rows has no room for capability data after the shares "
            f"{', '.join(f'{k} {v}' for k, v in shares.items())}; lower data.neutral_share or the replay share"
        )
    for name, c in counts.items():
        if c and not parts.get(name):
            raise DataError(f"a batch needs {name} rows but the run has none")
    rng = random.Random(f"mix-{seed}")
    iters: dict[str, Any] = {}

    def cycle(rows: list[Row], r: random.Random) -> Any:
        order = list(range(len(rows)))
        while True:
            r.shuffle(order)
            for i in order:
                yield rows[i]

    for name in counts:
        if counts[name]:
            iters[name] = cycle(parts[name], random.Random(f"mix-{seed}-{name}"))
    out: list[Row] = []
    for _ in range(n_batches):
        block = [_slim(next(iters[name]), name) for name, c in counts.items() for _ in range(c)]
        rng.shuffle(block)
        out += block
    return out
