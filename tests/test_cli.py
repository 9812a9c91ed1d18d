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
