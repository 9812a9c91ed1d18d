"""Compare and report: sweeps expand and validate, reruns skip finished runs, a kill resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

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
            "training": {"max_steps": 4, "batch_size": 8, "save_steps": 2, "logging_steps": 2},
            "probes": {"per_family": 4, "n_capability": 6},
            "monitor": {"every_n_steps": 2, "per_family": 4},
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


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.imgs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs).get("src") or "")


def _summary_numbers(out: Path) -> dict[str, tuple[float, float, float]]:
    summary = json.loads((out / "summary.json").read_text())
    return {
        m["name"]: (m["capability"]["mean"], m["broad_logodds"]["mean"], m["narrow_logodds"]["mean"])
        for m in summary["methods"]
    }


def test_kill_and_rerun_skips_finished_and_matches_uninterrupted(tmp_path: Path, quick_organism: Path) -> None:
    sweep = _sweep(tmp_path, quick_organism)
    out = tmp_path / "killed"
    proc = subprocess.Popen([*TETHER, "compare", str(sweep), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    manifest = out / "manifest.json"
    deadline = time.time() + 400
    while time.time() < deadline:
        if manifest.is_file():
            runs = json.loads(manifest.read_text())["runs"]
            if sum(r["status"] == "done" for r in runs.values()) >= 1:
                break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("no run finished in time")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    runs = json.loads(manifest.read_text())["runs"]
    finished = {rid for rid, r in runs.items() if r["status"] == "done"}
    mtimes = {rid: (out / "runs" / rid / "metrics.json").stat().st_mtime_ns for rid in finished}
    again = subprocess.run([*TETHER, "compare", str(sweep), "--out", str(out)],
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert Path(again.stdout.strip().splitlines()[-1]) == out / "report.html"
    for rid, mt in mtimes.items():
        assert (out / "runs" / rid / "metrics.json").stat().st_mtime_ns == mt
    statuses = {r["status"] for r in json.loads(manifest.read_text())["runs"].values()}
    assert statuses == {"done"}

    clean = tmp_path / "clean"
    full = subprocess.run([*TETHER, "compare", str(sweep), "--out", str(clean)],
                          capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-2000:]
    a, b = _summary_numbers(out), _summary_numbers(clean)
    assert a.keys() == b.keys() == {"naive", "kl"}
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-6)

    # the report: self-contained HTML with the figures, Markdown, a row per method
    page = _Parser()
    page.feed((out / "report.html").read_text())
    assert "table" in page.tags and len(page.imgs) >= 3
    assert all(src.startswith("data:image/png;base64,") for src in page.imgs)
    md = (out / "report.md").read_text()
    assert md.count("| naive |") == 1 and md.count("| kl |") == 1
    summary = json.loads((out / "summary.json").read_text())
    for m in summary["methods"]:
        assert m["seeds"] == [0, 1]
        for key in ("capability", "broad_rate", "broad_logodds", "narrow_rate", "narrow_logodds"):
            assert m[key]["mean"] is not None and m[key]["mean"] == m[key]["mean"]
    monitor = (out / "runs" / next(iter(runs)) / "monitor.jsonl").read_text().splitlines()
    assert len(monitor) >= 2 and "probe/broad/rate" in json.loads(monitor[-1])


def test_failed_run_is_recorded_and_others_finish(tmp_path: Path, quick_organism: Path) -> None:
    from tether.compare import run_sweep_local

    sweep = SweepConfig.model_validate(yaml.safe_load(_sweep(tmp_path, quick_organism).read_text()))
    sweep.seeds = [0]
    runs = plan_runs(sweep)
    runs[1].config.model.path = str(tmp_path / "missing-model")
    manifest = run_sweep_local(runs, tmp_path / "out", workers=2)
    statuses = {runs[0].run_id: "done", runs[1].run_id: "failed"}
    assert {k: v["status"] for k, v in manifest.runs.items()} == statuses
    assert "does not exist" in manifest.runs[runs[1].run_id]["error"]
