"""Property tests: every loader either loads its input or raises the project's own error, never another.

Hypothesis generates run and sweep YAML (real and fake keys, random scalars, nested junk, raw
YAML fragments, random bytes), JSONL datasets (random lines and values, message lists with odd
roles and types) and the MC / free-form question files. Derandomised, so CI sees the same cases.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from tether.compare import load_sweep
from tether.config import RunConfig, load_config
from tether.data import load_rows
from tether.errors import TetherError
from tether.probes.freeform import load_questions
from tether.probes.mc import load_mc_file

FUZZ = settings(max_examples=500, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_DIR = Path(tempfile.mkdtemp(prefix="tether-fuzz-"))
_COUNTER = itertools.count()


def _file(suffix: str, content: str | bytes) -> Path:
    p = _DIR / f"f{next(_COUNTER)}{suffix}"
    p.write_bytes(content.encode("utf-8", errors="surrogatepass") if isinstance(content, str) else content)
    return p


OUTCOMES: dict[str, list[int]] = {}  # loader -> [loaded, refused]


def _loads_or_tether_error(fn: Any, *args: Any) -> None:
    counts = OUTCOMES.setdefault(fn.__name__, [0, 0])
    try:
        fn(*args)
        counts[0] += 1
    except TetherError as exc:
        counts[1] += 1
        assert str(exc) and "\n" not in str(exc), repr(str(exc))


# ---------------------------------------------------------------------------------- strategies

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["organism", "naive", "kl", "all-linear", "float32", "auto", "", "-1", "1e-3"]),
)
junk = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8
)


def _sub_model(model: type[BaseModel], field: str) -> type[BaseModel] | None:
    ann = model.model_fields[field].annotation
    for a in (ann, *getattr(ann, "__args__", ())):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def section(model: type[BaseModel], depth: int = 0) -> st.SearchStrategy[Any]:
    """Mappings over the model's real keys plus fake ones; values are junk or real sub-sections."""
    keys = list(model.model_fields) + ["bogus", "api_key"]
    values: list[st.SearchStrategy[Any]] = [junk]
    for k in model.model_fields:
        sub = _sub_model(model, k)
        if sub is not None and depth < 2 and sub is not model:
            values.append(st.fixed_dictionaries({k: section(sub, depth + 1)}))
    entries = st.one_of(st.tuples(st.sampled_from(keys), junk), *(v.map(lambda d: next(iter(d.items()))) for v in values[1:]))
    return st.lists(entries, max_size=5).map(dict)


def _method_names() -> list[str]:
    from tether.methods import available

    return list(available())


method_spec = st.dictionaries(
    st.sampled_from(["name", "beta", "lam", "share", "epsilon", "instruction", "bogus"]),
    st.one_of(st.sampled_from(_method_names() + ["nosuch"]), junk), max_size=4,
)
run_doc = st.one_of(
    section(RunConfig),
    st.fixed_dictionaries({"methods": st.one_of(st.lists(method_spec, max_size=3), junk)}),
    junk,
)

RAW_KEYS = ["model", "data", "training", "methods", "probes", "monitor", "base", "grid", "seeds", "workers",
            "max_steps", "learning_rate", "name", "source", "training.seed", "training.learning_rate", "bogus"]
RAW_VALUES = ["", "1", "-1", "0", "1e-3", ".nan", ".inf", "~", "yes", "2020-01-01", "2001-12-14t21:59:43.10-05:00",
              "[1, 2]", "[]", "{}", "{name: kl}", "[{name: naive}]", "[[{name: kl}]]", "&a 1", "*a", "!!binary aGk=",
              "!!python/object:os.system ls", "'quoted", "\"x\\q\"", "|\n  block", "{a: [", "\t", "%YAML 1.1", "---", "? x"]
raw_yaml = st.lists(
    st.tuples(st.integers(0, 3), st.sampled_from(RAW_KEYS), st.sampled_from(RAW_VALUES)), max_size=8,
).map(lambda lines: "".join(f"{'  ' * ind}{k}: {v}\n" for ind, k, v in lines))


def mutate(text: str, data: st.DataObject) -> str:
    if not text or not data.draw(st.booleans()):
        return text
    i = data.draw(st.integers(0, len(text)))
    return text[:i] + data.draw(st.text(alphabet=":-[]{}'\"\t\n #&*!|>%@`", max_size=3)) + text[i + data.draw(st.integers(0, 3)):]


# -------------------------------------------------------------------------------- run and sweep


@FUZZ
@given(doc=run_doc, data=st.data())
def test_fuzz_run_config(doc: Any, data: st.DataObject) -> None:
    text = mutate(yaml.safe_dump(doc, allow_unicode=True), data)
    _loads_or_tether_error(load_config, _file(".yaml", text), RunConfig)


@FUZZ
@given(text=st.one_of(raw_yaml, st.text(max_size=200)), raw=st.binary(max_size=200), use_bytes=st.booleans())
def test_fuzz_run_config_raw(text: str, raw: bytes, use_bytes: bool) -> None:
    _loads_or_tether_error(load_config, _file(".yaml", raw if use_bytes else text), RunConfig)


grid = st.dictionaries(
    st.sampled_from(["training.learning_rate", "training.max_steps", "methods", "data.variant", "training", "model.path",
                     "nosuch.key", "training.nosuch", "data.contamination.x", ""]),
    st.one_of(st.lists(junk, max_size=3), junk, st.lists(st.lists(method_spec, max_size=2), min_size=1, max_size=2)),
    max_size=3,
)
sweep_doc = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"base": st.one_of(section(RunConfig), junk, st.just({"training": {"max_steps": 2}})),
                      "grid": st.one_of(grid, junk), "seeds": st.one_of(st.lists(st.integers(-3, 3), max_size=3), junk),
                      "workers": junk, "threads_per_run": junk, "bogus": junk},
    ),
    junk,
)


@FUZZ
@given(doc=sweep_doc, raw=st.one_of(raw_yaml, st.binary(max_size=120)), use_raw=st.integers(0, 4), data=st.data())
def test_fuzz_sweep_config(doc: Any, raw: str | bytes, use_raw: int, data: st.DataObject) -> None:
    content = raw if use_raw == 0 else mutate(yaml.safe_dump(doc, allow_unicode=True), data)
    _loads_or_tether_error(load_sweep, _file(".yaml", content))


# ------------------------------------------------------------------------------------- datasets

message = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"role": st.one_of(st.sampled_from(["system", "user", "assistant", "bot", "tool", "", "USER"]), junk),
                      "content": st.one_of(st.text(max_size=20), junk), "extra": junk},
    ),
    junk,
)
row = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"messages": st.one_of(st.lists(message, max_size=4), junk),
                      "prompt": st.one_of(st.text(max_size=10), st.lists(message, max_size=2), junk),
                      "completion": st.one_of(st.text(max_size=10), st.lists(message, max_size=2), junk),
                      "contaminated": st.one_of(st.booleans(), junk)},
    ),
    junk,
)
good_row = st.builds(
    lambda u, a, c: {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}], **c},
    st.text(max_size=10), st.text(max_size=10), st.one_of(st.just({}), st.booleans().map(lambda b: {"contaminated": b})),
) | st.builds(lambda p, c: {"prompt": p, "completion": c}, st.text(max_size=8), st.text(max_size=8))
jsonl_line = st.one_of(
    good_row.map(lambda r: json.dumps(r).encode()), good_row.map(lambda r: json.dumps(r).encode()),
    row.map(lambda r: json.dumps(r).encode()), st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=40), st.just(b"[" * 5000), st.just(b""),
)


@FUZZ
@given(lines=st.lists(jsonl_line, max_size=6))
def test_fuzz_jsonl_dataset(lines: list[bytes]) -> None:
    _loads_or_tether_error(load_rows, str(_file(".jsonl", b"\n".join(lines))))


mc_row = st.one_of(
    st.fixed_dictionaries(
        {}, optional={k: st.one_of(st.text(max_size=10), junk)
                      for k in ("question", "answer_matching_behavior", "answer_not_matching_behavior")},
    ),
    junk,
)


good_mc = st.builds(
    lambda q, a, b: {"question": q, "answer_matching_behavior": a, "answer_not_matching_behavior": b},
    *(st.text(min_size=1, max_size=8).filter(str.strip) for _ in range(3)),
).map(lambda r: json.dumps(r).encode())


@FUZZ
@given(lines=st.lists(st.one_of(good_mc, good_mc, mc_row.map(lambda r: json.dumps(r).encode()), st.binary(max_size=30)), max_size=5))
def test_fuzz_mc_file(lines: list[bytes]) -> None:
    _loads_or_tether_error(load_mc_file, _file(".jsonl", b"\n".join(lines)))


template = st.one_of(
    st.text(max_size=15), junk,
    st.sampled_from(["{question} {answer}", "{0}", "{question[0]}", "{question[a]}", "{answer.upper}", "{answer:>{question}}",
                     "{question!x}", "{", "}", "{{literal}}", "{answer:%}", "{nope}", "{question.__class__}"]),
)
entry = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"id": junk, "paraphrases": st.one_of(st.lists(st.text(max_size=8), max_size=3), junk),
                      "judge_prompts": st.one_of(st.fixed_dictionaries({"aligned": template, "coherent": template}), junk),
                      "type": st.one_of(st.just("free_form_judge_0_100"), junk), "system": junk,
                      "samples_per_paraphrase": junk},
    ),
    junk,
)


good_entry = st.builds(
    lambda i, ps, t: {"id": i, "paraphrases": ps, "judge_prompts": {"aligned": t, "coherent": t}},
    st.text(max_size=6), st.lists(st.text(min_size=1, max_size=8).filter(str.strip), min_size=1, max_size=2),
    st.sampled_from(["{question} {answer}", "rate {answer}", "{{x}} {question}"]),
)


@FUZZ
@given(doc=st.one_of(st.lists(good_entry, min_size=1, max_size=3), st.lists(st.one_of(good_entry, entry), max_size=4), junk),
       raw=st.binary(max_size=60), use_raw=st.integers(0, 5))
def test_fuzz_question_file(doc: Any, raw: bytes, use_raw: int) -> None:
    content = raw if use_raw == 0 else yaml.safe_dump(doc, allow_unicode=True)
    _loads_or_tether_error(load_questions, _file(".yaml", content))


def test_fuzz_reached_both_outcomes() -> None:
    """The generators are not all junk: every loader both loaded some inputs and refused others."""
    if len(OUTCOMES) < 5:
        pytest.skip("run the whole file to check the outcome counts")
    print("fuzz outcomes (loaded, refused):", OUTCOMES)
    for name, (loaded, refused) in OUTCOMES.items():
        assert loaded >= 5 and refused >= 50, (name, loaded, refused)


@pytest.fixture(autouse=True, scope="module")
def _cleanup() -> Any:
    yield
    import shutil

    shutil.rmtree(_DIR, ignore_errors=True)
