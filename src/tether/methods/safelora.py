"""``safelora``: project LoRA updates onto the alignment subspace after training (a ``finalize`` step).

Hsu, Tsai, Lin, Chen, Yu & Huang 2024, "Safe LoRA: the Silver Lining of Reducing Safety Risks
when Fine-tuning Large Language Models" (NeurIPS 2024, arXiv 2405.16833). For every LoRA target
module i, with W_aligned the aligned model's weight and W_base the pre-alignment (base) model's,

    V_i = W_aligned,i − W_base,i                       (the "alignment matrix")
    C_i = V_i V_iᵀ / ‖V_i‖_F                           ([out, out], as in the paper and its code)
    cos_i = cos( vec(C_i B_i A_i), vec(B_i A_i) )      (the LoRA update ΔW_i = B_i A_i, scaling aside)
    B_i ← C_i B_i   for the modules with cos_i ≤ τ    (``select: threshold``)
                    or for the ``num_layers`` modules with the lowest cos_i (``select: number``).

A module whose update lies far from the alignment subspace is the one fine-tuning may have used
to undo alignment; its update is replaced by its projection. The base model is a checkpoint
directory given as ``base``; by default ``<aligned model dir>/pretrained`` (the organism keeps its
pretrained-only checkpoint there). Nothing changes during training: the method only acts in
``finalize``, in place on the adapter, so the adapter ``tether train`` saves is the projected one.

Deviations: a module alignment did not change (V = 0) or an update that is still zero (BA = 0)
has no defined cosine and is left as it is; the paper's "layers" are LoRA target modules here,
as in its code. ``report`` keeps, per module, the cosine and whether it was projected.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from tether.errors import TetherError
from tether.methods.base import Method, MethodConfig, PreserveContext
from tether.methods.registry import register

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


class SafeLoRAError(TetherError):
    """A SafeLoRA run that cannot work: no adapter, or no usable base checkpoint."""


class SafeLoRAConfig(MethodConfig):
    """Base checkpoint and which modules to project."""

    base: str | None = Field(None, description="Pre-alignment checkpoint directory; default: <aligned model dir>/pretrained.")
    select: Literal["threshold", "number"] = Field("threshold", description="Project modules with cos ≤ threshold, or the num_layers lowest.")
    threshold: float = Field(0.5, ge=-1, le=1, description="τ: project modules whose cos(CBA, BA) ≤ τ.")
    num_layers: int = Field(10, ge=0, description="With select: number, how many lowest-cosine modules to project.")


def alignment_matrix(v: "torch.Tensor") -> "torch.Tensor":
    """C = V Vᵀ / ‖V‖_F for V ``[out, in]`` (float64); zero when V is zero."""
    v = v.double()
    norm = v.norm()
    if float(norm) == 0.0:
        return v.new_zeros(v.shape[0], v.shape[0])
    return (v @ v.T) / norm


def projected_cosine(c: "torch.Tensor", b: "torch.Tensor", a: "torch.Tensor") -> tuple["torch.Tensor", float | None]:
    """``(C B, cos(vec(C B A), vec(B A)))``; the cosine is None when either matrix is zero."""
    import torch

    b64, a64 = b.double(), a.double()
    cb = c.double() @ b64
    new, old = (cb @ a64).reshape(-1), (b64 @ a64).reshape(-1)
    if float(new.norm()) == 0.0 or float(old.norm()) == 0.0:
        return cb, None
    return cb, float(torch.nn.functional.cosine_similarity(new[None], old[None]).item())


def _lora_modules(model: Any, adapter: str) -> list[tuple[str, Any]]:
    """``(name relative to the HF model, LoRA layer)`` for every linear LoRA target module."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    return [
        (name, mod)
        for name, mod in base.named_modules()
        if isinstance(mod, LoraLayer) and adapter in getattr(mod, "lora_A", {}) and hasattr(mod.lora_A[adapter], "weight")
    ]


def _base_tensor_reader(base_dir: Path) -> Any:
    """``key -> tensor`` over a checkpoint's safetensors shards (read lazily, one key at a time)."""
    import json

    from safetensors import safe_open

    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        files = {k: base_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    else:
        files = {}
        for f in sorted(base_dir.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                files.update({k: f for k in fh.keys()})

    def read(key: str) -> Any:
        if key not in files:
            raise SafeLoRAError(f"method 'safelora': base checkpoint {base_dir} has no weight '{key}'; give the pre-alignment checkpoint of the same architecture as `base`")
        with safe_open(str(files[key]), framework="pt") as fh:
            return fh.get_tensor(key)

    return read


@register
class SafeLoRA(Method):
    """B ← C B with C = V Vᵀ/‖V‖_F, V = W_aligned − W_base, for modules with cos(CBA, BA) ≤ τ (Hsu et al. 2024)."""

    name = "safelora"
    description = "SafeLoRA: after a LoRA run, project low-cosine updates onto the alignment subspace W_aligned − W_base"
    supports = frozenset({"sft"})
    sharding_ok = False
    sharding_reason = "it projects whole LoRA B matrices against whole aligned and base weights after training"
    Config = SafeLoRAConfig
    config: SafeLoRAConfig

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        if self.config.base is not None:
            self._check_base(Path(self.config.base).expanduser())
        self.report: list[dict[str, Any]] = []

    def _check_base(self, path: Path) -> Path:
        from tether.models import check_checkpoint

        if not path.is_dir():
            raise SafeLoRAError(
                f"method 'safelora': base checkpoint {path} does not exist; set `base` to the pre-alignment checkpoint directory"
            )
        try:
            check_checkpoint(path)
        except TetherError as exc:
            raise SafeLoRAError(f"method 'safelora': base: {exc}") from None
        return path

    def base_dir(self, model: Any) -> Path:
        """The configured base, or ``<aligned model dir>/pretrained``."""
        if self.config.base is not None:
            return self._check_base(Path(self.config.base).expanduser())
        aligned = getattr(model.get_base_model().config, "_name_or_path", "") or ""
        guess = Path(aligned) / "pretrained"
        if not aligned or not guess.is_dir():
            raise SafeLoRAError(
                f"method 'safelora': the aligned model ({aligned or 'unknown path'}) has no pretrained/ checkpoint beside it; "
                "set `base` to the pre-alignment checkpoint directory"
            )
        return self._check_base(guess)

    def _check_peft(self, model: Any) -> None:
        from tether.train import is_peft

        if not is_peft(model):
            raise SafeLoRAError("method 'safelora' works on LoRA runs only; set model.lora in the run config")

    def setup(self, ctx: PreserveContext) -> None:
        # fail before training, not after it
        self._check_peft(ctx.model)
        self.base_dir(ctx.model)

    def finalize(self, model: "PreTrainedModel") -> "PreTrainedModel":
        """Project the selected modules' B in place; ``self.report`` lists every module's cosine."""
        import torch

        self._check_peft(model)
        read = _base_tensor_reader(self.base_dir(model))
        adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
        rows: list[dict[str, Any]] = []
        projections: dict[str, torch.Tensor] = {}
        for name, mod in _lora_modules(model, adapter):
            if getattr(mod, "merged", False):
                raise SafeLoRAError(f"method 'safelora': module {name} has its adapter merged; SafeLoRA needs the unmerged B and A")
            w_aligned = mod.get_base_layer().weight.detach()
            if getattr(mod, "fan_in_fan_out", False):
                w_aligned = w_aligned.T
            w_base = read(f"{name}.weight")
            if getattr(mod, "fan_in_fan_out", False):
                w_base = w_base.T
            if tuple(w_base.shape) != tuple(w_aligned.shape):
                raise SafeLoRAError(
                    f"method 'safelora': {name}.weight is {tuple(w_base.shape)} in the base checkpoint but "
                    f"{tuple(w_aligned.shape)} in the aligned model; give the base of the same architecture"
                )
            c = alignment_matrix(w_aligned.double().cpu() - w_base.double())
            b = mod.lora_B[adapter].weight.detach().cpu()
            a = mod.lora_A[adapter].weight.detach().cpu()
            cb, cos = projected_cosine(c, b, a)
            projections[name] = cb
            rows.append({"module": name, "cos": cos, "projected": False})
        scored = [r for r in rows if r["cos"] is not None]
        if self.config.select == "threshold":
            chosen = {r["module"] for r in scored if r["cos"] <= self.config.threshold}
        else:
            chosen = {r["module"] for r in sorted(scored, key=lambda r: r["cos"])[: self.config.num_layers]}
        mods = dict(_lora_modules(model, adapter))
        with torch.no_grad():
            for r in rows:
                if r["module"] in chosen:
                    weight = mods[r["module"]].lora_B[adapter].weight
                    weight.copy_(projections[r["module"]].to(dtype=weight.dtype, device=weight.device))
                    r["projected"] = True
        self.report = rows
        return model
