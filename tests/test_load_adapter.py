"""A LoRA adapter directory loads onto its local base and is merged; bad adapters are refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tether.errors import ModelLoadError
from tether.models import load_model


@pytest.fixture()
def adapter(tiny_llama: Path, tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """An adapter with non-zero LoRA weights; the peft model's logits and the base's on one input."""
    from peft import LoraConfig, get_peft_model

    base, _ = load_model(tiny_llama)
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        tuned = peft(input_ids=ids).logits
    out = tmp_path / "adapter"
    peft.save_pretrained(out)
    return out, base_logits, tuned


def test_adapter_dir_loads_merged_onto_its_base(adapter: tuple[Path, torch.Tensor, torch.Tensor]) -> None:
    path, base_logits, tuned = adapter
    assert (path / "adapter_model.safetensors").is_file() and not (path / "config.json").exists()
    model, tok = load_model(path)
    assert not hasattr(model, "peft_config")  # merged: a plain transformers model
    with torch.no_grad():
        got = model(input_ids=torch.tensor([[2, 10, 11, 12, 13, 14]])).logits
    assert (tuned - base_logits).abs().max() > 1e-2  # the adapter changes the model...
    assert torch.allclose(got, tuned, atol=1e-4)  # ...and the loaded model is the adapted one
    assert tok.pad_token is not None


def test_adapter_with_missing_base_is_refused(adapter: tuple[Path, torch.Tensor, torch.Tensor], tmp_path: Path) -> None:
    path = adapter[0]
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="base_model_name_or_path .* is not a local model directory"):
        load_model(path)


def test_adapter_with_pickle_weights_only_is_refused(adapter: tuple[Path, torch.Tensor, torch.Tensor]) -> None:
    path = adapter[0]
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(ModelLoadError, match="only pickle adapter weights"):
        load_model(path)
