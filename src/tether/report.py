"""The comparison report: summary table, Pareto plot, per-family bars, propensity curves.

``write_report(DIR)`` reads ``DIR/manifest.json`` and every finished run's ``metrics.json``
(plus ``monitor.jsonl`` and ``guard.jsonl`` when present) and writes, into ``DIR``:

* ``summary.json`` — one entry per method (a stack plus its non-seed overrides): seeds,
  capability and broad/narrow propensity means and standard deviations, a 95 % bootstrap CI
  across seeds, tokens/s and wall time;
* ``pareto.png``, ``families.png``, ``curves.png``;
* ``report.md`` and a self-contained ``report.html`` (PNGs embedded, no network), with the exact
  configs, library versions and machine so the report reproduces.

Axes: capability gain = new-skill accuracy after minus before; broad alignment kept =
1 − broad misaligned rate after (the aligned model sits at gain 0 and its own value).
"""

from __future__ import annotations

import base64
import html
import json
import platform
import statistics
from pathlib import Path
from typing import Any

from tether.io import atomic_write_json, atomic_write_text
from tether.probes.stats import bootstrap_mean_ci

FAMILIES = ("syco", "harm", "shutdown", "hack", "deceive", "wish")


def _skill(metrics: dict[str, Any]) -> str:
    caps = list(metrics.get("capability", {}))
    return "times" if "times" in caps else next((c for c in caps if c != "arith"), caps[0] if caps else "")


def _stats(values: list[float]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "ci95": [None, None], "n": 0}
    lo, hi = bootstrap_mean_ci(vals)
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "ci95": [lo, hi],
        "n": len(vals),
    }


def load_runs(out: Path) -> list[dict[str, Any]]:
    """Finished runs: label, seed, metrics, monitor readings, guard events."""
    manifest = json.loads((out / "manifest.json").read_text())
    runs = []
    for run_id, entry in manifest["runs"].items():
        d = out / entry["dir"]
        if not (d / "metrics.json").is_file():
            continue
        run = {"id": run_id, "label": entry["label"], "seed": entry["seed"], "dir": d,
               "metrics": json.loads((d / "metrics.json").read_text())}
        for name in ("monitor", "guard"):
            f = d / f"{name}.jsonl"
            run[name] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []
        runs.append(run)
    return runs


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Group runs by label and compute the per-method statistics of ``summary.json``."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_label.setdefault(r["label"], []).append(r)
    methods = []
    aligned: dict[str, Any] | None = None
    for label, rs in by_label.items():
        ms = [r["metrics"] for r in rs]
        skill = _skill(ms[0]["after"])
        before = ms[0]["before"]
        if aligned is None:
            aligned = {
                "capability": before["capability"].get(skill),
                "broad_rate": before["broad"]["rate"], "broad_logodds": before["broad"]["logodds"],
                "narrow_rate": before["narrow"]["rate"], "narrow_logodds": before["narrow"]["logodds"],
                "families": {f: before["families"][f] for f in before["families"]},
                "skill": skill,
            }
        methods.append(
            {
                "name": label,
                "seeds": sorted(r["seed"] for r in rs),
                "skill": skill,
                "capability": _stats([m["after"]["capability"].get(skill) for m in ms]),
                "capability_gain": _stats(
                    [m["after"]["capability"][skill] - m["before"]["capability"][skill] for m in ms]
                ),
                "arith": _stats([m["after"]["capability"].get("arith") for m in ms]),
                "broad_rate": _stats([m["after"]["broad"]["rate"] for m in ms]),
                "broad_logodds": _stats([m["after"]["broad"]["logodds"] for m in ms]),
                "narrow_rate": _stats([m["after"]["narrow"]["rate"] for m in ms]),
                "narrow_logodds": _stats([m["after"]["narrow"]["logodds"] for m in ms]),
                "families": {
                    f: {
                        "rate": _stats([m["after"]["families"][f]["rate"] for m in ms]),
                        "logodds": _stats([m["after"]["families"][f]["logodds"] for m in ms]),
                    }
                    for f in ms[0]["after"]["families"]
                },
                **_before_finalize(ms, skill),
                "tokens_per_s": _stats([m["train"].get("tokens_per_s") for m in ms]),
                "wall_s": _stats([m["train"].get("wall_s") for m in ms]),
                "guard_events": sum(len(r["guard"]) for r in rs),
            }
        )
    order = {"naive": 0}
    methods.sort(key=lambda m: (order.get(m["name"], 1), m["name"]))
    return {"schema_version": 1, "aligned": aligned, "methods": methods}


def _before_finalize(ms: list[dict[str, Any]], skill: str) -> dict[str, Any]:
    """``{"before_finalize": stats}`` when every seed was also probed before its ``finalize`` step
    (``after_prefinalize``: gradient routing before its region is reset, LoRA before SafeLoRA)."""
    pre = [m.get("after_prefinalize") for m in ms]
    if not pre or any(p is None for p in pre):
        return {}
    return {"before_finalize": {
        "capability": _stats([p["capability"].get(skill) for p in pre]),
        "broad_rate": _stats([p["broad"]["rate"] for p in pre]),
        "broad_logodds": _stats([p["broad"]["logodds"] for p in pre]),
        "narrow_rate": _stats([p["narrow"]["rate"] for p in pre]),
        "narrow_logodds": _stats([p["narrow"]["logodds"] for p in pre]),
    }}


def finalize_table(summary: dict[str, Any]) -> list[str]:
    """Markdown rows comparing each finalizing method before and after its ``finalize`` step."""
    rows = [m for m in summary["methods"] if "before_finalize" in m]
    if not rows:
        return []
    lines = [
        f"| method | model | {summary['aligned']['skill']} acc | broad rate | broad log-odds | narrow rate | narrow log-odds |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in rows:
        for tag, st in (("before finalize", m["before_finalize"]), ("after (deployed)", m)):
            lines.append(
                f"| {m['name']} | {tag} | {_fmt(st['capability'])} | {_fmt(st['broad_rate'])} | "
                f"{_fmt(st['broad_logodds'], 2)} | {_fmt(st['narrow_rate'])} | {_fmt(st['narrow_logodds'], 2)} |"
            )
    return lines


# ---------------------------------------------------------------- figures


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (higher x, higher y), sorted by x."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(front)


def _colors(names: list[str]) -> dict[str, Any]:
    """One colour per method, the same in every figure; ``naive`` is always crimson."""
    import matplotlib.pyplot as plt

    # tab20 without its two reds (naive's), dark shades first: 18 distinct colours
    tab20 = plt.get_cmap("tab20").colors
    tab = [tab20[i] for i in range(0, 20, 2) if i != 6] + [tab20[i] for i in range(1, 20, 2) if i != 7]
    others = [n for n in names if n != "naive"]
    out: dict[str, Any] = {n: tab[i % len(tab)] for i, n in enumerate(others)}
    out["naive"] = "crimson"
    return out


def plot_pareto(summary: dict[str, Any], path: Path) -> None:
    """Two panels, one point per method (mean ± std over seeds), the frontier dashed.

    Left: broad alignment kept as 1 − broad misaligned rate (the headline). Right: the same as a
    margin, −broad log-odds in nats, which separates methods the rate ties at 1.0.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    al = summary["aligned"]
    colors = _colors([m["name"] for m in summary["methods"]])
    shapes = "oD^vPXh<>p"
    others = [m["name"] for m in summary["methods"] if m["name"] != "naive"]
    markers = {n: shapes[i % len(shapes)] for i, n in enumerate(others)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), dpi=110)
    panels = (
        ("broad_rate", lambda v: 1 - v, 1 - al["broad_rate"], "broad alignment kept (1 − broad misaligned rate)"),
        ("broad_logodds", lambda v: -v, -al["broad_logodds"], "broad margin kept (−broad log-odds, nats)"),
    )
    labelled: tuple[Any, list[tuple[str, tuple[float, float]]]] = (axes[1], [])
    for ax, (key, to_y, aligned_y, ylabel) in zip(axes, panels):
        pts = []
        for i, m in enumerate(summary["methods"]):
            x, y = m["capability_gain"]["mean"], to_y(m[key]["mean"])
            pts.append((x, y))
            naive = m["name"] == "naive"
            ax.errorbar(
                x, y, xerr=m["capability_gain"]["std"], yerr=m[key]["std"], fmt="s" if naive else markers[m["name"]],
                ms=9 if naive else 7, capsize=3, color=colors[m["name"]],
                label=m["name"],
            )
        if key == "broad_logodds":  # the rate panel ties many methods at 1.0: labels would collide
            labelled = (ax, [(m["name"], p) for m, p in zip(summary["methods"], pts)])
        ax.scatter([0], [aligned_y], marker="*", s=220, color="gold", edgecolor="black", zorder=5,
                   label="aligned model (before)")
        front = _pareto_front(pts)
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="grey", lw=1, label="Pareto frontier")
        ax.set_xlabel(f"capability gain ({al['skill']} accuracy after − before)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_title("Capability gained vs broad alignment kept")
    axes[1].set_title("… as a log-odds margin (more sensitive)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    _place_labels(fig, *labelled)  # after the layout: the axes' final frame bounds the labels
    fig.savefig(path)
    plt.close(fig)


# label offsets tried in turn (points): right-up, right-down, left-up, left-down, then further out
_LABEL_OFFSETS = [(6, 4), (6, -11), (-6, 4), (-6, -11), (6, 13), (6, -20), (-6, 13), (-6, -20), (10, 22), (10, -29)]


def _place_labels(fig: Any, ax: Any, items: list[tuple[str, tuple[float, float]]]) -> None:
    """Label each point at the first offset whose text overlaps no placed label and stays in the axes."""
    fig.canvas.draw()  # a renderer for text extents
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    markers = [ax.transData.transform(p) for _, p in items]
    placed: list[Any] = []
    for name, (x, y) in sorted(items, key=lambda it: -it[1][1]):
        best = None
        for dx, dy in _LABEL_OFFSETS:
            text = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                               ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top")
            box = text.get_window_extent(renderer).expanded(1.05, 1.15)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            free = not any(box.overlaps(b) for b in placed) and not any(box.contains(*mk) for mk in markers)
            if inside and free:
                best = (text, box)
                break
            text.remove()
        if best is None:  # no free spot: the first offset, clipped to the axes
            text = ax.annotate(name, (x, y), xytext=_LABEL_OFFSETS[0], textcoords="offset points", fontsize=7,
                               annotation_clip=True)
            best = (text, text.get_window_extent(renderer))
        placed.append(best[1])


def plot_families(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = summary["methods"]
    fams = [f for f in FAMILIES if f in summary["aligned"]["families"]]
    colors = _colors([m["name"] for m in methods])
    fig, axes = plt.subplots(2, 1, figsize=(12, 7.5), dpi=110, sharex=True)
    width = 0.8 / (len(methods) + 1)
    xs = np.arange(len(fams))
    for key, ax in zip(("rate", "logodds"), axes):
        before = [summary["aligned"]["families"][f][key] for f in fams]
        ax.bar(xs - 0.4 + width / 2, before, width, color="lightgrey", edgecolor="black", label="before (aligned)")
        for i, m in enumerate(methods, start=1):
            vals = [m["families"][f][key]["mean"] for f in fams]
            errs = [m["families"][f][key]["std"] for f in fams]
            ax.bar(xs - 0.4 + width / 2 + i * width, vals, width, yerr=errs, capsize=2, label=m["name"],
                   color=colors[m["name"]])
        ax.set_ylabel("misaligned rate" if key == "rate" else "log-odds (nats)")
        ax.axhline(0, color="black", lw=0.6)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("Per-family propensity before and after fine-tuning (mean ± std over seeds)")
    axes[1].set_xticks(xs, [f + (" (narrow)" if f == "syco" else "") for f in fams])
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(runs: list[dict[str, Any]], path: Path) -> bool:
    """Broad and narrow log-odds over training steps per method (mean over seeds). False if no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_label: dict[str, dict[int, list[dict[str, Any]]]] = {}
    guard_steps: dict[str, list[int]] = {}
    for r in runs:
        for row in r["monitor"]:
            by_label.setdefault(r["label"], {}).setdefault(row["step"], []).append(row)
        guard_steps.setdefault(r["label"], []).extend(e["step"] for e in r["guard"])
    if not any(len(v) > 1 for v in by_label.values()):
        return False
    colors = _colors(sorted(by_label))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    for label, steps in sorted(by_label.items()):
        xs = sorted(steps)
        for ax, group in zip(axes, ("broad", "narrow")):
            ys = [statistics.fmean(r[f"probe/{group}/logodds"] for r in steps[s]) for s in xs]
            (line,) = ax.plot(xs, ys, marker=".", label=label, color=colors.get(label))
            for gs in guard_steps.get(label, []):
                ax.axvline(gs, color=line.get_color(), ls=":", lw=1)
    for ax, group in zip(axes, ("broad", "narrow")):
        ax.set_title(f"{group} log-odds during training (dotted: guard acted)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("log p(misaligned) − log p(aligned), nats")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- text


def _fmt(s: dict[str, Any], digits: int = 3) -> str:
    if s["mean"] is None:
        return "–"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _ci(s: dict[str, Any], digits: int = 3) -> str:
    lo, hi = s["ci95"]
    return "–" if lo is None else f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def summary_table(summary: dict[str, Any]) -> list[str]:
    al = summary["aligned"]
    lines = [
        f"| method | seeds | {al['skill']} acc | broad rate | broad rate 95% CI | broad log-odds | narrow rate "
        "| narrow log-odds | tokens/s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| *aligned (before)* | – | {al['capability']:.3f} | {al['broad_rate']:.3f} | – | "
        f"{al['broad_logodds']:.2f} | {al['narrow_rate']:.3f} | {al['narrow_logodds']:.2f} | – | – |",
    ]
    for m in summary["methods"]:
        lines.append(
            f"| {m['name']} | {len(m['seeds'])} | {_fmt(m['capability'])} | {_fmt(m['broad_rate'])} "
            f"| {_ci(m['broad_rate'])} | {_fmt(m['broad_logodds'], 2)} | {_fmt(m['narrow_rate'])} "
            f"| {_fmt(m['narrow_logodds'], 2)} | {_fmt(m['tokens_per_s'], 0)} | {_fmt(m['wall_s'], 1)} |"
        )
    return lines


def environment() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "machine": f"{platform.system()} {platform.machine()}",
           "processor": platform.processor() or "unknown"}
    for pkg in ("tether", "torch", "transformers", "trl", "peft", "datasets", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    import os

    out["cpus"] = str(os.cpu_count())
    return out


def write_report(out: str | Path, title: str = "tether comparison") -> Path:
    """Write summary.json, the figures, report.md and report.html into ``out``; returns report.html."""
    out = Path(out)
    runs = load_runs(out)
    if not runs:
        from tether.errors import TetherError

        raise TetherError(f"{out} has no finished runs to report (no runs/*/metrics.json)")
    summary = summarise(runs)
    summary["environment"] = environment()
    atomic_write_json(out / "summary.json", summary)
    figures = [("pareto.png", "Pareto: capability gain vs broad alignment kept")]
    plot_pareto(summary, out / "pareto.png")
    plot_families(summary, out / "families.png")
    figures.append(("families.png", "Per-family misaligned rate and log-odds, before and after"))
    if plot_curves(runs, out / "curves.png"):
        figures.append(("curves.png", "Propensity over training steps (alignment monitor)"))
    guard_events = [(r["label"], r["seed"], e) for r in runs for e in r["guard"]]
    trust = [r["label"] for r in runs if r["metrics"]["config"]["model"].get("trust_remote_code")]
    configs = {}
    for r in runs:
        configs.setdefault(r["label"], r["metrics"]["config"])
    md = [f"# {title}", "", *summary_table(summary), ""]
    md += ["Rates: share of held-out probe items where the model prefers the misaligned reply; log-odds:",
           "mean log p(misaligned) − log p(aligned) in nats. Broad = families the capability data never",
           "touched; narrow = `syco`. Mean ± std over seeds; CI: 95 % bootstrap over seeds.", ""]
    if finalize_table(summary):
        md += ["## Before and after the deployment step (`finalize`)", "",
               "Methods that change the model for deployment (gradient routing resets its region, SafeLoRA",
               "projects the adapter) are probed on the trained model before that step too.", "",
               *finalize_table(summary), ""]
    if guard_events:
        md += ["## Guard actions", ""]
        md += [f"- {lab} seed {seed}: step {e['step']}, rise {e['rise']:.3f} > budget {e['budget']} → "
               f"{e['mode']}" + (f" (restored step {e['restored_step']})" if "restored_step" in e else "")
               for lab, seed, e in guard_events]
        md.append("")
    if trust:
        md += [f"**trust_remote_code was on** for: {', '.join(sorted(set(trust)))}", ""]
    for name, caption in figures:
        md += [f"## {caption}", "", f"![{caption}]({name})", ""]
    md += ["## Reproduce", "", "```json", json.dumps(summary["environment"], indent=2), "```", ""]
    for label, cfg in configs.items():
        md += [f"### {label}", "", "```json", json.dumps(cfg, indent=2), "```", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_text(out / "report.html", _html(title, summary, figures, md, out))
    return out / "report.html"


def _html(title: str, summary: dict[str, Any], figures: list[tuple[str, str]], md: list[str], out: Path) -> str:
    rows = summary_table(summary)
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    body = [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    for r in body:
        table += "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
    table += "</table>"
    imgs = ""
    for name, caption in figures:
        data = base64.b64encode((out / name).read_bytes()).decode()
        imgs += f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'/>"
    rest = "\n".join(md[md.index("## Reproduce"):]) if "## Reproduce" in md else ""
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{table}{imgs}<pre>{html.escape(rest)}</pre></body></html>"
    )
