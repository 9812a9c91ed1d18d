"""The alignment monitor and guard: propensity probes during training, and a budget that acts.

``AlignmentMonitor`` runs the organism's propensity probes (held-out probe templates, never the
training data) every N optimizer steps, writes each reading to ``RUN_DIR/monitor.jsonl`` and logs
``probe/<family>/rate`` and ``probe/<family>/logodds`` (plus ``probe/broad/*``) through the
trainer's ``log``, so they reach ``report_to`` and the training log.

``guard`` puts a budget on the rise of the broad misaligned rate over the model before training.
When a reading exceeds it:

* ``stop`` — training stops and the weights of the last reading inside the budget are restored
  (kept in memory as a copy of the trainable parameters, or step 0's);
* ``tighten`` — every method with a tunable strength (the Lagrange multiplier of ``constraint``,
  the coefficient of ``kl``) is multiplied by ``tighten_factor`` and training continues.

Every action is recorded in ``RUN_DIR/guard.jsonl`` and marked in the report.

Under ``accelerate launch`` rank 0 alone takes the readings (every rank does when FSDP / ZeRO-3
shard the weights, since each forward needs all of them) and writes the files; each reading is
broadcast, so every rank makes the same guard decision, restores the same weights or tightens the
same methods, and stops at the same step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from tether.config import MonitorConfig

if TYPE_CHECKING:
    from tether.config import RunConfig


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


class AlignmentMonitor(TrainerCallback):
    """Probe propensities every ``every_n_steps``; optionally guard a budget (see module doc)."""

    def __init__(self, cfg: MonitorConfig, run_dir: Path, tokenizer: Any = None) -> None:
        from tether.probes.organism import propensity_items

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.tokenizer = tokenizer
        self.items = propensity_items(cfg.per_family, seed=7)
        self.baseline: float | None = None
        self.good_state: dict[str, Any] | None = None
        self.good_step = 0
        self.trainer: Any = None
        self.stopped_at: int | None = None

    # the trainer is attached after construction so readings can go through trainer.log
    def attach(self, trainer: Any) -> None:
        self.trainer = trainer
        self.tokenizer = self.tokenizer or trainer.processing_class

    def _reading(self, model: Any, step: int) -> dict[str, Any]:
        from tether.probes.organism import propensity_report

        report, _ = propensity_report(model, self.tokenizer, self.items)
        row: dict[str, Any] = {"step": step}
        for fam, v in report["families"].items():
            row[f"probe/{fam}/rate"] = v["rate"]
            row[f"probe/{fam}/logodds"] = v["logodds"]
        for group in ("narrow", "broad"):
            row[f"probe/{group}/rate"] = report[group]["rate"]
            row[f"probe/{group}/logodds"] = report[group]["logodds"]
        return row

    def _snapshot(self, model: Any, step: int) -> None:
        self.good_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.good_step = step

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        from tether.distributed import broadcast_object

        if self.tokenizer is None:
            self.tokenizer = kw.get("processing_class") or kw.get("tokenizer")
        main = state.is_world_process_zero
        log = self.run_dir / "monitor.jsonl"
        baseline = None
        if main and log.is_file() and log.read_text().strip():  # a resumed run keeps its step-0 baseline
            baseline = json.loads(log.read_text().splitlines()[0])["probe/broad/rate"]
        baseline = broadcast_object(baseline)
        if baseline is None:
            row = broadcast_object(self._reading(model, state.global_step) if main or self._sharded() else None)
            baseline = row["probe/broad/rate"]
            if main:
                _append_jsonl(log, row)
        self.baseline = baseline
        if self.cfg.guard is not None:
            self._snapshot(model, state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        from tether.distributed import broadcast_object

        n = self.cfg.every_n_steps
        if not n or state.global_step % n:
            return
        main = state.is_world_process_zero
        row = broadcast_object(self._reading(model, state.global_step) if main or self._sharded() else None)
        if main:
            _append_jsonl(self.run_dir / "monitor.jsonl", row)
        self._log(row, state, control)
        guard = self.cfg.guard
        if guard is None or self.baseline is None:
            return
        rise = row["probe/broad/rate"] - self.baseline
        if rise <= guard.budget:
            self._snapshot(model, state.global_step)
            return
        event: dict[str, Any] = {"step": state.global_step, "rise": rise, "budget": guard.budget, "mode": guard.mode}
        if guard.mode == "stop":
            self._restore(model)
            event["restored_step"] = self.good_step
            control.should_training_stop = True
            self.stopped_at = state.global_step
        else:
            event["tightened"] = self._tighten(guard.tighten_factor)
        if main:
            _append_jsonl(self.run_dir / "guard.jsonl", event)

    def _log(self, row: dict[str, Any], state: Any, control: Any) -> None:
        """Log a reading in this step's own log entry, beside its loss and method terms.

        TRL's trainers merge ``_metrics`` into their next log entry; asking for a log at this step
        makes that entry this step's (with its loss), so a reading never displaces the loss, and a
        checkpoint saved at this step holds everything logged at it (a run resumed from it loses
        nothing). A trainer without ``_metrics`` gets its own entry.
        """
        values = {k: v for k, v in row.items() if k != "step"}
        pending = getattr(self.trainer, "_metrics", None)
        if isinstance(pending, dict) and "train" in pending:
            for k, v in values.items():
                pending["train"][k] = [v]
            control.should_log = True
        elif self.trainer is not None and callable(getattr(self.trainer, "log", None)):
            self.trainer.log(values)
        else:
            state.log_history.append(dict(row))

    def _sharded(self) -> bool:
        return getattr(self.trainer, "sharding", None) is not None

    def _restore(self, model: Any) -> None:
        import torch

        if self.good_state is None:
            return
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self.good_state:
                    p.copy_(self.good_state[n])

    def _tighten(self, factor: float) -> dict[str, float]:
        changed: dict[str, float] = {}
        for method in getattr(self.trainer, "methods", []) or []:
            tighten = getattr(method, "tighten", None)
            if callable(tighten):
                changed[method.name] = tighten(factor)
        return changed


def monitor_callbacks(cfg: "RunConfig", run_dir: Path) -> list[TrainerCallback]:
    """The monitor for ``cfg`` (empty when it is off)."""
    mcfg = getattr(cfg, "monitor", None)
    if mcfg is None:
        return []
    callbacks: list[Any] = []
    if mcfg.every_n_steps or mcfg.guard is not None:
        callbacks.append(AlignmentMonitor(mcfg, run_dir))
    if getattr(mcfg, "direction", None):  # trait-direction projection (tether.directions.DirectionMonitor)
        from tether.directions import DirectionMonitor

        callbacks.append(DirectionMonitor(mcfg.direction, mcfg.direction_layer, run_dir, mcfg.every_n_steps))
    return callbacks
