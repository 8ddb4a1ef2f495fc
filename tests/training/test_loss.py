"""The SPIN loss against an independent float64 implementation of the formula."""

from __future__ import annotations

import math

import pytest
import torch

from spin_mega.training.loss import spin_loss


def _reference(pc, pr, oc, orj, beta, loss_type):
    """Plain-Python float64 transcription of DESIGN.md's formula."""
    losses, rc, rr = [], [], []
    for a, b, c, d in zip(pc, pr, oc, orj):
        t = beta * (a - c) - beta * (b - d)
        losses.append(math.log1p(math.exp(-t)) if loss_type == "logistic" else max(0.0, 1.0 - t))
        rc.append(beta * (a - c))
        rr.append(beta * (b - d))
    return sum(losses) / len(losses), rc, rr


@pytest.mark.parametrize("loss_type", ["logistic", "hinge"])
@pytest.mark.parametrize("beta", [0.1, 5.0])
def test_loss_matches_float64_reference(loss_type, beta):
    g = torch.Generator().manual_seed(3)
    # Sums of response log-probs are large negative numbers; the differences are what matter.
    pc, pr, oc, orj = (-200 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4))
    out = spin_loss(pc.float(), pr.float(), oc.float(), orj.float(), beta=beta, loss_type=loss_type)
    ref_loss, ref_rc, ref_rr = _reference(pc.tolist(), pr.tolist(), oc.tolist(), orj.tolist(), beta, loss_type)
    # float32 inputs of magnitude ~200 carry ~1e-5 absolute error; beta scales it.
    tol = 2e-5 * beta * 200
    assert abs(out.loss.item() - ref_loss) <= tol
    assert torch.allclose(out.reward_chosen.double(), torch.tensor(ref_rc, dtype=torch.float64), atol=tol)
    assert torch.allclose(out.reward_rejected.double(), torch.tensor(ref_rr, dtype=torch.float64), atol=tol)


def test_logistic_loss_is_ln2_when_policy_equals_opponent():
    logps = -50 * torch.rand(8, dtype=torch.float64)
    out = spin_loss(logps, logps.flip(0), logps, logps.flip(0), beta=0.1)
    assert abs(out.loss.item() - math.log(2)) < 1e-7  # the loss is computed in float32
    assert out.reward_margin.abs().max().item() == 0.0


@pytest.mark.parametrize("loss_type", ["logistic", "hinge"])
def test_gradient_pushes_chosen_up_and_rejected_down(loss_type):
    pc = torch.tensor([-10.0], requires_grad=True)
    pr = torch.tensor([-12.0], requires_grad=True)
    out = spin_loss(pc, pr, torch.tensor([-10.0]), torch.tensor([-12.0]), beta=0.1, loss_type=loss_type)
    out.loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises log p(chosen), lowers log p(rejected)


def test_hinge_loss_has_the_papers_sign_and_margin():
    """max(0, 1 - t), t = beta * (chosen ratio - rejected ratio): 1 at t = 0, falling with the margin the policy
    gives the human response, 0 (and no gradient) once t passes 1; growing, slope beta, when it prefers its own."""
    beta = 0.5
    opponent = torch.tensor([-20.0, -20.0, -20.0])
    shifts = torch.tensor([0.0, 1.0, 4.0])  # t = beta * 2 * shift: 0, 1, 4
    pc = (opponent + shifts).requires_grad_()
    pr = (opponent - shifts).requires_grad_()
    losses = [spin_loss(pc[i : i + 1], pr[i : i + 1], opponent[i : i + 1], opponent[i : i + 1], beta, "hinge").loss.item() for i in range(3)]
    assert losses == [1.0, 0.0, 0.0]
    out = spin_loss(pc[:1] - 3.0, pr[:1] + 3.0, opponent[:1], opponent[:1], beta, "hinge")  # t = -3: prefers its own
    assert out.loss.item() == pytest.approx(4.0)
    out.loss.backward()
    assert pc.grad[0].item() == pytest.approx(-beta) and pr.grad[0].item() == pytest.approx(beta)
    beyond = spin_loss(pc[2:], pr[2:], opponent[2:], opponent[2:], beta, "hinge")
    pc.grad = pr.grad = None
    beyond.loss.backward()
    assert pc.grad.abs().sum().item() == 0.0 and pr.grad.abs().sum().item() == 0.0


def test_large_margins_do_not_overflow():
    big = torch.tensor([1e4])
    out = spin_loss(-big, big, big, -big, beta=1.0)
    assert torch.isfinite(out.loss) and out.loss.item() > 1e4
