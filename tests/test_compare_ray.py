"""The Ray runner against a real local Ray head on loopback: same table as local workers, shipped
files, recorded failures, and an address where something listens but no Ray answers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'tether[ray]'); the Ray runner is untested")

TETHER = [sys.executable, "-m", "tether.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A real Ray head (``ray start --head --block``) on loopback with 2 CPUs; its process group is
    ended at teardown (only the processes this fixture started, unlike a machine-wide ``ray stop``)."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="tr", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray_bin = str(Path(sys.executable).parent / "ray")
    t0 = time.time()
    head = subprocess.Popen(
        [ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}", "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**ENV, "TMPDIR": temp},  # the node's scratch run directories land here and go at teardown
    )
    try:
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start --head exited with {head.returncode}")
            if time.time() - t0 > 90:
                pytest.fail("the Ray head did not open its port within 90 s")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        print(f"ray head up in {time.time() - t0:.1f} s")
        yield f"127.0.0.1:{port}"
    finally:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(wait)
                time.sleep(1)  # its children share the group; give them the same signal's effect
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


def _sweep(tmp: Path, organism: Path) -> Path:
    doc = {
        "base": {
            "model": {"path": str(organism)},
            "data": {"variant": "sycophantic", "rows": 32},
            "training": {"max_steps": 2, "batch_size": 8, "save_steps": 1, "logging_steps": 1},
            "probes": {"per_family": 3, "n_capability": 6},
        },
        "grid": {"methods": [[{"name": "naive"}], [{"name": "kl"}]]},
        "seeds": [0],
        "workers": 2,
    }
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _table(stdout: str) -> list[list[str]]:
    """The printed summary table without its timing columns (tokens/s, wall s)."""
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row[:-2]] for row in rows]


def _metrics(out: Path) -> dict[str, dict]:
    manifest = json.loads((out / "manifest.json").read_text())["runs"]
    return {rid: json.loads((out / e["dir"] / "metrics.json").read_text())["after"] for rid, e in manifest.items()}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory: pytest.TempPathFactory, quick_organism: Path) -> tuple[Path, Path, str]:
    tmp = tmp_path_factory.mktemp("ray-local")
    sweep = _sweep(tmp, quick_organism)
    t0 = time.time()
    res = subprocess.run([*TETHER, "compare", str(sweep), "--out", str(tmp / "local")],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    print(f"local 2-run sweep: {time.time() - t0:.1f} s")
    return sweep, tmp / "local", res.stdout


def test_ray_sweep_gives_the_local_table(ray_head: str, local_sweep: tuple[Path, Path, str], tmp_path: Path) -> None:
    sweep, local, local_stdout = local_sweep
    out = tmp_path / "ray"
    t0 = time.time()
    res = subprocess.run([*TETHER, "compare", str(sweep), "--out", str(out), "--ray", ray_head],
                         capture_output=True, text=True, timeout=600, env=ENV)
    print(f"ray 2-run sweep: {time.time() - t0:.1f} s")
    assert res.returncode == 0, res.stderr[-3000:]
    assert Path(res.stdout.strip().splitlines()[-1]) == out / "report.html"
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    assert {r["status"] for r in runs.values()} == {"done"} and len(runs) == 2
    table = _table(res.stdout)
    assert len(table) == 5 and table == _table(local_stdout)  # header, rule, aligned, naive, kl
    assert _metrics(out) == _metrics(local)  # every probe number, bit for bit
    assert not (out / ".ray-token").exists()
    for rid in runs:  # written in place (loopback = shared filesystem), checkpoints included
        d = out / "runs" / rid
        assert (d / "worker.log").is_file() and (d / "checkpoints").is_dir() and (d / "model").is_dir()


def test_ray_ships_files_back_and_records_failures(
    ray_head: str, local_sweep: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """``ship="always"`` is what a node without the shared output directory does."""
    from tether.compare import load_sweep
    from tether.ray_backend import run_sweep_ray

    sweep_path, local, _ = local_sweep
    _, runs = load_sweep(sweep_path)
    naive = next(r for r in runs if r.label == "naive")
    broken = next(r for r in runs if r.label == "kl")
    broken.config.model.path = str(tmp_path / "missing-model")
    seen: list[dict[str, tuple[int, int]]] = []
    out = tmp_path / "shipped"
    try:
        manifest = run_sweep_ray([naive, broken], out, ray_head, workers=2, ship="always",
                                 on_progress=lambda m, p: seen.append(dict(p)))
    finally:
        ray.shutdown()
    assert manifest.runs[naive.run_id]["status"] == "done"
    assert manifest.runs[broken.run_id]["status"] == "failed"
    assert "does not exist" in manifest.runs[broken.run_id]["error"]
    on_disk = json.loads((out / "manifest.json").read_text())["runs"]
    assert {k: v["status"] for k, v in on_disk.items()} == {naive.run_id: "done", broken.run_id: "failed"}
    d = out / "runs" / naive.run_id
    assert json.loads((d / "metrics.json").read_text())["after"] == _metrics(local)[naive.run_id]
    assert (d / "model").is_dir() and (d / "worker.log").is_file() and not (d / "checkpoints").exists()
    assert "does not exist" in (out / "runs" / broken.run_id / "worker.log").read_text()
    # progress came through the board actor: the naive run reported its last step of 2
    assert any(p.get(naive.run_id) == (2, 2) for p in seen)

    # a rerun skips the finished run: no task, its files untouched
    mtime = (d / "metrics.json").stat().st_mtime_ns
    try:
        again = run_sweep_ray([naive], out, ray_head, ship="always")
    finally:
        ray.shutdown()
    assert again.runs[naive.run_id]["status"] == "done"
    assert (d / "metrics.json").stat().st_mtime_ns == mtime


def test_ray_address_that_is_not_ray_fails_in_one_sentence(tmp_path: Path) -> None:
    """Something accepts TCP connections but never speaks Ray: refused within 30 s, exit 2."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {}\ngrid:\n  methods: [[{name: naive}]]\n")
    try:
        t0 = time.time()
        res = subprocess.run([*TETHER, "compare", str(sweep), "--out", str(tmp_path / "out"),
                              "--ray", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60, env=ENV)
        elapsed = time.time() - t0
    finally:
        server.close()
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and elapsed < 30, (elapsed, res.stderr[-1000:])
    assert last.startswith("error: --ray:") and "no Ray cluster answered" in last and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
