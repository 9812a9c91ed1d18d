"""SafeLoRA: the projection math on a hand-checkable case, module selection by τ and by count,
and a LoRA run on the organism whose saved adapter is the projected one and loads and runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from tether.errors import TetherError
from tether.methods import make
from tether.methods.safelora import alignment_matrix, projected_cosine


def test_projection_math_by_hand() -> None:
    v = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # W_aligned − W_base; ‖V‖_F = 2
    c = alignment_matrix(v)
    torch.testing.assert_close(c, torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64))  # VVᵀ/‖V‖_F
    b = torch.tensor([[1.0], [1.0]])  # [out, r]
    a = torch.tensor([[1.0, 0.0]])  # [r, in]
    cb, cos = projected_cosine(c, b, a)
    torch.testing.assert_close(cb, torch.tensor([[2.0], [0.0]], dtype=torch.float64))
    # CBA = [[2,0],[0,0]], BA = [[1,0],[1,0]]: cos = 2 / (2·√2)
    assert cos == pytest.approx(1 / 2**0.5, abs=1e-12)
    _, none = projected_cosine(alignment_matrix(torch.zeros(2, 2)), b, a)
    assert none is None  # alignment did not touch the module: no subspace, left alone


def _save(model: LlamaForCausalLM, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny 'aligned' model and its 'base': the base differs in the attention projections only."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    aligned = LlamaForCausalLM(cfg)
    base = LlamaForCausalLM(cfg)
    base.load_state_dict(aligned.state_dict())
    with torch.no_grad():
        for i, layer in enumerate(base.model.layers):
            g = torch.Generator().manual_seed(10 + i)
            layer.self_attn.q_proj.weight.add_(torch.randn(8, 8, generator=g))
            layer.self_attn.v_proj.weight.add_(torch.randn(8, 8, generator=g)[:, :1].expand(8, 8).clone())
    return _save(aligned, tmp_path / "aligned"), _save(base, tmp_path / "base")


def _lora(aligned: Path) -> Any:
    from peft import LoraConfig, get_peft_model

    model = LlamaForCausalLM.from_pretrained(str(aligned))
    torch.manual_seed(3)  # lora_A's init: the same adapter every call
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return peft_model


def _independent(aligned: Path, base: Path, peft_model: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per module: (B, C B, cos) recomputed from the checkpoints, with the paper's formulas."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(aligned / "model.safetensors")), load_file(str(base / "model.safetensors"))
    out = {}
    for i in range(2):
        for proj in ("q_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{proj}"
            mod = peft_model.get_base_model().get_submodule(name)
            v = (wa[f"{name}.weight"] - wb[f"{name}.weight"]).double()
            c = v @ v.T / torch.linalg.matrix_norm(v, "fro")
            b = mod.lora_B["default"].weight.detach().double().clone()
            a = mod.lora_A["default"].weight.detach().double()
            x, y = (c @ b @ a).flatten(), (b @ a).flatten()
            out[name] = (b, c @ b, float(x @ y / (x.norm() * y.norm())))
    return out


def test_projects_only_modules_under_tau(pair: tuple[Path, Path]) -> None:
    aligned, base = pair
    peft_model = _lora(aligned)
    expected = _independent(aligned, base, peft_model)
    coss = sorted(cos for _, _, cos in expected.values())
    tau = (coss[1] + coss[2]) / 2  # two modules below, two above
    method = make("safelora", {"base": str(base), "threshold": tau})
    method.finalize(peft_model)
    report = {r["module"]: r for r in method.report}
    assert set(report) == set(expected)
    for name, (b_old, cb, cos) in expected.items():
        assert report[name]["cos"] == pytest.approx(cos, abs=1e-6)
        b_now = peft_model.get_base_model().get_submodule(name).lora_B["default"].weight.detach().double()
        if cos <= tau:
            assert report[name]["projected"]
            torch.testing.assert_close(b_now, cb, rtol=1e-5, atol=1e-6)
        else:
            assert not report[name]["projected"]
            assert torch.equal(b_now, b_old)
    assert sum(r["projected"] for r in method.report) == 2

    # select: number — the k lowest cosines, whatever their value
    peft_model = _lora(aligned)
    method = make("safelora", {"base": str(base), "select": "number", "num_layers": 1})
    method.finalize(peft_model)
    lowest = min(expected, key=lambda n: expected[n][2])
    assert [r["module"] for r in method.report if r["projected"]] == [lowest]


def test_refuses_what_cannot_work(pair: tuple[Path, Path], tmp_path: Path) -> None:
    aligned, _ = pair
    with pytest.raises(TetherError, match="does not exist"):
        make("safelora", {"base": str(tmp_path / "nowhere")})
    method = make("safelora", {})
    with pytest.raises(TetherError, match="LoRA runs only"):
        method.finalize(LlamaForCausalLM.from_pretrained(str(aligned)))
    with pytest.raises(TetherError, match="no pretrained/ checkpoint"):
        method.finalize(_lora(aligned))


class _RecordB(TrainerCallback):
    """Keeps each module's lora_B as training left it (finalize runs after train ends)."""

    def __init__(self) -> None:
        self.b: dict[str, torch.Tensor] = {}

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


def test_lora_run_saves_the_projected_adapter(quick_organism: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    from tether.config import RunConfig, validate
    from tether.models import load_model
    from tether.probes.organism import evaluate_organism
    from tether.train import run_training

    assert (quick_organism / "pretrained" / "config.json").is_file()
    data = yaml.safe_load(
        "data: {rows: 120}\n"
        "training: {max_steps: 3, batch_size: 8, save_steps: 50, logging_steps: 1, learning_rate: 0.01}\n"
        "probes: {per_family: 4, n_capability: 8}\n"
        "methods: [{name: safelora, threshold: 1.0}]\n"
    )
    data["model"] = {"path": str(quick_organism), "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    cfg = validate(data, RunConfig, "run.yaml")
    rec = _RecordB()
    metrics = run_training(cfg, tmp_path / "run", callbacks=[rec])
    saved = load_file(str(tmp_path / "run" / "model" / "adapter_model.safetensors"))
    aligned = load_file(str(quick_organism / "model.safetensors"))
    base = load_file(str(quick_organism / "pretrained" / "model.safetensors"))
    checked = 0
    for key, b_trained in rec.b.items():
        name = key.split("base_model.model.", 1)[1].split(".lora_B")[0]  # model.layers.0.self_attn.q_proj
        c = alignment_matrix(aligned[f"{name}.weight"] - base[f"{name}.weight"])
        saved_key = next(k for k in saved if name in k and "lora_B" in k)
        # τ = 1 projects every module: the saved B is C·B of the trained B
        torch.testing.assert_close(saved[saved_key].double(), c @ b_trained.double(), rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked == 4  # 2 layers x (q_proj, v_proj)
    # a working adapter: it loads onto the aligned model and reproduces the after-probes
    model, tok = load_model(str(quick_organism))
    loaded = PeftModel.from_pretrained(model, str(tmp_path / "run" / "model")).eval()
    again, _ = evaluate_organism(loaded, tok, per_family=4, n_capability=8)
    for fam, v in metrics["after"]["families"].items():
        assert again["families"][fam]["logodds"] == pytest.approx(v["logodds"], abs=1e-4)
    assert json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())["r"] == 4
