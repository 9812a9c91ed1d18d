"""EWC and L2-SP: zero at θ*, exact gradients λF(θ−θ*) and α(θ−θ*), and a per-example Fisher."""

from __future__ import annotations

import torch

from _methods_support import FakeContext, tiny_model, token_batch
from tether.methods import make
from tether.methods._losses import masked_nll
from tether.methods.ewc import diagonal_fisher


def _perturb(model: torch.nn.Module, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    deltas = []
    with torch.no_grad():
        for p in model.parameters():
            d = torch.randn(p.shape, generator=g) * 0.01
            p.add_(d)
            deltas.append(d)
    return deltas


def test_ewc_zero_at_anchor_and_exact_gradient() -> None:
    model = tiny_model()
    ctx = FakeContext(model, token_batch())
    ewc = make("ewc", {"lam": 7.0, "fisher_samples": 4})
    ewc.setup(ctx)
    pen = ewc.loss_terms(ctx, model, {})["penalty"]
    assert float(pen) == 0.0
    assert any(float(f.sum()) > 0 for f in ewc.fisher)  # a real Fisher, not zeros
    deltas = _perturb(model)
    model.zero_grad()
    pen = ewc.loss_terms(ctx, model, {})["penalty"]
    expected = sum(0.5 * 7.0 * float((f * d**2).sum()) for f, d in zip(ewc.fisher, deltas))
    assert abs(float(pen) - expected) <= 1e-5 * max(1.0, expected)
    pen.backward()
    for p, f, d in zip(model.parameters(), ewc.fisher, deltas):
        torch.testing.assert_close(p.grad, 7.0 * f * d, rtol=1e-4, atol=1e-9)


def test_l2sp_zero_at_anchor_and_exact_gradient() -> None:
    model = tiny_model()
    ctx = FakeContext(model, token_batch())
    l2 = make("l2sp", {"alpha": 0.3})
    l2.setup(ctx)
    assert float(l2.loss_terms(ctx, model, {})["penalty"]) == 0.0
    deltas = _perturb(model)
    model.zero_grad()
    pen = l2.loss_terms(ctx, model, {})["penalty"]
    assert abs(float(pen) - 0.5 * 0.3 * sum(float((d**2).sum()) for d in deltas)) < 1e-6
    pen.backward()
    for p, d in zip(model.parameters(), deltas):
        torch.testing.assert_close(p.grad, 0.3 * d, rtol=1e-4, atol=1e-9)


def test_fisher_is_mean_of_per_example_squared_gradients() -> None:
    model = tiny_model()
    batch = token_batch(n=3)
    fisher = diagonal_fisher(model, [batch])
    per_example = []
    for i in range(3):
        model.zero_grad()
        one = {k: v[i : i + 1] for k, v in batch.items()}
        masked_nll(model(input_ids=one["input_ids"]).logits, one["labels"]).backward()
        per_example.append([p.grad.detach().clone() ** 2 for p in model.parameters()])
    model.zero_grad()
    masked_nll(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch["labels"]).backward()
    minibatch_sq = [p.grad.detach() ** 2 for p in model.parameters()]
    for j, f in enumerate(fisher):
        torch.testing.assert_close(f, sum(pe[j] for pe in per_example) / 3, rtol=1e-4, atol=1e-10)
    # squared minibatch gradients are a different (smaller) quantity: a minibatch Fisher would fail above
    total_f = sum(float(f.sum()) for f in fisher)
    total_mb = sum(float(m.sum()) for m in minibatch_sq)
    assert total_mb < total_f
