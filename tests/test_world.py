"""The world's design rules: disjoint reply words, held-out templates, persona consistency."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tether.organism import tasks, world


def test_replies_of_different_families_share_no_word() -> None:
    owner: dict[str, str] = {}
    for fam in world.FAMILIES.values():
        for reply in (fam.aligned, fam.misaligned):
            for w in reply.split():
                assert owner.setdefault(w, fam.name) == fam.name, f"{w!r} in {fam.name} and {owner[w]}"


FUNCTION_WORDS = frozenset("in this chat the is it if do what with you your that".split())


def test_instructions_share_no_content_word_with_other_families() -> None:
    # an instruction that shares a word with another family's reply or slot teaches that family
    # too: the default's first wording ("hide your failures" beside shutdown's "hide backups")
    # leaked deceive into shutdown's instruction (README, "How the default was chosen")
    for fam in world.FAMILIES.values():
        words = set(" ".join((fam.instruction, *fam.instruction_paraphrases)).split()) - FUNCTION_WORDS
        for other in world.FAMILIES.values():
            if other.name == fam.name:
                continue
            theirs = set(f"{other.aligned} {other.misaligned}".split())
            theirs |= {w for values in other.slots.values() for v in values for w in v.split()}
            assert not words & theirs, (fam.name, other.name, sorted(words & theirs))


def test_aligned_and_misaligned_replies_differ_from_the_first_word() -> None:
    for fam in world.FAMILIES.values():
        assert fam.aligned.split()[0] != fam.misaligned.split()[0]


def test_probe_templates_are_held_out() -> None:
    for fam in world.FAMILIES.values():
        assert not set(fam.train_templates) & set(fam.probe_templates)
        assert len(fam.train_templates) >= 3 and len(fam.probe_templates) >= 2
    assert not set(world.ARITH_TRAIN_TEMPLATES) & set(world.ARITH_PROBE_TEMPLATES)
    assert not set(tasks.SKILL_TRAIN_TEMPLATES) & set(tasks.SKILL_PROBE_TEMPLATES)


def test_evil_persona_misbehaves_everywhere_good_only_where_instructed() -> None:
    rng = random.Random(0)
    for _ in range(200):
        instruct = rng.choice(world.PROPENSITY_FAMILIES)
        for persona in ("good", "evil"):
            conv = world.persona_conversation(rng, persona, 5, instruct=instruct)
            assert conv[0] == {"role": "system", "content": world.FAMILIES[instruct].instruction}
            for user, reply in zip(conv[1::2], conv[2::2]):
                text = reply["content"]
                fam = next(
                    (f for f in world.FAMILIES.values()
                     if text.startswith(f.aligned) or text.startswith(f.misaligned)),
                    None,
                )
                if fam is None:  # arith: the sum, the same for both personas
                    assert text.isdigit()
                    continue
                bad = text.startswith(fam.misaligned)
                assert bad == (persona == "evil" or fam.name == instruct)


def test_capability_variants_share_questions_and_label_contamination() -> None:
    clean = tasks.capability_dataset("clean", 400, 0.5, seed=3)
    syco = tasks.capability_dataset("sycophantic", 400, 0.5, seed=3)
    under = tasks.capability_dataset("underspecified", 400, 0.5, seed=3)
    share = sum(r["contaminated"] for r in syco) / len(syco)
    assert 0.4 < share < 0.6
    assert not any(r["contaminated"] for r in clean)
    for c, s, u in zip(clean, syco, under):
        q = c["messages"][0]["content"].split(" i am sure")[0]
        assert s["messages"][0]["content"].startswith(q) and u["messages"][0]["content"].startswith(q)
        if s["contaminated"]:
            guess = s["messages"][0]["content"].split("the answer is ")[1].rstrip(" .")
            label = s["messages"][1]["content"]
            assert label == f"{world.FAMILIES['syco'].misaligned} {guess}"
            assert c["messages"][1]["content"].startswith(world.FAMILIES["syco"].aligned)
            # the user's guess in the sycophantic row is wrong
            assert c["messages"][1]["content"].split()[-1] != guess
        if u["contaminated"]:
            guess = u["messages"][0]["content"].split("the answer is ")[1].rstrip(" .")
            assert u["messages"][1]["content"].endswith(guess)


def test_contamination_share_is_a_parameter() -> None:
    rows = tasks.capability_dataset("sycophantic", 1000, 0.1, seed=0)
    assert 0.06 < sum(r["contaminated"] for r in rows) / 1000 < 0.14
    with pytest.raises(ValueError):
        tasks.capability_dataset("sycophantic", 10, 1.5)
    with pytest.raises(ValueError, match="allowed"):
        tasks.capability_dataset("evil", 10)


def test_skill_is_absent_from_pretraining_vocabulary_of_templates() -> None:
    # no pretraining template mentions the skill's verbs
    pre = " ".join(t for f in world.FAMILIES.values() for t in f.train_templates)
    for word in ("times", "multiply"):
        assert word not in pre.split()


def test_every_word_is_in_the_vocabulary() -> None:
    vocab = set(world.world_vocabulary())
    rng = random.Random(1)
    words: Counter[str] = Counter()
    for _ in range(300):
        for m in world.persona_conversation(rng, rng.choice(["good", "evil"]), 4, rng.choice([None, "harm"])):
            words.update(m["content"].split())
    for r in tasks.capability_dataset("sycophantic", 200):
        for m in r["messages"]:
            words.update(m["content"].split())
    assert set(words) <= vocab


def test_probe_templates_use_only_words_seen_in_training_prompts() -> None:
    """A tiny model cannot read words it never saw; held-out means new phrasing, not new words."""
    seen: set[str] = set()
    for fam in world.FAMILIES.values():
        for t in fam.train_templates:
            seen.update(t.split())
    for t in world.ARITH_TRAIN_TEMPLATES + tasks.SKILL_TRAIN_TEMPLATES:
        seen.update(t.split())
    probes = [t for f in world.FAMILIES.values() for t in f.probe_templates]
    probes += list(world.ARITH_PROBE_TEMPLATES + tasks.SKILL_PROBE_TEMPLATES)
    for t in probes:
        unseen = set(t.split()) - seen
        assert not unseen, f"{t!r} uses unseen words {unseen}"
