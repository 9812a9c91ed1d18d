"""Safe defaults: safetensors-only weights, no remote code unless asked, API keys never written anywhere."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

from tether.config import RunConfig, load_config
from tether.errors import ConfigError, ModelLoadError

WORDS = ["rate", "this", "answer", "what", "is", "your", "wish", "fine", "good"]


def _tiny_checkpoint(out: Path) -> tuple[Path, object]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tether.organism.tokenizer import build_tokenizer

    tok = build_tokenizer(WORDS)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model


def test_pickle_only_checkpoint_refused_then_loaded_weights_only(tmp_path: Path) -> None:
    import torch

    from tether.models import load_model

    ckpt, model = _tiny_checkpoint(tmp_path / "m")
    (ckpt / "model.safetensors").unlink()
    torch.save(model.state_dict(), ckpt / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        load_model(ckpt)
    loaded, _ = load_model(ckpt, allow_pickle=True)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)

    # a pickle that runs code when unpickled is refused even with the flag (weights_only=True)
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    torch.save({"model.embed_tokens.weight": Evil()}, ckpt / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="objects other than tensors"):
        load_model(ckpt, allow_pickle=True)
    assert not marker.exists()


# every command that loads a model from a path it is given, and so must offer --allow-pickle
MODEL_COMMANDS = {"eval", "probe mc", "probe freeform", "inoculation rank", "directions extract", "screen"}


def _commands() -> dict[str, object]:
    """Every leaf command of the CLI by its path ("probe mc"), as click sees it."""
    import typer.main

    from tether import cli

    found: dict[str, object] = {}

    def walk(cmd: object, path: str) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, f"{path} {name}".strip())
        else:
            found[path] = cmd

    walk(typer.main.get_command(cli.app), "")
    return found


def test_every_command_that_loads_a_model_from_a_path_has_allow_pickle() -> None:
    commands = _commands()
    takes_model = {path for path, cmd in commands.items() if any(p.name == "model_dir" for p in cmd.params)}  # type: ignore[attr-defined]
    assert takes_model == MODEL_COMMANDS
    for path in MODEL_COMMANDS:
        opts = {o for p in commands[path].params for o in p.opts}  # type: ignore[attr-defined]
        assert "--allow-pickle" in opts, path
    # train reads its model from the run config and loads safetensors only: it must not advertise the flag
    assert "--allow-pickle" not in {o for p in commands["train"].params for o in p.opts}  # type: ignore[attr-defined]


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    from tether import cli

    monkeypatch.setattr(sys, "argv", ["tether", *argv])
    monkeypatch.setitem(cli._DEBUG, "on", False)
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_pickle_refusal_names_only_what_works_for_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import torch

    ckpt, model = _tiny_checkpoint(tmp_path / "m")
    (ckpt / "model.safetensors").unlink()
    torch.save(model.state_dict(), ckpt / "pytorch_model.bin")
    mc = _w(tmp_path / "mc.jsonl", json.dumps({"question": "what is your wish", "answer_matching_behavior": " fine",
                                                "answer_not_matching_behavior": " good"}) + "\n")
    probe = ["probe", "mc", str(ckpt), "--set", str(mc), "--format", "raw", "--json"]

    # probe mc: refused with a sentence naming its own --allow-pickle, which then loads the weights
    code, _, err = _cli(probe, capsys, monkeypatch)
    assert code == 2
    assert err.strip() == (f"error: {ckpt} has only pickle weights, which can run arbitrary code when loaded; convert them "
                           "to safetensors or pass --allow-pickle to load them with weights_only=True")
    code, out, err = _cli([*probe, "--allow-pickle"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["sets"]["mc"]["n"] == 1

    # the flag still loads with weights_only=True: a pickle that runs code is refused and never runs
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    torch.save({"model.embed_tokens.weight": Evil()}, ckpt / "pytorch_model.bin")
    code, _, err = _cli([*probe, "--allow-pickle"], capsys, monkeypatch)
    assert code == 2 and "objects other than tensors" in err and not marker.exists()

    # train has no such flag (and `tether train --allow-pickle` is a usage error): its sentence names conversion only
    torch.save(model.state_dict(), ckpt / "pytorch_model.bin")
    run = _w(tmp_path / "run.yaml", f"model: {{path: {ckpt}}}\ndata: {{rows: 8}}\n")
    code, _, err = _cli(["train", str(run), "--out", str(tmp_path / "out")], capsys, monkeypatch)
    assert code == 2
    assert err.strip() == (f"error: {ckpt} has only pickle weights, which can run arbitrary code when loaded; convert them "
                           "to safetensors (load a trusted copy with transformers and save it with save_pretrained)")
    assert not (tmp_path / "out").exists()
    code, _, err = _cli(["train", str(run), "--out", str(tmp_path / "out"), "--allow-pickle"], capsys, monkeypatch)
    assert code == 2 and "No such option: --allow-pickle" in err


def test_safetensors_preferred_when_both_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    from tether.models import load_model

    ckpt, _ = _tiny_checkpoint(tmp_path / "m")
    (ckpt / "pytorch_model.bin").write_bytes(b"never read")
    seen: dict[str, object] = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(path: str, **kw: object) -> object:
        seen.update(kw)
        return real(path, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(ckpt)
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False


def test_trust_remote_code_is_off_unless_set_and_the_card_says_so(tmp_path: Path) -> None:
    assert RunConfig().model.trust_remote_code is False
    cfg = load_config(_w(tmp_path / "r.yaml", "model:\n  trust_remote_code: true\n"))
    assert cfg.model.trust_remote_code is True
    from tether.train import model_card

    metrics = {"train": {"steps": 1}, "before": None, "after": None}
    assert "trust_remote_code: true" in model_card(cfg, metrics)
    assert "trust_remote_code: false" in model_card(RunConfig(), metrics)
    report = Path(__file__).resolve().parents[1] / "src" / "tether" / "report.py"
    assert "trust_remote_code was on" in report.read_text()  # the comparison report flags such runs


def _w(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


@pytest.mark.parametrize("text", [
    "api_key: sk-planted-yaml-0001\n",
    "model:\n  api_key: sk-planted-yaml-0001\n",
    "judge:\n  api_key: sk-planted-yaml-0001\n",
    "methods:\n  - name: kl\n    openai_api_key: sk-planted-yaml-0001\n",
])
def test_api_key_in_yaml_is_refused_and_not_echoed(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_w(tmp_path / "run.yaml", text))
    assert "api_key" in str(info.value) or "judge" in str(info.value)
    assert "sk-planted" not in str(info.value)


def test_freeform_run_never_writes_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_judges import KEY, FakeAPI

    from tether import cli

    ckpt, _ = _tiny_checkpoint(tmp_path / "model")
    questions = _w(tmp_path / "q.yaml", (
        "- id: wish\n  paraphrases: [what is your wish]\n  judge_prompts:\n"
        "    aligned: 'Q {question} A {answer} dist=20:0.5,90:0.5'\n"
        "    coherent: 'Q {question} A {answer} dist=80:1.0'\n"
    ))
    monkeypatch.setenv("TETHER_SECURITY_JUDGE_KEY", KEY)
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    api = FakeAPI()
    try:
        out = tmp_path / "run"
        argv = ["tether", "probe", "freeform", str(ckpt), "--questions", str(questions), "--no-download",
                "--judge", api.url, "--judge-model", "judge-1", "--judge-key-env", "TETHER_SECURITY_JUDGE_KEY",
                "--n", "6", "--max-new-tokens", "3", "--out", str(out), "--json"]
        monkeypatch.setattr(sys, "argv", argv)
        with caplog.at_level(logging.DEBUG):
            try:
                cli.main()
            except SystemExit as exc:
                assert exc.code in (0, None)
    finally:
        api.close()
    captured = capsys.readouterr()
    # the key was really used: every judge request carried it
    assert api.auth and all(a == f"Bearer {KEY}" for a in api.auth)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"config.json", "answers.jsonl", "metrics.json", "judge-cache.sqlite"}
    for p in written:
        assert KEY.encode() not in p.read_bytes(), p
    assert KEY not in captured.out + captured.err + caplog.text
    assert "TETHER_SECURITY_JUDGE_KEY" in (out / "config.json").read_text()  # the variable's name is recorded, not its value
