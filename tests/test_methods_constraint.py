"""The Lagrange multiplier rises while the constraint is violated, falls otherwise, and never goes below 0."""

from __future__ import annotations

import pytest

from tether.methods import make


@pytest.mark.parametrize("param", ["lambda", "log_lambda"])
def test_lambda_rises_under_violation_and_stays_nonnegative(param: str) -> None:
    c = make("constraint", {"lambda_init": 0.5, "lambda_lr": 0.5, "parametrization": param})
    values = [c.update(0.2) for _ in range(5)]
    assert all(b > a for a, b in zip([0.5] + values, values))  # strictly rising
    if param == "lambda":
        assert values[0] == pytest.approx(0.6)  # λ + η·violation: plain SGD, proportional to the violation
    for _ in range(50):
        lam = c.update(-1.0)
        assert lam >= 0.0
    assert lam < 0.5
    if param == "lambda":
        assert lam == 0.0  # projected onto λ ≥ 0


def test_step_end_uses_mean_alignment_loss_over_micro_batches() -> None:
    class Ctx:
        logged: dict[str, float] = {}

        def log(self, method: str, term: str, value: float) -> None:
            self.logged[term] = value

    c = make("constraint", {"epsilon": 0.1, "lambda_init": 1.0, "lambda_lr": 2.0})
    c._sum, c._n = 0.3 + 0.5, 2  # two micro-batches with alignment loss 0.3 and 0.5
    ctx = Ctx()
    c.on_step_end(ctx, 1)  # type: ignore[arg-type]
    assert ctx.logged["violation"] == pytest.approx(0.3)
    assert c.lam == pytest.approx(1.6)
    assert c.state_dict()["lambda"] == pytest.approx(1.6)


def test_log_lambda_needs_positive_start() -> None:
    with pytest.raises(ValueError, match="lambda_init"):
        make("constraint", {"parametrization": "log_lambda", "lambda_init": 0})
