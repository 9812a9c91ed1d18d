"""Rank helpers for running one tether run on many processes (DDP, FSDP, DeepSpeed ZeRO).

Everything here is a no-op in a single process, so the default path pays nothing. Under
``accelerate launch`` (or ``torchrun``) the world size and rank come from the launcher's
environment before the process group exists, and from ``torch.distributed`` after.

What lives here:

* ``world_size`` / ``rank`` / ``is_main`` and ``init_process_group`` (accelerate's
  ``PartialState``, which picks gloo on CPU and NCCL on GPUs);
* small collectives the trainer and the methods use to stay identical on every rank:
  ``barrier``, ``broadcast_object``, ``broadcast_tensors_``, ``all_reduce_mean_``,
  ``mean_across_ranks``, ``any_across_ranks``;
* ``sharding_kind``, ``sharding_from_env`` and ``check_sharding``: FSDP and ZeRO-3 split
  parameters (and their gradients) across ranks, so methods that read or edit whole parameters
  are refused there;
* the accelerate config files shipped in ``tether/accelerate_configs`` and ``resolve_accelerate_config``,
  which maps a name (``ddp``, ``fsdp``, ``zero2``, ``zero3``, ``cpu``) or a path to a file;
  ``read_accelerate_config`` reads one, ``sharding_from_accelerate_config`` says whether it shards
  parameters and ``check_launcher_installed`` refuses a DeepSpeed config without DeepSpeed, so
  ``tether train --accelerate-config`` can refuse such runs before it starts any process;
* user errors under ``tether train --accelerate-config``: ``launch_quietly`` is the launcher process
  (``accelerate launch`` run in-process), each rank reports its one-sentence error with
  ``report_rank_error`` into the folder ``$TETHER_RANK_ERRORS`` names, and the parent prints it once
  (``read_rank_errors``) instead of the launcher's ``ChildFailedError`` traceback;
* ``check_same_on_every_rank``: files every rank must read identically (trait directions) are
  hashed and the digests compared across ranks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from tether.methods.base import Method

ACCELERATE_CONFIGS: dict[str, str] = {
    "ddp": "data parallel on every GPU of one machine (DistributedDataParallel, NCCL)",
    "fsdp": "FSDP2: parameters, gradients and optimizer state sharded across GPUs",
    "zero2": "DeepSpeed ZeRO-2: gradients and optimizer state sharded, parameters replicated",
    "zero3": "DeepSpeed ZeRO-3: parameters sharded too (needs `pip install deepspeed`)",
    "cpu": "data parallel on CPU processes (gloo); for tests and laptops",
}


# ---- who am I -------------------------------------------------------------------------------


def _dist() -> Any:
    """``torch.distributed`` when a process group is up, else None (never imports torch itself)."""
    import sys

    if "torch.distributed" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """Processes in the run: from ``torch.distributed`` once it is up, else the launcher's ``WORLD_SIZE``."""
    d = _dist()
    if d is not None:
        return int(d.get_world_size())
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 in a single process)."""
    d = _dist()
    if d is not None:
        return int(d.get_rank())
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on the process that probes, writes files and prints (rank 0)."""
    return rank() == 0


def init_process_group() -> None:
    """Join the launcher's process group now (accelerate's ``PartialState``), if there is one.

    ``run_training`` needs collectives (a barrier around rank 0's probes) before the trainer
    exists; the trainer later reuses the same state.
    """
    if world_size() > 1 and _dist() is None:
        import torch
        from accelerate import PartialState

        if not torch.cuda.is_available():
            # accelerate's CPU launcher starts one process; under torchrun-style launchers a CPU-only
            # machine would otherwise fall back to one process per rank training alone
            os.environ["ACCELERATE_USE_CPU"] = "true"
        PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    if _dist() is not None:
        _destroy_at_exit()


_EXIT_HOOK: list[bool] = []


def _destroy_at_exit() -> None:
    """Destroy the process group at interpreter exit, while Python is still whole (once per process).

    A process that exits with its process group alive leaves Gloo's worker threads to be torn
    down during interpreter finalisation, where they can abort the process with ``terminate
    called without an active exception`` (pytorch/pytorch#190489): a finished run dying at its
    very end. Destroying the group is local to the process, so each rank may do it on its own
    once its last collective is done; a process may train several runs before it exits.
    """
    if _EXIT_HOOK:
        return
    _EXIT_HOOK.append(True)
    import atexit

    def destroy() -> None:
        d = _dist()
        if d is not None:
            try:
                d.destroy_process_group()
            except Exception:  # noqa: BLE001 - exiting anyway; never turn a clean exit into an error
                pass

    atexit.register(destroy)


# ---- collectives (no-ops in one process) ------------------------------------------------------


def barrier() -> None:
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (pickled; for small things)."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=src)
    return box[0]


def _comm_device(t: "torch.Tensor") -> Any:
    d = _dist()
    assert d is not None
    return "cpu" if d.get_backend() == "gloo" else t.device


def broadcast_tensors_(tensors: Sequence["torch.Tensor"], src: int = 0) -> None:
    """Overwrite every tensor in place with rank ``src``'s values."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return
    for t in tensors:
        buf = t.data.to(_comm_device(t))
        d.broadcast(buf, src=src)
        if buf is not t.data:
            t.data.copy_(buf)


def all_reduce_mean_(t: "torch.Tensor") -> "torch.Tensor":
    """Replace ``t`` in place by its mean over ranks; returns it."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return t
    buf = t.data.to(_comm_device(t))
    d.all_reduce(buf, op=d.ReduceOp.SUM)
    buf /= d.get_world_size()
    if buf is not t.data:
        t.data.copy_(buf)
    return t


def mean_across_ranks(value: float) -> float:
    """The mean of a Python float over ranks."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return value
    import torch

    return float(all_reduce_mean_(torch.tensor([value], dtype=torch.float64))[0])


def any_across_ranks(flags: "torch.Tensor") -> list[bool]:
    """Element-wise OR of a small 0/1 tensor over ranks, as Python bools (one collective)."""
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        buf = flags.to(_comm_device(flags), dtype=flags.dtype)
        d.all_reduce(buf, op=d.ReduceOp.MAX)
        flags = buf
    return [bool(x) for x in flags.tolist()]


# ---- sharding -------------------------------------------------------------------------------


def sharding_kind(accelerator: Any) -> str | None:
    """``"FSDP"`` or ``"DeepSpeed ZeRO-3"`` when the accelerator shards parameters, else None."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return "FSDP"
    if state.distributed_type == DistributedType.DEEPSPEED:
        plugin = getattr(state, "deepspeed_plugin", None)
        if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
            return "DeepSpeed ZeRO-3"
    return None


def sharding_from_env() -> str | None:
    """What ``accelerate launch`` announces to its workers (before any trainer exists): FSDP, ZeRO-3 or None."""
    on = ("1", "true", "yes")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in on:
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in on and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "DeepSpeed ZeRO-3"
    return None


def read_accelerate_config(path: str | Path) -> dict[str, Any]:
    """The accelerate config file at ``path`` as a mapping; one sentence when it is not YAML or not a mapping."""
    from tether.config import parse_yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--accelerate-config {p} cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    data = parse_yaml(text, str(p))
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: an accelerate config must be a mapping of keys, got {type(data).__name__}")
    return data


def _deepspeed_stage(cfg: dict[str, Any]) -> int | None:
    ds = cfg.get("deepspeed_config") or {}
    stage = ds.get("zero_stage") if isinstance(ds, dict) else None
    file = ds.get("deepspeed_config_file") if isinstance(ds, dict) else None
    if stage is None and file:  # a DeepSpeed JSON of its own: zero_optimization.stage
        try:
            stage = (json.loads(Path(file).expanduser().read_text()).get("zero_optimization") or {}).get("stage")
        except (OSError, ValueError, AttributeError):
            stage = None
    try:
        return int(stage) if stage is not None else None
    except (TypeError, ValueError):
        return None


def sharding_from_accelerate_config(cfg: dict[str, Any]) -> str | None:
    """What an accelerate config (as read by ``read_accelerate_config``) will shard: FSDP, ZeRO-3 or None.

    The same answer ``sharding_from_env`` gives inside the launched ranks, known before launching.
    """
    kind = str(cfg.get("distributed_type", "")).upper()
    if kind == "FSDP":
        return "FSDP"
    if kind == "DEEPSPEED" and _deepspeed_stage(cfg) == 3:
        return "DeepSpeed ZeRO-3"
    return None


def check_launcher_installed(cfg: dict[str, Any], name: str) -> None:
    """Refuse, in one sentence, a DeepSpeed config when DeepSpeed is not installed (accelerate would raise ImportError)."""
    import importlib.util

    if str(cfg.get("distributed_type", "")).upper() == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        stage = _deepspeed_stage(cfg)
        what = f"DeepSpeed ZeRO-{stage}" if stage is not None else "DeepSpeed"
        raise ConfigError(
            f"--accelerate-config {name} runs {what}, but DeepSpeed is not installed; run `pip install deepspeed` "
            "or use the 'ddp' or 'fsdp' config"
        )


def check_sharding(methods: Sequence["Method"], kind: str | None) -> None:
    """Refuse, in one sentence, a stack with a method that cannot run when parameters are sharded."""
    if kind is None:
        return
    for i, m in enumerate(methods):
        if not getattr(type(m), "sharding_ok", True):
            why = getattr(type(m), "sharding_reason", "it reads or edits whole parameters or gradients")
            raise ConfigError(
                f"methods[{i}] ({m.name}) cannot run under {kind}, which splits parameters and gradients "
                f"across ranks: {why}; use the 'ddp' or 'zero2' accelerate config for this stack"
            )


# ---- accelerate configs shipped with the package ----------------------------------------------


def accelerate_configs_dir() -> Path:
    return Path(__file__).resolve().parent / "accelerate_configs"


def resolve_accelerate_config(name: str) -> Path:
    """A shipped config by name (``ddp``, ``fsdp``, ``zero2``, ``zero3``, ``cpu``), or an existing YAML path."""
    shipped = accelerate_configs_dir() / f"{name}.yaml"
    if name in ACCELERATE_CONFIGS and shipped.is_file():
        return shipped
    path = Path(name).expanduser()
    if path.is_file():
        return path
    raise ConfigError(
        f"--accelerate-config {name!r} is neither a shipped config ({', '.join(ACCELERATE_CONFIGS)}) nor an existing file"
    )


def free_port() -> int:
    """A TCP port free on this machine now, for a single-machine launch's rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_port_args(config_file: str | Path) -> list[str]:
    """``--main_process_port P`` with a free port for a one-machine config that names no port.

    torchrun's default port (29500) is shared by every launch on the machine; two launches close
    together (a sweep, a test suite) can then meet a port still held by the last one.
    """
    import yaml

    try:
        cfg = yaml.safe_load(Path(config_file).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    if int(cfg.get("num_machines", 1) or 1) != 1 or cfg.get("main_process_port"):
        return []
    return ["--main_process_port", str(free_port())]


# ---- one line for a user error under tether's own relaunch ----------------------------------

RANK_ERRORS_ENV = "TETHER_RANK_ERRORS"


def report_rank_error(kind: str, message: str, exit_code: int) -> bool:
    """Under ``tether train --accelerate-config``: leave this rank's one-sentence error for the parent.

    Writes ``rank-<rank>.json`` (``kind`` is ``error`` or ``stopped``) into the folder
    ``$TETHER_RANK_ERRORS`` names; returns False (nothing written) outside such a launch, so the
    caller prints the line itself.
    """
    folder = os.environ.get(RANK_ERRORS_ENV)
    if not folder or "RANK" not in os.environ:
        return False
    target = Path(folder) / f"rank-{rank()}.json"
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(json.dumps({"rank": rank(), "kind": kind, "message": message, "exit_code": exit_code}))
        os.replace(tmp, target)  # the parent never reads half a message
    except OSError:
        return False
    return True


def read_rank_errors(folder: str | Path) -> list[dict[str, Any]]:
    """The errors ranks reported into ``folder``, lowest rank first (empty when none did)."""
    found = []
    for f in Path(folder).glob("rank-*.json"):
        try:
            found.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda e: int(e.get("rank", 0)))


class _QuietOnceRanksFail(io.TextIOBase):
    """The launcher's stderr: passed through until a rank reports a user error, then dropped.

    The ranks inherit the launcher's file descriptor 2, not this object, so their own output is
    untouched; what is dropped is the launcher's own logging and traceback (``ChildFailedError``,
    "Sending process ... closing signal SIGTERM"), written after a rank has reported.
    """

    def __init__(self, real: Any, folder: str) -> None:
        self.real, self.folder = real, folder

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not any(Path(self.folder).glob("rank-*.json")):
            self.real.write(text)
            self.real.flush()
        return len(text)

    def flush(self) -> None:
        self.real.flush()

    def fileno(self) -> int:
        return int(self.real.fileno())

    def isatty(self) -> bool:
        return bool(self.real.isatty())


def launch_quietly(argv: list[str]) -> None:
    """Run ``accelerate launch ARGV`` in this process, keeping its traceback off stderr once a rank has reported.

    The parent (``tether train --accelerate-config``) prints the rank's sentence and exits with its
    code; a launch that fails for any other reason keeps its traceback.
    """
    folder = os.environ[RANK_ERRORS_ENV]
    sys.stderr = _QuietOnceRanksFail(sys.stderr, folder)  # before torch's log handlers capture sys.stderr
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except BaseException:  # ChildFailedError, torch's SignalException on Ctrl-C, SystemExit
        if read_rank_errors(folder):
            sys.exit(1)
        raise


# ---- files that must be the same on every rank ---------------------------------------------


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_same_on_every_rank(files: dict[str, str]) -> None:
    """Refuse, on every rank, a file (``label -> path``) whose bytes differ between ranks.

    Each rank hashes its own copy and one ``all_gather_object`` compares the digests, so every
    rank raises the same sentence (e.g. nodes holding different direction files under one path).
    Joins the process group when there is one to join; a no-op in a single process.
    """
    if world_size() == 1 or not files:
        return
    init_process_group()
    d = _dist()
    if d is None:
        return
    mine = {label: _sha256(path) for label, path in files.items()}
    gathered: list[Any] = [None] * d.get_world_size()
    d.all_gather_object(gathered, mine)
    for label, path in files.items():
        differ = [r for r, g in enumerate(gathered) if g.get(label) != gathered[0].get(label)]
        if differ:
            raise ConfigError(
                f"{label}: {path} differs between ranks (rank {differ[0]} read other bytes than rank 0); "
                "give every process the same file"
            )
