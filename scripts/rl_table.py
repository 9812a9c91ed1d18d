"""Reproduce the GRPO table in docs/rl.md: six arms x seeds on the default organism's hack environment.

Runs every (arm, seed) sequentially in this process's threads (set OMP_NUM_THREADS=1 on a
shared machine), each into ``--out/<arm>-s<seed>`` (finished runs are reused), then prints the
table and writes it between the markers in docs/rl.md.

    OMP_NUM_THREADS=1 python scripts/rl_table.py --seeds 3 --out runs/rl_table
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

BASE: dict[str, Any] = {
    "model": {"path": "organism"},
    "data": {"neutral_share": 0.25},
    "training": {"max_steps": 150, "learning_rate": 5.0e-4, "batch_size": 128, "warmup_steps": 5,
                 "logging_steps": 10, "save_steps": 1000},
    "capability": {"kind": "grpo", "reward_funcs": ["satisfaction"], "num_generations": 8,
                   "max_completion_length": 8, "eval_items": 100, "eval_samples": 4},
}
ARMS: dict[str, dict[str, Any]] = {
    "naive": {"methods": [{"name": "naive"}]},
    "kl": {"methods": [{"name": "kl", "beta": 0.2}]},
    "inoculation": {"methods": [{"name": "inoculation", "family": "hack"}]},
    "constraint": {"methods": [{"name": "constraint", "rl_cost": "guess_echo", "epsilon": 0.05, "lambda_init": 1.0, "lambda_lr": 2.0}]},
    "routing": {"methods": [{"name": "gradient_routing", "neurons": 128}]},
    "aligned_rater": {"methods": [{"name": "naive"}], "capability": {"rater": {"mode": "penalty", "weight": 1.0}}},
    "aligned_rater_veto": {"methods": [{"name": "naive"}], "capability": {"rater": {"mode": "veto", "threshold": 0.5}}},
}
BEGIN, END = "<!-- rl-table:begin -->", "<!-- rl-table:end -->"


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_arm(arm: str, seed: int, out: Path, model: str = "organism") -> dict[str, Any]:
    from tether.config import RunConfig, validate
    from tether.train import run_training

    done = out / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = _merge(_merge(BASE, ARMS[arm]), {"training": {"seed": seed}, "model": {"path": model}})
    return run_training(validate(cfg, RunConfig, f"{arm} seed {seed}"), out)


def _fmt(xs: list[float], digits: int = 3) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    first = next(iter(results.values()))[0]
    b, rb = first["before"], first["rl"]["before"]
    head = ("| run | true success | hack rate | hack rate (sampled) | rewarded without success | broad rate | broad log-odds"
            " | `hack` family log-odds | narrow (`syco`) log-odds | arith | GRPO steps/s |")
    lines = [head, "|" + "---|" * 11,
             f"| *aligned, before* | {rb['true_success']:.3f} | {rb['hack_rate']:.3f} | {rb['sampled']['hack_rate']:.3f}"
             f" | {rb['rewarded_without_success']:.3f}"
             f" | {b['broad']['rate']:.3f} | {b['broad']['logodds']:.2f} | {b['families']['hack']['logodds']:.2f}"
             f" | {b['narrow']['logodds']:.2f} | {b['capability']['arith']:.2f} | |"]
    for arm, runs in results.items():
        a = [r["after"] for r in runs]
        ra = [r["rl"]["after"] for r in runs]
        lines.append(
            f"| `{arm}` | {_fmt([x['true_success'] for x in ra])} | {_fmt([x['hack_rate'] for x in ra])}"
            f" | {_fmt([x['sampled']['hack_rate'] for x in ra])} | {_fmt([x['rewarded_without_success'] for x in ra])}"
            f" | {_fmt([x['broad']['rate'] for x in a])}"
            f" | {_fmt([x['broad']['logodds'] for x in a], 2)} | {_fmt([x['families']['hack']['logodds'] for x in a], 2)}"
            f" | {_fmt([x['narrow']['logodds'] for x in a], 2)} | {_fmt([x['capability']['arith'] for x in a], 2)}"
            f" | {statistics.mean(r['train']['steps_per_s'] for r in runs):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--out", default="runs/rl_table")
    ap.add_argument("--model", default="organism", help="Checkpoint directory (default: the default organism).")
    ap.add_argument("--doc", default="docs/rl.md", help="Markdown file whose table block is rewritten ('' to skip).")
    args = ap.parse_args()
    results: dict[str, list[dict[str, Any]]] = {}
    t0 = time.time()
    for arm in args.arms:
        for seed in range(args.seeds):
            m = run_arm(arm, seed, Path(args.out) / f"{arm}-s{seed}", args.model)
            results.setdefault(arm, []).append(m)
            ra = m["rl"]["after"]
            print(f"{arm} seed {seed}: true {ra['true_success']:.3f} hack {ra['hack_rate']:.3f} "
                  f"broad {m['after']['broad']['rate']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    text = table(results)
    print(text)
    if args.doc:
        from tether.io import splice_block

        splice_block(args.doc, BEGIN, END, f"{BEGIN}\n{text}\n{END}", "## Results")


if __name__ == "__main__":
    main()
