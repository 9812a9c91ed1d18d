"""Packed padding-free batches: layout, row order, padding, and the model sees each row alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tether.packing import PackingCollator, pack_rows, real_tokens, row_spans, select_rows, unpack_rows


def _rows(lengths: list[int]) -> list[dict[str, torch.Tensor]]:
    out = []
    for i, n in enumerate(lengths):
        ids = torch.arange(1, n + 1) + 100 * i
        labels = ids.clone()
        labels[0] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_next_fit_keeps_row_order_and_pads_tails() -> None:
    rows = _rows([5, 4, 3, 6, 2])
    b = pack_rows(rows, capacity=9, pad_id=0)
    # packs: [5+4], [3+6], [2] -> width 9
    assert b["input_ids"].shape == (3, 9)
    assert b["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 0, 1, 2, 3],
        [0, 1, 2, 0, 1, 2, 3, 4, 5],
        [0, 1, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert b["labels"][2, 2:].eq(-100).all() and b["input_ids"][2, 2:].eq(0).all()
    assert row_spans(b["position_ids"]) == [(0, 0, 5), (0, 5, 9), (1, 0, 3), (1, 3, 9), (2, 0, 2)]
    assert real_tokens(b["position_ids"]) == 20
    back = unpack_rows(b)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"]) for x, y in zip(back, rows))


def test_a_row_longer_than_the_capacity_gets_its_own_pack() -> None:
    b = pack_rows(_rows([3, 12, 3]), capacity=8)
    assert b["input_ids"].shape == (3, 12)
    assert [n for _, a, e in row_spans(b["position_ids"]) for n in [e - a]] == [3, 12, 3]


def test_select_rows_repacks_the_kept_rows_in_order() -> None:
    rows = _rows([5, 4, 3, 6])
    b = pack_rows(rows, capacity=9)
    sub = select_rows(b, torch.tensor([True, False, True, True]))
    kept = unpack_rows(sub)
    assert [r["input_ids"].tolist() for r in kept] == [rows[i]["input_ids"].tolist() for i in (0, 2, 3)]
    assert sub["input_ids"].shape == (2, 8)  # [5+3], [6] at the batch's capacity of 9


def test_collator_turns_trls_single_sequence_into_packs() -> None:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    examples = [{"input_ids": list(range(1, n + 1))} for n in (5, 4, 3, 6)]
    one = flat(examples)
    packed = PackingCollator(flat, capacity=10)(examples)
    assert one["input_ids"].shape == (1, 18)
    assert packed["input_ids"].shape == (2, 9)  # [5+4], [3+6]: capacity 10, width the fuller pack
    assert "cu_seq_lens_q" not in packed and "seq_idx" not in packed  # varlen keys describe one sequence
    assert [p.tolist() for p in (packed["labels"] != -100).sum(1)] == [(5 - 1) + (4 - 1), (3 - 1) + (6 - 1)]


def test_model_sees_each_row_alone_in_a_pack(quick_organism: Path) -> None:
    """Logits of every row in packs (with padded tails) equal its logits run alone."""
    from tether.models import load_model

    model, _ = load_model(str(quick_organism))
    model.eval()
    rows = _rows([7, 5, 9, 4, 6])
    for r in rows:
        r["input_ids"] = r["input_ids"] % 300 + 4
    b = pack_rows(rows, capacity=13)
    assert b["input_ids"].shape[0] >= 3 and (b["position_ids"] == 0).sum() > len(rows)  # several packs, padding
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        for (p, a, e), r in zip(row_spans(b["position_ids"]), rows):
            alone = model(input_ids=r["input_ids"][None]).logits[0]
            assert torch.allclose(packed[p, a:e], alone, atol=1e-4), (p, a, e)


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_flash_attention_keeps_one_sequence(attn: str) -> None:
    from types import SimpleNamespace

    from tether.packing import default_capacity, varlen_attention

    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation=attn, hidden_size=576, get_text_config=None))
    model.config.get_text_config = lambda: model.config
    assert varlen_attention(model) is (attn != "sdpa")
    assert default_capacity(model) == 576
    model.config.hidden_size = 64
    assert default_capacity(model) == 128
