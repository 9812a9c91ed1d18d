"""Throughput of every method relative to ``naive``, side by side, and ``naive`` relative to plain TRL.

    .venv/bin/python benchmarks/bench_methods.py --model organism --steps 40 --repeats 2

Every configuration trains the same model on the same pre-mixed data for ``--steps`` steps;
configurations are interleaved round-robin ``--repeats`` times and the median tokens/s is kept,
so drift in machine load hits all of them alike. Tokens are the training batches' tokens
(attention mask), so extra forward passes of a method count as cost. ``--memory`` also measures
peak memory of LoRA + kl against LoRA naive, each in its own process (peak RSS on CPU, peak
allocated CUDA memory on a GPU). Results go to stdout as JSON and, with ``--doc``, into the
block between the ``bench`` markers of that Markdown file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tether.io import splice_block

METHODS = [
    "naive", "inoculation", "replay", "ewc", "l2sp", "kl", "constraint", "representation", "gradient_projection",
    "gradient_routing", "steering", "caft",
]
TARGETS = {
    "inoculation": 0.95, "replay": 0.95, "ewc": 0.9, "l2sp": 0.9, "kl": 0.6, "constraint": 0.6, "representation": 0.6,
    "gradient_routing": 0.85, "steering": 0.95, "caft": 0.95,
}
PARAMS: dict[str, dict[str, Any]] = {"gradient_routing": {"neurons": 128}}
"""Method settings beyond the defaults (steering and caft get the model's persona direction)."""
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _cfg(model: str, method: str, steps: int, lora: bool) -> Any:
    from tether.config import RunConfig, validate

    data: dict[str, Any] = {
        "model": {"path": model, **({"lora": {"r": 8}} if lora else {})},
        "data": {"rows": 2000},
        "training": {"max_steps": steps, "save_steps": steps + 1, "logging_steps": steps + 1},
        "methods": [{"name": "naive" if method == "trl" else method, **PARAMS.get(method, {})}],
        "probes": {"suite": "none"},
    }
    return validate(data, RunConfig, "bench")


def run(model: str, method: str, steps: int, lora: bool = False, tmp: Path = Path(tempfile.gettempdir()) / "tether-bench") -> dict[str, float]:
    """Train one configuration; return tokens/s and wall time of ``train()`` alone."""
    import torch
    from trl import SFTTrainer

    from tether.train import make_trainer, prepare_run, sft_config

    cfg = _cfg(model, method, steps, lora)
    prepared = prepare_run(cfg)
    if method == "trl":
        args = sft_config(cfg, tmp, prepared.fmt, save=False)
        from trl import SFTConfig

        # the same settings, as TRL's own config class (our extra fields dropped)
        plain = SFTConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SFTConfig) if f.init})
        trainer: Any = SFTTrainer(model=prepared.model, args=plain, train_dataset=prepared.train_dataset, processing_class=prepared.tokenizer)
    else:
        trainer = make_trainer(cfg, prepared, tmp, save=False)
        trainer.setup_methods()  # one-off work (Fisher) is not throughput
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its log dicts; stdout is the JSON result
        trainer.train()
    wall = time.perf_counter() - t0
    out = {"tokens_per_s": trainer._total_train_tokens / wall, "steps_per_s": trainer.state.global_step / wall, "wall_s": wall}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def peak_memory(model: str, method: str, steps: int, threads: int) -> float:
    """Peak memory (MB) of a LoRA run of ``method`` in a fresh process."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", method, "--model", model, "--steps", str(steps), "--threads", str(threads)],
        stdout=subprocess.PIPE, text=True,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    text = proc.stdout.read() if proc.stdout else ""
    if status != 0:
        raise SystemExit(f"child {method} failed")
    child = json.loads(text.strip().splitlines()[-1])
    return float(child.get("peak_cuda_mb", usage.ru_maxrss / 1024))


def write_doc(doc: Path, result: dict[str, Any]) -> None:
    rel = result["relative_to_naive"]
    lines = [
        BEGIN,
        f"_`benchmarks/bench_methods.py`: {Path(result['model']).name}, {result['steps']} steps × {result['repeats']} interleaved repeats, "
        f"batch 32, {result['device']}; median tokens/s._",
        "",
        "| method | tokens/s | × naive | steps/s × naive | target |",
        "|---|---|---|---|---|",
    ]
    for m, v in result["tokens_per_s"].items():
        tgt = TARGETS.get(m)
        lines.append(
            f"| {m} | {v:.0f} | {rel[m]:.2f} | {result['steps_relative_to_naive'][m]:.2f} | {'≥ %.2f' % tgt if tgt else ''} |"
        )
    lines.append(
        "\nTokens are the real (unpadded) tokens of the training batches. `replay` and `inoculation` "
        "train on other rows than `naive` (longer ones), so their steps/s is lower by design and "
        "tokens/s is their like-for-like cost."
    )
    lines.append(f"\n`naive` / plain TRL `SFTTrainer`: **{result['naive_over_trl']:.2f}×** (target ≥ 0.95).")
    if "memory_mb" in result:
        mem = result["memory_mb"]
        lines.append(
            f"\nPeak memory, LoRA + kl vs LoRA naive: {mem['kl']:.0f} MB vs {mem['naive']:.0f} MB = "
            f"**{mem['kl'] / mem['naive']:.3f}×** (target ≤ 1.1; {mem['kind']})."
        )
    lines.append(END)
    block = "\n".join(lines)
    splice_block(doc, BEGIN, END, block, "## Throughput", preamble="# Preservation methods\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--memory", action="store_true", help="Also compare peak memory of LoRA + kl and LoRA naive.")
    ap.add_argument("--doc", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription on a shared machine).")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run(args.model, args.child, args.steps, lora=True)))
        return
    if {"steering", "caft"} & set(args.methods):
        from tether.directions import extract_organism, save_direction
        from tether.models import load_model

        model, tok = load_model(args.model)
        d, _ = extract_organism(model, tok, n=48, n_held_out=16)
        path = save_direction(Path(tempfile.mkdtemp()) / "persona.safetensors", d.vectors, d.meta)
        PARAMS["steering"] = PARAMS["caft"] = {"direction": str(path)}
    configs = ["trl", *args.methods]
    speeds: dict[str, list[float]] = {c: [] for c in configs}
    steps: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(args.repeats):
        for c in configs:
            got = run(args.model, c, args.steps)
            speeds[c].append(got["tokens_per_s"])
            steps[c].append(got["steps_per_s"])
            print(f"repeat {r} {c}: {speeds[c][-1]:.0f} tokens/s", file=sys.stderr, flush=True)
    med = {c: statistics.median(v) for c, v in speeds.items()}
    med_steps = {c: statistics.median(v) for c, v in steps.items()}
    result: dict[str, Any] = {
        "model": args.model, "steps": args.steps, "repeats": args.repeats,
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "tokens_per_s": {m: med[m] for m in args.methods},
        "relative_to_naive": {m: med[m] / med["naive"] for m in args.methods},
        "steps_relative_to_naive": {m: med_steps[m] / med_steps["naive"] for m in args.methods},
        "naive_over_trl": med["naive"] / med["trl"],
    }
    if args.memory:
        result["memory_mb"] = {
            "naive": peak_memory(args.model, "naive", args.steps, args.threads),
            "kl": peak_memory(args.model, "kl", args.steps, args.threads),
            "kind": "peak CUDA allocated" if torch.cuda.is_available() else "peak RSS of the process",
        }
    print(json.dumps(result, indent=2))
    if args.doc:
        write_doc(args.doc, result)


if __name__ == "__main__":
    main()
