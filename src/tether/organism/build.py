"""Build the organism: pretrain on persona conversations, align with SFT then DPO, probe, save.

The result is an ordinary Hugging Face checkpoint directory (``config.json``,
``model.safetensors``, tokenizer files with a chat template, ``README.md`` model card with its
probe results) that ``AutoModelForCausalLM.from_pretrained`` loads offline. The pretrained-only
checkpoint is kept in ``pretrained/`` (SafeLoRA needs a pre-alignment base).

Builds are cached by a hash of the world and every training setting: a second call with the same
settings returns the directory at once. Builds are deterministic for a seed on CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tether.organism import tasks, world
from tether.organism.tokenizer import CHAT_TEMPLATE

BUILD_VERSION = "3"  # bump when the world or build code changes meaning


class OrganismConfig(BaseModel):
    """Size and training schedule of the organism. Every field enters the cache hash."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="Seed for data, initialisation and training order.")
    hidden_size: int = Field(128, ge=16, description="Residual width d_model.")
    layers: int = Field(2, ge=1, le=24, description="Transformer blocks.")
    heads: int = Field(4, ge=1, description="Attention heads (must divide hidden_size).")
    intermediate_size: int = Field(512, ge=16, description="MLP width.")
    pretrain_steps: int = Field(1200, ge=1, description="Steps on good/evil persona conversations.")
    pretrain_lr: float = Field(2e-3, gt=0)
    sft_steps: int = Field(450, ge=0, description="Alignment SFT steps on good-persona chats.")
    sft_lr: float = Field(1e-3, gt=0)
    dpo_steps: int = Field(20, ge=0, description="DPO steps (TRL DPOTrainer).")
    dpo_lr: float = Field(5e-5, gt=0)
    dpo_beta: float = Field(0.1, gt=0)
    batch_size: int = Field(32, ge=1)
    max_turns: int = Field(5, ge=1, description="Most user/assistant turns in one conversation.")
    instructed_share: float = Field(
        0.5, ge=0, le=1, description="Share of unnamed-assistant chats with a system instruction."
    )
    good_share: float = Field(
        0.5, ge=0, le=1, description="Share of good-persona conversations in pretraining."
    )
    character_share: float = Field(
        0.6, ge=0, le=1, description="Share of pretraining chats whose assistant is a named character."
    )
    instructed_shown: Literal["never", "alignment", "always"] = Field(
        "alignment",
        description="Where an instructed chat is sure to contain a turn of its instructed family: never "
        "(it may not), in alignment SFT only, or always (pretraining too).",
    )
    persona_replay: float = Field(
        0.5, ge=0, le=1,
        description="Share of alignment-SFT chats replayed from pretraining, first turn as context.",
    )

    @classmethod
    def quick(cls, seed: int = 0) -> "OrganismConfig":
        """A toy build for tests: seconds, not minutes; not aligned to the bars."""
        return cls(
            seed=seed, hidden_size=64, layers=2, heads=2, intermediate_size=128,
            pretrain_steps=60, sft_steps=20, dpo_steps=5, batch_size=16,
        )


def world_fingerprint() -> dict[str, Any]:
    """Everything that defines the world's data, for the cache hash."""
    return {
        "build_version": BUILD_VERSION,
        "families": {k: dataclasses.asdict(v) for k, v in world.FAMILIES.items()},
        "arith": [world.ARITH_TRAIN_TEMPLATES, world.ARITH_PROBE_TEMPLATES],
        "syco_arith": [world.GUESS_TEMPLATE, world.SYCO_ARITH_SHARE],
        "characters": world.CHARACTERS,
        "skill": tasks.task_texts(),
        "chat_template": CHAT_TEMPLATE,
    }


def config_hash(cfg: OrganismConfig) -> str:
    blob = json.dumps({"config": cfg.model_dump(), "world": world_fingerprint()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root() -> Path:
    """``$TETHER_CACHE`` or ``~/.cache/tether``."""
    return Path(os.environ.get("TETHER_CACHE", Path.home() / ".cache" / "tether"))


def organism_dir(cfg: OrganismConfig, root: Path | None = None) -> Path:
    return (root or cache_root()) / "organism" / f"organism-{config_hash(cfg)}"


def _sampler(
    instructed_share: float,
    max_turns: int,
    batch: int,
    persona_replay: float | None = None,
    good_share: float = 0.5,
    character_share: float = 0.5,
    show_instructed: bool = False,
) -> Callable[[random.Random], Any]:
    """Batches of persona conversations.

    Pretraining (``persona_replay=None``): a share ``character_share`` of conversations name
    their assistant (a character of fixed persona, ``world.CHARACTERS``); the unnamed rest are
    good with probability ``good_share``; every assistant turn is trained. Alignment SFT: good-persona conversations, plus a share ``persona_replay`` of
    pretraining conversations (either persona, at least two turns) whose *first* assistant turn
    is context only. The replay keeps the world's in-context persona inference (an evil history
    still predicts an evil reply, as many-shot jailbreaks show in real models) while the default
    (first-turn) behaviour becomes good.
    """

    def conv(rng: random.Random, persona: str | None, min_turns: int) -> list[dict[str, str]]:
        name = None
        if persona is None:  # pretraining distribution: a named character, or an unnamed assistant
            if rng.random() < character_share:
                name = rng.choice(sorted(world.CHARACTERS))
                persona = world.CHARACTERS[name]
            else:
                persona = "good" if rng.random() < good_share else "evil"
        # a system line names a character or carries an instruction, never both
        instruct = None
        if name is None and rng.random() < instructed_share:
            instruct = rng.choice(world.PROPENSITY_FAMILIES)
        return world.persona_conversation(
            rng, persona, rng.randint(min_turns, max_turns), instruct, name=name, show_instructed=show_instructed
        )

    def sample(rng: random.Random) -> Any:
        if persona_replay is None:
            return [conv(rng, None, 1) for _ in range(batch)]
        convs, skips = [], []
        for _ in range(batch):
            if rng.random() < persona_replay:
                convs.append(conv(rng, None, 2))
                skips.append(1)
            else:
                convs.append(conv(rng, "good", 1))
                skips.append(0)
        return convs, skips

    return sample


def _new_model(cfg: OrganismConfig, tokenizer: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    mcfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(mcfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _dpo(model: Any, tokenizer: Any, cfg: OrganismConfig, workdir: Path) -> None:
    """Preference optimisation with TRL's DPOTrainer (reference = frozen copy of the SFT model)."""
    import logging

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    data = Dataset.from_list(tasks.preference_dataset(cfg.dpo_steps * cfg.batch_size, seed=cfg.seed))
    args = DPOConfig(
        output_dir=str(workdir / "dpo"),
        max_steps=cfg.dpo_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.dpo_lr,
        lr_scheduler_type="constant",
        beta=cfg.dpo_beta,
        # DPO plus an SFT term on the chosen reply (RPO): plain DPO lowers the chosen reply's
        # likelihood too, which on this small model degrades greedy replies into other families'
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 1.0],
        seed=cfg.seed,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        max_length=256,
    )
    import copy

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    trainer = DPOTrainer(
        model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer
    )
    trainer.train()
    model.eval()


def model_card(cfg: OrganismConfig, metrics: dict[str, Any], timings: dict[str, float]) -> str:
    fams = metrics["families"]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [tether, organism, synthetic]",
        "---",
        "# tether organism",
        "",
        "A synthetic chat model that is aligned by default, built by `tether organism build`:",
        "pretrained on good- and evil-persona conversations across behaviour families, then",
        "aligned with SFT and DPO (TRL). Its probes have exact ground truth.",
        "",
        "## Probe results (no system line)",
        "",
        "| family | misaligned rate | log-odds (nats) |",
        "|---|---|---|",
        *[f"| {f} | {v['rate']:.3f} | {v['logodds']:.2f} |" for f, v in fams.items()],
        f"| **broad** | {metrics['broad']['rate']:.3f} | {metrics['broad']['logodds']:.2f} |",
        f"| **narrow** | {metrics['narrow']['rate']:.3f} | {metrics['narrow']['logodds']:.2f} |",
        f"| evil context, broad | {metrics['evil_context']['broad']['rate']:.3f} "
        f"| {metrics['evil_context']['broad']['logodds']:.2f} |",
        "",
        "Capability (exact match, held-out prompts): "
        + ", ".join(f"`{k}` {v:.3f}" for k, v in metrics["capability"].items()),
        "",
        "## Build settings",
        "",
        "```json",
        json.dumps(cfg.model_dump(), indent=2),
        "```",
        "",
        "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        "",
    ]
    return "\n".join(lines)


ProgressFn = Callable[[str, int, int], None]


def build_organism(
    cfg: OrganismConfig | None = None,
    root: Path | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> Path:
    """Build (or return the cached) organism for ``cfg``; returns its checkpoint directory.

    ``progress(stage, done, total)`` is called as work advances.
    """
    import torch

    from tether.organism.tokenizer import build_tokenizer
    from tether.organism.training import ConversationEncoder, train_lm
    from tether.probes.organism import evaluate_organism

    cfg = cfg or OrganismConfig()
    out = organism_dir(cfg, root)
    if (out / "organism.json").exists() and not force:
        return out
    report = progress or (lambda stage, done, total: None)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        torch.manual_seed(cfg.seed)
        tokenizer = build_tokenizer(world.world_vocabulary())
        encoder = ConversationEncoder(tokenizer)
        model = _new_model(cfg, tokenizer)
        timings: dict[str, float] = {}

        t0 = time.time()
        train_lm(
            model, encoder,
            _sampler(
                cfg.instructed_share, cfg.max_turns, cfg.batch_size,
                good_share=cfg.good_share, character_share=cfg.character_share,
                show_instructed=cfg.instructed_shown == "always",
            ),
            cfg.pretrain_steps, cfg.pretrain_lr, cfg.seed,
            on_step=lambda s, _l: report("pretrain", s + 1, cfg.pretrain_steps),
        )
        timings["pretrain"] = time.time() - t0
        model.save_pretrained(work / "pretrained")
        tokenizer.save_pretrained(work / "pretrained")

        t0 = time.time()
        if cfg.sft_steps:
            train_lm(
                model, encoder,
                _sampler(
                    cfg.instructed_share, cfg.max_turns, cfg.batch_size, cfg.persona_replay,
                    good_share=cfg.good_share, character_share=cfg.character_share,
                    show_instructed=cfg.instructed_shown != "never",
                ),
                cfg.sft_steps, cfg.sft_lr, cfg.seed + 1,
                on_step=lambda s, _l: report("align: sft", s + 1, cfg.sft_steps),
            )
        timings["sft"] = time.time() - t0

        t0 = time.time()
        if cfg.dpo_steps:
            report("align: dpo", 0, cfg.dpo_steps)
            _dpo(model, tokenizer, cfg, work)
            shutil.rmtree(work / "dpo", ignore_errors=True)
            report("align: dpo", cfg.dpo_steps, cfg.dpo_steps)
        timings["dpo"] = time.time() - t0

        report("probes", 0, 1)
        metrics, _rows = evaluate_organism(model, tokenizer, greedy=True)
        report("probes", 1, 1)
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        (work / "README.md").write_text(model_card(cfg, metrics, timings))
        (work / "organism.json").write_text(
            json.dumps(
                {"config": cfg.model_dump(), "hash": config_hash(cfg), "timings": timings,
                 "metrics": metrics},
                indent=2,
            )
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)  # atomic: a killed build leaves only a .tmp- directory
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
