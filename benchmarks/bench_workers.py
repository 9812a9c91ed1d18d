"""Wall time of a local sweep with runs forked from the preloaded fork server vs one interpreter per run.

The same sweep (``--runs`` short ``naive`` runs on the default organism, two workers, probes on
as in the demo) runs under both launch modes in turn, ``--rounds`` times, each into a fresh
directory, so machine load hits both alike. Prints the median wall time per mode and the ratio.

    python benchmarks/bench_workers.py --runs 8 --steps 20 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> None:
    from tether import compare
    from tether.compare import SweepConfig, plan_runs, run_sweep_local

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default="organism")
    args = ap.parse_args()
    sweep = SweepConfig.model_validate({
        "base": {"model": {"path": args.model}, "data": {"variant": "sycophantic"},
                 "training": {"max_steps": args.steps, "save_steps": 10_000}},
        "grid": {"training.learning_rate": [1e-3]},
        "seeds": list(range(args.runs)),
    })
    fork_server = compare._fork_server
    modes: dict[str, Any] = {"forked": fork_server, "subprocess": lambda: None}
    wall: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode, ctx in modes.items():
                compare._fork_server = ctx
                t0 = time.perf_counter()
                manifest = run_sweep_local(plan_runs(sweep), Path(tmp) / f"{mode}-{r}", workers=args.workers)
                wall[mode].append(time.perf_counter() - t0)
                failed = {k: v["error"] for k, v in manifest.runs.items() if v["status"] != "done"}
                if failed:
                    raise SystemExit(f"{mode}: runs failed: {failed}")
    compare._fork_server = fork_server
    med = {m: statistics.median(xs) for m, xs in wall.items()}
    print(f"{args.runs} runs x {args.steps} steps, {args.workers} workers, {args.rounds} rounds (median wall s)")
    for mode, s in med.items():
        print(f"{mode:12s} {s:7.1f} s  {[round(x, 1) for x in wall[mode]]}")
    print(f"forked / subprocess wall: {med['forked'] / med['subprocess']:.2f}x")


if __name__ == "__main__":
    main()
