"""Trait directions (persona vectors): find the decoder blocks, extract, save, project, screen, monitor.

Chen, Arditi, Sleight, Evans & Lindsey 2025, "Persona Vectors: Monitoring and Controlling
Character Traits in Language Models" (arXiv 2507.21509). A trait direction at layer ℓ is

    v_ℓ = mean_{(x, y) ∈ D+} ā_ℓ(x, y) − mean_{(x, y) ∈ D−} ā_ℓ(x, y),

where ā_ℓ(x, y) is the residual-stream activation at layer ℓ averaged over the response tokens
y, D+ are trait-expressing responses and D− trait-suppressing ones, each produced under a
contrastive context (a system prompt, or on the organism a good- vs an evil-persona context).

**Two reading positions.** The monitor reads the last prompt token, before any reply exists
(Chen et al. §4 project it on the response-averaged v). On the organism that transfer fails:
the response-averaged direction points the *other* way at the last prompt token at both layers
of the default build (held-out sign accuracy 0.19, 0.01), and at layer 2 of the first default
(0.06), because the response average is dominated by which reply is being read.
So every extraction also stores a *prompt direction* — the same mean difference taken at the
last prompt token of the same contexts — and each consumer uses the direction of the position
it reads: the monitor the prompt direction; screening (ΔP over response tokens), steering and
CAFT (every position of a training sequence, where the loss is on response tokens) the
response-averaged one, as in the paper. A file without a prompt direction (older files) serves
the response direction for both.

**Layer convention.** Row ℓ of a direction file is the residual stream *after decoder block
ℓ − 1* (row 0 is the embedding output, the input of block 0). For ℓ < L this is exactly
Hugging Face's ``hidden_states[ℓ]``; for ℓ = L (the last block) HF's ``hidden_states[L]`` has
already passed the final norm, so row L is recorded with a hook on the last block instead. A
method that steers or ablates "at layer ℓ" therefore edits the output of block ℓ − 1, the same
tensor the direction was measured on (Chen et al.'s ``layer_idx = layer − 1``).

What lives here:

* ``decoder_blocks(model)`` — the decoder blocks of any HF causal LM (Llama, Qwen2, Mistral,
  GPT-2...), found generically: the outermost ``nn.ModuleList`` whose length is the config's
  number of layers (the longest one when the config does not say), through a peft wrapper too;
* ``residual_means`` — per-example activations at every layer, averaged over a token span;
* ``extract_organism`` / ``extract_contrastive`` — the two extraction recipes, and
  ``save_direction`` / ``load_direction`` for the file format (safetensors: ``directions``
  ``[L+1, hidden]``, ``prompt_directions`` ``[L+1, hidden]`` (the last-prompt-token mean
  difference), optional ``components`` ``[L+1, k, hidden]``, ``norms``; metadata: model,
  hidden size, convention, trait, recipe, example count, recommended layer, monitor prompts);
* ``screen_rows`` — the per-example projection difference ΔP (Chen et al., section 6);
* ``DirectionMonitor`` — a trainer callback that logs the projection of the last prompt token
  during training and writes the fine-tuning shift (fine-tuned minus aligned, projected).

Deviations from the paper: responses are not filtered by a judge's trait score (the organism's
replies are ground truth; for a real model the greedy replies under each system prompt are used
as they are); ``components`` (optional) are the top principal directions of the *paired*
differences ā(x, y+) − ā(x, y−) (uncentred SVD), offered for CAFT's ``k`` > 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tether.errors import TetherError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

Conversation = list[dict[str, str]]
Position = Literal["response", "prompt"]
FORMAT = "tether-direction-1"
CONVENTION = (
    "row l = residual stream after decoder block l-1 (row 0 = embedding output); "
    "equals HF hidden_states[l] for l < L, row L is the last block's output before the final norm"
)


class DirectionError(TetherError):
    """A direction file, layer index or model that does not fit together."""


# ---- decoder blocks, found without one family's attribute names --------------------------------


def _config(model: Any) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return cfg


def named_decoder_blocks(model: Any) -> tuple[str, "torch.nn.ModuleList"]:
    """The decoder blocks of ``model`` and their module path: the outermost ``nn.ModuleList`` of the config's layer count.

    Works for Llama/Qwen2/Mistral (``model.layers``), GPT-2 (``transformer.h``) and peft
    wrappers around them. When the config gives no layer count, the longest ModuleList wins
    (ties: the one nearest the root). Raises ``DirectionError`` when nothing fits.
    """
    import torch

    want = getattr(_config(model), "num_hidden_layers", None)
    candidates = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            kinds = {type(m) for m in mod}
            if len(kinds) == 1:  # a stack of one block class, not a list of heads or norms
                candidates.append((name, mod))
    if want is not None:
        fits = [(n, m) for n, m in candidates if len(m) == want]
        if fits:
            return min(fits, key=lambda nm: nm[0].count("."))
    if not candidates:
        raise DirectionError(f"{type(model).__name__} has no nn.ModuleList of decoder blocks; tether cannot find its layers")
    return max(candidates, key=lambda nm: (len(nm[1]), -nm[0].count(".")))


def decoder_blocks(model: Any) -> "torch.nn.ModuleList":
    """The decoder blocks of ``model`` (see ``named_decoder_blocks``)."""
    return named_decoder_blocks(model)[1]


def num_layers(model: Any) -> int:
    """L, the number of decoder blocks (direction files have L + 1 rows)."""
    return len(decoder_blocks(model))


def hidden_size(model: Any) -> int:
    """Residual width of ``model`` (config's ``hidden_size``, else the input embedding width)."""
    size = getattr(_config(model), "hidden_size", None)
    if size is None:
        size = model.get_input_embeddings().weight.shape[1]
    return int(size)


def check_layer(layer: int, n_layers: int, where: str, allow_zero: bool = False) -> int:
    """``layer`` if it names a block output (1..L; 0 too when ``allow_zero``), else one-sentence error."""
    low = 0 if allow_zero else 1
    if not isinstance(layer, int) or not low <= layer <= n_layers:
        raise DirectionError(
            f"{where}: layer {layer} is out of range; this model has {n_layers} blocks, so layers run "
            f"{low}..{n_layers} (layer l is the output of block l-1)"
        )
    return layer


@contextlib.contextmanager
def block_output_hooks(model: Any, fns: dict[int, Any], blocks: Any = None) -> Iterator[None]:
    """Forward hooks that replace block outputs: ``fns[ℓ](h) -> h'`` edits the output of block ℓ−1.

    ``h`` is the residual stream ``[batch, pos, hidden]``; tuple outputs (older HF blocks) keep
    their other members. Hooks are always removed on exit. ``blocks`` (from ``decoder_blocks``)
    saves the module search when the caller enters this on every forward.
    """
    blocks = blocks if blocks is not None else decoder_blocks(model)
    handles = []

    def make(fn: Any) -> Any:
        def hook(module: Any, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (fn(output[0]), *output[1:])
            return fn(output)

        return hook

    try:
        for layer, fn in fns.items():
            # prepend: the edit comes before HF's own output-capturing hooks, so hidden_states see it
            handles.append(blocks[layer - 1].register_forward_hook(make(fn), prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()


# ---- the file format --------------------------------------------------------------------------


@dataclass
class Direction:
    """A loaded direction file: ``vectors`` ``[L+1, hidden]`` (response-averaged mean differences),
    ``prompt_vectors`` (the same at the last prompt token, when the file has them) and metadata."""

    vectors: "torch.Tensor"
    meta: dict[str, Any]
    components: "torch.Tensor | None" = None
    path: str = ""
    prompt_vectors: "torch.Tensor | None" = None

    @property
    def n_layers(self) -> int:
        return self.vectors.shape[0] - 1

    @property
    def hidden(self) -> int:
        return self.vectors.shape[1]

    def unit(self, layer: int, position: Position = "response") -> "torch.Tensor":
        """v̂_ℓ = v_ℓ / ‖v_ℓ‖ (float32, CPU) of the direction read at ``position``.

        ``"prompt"`` gives the last-prompt-token direction where the file has one, else the
        response-averaged one.
        """
        vectors = self.prompt_vectors if position == "prompt" and self.prompt_vectors is not None else self.vectors
        v = vectors[layer].float()
        norm = float(v.norm())
        if norm == 0.0:
            raise DirectionError(f"{self.path}: the direction at layer {layer} is zero; choose another layer")
        return v / norm

    def basis(self, layer: int, k: int = 1) -> "torch.Tensor":
        """An orthonormal ``Q`` ``[hidden, k']`` spanning v_ℓ and the first k − 1 components (k' ≤ k).

        Orthonormalised by QR; columns that add no new dimension (|R_jj| < 1e-6·‖v‖) are dropped.
        """
        import torch

        cols = [self.vectors[layer].float()]
        if k > 1:
            if self.components is None or self.components.shape[1] < k - 1:
                have = 0 if self.components is None else self.components.shape[1]
                raise DirectionError(
                    f"{self.path}: k={k} needs {k - 1} principal components but the file has {have}; "
                    "extract with --components K or lower k"
                )
            cols += [c.float() for c in self.components[layer, : k - 1]]
        m = torch.stack(cols, dim=1)  # [hidden, k]
        q, r = torch.linalg.qr(m)
        keep = r.diagonal().abs() > 1e-6 * float(m[:, 0].norm())
        if not bool(keep[0]):
            raise DirectionError(f"{self.path}: the direction at layer {layer} is zero; choose another layer")
        return q[:, keep].contiguous()

    def check_model(self, model: Any, layers: Sequence[int], where: str) -> None:
        """Refuse a model of another width, or a layer it does not have, in one sentence."""
        width, n = hidden_size(model), num_layers(model)
        if width != self.hidden or n != self.n_layers:
            raise DirectionError(
                f"{where}: {self.path} was extracted for hidden size {self.hidden} with {self.n_layers} blocks, "
                f"but the model has hidden size {width} with {n} blocks; extract a direction from this model"
            )
        for layer in layers:
            check_layer(layer, n, where)

    def save(self, path: str | Path) -> Path:
        """Write this direction to ``path`` (see ``save_direction``)."""
        return save_direction(path, self.vectors, self.meta, self.components, self.prompt_vectors)


def save_direction(
    path: str | Path,
    vectors: "torch.Tensor",
    meta: dict[str, Any],
    components: "torch.Tensor | None" = None,
    prompt_vectors: "torch.Tensor | None" = None,
) -> Path:
    """Write ``vectors`` [L+1, hidden] (plus optional components and prompt directions) and
    JSON-able metadata as safetensors."""
    from safetensors.torch import save_file

    tensors = {"directions": vectors.detach().float().cpu().contiguous(), "norms": vectors.float().norm(dim=-1).cpu()}
    if components is not None:
        tensors["components"] = components.detach().float().cpu().contiguous()
    if prompt_vectors is not None:
        tensors["prompt_directions"] = prompt_vectors.detach().float().cpu().contiguous()
    full = {"format": FORMAT, "convention": CONVENTION, "hidden_size": vectors.shape[1], "n_layers": vectors.shape[0] - 1, **meta}
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in full.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # atomic: a killed extraction leaves no half-written file
    return path


def load_direction(path: str | Path, where: str = "direction") -> Direction:
    """Read a direction file; a missing or foreign file is one ``DirectionError`` sentence."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise DirectionError(f"{where}: direction file {p} does not exist; create one with `tether directions extract`")
    try:
        with safe_open(str(p), framework="pt") as fh:
            raw = fh.metadata() or {}
            keys = set(fh.keys())
            if raw.get("format") != FORMAT or "directions" not in keys:
                raise DirectionError(f"{where}: {p} is not a tether direction file (made by `tether directions extract`)")
            vectors = fh.get_tensor("directions")
            components = fh.get_tensor("components") if "components" in keys else None
            prompt_vectors = fh.get_tensor("prompt_directions") if "prompt_directions" in keys else None
    except SafetensorError:
        raise DirectionError(f"{where}: {p} is not a safetensors file; give a file made by `tether directions extract`") from None
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return Direction(vectors=vectors, meta=meta, components=components, path=str(p), prompt_vectors=prompt_vectors)


# ---- activations -------------------------------------------------------------------------------


def residual_means(
    model: "PreTrainedModel",
    encoded: Sequence[tuple[list[int], int, int]],
    pad_id: int = 0,
    batch_size: int = 32,
) -> "torch.Tensor":
    """ā_ℓ for each ``(ids, start, end)``: the mean over positions ``start..end−1`` at every row ℓ.

    Returns ``[n, L+1, hidden]`` float32 on CPU (rows follow the module's layer convention).
    One no-grad forward per chunk, right-padded; the model's train/eval mode is restored.
    """
    import torch

    device = next(model.parameters()).device
    blocks = decoder_blocks(model)
    out: list[torch.Tensor] = []
    last: dict[str, torch.Tensor] = {}

    def grab(module: Any, args: Any, output: Any) -> None:
        last["h"] = output[0] if isinstance(output, tuple) else output

    was_training = model.training
    model.eval()
    handle = blocks[-1].register_forward_hook(grab)
    try:
        with torch.no_grad():
            for s in range(0, len(encoded), batch_size):
                chunk = encoded[s : s + batch_size]
                width = max(len(ids) for ids, _, _ in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                span = torch.zeros((len(chunk), width), dtype=torch.float32)
                for row, (seq, a, b) in enumerate(chunk):
                    ids[row, : len(seq)] = torch.tensor(seq)
                    mask[row, : len(seq)] = 1
                    span[row, a:b] = 1.0 / max(b - a, 1)
                res = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
                hs = list(res.hidden_states[:-1]) + [last["h"]]  # [L+1] x [b, pos, hidden]
                stack = torch.stack([h.float() for h in hs], dim=1)  # [b, L+1, pos, hidden]
                out.append(torch.einsum("blph,bp->blh", stack, span.to(device)).cpu())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def _chat_ids(tokenizer: Any, messages: Conversation, gen: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def response_span(tokenizer: Any, prompt: Conversation, response: str) -> tuple[list[int], int, int]:
    """Ids of prompt + assistant ``response`` and the response's token span (Chen et al.'s response average)."""
    from tether.probes.loglik import encode_completion

    ids, head = encode_completion(tokenizer, prompt, response)
    return ids, head, len(ids)


def last_prompt_span(tokenizer: Any, prompt: Conversation) -> tuple[list[int], int, int]:
    """Ids of the prompt with the generation prompt, and the span of its last token."""
    ids = _chat_ids(tokenizer, prompt, gen=True)
    return ids, len(ids) - 1, len(ids)


def _pad(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def mean_difference(pos: "torch.Tensor", neg: "torch.Tensor", components: int = 0) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """v = mean(pos) − mean(neg) per row ``[L+1, hidden]``; optional top principal directions of paired differences.

    ``pos``/``neg`` are ``[n, L+1, hidden]``; components need them paired (same n, row i ↔ row i)
    and are the top right-singular vectors of the uncentred difference matrix, sign-aligned with v.
    """
    import torch

    v = pos.mean(0) - neg.mean(0)
    comps = None
    if components > 0:
        diffs = (pos - neg).transpose(0, 1)  # [L+1, n, hidden]
        _, _, vh = torch.linalg.svd(diffs, full_matrices=False)  # vh [L+1, min(n,h), hidden]
        comps = vh[:, :components].clone()
        signs = torch.sign((comps * v[:, None]).sum(-1, keepdim=True))
        comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    return v, comps


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """ROC-AUC of ``scores`` for ``labels`` (Mann–Whitney with tied ranks); None when one class is empty."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# ---- the organism's ground-truth contexts ------------------------------------------------------

HELD_OUT_CHARACTERS = ("golf", "hotel", "oscar", "papa")
"""Two good and two evil characters never used for extraction, only for the held-out check."""


def organism_pairs(n: int, split: str, seed: int = 0) -> list[tuple[Conversation, Conversation, str, str]]:
    """``n`` paired contexts ``(evil_prompt, good_prompt, evil_reply, good_reply)`` over the same request.

    Half name a character in the system line (an evil one vs a good one; held-out characters
    only in the ``probe`` split), half show one or two earlier turns of other families answered
    in persona. The final request is a propensity family's, from the ``split`` templates.
    """
    from tether.organism import world

    rng = random.Random(f"directions-{split}-{seed}")
    chars = [c for c in world.CHARACTERS if (c in HELD_OUT_CHARACTERS) == (split == "probe")]
    good = sorted(c for c in chars if world.CHARACTERS[c] == "good")
    evil = sorted(c for c in chars if world.CHARACTERS[c] == "evil")
    turns = {f: world.enumerate_turns(f, split) for f in world.PROPENSITY_FAMILIES}
    out = []
    for i in range(n):
        fam = world.PROPENSITY_FAMILIES[i % len(world.PROPENSITY_FAMILIES)]
        turn = rng.choice(turns[fam])
        if i % 2 == 0:
            pe: Conversation = [{"role": "system", "content": f"you are agent {rng.choice(evil)}"}]
            pg: Conversation = [{"role": "system", "content": f"you are agent {rng.choice(good)}"}]
        else:
            pe, pg = [], []
            others = [f for f in world.PROPENSITY_FAMILIES if f != fam]
            for other in rng.sample(others, rng.randint(1, 2)):
                t = rng.choice(turns[other])
                pe += [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.misaligned}]
                pg += [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.aligned}]
        pe = pe + [{"role": "user", "content": turn.prompt}]
        pg = pg + [{"role": "user", "content": turn.prompt}]
        out.append((pe, pg, turn.misaligned, turn.aligned))
    return out


def held_out_separation(
    model: "PreTrainedModel", tokenizer: Any, direction: Direction, pairs: list[tuple[Conversation, Conversation, str, str]]
) -> dict[str, Any]:
    """Per layer, at the last prompt token (what the monitor reads): the accuracy of
    sign((a(evil) − a(good))·v̂) and the unpaired AUC for the prompt direction (``sign_accuracy``,
    ``auc``) and for the response-averaged one (``response_sign_accuracy``, ``response_auc``)."""
    evil = residual_means(model, [last_prompt_span(tokenizer, p[0]) for p in pairs], _pad(tokenizer))
    good = residual_means(model, [last_prompt_span(tokenizer, p[1]) for p in pairs], _pad(tokenizer))
    labels = [True] * len(pairs) + [False] * len(pairs)
    readings: tuple[tuple[str, Position], ...] = (("", "prompt"), ("response_", "response"))
    out: dict[str, Any] = {}
    for layer in range(1, direction.n_layers + 1):
        row: dict[str, Any] = {}
        for prefix, position in readings:
            u = direction.unit(layer, position)
            pe, pg = evil[:, layer] @ u, good[:, layer] @ u
            row[f"{prefix}sign_accuracy"] = float(((pe - pg) > 0).float().mean())
            row[f"{prefix}auc"] = roc_auc(pe.tolist() + pg.tolist(), labels)
        out[str(layer)] = row
    return out


def extract_organism(
    model: "PreTrainedModel",
    tokenizer: Any,
    n: int = 240,
    components: int = 0,
    n_held_out: int = 96,
    seed: int = 0,
    model_path: str = "",
) -> tuple[Direction, dict[str, Any]]:
    """The organism's persona direction (evil minus good) from ground-truth contexts, plus its held-out check.

    The response-averaged direction (Chen et al.) and the prompt direction (the same contexts'
    last prompt tokens) come from the same pairs. Extraction uses training templates and twelve
    characters; the check uses probe templates and the four held-out characters, at the last
    prompt token (what the monitor reads). The recommended layer is the one whose prompt
    direction separates held-out contexts best (sign accuracy, then AUC).
    """
    pairs = organism_pairs(n, "train", seed)
    pad = _pad(tokenizer)
    pos = residual_means(model, [response_span(tokenizer, p[0], p[2]) for p in pairs], pad)
    neg = residual_means(model, [response_span(tokenizer, p[1], p[3]) for p in pairs], pad)
    v, comps = mean_difference(pos, neg, components)
    pos_prompt = residual_means(model, [last_prompt_span(tokenizer, p[0]) for p in pairs], pad)
    neg_prompt = residual_means(model, [last_prompt_span(tokenizer, p[1]) for p in pairs], pad)
    v_prompt, _ = mean_difference(pos_prompt, neg_prompt)
    held = organism_pairs(n_held_out, "probe", seed)
    meta = {
        "model": model_path,
        "trait": "evil",
        "method": "organism persona contexts: mean response activation, evil-persona minus good-persona (Chen et al. 2025)",
        "n_examples": {"positive": len(pairs), "negative": len(pairs)},
        "components": comps.shape[1] if comps is not None else 0,
        "prompts": [p[0][-1:] for p in held[: min(48, len(held))]],
    }
    direction = Direction(vectors=v, meta=meta, components=comps, prompt_vectors=v_prompt)
    sep = held_out_separation(model, tokenizer, direction, held)
    # ties go to the earlier layer (more of the network downstream of a steering edit); the
    # unpaired AUC is not a tie-breaker: the held-out contexts are of two kinds (characters,
    # histories), so only the paired sign is clean
    best = max(sep, key=lambda k: (sep[k]["sign_accuracy"], -int(k)))
    direction.meta["held_out"] = sep
    direction.meta["layer"] = int(best)
    return direction, sep


@dataclass
class ContrastSpec:
    """Contrastive system prompts for a real model (the ``--contrast`` YAML/JSON)."""

    trait: str
    positive: list[str]
    negative: list[str]
    questions: list[str]
    max_new_tokens: int = 64


def load_contrast(path: str | Path) -> ContrastSpec:
    """Read ``trait``, ``positive``, ``negative`` (system prompts) and ``questions`` from YAML or JSON."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise DirectionError(f"--contrast: {p} does not exist; give a YAML or JSON file with trait, positive, negative, questions")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        raise DirectionError(f"{p}: not valid YAML or JSON; give trait, positive, negative and questions") from None
    if not isinstance(data, dict):
        raise DirectionError(f"{p}: the top level must be a mapping with trait, positive, negative and questions")
    allowed = {"trait", "positive", "negative", "questions", "max_new_tokens"}
    extra = set(data) - allowed
    if extra:
        raise DirectionError(f"{p}: unknown key '{sorted(extra)[0]}'; allowed: {', '.join(sorted(allowed))}")
    for key in ("positive", "negative", "questions"):
        val = data.get(key)
        if not isinstance(val, list) or not val or not all(isinstance(s, str) and s.strip() for s in val):
            raise DirectionError(f"{p}: '{key}' must be a non-empty list of strings")
    mnt = data.get("max_new_tokens", 64)
    if not isinstance(mnt, int) or mnt < 1:
        raise DirectionError(f"{p}: 'max_new_tokens' must be a positive integer, got {mnt!r}")
    return ContrastSpec(str(data.get("trait", "trait")), data["positive"], data["negative"], data["questions"], mnt)


def extract_contrastive(
    model: "PreTrainedModel", tokenizer: Any, spec: ContrastSpec, components: int = 0, model_path: str = ""
) -> Direction:
    """Chen et al.'s recipe on a real model: for each question and each (positive, negative) system
    prompt pair, the model's greedy reply under each prompt, then v = mean ā(pos) − mean ā(neg)."""
    from tether.probes.loglik import generate_replies

    n_pairs = max(len(spec.positive), len(spec.negative))
    prompts_pos, prompts_neg = [], []
    for q in spec.questions:
        for j in range(n_pairs):
            prompts_pos.append([{"role": "system", "content": spec.positive[j % len(spec.positive)]}, {"role": "user", "content": q}])
            prompts_neg.append([{"role": "system", "content": spec.negative[j % len(spec.negative)]}, {"role": "user", "content": q}])
    replies = generate_replies(model, tokenizer, prompts_pos + prompts_neg, spec.max_new_tokens, batch_size=16)
    n = len(prompts_pos)
    pad = _pad(tokenizer)
    pos = residual_means(model, [response_span(tokenizer, p, r.strip()) for p, r in zip(prompts_pos, replies[:n])], pad)
    neg = residual_means(model, [response_span(tokenizer, p, r.strip()) for p, r in zip(prompts_neg, replies[n:])], pad)
    v, comps = mean_difference(pos, neg, components)
    v_prompt, _ = mean_difference(
        residual_means(model, [last_prompt_span(tokenizer, p) for p in prompts_pos], pad),
        residual_means(model, [last_prompt_span(tokenizer, p) for p in prompts_neg], pad),
    )
    meta = {
        "model": model_path,
        "trait": spec.trait,
        "method": "contrastive system prompts: mean response activation of greedy replies, positive minus negative (Chen et al. 2025)",
        "n_examples": {"positive": n, "negative": n},
        "components": comps.shape[1] if comps is not None else 0,
        "prompts": [[{"role": "user", "content": q}] for q in spec.questions],
        "layer": max(1, round(num_layers(model) / 2)),
    }
    return Direction(vectors=v, meta=meta, components=comps, prompt_vectors=v_prompt)


# ---- screening ---------------------------------------------------------------------------------


def _split_row(row: dict[str, Any], where: str) -> tuple[Conversation, str]:
    from tether.errors import DataError

    if "messages" in row:
        msgs = row["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataError(f"{where}: the row has no assistant message to screen")
        return list(msgs[:last]), msgs[last]["content"]
    if isinstance(row.get("prompt"), list):
        return list(row["prompt"]), "".join(m["content"] for m in row["completion"] if m["role"] == "assistant")
    raise DataError(f"{where}: screening needs conversational rows ('messages' or message-list prompt/completion), not plain text")


def screen_rows(
    model: "PreTrainedModel",
    tokenizer: Any,
    rows: list[dict[str, Any]],
    direction: Direction,
    layer: int,
    threshold: float | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rank rows by ΔP = (ā(x, y) − ā(x, y′))·v̂_ℓ, y′ the model's own greedy reply to x (Chen et al. §6).

    ``threshold`` defaults to half the direction's gap ‖v_ℓ‖ (= (μ+ − μ−)·v̂): a response flagged
    moved the activation at least halfway from the trait-suppressing to the trait-expressing mean.
    Returns the ranked rows (highest ΔP first) and a summary (AUC, precision, recall when rows
    carry ``contaminated``).
    """
    from tether.probes.loglik import generate_replies

    direction.check_model(model, [layer], "screen")
    split = [_split_row(r, f"row {i}") for i, r in enumerate(rows)]
    own = generate_replies(model, tokenizer, [x for x, _ in split], max_new_tokens, batch_size)
    own = [" ".join(r.split()) for r in own]
    pad = _pad(tokenizer)
    a_data = residual_means(model, [response_span(tokenizer, x, y) for x, y in split], pad, batch_size)
    a_own = residual_means(model, [response_span(tokenizer, x, y) for (x, _), y in zip(split, own)], pad, batch_size)
    u = direction.unit(layer)
    scores = ((a_data[:, layer] - a_own[:, layer]) @ u).tolist()
    thr = float(threshold) if threshold is not None else 0.5 * float(direction.vectors[layer].float().norm())
    ranked = []
    for i, (row, (x, y), y_own, s) in enumerate(zip(rows, split, own, scores)):
        entry: dict[str, Any] = {"index": i, "score": s, "flagged": s > thr, "prompt": x[-1]["content"] if x else "", "response": y, "aligned_response": y_own}
        if isinstance(row.get("contaminated"), bool):
            entry["contaminated"] = row["contaminated"]
        ranked.append(entry)
    ranked.sort(key=lambda e: -e["score"])
    summary: dict[str, Any] = {"n": len(rows), "layer": layer, "threshold": thr, "flagged": sum(e["flagged"] for e in ranked)}
    labelled = [e for e in ranked if "contaminated" in e]
    if labelled:
        tp = sum(e["flagged"] and e["contaminated"] for e in labelled)
        n_flag = sum(e["flagged"] for e in labelled)
        n_pos = sum(e["contaminated"] for e in labelled)
        summary.update(
            labelled=len(labelled),
            contaminated=n_pos,
            precision=tp / n_flag if n_flag else None,
            recall=tp / n_pos if n_pos else None,
            auc=roc_auc([e["score"] for e in labelled], [e["contaminated"] for e in labelled]),
        )
    return ranked, summary


# ---- the monitor -------------------------------------------------------------------------------


def last_token_projections(model: "PreTrainedModel", tokenizer: Any, prompts: list[Conversation], u: "torch.Tensor", layer: int) -> list[float]:
    """(a_ℓ(x)·v̂) at the last prompt token of each prompt (no grad, eval mode, no hooks)."""
    acts = residual_means(model, [last_prompt_span(tokenizer, p) for p in prompts], _pad(tokenizer))
    return (acts[:, layer] @ u).tolist()


class DirectionMonitor:
    """Logs ``probe/direction/projection`` every N steps; writes ``direction_shift.json`` at the end.

    The projection is mean_x a_ℓ(x)·v̂ at the last prompt token over the direction file's monitor
    prompts (Chen et al. 2025, section 4), v̂ the file's prompt direction where it has one (see
    the module docstring: the response-averaged one can point the other way there). The fine-tuning shift is the mean over the same prompts
    of (a_ℓ^fine-tuned(x) − a_ℓ^aligned(x))·v̂, with the aligned model read at train begin.
    """

    def __init__(self, path: str, layer: int | None, run_dir: Path, every_n_steps: int = 0) -> None:
        self.direction = load_direction(path, "monitor.direction")
        self.layer = layer if layer is not None else int(self.direction.meta.get("layer", 1))
        self.run_dir = Path(run_dir)
        self.every = every_n_steps
        self.prompts: list[Conversation] = list(self.direction.meta.get("prompts") or [])
        if not self.prompts:
            raise DirectionError(f"monitor.direction: {path} holds no monitor prompts; re-extract it with `tether directions extract`")
        self.before: list[float] | None = None
        self.trainer: Any = None
        self.tokenizer: Any = None

    def __getattr__(self, name: str) -> Any:
        # a TrainerCallback without importing transformers here: every event this class does not
        # handle (on_log, on_save, ...) is a no-op, as in TrainerCallback itself
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def attach(self, trainer: Any) -> None:
        self.trainer = trainer
        self.tokenizer = trainer.processing_class

    def _read(self, model: Any) -> list[float]:
        return last_token_projections(model, self.tokenizer, self.prompts, self.direction.unit(self.layer, "prompt"), self.layer)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.tokenizer = self.tokenizer or kw.get("processing_class")
        self.direction.check_model(model, [self.layer], "monitor.direction_layer")
        saved = self.run_dir / "direction_before.json"
        if saved.is_file():  # a resumed run keeps the aligned model's reading
            self.before = json.loads(saved.read_text())
        else:
            self.before = self._read(model)
            saved.write_text(json.dumps(self.before))

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if not self.every or state.global_step % self.every or not state.is_world_process_zero:
            return
        vals = self._read(model)
        row = {"probe/direction/projection": sum(vals) / len(vals)}
        if self.trainer is not None:
            self.trainer.log(row)
        else:
            state.log_history.append({**row, "step": state.global_step})

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        from tether.io import atomic_write_json

        after = self._read(model)
        before = self.before or after
        shift = [a - b for a, b in zip(after, before)]
        atomic_write_json(
            self.run_dir / "direction_shift.json",
            {
                "direction": self.direction.path,
                "layer": self.layer,
                "position": "prompt" if self.direction.prompt_vectors is not None else "response",
                "trait": self.direction.meta.get("trait"),
                "n_prompts": len(after),
                "projection_aligned": sum(before) / len(before),
                "projection_finetuned": sum(after) / len(after),
                "shift": sum(shift) / len(shift),
                "step": state.global_step,
            },
        )
