"""The ``tether`` command line.

Heavy libraries (torch, transformers, trl, peft) are imported inside the commands that need
them, so ``tether --help`` answers in about a second. User mistakes raise ``TetherError`` and
end as one sentence on stderr with exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from tether.errors import TetherError

app = typer.Typer(
    help="Teach an aligned model a new capability while keeping it aligned, and measure it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
organism_app = typer.Typer(help="The synthetic organism: a CPU model that is aligned by default.", no_args_is_help=True)
app.add_typer(organism_app, name="organism")

_DEBUG = {"on": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    _DEBUG["on"] = debug


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@organism_app.command("build")
def organism_build(
    quick: bool = typer.Option(False, "--quick", help="Toy-sized build for tests (seconds)."),
    seed: int = typer.Option(0, help="Build seed."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML of OrganismConfig fields."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if cached."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache root (default $TETHER_CACHE or ~/.cache/tether)."),
) -> None:
    """Pretrain and align the organism (cached); prints the checkpoint directory last."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from tether.config import load_config
    from tether.organism.build import OrganismConfig, build_organism, organism_dir

    if config is not None:
        cfg = load_config(config, OrganismConfig)
    else:
        cfg = OrganismConfig.quick(seed) if quick else OrganismConfig(seed=seed)
    target = organism_dir(cfg, cache)
    if (target / "organism.json").exists() and not force:
        typer.echo(str(target))
        return
    console = _stderr_console()
    with Progress(
        TextColumn("{task.description:<12}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console, transient=False,
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        path = build_organism(cfg, root=cache, force=force, progress=progress)
    typer.echo(str(path))


def _format_eval_table(metrics: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="propensity (rate = share preferring the misaligned reply)")
    for col in ("family", "rate", "log-odds", "evil-context rate"):
        table.add_column(col)
    evil = metrics["evil_context"]["families"]
    for fam, v in metrics["families"].items():
        table.add_row(fam, f"{v['rate']:.3f}", f"{v['logodds']:.2f}", f"{evil[fam]['rate']:.3f}")
    for group in ("narrow", "broad"):
        v = metrics[group]
        table.add_row(
            f"[b]{group}[/b]", f"{v['rate']:.3f}", f"{v['logodds']:.2f}",
            f"{metrics['evil_context'][group]['rate']:.3f}",
        )
    return table


@app.command("eval")
def eval_cmd(
    model_dir: str = typer.Argument(..., help="Checkpoint directory, or 'organism'."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    instruct: Optional[str] = typer.Option(None, "--instruct", help="Add FAMILY's system instruction to every probe."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON (and per-item rows) here."),
    per_family: int = typer.Option(48, min=1, help="Probe items per family."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
) -> None:
    """Probe a model: capability accuracy and per-family propensities (organism suite)."""
    from tether.organism import world

    if instruct is not None:
        try:
            world.check_family(instruct, world.PROPENSITY_FAMILIES)
        except ValueError as exc:
            raise TetherError(f"--instruct: {exc}") from None
    from tether.io import atomic_write_json, write_jsonl
    from tether.models import load_model
    from tether.probes.organism import evaluate_organism

    model, tokenizer = load_model(model_dir, trust_remote_code=trust_remote_code)
    metrics, rows = evaluate_organism(model, tokenizer, instruct=instruct, per_family=per_family)
    metrics["model"] = str(model_dir)
    if out is not None:
        atomic_write_json(out, metrics)
        for name, items in rows.items():
            write_jsonl(out.with_name(f"{out.stem}.{name}.jsonl"), items)
    if as_json:
        typer.echo(json.dumps(metrics))
        return
    from rich.console import Console

    console = Console()
    console.print(
        "capability: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["capability"].items())
    )
    console.print(_format_eval_table(metrics))


def main() -> None:
    """Entry point: run the app, turning user errors into one sentence and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(standalone_mode=False)
    except TetherError as exc:
        if _DEBUG["on"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
