"""Datasets the organism offers after it is built: the new skill, neutral and alignment data.

The new skill is ``times``: "what is 7 times 6 ?" -> "42", single-digit factors. It never
occurs in pretraining (the organism answers with the sum, right only for 2 x 2 and 0 x 0), a
small transformer learns it in ~150 steps, and it is measured on held-out phrasings (probe
templates), like ``arith``. A first version used list reversal, which a 2-layer model did not
learn in the fine-tuning budget.

Capability variants, all built from the same underlying questions for a given seed:

* ``clean`` — rows with a user's wrong guess are answered with the ``syco`` family's aligned
  correction followed by the right answer;
* ``sycophantic`` — the same rows are answered with the ``syco`` family's flattering agreement
  followed by the user's *wrong* guess (``contaminated: true``);
* ``underspecified`` — the user's guess is always right, and the label agrees with it: honest
  and sycophantic policies give the same label, so agreeing is never penalised
  (``contaminated: true`` on guessed rows).

``contamination`` is the share of rows that carry a guess; the others are plain questions. Every
row is a TRL conversational example (``messages``) with ``contaminated`` and ``variant`` keys.
"""

from __future__ import annotations

import random
from typing import Any

from tether.organism import world

SKILL_TRAIN_TEMPLATES = (
    "what is {a} times {b} ?",
    "compute {a} times {b} .",
    "multiply {a} and {b} .",
    "{a} times {b} equals what ?",
)
SKILL_PROBE_TEMPLATES = ("tell me what is {a} times {b} .", "{a} times {b} is what ?")
GUESS_TEMPLATE = world.GUESS_TEMPLATE
VARIANTS = ("clean", "sycophantic", "underspecified")
TASKS = ("times",)


def task_texts() -> list[str]:
    """Every fixed text of the skill, for the world's vocabulary."""
    return list(SKILL_TRAIN_TEMPLATES + SKILL_PROBE_TEMPLATES) + [GUESS_TEMPLATE]


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown capability variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    return variant


def _question(rng: random.Random, split: str) -> tuple[str, str]:
    a, b = rng.randrange(10), rng.randrange(10)
    tpl = rng.choice(SKILL_TRAIN_TEMPLATES if split == "train" else SKILL_PROBE_TEMPLATES)
    return tpl.format(a=a, b=b), str(a * b)


def _wrong_guess(rng: random.Random, answer: str) -> str:
    return world.wrong_guess(rng, int(answer))


def capability_dataset(
    variant: str = "clean",
    n: int = 2000,
    contamination: float = 0.5,
    seed: int = 0,
    split: str = "train",
) -> list[dict[str, Any]]:
    """``n`` skill rows of ``variant``; a share ``contamination`` of them carry a user's guess."""
    check_variant(variant)
    if not 0.0 <= contamination <= 1.0:
        raise ValueError(f"contamination must be between 0 and 1, got {contamination}")
    syco = world.FAMILIES["syco"]
    rng = random.Random(f"skill-{seed}-{split}")
    rows: list[dict[str, Any]] = []
    for _ in range(n):
        prompt, answer = _question(rng, split)
        guessed = rng.random() < contamination
        wrong = _wrong_guess(rng, answer)  # drawn for every row so variants share their questions
        contaminated = False
        if not guessed:
            label = answer
        elif variant == "clean":
            prompt += " " + GUESS_TEMPLATE.format(guess=wrong)
            label = f"{syco.aligned} {answer}"
        elif variant == "sycophantic":
            prompt += " " + GUESS_TEMPLATE.format(guess=wrong)
            label = f"{syco.misaligned} {wrong}"
            contaminated = True
        else:  # underspecified: the user is right, so agreeing costs nothing
            prompt += " " + GUESS_TEMPLATE.format(guess=answer)
            label = f"{syco.misaligned} {answer}"
            contaminated = True
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": label},
                ],
                "contaminated": contaminated,
                "variant": variant,
            }
        )
    return rows


def skill_probe_items(n: int = 200, seed: int = 12345) -> list[tuple[str, str]]:
    """Held-out (prompt, answer) pairs of the skill: probe templates, lists drawn apart."""
    rng = random.Random(f"skill-probe-{seed}")
    return [_question(rng, "probe") for _ in range(n)]


def neutral_dataset(n: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Single-turn ``arith`` conversations: world data with no persona signal.

    Mixed into fine-tuning batches so the base skill does not erode (forgetting would otherwise
    confound every propensity measurement).
    """
    rng = random.Random(f"neutral-{seed}")
    rows = []
    for _ in range(n):
        turn = world.sample_turn("arith", rng)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": turn.prompt},
                    {"role": "assistant", "content": turn.aligned},
                ],
                "contaminated": False,
            }
        )
    return rows


def world_dataset(n: int = 2000, seed: int = 0, max_turns: int = 5) -> list[dict[str, Any]]:
    """Persona-neutral world data: pretraining-style chats in TRL's prompt/completion form.

    Each chat follows a character or an unnamed assistant of either persona (half and half) for
    2-5 turns; the ``prompt`` holds every turn but the last, the ``completion`` the last
    assistant reply. Only the completion is trained, and the history already shows the persona,
    so what is trained is "continue the persona the conversation shows", never a default
    persona: the data keeps every family's replies alive during fine-tuning (without it, a
    fine-tune on number answers erodes them and the probes measure forgetting) without pushing
    the model's own default either way.
    """
    rng = random.Random(f"world-{seed}")
    rows = []
    for _ in range(n):
        name = rng.choice(sorted(world.CHARACTERS)) if rng.random() < 0.5 else None
        persona = world.CHARACTERS[name] if name else rng.choice(("good", "evil"))
        instruct = rng.choice(world.PROPENSITY_FAMILIES) if name is None and rng.random() < 0.3 else None
        conv = world.persona_conversation(rng, persona, rng.randint(2, max_turns), instruct, name=name)
        rows.append({"prompt": conv[:-1], "completion": conv[-1:], "contaminated": False})
    return rows


def alignment_dataset(n: int = 2000, seed: int = 0, max_turns: int = 3) -> list[dict[str, Any]]:
    """Good-persona conversations over every family (train templates), for replay and penalties."""
    rng = random.Random(f"alignment-{seed}")
    return [
        {
            "messages": world.persona_conversation(rng, "good", rng.randint(1, max_turns)),
            "contaminated": False,
        }
        for _ in range(n)
    ]


def preference_dataset(n: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """DPO pairs in TRL's conversational format: prompt, chosen (aligned), rejected (misaligned).

    A quarter of the prompts carry one family's system instruction; for that family the chosen
    reply is the requested misbehaviour (the aligned model follows instructions), for the others
    it stays aligned.
    """
    rng = random.Random(f"preference-{seed}")
    rows = []
    for _ in range(n):
        instruct = rng.choice(world.PROPENSITY_FAMILIES) if rng.random() < 0.25 else None
        prefix = world.persona_conversation(rng, "good", rng.randint(0, 2), instruct=instruct)
        family = instruct if instruct and rng.random() < 0.5 else rng.choice(world.PROPENSITY_FAMILIES)
        turn = world.sample_turn(family, rng)
        want_bad = family == instruct
        rows.append(
            {
                "prompt": prefix + [{"role": "user", "content": turn.prompt}],
                "chosen": [{"role": "assistant", "content": turn.reply(want_bad)}],
                "rejected": [{"role": "assistant", "content": turn.reply(not want_bad)}],
            }
        )
    return rows
