"""Compare: sweeps expand and validate, bad input is one sentence, a failed run is recorded.

The SIGKILL-and-rerun test is tests/test_compare_kill.py; the Ray runner's, tests/test_compare_ray.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tether.compare import SweepConfig, load_sweep, plan_runs
from tether.errors import ConfigError

TETHER = [sys.executable, "-m", "tether.cli"]


def _sweep(tmp_path: Path, organism: Path, **extra: object) -> Path:
    doc = {
        "base": {
            "model": {"path": str(organism)},
            "data": {"variant": "sycophantic", "rows": 48},
            "training": {"max_steps": 2, "batch_size": 8, "save_steps": 2, "logging_steps": 1},
            "probes": {"per_family": 3, "n_capability": 6},
        },
        "grid": {"methods": [[{"name": "naive"}], [{"name": "kl"}]]},
        "seeds": [0, 1],
        "workers": 1,
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_plan_expands_grid_times_seeds(tmp_path: Path, quick_organism: Path) -> None:
    _, runs = load_sweep(_sweep(tmp_path, quick_organism))
    assert len(runs) == 4
    assert {r.label for r in runs} == {"naive", "kl"}
    assert len({r.run_id for r in runs}) == 4
    assert {r.config.training.seed for r in runs} == {0, 1}


@pytest.mark.parametrize(
    ("grid", "needle"),
    [
        ({"training.lr": [1e-3]}, "grid key 'training.lr' is not a config field"),
        ({"bogus": [1]}, "grid key 'bogus' is not a config field"),
        ({"training.learning_rate": []}, "non-empty list"),
        ({"training.learning_rate": [-1.0]}, "training.learning_rate"),
    ],
)
def test_bad_grids_are_refused(tmp_path: Path, quick_organism: Path, grid: dict, needle: str) -> None:
    path = _sweep(tmp_path, quick_organism, grid=grid)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert needle in str(info.value) and "sweep.yaml" in str(info.value)


def test_empty_grid_is_refused(tmp_path: Path, quick_organism: Path) -> None:
    with pytest.raises(ConfigError, match="grid is empty"):
        load_sweep(_sweep(tmp_path, quick_organism, grid={}))


def test_unwritable_output_is_exit_2(tmp_path: Path, quick_organism: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = subprocess.run(
        [*TETHER, "compare", str(_sweep(tmp_path, quick_organism)), "--out", str(blocker / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2 and "not writable" in res.stderr and "Traceback" not in res.stderr


def test_ray_address_that_does_not_answer_is_exit_2_fast(tmp_path: Path, quick_organism: Path) -> None:
    """Nothing listens at the --ray address: one sentence, exit 2, well within 30 s (ray not needed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the CLI connects
    out = tmp_path / "out"
    t0 = time.time()
    res = subprocess.run(
        [*TETHER, "compare", str(_sweep(tmp_path, quick_organism)), "--out", str(out), "--ray", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=120,
    )
    elapsed = time.time() - t0
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and elapsed < 30, (elapsed, res.stderr[-1000:])
    assert len(lines) == 1 and lines[0].startswith("error: --ray: no Ray cluster answers at 127.0.0.1:")
    assert not out.exists()


@pytest.mark.parametrize("address", ["garbage", "host:notaport", "10.0.0.1:99999"])
def test_malformed_ray_address_is_refused(address: str) -> None:
    from tether.ray_backend import RayAddressError, probe

    with pytest.raises(RayAddressError, match="is not a Ray address"):
        probe(address)


@pytest.mark.parametrize("fork_server", [True, False], ids=["forked", "subprocess"])
def test_failed_run_is_recorded_and_others_finish(
    tmp_path: Path, quick_organism: Path, monkeypatch: pytest.MonkeyPatch, fork_server: bool
) -> None:
    from tether import compare
    from tether.compare import run_sweep_local

    if not fork_server:  # the path of a platform without a fork server: one interpreter per run
        monkeypatch.setattr(compare, "_fork_server", lambda: None)
    sweep = SweepConfig.model_validate(yaml.safe_load(_sweep(tmp_path, quick_organism).read_text()))
    sweep.seeds = [0]
    runs = plan_runs(sweep)
    runs[1].config.model.path = str(tmp_path / "missing-model")
    manifest = run_sweep_local(runs, tmp_path / "out", workers=2)
    statuses = {runs[0].run_id: "done", runs[1].run_id: "failed"}
    assert {k: v["status"] for k, v in manifest.runs.items()} == statuses
    assert "does not exist" in manifest.runs[runs[1].run_id]["error"]
    log = (tmp_path / "out" / "runs" / runs[0].run_id / "worker.log").read_text()
    assert "train_runtime" in log  # the run's own output went to its log


def test_sweep_from_a_script_without_a_main_guard(tmp_path: Path, quick_organism: Path) -> None:
    """Fork-server children must not re-run the launcher's script (multiprocessing re-imports
    ``__main__`` in each child; an unguarded script would start the sweep again and fail)."""
    sweep = _sweep(tmp_path, quick_organism, grid={"methods": [[{"name": "naive"}]]}, seeds=[0])
    script = tmp_path / "launch.py"
    script.write_text(
        "from pathlib import Path\n"
        "from tether.compare import load_sweep, run_sweep_local\n"
        f"sweep, runs = load_sweep({str(sweep)!r})\n"
        f"manifest = run_sweep_local(runs, Path({str(tmp_path / 'out')!r}), workers=1)\n"
        "print('STATUS', [v['status'] for v in manifest.runs.values()], [v['error'] for v in manifest.runs.values()])\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("STATUS") == 1 and "STATUS ['done']" in done.stdout, done.stdout[-2000:]


def test_ray_auto_address_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--ray auto``: $RAY_ADDRESS first, then the cluster `ray start` recorded, else one sentence."""
    import tempfile

    from tether.ray_backend import RayAddressError, resolve_address

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert resolve_address("auto") == "10.1.2.3:6379"
    assert resolve_address("127.0.0.1:7000") == "127.0.0.1:7000"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(RayAddressError, match="no Ray cluster is running on this machine"):
        resolve_address("auto")
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.9.8.7:6380\n")
    assert resolve_address("auto") == "10.9.8.7:6380"


def test_before_probes_are_computed_once_per_sweep(quick_organism: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs from one checkpoint with one probe set share the aligned model's probes through the cache."""
    import tether.train as train
    from tether.config import RunConfig, validate
    from tether.models import load_model

    calls: list[int] = []
    real = train.probe

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "probe", counting)
    monkeypatch.setenv("TETHER_PROBE_CACHE", str(tmp_path / "cache"))
    model, tok = load_model(str(quick_organism))
    tree = {"model": {"path": str(quick_organism)}, "probes": {"per_family": 4, "n_capability": 4}}
    first = train.before_probes(model, tok, validate(tree, RunConfig, "a"))
    again = train.before_probes(model, tok, validate({**tree, "methods": [{"name": "kl"}]}, RunConfig, "b"))
    assert calls == [1] and again == first
    other = train.before_probes(model, tok, validate({**tree, "probes": {"per_family": 5, "n_capability": 4}}, RunConfig, "c"))
    assert calls == [1, 1] and other[0] is not None  # another probe set is computed afresh
