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


def test_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-10.0], requires_grad=True)
    pr = torch.tensor([-12.0], requires_grad=True)
    out = spin_loss(pc, pr, torch.tensor([-10.0]), torch.tensor([-12.0]), beta=0.1)
    out.loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises log p(chosen), lowers log p(rejected)


def test_large_margins_do_not_overflow():
    big = torch.tensor([1e4])
    out = spin_loss(-big, big, big, -big, beta=1.0)
    assert torch.isfinite(out.loss) and out.loss.item() > 1e4


@pytest.mark.parametrize("loss_type, closed_form", [("logistic", math.log(2.0)), ("hinge", 1.0)])
def test_first_step_loss_is_the_loss_at_zero_margin(loss_type, closed_form):
    """At the first step of an iteration the policy is the opponent: every reward is 0 and the loss is l(0)."""
    from spin_mega.config import LossConfig
    from spin_mega.training.loss import first_step_loss

    zeros = torch.full((4,), -123.0)
    at_zero = spin_loss(zeros, zeros - 7.0, zeros, zeros - 7.0, beta=0.1, loss_type=loss_type).loss.item()
    assert first_step_loss(LossConfig(loss_type=loss_type)) == closed_form == pytest.approx(at_zero, abs=1e-7)
