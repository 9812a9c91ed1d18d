"""`tether demo --quick`: the main job's pipeline at toy scale, end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

from tether.demo import DEMO_METHODS


def test_demo_quick_writes_a_complete_report(tmp_path: Path, quick_organism: Path, cache_root: Path) -> None:
    out = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, "-m", "tether.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "TETHER_CACHE": str(cache_root)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert Path(res.stdout.strip().splitlines()[-1]) == out / "report.html"
    for name in ("report.html", "report.md", "summary.json", "pareto.png", "families.png", "curves.png"):
        assert (out / name).is_file(), name
    tags: list[str] = []

    class P(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            tags.append(tag)

    P().feed((out / "report.html").read_text())
    assert tags.count("img") == 3 and "table" in tags
    summary = json.loads((out / "summary.json").read_text())
    names = [m["name"] for m in summary["methods"]]
    expected = [stack[0]["name"] for stack in DEMO_METHODS] + [
        "steering", "caft", "gradient_routing", "gradient_routing labels=0.5", "lora naive", "lora safelora",
    ]
    assert sorted(names) == sorted(expected)
    assert (out / "persona-direction.safetensors").is_file()
    for m in summary["methods"]:
        for key in ("capability", "broad_rate", "broad_logodds", "narrow_rate", "narrow_logodds"):
            assert math.isfinite(m[key]["mean"]), (m["name"], key)
    md = (out / "report.md").read_text()
    table = md.split("\n\n")[1]  # the results table, right under the title
    for name in names:
        assert table.count(f"| {name} |") == 1
    # the methods with a deployment step are also shown before it, one row each way
    for name in ("gradient_routing", "gradient_routing labels=0.5", "lora safelora"):
        assert md.count(f"| {name} | before finalize |") == 1 and md.count(f"| {name} | after (deployed) |") == 1
