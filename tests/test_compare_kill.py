"""A compare killed with a real SIGKILL mid-way, then rerun: finished runs are not touched, the
run that was cut off resumes, and the table equals that of an uninterrupted sweep."""

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

TETHER = [sys.executable, "-m", "tether.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _sweep(path: Path, organism: Path, workers: int) -> Path:
    doc = {
        "base": {
            "model": {"path": str(organism)},
            "data": {"variant": "sycophantic", "rows": 32},
            "training": {"max_steps": 2, "batch_size": 8, "save_steps": 1, "logging_steps": 1},
            "probes": {"per_family": 3, "n_capability": 6},
            "monitor": {"every_n_steps": 1, "per_family": 2},
        },
        "grid": {"methods": [[{"name": "naive"}]], "training.learning_rate": [5.0e-4, 1.0e-3, 2.0e-3]},
        "seeds": [0],
        "workers": workers,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def _table(stdout: str) -> list[list[str]]:
    """The printed summary table without its timing columns (tokens/s, wall s)."""
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row[:-2]] for row in rows]


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.imgs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs).get("src") or "")


def _runs(out: Path) -> dict[str, dict]:
    return json.loads((out / "manifest.json").read_text())["runs"]


def test_sigkill_then_rerun_matches_uninterrupted(tmp_path: Path, quick_organism: Path) -> None:
    sweep = _sweep(tmp_path / "sweep.yaml", quick_organism, workers=1)
    out = tmp_path / "killed"
    t0 = time.time()
    proc = subprocess.Popen([*TETHER, "compare", str(sweep), "--out", str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # kill once one run is done and the next has written a checkpoint (so the rerun must resume it)
    deadline = time.time() + 300
    cut: str | None = None
    while time.time() < deadline and proc.poll() is None:
        if (out / "manifest.json").is_file():
            runs = _runs(out)
            done = [r for r, e in runs.items() if e["status"] == "done"]
            running = [r for r, e in runs.items() if e["status"] == "running"]
            ckpts = (out / "runs" / running[0] / "checkpoints").glob("checkpoint-*/preserve_state.json") if running else []
            if done and running and list(ckpts):  # a complete checkpoint: its last file is written
                cut = running[0]
                break
        time.sleep(0.1)
    if cut is None:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the sweep never reached 'one run done, the next checkpointed' before it ended")
    os.killpg(proc.pid, signal.SIGKILL)  # the compare process and its worker, no clean-up
    proc.wait()
    killed_at = time.time() - t0
    runs = _runs(out)
    assert runs[cut]["status"] == "running"  # the manifest says what was cut off
    assert not (out / "runs" / cut / "metrics.json").exists()
    finished = {rid for rid, e in runs.items() if e["status"] == "done"}
    assert 1 <= len(finished) < 3
    mtimes = {rid: (out / "runs" / rid / "metrics.json").stat().st_mtime_ns for rid in finished}
    before_mtime = (out / "runs" / cut / "before.json").stat().st_mtime_ns

    again = subprocess.run([*TETHER, "compare", str(sweep), "--out", str(out)],
                           capture_output=True, text=True, timeout=600, env=ENV)
    assert again.returncode == 0, again.stderr[-2000:]
    assert Path(again.stdout.strip().splitlines()[-1]) == out / "report.html"
    for rid, mt in mtimes.items():
        assert (out / "runs" / rid / "metrics.json").stat().st_mtime_ns == mt, f"{rid} was rerun"
    assert {e["status"] for e in _runs(out).values()} == {"done"}
    # the cut-off run resumed from its checkpoint (a fresh start re-probes and rewrites before.json)
    assert (out / "runs" / cut / "before.json").stat().st_mtime_ns == before_mtime

    clean = tmp_path / "clean"
    full = subprocess.run([*TETHER, "compare", str(_sweep(tmp_path / "sweep2.yaml", quick_organism, workers=2)),
                           "--out", str(clean)], capture_output=True, text=True, timeout=600, env=ENV)
    assert full.returncode == 0, full.stderr[-2000:]
    table = _table(again.stdout)
    assert len(table) == 6  # header, rule, aligned, three learning rates
    assert table == _table(full.stdout)
    a = json.loads((out / "summary.json").read_text())["methods"]
    b = json.loads((clean / "summary.json").read_text())["methods"]
    for ma, mb in zip(a, b, strict=True):
        assert ma["name"] == mb["name"]
        for key in ("capability", "broad_rate", "broad_logodds", "narrow_rate", "narrow_logodds"):
            assert ma[key]["mean"] == pytest.approx(mb[key]["mean"], abs=1e-9), (ma["name"], key)

    # the report: self-contained HTML with the figures, Markdown, a row per method
    page = _Parser()
    page.feed((out / "report.html").read_text())
    assert "table" in page.tags and len(page.imgs) >= 3
    assert all(src.startswith("data:image/png;base64,") for src in page.imgs)
    md = (out / "report.md").read_text()
    assert sum(line.startswith("| naive learning_rate=") for line in md.splitlines()) == 3
    monitor = (out / "runs" / cut / "monitor.jsonl").read_text().splitlines()
    assert len(monitor) >= 2 and "probe/broad/rate" in json.loads(monitor[-1])
    print(f"killed after {killed_at:.1f} s; total {time.time() - t0:.1f} s")
