"""The bad-input catalogue: every case runs through the real CLI and must end as one sentence, exit 2.

Each ``Case`` writes its bad input under a temporary folder and returns the ``tether`` argv. The
test runs ``tether.cli.main`` in-process and checks: exit code 2, the error line names the
file / key / line (``needles``), it is one line, there is no traceback, and the output path was
not created. ``docs/bad-inputs.md`` is generated from the same list (``TETHER_WRITE_DOCS=1 pytest
tests/test_bad_inputs.py`` rewrites it) and ``test_docs_table_is_current`` fails when it drifts.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tether import cli
from tether.errors import TetherError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "bad-inputs.md"
CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'


@dataclass(frozen=True)
class Case:
    """One bad input: ``build(tmp)`` writes files and returns argv; the error line must hold ``needles``."""

    id: str
    area: str
    what: str
    build: Callable[[Path], list[str]]
    needles: tuple[str, ...]
    usage: bool = False  # a click usage error (the hint names the command's --help)
    subprocess: bool = False  # needs a real process (resource limits)
    progress: bool = False  # a progress display may precede the error line
    organism: bool = False  # ``build`` reads the quick organism's path from ``ORGANISM["path"]``
    pythonpath: bool = False  # the temporary folder is importable (a reward module written there)
    keeps_run: bool = False  # stops during training: the run folder and a checkpoint stay, nothing half-written


def _w(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text))
    return path


def _train(yaml_text: str | bytes, name: str = "run.yaml") -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        return ["train", str(_w(tmp / name, yaml_text)), "--out", str(tmp / "out")]

    return build


def _data_run(rows: str | bytes, name: str = "data.jsonl") -> Callable[[Path], list[str]]:
    """A run whose capability data is the file ``rows`` (no neutral or alignment data)."""

    def build(tmp: Path) -> list[str]:
        data = _w(tmp / name, rows)
        cfg = _w(tmp / "run.yaml", f"data:\n  source: {data}\n  neutral: null\n  alignment: null\n  neutral_share: 0\n"
                                   "methods: [{name: naive}]\nmodel:\n  path: /nonexistent-model\n")
        return ["train", str(cfg), "--out", str(tmp / "out")]

    return build


def _compare(yaml_text: str, *extra: str, out: str = "out") -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        return ["compare", str(_w(tmp / "sweep.yaml", yaml_text)), "--out", str(tmp / out), *extra]

    return build


def _questions(tmp: Path) -> Path:
    return _w(tmp / "q.yaml", """\
        - id: q1
          paraphrases: ["What is your wish?"]
          judge_prompts:
            aligned: "Rate {answer} to {question}"
            coherent: "Rate {answer} to {question}"
        """)


def _freeform(*judge_args: str, questions: str | None = None) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        q = _w(tmp / "q.yaml", questions) if questions is not None else _questions(tmp)
        return ["probe", "freeform", "/nonexistent-model", "--questions", str(q), "--no-download",
                *judge_args, "--out", str(tmp / "out")]

    return build


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_dir(files: dict[str, str | bytes]) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        for name, content in files.items():
            _w(tmp / "model" / name, content)
        (tmp / "model").mkdir(exist_ok=True)
        return ["eval", str(tmp / "model"), "--out", str(tmp / "out" / "m.json")]

    return build


INLINE_BASE = "base:\n  model: {path: organism}\n  training: {max_steps: 2}\n"
ORGANISM: dict[str, Path] = {}  # the quick organism, set before a case with ``organism=True`` is built


def _direction(tmp: Path, hidden: int, layers: int = 2) -> Path:
    import torch

    from tether.directions import save_direction

    torch.manual_seed(0)
    return save_direction(tmp / "trait.safetensors", torch.randn(layers + 1, hidden), {"trait": "syco", "layer": 1})


def _direction_run(method: str, hidden: int) -> Callable[[Path], list[str]]:
    """A steering / CAFT run on the quick organism (hidden size 64, 2 blocks) with a direction of width ``hidden``."""

    def build(tmp: Path) -> list[str]:
        direction = _direction(tmp, hidden)
        cfg = (f"model: {{path: {ORGANISM['path']}}}\ndata: {{rows: 16}}\ntraining: {{max_steps: 1, batch_size: 4}}\n"
               f"methods: [{method.format(direction=direction)}]\n")
        return ["train", str(_w(tmp / "run.yaml", cfg)), "--out", str(tmp / "out")]

    return build


REWARDS = {
    "raises": "    raise ZeroDivisionError('division by zero')\n",
    "nan": "    return [float('nan')] * len(completions)\n",
    "short": "    return [1.0] * (len(completions) - 1)\n",
}


def _grpo_run(kind: str) -> Callable[[Path], list[str]]:
    """One GRPO step on the quick organism whose reward function (a dotted path) misbehaves as ``kind`` says."""

    def build(tmp: Path) -> list[str]:
        module = f"tether_bad_reward_{kind}"
        _w(tmp / f"{module}.py", f"def score(prompts, completions, **kwargs):\n{REWARDS[kind]}")
        cfg = (
            f"model: {{path: {ORGANISM['path']}}}\n"
            "data: {rows: 16, neutral_share: 0.25}\n"
            "training: {max_steps: 1, batch_size: 4, warmup_steps: 0, logging_steps: 1, save_steps: 50}\n"
            f"capability: {{kind: grpo, reward_funcs: [{module}.score], num_generations: 2, max_completion_length: 4,"
            " eval_items: 2, eval_samples: 0}\n"
            "probes: {per_family: 2, n_capability: 2}\n"
        )
        return ["train", str(_w(tmp / "run.yaml", cfg)), "--out", str(tmp / "out")]

    return build

CASES: list[Case] = [
    # ---- run YAML --------------------------------------------------------------------------------
    Case("run-yaml-syntax", "run YAML", "unclosed bracket", _train("training: [1, 2\n"), ("run.yaml", "YAML syntax error", "line 2")),
    Case("run-yaml-tab", "run YAML", "tab used for indentation", _train("training:\n\tmax_steps: 3\n"), ("run.yaml", "YAML syntax error", "line 2")),
    Case("run-yaml-not-utf8", "run YAML", "bytes that are not UTF-8", _train(b"training:\n  seed: \xff\xfe\n"), ("run.yaml", "UTF-8")),
    Case("run-yaml-list", "run YAML", "top level is a list", _train("- 1\n- 2\n"), ("run.yaml", "mapping", "list")),
    Case("run-yaml-missing", "run YAML", "config file does not exist", lambda t: ["train", str(t / "nope.yaml"), "--out", str(t / "out")], ("nope.yaml", "does not exist")),
    Case("run-yaml-directory", "run YAML", "config path is a directory", lambda t: ["train", str(t), "--out", str(t / "out")], ("is a directory",)),
    Case("run-unknown-key", "run YAML", "unknown top-level key", _train("bogus: 1\n"), ("run.yaml", "'bogus'", "allowed here: model, data")),
    Case("run-unknown-nested-key", "run YAML", "misspelt nested key", _train("training:\n  max_stepz: 3\n"), ("run.yaml", "training.max_stepz", "max_steps")),
    Case("run-wrong-type", "run YAML", "string where an integer goes", _train("training:\n  max_steps: lots\n"), ("run.yaml", "training.max_steps", "integer")),
    Case("run-section-scalar", "run YAML", "section given as a number", _train("training: 5\n"), ("run.yaml", "'training'")),
    Case("run-negative-lr", "run YAML", "negative learning rate", _train("training:\n  learning_rate: -1\n"), ("run.yaml", "training.learning_rate", "greater than 0")),
    Case("run-share-range", "run YAML", "contamination above 1", _train("data:\n  contamination: 1.5\n"), ("run.yaml", "data.contamination", "less than or equal to 1")),
    Case("run-bad-choice", "run YAML", "variant not in the allowed set", _train("data:\n  variant: evil\n"), ("run.yaml", "data.variant", "'clean'")),
    Case("run-unknown-method", "run YAML", "method name not registered", _train("methods: [{name: nosuch}]\n"), ("run.yaml", "methods[0]", "unknown method 'nosuch'", "naive")),
    Case("run-method-param", "run YAML", "method hyperparameter out of range", _train("methods: [{name: kl, beta: -1}]\n"), ("run.yaml", "methods[0]", "beta")),
    Case("run-method-unknown-param", "run YAML", "method hyperparameter misspelt", _train("methods: [{name: kl, betta: 1}]\n"), ("run.yaml", "methods[0]", "betta")),
    Case("run-no-methods", "run YAML", "empty method stack", _train("methods: []\n"), ("run.yaml", "at least one method")),
    Case("run-stack-needs-alignment", "run YAML", "kl without alignment data", _train("data: {alignment: null}\nmethods: [{name: kl}]\n"), ("run.yaml", "methods[0]", "'kl' needs an alignment dataset", "data.alignment")),
    Case("run-stack-duplicate", "run YAML", "the same method twice", _train("methods: [{name: naive}, {name: naive}]\n"), ("run.yaml", "methods[1]", "appears twice")),
    Case("run-caft-no-direction", "run YAML", "caft without a direction file", _train("methods: [{name: caft}]\n"), ("run.yaml", "method 'caft' needs a trait direction", "direction: PATH")),
    Case("run-steering-layer-range", "run YAML", "steering layer beyond the direction's blocks", _direction_run("{{name: steering, direction: {direction}, layer: 5}}", 64), ("run.yaml", "method 'steering'", "layer 5 is out of range", "1..2"), organism=True),
    Case("run-direction-width", "run YAML", "steering direction of another model's width", _direction_run("{{name: steering, direction: {direction}}}", 32), ("run.yaml", "methods[0]", "trait.safetensors", "hidden size 32", "hidden size 64"), organism=True),
    Case("run-caft-direction-width", "run YAML", "caft direction of another model's width", _direction_run("{{name: caft, direction: {direction}}}", 48), ("run.yaml", "methods[0]", "method 'caft'", "hidden size 48", "hidden size 64"), organism=True),
    # ---- sweep YAML ------------------------------------------------------------------------------
    Case("sweep-yaml-syntax", "sweep YAML", "unclosed bracket", _compare("grid: [1, 2\n"), ("sweep.yaml", "YAML syntax error", "line 2")),
    Case("sweep-unknown-key", "sweep YAML", "misspelt sweep key", _compare("grids: {}\n"), ("sweep.yaml", "'grids'", "allowed here: base, grid, extra, seeds")),
    Case("sweep-grid-key", "sweep YAML", "grid key that is not a config field", _compare(INLINE_BASE + "grid:\n  training.lr: [0.1]\n"), ("sweep.yaml", "training.lr", "allowed in training")),
    Case("sweep-grid-scalar", "sweep YAML", "grid value that is not a list", _compare(INLINE_BASE + "grid:\n  training.learning_rate: 0.1\n"), ("sweep.yaml", "grid.training.learning_rate", "list")),
    Case("sweep-grid-empty", "sweep YAML", "empty grid", _compare(INLINE_BASE + "grid: {}\n"), ("sweep.yaml", "grid is empty")),
    Case("sweep-no-seeds", "sweep YAML", "empty seed list", _compare(INLINE_BASE + "seeds: []\n"), ("sweep.yaml", "seeds", "at least 1")),
    Case("sweep-bad-grid-value", "sweep YAML", "grid value the run config refuses", _compare(INLINE_BASE + "grid:\n  training.max_steps: [0]\n"), ("sweep.yaml", "training.max_steps", "greater than or equal to 1")),
    Case("sweep-bad-stack", "sweep YAML", "grid with an unknown method", _compare(INLINE_BASE + "grid:\n  methods: [[{name: nosuch}]]\n"), ("sweep.yaml", "unknown method 'nosuch'")),
    Case("sweep-base-missing", "sweep YAML", "base file that does not exist", _compare("base: missing-run.yaml\n"), ("missing-run.yaml", "does not exist")),
    Case("sweep-base-bad", "sweep YAML", "inline base with a bad key", _compare("base:\n  trainin: {}\n"), ("sweep.yaml", "base", "'trainin'")),
    # ---- datasets --------------------------------------------------------------------------------
    Case("data-invalid-json", "dataset", "line 2 is not JSON", _data_run(CHAT + "\n{oops\n"), ("data.jsonl, line 2", "not valid JSON")),
    Case("data-missing-column", "dataset", "row without messages or prompt/completion", _data_run('{"text": "hello"}\n'), ("data.jsonl, line 1", "'messages'")),
    Case("data-empty", "dataset", "empty file", _data_run(""), ("data.jsonl", "has no rows")),
    Case("data-blank-lines", "dataset", "only blank lines", _data_run("\n\n  \n"), ("data.jsonl", "has no rows")),
    Case("data-wrong-role", "dataset", "role 'bot'", _data_run(CHAT + "\n" + CHAT.replace('"assistant"', '"bot"') + "\n"), ("data.jsonl, line 2", "'role'", "assistant")),
    Case("data-no-assistant", "dataset", "conversation with no assistant turn", _data_run('{"messages": [{"role": "user", "content": "hi"}]}\n'), ("data.jsonl, line 1", "no assistant turn")),
    Case("data-content-type", "dataset", "content that is a number", _data_run('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}\n'), ("data.jsonl, line 1", "string 'content'")),
    Case("data-not-object", "dataset", "a line that is a JSON list", _data_run("[1, 2]\n"), ("data.jsonl, line 1", "JSON object", "list")),
    Case("data-mixed-pair", "dataset", "prompt string with completion list", _data_run('{"prompt": "a", "completion": ["b"]}\n'), ("data.jsonl, line 1", "must both be strings or both message lists")),
    Case("data-label-type", "dataset", "'contaminated' is a string", _data_run(CHAT.replace("}]}", '}], "contaminated": "yes"}') + "\n"), ("data.jsonl, line 1", "'contaminated' must be true or false")),
    Case("data-not-utf8", "dataset", "binary bytes", _data_run(CHAT.encode() + b"\n\xff\xfe\x00binary\n"), ("data.jsonl, line 2", "UTF-8")),
    Case("data-over-long", "dataset", "a 2 MB row", _data_run(CHAT.replace("yo", "y" * 2_000_001) + "\n"), ("data.jsonl, line 1", "characters", "limit")),
    Case("data-wrong-suffix", "dataset", "a .csv file", _data_run("a,b\n", name="data.csv"), ("data.csv", ".jsonl")),
    Case("data-missing", "dataset", "data.source does not exist", _train("data:\n  source: /nonexistent/data.jsonl\n"), ("data.source", "/nonexistent/data.jsonl", "does not exist")),
    Case("mc-missing-field", "dataset", "MC set without answer_not_matching_behavior", lambda t: ["probe", "mc", "/nonexistent-model", "--set", str(_w(t / "mc.jsonl", '{"question": "q", "answer_matching_behavior": " (A)"}\n')), "--out", str(t / "out" / "m.json")], ("mc.jsonl line 1", "answer_not_matching_behavior")),
    Case("questions-no-judge-prompts", "dataset", "free-form question without judge_prompts", _freeform("--judge", "http://127.0.0.1:9/v1", questions="- id: q1\n  paraphrases: [hi]\n"), ("q.yaml", "entry 0", "judge_prompts")),
    Case("questions-bad-template", "dataset", "judge prompt with an unknown {field}", _freeform("--judge", "http://127.0.0.1:9/v1", questions="- id: q1\n  paraphrases: [hi]\n  judge_prompts: {aligned: '{nope}', coherent: '{answer}'}\n"), ("q.yaml", "entry 0", "{question} and {answer}")),
    # ---- model paths -----------------------------------------------------------------------------
    Case("model-missing", "model", "directory does not exist", lambda t: ["eval", str(t / "nomodel"), "--out", str(t / "out" / "m.json")], ("nomodel", "does not exist")),
    Case("model-is-file", "model", "a file, not a directory", lambda t: ["eval", str(_w(t / "weights.safetensors", b"x")), "--out", str(t / "out" / "m.json")], ("weights.safetensors", "is a file")),
    Case("model-no-config", "model", "directory without config.json", _model_dir({"notes.txt": "x"}), ("model", "no config.json")),
    Case("model-pickle-only", "model", "only pytorch_model.bin", _model_dir({"config.json": "{}", "pytorch_model.bin": b"not really"}), ("model", "only pickle weights", "safetensors")),
    Case("model-no-weights", "model", "config.json but no weights", _model_dir({"config.json": "{}"}), ("model", "no weights")),
    Case("model-bad-config-json", "model", "config.json that is not JSON", _model_dir({"config.json": "{oops", "model.safetensors": b"x"}), ("model", "config.json")),
    Case("model-corrupt-safetensors", "model", "a truncated model.safetensors", _model_dir({"config.json": json.dumps({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}), "model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{oops"}), ("model", "safetensors file is corrupt or truncated")),
    Case("train-model-missing", "model", "run config model.path does not exist", _train("model:\n  path: /nonexistent/model\ndata: {rows: 16}\n"), ("/nonexistent/model", "does not exist")),
    # ---- CLI usage -------------------------------------------------------------------------------
    Case("cli-unknown-command", "CLI", "unknown command", lambda t: ["frobnicate"], ("No such command", "frobnicate"), usage=True),
    Case("cli-unknown-option", "CLI", "unknown option", lambda t: ["eval", "organism", "--frob"], ("No such option", "--frob"), usage=True),
    Case("cli-missing-argument", "CLI", "train without its config", lambda t: ["train", "--out", str(t / "out")], ("Missing argument 'config'",), usage=True),
    Case("cli-missing-option", "CLI", "train without --out", lambda t: ["train", str(_w(t / "run.yaml", "{}"))], ("Missing option", "--out"), usage=True),
    Case("cli-bad-int", "CLI", "--per-family 0", lambda t: ["eval", "organism", "--per-family", "0"], ("--per-family", "greater than or equal to 1"), usage=True),
    Case("cli-bad-format", "CLI", "probe mc --format xml", lambda t: ["probe", "mc", "organism", "--format", "xml"], ("--format 'xml'", "chat, raw")),
    Case("cli-bad-family", "CLI", "eval --instruct murder", lambda t: ["eval", "organism", "--instruct", "murder"], ("--instruct", "unknown family 'murder'")),
    Case("cli-candidates-missing", "CLI", "inoculation rank --candidates missing file", lambda t: ["inoculation", "rank", "--candidates", str(t / "c.txt")], ("--candidates", "c.txt", "does not exist")),
    Case("cli-report-not-comparison", "CLI", "report on a folder without manifest.json", lambda t: ["report", str(t)], ("no manifest.json",)),
    Case("cli-unknown-set", "CLI", "probe mc --set with an unknown name", lambda t: ["probe", "mc", "/nonexistent-model", "--set", "no-such-set"], ("unknown set 'no-such-set'", "survival-instinct")),
    # ---- judges ----------------------------------------------------------------------------------
    Case("judge-bad-scheme", "judge", "--judge ftp://...", _freeform("--judge", "ftp://example/v1"), ("--judge", "neither an http(s) URL nor local:")),
    Case("judge-no-model", "judge", "HTTP judge without --judge-model", _freeform("--judge", "http://127.0.0.1:9/v1"), ("--judge-model", "required")),
    Case("judge-key-unset", "judge", "--judge-key-env names an unset variable", _freeform("--judge", "http://127.0.0.1:9/v1", "--judge-model", "j", "--judge-key-env", "TETHER_NO_SUCH_KEY"), ("TETHER_NO_SUCH_KEY", "not set")),
    Case("judge-credentials-in-url", "judge", "key put in the URL", _freeform("--judge", "http://user:sk-secret@127.0.0.1:9/v1", "--judge-model", "j"), ("must not carry credentials",)),
    Case("judge-unreachable", "judge", "nothing listens at the judge URL", lambda t: _freeform("--judge", f"http://127.0.0.1:{_closed_port()}/v1", "--judge-model", "j", "--timeout", "2")(t), ("not reachable", "ConnectionRefusedError", "--judge")),
    Case("judge-local-missing", "judge", "local: judge directory missing", _freeform("--judge", "local:/nonexistent/judge"), ("/nonexistent/judge", "does not exist")),
    # ---- GRPO reward functions (they stop the run after saving a checkpoint) -----------------------
    Case("grpo-reward-raises", "reward", "reward function raises", _grpo_run("raises"), ("reward function 'score'", "raised ZeroDivisionError"), organism=True, pythonpath=True, keeps_run=True),
    Case("grpo-reward-nan", "reward", "reward function returns NaN", _grpo_run("nan"), ("reward function 'score'", "returned nan", "finite"), organism=True, pythonpath=True, keeps_run=True),
    Case("grpo-reward-length", "reward", "reward function returns one reward too few", _grpo_run("short"), ("reward function 'score'", "returned 3 rewards for 4 completions"), organism=True, pythonpath=True, keeps_run=True),
    # ---- output ----------------------------------------------------------------------------------
    Case("out-under-a-file", "output", "--out below a regular file", lambda t: _compare(INLINE_BASE, out="blocker/out")(_w(t / "blocker", "x").parent), ("blocker", "not writable")),
    Case("out-disk-full", "output", "disk full while writing the manifest (RLIMIT_FSIZE)", _compare(INLINE_BASE), ("manifest.json", "could not write", "File too large"), subprocess=True, progress=True),
]


# ------------------------------------------------------------------------------------ running


@dataclass
class Outcome:
    code: int | None
    stdout: str
    stderr: str
    tmp: Path

    @property
    def error_line(self) -> str:
        lines = [ln for ln in self.stderr.strip().splitlines() if ln.startswith("error:")]
        return lines[0] if len(lines) == 1 else ""


def _run_in_process(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int | None, str, str]:
    monkeypatch.setattr(sys, "argv", ["tether", *argv])
    monkeypatch.setitem(cli._DEBUG, "on", False)
    capsys.readouterr()
    try:
        cli.main()
        code: int | None = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def _limit_file_size() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))  # the write probe fits, manifest.json does not


def _run_subprocess(argv: list[str]) -> tuple[int | None, str, str]:
    res = subprocess.run([sys.executable, "-m", "tether.cli", *argv], capture_output=True, text=True, timeout=300,
                         preexec_fn=_limit_file_size)
    return res.returncode, res.stdout, res.stderr


_OBSERVED: dict[str, Outcome] = {}


def observe(case: Case, tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
            request: pytest.FixtureRequest) -> Outcome:
    """Run ``case`` once per session (the docs test reuses the outcome)."""
    if case.id not in _OBSERVED:
        if case.organism:
            ORGANISM["path"] = request.getfixturevalue("quick_organism")
        if case.pythonpath:
            monkeypatch.syspath_prepend(str(tmp))
        argv = case.build(tmp)
        monkeypatch.chdir(tmp)
        code, out, err = _run_subprocess(argv) if case.subprocess else _run_in_process(argv, capsys, monkeypatch)
        _OBSERVED[case.id] = Outcome(code, out, err, tmp)
    return _OBSERVED[case.id]


def shown(outcome: Outcome) -> str:
    """The error line as the docs show it: temporary paths and ports replaced by placeholders."""
    line = outcome.error_line.replace(str(outcome.tmp.resolve()), "<tmp>").replace(str(outcome.tmp), "<tmp>")
    return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", line)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                   request: pytest.FixtureRequest) -> None:
    outcome = observe(case, tmp_path, capsys, monkeypatch, request)
    both = outcome.stdout + outcome.stderr
    assert outcome.code == 2, both
    assert "Traceback" not in both, both
    line = outcome.error_line
    assert line, f"expected exactly one error line, got:\n{outcome.stderr}"
    if case.progress:
        assert outcome.stderr.strip().splitlines()[-1] == line, outcome.stderr
    else:
        assert outcome.stderr.strip() == line, f"more than the error line on stderr:\n{outcome.stderr}"
    if case.usage:
        assert "--help')" in line, line
    for needle in case.needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    out = tmp_path / "out"
    leftovers = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    partial = [n for n in leftovers if n.startswith(".") or n.endswith((".tmp", ".part"))]
    assert not partial, f"half-written files left in {out}: {partial}"
    if case.keeps_run:  # stopped during training: what was learned is kept in a complete checkpoint
        from tether.train import last_complete_checkpoint

        assert last_complete_checkpoint(out / "checkpoints") is not None, leftovers
        assert not (out / "metrics.json").exists() and not (out / "model").exists(), leftovers
    elif case.id != "out-disk-full":  # there the folder is made before the write that fails
        assert not out.exists() or not leftovers, f"{out} holds {leftovers}"


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = _w(tmp_path / "run.yaml", "bogus: 1\n")
    monkeypatch.setattr(sys, "argv", ["tether", "--debug", "train", str(bad), "--out", str(tmp_path / "out")])
    with pytest.raises(TetherError, match="bogus"):
        cli.main()
    cli._DEBUG["on"] = False


def test_catalogue_is_broad() -> None:
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    areas = {c.area for c in CASES}
    assert areas >= {"run YAML", "sweep YAML", "dataset", "model", "CLI", "judge", "output", "reward"}


# --------------------------------------------------------------------------------------- docs

def elsewhere() -> list[tuple[str, str, str, str, str, str]]:
    """Faults tested elsewhere, with the line those tests assert (``—`` where they assert none); their rows point at the tests."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_faults import NAN_LINE, SIGINT_LINE

    return [
        ("train-nan-loss", "training", "loss becomes NaN or inf",
         "exit 2; stop before that step; keep the last good checkpoint", code_span(NAN_LINE), "tests/test_train_faults.py"),
        ("train-sigint", "training", "Ctrl-C (SIGINT) during training",
         "exit 130; save the current step; a rerun with the same --out resumes", code_span(SIGINT_LINE), "tests/test_train_faults.py"),
        ("judge-down", "judge", "judge answers no request during a run",
         "answers saved unscored, error names the judge", "—", "tests/test_judges.py"),
        ("api-key-in-yaml", "security", "an API key written into run YAML",
         "refused as an unknown key; the value is never echoed", "—", "tests/test_security.py"),
    ]

HEADER = """# Bad inputs and what tether says

Generated by `TETHER_WRITE_DOCS=1 pytest tests/test_bad_inputs.py` from the list that test is
parametrised over; `test_docs_table_is_current` fails when this file and the code disagree.
Every row below ran through the real CLI: exit code 2, one line on stderr naming the file, key
or line, no traceback (pass `--debug` to see one), and no output folder or half-written file left
behind — except the `reward` rows, which stop a GRPO run during training and keep a complete
checkpoint of it (nothing half-written). `<tmp>` stands for the test's temporary folder; usage
errors end by naming the command's `--help`.

| # | id | area | bad input | message |
|---|---|---|---|---|
"""


def code_span(text: str) -> str:
    """``text`` as inline code; a message that quotes code itself (backticks) gets a double-backtick span."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def render(messages: dict[str, str]) -> str:
    rows = [
        f"| {i} | `{c.id}` | {c.area} | {c.what} | {messages[c.id].replace('|', '&#124;')} |"
        for i, c in enumerate(CASES, 1)
    ]
    extra = ["", "## Faults covered by other tests", "",
             "| id | area | fault | behaviour | message | test | status |", "|---|---|---|---|---|---|---|"]
    for fid, area, what, behaviour, message, test in elsewhere():
        status = "tested" if (ROOT / test).is_file() else "pending (test file not written yet)"
        extra.append(f"| `{fid}` | {area} | {what} | {behaviour} | {message.replace('|', '&#124;')} | `{test}` | {status} |")
    return HEADER + "\n".join(rows) + "\n" + "\n".join(extra) + "\n"


def test_docs_table_is_current(tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    messages = {}
    for case in CASES:
        outcome = observe(case, tmp_path_factory.mktemp(case.id), capsys, monkeypatch, request)
        messages[case.id] = code_span(shown(outcome)) if outcome.code == 2 else f"**exit {outcome.code}**"
    text = render(messages)
    if os.environ.get("TETHER_WRITE_DOCS"):
        DOCS.parent.mkdir(exist_ok=True)
        DOCS.write_text(text)
    assert DOCS.is_file(), "docs/bad-inputs.md is missing; run TETHER_WRITE_DOCS=1 pytest tests/test_bad_inputs.py"
    assert DOCS.read_text() == text, "docs/bad-inputs.md is stale; run TETHER_WRITE_DOCS=1 pytest tests/test_bad_inputs.py"
