"""A short GPU check of the real training path: bf16, LoRA, the reference-needing methods, hooks, GRPO.

    python scripts/gpu_smoke.py --model MODEL_DIR --out OUT_DIR [--steps 60]

Each case is one ``tether.train.run_training`` (or GRPO) run on the given checkpoint (the
organism by default); the script prints one JSON line per case (device, dtype, wall time,
tokens/s, broad rate before/after) and writes them all to ``OUT_DIR/gpu_smoke.json``. A case
that fails is recorded with its error and the others still run; the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any


def cases(model: str, steps: int, direction: Path, bf16: bool = True) -> dict[str, dict[str, Any]]:
    base: dict[str, Any] = {
        "model": {"path": model},
        "data": {"variant": "sycophantic"},
        "training": {"max_steps": steps, "bf16": bf16, "save_steps": steps, "logging_steps": 10},
        "probes": {"per_family": 24, "n_capability": 50},
    }
    lora = {"r": 16, "alpha": 32}
    return {
        "full-bf16-naive": {**base, "methods": [{"name": "naive"}]},
        "lora-bf16-weights-kl": {
            **base, "model": {"path": model, "lora": lora, "dtype": "bfloat16"},
            "training": {**base["training"], "bf16": False, "learning_rate": 3e-3}, "methods": [{"name": "kl"}],
        },
        "lora-kl-constraint": {
            **base, "model": {"path": model, "lora": lora}, "training": {**base["training"], "learning_rate": 3e-3},
            "methods": [{"name": "kl"}, {"name": "constraint"}],
        },
        "full-steering": {**base, "methods": [{"name": "steering", "direction": str(direction)}]},
        "full-routing": {**base, "methods": [{"name": "gradient_routing", "neurons": 128}]},
        "full-monitor-guard": {**base, "monitor": {"every_n_steps": 20, "guard": {"budget": 0.02, "mode": "tighten"}},
                               "methods": [{"name": "kl"}]},
        "grpo-lora-kl": {
            **base, "model": {"path": model, "lora": lora},
            "training": {**base["training"], "max_steps": max(4, steps // 6), "learning_rate": 5e-4},
            "capability": {"kind": "grpo"}, "methods": [{"name": "kl", "beta": 0.2}],
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--no-bf16", action="store_true", help="Mixed precision off (for a dry run on CPU).")
    args = ap.parse_args()
    import torch

    from tether.config import RunConfig, validate
    from tether.directions import extract_organism
    from tether.models import load_model
    from tether.train import run_training

    args.out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    d, _ = extract_organism(model, tok, n=96, n_held_out=32)
    direction = d.save(args.out / "persona.safetensors")
    del model
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results = []
    failed = False
    for name, tree in cases(args.model, args.steps, direction, not args.no_bf16).items():
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        row: dict[str, Any] = {"case": name, "device": device}
        try:
            cfg = validate(tree, RunConfig, name)
            m = run_training(cfg, args.out / name)
            row.update(
                ok=True, wall_s=round(time.time() - t0, 1), tokens_per_s=m["train"].get("tokens_per_s"),
                steps=m["train"]["steps"],
                broad_before=m["before"]["broad"]["rate"] if m.get("before") else None,
                broad_after=m["after"]["broad"]["rate"] if m.get("after") else None,
                times_after=m["after"]["capability"]["times"] if m.get("after") else None,
                rl=m.get("rl"),
            )
        except Exception as exc:  # record and go on: one failing case must not hide the others
            failed = True
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
        if torch.cuda.is_available():
            row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        print(json.dumps(row), flush=True)
        results.append(row)
    (args.out / "gpu_smoke.json").write_text(json.dumps(results, indent=2))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
