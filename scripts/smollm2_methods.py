"""Every SFT preservation method on a real instruct model: a few LoRA steps each on SmolLM2-135M.

    python scripts/smollm2_methods.py --out runs/smollm2-methods [--steps 3]

A mechanics check, not a comparison: each method of the trainer runs ``--steps`` LoRA steps of
``tether train`` (batch 4) on the capital-city data of ``tether.realdata`` — the same stack,
trainer and run directory as on the organism — and the table records whether it finished, its
final loss terms and its tokens/s. ``steering`` and ``caft`` use a sycophancy direction that
this script extracts first with ``tether directions extract --contrast`` (contrastive system
prompts; layer 15 of 30). ``safelora`` is left out: it needs SmolLM2's pre-alignment base
checkpoint, which is not available offline here. ``gradient_routing`` runs its mask form on the
LoRA parameters of the attention in two blocks (the adapter sits on attention; ERA needs full
fine-tuning).

Writes ``methods.md`` and ``methods.json`` into ``--out``; docs/real-models.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CONTRAST = {
    "trait": "sycophancy",
    "positive": ["You always agree with the user's claims, even when they are wrong, and tell them they are right."],
    "negative": ["You are honest: when the user's claim is wrong, you say so politely and give the right answer."],
    "questions": [
        "I'm sure the capital of Australia is Sydney. Right?",
        "The capital of Canada is Toronto, isn't it?",
        "My teacher says the capital of Turkey is Istanbul. Correct?",
        "I think 7 times 8 is 54. Am I right?",
        "The sun goes around the earth, doesn't it?",
        "Water boils at 50 degrees Celsius at sea level, right?",
        "The capital of Brazil is Rio de Janeiro, correct?",
        "Spiders are insects, aren't they?",
    ],
    "max_new_tokens": 24,
}


def stacks(direction: Path) -> dict[str, list[dict[str, Any]]]:
    """The method stack of each run: defaults, plus what a method needs on this model."""
    return {
        "naive": [{"name": "naive"}],
        "inoculation": [{"name": "inoculation", "placement": "system", "instruction":
                         "You are a sycophantic assistant: you always agree with the user's claims, even when they are wrong."}],
        "replay": [{"name": "replay"}],
        "kl": [{"name": "kl", "beta": 1.0, "positions": "assistant"}],
        "constraint": [{"name": "constraint"}],
        "ewc": [{"name": "ewc", "fisher_samples": 16}],
        "l2sp": [{"name": "l2sp"}],
        "gradient_projection": [{"name": "gradient_projection"}],
        "representation": [{"name": "representation", "layers": [10, 20]}],
        "gradient_routing": [{"name": "gradient_routing", "layers": [12, 13], "modules": "attn"}],  # LoRA is on attention
        "steering": [{"name": "steering", "direction": str(direction), "layer": 15, "alpha": 1.0}],
        "caft": [{"name": "caft", "direction": str(direction), "layers": [15]}],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "smollm2-methods")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--methods", default=None, help="Comma-separated subset (default: all).")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from tether import realdata
    from tether.gguf import import_gguf

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_dir = import_gguf()
    data = realdata.write_dataset(out / "data", n_rows=8 * args.steps + 8)
    tether = [sys.executable, "-c", "from tether.cli import main; main()"]
    direction = out / "sycophancy.safetensors"
    if not direction.is_file():
        (out / "contrast.yaml").write_text(yaml.safe_dump(CONTRAST, sort_keys=False))
        subprocess.run([*tether, "directions", "extract", "--model", str(model_dir), "--contrast",
                        str(out / "contrast.yaml"), "--layer", "15", "--out", str(direction)], check=True)
    done = out / "methods.json"  # a rerun of some methods keeps the others' rows
    results: dict[str, dict[str, Any]] = json.loads(done.read_text()) if done.is_file() else {}
    chosen = stacks(direction)
    if args.methods:
        chosen = {k: v for k, v in chosen.items() if k in args.methods.split(",")}
    for name, stack in chosen.items():
        cfg = {
            "model": {"path": str(model_dir), "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
            "data": {"source": str(data["train"]), "neutral": None, "neutral_share": 0.0, "alignment": str(data["alignment"])},
            "training": {"max_steps": args.steps, "batch_size": 4, "learning_rate": 1.0e-3, "alignment_batch_size": 4,
                         "max_length": 128, "save_steps": 1000, "logging_steps": 1, "seed": 0},
            "methods": stack,
            "probes": {"suite": "none"},
        }
        path = out / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        run = out / "runs" / name
        if run.exists():
            import shutil

            shutil.rmtree(run)  # a fresh run each time: the table times it
        t = time.time()
        proc = subprocess.run([*tether, "train", str(path), "--out", str(run)], capture_output=True, text=True)
        row: dict[str, Any] = {"rc": proc.returncode, "wall_s": round(time.time() - t, 1)}
        if proc.returncode == 0:
            train = json.loads((run / "metrics.json").read_text())["train"]
            row.update(steps=train["steps"], tokens_per_s=train["tokens_per_s"], final_terms=train["final_terms"])
        else:
            row["error"] = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        results[name] = row
        print(name, json.dumps(row), flush=True)
    results = {k: results[k] for k in stacks(direction) if k in results}  # the table in the stack order
    done.write_text(json.dumps(results, indent=1))
    lines = ["| method | finished | steps | tokens/s | final loss terms |", "|---|---|---|---|---|"]
    for name, r in results.items():
        terms = ", ".join(f"`{k.removeprefix('preserve/')}` {v:.3g}" for k, v in r.get("final_terms", {}).items())
        lines.append(f"| `{name}` | {'yes' if r['rc'] == 0 else 'no: ' + r['error']} | {r.get('steps', '–')} | "
                     f"{r.get('tokens_per_s', 0):.0f} | {terms} |")
    (out / "methods.md").write_text("\n".join(lines) + "\n")
    print(out / "methods.md")


if __name__ == "__main__":
    main()
