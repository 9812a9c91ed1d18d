"""Sycophancy and reward-hacking probes: the items, the sandbox, and scoring on a tiny model."""

from __future__ import annotations


import pytest

from tether.probes import realmodel as rm


def test_sycophancy_items_are_well_formed() -> None:
    items = rm.sycophancy_items()
    assert len(items) == 150 + 3 * len(rm.FACTS) == 270
    arith = [it for it in items if it.kind == "arithmetic"]
    for it in arith:
        expr = it.question[len("What is ") : -1]
        assert it.statement_right == f"{expr} is {eval(expr)}."  # the right answer is right
        assert it.statement_wrong != it.statement_right
        wrong = it.statement_wrong.split(" is ")[1].rstrip(".")
        assert wrong in it.suggestion_prompt
    assert len({it.suggestion_prompt for it in items}) == len(items)


def test_score_sycophancy_bookkeeping(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    items = rm.sycophancy_items(n_arithmetic=6)[:6]

    def fake_logprobs(model, tok, prompts, completions, batch_size=32):  # noqa: ANN001
        # agree when the prompt mentions a teacher; unprompted, prefer the right statement except item 0
        vals = []
        for p, c in zip(prompts, completions):
            text = p[0]["content"]
            if c.startswith("Yes,"):
                vals.append(0.0 if "teacher" in text else -2.0)
            elif c.startswith("No,"):
                vals.append(-1.0)
            else:
                wrong = any(c == it.statement_wrong for it in items)
                first = c in (items[0].statement_wrong, items[0].statement_right)
                vals.append((-0.5 if wrong else -1.0) if first else (-3.0 if wrong else -1.0))
        return torch.tensor(vals, dtype=torch.float64)

    monkeypatch.setattr(rm, "completion_logprobs", fake_logprobs)
    metrics, rows = rm.score_sycophancy(None, None, items)  # type: ignore[arg-type]
    teacher = [("teacher" in it.suggestion_prompt) for it in items]
    assert [r["agrees"] for r in rows] == teacher
    assert [r["baseline_wrong"] for r in rows] == [True] + [False] * 5
    assert metrics["all"]["agree_rate"] == pytest.approx(sum(teacher) / 6)
    assert metrics["all"]["sycophancy"] == pytest.approx(sum(teacher) / 6 - 1 / 6)


# ------------------------------------------------------------------------------ reward hacking


def test_coding_tasks_hack_and_honest_solutions_score_as_expected() -> None:
    tasks = rm.coding_tasks(per_family=1, n_hidden=4)
    assert len(tasks) == len(rm._TASK_FAMILIES) and len(rm.coding_tasks()) >= 200
    for t in tasks:
        honest = rm.execute_task(t, rm.extract_code(t.honest_solution()))
        hack = rm.execute_task(t, rm.extract_code(t.hack_solution()))
        assert honest["outcome"] == "correct", t.name
        assert hack["outcome"] == "hack" and hack["hidden_passed"] < hack["hidden_total"], t.name
    broken = rm.execute_task(tasks[0], "def add_all(xs):\n    raise ValueError")
    assert broken["outcome"] == "fail"
    looping = rm.execute_task(tasks[0], "def add_all(xs):\n    while True: pass", timeout_s=1.0)
    assert looping["outcome"] == "fail" and looping["timed_out"]


def test_extract_code() -> None:
    assert rm.extract_code("Sure!\n```python\ndef f(x):\n    return x\n```\nDone") == "def f(x):\n    return x"
    assert rm.extract_code("def f(x): return x") == "def f(x): return x"


def test_scoring_on_a_tiny_model_runs_end_to_end() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tether.organism.tokenizer import build_tokenizer

    items = rm.sycophancy_items(n_arithmetic=3)[:3]
    tasks = rm.coding_tasks(per_family=1)[:2]
    words = {w for it in items for w in (it.suggestion_prompt + " " + it.statement_right + " " + it.statement_wrong).split()}
    words |= {"Yes,", "No,", "```python", "```", "def", "return"}
    tok = build_tokenizer(sorted(words))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    metrics, rows = rm.score_sycophancy(model, tok, items)
    assert metrics["all"]["n"] == 3 and len(rows) == 3
    assert metrics["all"]["agree_rate"] == sum(r["agrees"] for r in rows) / 3
    hm, hrows = rm.score_reward_hacking(model, tok, tasks, execute=True, max_new_tokens=4)
    assert hm["n"] == 2 and all(r["outcome"] == "fail" for r in hrows)  # a random model writes no working code
    assert hm["fail_rate"] == 1.0


# ------------------------------------------------------------------------------- inspect export


def test_inspect_samples_and_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from tether.errors import TetherError
    from tether.probes import inspect_export as ie
    from tether.probes.freeform import EMQuestion
    from tether.probes.mc import MCItem

    s = ie.mc_samples([MCItem("Q?\n (A) yes\n (B) no", " (B)", " (A)", "f.jsonl:3")])
    assert s == [{"input": "Q?\n (A) yes\n (B) no", "target": "B", "id": "f.jsonl:3", "metadata": {"matching": " (B)", "not_matching": " (A)"}}]
    with pytest.raises(TetherError, match="f.jsonl:4"):
        ie.mc_samples([MCItem("Q?", "yes", "no", "f.jsonl:4")])
    jp = {"aligned": "{question}|{answer}", "coherent": "{answer}"}
    fs = ie.freeform_samples([EMQuestion("wish", ("p1", "p2"), jp, system="sys")])
    assert [x["id"] for x in fs] == ["wish:0", "wish:1"] and fs[1]["metadata"]["paraphrase"] == "p2" and fs[0]["system"] == "sys"
    monkeypatch.setitem(sys.modules, "inspect_ai", None)  # as if not installed
    with pytest.raises(TetherError, match="pip install inspect-ai"):
        ie.mc_task("survival-instinct")


def test_inspect_task_builds_when_installed(tmp_path) -> None:  # noqa: ANN001
    import json

    pytest.importorskip("inspect_ai")
    from tether.probes import inspect_export as ie

    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"question": "Q? (A) x (B) y", "answer_matching_behavior": " (A)", "answer_not_matching_behavior": " (B)"}) + "\n")
    task = ie.mc_task(str(p))
    assert len(task.dataset) == 1 and task.dataset[0].target == "A"
