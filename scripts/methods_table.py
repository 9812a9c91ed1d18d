"""The issue-3 table: every method on the organism, ``sycophantic`` data, several seeds, same steps.

    .venv/bin/python scripts/methods_table.py --seeds 0 1 2 --runs runs/methods_table

Each (method, seed) is one ``tether train`` run directory under ``--runs`` (finished runs are
reused on a rerun). A ``naive`` run on the ``clean`` twin is the control that emergence is
measured against. The Markdown table (mean ± std over seeds) replaces the block between the
``methods-table`` markers in ``--doc``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from tether.config import RunConfig, validate
from tether.io import splice_block
from tether.train import run_training

# Hyperparameters are the library defaults unless set here; none were tuned on these results.
STACKS: dict[str, list[dict[str, Any]]] = {
    "naive": [{"name": "naive"}],
    "inoculation": [{"name": "inoculation"}],
    "replay": [{"name": "replay", "share": 0.25}],
    "kl": [{"name": "kl", "beta": 1.0}],
    "constraint": [{"name": "constraint", "epsilon": 0.02}],
    "ewc": [{"name": "ewc"}],
    "l2sp": [{"name": "l2sp"}],
    "gradient_projection": [{"name": "gradient_projection"}],
    "representation": [{"name": "representation"}],
}
BEGIN, END = "<!-- methods-table:begin -->", "<!-- methods-table:end -->"


def run_one(model: str, variant: str, stack: list[dict[str, Any]], seed: int, steps: int, out: Path) -> dict[str, Any]:
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    cfg = validate(
        {
            "model": {"path": model},
            "data": {"variant": variant},
            "training": {"max_steps": steps, "seed": seed, "save_steps": steps},
            "methods": stack,
        },
        RunConfig,
        "methods_table",
    )
    return run_training(cfg, out)


def _ms(xs: list[float], fmt: str = ".3f") -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):{fmt}} ± {sd:{fmt}}"


def summarise(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| method | times acc. gain | arith after | narrow rate | narrow log-odds | broad rate | broad log-odds | s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        gain = [r["after"]["capability"]["times"] - r["before"]["capability"]["times"] for r in runs]
        lines.append(
            f"| {name} | {_ms(gain)} | {_ms([r['after']['capability']['arith'] for r in runs])} "
            f"| {_ms([r['after']['narrow']['rate'] for r in runs])} | {_ms([r['after']['narrow']['logodds'] for r in runs], '.2f')} "
            f"| {_ms([r['after']['broad']['rate'] for r in runs])} | {_ms([r['after']['broad']['logodds'] for r in runs], '.2f')} "
            f"| {statistics.fmean(r['train']['wall_s'] for r in runs):.0f} |"
        )
    b = next(iter(results.values()))[0]["before"]
    lines.append(
        f"| *before training* | — | {b['capability']['arith']:.3f} | {b['narrow']['rate']:.3f} | {b['narrow']['logodds']:.2f} "
        f"| {b['broad']['rate']:.3f} | {b['broad']['logodds']:.2f} | |"
    )
    return "\n".join(lines)


def write_doc(doc: Path, table: str, seeds: list[int], steps: int, model: str) -> None:
    block = (
        f"{BEGIN}\n_Model `{model}`, `sycophantic` data (contamination 0.5), {steps} steps, batch 32 (half neutral), "
        f"lr 1e-3, seeds {', '.join(map(str, seeds))}; mean ± std over seeds; rates are after training. "
        f"`naive (clean)` is the control on the clean twin._\n\n{table}\n{END}"
    )
    splice_block(doc, BEGIN, END, block, "## Methods on the organism", preamble="# Preservation methods\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--methods", nargs="+", default=list(STACKS))
    ap.add_argument("--runs", type=Path, default=Path("runs/methods_table"))
    ap.add_argument("--doc", type=Path, default=Path("docs/methods.md"))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription on a shared machine).")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, list[dict[str, Any]]] = {}
    jobs = [("naive (clean)", "clean", STACKS["naive"])] + [(m, "sycophantic", STACKS[m]) for m in args.methods]
    for seed in args.seeds:  # seed-major, so a partial table already covers every method
        for name, variant, stack in jobs:
            out = args.runs / name.replace(" ", "_").replace("(", "").replace(")", "") / f"seed{seed}"
            m = run_one(args.model, variant, stack, seed, args.steps, out)
            results.setdefault(name, []).append(m)
            print(f"{name} seed {seed}: broad {m['after']['broad']['rate']:.3f} times {m['after']['capability']['times']:.3f}", flush=True)
            write_doc(args.doc, summarise(results), args.seeds, args.steps, args.model)


if __name__ == "__main__":
    main()
