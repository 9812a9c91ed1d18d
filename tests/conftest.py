"""Shared fixtures: a quick organism built once per session, the default one when asked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Quick builds go to a per-session temp cache so tests never see stale artefacts."""
    return tmp_path_factory.mktemp("tether-cache")


@pytest.fixture(scope="session")
def smollm2_checkpoint(cache_root: Path) -> Path:
    """SmolLM2-135M-Instruct converted from its packaged GGUF once per session (fresh, ~20 s)."""
    from tether.gguf import import_gguf

    return import_gguf(cache=cache_root)


@pytest.fixture(scope="session")
def quick_organism(cache_root: Path) -> Path:
    from tether.organism.build import OrganismConfig, build_organism

    return build_organism(OrganismConfig.quick(), root=cache_root)


@pytest.fixture(scope="session")
def default_organism() -> Path:
    """The default build, from the shared cache ($TETHER_CACHE or ~/.cache/tether)."""
    from tether.organism.build import OrganismConfig, build_organism

    return build_organism(OrganismConfig())


@pytest.fixture(scope="session")
def tiny_llama(quick_organism: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random-init Llama (not the organism's weights) with the organism's tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(quick_organism))
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
