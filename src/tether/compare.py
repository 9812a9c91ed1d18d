"""Comparisons: a sweep (base run x grid x seeds) run in local worker processes, resumably.

A sweep YAML::

    base: run.yaml            # a path, or an inline run config mapping
    grid:                     # every combination of these values (dotted run-config keys)
      methods:                # a list of method stacks
        - [{name: naive}]
        - [{name: kl, beta: 1.0}]
      training.learning_rate: [1.0e-3]
    seeds: [0, 1, 2]
    workers: 0                # 0 = as many as fit the cores

Each run gets its own directory ``OUT/runs/<run-id>/`` with the resolved ``config.yaml``; the
manifest ``OUT/manifest.json`` tracks every run's status (pending, running, done, failed and the
error). Rerunning the same sweep skips finished runs (``metrics.json`` exists) and restarts
unfinished ones, which resume from their last checkpoint. Every run is its own process: a crash
in one is recorded and the others go on. Locally the processes are forked from a fork server
that imported torch, transformers, TRL and peft once (``multiprocessing``'s ``forkserver`` with
a preload list), so a run does not pay the ~6 s of imports again; where there is no fork server
(Windows) each run is ``python -m tether.compare RUN_DIR``.
With ``tether compare --ray ADDRESS`` the same workers run as Ray tasks on a cluster
(:mod:`tether.ray_backend`), with the same manifest, skip and failure rules.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from pydantic import Field, field_validator

from tether.config import RunConfig, Strict, load_config, validate
from tether.errors import ConfigError, TetherError
from tether.io import atomic_write_json, atomic_write_text


class SweepConfig(Strict):
    """A comparison: one base run, a grid of overrides, and seeds."""

    base: dict[str, Any] | str = Field(default_factory=dict, description="Run config mapping or path.")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted key -> values.")
    extra: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Runs beside the grid, each a mapping of dotted keys to values, with an optional 'label' "
        "(e.g. a LoRA run with safelora, or one method with other hyperparameters).",
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    workers: int = Field(0, ge=0, description="Parallel runs; 0 = as many as fit the cores.")
    threads_per_run: int = Field(1, ge=1, description="Torch threads per worker process.")

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid key '{key}' needs a non-empty list of values")
        return grid


@dataclass
class PlannedRun:
    run_id: str
    label: str
    seed: int
    config: RunConfig
    overrides: dict[str, Any]


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"grid key '{key}': '{p}' is not a section")
    node[parts[-1]] = value


def _check_grid_key(key: str, source: str) -> None:
    from pydantic import BaseModel

    model: type[BaseModel] = RunConfig
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p not in model.model_fields:
            where = ".".join(parts[:i]) or "the run config"
            allowed = ", ".join(model.model_fields)
            raise ConfigError(f"{source}: grid key '{key}' is not a config field; allowed in {where}: {allowed}")
        ann = model.model_fields[p].annotation
        if i < len(parts) - 1:
            sub = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if sub is None:
                raise ConfigError(f"{source}: grid key '{key}': '{p}' has no sub-keys")
            model = sub


def method_label(methods: list[dict[str, Any]]) -> str:
    """A readable name for a stack: ``kl+replay``."""
    return "+".join(m["name"] for m in methods) or "none"


def plan_runs(sweep: SweepConfig, source: str = "sweep", base_dir: Path | None = None) -> list[PlannedRun]:
    """Expand the grid x seeds into validated run configs (all checked before anything runs).

    A relative ``base`` path is read from ``base_dir`` (the sweep file's folder), else the
    current directory.
    """
    if isinstance(sweep.base, str):
        base_path = Path(sweep.base)
        if not base_path.is_absolute() and base_dir is not None:
            base_path = base_dir / base_path
        base = load_config(base_path).model_dump(mode="json")
    else:
        base = validate(sweep.base, RunConfig, f"{source}: base").model_dump(mode="json")
    for key in sweep.grid:
        _check_grid_key(key, source)
    keys = list(sweep.grid)
    # the grid's product (one base run when there is no grid), unless only extra runs are given;
    # extra runs go first: they are often the costlier special cases, and a sweep whose longest
    # runs start first leaves fewer workers idle at its end
    grid_runs: list[tuple[dict[str, Any], str | None]] = (
        [(dict(zip(keys, combo)), None) for combo in itertools.product(*(sweep.grid[k] for k in keys))]
        if keys or not sweep.extra
        else []
    )
    variants: list[tuple[dict[str, Any], str | None]] = []
    for i, entry in enumerate(sweep.extra):
        entry = dict(entry)
        name = entry.pop("label", None)
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{source}: extra[{i}].label must be a string, got {name!r}")
        for key in entry:
            _check_grid_key(key, f"{source}: extra[{i}]")
        variants.append((entry, name))
    variants += grid_runs
    runs: list[PlannedRun] = []
    for overrides, name in variants:
        for seed in sweep.seeds:
            tree = copy.deepcopy(base)
            for k, v in overrides.items():
                _set_dotted(tree, k, v)
            _set_dotted(tree, "training.seed", seed)
            cfg = validate(tree, RunConfig, f"{source}: grid {json.dumps(overrides)}")
            methods = cfg.model_dump(mode="json")["methods"]
            other = {k: v for k, v in overrides.items() if k != "methods"}
            label = name or method_label(methods) + "".join(
                f" {k.split('.')[-1]}" + ("" if isinstance(v, (dict, list)) else f"={v}") for k, v in other.items()
            )
            digest = hashlib.sha256(
                json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()
            ).hexdigest()[:8]
            slug = label.replace(" ", "_").replace("=", "-").replace("+", "_")
            runs.append(PlannedRun(f"{slug}-s{seed}-{digest}", label, seed, cfg, overrides))
    if not runs:
        raise ConfigError(f"{source}: the sweep has no runs")
    return runs


def load_sweep(path: str | os.PathLike[str]) -> tuple[SweepConfig, list[PlannedRun]]:
    sweep = load_config(path, SweepConfig)
    if "grid" in (yaml.safe_load(Path(path).read_text()) or {}) and not sweep.grid:
        raise ConfigError(f"{path}: the grid is empty; give at least one key with a list of values")
    return sweep, plan_runs(sweep, str(path), base_dir=Path(path).parent)


def default_workers(threads_per_run: int = 1) -> int:
    return max(1, (os.cpu_count() or 1) // threads_per_run)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise TetherError(f"output directory {out} is not writable ({exc.strerror})") from None


class Manifest:
    """``manifest.json``: one entry per run; written atomically on every change."""

    def __init__(self, out: Path, runs: list[PlannedRun]) -> None:
        self.path = out / "manifest.json"
        old = json.loads(self.path.read_text())["runs"] if self.path.is_file() else {}
        self.runs: dict[str, dict[str, Any]] = {}
        for r in runs:
            entry = old.get(r.run_id, {})
            self.runs[r.run_id] = {
                "label": r.label, "seed": r.seed, "overrides": r.overrides,
                "status": entry.get("status", "pending"), "error": entry.get("error"),
                "dir": f"runs/{r.run_id}",
            }
        self.save()

    def set(self, run_id: str, **fields: Any) -> None:
        self.runs[run_id].update(fields)
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, {"schema_version": 1, "runs": self.runs})


def _read_progress(run_dir: Path) -> tuple[int, int]:
    try:
        p = json.loads((run_dir / "progress.json").read_text())
        return int(p["step"]), int(p["max_steps"])
    except (OSError, ValueError, KeyError):
        return 0, 0


ProgressHook = Callable[[dict[str, dict[str, Any]], dict[str, tuple[int, int]]], None]


def prepare_sweep(runs: list[PlannedRun], out: Path) -> tuple[Manifest, list[PlannedRun]]:
    """Check ``out``, write the manifest and each unfinished run's ``run.yaml``; return the runs to do.

    A run whose ``metrics.json`` exists is finished: it is marked done and not touched again.
    """
    _check_writable(out)
    manifest = Manifest(out, runs)
    todo = []
    for r in runs:
        run_dir = out / "runs" / r.run_id
        if (run_dir / "metrics.json").is_file():
            manifest.set(r.run_id, status="done", error=None)
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "run.yaml", yaml.safe_dump(r.config.model_dump(mode="json"), sort_keys=False))
        manifest.set(r.run_id, status="pending", error=None)
        todo.append(r)
    return manifest, todo


def record_result(manifest: Manifest, out: Path, run_id: str, code: int | None, error: str | None = None) -> None:
    """Mark a run done (exit 0 and ``metrics.json`` written) or failed with the worker log's last line."""
    run_dir = out / "runs" / run_id
    if code == 0 and (run_dir / "metrics.json").is_file():
        manifest.set(run_id, status="done", error=None)
        return
    if error is None:
        log = run_dir / "worker.log"
        lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
        error = f"exit {code}: {(lines[-1:] or ['no output'])[0][:500]}"
    manifest.set(run_id, status="failed", error=error)


def worker_command(run_dir: str | os.PathLike[str], python: str | None = None) -> list[str]:
    """The worker process's command line: ``python -m tether.compare RUN_DIR``."""
    return [python or sys.executable, "-m", "tether.compare", str(run_dir)]


def worker_env(threads_per_run: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: one BLAS/OpenMP pool of ``threads_per_run`` threads (torch too)."""
    t = str(threads_per_run)
    return {
        **(os.environ if base is None else base),
        "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "TETHER_THREADS": t, "TOKENIZERS_PARALLELISM": "false",
        "TETHER_PARENT_PID": str(os.getpid()),
    }


def _die_with_parent() -> None:
    """In a worker: let the kernel kill this process when its launcher dies (Linux PR_SET_PDEATHSIG).

    A killed ``tether compare`` (or a Ray worker killed with its job) then leaves no orphan training.
    """
    parent = int(os.environ.get("TETHER_PARENT_PID", "0"))
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(1)


PRELOAD = ["torch", "transformers", "trl", "peft", "tether.train", "tether.compare"]
"""What the fork server imports once for every local run."""


def _fork_server() -> Any:
    """``multiprocessing``'s forkserver context with ``PRELOAD``, or None where there is none."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def forked_worker(run_dir: str, env: dict[str, str]) -> None:
    """One run in a child of the fork server: the launcher's environment as it is now (the fork
    server's is a copy from its start), ``worker.log`` as stdout and stderr, killed with the fork
    server (which exits when the launcher dies).

    Libraries read a few variables once at import (``HF_HUB_OFFLINE`` in ``huggingface_hub``): for
    those the values at the fork server's start hold, as in any process that imported them.
    """
    os.environ.clear()
    os.environ.update(env)
    os.environ["TETHER_PARENT_PID"] = str(os.getppid())
    fd = os.open(Path(run_dir) / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.exit(worker_main(run_dir))  # multiprocessing flushes stdout and stderr on the way out


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start fork-server children without the launcher's ``__main__``.

    ``multiprocessing`` re-imports the main script (or ``-m`` module) in every child it starts
    this way, which re-runs the top level of a script without an ``if __name__ == "__main__"``
    guard — a sweep started from such a script would start again in each run and fail. The
    runs need nothing from it (their target lives here), so its ``__file__`` and ``__spec__``
    are hidden while a child starts.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None  # multiprocessing reads it unguarded
    try:
        yield
    finally:
        main.__dict__.update(saved)


class _Worker:
    """A running worker (environment ``env``): a child of the fork server, or a
    ``python -m tether.compare`` process."""

    def __init__(self, ctx: Any, run_dir: Path, env: dict[str, str]) -> None:
        self.log = None
        if ctx is not None:
            self.proc: Any = ctx.Process(target=forked_worker, args=(str(run_dir), env), daemon=False)
            with _main_module_hidden():
                self.proc.start()
        else:
            self.log = open(run_dir / "worker.log", "ab")
            self.proc = subprocess.Popen(worker_command(run_dir), stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def poll(self) -> int | None:
        """The exit code once the run has ended (negative: killed by that signal), else None."""
        code = self.proc.poll() if self.log is not None else self.proc.exitcode
        if code is not None:
            if self.log is not None:
                self.log.close()
            else:
                self.proc.join()
        return code


def run_sweep_local(
    runs: list[PlannedRun],
    out: Path,
    workers: int = 0,
    threads_per_run: int = 1,
    on_progress: ProgressHook | None = None,
    poll_s: float = 0.5,
) -> Manifest:
    """Run every unfinished run in worker processes; return the final manifest."""
    manifest, todo = prepare_sweep(runs, out)
    workers = workers or default_workers(threads_per_run)
    running: dict[str, _Worker] = {}
    # the aligned model's probes are the same for every run of one model and probe set: a worker
    # computes them once for the sweep and the others copy them (tether.train.before_probes)
    env = {**worker_env(threads_per_run), "TETHER_PROBE_CACHE": str(out.resolve() / ".probe-cache")}
    ctx = _fork_server()
    while todo or running:
        while todo and len(running) < workers:
            r = todo.pop(0)
            running[r.run_id] = _Worker(ctx, out / "runs" / r.run_id, env)
            manifest.set(r.run_id, status="running")
        for run_id, worker in list(running.items()):
            code = worker.poll()
            if code is None:
                continue
            del running[run_id]
            record_result(manifest, out, run_id, code)
        if on_progress is not None:
            on_progress(manifest.runs, {rid: _read_progress(out / "runs" / rid) for rid in running})
        if running:
            time.sleep(poll_s)
    return manifest


def run_sweep(
    runs: list[PlannedRun],
    out: Path,
    workers: int = 0,
    threads_per_run: int = 1,
    on_progress: ProgressHook | None = None,
    ray_address: str | None = None,
) -> Manifest:
    """Run a sweep in local worker processes, or as Ray tasks when ``ray_address`` is given."""
    if ray_address is None:
        return run_sweep_local(runs, out, workers, threads_per_run, on_progress)
    from tether.ray_backend import run_sweep_ray

    return run_sweep_ray(runs, out, ray_address, workers, threads_per_run, on_progress)


def worker_main(run_dir: str) -> int:
    """Run one run from ``RUN_DIR/run.yaml`` (the worker process's entry point)."""
    _die_with_parent()
    threads = int(os.environ.get("TETHER_THREADS", "0"))
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import TrainerCallback

    from tether.io import atomic_write_json as write
    from tether.train import run_training

    d = Path(run_dir)
    cfg = load_config(d / "run.yaml")

    class _Progress(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            write(d / "progress.json", {"step": state.global_step, "max_steps": state.max_steps})

    try:
        run_training(cfg, d, source=str(d / "run.yaml"), callbacks=[_Progress()])
    except TetherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
