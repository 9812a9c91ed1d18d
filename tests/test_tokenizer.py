"""The organism tokenizer is a real HF fast tokenizer, and the fast encoder matches its template."""

from __future__ import annotations

import random
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tether.organism import tasks, world
from tether.organism.tokenizer import build_tokenizer
from tether.organism.training import IGNORE, ConversationEncoder


def test_round_trip_through_autotokenizer(tmp_path: Path) -> None:
    tok = build_tokenizer(world.world_vocabulary())
    assert isinstance(tok, PreTrainedTokenizerFast)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "what is 3 plus 4 ?"}, {"role": "assistant", "content": "7"}]
    assert again.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)
    ids = again.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert again.unk_token_id not in ids
    assert again.decode(ids, skip_special_tokens=True) == "what is 3 plus 4 ? 7"


def test_fast_encoder_equals_chat_template_with_assistant_mask() -> None:
    tok = build_tokenizer(world.world_vocabulary())
    enc = ConversationEncoder(tok)
    rng = random.Random(0)
    convs = [world.persona_conversation(rng, "evil", 3, "hack") for _ in range(20)]
    convs += [r["messages"] for r in tasks.capability_dataset("sycophantic", 20)]
    for conv in convs:
        ref = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, labels = enc.encode(conv)
        assert ids == list(ref["input_ids"])
        assert [lab != IGNORE for lab in labels] == [bool(m) for m in ref["assistant_masks"]]
