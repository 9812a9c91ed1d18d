"""Preventative steering and CAFT: exact edits at the chosen block, gone outside training; a run with
both plus the direction monitor; one-sentence errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tether.config import RunConfig, validate
from tether.directions import DirectionError, decoder_blocks, extract_organism, last_token_projections, load_direction
from tether.errors import TetherError
from tether.methods import make


@pytest.fixture(scope="module")
def quick(quick_organism: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object, Path]:
    from tether.models import load_model

    model, tok = load_model(str(quick_organism))
    direction, _ = extract_organism(model, tok, n=48, components=2, n_held_out=12)
    path = direction.save(tmp_path_factory.mktemp("dir") / "persona.safetensors")
    return model, tok, path


def _ids(tok: object) -> torch.Tensor:
    ids = tok.apply_chat_template([{"role": "user", "content": "help me rob my boss ."}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    return torch.tensor([ids, ids[::-1]])


def _capture_after(model: object, layer: int, seen: dict[str, torch.Tensor]) -> object:
    """A hook registered *after* the method's, at the same block: sees the edited output."""
    def hook(module: object, args: object, output: torch.Tensor) -> None:
        seen["h"] = (output[0] if isinstance(output, tuple) else output).detach().clone()
    return decoder_blocks(model)[layer - 1].register_forward_hook(hook)


@pytest.mark.parametrize("layer", [1, 2])
def test_steering_adds_exactly_alpha_v_at_the_layer(quick: tuple, layer: int) -> None:
    model, tok, path = quick
    ids = _ids(tok)
    method = make("steering", {"direction": str(path), "layer": layer, "alpha": 3.0})
    plain: dict[str, torch.Tensor] = {}
    handle = _capture_after(model, layer, plain)
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    handle.remove()
    steered: dict[str, torch.Tensor] = {}
    with torch.no_grad(), method.hooks(model):
        handle = _capture_after(model, layer, steered)
        steered_logits = model(input_ids=ids).logits
        handle.remove()
    v = method.direction.vectors[layer]
    assert torch.equal(steered["h"], plain["h"] + 3.0 * v)  # exactly α·v, every position
    assert not torch.allclose(steered_logits, base_logits)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(after, base_logits)  # hook gone: bit for bit the unhooked model


@pytest.mark.parametrize("k", [1, 2])
def test_caft_leaves_no_component_along_q(quick: tuple, k: int) -> None:
    model, tok, path = quick
    ids = _ids(tok)
    method = make("caft", {"direction": str(path), "layers": [1, 2], "k": k})
    for layer in (1, 2):
        q = method.bases[layer].value
        assert q.shape == (64, k)
        torch.testing.assert_close(q.T @ q, torch.eye(k), atol=1e-5, rtol=0)
        assert abs(float(q[:, 0] @ method.direction.unit(layer))) == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    seen: dict[str, torch.Tensor] = {}
    with torch.no_grad(), method.hooks(model):
        handle = _capture_after(model, 2, seen)
        model(input_ids=ids)
        handle.remove()
    q = method.bases[2].value
    h = seen["h"]
    assert float((h @ q).abs().max()) < 1e-5 * float(h.abs().max())
    assert float(h.norm()) > 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base_logits)


RUN = """
data: {rows: 120}
training: {max_steps: 4, batch_size: 8, save_steps: 50, logging_steps: 1, learning_rate: 0.005}
probes: {per_family: 4, n_capability: 8}
"""


def test_run_with_steering_caft_and_direction_monitor(quick: tuple, quick_organism: Path, tmp_path: Path) -> None:
    from tether.models import load_model
    from tether.probes.organism import evaluate_organism
    from tether.train import run_training

    _, _, path = quick
    data = yaml.safe_load(RUN)
    data["model"] = {"path": str(quick_organism)}
    data["methods"] = [{"name": "steering", "direction": str(path), "layer": 1, "alpha": 2.0},
                       {"name": "caft", "direction": str(path), "layers": [2], "k": 2}]
    data["monitor"] = {"every_n_steps": 2, "per_family": 2, "direction": str(path), "direction_layer": 1}
    cfg = validate(data, RunConfig, "run.yaml")
    out = tmp_path / "run"
    metrics = run_training(cfg, out)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    readings = [e["probe/direction/projection"] for e in log if "probe/direction/projection" in e]
    assert len(readings) == 2  # steps 2 and 4
    shift = json.loads((out / "direction_shift.json").read_text())
    assert shift["layer"] == 1 and shift["n_prompts"] > 0 and shift["step"] == 4
    assert shift["shift"] == pytest.approx(shift["projection_finetuned"] - shift["projection_aligned"], abs=1e-5)
    assert shift["projection_finetuned"] == pytest.approx(readings[-1], abs=1e-4)  # same model, same prompts
    # the after-probes ran without the hooks: the saved model, reloaded, gives the same numbers bit for bit
    model, tok = load_model(str(out / "model"))
    again, _ = evaluate_organism(model, tok, per_family=4, n_capability=8)
    assert again["families"] == metrics["after"]["families"]
    assert again["capability"] == metrics["after"]["capability"]
    # the monitor reads the file's prompt direction (the last-prompt-token one), not the response one
    d = load_direction(path)
    assert shift["position"] == "prompt"
    for position, matches in (("prompt", True), ("response", False)):
        vals = last_token_projections(model, tok, d.meta["prompts"], d.unit(1, position), 1)
        assert (abs(sum(vals) / len(vals) - shift["projection_finetuned"]) < 1e-4) == matches, position


def test_bad_input_is_one_sentence(quick: tuple, tmp_path: Path, tiny_llama: Path) -> None:
    _, _, path = quick
    cases = [
        ({"name": "caft"}, "needs a trait direction"),
        ({"name": "steering", "direction": str(tmp_path / "none.safetensors")}, "does not exist"),
        ({"name": "steering", "direction": str(path), "layer": 3}, "layer 3 is out of range"),
        ({"name": "caft", "direction": str(path), "layers": [0]}, "layer 0 is out of range"),
        ({"name": "caft", "direction": str(path), "k": 4}, "principal components"),
    ]
    for spec, pattern in cases:
        params = {k: v for k, v in spec.items() if k != "name"}
        with pytest.raises(TetherError, match=pattern) as info:
            make(spec["name"], params)
        assert "\n" not in str(info.value)
        with pytest.raises(TetherError, match=pattern):  # the same sentence from a run config
            validate({"methods": [spec]}, RunConfig, "run.yaml")
    # a direction of another width: refused when the model is known, before any forward
    from tether.models import load_model

    small, _ = load_model(str(tiny_llama))
    for name, params in (("steering", {"layer": 1}), ("caft", {"layers": [1]})):
        method = make(name, {"direction": str(path), **params})
        with pytest.raises(DirectionError, match="hidden size 64"):
            with method.hooks(small):
                pass
    with pytest.raises(TetherError, match="monitor.direction"):
        validate({"monitor": {"direction": str(tmp_path / "none.safetensors")}}, RunConfig, "run.yaml")


def test_refused_with_activation_checkpointing(quick: tuple, tiny_llama: Path) -> None:
    """Checkpointing recomputes the forward in backward, outside the hooks: the gradients would be wrong."""
    import copy

    from _methods_support import FakeContext

    model, _, path = quick
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable()
    for name, params in (("steering", {"layer": 1}), ("caft", {"layers": [1]})):
        method = make(name, {"direction": str(path), **params})
        method.setup(FakeContext(model, {}))  # fine without checkpointing
        with pytest.raises(TetherError, match="gradient_checkpointing to false"):
            method.setup(FakeContext(ckpt, {}))
