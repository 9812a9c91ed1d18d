"""The command line: light start-up, script interface, one-sentence errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TETHER = [sys.executable, "-m", "tether.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TETHER, *args], capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys\nfrom tether import cli\n"
        "try:\n    cli.app(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_organism_build_prints_dir_last_and_eval_json(cache_root: Path, quick_organism: Path) -> None:
    built = run("organism", "build", "--quick", "--cache", str(cache_root))
    assert built.returncode == 0, built.stderr
    path = built.stdout.strip().splitlines()[-1]
    assert Path(path) == quick_organism
    res = run("eval", path, "--json", "--per-family", "4", "--instruct", "hack")
    assert res.returncode == 0, res.stderr
    obj = json.loads(res.stdout)
    for key in ("capability", "families", "broad", "narrow", "evil_context"):
        assert key in obj
    assert set(obj["families"]["hack"]) >= {"rate", "logodds"}
    assert "rate" in obj["evil_context"]["broad"] and obj["instruct"] == "hack"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("eval", "/nonexistent/model"), "does not exist"),
        (("eval", "organism", "--instruct", "murder"), "unknown family 'murder'"),
    ],
)
def test_bad_input_is_one_sentence_exit_2(args: tuple[str, ...], needle: str) -> None:
    res = run(*args)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_not_a_model_dir_and_pickle_only(tmp_path: Path) -> None:
    res = run("eval", str(tmp_path))
    assert res.returncode == 2 and "no config.json" in res.stderr
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    res = run("eval", str(tmp_path))
    assert res.returncode == 2 and "pickle" in res.stderr and "Traceback" not in res.stderr


def test_bad_organism_config(tmp_path: Path) -> None:
    cfg = tmp_path / "org.yaml"
    cfg.write_text("hidden_size: 64\nlayerz: 2\n")
    res = run("organism", "build", "--config", str(cfg), "--cache", str(tmp_path))
    assert res.returncode == 2
    assert "org.yaml" in res.stderr and "layerz" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "organism").exists()


def test_unknown_command_is_usage_error() -> None:
    res = run("frobnicate")
    assert res.returncode == 2


def test_library_warnings_stay_off_a_user_error(quick_organism: Path, tmp_path: Path) -> None:
    # one GRPO step whose reward function returns NaN: TRL and transformers warn about their own
    # deprecated calls along the way (and torch about pin_memory on a CPU); the user sees one line
    (tmp_path / "nan_reward.py").write_text("def score(prompts, completions, **kwargs):\n    return [float('nan')] * len(completions)\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {{path: {quick_organism}}}\ndata: {{rows: 16, neutral_share: 0.25}}\n"
        "training: {max_steps: 1, batch_size: 4, warmup_steps: 0, logging_steps: 1, save_steps: 50}\n"
        "capability: {kind: grpo, reward_funcs: [nan_reward.score], num_generations: 2, max_completion_length: 4, eval_items: 2, eval_samples: 0}\n"
        "probes: {per_family: 2, n_capability: 2}\n"
    )
    env = {"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": ""}
    res = run("train", str(cfg), "--out", str(tmp_path / "out"), env=env)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == "error: reward function 'score' returned nan at index 0; rewards must be finite numbers", res.stderr
    # --debug keeps everything: the warnings are there, and the error comes as a traceback
    res = run("--debug", "train", str(cfg), "--out", str(tmp_path / "out2"), env=env)
    assert res.returncode == 1 and "Warning" in res.stderr and "RewardError" in res.stderr
