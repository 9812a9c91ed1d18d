"""``gradient_routing``: per-row routing through the real trainer (parameter masks and ERA), the ablation,
label hiding, generic block/MLP discovery, bad input, and a whole ``run_training`` with both forms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from tether.errors import ConfigError, DataError
from tether.methods.base import TrainingData
from tether.methods.registry import make
from tether.methods.routing import GradientRouting, decoder_blocks, find_mlp
from tether.organism import tasks
from tether.train import PreservingConfig, PreservingTrainer

from _methods_support import tiny_model


def _rows(n_routed: int, n_clean: int) -> list[dict[str, Any]]:
    syco = [r for r in tasks.capability_dataset("sycophantic", 200, 0.5, seed=0) if r["contaminated"]]
    clean = tasks.neutral_dataset(50, seed=0)
    rows = [{"messages": r["messages"], "contaminated": True} for r in syco[:n_routed]]
    rows += [{"messages": r["messages"], "contaminated": False} for r in clean[:n_clean]]
    return rows


def _trainer(organism: Path, tmp: Path, rows: list[dict[str, Any]], method: GradientRouting, steps: int = 1,
             weight_decay: float = 0.0) -> PreservingTrainer:
    model = AutoModelForCausalLM.from_pretrained(str(organism))
    tok = AutoTokenizer.from_pretrained(str(organism))
    args = PreservingConfig(
        output_dir=str(tmp / "ckpt"), max_steps=steps, per_device_train_batch_size=len(rows), learning_rate=1e-2,
        weight_decay=weight_decay, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
        assistant_only_loss=True, packing=False, dataset_num_proc=None, dataloader_num_workers=0, seed=0,
    )
    if any(r["contaminated"] for r in rows):  # the run-level check; these tests also feed clean-only batches
        method.prepare_data(TrainingData(capability=rows))
    return PreservingTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             methods=[method])


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- parameter masks: a routed row moves only the region; a clean row only the rest ----------------


@pytest.mark.parametrize("clean_updates", ["rest", "all"])
def test_mask_routing_is_exact_per_row(quick_organism: Path, tmp_path: Path, clean_updates: str) -> None:
    region = "model.layers.1.mlp."
    for kind, rows in (("routed", _rows(4, 0)), ("clean", _rows(0, 4))):
        method = make("gradient_routing", {"layers": [1], "clean_updates": clean_updates})
        trainer = _trainer(quick_organism, tmp_path / kind, rows, method, weight_decay=0.1)
        before = _snapshot(trainer.model)
        trainer.train()
        after = _snapshot(trainer.model)
        moved = {n for n in before if not torch.equal(before[n], after[n])}
        inside = {n for n in before if n.startswith(region)}
        assert inside == {f"{region}{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")}
        if kind == "routed":  # bit-identical outside the region, even with weight decay
            assert moved == inside
        elif clean_updates == "rest":
            assert moved and not moved & inside
        else:
            assert inside <= moved
        share = [e["preserve/gradient_routing/routed_share"] for e in trainer.state.log_history if "preserve/gradient_routing/routed_share" in e]
        assert share == [1.0 if kind == "routed" else 0.0]


def _reference_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], n_tokens: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL over labelled tokens / tokens of the whole micro-batch (TRL's normalisation)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum") / n_tokens


def test_mixed_batch_equals_sum_of_separately_routed_sub_batches(quick_organism: Path, tmp_path: Path) -> None:
    method = make("gradient_routing", {"layers": [0, 1], "neurons": 32, "clean_updates": "rest"})
    trainer = _trainer(quick_organism, tmp_path, _rows(3, 5), method)
    trainer.setup_methods()
    model = trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["routed"].tolist().count(True) == 3 and "contaminated" not in batch
    routed = batch["routed"].clone()

    trainer.compute_loss(model, dict(batch)).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    # reference: one plain backward per sub-batch, then zero the gradient outside its part (SGTM masks)
    n_tokens = (batch["labels"][:, 1:] != -100).sum()
    mask = {n: method._region.get(id(p), None) for n, p in model.named_parameters() if id(p) in method._region}
    want: dict[str, torch.Tensor] = {}
    for side in (True, False):
        rows = {k: v[routed == side] for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        _reference_loss(model, rows, n_tokens).backward()
        for n, p in model.named_parameters():
            if p.grad is None:
                continue
            m = (torch.ones_like(p) if mask[n] is None else mask[n]) if n in mask else torch.zeros_like(p)
            g = p.grad * (m if side else 1 - m)
            want[n] = want.get(n, torch.zeros_like(p)) + g
        model.zero_grad(set_to_none=True)
    for n, g in want.items():
        torch.testing.assert_close(got.get(n, torch.zeros_like(g)), g, rtol=1e-4, atol=1e-6, msg=n)
    up = "model.layers.0.mlp.up_proj.weight"  # 128 neurons; the last 32 are the region
    assert got[up][:96].abs().sum() > 0 and got[up][96:].abs().sum() > 0  # both sides learned, each in its part
    assert float(method._region[id(dict(model.named_parameters())[up])][96:].min()) == 1.0


def test_mask_finalize_resets_region(quick_organism: Path, tmp_path: Path) -> None:
    method = make("gradient_routing", {"layers": [1]})
    trainer = _trainer(quick_organism, tmp_path, _rows(2, 2), method, steps=2)
    start = _snapshot(trainer.model)
    trainer.train()
    trained = _snapshot(trainer.model)
    method.finalize(trainer.model)
    final = _snapshot(trainer.model)
    for n in start:
        if n.startswith("model.layers.1.mlp."):
            assert not torch.equal(trained[n], start[n]) and torch.equal(final[n], start[n])
        else:
            assert torch.equal(final[n], trained[n])


# ---- ERA: activation masks on expanded neurons; ablation restores the architecture -------------------


def test_era_routes_into_extra_neurons_and_finalize_reloads(quick_organism: Path, tmp_path: Path) -> None:
    original = AutoModelForCausalLM.from_pretrained(str(quick_organism))
    shapes = {n: p.shape for n, p in original.named_parameters()}
    method = make("gradient_routing", {"form": "era", "layers": [1], "expand": 16})
    trainer = _trainer(quick_organism, tmp_path, _rows(4, 0), method, steps=3)
    trainer.train()  # three steps on routed rows only
    model = trainer.model
    up = model.model.layers[1].mlp.up_proj.weight
    gate = model.model.layers[1].mlp.gate_proj.weight
    assert up.shape == (128 + 16, 64)
    # routed rows reach only the extra neurons' in-projections (negative_scale 0); the original rows are untouched
    for name, w in (("up_proj", up), ("gate_proj", gate)):
        ref = dict(original.named_parameters())[f"model.layers.1.mlp.{name}.weight"]
        assert torch.equal(w[:128], ref) and not torch.equal(w[128:], w[128:] * 0)
    assert not torch.equal(model.model.layers[1].mlp.down_proj.weight[:, 128:], torch.zeros(64, 16))

    # the ablation equals zeroing the extra neurons
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    with torch.no_grad():
        saved = model.model.layers[1].mlp.down_proj.weight[:, 128:].clone()
        model.model.layers[1].mlp.down_proj.weight[:, 128:] = 0
        zeroed = model(input_ids=ids).logits
        model.model.layers[1].mlp.down_proj.weight[:, 128:] = saved
    model = method.finalize(model)
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, zeroed)
    model.save_pretrained(tmp_path / "final", safe_serialization=True)
    assert (tmp_path / "final" / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    def cfg(m: Any) -> dict[str, Any]:
        return {k: v for k, v in m.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}

    assert cfg(reloaded) == cfg(original) and reloaded.config.intermediate_size == 128
    assert {n: p.shape for n, p in reloaded.named_parameters()} == shapes
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, zeroed)


def test_era_clean_rows_leave_extra_in_projections_alone(quick_organism: Path, tmp_path: Path) -> None:
    method = make("gradient_routing", {"form": "era", "layers": [0], "expand": 8, "negative_scale": -0.75})
    trainer = _trainer(quick_organism, tmp_path, _rows(0, 4), method, steps=2)
    trainer.setup_methods()
    extra = trainer.model.model.layers[0].mlp.up_proj.weight[128:].detach().clone()
    trainer.train()
    w = trainer.model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w[128:], extra) and w.shape[0] == 136


def test_era_negative_scale_flips_the_original_gradient(quick_organism: Path, tmp_path: Path) -> None:
    grads = {}
    for scale in (1.0, -0.75):
        method = make("gradient_routing", {"form": "era", "layers": [0], "expand": 8, "negative_scale": scale})
        trainer = _trainer(quick_organism, tmp_path / str(scale), _rows(3, 0), method)
        trainer.setup_methods()
        model = trainer.model.train()
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.compute_loss(model, dict(batch)).backward()  # enters the method's hooks itself
        grads[scale] = model.model.layers[0].mlp.up_proj.weight.grad[:128].clone()
    torch.testing.assert_close(grads[-0.75], -0.75 * grads[1.0])


def test_blocks_and_mlps_are_found_generically() -> None:
    llama = tiny_model()
    name, blocks = decoder_blocks(llama)
    site = find_mlp(blocks[0], 16)
    assert name == "model.layers" and len(blocks) == 2 and site.width == 32
    assert sorted(n for n, _ in site.ins) == ["mlp.gate_proj", "mlp.up_proj"] and site.out[0] == "mlp.down_proj"

    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=48, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2))
    name, blocks = decoder_blocks(qwen)
    assert name == "model.layers" and len(blocks) == 3 and find_mlp(blocks[2], 16).width == 48

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=3, n_head=2, n_positions=32)).eval()
    name, blocks = decoder_blocks(gpt2)
    site = find_mlp(blocks[1], 16)
    assert name == "transformer.h" and site.width == 64
    assert [n for n, _ in site.ins] == ["mlp.c_fc"] and site.out[0] == "mlp.c_proj"  # Conv1D, weight [in, out]
    # ERA on Conv1D: expand, then ablate at once = the same function and shapes
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = gpt2(input_ids=ids).logits
    method = make("gradient_routing", {"form": "era", "layers": [0, 2], "expand": 8})
    method._resolve(gpt2)
    assert gpt2.transformer.h[2].mlp.c_fc.weight.shape == (16, 72) and gpt2.transformer.h[2].mlp.c_proj.weight.shape == (72, 16)
    with torch.no_grad():
        torch.testing.assert_close(gpt2(input_ids=ids).logits, want)  # extra out-columns start at zero
    method.finalize(gpt2)
    assert gpt2.transformer.h[2].mlp.c_fc.weight.shape == (16, 64) and gpt2.transformer.h[2].mlp.c_fc.nf == 64


# ---- partial labels and bad input --------------------------------------------------------------------


def test_label_fraction_hides_a_seeded_share() -> None:
    rows = tasks.capability_dataset("sycophantic", 400, 0.5, seed=0)
    labelled = [i for i, r in enumerate(rows) if r["contaminated"]]

    def kept(fraction: float, seed: int) -> set[int]:
        m = make("gradient_routing", {"label_fraction": fraction, "seed": seed})
        out = m.prepare_data(TrainingData(capability=[dict(r) for r in rows])).capability
        assert [r["messages"] for r in out] == [r["messages"] for r in rows]
        assert not any(out[i]["contaminated"] for i in range(len(rows)) if i not in labelled)
        return {i for i, r in enumerate(out) if r["contaminated"]}

    a = kept(0.3, 0)
    assert len(a) == round(0.3 * len(labelled)) and a <= set(labelled)
    assert kept(0.3, 0) == a and kept(0.3, 1) != a
    assert kept(1.0, 0) == set(labelled)


def test_bad_input_is_one_sentence(quick_organism: Path, tmp_path: Path) -> None:
    m = make("gradient_routing", {"layers": [2]})
    with pytest.raises(ConfigError, match=r"layer 2 is out of range; the model has 2 blocks \(0\.\.1\)"):
        m.check_model(AutoModelForCausalLM.from_pretrained(str(quick_organism)))
    with pytest.raises(DataError, match="no capability row is labelled 'contaminated: true'"):
        make("gradient_routing", {}).prepare_data(TrainingData(capability=tasks.neutral_dataset(10)))
    with pytest.raises(DataError, match="hides all"):
        make("gradient_routing", {"label_fraction": 0.0}).prepare_data(TrainingData(capability=_rows(3, 3)))
    with pytest.raises(ValueError, match="'expand' applies only to form: era"):
        make("gradient_routing", {"expand": 8})


def test_cli_refuses_out_of_range_layer_and_unlabelled_data(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], quick_organism: Path, tmp_path: Path
) -> None:
    import sys

    from tether.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in tasks.neutral_dataset(8)))
    cases = [
        ("methods: [{name: gradient_routing, form: era, layers: [5]}]\n", ["run.yaml: methods[0]", "layer 5 is out of range"]),
        (f"data: {{source: {data}, neutral_share: 0}}\nmethods: [{{name: gradient_routing}}]\n", ["no capability row is labelled"]),
    ]
    for text, needles in cases:
        cfg = tmp_path / "run.yaml"
        cfg.write_text(f"model: {{path: {quick_organism}}}\n" + text)
        out = tmp_path / "out"
        monkeypatch.setattr(sys, "argv", ["tether", "train", str(cfg), "--out", str(out)])
        with pytest.raises(SystemExit) as info:
            main()
        err = capsys.readouterr().err
        err = err[err.index("error: "):]  # (a weight-loading progress bar may come first)
        assert info.value.code == 2 and err.count("\n") == 1, err
        assert all(n in err for n in needles), err
        assert not out.exists()


# ---- a whole run, both forms ---------------------------------------------------------------------------


RUN = """
data: {rows: 200}
training: {max_steps: 3, batch_size: 8, logging_steps: 1, save_steps: 100, learning_rate: 0.005}
probes: {per_family: 4, n_capability: 8}
"""


@pytest.mark.parametrize("params", [{"layers": [1]}, {"form": "era", "layers": [0, 1], "expand": 16, "retain_steps": 2}])
def test_run_training_reports_both_sides_of_the_ablation(quick_organism: Path, tmp_path: Path, params: dict[str, Any]) -> None:
    from tether.config import RunConfig, validate
    from tether.train import run_training

    data = yaml.safe_load(RUN)
    data["model"] = {"path": str(quick_organism)}
    data["methods"] = [{"name": "gradient_routing", **params}]
    metrics = run_training(validate(data, RunConfig, "run.yaml"), tmp_path / "run")
    assert set(metrics["after_prefinalize"]) == set(metrics["after"]) == set(metrics["before"])
    assert metrics["after_prefinalize"] != metrics["after"]
    assert 0 < metrics["train"]["final_terms"]["preserve/gradient_routing/routed_share"] < 1
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "model"))
    original = AutoModelForCausalLM.from_pretrained(str(quick_organism))
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in original.named_parameters()}
    assert (tmp_path / "run" / "probes" / "after_prefinalize.propensity.jsonl").is_file()


def test_mask_routing_on_padding_free_batches_equals_padded_rows(quick_organism: Path, tmp_path: Path) -> None:
    """The mask form splits padding-free batches by row: same losses and weights as on padded rows."""
    from _methods_support import assert_padding_free_trains_like_padded

    assert_padding_free_trains_like_padded(quick_organism, tmp_path, [{"name": "gradient_routing", "layers": [1]}])


def test_era_masks_only_the_capability_forward(quick_organism: Path, tmp_path: Path) -> None:
    """Another method's forward of the same row count (e.g. ``kl`` on an alignment batch of the same
    size) inside the hooks is a clean forward: it must not be routed like the capability rows."""
    method = make("gradient_routing", {"form": "era", "layers": [0], "expand": 8})
    trainer = _trainer(quick_organism, tmp_path, _rows(4, 0), method)
    trainer.setup_methods()
    model = trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.compute_loss(model, dict(batch))  # routed: every row is contaminated
    model.zero_grad()
    up = model.model.layers[0].mlp.up_proj.weight
    with method.hooks(model):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert out.logits.shape[0] == method._routed.shape[0]  # same rows as the routed batch
        out.logits.float().pow(2).mean().backward()
    # clean rows (clean_updates: rest): the original neurons learn, the extra ones do not
    assert up.grad[:128].abs().sum() > 0 and torch.equal(up.grad[128:], torch.zeros_like(up.grad[128:]))
