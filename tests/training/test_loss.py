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


# ---- the loss family: ipo, robust, label smoothing, the SFT term ---------------------------------------------
# The reference below is written from the papers' formulas in float64 with other primitives (log-sigmoid,
# explicit means), and differentiated by autograd in float64; spin_loss computes in float32.

from spin_mega.config import LossConfig  # noqa: E402
from spin_mega.training.loss import first_step_loss  # noqa: E402

FAMILY = [
    # (loss_type, label_smoothing, sft_weight)
    ("logistic", 0.0, 0.0),
    ("hinge", 0.0, 0.0),
    ("logistic", 0.1, 0.0),
    ("robust", 0.2, 0.0),
    ("ipo", 0.0, 0.0),
    ("ipo", 0.0, 0.5),
    ("logistic", 0.0, 1.0),
    ("hinge", 0.0, 0.3),
    ("robust", 0.1, 0.7),
]


def _family_reference(pc, pr, oc, orj, nc, nr, beta, loss_type, eps, sft_weight):
    log_sigmoid = torch.nn.functional.logsigmoid
    if loss_type == "ipo":
        h = (pc - oc) / nc - (pr - orj) / nr
        per_pair = (h - 1 / (2 * beta)) ** 2
    else:
        z = beta * ((pc - oc) - (pr - orj))
        if loss_type == "hinge":
            per_pair = torch.clamp(1 - z, min=0)
        elif loss_type == "logistic":
            per_pair = -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
        else:  # robust (Chowdhury et al. 2024): unbiased under a fraction eps of flipped labels
            per_pair = (-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps)
    total = per_pair.sum() / per_pair.numel()
    return total + sft_weight * (-(pc / nc)).sum() / pc.numel()


def _random_pairs(seed: int, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(5, 120, (2, n), generator=g).double()
    # Sums of per-token log-probs (-0.5 .. -3 nats a token), opponents within a few nats of the policy.
    pc = -counts[0] * (0.5 + 2.5 * torch.rand(n, generator=g, dtype=torch.float64))
    pr = -counts[1] * (0.5 + 2.5 * torch.rand(n, generator=g, dtype=torch.float64))
    oc = pc + 4 * torch.randn(n, generator=g, dtype=torch.float64)
    orj = pr + 4 * torch.randn(n, generator=g, dtype=torch.float64)
    return pc, pr, oc, orj, counts[0], counts[1]


@pytest.mark.parametrize("loss_type, eps, sft_weight", FAMILY)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_family_matches_float64_reference_values_and_gradients(loss_type, eps, sft_weight, beta):
    pc, pr, oc, orj, nc, nr = _random_pairs(seed=5)
    ref_pc, ref_pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    ref = _family_reference(ref_pc, ref_pr, oc, orj, nc, nr, beta, loss_type, eps, sft_weight)
    ref.backward()
    ours_pc, ours_pr = pc.float().requires_grad_(), pr.float().requires_grad_()
    out = spin_loss(
        ours_pc, ours_pr, oc.float(), orj.float(), beta=beta, loss_type=loss_type, label_smoothing=eps,
        sft_weight=sft_weight, chosen_tokens=nc.float(), rejected_tokens=nr.float(),
    )
    out.loss.backward()
    # float32 sums of ~300 nats carry ~3e-5 absolute error; the losses' slopes (beta, or 2|h - 1/(2 beta)|/n
    # for IPO, at most ~2 here) scale it.
    assert abs(out.loss.item() - ref.item()) <= 2e-4 * max(1.0, abs(ref.item())), (out.loss.item(), ref.item())
    for ours, theirs in ((ours_pc.grad, ref_pc.grad), (ours_pr.grad, ref_pr.grad)):
        assert torch.allclose(ours.double(), theirs, rtol=1e-4, atol=1e-6), (ours, theirs)
    # Rewards keep their meaning under every loss: beta times the log-ratio of the sums.
    assert torch.allclose(out.reward_chosen.double(), beta * (pc - oc), atol=1e-4 * beta * 300)
    assert torch.allclose(out.reward_rejected.double(), beta * (pr - orj), atol=1e-4 * beta * 300)
    assert torch.allclose(out.sft_nll.double(), -pc / nc, rtol=1e-6)


@pytest.mark.parametrize("loss_type, eps, sft_weight", FAMILY)
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_first_step_equals_closed_form(loss_type, eps, sft_weight, beta):
    pc, pr, _, _, nc, nr = _random_pairs(seed=9)
    out = spin_loss(
        pc.float(), pr.float(), pc.float(), pr.float(), beta=beta, loss_type=loss_type, label_smoothing=eps,
        sft_weight=sft_weight, chosen_tokens=nc.float(), rejected_tokens=nr.float(),
    )
    nll = (-pc / nc).mean().item()
    closed = first_step_loss(LossConfig(beta=beta, loss_type=loss_type, label_smoothing=eps, sft_weight=sft_weight), nll)
    # The closed forms written out by hand, independently of first_step_loss.
    by_hand = {"logistic": math.log(2), "robust": math.log(2), "hinge": 1.0, "ipo": 1 / (4 * beta**2)}[loss_type]
    assert closed == pytest.approx(by_hand + sft_weight * nll, rel=1e-12)
    assert out.loss.item() == pytest.approx(closed, rel=2e-6)


def test_robust_loss_is_unbiased_under_flipped_labels():
    """What makes the robust loss robust: averaged over a label flipped with probability eps, it equals the
    clean logistic loss (Chowdhury et al. 2024)."""
    eps, beta = 0.2, 0.5
    pc, pr, oc, orj, nc, nr = _random_pairs(seed=13)

    def loss(a, b, c, d, loss_type, smoothing):
        return spin_loss(a.float(), b.float(), c.float(), d.float(), beta=beta, loss_type=loss_type,
                         label_smoothing=smoothing, chosen_tokens=nc.float(), rejected_tokens=nr.float()).loss.item()

    expected_robust = (1 - eps) * loss(pc, pr, oc, orj, "robust", eps) + eps * loss(pr, pc, orj, oc, "robust", eps)
    clean = loss(pc, pr, oc, orj, "logistic", 0.0)
    assert expected_robust == pytest.approx(clean, rel=1e-5)


def test_paper_losses_are_unchanged_by_the_new_keys():
    """label_smoothing 0 and sft_weight 0 leave the paper's two losses bit-for-bit as they were."""
    pc, pr, oc, orj, nc, nr = _random_pairs(seed=17)
    for loss_type, plain in (("logistic", torch.nn.functional.softplus), ("hinge", None)):
        z = 0.1 * ((pc.float() - oc.float()) - (pr.float() - orj.float()))
        before = plain(-z).mean() if plain else torch.relu(1.0 - z).mean()
        after = spin_loss(pc.float(), pr.float(), oc.float(), orj.float(), beta=0.1, loss_type=loss_type,
                          chosen_tokens=nc.float(), rejected_tokens=nr.float()).loss
        assert torch.equal(before, after)


@pytest.mark.parametrize("loss_type, eps, sft_weight", [("ipo", 0.0, 0.5), ("robust", 0.2, 1.0)])
def test_micro_batch_loss_wires_config_and_token_counts(loss_type, eps, sft_weight):
    """The trainer's per-micro-batch loss (forward._loss_func): the config's keys and each side's token counts
    reach the loss, and the summed stats carry sft_nll, on a precompute-mode micro-batch of 4 pairs."""
    from spin_mega.training.forward import STAT_NAMES, _loss_func

    pc, pr, oc, orj, nc, nr = _random_pairs(seed=21, n=4)
    batch = {
        "input_ids": torch.zeros(8, 16, dtype=torch.long),
        "num_response_tokens": torch.cat([nc, nr]).long(),
        "opponent_logps": torch.cat([oc, orj]).float(),
    }
    cfg = LossConfig(beta=0.1, loss_type=loss_type, label_smoothing=eps, sft_weight=sft_weight)
    loss, extra = _loss_func(batch, cfg, False, torch.cat([pc, pr]).float())
    ref = _family_reference(pc, pr, oc, orj, nc, nr, 0.1, loss_type, eps, sft_weight)
    assert loss.item() == pytest.approx(ref.item(), rel=2e-5)
    stats = dict(zip(STAT_NAMES, extra["stats"].tolist()))
    assert stats["sft_nll"] == pytest.approx((-pc / nc).sum().item(), rel=1e-5)
    assert stats["chosen_tokens"] == nc.sum().item() and stats["rejected_tokens"] == nr.sum().item()
