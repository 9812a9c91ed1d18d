"""GRPO steps/s of each RL-side method relative to naive GRPO, measured in one process, alternating.

Each arm trains ``--steps`` GRPO steps on the default organism's hack environment (the table's
settings, probes off); the arms run in turn, ``--rounds`` times, so machine load hits all of
them alike. Prints steps/s per arm (median over rounds) and the ratio to ``naive``.

    OMP_NUM_THREADS=1 python benchmarks/bench_grpo.py --steps 20 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def main() -> None:
    from rl_table import ARMS, BASE, _merge

    from tether.config import RunConfig, validate
    from tether.train import run_training

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="organism")
    args = ap.parse_args()
    speed: dict[str, list[float]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arm in ARMS:
                cfg = _merge(_merge(BASE, ARMS[arm]), {
                    "model": {"path": args.model},
                    "training": {"max_steps": args.steps, "seed": r, "save_steps": 10_000},
                    "probes": {"suite": "none"},
                })
                m = run_training(validate(cfg, RunConfig, arm), Path(tmp) / f"{arm}-{r}")
                speed[arm].append(m["train"]["steps"] / m["train"]["wall_s"])
    base = statistics.median(speed["naive"])
    print(f"{'method':16s} {'steps/s':>8s} {'vs naive':>9s}")
    for arm, xs in speed.items():
        s = statistics.median(xs)
        print(f"{arm:16s} {s:8.2f} {s / base:8.2f}x")


if __name__ == "__main__":
    main()
