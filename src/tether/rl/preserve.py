"""RL-side adapters: what each preservation method does in a GRPO run, through the same method objects.

==================  ==============================================================================
``naive``           nothing: GRPO on the task reward
``kl``              TRL's own β term (``GRPOConfig.beta = β``; reference = adapter-disabled model for
                    LoRA, a frozen copy otherwise): β·KL(π_θ ‖ π_ref) by the k3 estimator on the
                    rollout tokens (Shao et al. 2024). Not re-implemented here.
``inoculation``     the method's ``prepare_data`` rewrites the RL prompts, so every rollout is sampled
                    under the system line that allows the behaviour (MacDiarmid et al. 2025,
                    "Natural emergent misalignment from reward hacking"); evaluation prompts never
                    carry it
``constraint``      Safe RLHF's Lagrangian on a per-rollout cost c ∈ [0, 1] (``rl_cost``, default
                    ``guess_echo``: a cheap cost model that flags a reply repeating the user's
                    number, blind to the product): the reward becomes r − λc through an extra
                    reward function; after every optimiser step λ ← max(0, λ + η(c̄ − d)), d = ε
``gradient_routing`` rollouts the true grader flags as hacks update only the method's region
                    (its own region selection, ``methods/routing.py``, ``form: mask``); the others
                    update everything outside it; ``finalize`` ablates the region
==================  ==============================================================================

Other methods are refused in GRPO runs until they have an RL form here. None of these forms reads
the alignment dataset (``kl`` and ``constraint`` need one in SFT runs only).

Under data parallelism (``accelerate launch``) every rank samples and scores its own rollouts;
the constraint's step mean of the cost is taken over every rank's rollouts (one all-reduce of the
sum and the count), so λ is the same number on every rank, as the SFT form's violation is; the
routing's "does this micro-batch have hack rows" is decided across ranks, so every rank runs the
same forward passes (DDP's buffer broadcast and TRL's gathers stay in step) and a rank without
flagged rows takes part in the routed pass with zero advantages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tether.errors import ConfigError
from tether.methods.base import Method

if TYPE_CHECKING:
    import torch

RL_METHODS = ("naive", "kl", "inoculation", "constraint", "gradient_routing")


def check_rl_stack(methods: list[Method], source: str) -> None:
    """Refuse methods that have no GRPO form yet, and GRPO-incompatible settings, in one sentence."""
    for i, m in enumerate(methods):
        if m.name not in RL_METHODS:
            raise ConfigError(
                f"{source}: methods[{i}]: '{m.name}' has no GRPO form in tether yet; GRPO runs take {', '.join(RL_METHODS)}"
            )
        if m.name == "kl":
            try:
                m.grpo_beta()  # type: ignore[attr-defined]
            except ValueError as exc:
                raise ConfigError(f"{source}: methods[{i}]: {exc}") from None
        if m.name == "gradient_routing" and getattr(m.config, "form", "mask") != "mask":
            raise ConfigError(f"{source}: methods[{i}]: gradient_routing in a grpo run supports only form: mask")


def grpo_beta(methods: list[Method]) -> float:
    """β of TRL's KL term: the ``kl`` method's, else 0 (no reference model is built)."""
    return next((float(m.grpo_beta()) for m in methods if m.name == "kl"), 0.0)  # type: ignore[attr-defined]


class LagrangianCost:
    """The RL side of ``constraint``: the reward term −λ·c(rollout) and the dual step on λ."""

    def __init__(self, method: Any, cost: Callable[..., list[float]]) -> None:
        self.method = method  # LagrangianConstraint: holds λ, its update rule and its checkpointed state
        self.cost = cost
        self._sum = 0.0
        self._n = 0
        self.last_mean: float | None = None

    def reward(self) -> Callable[..., list[float]]:
        def constraint_cost(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
            from tether.rl.rewards import check_rewards

            costs = check_rewards(f"{self.method.name}.rl_cost", self.cost(prompts=prompts, completions=completions, **kwargs), len(completions))
            vals = [float(c) for c in costs if c is not None]
            self._sum += sum(vals)
            self._n += len(vals)
            lam = self.method.lam
            return [-lam * float(c) if c is not None else None for c in costs]  # type: ignore[misc]

        return constraint_cost

    def step(self) -> dict[str, float]:
        """λ ← max(0, λ + η(c̄ − d)) from every rank's rollouts since the last step; returns what to log.

        Every rank calls it after each optimiser step (one collective under data parallelism).
        """
        import torch

        from tether.distributed import all_reduce_mean_

        # the mean over ranks of (sum, count): their ratio is the mean cost of every rank's rollouts
        total = all_reduce_mean_(torch.tensor([self._sum, float(self._n)], dtype=torch.float64))
        self._sum, self._n = 0.0, 0
        if float(total[1]) == 0.0:
            return {}
        mean = float(total[0] / total[1])
        self.last_mean = mean
        violation = mean - self.method.bound
        lam = self.method.update(violation)
        return {"cost": mean, "violation": violation, "lambda": lam}


class RLRouting:
    """The RL side of ``gradient_routing``: hack-flagged rollouts update only the region.

    With A the advantages and h the hack flags of a micro-batch, the GRPO loss is split by rows,
    L = L(A ⊙ (1−h)) + L(A ⊙ h) (each row's term is linear in its own advantage, so the split is
    exact); the flagged part is computed through ``functional_call`` with parameters whose
    gradient is masked to the region (value θ, gradient R ⊙ ∇), the clean part with the
    complement (``clean_updates: rest``) or unmasked (``all``). TRL's KL term is counted once, in
    the clean part.
    """

    def __init__(self, method: Any) -> None:
        self.method = method
        self.routed = 0
        self.rows = 0

    def setup(self, model: Any) -> None:
        self.method._resolve(model)

    def forward(self, model: Any, routed_side: bool) -> Callable[..., Any]:
        from torch.func import functional_call

        params = self.method._masked_params(model, routed_side)
        return lambda **kw: functional_call(model, params, (), kw)

    def loss(self, trainer: Any, model: Any, inputs: dict[str, Any], compute: Callable[[Any, dict[str, Any]], "torch.Tensor"]) -> "torch.Tensor":
        flags = inputs["tether_hack"].to(inputs["advantages"].device).bool()  # [batch]
        adv = inputs["advantages"]
        keep = (~flags).to(adv.dtype).view(-1, *([1] * (adv.dim() - 1)))
        self.rows += int(flags.numel())
        self.routed += int(flags.sum())
        clean_fwd = model if self.method.config.clean_updates == "all" else self.forward(model, False)
        loss = compute(clean_fwd, {**inputs, "advantages": adv * keep})
        if _any_on_some_rank(bool(flags.any())):  # every rank runs the routed pass, or none does
            beta, metrics = trainer.beta, trainer._metrics
            trainer.beta = 0.0  # the KL term was counted in the clean part
            trainer._metrics = {"train": _Sink(), "eval": _Sink()}  # TRL's per-pass metrics: keep the first pass's
            try:
                loss = loss + compute(self.forward(model, True), {**inputs, "advantages": adv * (1 - keep)})
            finally:
                trainer.beta, trainer._metrics = beta, metrics
        return loss

    def share(self) -> float:
        """Share of every rank's rows routed since the last call (one collective under data parallelism)."""
        import torch

        from tether.distributed import all_reduce_mean_

        counts = all_reduce_mean_(torch.tensor([float(self.routed), float(self.rows)], dtype=torch.float64))
        self.routed = self.rows = 0
        return float(counts[0] / counts[1]) if float(counts[1]) else 0.0


def _any_on_some_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (``flag`` itself in one process)."""
    import torch

    from tether.distributed import any_across_ranks

    return any_across_ranks(torch.tensor([int(flag)], dtype=torch.int32))[0]


class _Sink(dict):  # type: ignore[type-arg]
    """A metrics dict that swallows what it is given."""

    def __missing__(self, key: str) -> list[float]:
        return []
