"""The alignment monitor logs readings; the guard stops and restores, or tightens."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from tether.config import GuardConfig, MonitorConfig
from tether.monitor import AlignmentMonitor


class _Scripted(AlignmentMonitor):
    """A monitor whose readings follow a script (broad rate per step)."""

    def __init__(self, cfg: MonitorConfig, run_dir: Path, script: dict[int, float]) -> None:
        super().__init__(cfg, run_dir, tokenizer=object())
        self.script = script

    def _reading(self, model: Any, step: int) -> dict[str, Any]:
        return {"step": step, "probe/broad/rate": self.script[step], "probe/broad/logodds": 0.0}


def _state(step: int) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, is_world_process_zero=True, log_history=[])


def test_guard_stops_and_restores_last_reading_within_budget(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 3)
    cfg = MonitorConfig(every_n_steps=2, guard=GuardConfig(budget=0.02, mode="stop"))
    mon = _Scripted(cfg, tmp_path, {0: 0.10, 2: 0.11, 4: 0.30})
    control = SimpleNamespace(should_training_stop=False)
    mon.on_train_begin(None, _state(0), control, model=model)
    with torch.no_grad():
        model.weight.add_(1.0)
    mon.on_step_end(None, _state(2), control, model=model)  # rise 0.01: within budget, snapshot
    at_step_2 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(5.0)
    mon.on_step_end(None, _state(3), control, model=model)  # not a monitor step
    assert not control.should_training_stop
    mon.on_step_end(None, _state(4), control, model=model)  # rise 0.20 > 0.02
    assert control.should_training_stop
    assert torch.equal(model.weight, at_step_2)
    events = [json.loads(x) for x in (tmp_path / "guard.jsonl").read_text().splitlines()]
    assert events == [{"step": 4, "rise": events[0]["rise"], "budget": 0.02, "mode": "stop", "restored_step": 2}]
    assert abs(events[0]["rise"] - 0.20) < 1e-9
    readings = (tmp_path / "monitor.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in readings] == [0, 2, 4]


def test_guard_tighten_scales_method_strength(tmp_path: Path) -> None:
    class Method:
        name = "kl"
        beta = 1.0

        def tighten(self, factor: float) -> float:
            self.beta *= factor
            return self.beta

    method = Method()
    cfg = MonitorConfig(every_n_steps=1, guard=GuardConfig(budget=0.0, mode="tighten", tighten_factor=3.0))
    mon = _Scripted(cfg, tmp_path, {0: 0.0, 1: 0.5})
    mon.trainer = SimpleNamespace(methods=[method], log=lambda d: None)
    control = SimpleNamespace(should_training_stop=False)
    model = torch.nn.Linear(2, 2)
    mon.on_train_begin(None, _state(0), control, model=model)
    mon.on_step_end(None, _state(1), control, model=model)
    assert method.beta == 3.0 and not control.should_training_stop


def test_reading_joins_its_steps_log_entry(tmp_path: Path) -> None:
    """A reading goes into the trainer's pending metrics and asks for a log at its own step.

    (So it shares the step's entry with the loss instead of displacing it, and a checkpoint saved
    at that step holds it.)
    """
    from collections import defaultdict

    cfg = MonitorConfig(every_n_steps=2)
    mon = _Scripted(cfg, tmp_path, {0: 0.1, 2: 0.3})
    logged: list[dict[str, Any]] = []
    mon.trainer = SimpleNamespace(methods=[], _metrics={"train": defaultdict(list)}, log=logged.append)
    control = SimpleNamespace(should_training_stop=False, should_log=False)
    model = torch.nn.Linear(2, 2)
    mon.on_train_begin(None, _state(0), control, model=model)
    mon.on_step_end(None, _state(1), control, model=model)  # not a monitor step
    assert not control.should_log and not mon.trainer._metrics["train"]
    mon.on_step_end(None, _state(2), control, model=model)
    assert control.should_log and logged == []
    assert dict(mon.trainer._metrics["train"]) == {"probe/broad/rate": [0.3], "probe/broad/logodds": [0.0]}


def test_run_resumed_from_its_last_checkpoint_reports_the_same_terms(quick_organism: Path, tmp_path: Path) -> None:
    """A run that died after its final checkpoint and is rerun reports the same final multiplier.

    (Terms logged at a monitor step used to wait for the train-end entry, which a resume from the
    final checkpoint never reproduces: λ came back one step stale.)
    """
    from tether.config import RunConfig, validate
    from tether.train import run_training

    raw = {
        "monitor": {"every_n_steps": 2, "per_family": 4, "guard": {"budget": 0.0, "mode": "tighten"}},
        "model": {"path": str(quick_organism)}, "data": {"rows": 128},
        "training": {"max_steps": 4, "batch_size": 16, "learning_rate": 0.005, "save_steps": 2, "logging_steps": 1},
        "methods": [{"name": "constraint", "epsilon": 0.0, "lambda_lr": 10.0}],
        "probes": {"per_family": 4, "n_capability": 4},
    }
    out = tmp_path / "run"
    run_training(validate(raw, RunConfig, "run.yaml"), out)
    first = json.loads((out / "metrics.json").read_text())["train"]
    (out / "metrics.json").unlink()  # as if killed after the last checkpoint
    run_training(validate(raw, RunConfig, "run.yaml"), out)
    again = json.loads((out / "metrics.json").read_text())["train"]
    assert again["resumed_from"] == "checkpoint-4"
    lam = "preserve/constraint/lambda"
    assert first["final_terms"][lam] != 1.0 and again["final_terms"][lam] == first["final_terms"][lam]
    assert again["final_loss"] == first["final_loss"]
