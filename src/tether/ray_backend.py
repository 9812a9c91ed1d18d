"""The Ray runner for ``tether compare --ray ADDRESS``: one Ray task per run, same semantics as local.

Each unfinished run becomes a Ray task (``num_cpus = threads_per_run``, 1 by default) that starts the
same worker as the local runner, ``python -m tether.compare RUN_DIR``, as a child process with
``OMP_NUM_THREADS``/``TETHER_THREADS`` set to the thread count (the worker calls
``torch.set_num_threads`` with it). The manifest, the skip-finished rule on a rerun and the
failure records are the local runner's (:func:`tether.compare.prepare_sweep`,
:func:`tether.compare.record_result`).

Where a run's files go:

* **Shared filesystem** (the output directory is visible at the same path on the node, detected
  with a random token the driver writes into it): the worker writes straight into
  ``OUT/runs/<run-id>/``, exactly as a local worker does, and an interrupted run resumes from its
  last checkpoint.
* **No shared filesystem**: the worker writes to a node-local scratch directory
  (``$TMPDIR/tether-ray/<out-hash>/<run-id>``) and the task returns the run directory's files as
  bytes, except ``checkpoints/``; the driver writes them into ``OUT/runs/<run-id>/``
  (``metrics.json`` last, so a run is never half-finished). An interrupted run resumes from its
  checkpoint only if it lands on the same node again; otherwise it restarts from step 0.

Model and data paths in the run config must be readable on every node, and every node needs
``tether`` installed in the Python that runs Ray. Per-step progress reaches the driver through a
small Ray actor, so the display is the same in both cases.

An address that does not answer is refused in one sentence: a TCP probe (3 s) runs before
anything heavy is imported, then a throw-away process must join the cluster within 10 s (Ray alone retries for minutes).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tether.compare import (
    Manifest,
    PlannedRun,
    ProgressHook,
    _check_writable,
    _read_progress,
    prepare_sweep,
    record_result,
    worker_command,
    worker_env,
)
from tether.errors import TetherError
from tether.io import atomic_write_text

TOKEN_FILE = ".ray-token"
CONNECT_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 3.0


class RayAddressError(TetherError):
    """A ``--ray`` address that is malformed or where no Ray cluster answers."""


def _host_port(address: str) -> tuple[str, int]:
    """``host:port`` (optionally ``ray://``-prefixed) -> (host, port)."""
    bare = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = bare.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayAddressError(
            f"--ray: '{address}' is not a Ray address; give HOST:PORT of the head's GCS (e.g. 10.0.0.5:6379), "
            "ray://HOST:PORT, or auto"
        )
    return host.strip("[]"), int(port)


def resolve_address(address: str) -> str:
    """``auto``: ``$RAY_ADDRESS``, else the cluster this machine's ``ray start`` recorded; others as given."""
    if address != "auto":
        return address
    env = os.environ.get("RAY_ADDRESS", "")
    if env and env != "auto":
        return env
    recorded = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        found = recorded.read_text().strip().splitlines()[0].strip()
    except (OSError, IndexError):
        found = ""
    if not found:
        raise RayAddressError(
            "--ray auto: no Ray cluster is running on this machine and RAY_ADDRESS is not set; "
            "give HOST:PORT of a Ray head, or run without --ray for local workers"
        )
    return found


def probe(address: str) -> str:
    """Fail fast when nothing listens at the address (Ray itself retries for minutes); return it resolved."""
    resolved = resolve_address(address)
    hp = _host_port(resolved)
    try:
        with socket.create_connection(hp, timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        shown = address if resolved == address else f"{address} ({resolved})"
        raise RayAddressError(
            f"--ray: no Ray cluster answers at {shown} ({reason}); start one with `ray start --head` "
            "and pass its address, or run without --ray for local workers"
        ) from None
    return resolved


_CHECK = """
import json, sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps({"cpus": ray.cluster_resources().get("CPU", 0)}))
ray.shutdown()
"""


def check_cluster(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> float:
    """Join the cluster (already probed) from a throw-away process with a deadline; return its CPUs.

    Ray's own client retries for minutes and logs a line per retry, so a cluster that does not
    answer is detected here, where the retries can be cut off and their noise discarded.
    """
    resolved = resolve_address(address)
    try:
        res = subprocess.run(
            [sys.executable, "-c", _CHECK, resolved], capture_output=True, text=True, timeout=timeout_s,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
    except subprocess.TimeoutExpired:
        raise RayAddressError(
            f"--ray: something accepts connections at {resolved} but no Ray cluster answered within "
            f"{timeout_s:.0f} s; give HOST:PORT of a running Ray head's GCS"
        ) from None
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = [line.strip() for line in res.stderr.splitlines() if line.strip() and not line.startswith("[")]
        raise RayAddressError(f"--ray: could not join the Ray cluster at {address}: {(tail[-1:] or ['no answer'])[0][:300]}")
    return float(json.loads(lines[-1])["cpus"])


def connect(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    """Connect this process to the Ray cluster at ``address``; return True if this call connected it.

    Raises :class:`RayAddressError` when the address is malformed, nothing answers, the cluster
    does not accept a connection within ``timeout_s``, or it has no CPUs.
    """
    probe(address)  # before importing ray: a dead address fails in seconds even without ray installed
    try:
        import ray
    except ImportError:
        raise TetherError("--ray needs the ray package; install it with `pip install 'tether[ray]'`") from None
    if ray.is_initialized():
        return False
    cpus = check_cluster(address, timeout_s)
    if cpus < 1:
        raise RayAddressError(f"--ray: the Ray cluster at {address} has no CPUs to run on")
    ray.init(address=resolve_address(address), logging_level="ERROR", log_to_driver=False)
    return True


def _files_of(run_dir: Path) -> dict[str, bytes]:
    """Every file under ``run_dir`` except ``checkpoints/``, as ``relative path -> bytes``."""
    files = {}
    for f in sorted(run_dir.rglob("*")):
        rel = f.relative_to(run_dir)
        if f.is_file() and rel.parts[0] != "checkpoints":
            files[rel.as_posix()] = f.read_bytes()
    return files


def run_on_node(
    run_id: str,
    run_yaml: str,
    out_dir: str,
    token: str,
    threads: int,
    cwd: str,
    board: Any = None,
    ship: str = "auto",
    poll_s: float = 1.0,
) -> dict[str, Any]:
    """The body of a run's Ray task (also callable directly): run the worker, report progress.

    ``ship`` is ``auto`` (write in place when ``out_dir`` is the driver's, else ship files back),
    ``always`` or ``never``. Returns ``{"code", "shared", "node", "files"}``; ``files`` is empty
    when the worker wrote straight into the shared output directory.
    """
    os.environ.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    token_file = Path(out_dir) / TOKEN_FILE
    try:
        shared = ship != "always" and token_file.read_text().strip() == token
    except OSError:
        shared = False
    if ship == "never" and not shared:
        raise RuntimeError(f"{out_dir} is not on a filesystem shared with the driver on {socket.gethostname()}")
    if shared:
        run_dir = Path(out_dir) / "runs" / run_id
    else:
        out_hash = hashlib.sha256(out_dir.encode()).hexdigest()[:8]
        run_dir = Path(tempfile.gettempdir()) / "tether-ray" / out_hash / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").unlink(missing_ok=True)
        (run_dir / "worker.log").unlink(missing_ok=True)
        atomic_write_text(run_dir / "run.yaml", run_yaml)
    if board is not None:
        board.update.remote(run_id, 0, 0)
    with open(run_dir / "worker.log", "ab") as log:
        proc = subprocess.Popen(
            worker_command(run_dir), stdout=log, stderr=subprocess.STDOUT, env=worker_env(threads),
            cwd=cwd if os.path.isdir(cwd) else str(run_dir),
        )
        last = (-1, -1)
        while proc.poll() is None:
            time.sleep(poll_s)
            now = _read_progress(run_dir)
            if board is not None and now != last:
                board.update.remote(run_id, *now)
                last = now
    files = {} if shared else _files_of(run_dir)
    if not shared and proc.returncode == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"code": proc.returncode, "shared": shared, "node": socket.gethostname(), "files": files}


class ProgressBoard:
    """A Ray actor: runs report ``(step, max_steps)``, the driver reads them all at once."""

    def __init__(self) -> None:
        self.progress: dict[str, tuple[int, int]] = {}

    def update(self, run_id: str, step: int, max_steps: int) -> None:
        self.progress[run_id] = (step, max_steps)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        return dict(self.progress)


def _write_back(run_dir: Path, files: dict[str, bytes]) -> None:
    """Write shipped files into ``run_dir``; ``metrics.json`` last so 'done' implies complete."""
    for rel in sorted(files, key=lambda r: r == "metrics.json"):
        target = run_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        tmp.write_bytes(files[rel])
        os.replace(tmp, target)


def _one_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {(text[-1:] or [''])[0][:400]}"


def run_sweep_ray(
    runs: list[PlannedRun],
    out: Path,
    address: str,
    workers: int = 0,
    threads_per_run: int = 1,
    on_progress: ProgressHook | None = None,
    poll_s: float = 0.5,
    ship: str = "auto",
) -> Manifest:
    """Run every unfinished run as a Ray task on the cluster at ``address``; return the final manifest.

    ``workers`` > 0 caps the tasks in flight; 0 lets the cluster's CPUs decide.
    """
    out = Path(out).resolve()
    _check_writable(out)
    connected = connect(address)  # one sentence if ray is missing or the cluster does not answer
    import ray

    token = secrets.token_hex(16)
    token_path = out / TOKEN_FILE
    try:
        manifest, todo = prepare_sweep(runs, out)
        atomic_write_text(token_path, token)
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < threads_per_run:
            raise RayAddressError(
                f"--ray: the cluster at {address} has {cpus:g} CPUs; each run needs threads_per_run={threads_per_run}"
            )
        board = ray.remote(num_cpus=0)(ProgressBoard).remote()
        task = ray.remote(num_cpus=threads_per_run, max_retries=0)(run_on_node)
        cap = workers or len(todo)
        pending: dict[Any, str] = {}
        cwd = os.getcwd()
        while todo or pending:
            while todo and len(pending) < cap:
                r = todo.pop(0)
                run_yaml = (out / "runs" / r.run_id / "run.yaml").read_text()
                ref = task.remote(r.run_id, run_yaml, str(out), token, threads_per_run, cwd, board, ship)
                pending[ref] = r.run_id
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=poll_s)
            snapshot: dict[str, tuple[int, int]] = ray.get(board.snapshot.remote())
            for ref in ready:
                run_id = pending.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as exc:  # a crashed worker, a lost node: recorded, the others go on
                    record_result(manifest, out, run_id, None, error=f"ray task failed: {_one_line(exc)}")
                    continue
                if res["files"]:
                    _write_back(out / "runs" / run_id, res["files"])
                record_result(manifest, out, run_id, res["code"])
            started = [rid for rid in pending.values() if rid in snapshot]
            for rid in started:
                if manifest.runs[rid]["status"] == "pending":
                    manifest.set(rid, status="running")
            if on_progress is not None:
                on_progress(manifest.runs, {rid: snapshot[rid] for rid in started})
    finally:
        token_path.unlink(missing_ok=True)
        if connected:
            ray.shutdown()
    return manifest
