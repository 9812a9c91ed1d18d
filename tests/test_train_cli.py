"""Bad input to ``tether train`` ends in one sentence on stderr, exit code 2, and no run directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tether.cli import main


def _run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["tether", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    return int(info.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize(
    ("yaml_text", "jsonl", "needles"),
    [
        ("methods: [{name: klx}]\n", None, ["run.yaml", "unknown method 'klx'", "naive"]),
        ("methods: [{name: kl, beta: -1}]\n", None, ["run.yaml", "methods[0]", "'beta'", "greater than or equal to 0"]),
        ("methods: [{name: kl, betta: 1}]\n", None, ["run.yaml", "unknown key 'betta'", "allowed: beta"]),
        ("data: {alignment: null}\nmethods: [{name: naive}, {name: kl}]\n", None,
         ["run.yaml", "methods[1]", "'kl' needs an alignment dataset", "data.alignment"]),
        ("data: {source: DATA}\n", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n{"messages": [\n',
         ["data.jsonl, line 2", "not valid JSON"]),
        ("data: {source: DATA}\n", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n{"text": "hello"}\n',
         ["data.jsonl, line 2", "lacks a 'messages' field"]),
        ("data: {source: DATA}\n", "\n", ["data.jsonl", "has no rows"]),
    ],
)
def test_bad_input_is_one_sentence_exit_2_nothing_written(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, quick_organism: Path,
    yaml_text: str, jsonl: str | None, needles: list[str],
) -> None:
    data = tmp_path / "data.jsonl"
    if jsonl is not None:
        data.write_text(jsonl)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{path: {quick_organism}}}\n" + yaml_text.replace("DATA", str(data)))
    out = tmp_path / "out"
    code, err = _run(monkeypatch, capsys, "train", str(cfg), "--out", str(out))
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()


def test_methods_lists_every_method_one_line_each(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["tether", "methods"])
    try:
        main()
    except SystemExit as exc:
        assert not exc.code
    lines = capsys.readouterr().out.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert names == [
        "naive", "inoculation", "replay", "kl", "constraint", "ewc", "l2sp", "gradient_projection", "representation",
        "gradient_routing", "steering", "caft", "safelora",
    ]
    assert all("sft" in line.split()[1] for line in lines)


def test_rerun_with_a_different_config_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, quick_organism: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("training: {max_steps: 99}\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{path: {quick_organism}}}\n")
    code, err = _run(monkeypatch, capsys, "train", str(cfg), "--out", str(out))
    assert code == 2 and "holds a run with a different config" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
