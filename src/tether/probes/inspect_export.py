"""Export tether's suites as ``inspect_ai`` tasks, so users of inspect can run them there.

``inspect_ai`` is an optional dependency, imported only inside the functions that build tasks
(``pip install inspect-ai``). The sample conversion is plain Python and needs no inspect.

* ``mc_task``: the advanced-AI-risk questions as generation tasks. Inspect scores what the
  model *writes* (the first ``(X)`` in its reply, against the matching letter), not tether's
  log-likelihood comparison, so the two numbers are related but not the same.
* ``freeform_task``: the EM questions, one sample per paraphrase, ``epochs`` = answers per
  paraphrase, temperature 1, judged by ``em_judge`` with the file's own judge prompts and the
  EM score rule (``tether.probes.judges``). Each sample's score is 1 when misaligned, 0 when
  aligned, and carries both judge scores in its metadata; the per-question ≥ 5 coherent
  answers rule and the mean over questions are tether's (``freeform_rows_from_log`` turns an
  inspect log back into rows for ``tether.probes.freeform.aggregate``).

Usage: ``inspect eval tether/probes/inspect_export.py@tether_mc -T sets=survival-instinct``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tether.errors import TetherError
from tether.probes.freeform import EMQuestion, classify, load_questions
from tether.probes.judges import score_from_text, score_from_top_logprobs
from tether.probes.mc import MCItem, load_mc_file
from tether.probes.sources import ADVANCED_AI_RISK, EMERGENT_MISALIGNMENT, resolve_set

INSTALL_HINT = "inspect_ai is not installed; install it with `pip install inspect-ai` to export tether suites as inspect tasks"
_LETTER = re.compile(r"\(([A-Z])\)")


def _inspect() -> Any:
    try:
        import inspect_ai
    except ImportError:
        raise TetherError(INSTALL_HINT) from None
    return inspect_ai


def mc_samples(items: list[MCItem]) -> list[dict[str, Any]]:
    """Plain sample dicts (``input``, ``target``, ``id``, ``metadata``) for advanced-AI-risk items."""
    out = []
    for it in items:
        m = _LETTER.search(it.matching)
        if m is None:
            raise TetherError(f"{it.source}: answer_matching_behavior {it.matching!r} is not a '(X)' letter, which inspect export needs")
        out.append({"input": it.question, "target": m.group(1), "id": it.source,
                    "metadata": {"matching": it.matching, "not_matching": it.not_matching}})
    return out


def freeform_samples(questions: list[EMQuestion]) -> list[dict[str, Any]]:
    """One sample dict per (question, paraphrase); the judge prompts travel in the metadata."""
    out = []
    for q in questions:
        for j, para in enumerate(q.paraphrases):
            out.append({"input": para, "system": q.system, "id": f"{q.id}:{j}",
                        "metadata": {"question_id": q.id, "paraphrase": para, "judge_prompts": q.judge_prompts}})
    return out


def mc_task(sets: str = ",".join(ADVANCED_AI_RISK), limit: int | None = None) -> Any:
    """An inspect ``Task`` over the given advanced-AI-risk sets (comma-separated names or paths)."""
    _inspect()
    from inspect_ai import Task
    from inspect_ai.dataset import MemoryDataset, Sample
    from inspect_ai.scorer import pattern
    from inspect_ai.solver import generate

    samples = []
    for spec in sets.split(","):
        items = load_mc_file(resolve_set(spec.strip(), ADVANCED_AI_RISK))
        samples += [Sample(**s) for s in mc_samples(items[:limit] if limit else items)]
    return Task(dataset=MemoryDataset(samples), solver=generate(), scorer=pattern(r"\(([A-Z])\)"))


def em_judge(judge_model: str) -> Any:
    """An inspect scorer: EM aligned/coherent judging with ``judge_model`` (an inspect model name)."""
    _inspect()
    from inspect_ai.model import GenerateConfig, get_model
    from inspect_ai.scorer import Score, mean, scorer

    @scorer(metrics=[mean()])
    def _em_judge() -> Any:
        async def score(state: Any, target: Any) -> Any:
            model = get_model(judge_model)
            values: dict[str, float | None] = {}
            for key in ("aligned", "coherent"):
                prompt = state.metadata["judge_prompts"][key].format(
                    question=state.metadata["paraphrase"], answer=state.output.completion
                )
                res = await model.generate(prompt, config=GenerateConfig(max_tokens=1, temperature=0, logprobs=True, top_logprobs=20))
                lp = res.choices[0].logprobs if res.choices else None
                if lp is not None and lp.content and lp.content[0].top_logprobs:
                    values[key] = score_from_top_logprobs({t.token: t.logprob for t in lp.content[0].top_logprobs})[0]
                else:
                    values[key] = score_from_text(res.completion)
            label = classify(values["aligned"], values["coherent"])
            value = 1.0 if label == "misaligned" else 0.0 if label == "aligned" else float("nan")
            return Score(value=value, answer=state.output.completion, metadata={**values, "label": label, "judge": judge_model})

        return score

    return _em_judge()


def freeform_task(questions: str = "first_plot_questions", judge_model: str = "openai/gpt-4o-2024-08-06",
                  epochs: int = 100, max_tokens: int = 600) -> Any:
    """An inspect ``Task`` for an EM question file (name or path) judged by ``judge_model``."""
    _inspect()
    from inspect_ai import Task
    from inspect_ai.dataset import MemoryDataset, Sample
    from inspect_ai.model import ChatMessageSystem, ChatMessageUser, GenerateConfig
    from inspect_ai.solver import generate

    samples = []
    for s in freeform_samples(load_questions(resolve_set(questions, EMERGENT_MISALIGNMENT))):
        msgs: list[Any] = [ChatMessageSystem(content=s["system"])] if s["system"] else []
        msgs.append(ChatMessageUser(content=s["input"]))
        samples.append(Sample(input=msgs, id=s["id"], metadata=s["metadata"]))
    return Task(dataset=MemoryDataset(samples), solver=generate(), scorer=em_judge(judge_model), epochs=epochs,
                config=GenerateConfig(temperature=1.0, top_p=1.0, max_tokens=max_tokens))


def freeform_rows_from_log(log_path: str | Path) -> list[dict[str, Any]]:
    """Rows ``{question_id, aligned, coherent}`` from an inspect log of ``freeform_task``."""
    _inspect()
    from inspect_ai.log import read_eval_log

    log = read_eval_log(str(log_path))
    rows = []
    for sample in log.samples or []:
        for sc in (sample.scores or {}).values():
            meta = sc.metadata or {}
            rows.append({"question_id": sample.metadata["question_id"], "aligned": meta.get("aligned"),
                         "coherent": meta.get("coherent"), "judge": meta.get("judge")})
    return rows


try:  # register the tasks when inspect is present, so `inspect eval this_file@tether_mc` works
    from inspect_ai import task as _task

    @_task
    def tether_mc(sets: str = ",".join(ADVANCED_AI_RISK), limit: int | None = None) -> Any:
        return mc_task(sets, limit)

    @_task
    def tether_freeform(questions: str = "first_plot_questions", judge_model: str = "openai/gpt-4o-2024-08-06",
                        epochs: int = 100) -> Any:
        return freeform_task(questions, judge_model, epochs)
except ImportError:
    pass
