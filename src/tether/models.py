"""Load a Hugging Face causal LM and its tokenizer with safe defaults.

* weights load from safetensors only; a checkpoint with only pickle files (``*.bin``, ``*.pt``)
  is refused unless ``allow_pickle=True``, and even then torch loads it with ``weights_only=True``
  (the refusal names ``--allow-pickle`` only when the caller passes ``pickle_hint``, i.e. on the
  CLI commands that have that flag; ``tether train`` and ``tether compare`` read safetensors only);
* ``trust_remote_code`` is off unless the caller turns it on;
* ``"organism"`` names the default organism, built (or taken from the cache) on demand;
* a peft LoRA adapter directory (``adapter_config.json``, as ``tether train`` saves for LoRA runs)
  loads onto its base model (``base_model_name_or_path``, a local directory) and is merged, so
  probes and evaluations see the fine-tuned model.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# what the pickle refusal suggests besides converting, on a command that has the flag
ALLOW_PICKLE_HINT = "pass --allow-pickle to load them with weights_only=True"


def resolve_model_path(path: str) -> Path:
    """Turn ``path`` into a checkpoint directory, building the organism for ``"organism"``."""
    if path == "organism":
        from tether.organism.build import build_organism

        return build_organism()
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model directory {p} does not exist")
    if not p.is_dir():
        raise ModelLoadError(f"model path {p} is a file; give the checkpoint directory that holds config.json")
    return p


def check_checkpoint(path: Path, allow_pickle: bool = False, pickle_hint: str | None = None) -> None:
    """Refuse directories that are not HF checkpoints or that hold only pickled weights.

    ``pickle_hint`` (e.g. ``ALLOW_PICKLE_HINT``) is offered besides converting to safetensors in
    the pickle refusal; without it the sentence names only conversion, which works everywhere.
    """
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a model directory: it has no config.json")
    _check_weight_files(path, [f.name for f in path.iterdir() if f.is_file()], allow_pickle, pickle_hint=pickle_hint)


def _check_weight_files(path: Path, files: list[str], allow_pickle: bool, kind: str = "", pickle_hint: str | None = None) -> None:
    """Refuse weight ``files`` (names) with no safetensors: none at all, or pickles unless allowed.

    ``kind`` qualifies the weights in the messages ("adapter" for a LoRA adapter's).
    """
    has_safetensors = any(f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in files)
    has_pickle = any(f.endswith(PICKLE_SUFFIXES) for f in files)
    what = f"{kind} weights" if kind else "weights"
    if not has_safetensors and has_pickle and not allow_pickle:
        fix = (
            f"convert them to safetensors or {pickle_hint}" if pickle_hint else
            "convert them to safetensors (load a trusted copy with transformers and save it with save_pretrained)"
        )
        raise ModelLoadError(f"{path} has only pickle {what}, which can run arbitrary code when loaded; {fix}")
    if not has_safetensors and not has_pickle:
        raise ModelLoadError(f"{path} has no {what} (no *.safetensors file)")


def load_tokenizer(path: str | os.PathLike[str], trust_remote_code: bool = False) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def is_adapter_dir(path: Path) -> bool:
    """A peft LoRA adapter directory (``adapter_config.json`` without a ``config.json``)."""
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def _adapter_base(path: Path, allow_pickle: bool, pickle_hint: str | None) -> Path:
    """The base model directory an adapter names, after checking the adapter's own weight files."""
    import json

    config_file = path / "adapter_config.json"
    try:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON (line {exc.lineno})") from None
    if not base:
        raise ModelLoadError(f"{config_file} names no base model ('base_model_name_or_path' is empty)")
    base_dir = Path(base).expanduser()
    if not base_dir.is_absolute():
        base_dir = (path / base_dir) if (path / base_dir).is_dir() else base_dir
    if not base_dir.is_dir():
        raise ModelLoadError(
            f"{config_file}: base_model_name_or_path '{base}' is not a local model directory; "
            "put the base checkpoint there (tether loads models from local paths)"
        )
    files = [f.name for f in path.iterdir() if f.is_file()]
    _check_weight_files(path, [f for f in files if f.startswith("adapter_model")], allow_pickle, "adapter", pickle_hint)
    return base_dir


def check_model_path(path: str | os.PathLike[str], allow_pickle: bool = False, pickle_hint: str | None = None) -> Path:
    """Every check ``load_model`` makes before it reads any weights; returns the checkpoint directory.

    For an adapter directory the adapter and its base model are both checked. Cheap: nothing is
    loaded, so a launcher can run it once before starting its processes.
    """
    p = resolve_model_path(str(path))
    seen = {p.resolve()}
    while is_adapter_dir(p):
        p = _adapter_base(p, allow_pickle, pickle_hint)
        if p.resolve() in seen:
            raise ModelLoadError(f"{p / 'adapter_config.json'}: base_model_name_or_path leads back to the adapter itself")
        seen.add(p.resolve())
    check_checkpoint(p, allow_pickle, pickle_hint)
    return p


def model_skeleton(path: str | os.PathLike[str], trust_remote_code: bool = False) -> Any:
    """The model's modules on the meta device (no weights, no memory), for shape checks; None if it cannot be built.

    ``path`` is a checkpoint or adapter directory that ``check_model_path`` accepted.
    """
    import warnings

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        p = check_model_path(path, allow_pickle=True)
        config = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - only an early check; loading the model makes the same checks for real
        return None


def load_model(
    path: str | os.PathLike[str],
    trust_remote_code: bool = False,
    dtype: str = "float32",
    allow_pickle: bool = False,
    device: str | None = None,
    pickle_hint: str | None = None,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load ``(model, tokenizer)`` from a local checkpoint directory (or ``"organism"``).

    ``pickle_hint`` is what the refusal of a pickle-only checkpoint offers besides converting it
    (``ALLOW_PICKLE_HINT`` on commands that have ``--allow-pickle``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    p = resolve_model_path(str(path))
    if is_adapter_dir(p):
        return _load_adapter(p, trust_remote_code, dtype, allow_pickle, device, pickle_hint)
    check_checkpoint(p, allow_pickle, pickle_hint)
    kwargs: dict[str, Any] = {
        "trust_remote_code": trust_remote_code,
        "dtype": getattr(torch, dtype),
    }
    safetensors_present = any(f.suffix == ".safetensors" for f in p.iterdir())
    if safetensors_present:
        kwargs["use_safetensors"] = True
    else:
        # only reached with allow_pickle=True; transformers loads .bin with weights_only=True
        kwargs["use_safetensors"] = False
        kwargs["weights_only"] = True
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar on stderr before a run's own output
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    except pickle.UnpicklingError:
        raise ModelLoadError(
            f"refused to load the pickle weights in {p}: they hold objects other than tensors, which "
            "weights_only=True does not run; convert a trusted copy to safetensors"
        ) from None
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        # a truncated or corrupt weights file, a config.json that is not JSON or names no model type
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, SafetensorError):
            first = f"a .safetensors file is corrupt or truncated ({first})"
        raise ModelLoadError(f"could not load the model in {p}: {first}") from None
    try:
        tokenizer = load_tokenizer(p, trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load the tokenizer in {p}: {first}") from None
    if device:
        model.to(device)
    model.eval()
    return model, tokenizer


def _load_adapter(
    path: Path, trust_remote_code: bool, dtype: str, allow_pickle: bool, device: str | None, pickle_hint: str | None = None
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """A LoRA adapter directory: its base model (loaded as :func:`load_model` does) with the adapter merged."""
    base_dir = _adapter_base(path, allow_pickle, pickle_hint)
    files = [f.name for f in path.iterdir() if f.is_file()]
    model, tokenizer = load_model(base_dir, trust_remote_code, dtype, allow_pickle, pickle_hint=pickle_hint)
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    if any(f.startswith(("tokenizer", "vocab")) for f in files):  # the run's own tokenizer, when saved
        tokenizer = load_tokenizer(path, trust_remote_code)
    if device:
        model.to(device)
    model.eval()
    return model, tokenizer
