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
  which maps a name (``ddp``, ``fsdp``, ``zero2``, ``zero3``, ``cpu``) or a path to a file.
"""

from __future__ import annotations

import os
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
