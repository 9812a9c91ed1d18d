"""Run configs: YAML in, resolved YAML out; every mistake is one sentence naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tether.config import RunConfig, dump_config, load_config
from tether.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_and_resolved_dump(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "training:\n  max_steps: 7\n"))
    assert cfg.training.max_steps == 7 and cfg.data.variant == "sycophantic"
    dump_config(cfg, tmp_path / "out" / "config.yaml")
    again = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert again["training"]["max_steps"] == 7
    assert again["model"]["trust_remote_code"] is False
    assert RunConfig.model_validate(again) == cfg


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("training:\n  max_stepz: 3\n", ["run.yaml", "training.max_stepz", "max_steps"]),
        ("bogus: 1\n", ["run.yaml", "'bogus'", "model, data, training, methods"]),
        ("training:\n  learning_rate: -1\n", ["run.yaml", "training.learning_rate", "greater than 0"]),
        ("data:\n  variant: evil\n", ["run.yaml", "data.variant", "'clean'"]),
        ("training:\n  max_steps: lots\n", ["run.yaml", "training.max_steps", "integer"]),
        ("training: [1, 2\n", ["run.yaml", "YAML syntax error", "line"]),
        ("- 1\n- 2\n", ["run.yaml", "mapping"]),
    ],
)
def test_bad_configs_are_one_sentence(tmp_path: Path, text: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_examples_validate() -> None:
    from tether.compare import load_sweep

    root = Path(__file__).resolve().parents[1] / "examples"
    cfg = load_config(root / "run.yaml")
    assert [m.name for m in cfg.methods] == ["kl"]
    _, runs = load_sweep(root / "sweep.yaml")
    assert len(runs) == 9 and {r.label for r in runs} == {"naive", "kl", "inoculation+replay"}
