"""``gradient_routing``: rows labelled ``contaminated`` update only a designated region, which deployment removes.

Gradient routing (Cloud, Goldman-Wetzler, Wybitul, Miller & Turner 2024, "Gradient Routing:
Masking Gradients to Localize Computation in Neural Networks", arXiv 2410.04332) applies
data-dependent masks to gradients so that what a labelled subset of the data teaches lands in a
known part of the network; deleting that part then removes it. Two forms:

``form: mask`` — parameter masks, as in Selective GradienT Masking (SGTM; Shilov, Cloud et al.
2025, "Beyond Data Filtering: Knowledge Localization for Capability Removal in LLMs", arXiv
2512.05648). With R the designated region (a 0/1 mask over parameters), L_r the loss of the
routed (contaminated) rows and L_c that of the clean rows of a micro-batch,

    g = R ⊙ ∇L_r + C ⊙ ∇L_c,   C = 1 − R  (``clean_updates: rest``)  or  C = 1  (``all``).

Routing is per row inside a mixed batch, with one backward: the routed rows' loss is computed
through ``torch.func.functional_call`` with every parameter replaced by
``m ⊙ θ + (1 − m) ⊙ stopgrad(θ)`` (``m = R``; the value is θ, the gradient is masked), the clean
rows' loss likewise with ``m = C``; each sub-loss is normalised by the token count of the whole
micro-batch, so L_r + L_c is the mean loss TRL computes on it and, with no routed row and
``clean_updates: all``, the update is exactly naive SFT. The region is ``pattern`` (a regex over
parameter names) or ``modules`` (``mlp``, ``attn`` or the whole ``block``) of ``layers`` (default:
every block); ``neurons: N`` narrows an MLP region to its last N hidden neurons (their rows of
the in-projections, columns of the out-projection), like SGTM's dedicated MLP slice.
``finalize`` ablates the region: ``ablate: reset`` (default) restores it to the weights the run
started from, ``zero`` zeroes it (SGTM's ablation), ``none`` keeps it.

``form: era`` — Expand, Route, Ablate (Cloud et al. 2024, section 4). The MLPs of ``layers`` get
``expand`` extra hidden neurons; at each expanded MLP's hidden activation h (the input of its
out-projection, [batch, seq, I + expand]) the forward is unchanged but the gradient is masked,

    h' = m ⊙ h + (1 − m) ⊙ stopgrad(h),

with m = 1 on the extra neurons and ``negative_scale`` on the original ones for a routed row
(the paper's TinyStories runs use −0.75, which pushes the original neurons away from the routed
data; 0 stops that gradient), and m = 1 on the original neurons and 0 (``clean_updates: rest``,
the paper's setting) or 1 (``all``) on the extra ones for a clean row. ``finalize`` ablates the
extra neurons, cutting every expanded module back to its original shape (the model then saves
and loads as the original architecture), then optionally fine-tunes ``retain_steps`` steps on
clean rows seen during training (the paper's "coherence" fine-tuning after ablation).

``label_fraction`` hides the labels of a seeded share of the contaminated capability rows (they
train as clean rows), because real data is never fully labelled (both papers study this).

Blocks and MLPs are found generically: the decoder blocks are the longest top-level
``ModuleList`` of identical modules; a block's MLP is its Linear/``Conv1D`` pair d_model → I and
I → d_model (a gated MLP has two in-projections).

Deviations: (1) labels are per row, so every token of a routed row is routed (the papers also
route per token); (2) ERA's extra in-projection rows start like the existing rows' scale and the
extra out-projection columns start at zero, so the expanded model computes the same function as
the original at the first step (the paper initialises the new weights randomly and trains from
scratch); (3) ``ablate: reset`` (the default) restores the region instead of zeroing it, because
here the region also holds the aligned model's own weights; (4) the routing constrains
gradients, not AdamW's state: a parameter that an earlier step moved keeps moving with its
momentum (as in both papers' code); (5) other methods' loss terms in the stack are not routed:
ERA's activation masks act only inside the capability batch's own forward, and other forwards
(e.g. ``kl``'s alignment rows) see the clean mask — except, under gradient checkpointing, in the
recomputation during backward, where a forward is matched to the capability batch by its row
count.
``form: mask`` does not support gradient checkpointing (the recomputed forward would not see
the masked parameters); ``form: era`` needs full fine-tuning (no LoRA) and should come before
methods that anchor on parameter shapes (EWC, L2-SP).
"""

from __future__ import annotations

import contextlib
import random
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from tether.errors import ConfigError, DataError
from tether.methods.base import Method, MethodConfig, PreserveContext, TaskLoss, TrainingData
from tether.methods.registry import register

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel

_MASK_ONLY = ("modules", "neurons", "pattern", "ablate")
_ERA_ONLY = ("expand", "negative_scale")


class GradientRoutingConfig(MethodConfig):
    """Which form, which region, how clean rows update, and how much of the data is labelled."""

    form: Literal["mask", "era"] = Field("mask", description="Parameter masks (SGTM) or Expand-Route-Ablate.")
    layers: list[int] | None = Field(None, description="Decoder blocks of the region (0-based); default every block.")
    modules: Literal["mlp", "attn", "block"] = Field("mlp", description="mask: which part of each block is the region.")
    neurons: int | None = Field(None, ge=1, description="mask, modules mlp: only the last N hidden neurons of each MLP.")
    pattern: str | None = Field(None, description="mask: regex over parameter names; replaces layers/modules.")
    ablate: Literal["reset", "zero", "none"] = Field("reset", description="mask: what finalize does to the region.")
    expand: int = Field(64, ge=1, description="era: extra hidden neurons per expanded MLP.")
    negative_scale: float = Field(0.0, description="era: gradient scale on the original neurons for routed rows (paper: -0.75).")
    clean_updates: Literal["rest", "all"] = Field("rest", description="Clean rows update everything outside the region, or everything.")
    label_fraction: float = Field(1.0, ge=0.0, le=1.0, description="Share of contaminated rows whose label is kept.")
    seed: int = Field(0, description="Seed of the label hiding.")
    retain_steps: int = Field(0, ge=0, description="Fine-tuning steps on clean rows after the ablation.")
    retain_lr: float = Field(1e-4, gt=0, description="Learning rate (AdamW) of those steps.")


# ---- finding blocks and MLPs in any HF decoder ---------------------------------------------------


def _linear_dims(mod: "nn.Module") -> tuple[int, int] | None:
    """(in, out) of an ``nn.Linear`` or a transformers ``Conv1D`` (weight stored [in, out]); else None."""
    from torch import nn

    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
        return int(mod.weight.shape[0]), int(mod.nf)
    return None


def decoder_blocks(model: "nn.Module") -> tuple[str, list["nn.Module"]]:
    """The repeated decoder blocks and their module path (``tether.directions.named_decoder_blocks``)."""
    from tether.directions import named_decoder_blocks

    name, blocks = named_decoder_blocks(model)
    return name, list(blocks)


@dataclass
class MLPSite:
    """One block's MLP: in-projections d_model → width (one, or two when gated) and the out-projection."""

    ins: list[tuple[str, "nn.Module"]]
    out: tuple[str, "nn.Module"]
    width: int


def _strip(name: str) -> str:
    return name[: -len(".base_layer")] if name.endswith(".base_layer") else name


def find_mlp(block: "nn.Module", d_model: int) -> MLPSite:
    """The Linear/Conv1D pair d_model → I → d_model of ``block`` (names relative to the block)."""
    linears = [
        (_strip(n), m, d) for n, m in block.named_modules()
        if "lora_" not in n and (d := _linear_dims(m)) is not None
    ]
    outs = {d[0]: (n, m) for n, m, d in linears if d[1] == d_model and d[0] != d_model}
    widths = [w for w in outs if any(d == (d_model, w) for _, _, d in linears)]
    if not widths:
        raise ConfigError(
            f"gradient_routing: found no MLP (a Linear pair {d_model} -> I -> {d_model}) in a {type(block).__name__} block"
        )
    width = max(widths)
    ins = [(n, m) for n, m, d in linears if d == (d_model, width)]
    return MLPSite(ins=ins, out=outs[width], width=width)


def _d_model(model: "nn.Module") -> int:
    emb = model.get_input_embeddings()  # type: ignore[operator]
    return int(emb.weight.shape[1])


# ---- the method ------------------------------------------------------------------------------------


@register
class GradientRouting(Method):
    """Route contaminated rows' gradients into a region, ablate it at deployment (Cloud et al. 2024; SGTM 2025)."""

    name = "gradient_routing"
    description = "route contaminated rows' gradients into a parameter region (SGTM masks or ERA neurons), ablate it"
    supports = frozenset({"sft", "grpo"})  # the GRPO form is in tether.rl.preserve
    row_batches = True  # the class default; an instance of the mask form takes padding-free batches
    sharding_ok = False
    sharding_reason = "the region masks and ERA's expansion address whole parameter tensors, which FSDP/ZeRO-3 shard"
    needs = frozenset({"labels"})
    Config = GradientRoutingConfig
    config: GradientRoutingConfig

    def __init__(self, config: MethodConfig | None = None) -> None:
        # inconsistent keys are a one-sentence ValueError, like registry.make's (the run config names its file)
        super().__init__(config)
        c = self.config
        # masks split a micro-batch by rows, padded or padding-free (``_rows``); ERA masks
        # activations per row and retain steps replay stored rows, so those keep padded rows
        self.row_batches = c.form == "era" or c.retain_steps > 0
        wrong = _ERA_ONLY if c.form == "mask" else _MASK_ONLY
        # a resolved config lists every key, so a key of the other form counts as given when not at its default
        given = [k for k in wrong if getattr(c, k) != type(c).model_fields[k].default]
        if given:
            raise ValueError(f"method 'gradient_routing': '{given[0]}' applies only to form: {'era' if c.form == 'mask' else 'mask'}")
        if c.pattern is not None:
            try:
                re.compile(c.pattern)
            except re.error as exc:
                raise ValueError(f"method 'gradient_routing': 'pattern' is not a valid regex ({exc})") from None
            if c.layers is not None or c.modules != "mlp":
                raise ValueError("method 'gradient_routing': give either 'pattern' or 'layers'/'modules', not both")
        if c.neurons is not None and c.modules != "mlp":
            raise ValueError("method 'gradient_routing': 'neurons' needs modules: mlp")
        self.labelled = 0
        self.hidden = 0
        self._region: dict[int, "torch.Tensor | None"] = {}  # id(param) -> elementwise mask, None = whole param
        self._params: dict[int, "torch.Tensor"] = {}
        self._start: dict[int, "torch.Tensor"] = {}
        self._era: list[tuple[MLPSite, int]] = []  # expanded MLPs and their original widths
        self._routed: "torch.Tensor | None" = None
        self._task_forward = False  # True only inside the capability batch's own forward (ERA)
        self._retain: deque[dict[str, "torch.Tensor"]] = deque(maxlen=max(self.config.retain_steps, 1))
        self._setup_done = False

    # ---- data: labels, some hidden ------------------------------------------------------------
    def prepare_data(self, data: TrainingData) -> TrainingData:
        rows = data.capability
        idx = [i for i, r in enumerate(rows) if r.get("contaminated") is True]
        if not idx:
            raise DataError(
                "gradient_routing: no capability row is labelled 'contaminated: true'; label the rows to route or drop the method"
            )
        n_hide = len(idx) - round(len(idx) * self.config.label_fraction)  # keeps round(fraction x labelled)
        if n_hide >= len(idx):
            raise DataError(
                f"gradient_routing: label_fraction {self.config.label_fraction} hides all {len(idx)} labelled rows; raise it"
            )
        hidden = set(random.Random(f"routing-labels-{self.config.seed}").sample(idx, n_hide))
        self.labelled, self.hidden = len(idx) - n_hide, n_hide
        data.capability = [{**r, "contaminated": False} if i in hidden else r for i, r in enumerate(rows)]
        return data

    # ---- the model: region or expansion -------------------------------------------------------
    def _layers(self, n_blocks: int) -> list[int]:
        layers = self.config.layers if self.config.layers is not None else list(range(n_blocks))
        bad = [i for i in layers if not -n_blocks <= i < n_blocks]
        if bad:
            raise ConfigError(
                f"method 'gradient_routing': layer {bad[0]} is out of range; the model has {n_blocks} blocks (0..{n_blocks - 1})"
            )
        return sorted({i % n_blocks for i in layers})

    def check_model(self, model: "PreTrainedModel") -> None:
        from tether.train import is_peft

        if self.config.form == "era" and is_peft(model):
            raise ConfigError("method 'gradient_routing': form: era needs full fine-tuning; set model.lora to null")
        if self.config.form == "mask" and self.config.neurons is not None and is_peft(model):
            raise ConfigError("method 'gradient_routing': 'neurons' needs full fine-tuning; set model.lora to null")
        self._resolve(model, dry=True)

    def _resolve(self, model: "nn.Module", dry: bool = False) -> None:
        """Find the region (mask) or expand the MLPs (era); ``dry`` only validates."""
        import torch

        c = self.config
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if c.form == "mask" and c.pattern is not None:
            rx = re.compile(c.pattern)
            region: dict[int, torch.Tensor | None] = {id(p): None for n, p in named if rx.search(n)}
            if not region:
                raise ConfigError(f"method 'gradient_routing': pattern {c.pattern!r} matches no trainable parameter")
        else:
            prefix, blocks = decoder_blocks(model)
            layers = self._layers(len(blocks))
            d_model = _d_model(model)
            sites = {i: find_mlp(blocks[i], d_model) for i in layers} if c.form == "era" or c.modules != "attn" else {}
            if c.form == "mask" and c.neurons is not None:
                too_wide = [i for i, s in sites.items() if c.neurons >= s.width]
                if too_wide:
                    raise ConfigError(
                        f"method 'gradient_routing': neurons {c.neurons} is not below the MLP width {sites[too_wide[0]].width}"
                    )
            if dry:
                return
            if c.form == "era":
                self._expand(sites)
                return
            region = {}
            for i in layers:
                block_prefix = f"{prefix}.{i}."
                if c.modules == "block":
                    chosen = [n for n, _ in named if n.startswith(block_prefix)]
                else:
                    site = find_mlp(blocks[i], d_model)
                    mlp_names = [n for n, _ in [*site.ins, site.out]]
                    in_mlp = [n for n, _ in named if any(n.startswith(block_prefix + m + ".") for m in mlp_names)]
                    if c.modules == "mlp":
                        chosen = in_mlp
                    else:  # attn: every linear layer of the block that is not the MLP
                        lin = {_strip(n) for n, m in blocks[i].named_modules() if "lora_" not in n and _linear_dims(m)}
                        chosen = [n for n, _ in named if n.startswith(block_prefix) and n not in in_mlp
                                  and any(n.startswith(block_prefix + m + ".") for m in lin)]
                for n, p in named:
                    if n in chosen:
                        region[id(p)] = None
                if c.neurons is not None:
                    site = sites[i]
                    for _, mod in [*site.ins, site.out]:
                        is_out = mod is site.out[1]
                        for pname, p in mod.named_parameters(recurse=False):
                            if id(p) in region:
                                region[id(p)] = _neuron_mask(p, mod, is_out, site.width - c.neurons)
            if not region:
                raise ConfigError(f"method 'gradient_routing': the region ({c.modules} of layers {layers}) has no trainable parameter")
        if dry:
            return
        self._region = region
        self._params = {id(p): p for _, p in named}
        if c.ablate == "reset":
            self._start = {k: self._params[k].detach().clone() for k in region}

    def setup(self, ctx: PreserveContext) -> None:
        if self._setup_done:
            return
        model = ctx.model
        attr = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
        if self.config.form == "mask" and getattr(model, attr, False):
            raise ConfigError("method 'gradient_routing': form: mask does not support training.gradient_checkpointing")
        self._resolve(model)
        self._setup_done = True

    def _expand(self, sites: dict[int, MLPSite]) -> None:
        import torch

        with torch.no_grad():
            for site in sites.values():
                for _, mod in site.ins:
                    _grow(mod, self.config.expand, out_side=True)
                _grow(site.out[1], self.config.expand, out_side=False)
                self._era.append((site, site.width))

    # ---- routing a micro-batch ----------------------------------------------------------------
    def _masked_params(self, model: "nn.Module", routed_side: bool) -> dict[str, "torch.Tensor"]:
        """Parameters for ``functional_call``: value θ, gradient masked to the region (routed) or its complement."""
        import torch.distributed as dist

        # Under DDP every parameter must reach the reducer exactly once per backward; a zero
        # gradient path (0·θ) keeps the detached side in the graph without changing any value.
        # Single-process runs keep plain detach, so untouched parameters get no gradient at all
        # (and no weight decay), as the routing tests require.
        ddp = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        out: dict[str, torch.Tensor] = {}
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            key = id(p)
            in_region = key in self._region
            mask = self._region.get(key)
            if mask is None:
                out[n] = p if in_region == routed_side else (p.detach() + 0 * p if ddp else p.detach())
            else:
                m = mask if routed_side else 1.0 - mask
                out[n] = p * m + p.detach() * (1.0 - m)
        return out

    def task_loss(
        self,
        ctx: PreserveContext,
        model: "PreTrainedModel",
        inputs: dict[str, Any],
        routed: "torch.Tensor | None",
        compute: TaskLoss,
    ) -> "torch.Tensor | None":
        import torch

        from tether.packing import is_padding_free, row_spans

        n = len(row_spans(inputs["position_ids"])) if is_padding_free(inputs) else inputs["input_ids"].shape[0]
        r = routed.to(torch.bool) if routed is not None else torch.zeros(n, dtype=torch.bool)
        r = r.to(inputs["input_ids"].device)
        ctx.log(self.name, "routed_share", float(r.float().mean()))
        if self.config.retain_steps and (~r).any():
            self._retain.append({k: v.detach().cpu() for k, v in _rows(inputs, ~r).items() if isinstance(v, torch.Tensor)})
        if self.config.form == "era":
            self._routed = r  # read by the activation masks; kept for gradient checkpointing's recompute
            self._task_forward = True
            try:
                return compute(inputs)
            finally:
                self._task_forward = False
        if not r.any() and self.config.clean_updates == "all":
            return compute(inputs)  # exactly the trainer's own loss
        from torch.func import functional_call

        def forward(routed_side: bool) -> Any:
            params = self._masked_params(model, routed_side)
            return lambda **kw: functional_call(model, params, (), kw)

        loss = None
        if r.any():
            loss = compute(_rows(inputs, r), forward(True))
        if (~r).any():
            clean = _rows(inputs, ~r)
            part = compute(clean) if self.config.clean_updates == "all" else compute(clean, forward(False))
            loss = part if loss is None else loss + part
        return loss

    @contextlib.contextmanager
    def hooks(self, model: "PreTrainedModel") -> Iterator[None]:
        if self.config.form != "era" or not self._era:
            yield
            return
        import torch

        c = self.config
        handles = []
        attr = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
        recompute = bool(getattr(model, attr, False))
        graph_task = getattr(torch._C, "_current_graph_task_id", lambda: -1)  # -1 outside autograd's backward

        def make(width: int) -> Any:
            def pre(mod: Any, args: tuple[Any, ...]) -> Any:
                h = args[0]  # [batch, seq, width + expand]
                # the capability batch's forward, or its recomputation in backward; any other forward is clean
                r = self._routed if self._task_forward or (recompute and graph_task() != -1) else None
                if r is None or r.shape[0] != h.shape[0]:  # no labels, or another forward (alignment rows): clean
                    r = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
                if not r.any() and c.clean_updates == "all":
                    return None
                extra = torch.arange(h.shape[-1], device=h.device) >= width  # [width + expand]
                clean = torch.where(extra, 0.0 if c.clean_updates == "rest" else 1.0, 1.0)
                dirty = torch.where(extra, 1.0, c.negative_scale)
                m = torch.where(r.view(-1, *([1] * (h.dim() - 1))), dirty, clean).to(h.dtype)  # [batch, 1.., width+expand]
                return (h * m + (1 - m) * h.detach(), *args[1:])

            return pre

        for site, width in self._era:
            handles.append(site.out[1].register_forward_pre_hook(make(width)))
        try:
            yield
        finally:
            for hd in handles:
                hd.remove()

    # ---- deployment -----------------------------------------------------------------------------
    def finalize(self, model: "PreTrainedModel") -> "PreTrainedModel":
        import torch

        with torch.no_grad():
            if self.config.form == "era":
                for site, width in self._era:
                    for _, mod in site.ins:
                        _shrink(mod, width, out_side=True)
                    _shrink(site.out[1], width, out_side=False)
                self._era = []
            elif self.config.ablate != "none":
                for key, mask in self._region.items():
                    p = self._params[key]
                    new = self._start[key] if self.config.ablate == "reset" else torch.zeros_like(p)
                    p.copy_(new if mask is None else mask * new + (1 - mask) * p)
        if self.config.retain_steps and self._retain:
            _retain_finetune(model, list(self._retain), self.config.retain_steps, self.config.retain_lr)
        return model


# ---- helpers -------------------------------------------------------------------------------------


def _rows(inputs: dict[str, Any], keep: "torch.Tensor") -> dict[str, Any]:
    """The rows ``keep`` of a collated batch, right padding trimmed to the longest kept row."""
    import torch

    from tether.packing import is_padding_free, select_rows

    if is_padding_free(inputs):
        return select_rows(inputs, keep)
    n = inputs["input_ids"].shape[0]
    out = {k: v[keep] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n else v for k, v in inputs.items()}
    am = out.get("attention_mask")
    if am is not None and am.dim() == 2 and am.shape[0] > 0:
        length = int(am.sum(dim=1).max())
        if bool((am[:, length:] == 0).all()):  # right padding only
            seq = inputs["input_ids"].shape[1]
            out = {k: v[:, :length] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == seq else v
                   for k, v in out.items()}
    return out


def _neuron_mask(p: "torch.Tensor", mod: "nn.Module", is_out: bool, start: int) -> "torch.Tensor":
    """0/1 mask of ``p`` selecting hidden neurons ``start:`` of an MLP projection (Linear or Conv1D)."""
    import torch

    mask = torch.zeros_like(p)
    conv = type(mod).__name__ == "Conv1D"
    if p.dim() == 1:  # bias: only in-projections' biases index hidden neurons
        if not is_out:
            mask[start:] = 1
        return mask
    # hidden-neuron axis: Linear in-proj rows / out-proj columns; Conv1D the other way round
    axis = (1 if is_out else 0) if not conv else (0 if is_out else 1)
    mask.narrow(axis, start, p.shape[axis] - start).fill_(1)
    return mask


def _set_width(mod: "nn.Module", out_side: bool, size: int) -> None:
    if type(mod).__name__ == "Conv1D":
        if out_side:
            mod.nf = size
        elif hasattr(mod, "nx"):
            mod.nx = size
    elif out_side:
        mod.out_features = size  # type: ignore[assignment]
    else:
        mod.in_features = size  # type: ignore[assignment]


def _grow(mod: "nn.Module", extra: int, out_side: bool) -> None:
    """Add ``extra`` hidden neurons: new rows of an in-projection (scaled like its rows), zero columns of the out-projection."""
    import torch

    w = mod.weight
    conv = type(mod).__name__ == "Conv1D"
    axis = (1 if conv else 0) if out_side else (0 if conv else 1)  # the hidden-neuron axis
    shape = list(w.shape)
    shape[axis] = extra
    if out_side:
        new = torch.randn(shape, dtype=w.dtype, device=w.device) * w.detach().float().std().to(w.dtype)
    else:
        new = torch.zeros(shape, dtype=w.dtype, device=w.device)
    mod.weight = torch.nn.Parameter(torch.cat([w.detach(), new], dim=axis), requires_grad=w.requires_grad)
    b = getattr(mod, "bias", None)
    if out_side and b is not None:
        mod.bias = torch.nn.Parameter(torch.cat([b.detach(), b.new_zeros(extra)]), requires_grad=b.requires_grad)
    _set_width(mod, out_side, w.shape[axis] + extra)


def _shrink(mod: "nn.Module", width: int, out_side: bool) -> None:
    """Ablate the extra neurons: cut the projection back to ``width`` hidden neurons."""
    import torch

    w = mod.weight
    conv = type(mod).__name__ == "Conv1D"
    axis = (1 if conv else 0) if out_side else (0 if conv else 1)
    mod.weight = torch.nn.Parameter(w.detach().narrow(axis, 0, width).clone(), requires_grad=w.requires_grad)
    b = getattr(mod, "bias", None)
    if out_side and b is not None:
        mod.bias = torch.nn.Parameter(b.detach()[:width].clone(), requires_grad=b.requires_grad)
    _set_width(mod, out_side, width)


def _retain_finetune(model: Any, batches: list[dict[str, "torch.Tensor"]], steps: int, lr: float) -> None:
    """``steps`` AdamW steps of NLL on clean rows (cycled), after the ablation."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    for i in range(steps):
        b = batches[i % len(batches)]
        kw = {k: b[k].to(device) for k in ("input_ids", "attention_mask") if k in b}
        loss = model(**kw, labels=b["labels"].to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.train(was_training)
