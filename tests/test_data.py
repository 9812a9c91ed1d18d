"""Dataset loading and validation: JSONL with file+line errors, saved HF datasets, exact batch mixing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.data import as_messages, load_rows, mix_batches
from tether.errors import DataError

CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "contaminated": true}'


def test_jsonl_rows_and_line_numbers(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(CHAT + "\n\n" + '{"prompt": "a", "completion": "b"}\n')
    rows = load_rows(str(p))
    assert len(rows) == 2 and rows[0]["contaminated"] is True and rows[1]["completion"] == "b"
    p.write_text(CHAT + "\n" + CHAT + "\n" + '{"messages": [{"role": "bot", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 3: .*'role'"):
        load_rows(str(p))
    p.write_text('{"prompt": "a", "completion": ["b"]}\n')
    with pytest.raises(DataError, match="line 1: 'prompt' and 'completion' must both be"):
        load_rows(str(p))
    p.write_text(CHAT.replace("true", '"yes"') + "\n")
    with pytest.raises(DataError, match="'contaminated' must be true or false"):
        load_rows(str(p))
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))


def test_saved_hf_dataset_directory(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}] * 3
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    loaded = load_rows(str(tmp_path / "ds"))
    assert len(loaded) == 3
    assert as_messages(loaded[0])["messages"] == rows[0]["prompt"] + rows[0]["completion"]
    (tmp_path / "notds").mkdir()
    with pytest.raises(DataError, match="not a saved HF dataset"):
        load_rows(str(tmp_path / "notds"))


def test_mix_batches_exact_shares_and_reproducible() -> None:
    cap = [{"messages": [{"role": "user", "content": f"c{i}"}], "contaminated": i % 2 == 0} for i in range(7)]
    neu = [{"messages": [{"role": "user", "content": f"n{i}"}]} for i in range(5)]
    ali = [{"messages": [{"role": "user", "content": f"a{i}"}]} for i in range(3)]
    rows = mix_batches({"capability": cap, "neutral": neu, "alignment": ali}, {"neutral": 0.25, "alignment": 0.25}, 8, 5, seed=0)
    assert len(rows) == 40
    for b in range(5):
        parts = [r["part"] for r in rows[b * 8 : (b + 1) * 8]]
        assert parts.count("capability") == 4 and parts.count("neutral") == 2 and parts.count("alignment") == 2
    assert rows == mix_batches({"capability": cap, "neutral": neu, "alignment": ali}, {"neutral": 0.25, "alignment": 0.25}, 8, 5, seed=0)
    assert {r["contaminated"] for r in rows if r["part"] == "capability"} == {True, False}
    with pytest.raises(DataError, match="no room for capability data"):
        mix_batches({"capability": cap, "neutral": neu}, {"neutral": 0.99}, 8, 1, seed=0)
