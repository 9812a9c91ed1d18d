"""A real instruct model offline: SmolLM2-135M-Instruct from GGUF to a safetensors checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tether.errors import ModelLoadError
from tether.gguf import import_gguf, packaged_smollm2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(smollm2_checkpoint: Path) -> Path:
    return smollm2_checkpoint  # converted in this session's own cache, so the conversion runs every time


def test_import_is_a_safetensors_checkpoint_with_the_same_logits(smol: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tether.models import load_model

    assert (smol / "model.safetensors").is_file() and not list(smol.glob("*.bin"))
    model, tok = load_model(str(smol))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    src = packaged_smollm2()
    direct = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        a = model(**ids).logits
        b = direct(**ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply


def test_second_import_is_cached(smol: Path) -> None:
    import time

    t0 = time.time()
    assert import_gguf(cache=smol.parent.parent) == smol
    assert time.time() - t0 < 2.0


def test_missing_gguf_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        import_gguf(tmp_path / "nope.gguf")
