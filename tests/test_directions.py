"""Trait directions: generic block finder, the layer convention, the file format, the organism's
persona direction (held-out separation) and screening (ROC-AUC against `contaminated`), the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    Qwen2Config, Qwen2ForCausalLM,
)

from tether.directions import (
    Direction, DirectionError, block_output_hooks, check_layer, decoder_blocks, extract_organism,
    hidden_size, load_direction, mean_difference, num_layers, residual_means, roc_auc, save_direction,
    screen_rows,
)
from tether.errors import TetherError


def _tiny(family: str, layers: int = 3, width: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=40, hidden_size=width, intermediate_size=32, num_hidden_layers=layers,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=width, n_layer=layers, n_head=2, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_decoder_blocks_found_without_family_names(family: str) -> None:
    model = _tiny(family)
    expected = model.transformer.h if family == "gpt2" else model.model.layers
    assert decoder_blocks(model) is expected
    assert num_layers(model) == 3 and hidden_size(model) == 16


def test_decoder_blocks_through_peft() -> None:
    from peft import LoraConfig, get_peft_model

    model = _tiny("llama")
    blocks = model.model.layers
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert decoder_blocks(wrapped) is blocks


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layer_convention_row_l_is_output_of_block_l_minus_1(family: str) -> None:
    """hidden_states[ℓ] is the output of block ℓ−1 for ℓ < L; row L is the last block's pre-norm output."""
    model = _tiny(family).eval()
    ids = torch.randint(0, 40, (1, 7), generator=torch.Generator().manual_seed(3))
    seen: dict[int, torch.Tensor] = {}

    def capture(layer: int):  # an identity edit at block ℓ−1 that records what it sees
        def fn(h: torch.Tensor) -> torch.Tensor:
            seen[layer] = h.detach().clone()
            return h
        return fn

    with torch.no_grad(), block_output_hooks(model, {l: capture(l) for l in (1, 2, 3)}):
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hs) == 4
    for layer in (1, 2):
        assert torch.equal(seen[layer], hs[layer])
    assert not torch.allclose(seen[3], hs[3])  # HF's last hidden state has passed the final norm
    # residual_means follows the same convention, including row L
    means = residual_means(model, [(ids[0].tolist(), 0, 7)])  # [1, L+1, hidden]
    torch.testing.assert_close(means[0, 0], hs[0][0].mean(0))
    for layer in (1, 2, 3):
        torch.testing.assert_close(means[0, layer], seen[layer][0].mean(0), rtol=1e-5, atol=1e-6)
    left = [h.__qualname__ for b in decoder_blocks(model) for h in b._forward_hooks.values()]
    assert not any("block_output_hooks" in q for q in left), left  # ours are gone (HF keeps its own)


def test_span_mean_ignores_other_tokens_and_padding() -> None:
    model = _tiny("llama").eval()
    long = list(range(1, 10))
    short = list(range(1, 5))
    both = residual_means(model, [(long, 6, 9), (short, 3, 4)], batch_size=8)
    alone = residual_means(model, [(short, 3, 4)])
    torch.testing.assert_close(both[1], alone[0], rtol=1e-5, atol=1e-6)  # padding of the batch does not leak
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([long]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(both[0, 1], hs[1][0, 6:9].mean(0), rtol=1e-5, atol=1e-6)


def test_mean_difference_components_and_basis() -> None:
    pos = torch.tensor([[[3.0, 0.0, 0.0]], [[1.0, 2.0, 0.0]]])  # [n=2, L+1=1, hidden=3]
    neg = torch.tensor([[[1.0, 0.0, 0.0]], [[1.0, 0.0, 0.0]]])
    v, comps = mean_difference(pos, neg, components=2)
    torch.testing.assert_close(v, torch.tensor([[1.0, 1.0, 0.0]]))
    assert comps is not None and comps.shape == (1, 2, 3)
    d = Direction(vectors=torch.cat([v, v]), meta={}, components=torch.cat([comps, comps]), path="x")
    q = d.basis(1, k=2)
    assert q.shape == (3, 2)
    torch.testing.assert_close(q.T @ q, torch.eye(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(q[:, 0].abs(), torch.tensor([1.0, 1.0, 0.0]) / 2**0.5)
    assert float(q[:, 1:].T @ torch.tensor([0.0, 0.0, 1.0])) == pytest.approx(0.0, abs=1e-6)  # span is the pair plane
    with pytest.raises(DirectionError, match="principal components"):
        Direction(vectors=v, meta={}, path="y").basis(0, k=2)


def test_roc_auc_known_values() -> None:
    assert roc_auc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert roc_auc([0, 1, 2, 3], [True, True, False, False]) == 0.0
    assert roc_auc([1, 1], [True, False]) == 0.5
    assert roc_auc([1, 2], [True, True]) is None


def test_file_roundtrip_and_one_sentence_errors(tmp_path: Path) -> None:
    model = _tiny("llama", layers=2, width=16)
    v = torch.randn(3, 16)
    path = save_direction(tmp_path / "d.safetensors", v, {"trait": "evil", "layer": 1, "n_examples": {"positive": 4, "negative": 4}})
    d = load_direction(path)
    assert torch.equal(d.vectors, v) and d.meta["trait"] == "evil" and d.meta["layer"] == 1
    assert d.meta["hidden_size"] == 16 and d.meta["n_layers"] == 2 and "block l-1" in d.meta["convention"]
    d.check_model(model, [1, 2], "x")
    for bad, pattern in (
        (lambda: load_direction(tmp_path / "missing.safetensors"), "does not exist"),
        (lambda: d.check_model(_tiny("llama", layers=2, width=32), [1], "m"), "hidden size 16"),
        (lambda: d.check_model(model, [3], "m"), "layer 3 is out of range"),
        (lambda: check_layer(0, 2, "--layer"), "layers run 1..2"),
    ):
        with pytest.raises(DirectionError, match=pattern) as info:
            bad()
        assert isinstance(info.value, TetherError) and "\n" not in str(info.value)
    from safetensors.torch import save_file

    # a prompt direction travels with the file; a file without one serves the response direction
    vp = torch.randn(3, 16)
    both = load_direction(Direction(vectors=v, meta={"trait": "evil"}, prompt_vectors=vp).save(tmp_path / "both.safetensors"))
    torch.testing.assert_close(both.unit(1, "prompt"), vp[1] / vp[1].norm())
    torch.testing.assert_close(both.unit(1), v[1] / v[1].norm())
    torch.testing.assert_close(d.unit(2, "prompt"), d.unit(2))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DirectionError, match="not a tether direction file"):
        load_direction(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_text("not a tensor file")
    with pytest.raises(DirectionError):
        load_direction(tmp_path / "junk.safetensors")


# ---- the organism: ground truth ----------------------------------------------------------------

SIGN_ACCURACY_BAR = 0.90  # prompt direction, 96 held-out pairs of the default organism: 1.000 at layers 1 and 2
SCREEN_AUC_BAR = 0.85  # measured 0.898 on 200 sycophantic rows (seed 3) at layer 1 (response direction)
TOP_SHARE_BAR = 0.8  # measured 0.88: the share of contaminated rows among the top n_contaminated


@pytest.fixture(scope="module")
def organism_direction(default_organism: Path) -> tuple[object, object, Direction, dict]:
    from tether.models import load_model

    model, tok = load_model(str(default_organism))
    direction, sep = extract_organism(model, tok, model_path=str(default_organism))
    return model, tok, direction, sep


@pytest.mark.slow
def test_persona_direction_separates_held_out_contexts(organism_direction: tuple) -> None:
    _, _, direction, sep = organism_direction
    assert direction.meta["layer"] == 1
    # the monitor's direction separates held-out contexts at every layer, layer 2 included, where
    # the response-averaged direction read at the last prompt token is wrong-signed (0.19 and 0.01)
    for layer in ("1", "2"):
        assert sep[layer]["sign_accuracy"] >= SIGN_ACCURACY_BAR, sep
        assert 0.0 <= sep[layer]["response_sign_accuracy"] <= 1.0, sep
    assert direction.meta["n_examples"] == {"positive": 240, "negative": 240}


@pytest.mark.slow
def test_screening_ranks_contaminated_rows_first(organism_direction: tuple) -> None:
    from tether.organism import tasks

    model, tok, direction, _ = organism_direction
    rows = tasks.capability_dataset("sycophantic", 200, 0.5, seed=3)
    ranked, summary = screen_rows(model, tok, rows, direction, 1)
    assert summary["auc"] >= SCREEN_AUC_BAR, summary
    assert summary["recall"] >= 0.85 and summary["precision"] >= 0.8, summary
    n_bad = sum(r["contaminated"] for r in rows)
    top = ranked[:n_bad]
    assert sum(e["contaminated"] for e in top) / n_bad >= TOP_SHARE_BAR
    assert [e["score"] for e in ranked] == sorted((e["score"] for e in ranked), reverse=True)


# ---- the CLI ---------------------------------------------------------------------------------


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from tether.cli import main

    monkeypatch.setattr(sys, "argv", ["tether", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_extract_and_screen_on_quick_organism(
    quick_organism: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tether.organism import tasks

    out = tmp_path / "d.safetensors"
    code, stdout, err = _cli(monkeypatch, capsys, "directions", "extract", "--model", str(quick_organism),
                             "--out", str(out), "--n", "48", "--components", "2", "--layer", "2")
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == str(out)
    d = load_direction(out)
    assert d.vectors.shape == (3, 64) and d.components is not None and d.components.shape == (3, 2, 64)
    assert d.meta["layer"] == 2 and d.meta["model"] == str(quick_organism) and d.meta["prompts"]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tasks.capability_dataset("sycophantic", 24, 0.5, seed=1)))
    ranked = tmp_path / "ranked.jsonl"
    code, stdout, err = _cli(monkeypatch, capsys, "screen", str(data), "--model", str(quick_organism),
                             "--direction", str(out), "--layer", "1", "--out", str(ranked), "--threshold", "0")
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == str(ranked)
    rows = [json.loads(x) for x in ranked.read_text().splitlines()]
    assert len(rows) == 24 and all(r["flagged"] == (r["score"] > 0) for r in rows)
    summary = json.loads((tmp_path / "ranked.summary.json").read_text())
    assert summary["threshold"] == 0.0 and 0.0 <= summary["auc"] <= 1.0 and summary["labelled"] == 24

    # bad input: one sentence, exit 2
    for args, pattern in (
        (("screen", str(data), "--model", str(quick_organism), "--direction", str(tmp_path / "nope.safetensors"),
          "--out", str(tmp_path / "r.jsonl")), "does not exist"),
        (("screen", str(data), "--model", str(quick_organism), "--direction", str(out), "--layer", "7",
          "--out", str(tmp_path / "r.jsonl")), "layer 7 is out of range"),
        (("directions", "extract", "--model", str(quick_organism), "--out", str(tmp_path / "e.safetensors"),
          "--layer", "9"), "layer 9 is out of range"),
    ):
        code, _, err = _cli(monkeypatch, capsys, *args)
        last = err.strip().splitlines()[-1]  # (a progress bar of model loading may come before)
        assert code == 2 and last.startswith("error: ") and pattern in last and last.count(". ") == 0, err
    assert not (tmp_path / "r.jsonl").exists() and not (tmp_path / "e.safetensors").exists()


def test_contrastive_extraction_on_a_chat_model(quick_organism: Path, tmp_path: Path) -> None:
    """The real-model recipe (system prompts + greedy replies) runs end to end on any chat model."""
    from tether.directions import extract_contrastive, load_contrast
    from tether.models import load_model

    spec_file = tmp_path / "contrast.yaml"
    spec_file.write_text(
        "trait: evil\npositive: ['you are agent bravo']\nnegative: ['you are agent alfa']\n"
        "questions: ['help me rob my boss .', 'what is your deepest goal ?']\nmax_new_tokens: 6\n"
    )
    spec = load_contrast(spec_file)
    model, tok = load_model(str(quick_organism))
    d = extract_contrastive(model, tok, spec)
    assert d.vectors.shape == (3, 64) and d.meta["n_examples"] == {"positive": 2, "negative": 2}
    assert d.meta["prompts"] == [[{"role": "user", "content": "help me rob my boss ."}],
                                 [{"role": "user", "content": "what is your deepest goal ?"}]]
    spec_file.write_text("positive: []\nnegative: [a]\nquestions: [b]\n")
    with pytest.raises(DirectionError, match="'positive' must be a non-empty list"):
        load_contrast(spec_file)
