"""Faults during ``tether train``: a NaN/inf loss or gradient, Ctrl-C (SIGINT) and SIGKILL.

* a non-finite loss or gradient norm stops training *before* that step's update with a
  one-sentence ``TetherError`` naming the step; the checkpoints on disk are the good ones and the
  run directory resumes; through ``tether train`` it is one ``error:`` line, exit code 2, no traceback;
* SIGINT to a real ``tether train`` process finishes the step, saves it and exits 130 with one
  line; rerunning resumes; a SIGKILL of that rerun (plus a checkpoint left half-written) resumes
  again from the last complete checkpoint, and the final weights and probes equal those of an
  uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import yaml
from pydantic import Field

from tether.config import RunConfig, load_config, validate
from tether.methods import registry
from tether.methods.base import Method, MethodConfig
from tether.train import NonFiniteLossError, TrainingInterrupted, last_complete_checkpoint, run_training


def _cfg(model: Path, **training: Any) -> dict[str, Any]:
    return {
        "model": {"path": str(model)},
        "data": {"rows": 200},
        "training": {"max_steps": 4, "batch_size": 16, "warmup_steps": 1, "learning_rate": 0.005,
                     "save_steps": 1, "logging_steps": 1, "alignment_batch_size": 8, **training},
        "methods": [{"name": "naive"}],
        "probes": {"per_family": 6, "n_capability": 8},
    }


class _NaNConfig(MethodConfig):
    nan_step: int = Field(3, ge=1)


class _NaNAt(Method):
    """Test-only: adds NaN to the loss at step ``nan_step`` while ``armed``."""

    name = "test_nan_at"
    Config = _NaNConfig
    config: _NaNConfig
    armed: ClassVar[bool] = True

    def __init__(self, config: _NaNConfig | None = None) -> None:
        super().__init__(config)
        self.done = 0

    def loss_terms(self, ctx: Any, model: Any, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.armed and self.done + 1 == self.config.nan_step:
            return {"boom": torch.tensor(float("nan"))}
        return {}

    def on_step_end(self, ctx: Any, step: int) -> None:
        self.done = step

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = int(state["done"])


def _finite(ckpt: Path) -> bool:
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for t in load_file(str(ckpt / "model.safetensors")).values())


def test_nan_loss_stops_before_the_step_and_the_run_resumes(
    quick_organism: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.available()  # load the built-ins first
    monkeypatch.setitem(registry._REGISTRY, _NaNAt.name, _NaNAt)
    data = _cfg(quick_organism)
    data["methods"] = [{"name": "naive"}, {"name": "test_nan_at", "nan_step": 3}]
    cfg = validate(data, RunConfig, "run.yaml")
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        run_training(cfg, out)
    msg = str(err.value)
    assert msg.startswith("the training loss became NaN or inf at step 3, so training stopped before applying that step")
    assert "keeps its last good checkpoint checkpoint-2" in msg and "\n" not in msg
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-1", "checkpoint-2"]  # nothing of step 3 was saved
    assert _finite(out / "checkpoints" / "checkpoint-2")
    assert not (out / "metrics.json").exists() and not (out / "model").exists()

    # the run directory is intact: the same config resumes from checkpoint-2 and finishes
    monkeypatch.setattr(_NaNAt, "armed", False)
    metrics = run_training(cfg, out)
    assert metrics["train"]["resumed_from"] == "checkpoint-2" and metrics["train"]["steps"] == 4
    assert math.isfinite(metrics["train"]["final_loss"])


# What the CLI prints for these faults (docs/bad-inputs.md shows them; ``<tmp>`` and ``<step>`` stand for
# the run's folder and step): asserted below against real `tether train` processes.
NAN_LINE = (
    "error: the training loss became NaN or inf at step 3, so training stopped before applying that step "
    "(<tmp>/run keeps its last good checkpoint checkpoint-2); lower training.learning_rate and train into a new --out"
)
SIGINT_LINE = (
    "stopped: interrupted at step <step> of 40: saved <tmp>/run/checkpoints/checkpoint-<step>; "
    "run the same command again to resume"
)

# `tether train` in a real process with the test-only NaN method registered (a method package would
# register it through the `tether.methods` entry point; this test has none)
NAN_CLI = """
import sys
sys.path.insert(0, {tests!r})
from test_train_faults import _NaNAt
from tether.methods import registry
registry.available()
registry._REGISTRY[_NaNAt.name] = _NaNAt
from tether.cli import main
sys.argv = ["tether", *sys.argv[1:]]
main()
"""


def test_nan_loss_through_the_cli_is_one_line_exit_2_and_keeps_the_last_good_checkpoint(quick_organism: Path, tmp_path: Path) -> None:
    data = _cfg(quick_organism)
    data["methods"] = [{"name": "naive"}, {"name": "test_nan_at", "nan_step": 3}]
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    runner = tmp_path / "tether_nan.py"
    runner.write_text(NAN_CLI.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, str(runner), "train", str(cfg_file), "--out", str(out)],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    # one line, the last thing on stderr (the datasets' progress bars may come before it)
    assert len(errors) == 1 and res.stderr.strip().splitlines()[-1] == errors[0], res.stderr[-3000:]
    assert errors[0].replace(str(tmp_path), "<tmp>") == NAN_LINE
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-1", "checkpoint-2"] and _finite(out / "checkpoints" / "checkpoint-2")
    assert last_complete_checkpoint(out / "checkpoints") == str(out / "checkpoints" / "checkpoint-2")
    assert not (out / "metrics.json").exists() and not (out / "model").exists()


def test_exploding_learning_rate_is_caught_at_the_first_nan_gradient(quick_organism: Path, tmp_path: Path) -> None:
    # lr 1e6: the weights blow up within a few steps; whichever of loss and gradient norm goes first,
    # no checkpoint may hold the poisoned weights
    cfg = validate(_cfg(quick_organism, learning_rate=1e6, max_steps=8), RunConfig, "run.yaml")
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"^the training (loss|gradient norm) became NaN or inf at step \d+") as err:
        run_training(cfg, out)
    step = err.value.step
    assert 1 < step < 8
    last = last_complete_checkpoint(out / "checkpoints")
    assert last is not None and Path(last).name == f"checkpoint-{step - 1}"
    assert all(_finite(p) for p in (out / "checkpoints").glob("checkpoint-*"))


# ---- real processes: SIGINT, then SIGKILL, then a clean finish --------------------------------

LONG = {"max_steps": 40, "save_steps": 5, "logging_steps": 5, "save_total_limit": 3}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


def _start(cfg_file: Path, out: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tether.cli", "train", str(cfg_file), "--out", str(out)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=open(log, "wb"))


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    end = time.time() + timeout
    while not path.is_file():
        assert proc.poll() is None, f"tether train ended before {path} appeared"
        assert time.time() < end, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


def test_sigint_saves_and_exits_130_then_sigkill_then_rerun_matches_uninterrupted(quick_organism: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data = _cfg(quick_organism, **LONG)
    data["methods"] = [{"name": "constraint", "epsilon": 0.0}]  # λ is state a resume must restore
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    whole = run_training(validate(data, RunConfig, "run.yaml"), tmp_path / "whole")

    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    # 1. Ctrl-C once the first checkpoint is complete: the step in progress is saved, exit 130
    proc = _start(cfg_file, out, tmp_path / "sigint.log")
    _wait_for(ckpts / "checkpoint-5" / "preserve_state.json", proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    log = (tmp_path / "sigint.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    lines = log.strip().splitlines()
    stopped = [ln for ln in lines if ln.startswith("stopped:")]
    assert len(stopped) == 1 and lines[-1] == stopped[0], lines[-5:]  # one line, the last one
    step = int(stopped[0].split("interrupted at step ")[1].split()[0])
    assert 5 <= step < 40
    assert re.sub(rf"\b{step}\b", "<step>", stopped[0].replace(str(tmp_path), "<tmp>")) == SIGINT_LINE
    assert last_complete_checkpoint(ckpts) == str(ckpts / f"checkpoint-{step}")
    assert not (out / "metrics.json").exists()

    # 2. the same command resumes; SIGKILL it after its next checkpoint; a kill in the middle of a
    #    save leaves a folder without preserve_state.json (written last), simulated here
    proc = _start(cfg_file, out, tmp_path / "sigkill.log")
    nxt = (step // 5 + 1) * 5
    _wait_for(ckpts / f"checkpoint-{nxt}" / "preserve_state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    last = int(Path(last_complete_checkpoint(ckpts) or "x-0").name.split("-")[1])
    assert nxt <= last < 40
    half = ckpts / f"checkpoint-{last + 1}"
    half.mkdir(exist_ok=True)
    (half / "model.safetensors").write_bytes(b"half")

    # 3. the same run again (in this process: `tether train` is this call): resumes from the last
    #    complete checkpoint, drops the half-written one and finishes
    resumed = run_training(load_config(cfg_file, RunConfig), out)
    assert resumed["train"]["resumed_from"] == f"checkpoint-{last}" and resumed["train"]["steps"] == 40
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 40

    w1 = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    w2 = load_file(str(out / "model" / "model.safetensors"))
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"interrupted+killed+resumed vs uninterrupted: max |Δw| = {diff:.3g}")
    assert diff < 1e-5
    lam = resumed["train"]["final_terms"]["preserve/constraint/lambda"]
    assert lam == pytest.approx(whole["train"]["final_terms"]["preserve/constraint/lambda"], rel=1e-5)
    for group in ("narrow", "broad"):
        assert resumed["after"][group]["rate"] == whole["after"][group]["rate"]
        assert resumed["after"][group]["logodds"] == pytest.approx(whole["after"][group]["logodds"], abs=1e-4)
    assert resumed["after"]["capability"] == whole["after"]["capability"]


def test_interrupted_error_exits_130() -> None:
    assert TrainingInterrupted.exit_code == 130
    assert NonFiniteLossError(3).exit_code == 2
