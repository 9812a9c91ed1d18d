"""A-GEM: after projection the gradient has no negative component along g_ref, and only conflicts are touched."""

from __future__ import annotations

import torch

from _methods_support import FakeContext, tiny_model, token_batch
from tether.methods import make
from tether.methods._losses import masked_nll
from tether.methods.gradient_projection import project


def test_projection_removes_conflict_only() -> None:
    g_ref = torch.tensor([1.0, 0.0, 0.0])
    g = torch.tensor([-2.0, 1.0, 3.0])
    new, dot, projected = project(g, g_ref)
    assert projected and dot == -2.0
    torch.testing.assert_close(new, torch.tensor([0.0, 1.0, 3.0]))
    same, _, projected = project(torch.tensor([2.0, 1.0, 0.0]), g_ref)
    assert not projected and torch.equal(same, torch.tensor([2.0, 1.0, 0.0]))
    always, _, projected = project(torch.tensor([2.0, 1.0, 0.0]), g_ref, always=True)
    assert projected and torch.allclose(always, torch.tensor([0.0, 1.0, 0.0]))


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_on_gradients_leaves_no_negative_component_along_alignment_gradient() -> None:
    model = tiny_model()
    align = token_batch(seed=1)
    task = token_batch(seed=2)
    # the reference gradient, computed independently
    model.zero_grad()
    masked_nll(model(input_ids=align["input_ids"]).logits, align["labels"]).backward()
    g_ref = _grads(model).clone()
    # a task gradient that conflicts with it: the task is to *raise* the alignment NLL
    model.zero_grad()
    (-masked_nll(model(input_ids=align["input_ids"]).logits, align["labels"])
     + 0.1 * masked_nll(model(input_ids=task["input_ids"]).logits, task["labels"])).backward()
    g = _grads(model).clone()
    assert float(g @ g_ref) < 0
    ctx = FakeContext(model, align)
    make("gradient_projection", {}).on_gradients(ctx, model)
    g_new = _grads(model)
    assert float(g_new @ g_ref) >= -1e-6 * float(g_ref.norm() * g.norm())
    assert ctx.logged["preserve/gradient_projection/projected"] == [1.0]
    # what is orthogonal to g_ref is kept exactly
    ortho = g - (g @ g_ref) / (g_ref @ g_ref) * g_ref
    torch.testing.assert_close(g_new, ortho, rtol=1e-4, atol=1e-7)
