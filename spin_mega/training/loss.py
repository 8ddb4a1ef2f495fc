"""The SPIN objective and its preference-loss siblings, on per-sequence log-prob sums.

With pi = log p_theta(y|x) and opp = log p_theta_t(y|x) summed over response tokens (c: the human response,
r: the model's own), z = beta * [(pi_c - opp_c) - (pi_r - opp_r)] and eps = loss.label_smoothing:

    logistic  (1 - eps) * log(1 + e^-z) + eps * log(1 + e^z)          the paper's (eps = 0); conservative DPO
    hinge     max(0, 1 - z)                                           the paper's alternative
    robust    [(1 - eps) * log(1 + e^-z) - eps * log(1 + e^z)] / (1 - 2 eps)   robust DPO (Chowdhury et al.)
    ipo       (h - 1 / (2 beta))^2,  h = (pi_c - opp_c) / n_c - (pi_r - opp_r) / n_r   IPO on per-token means

averaged over pairs, plus sft_weight * mean over pairs of -pi_c / n_c (the human response's NLL per token)
when loss.sft_weight > 0. n_c, n_r: response token counts. Rewards stay beta times the log-ratios of the sums
whatever the loss. docs/losses.md has the derivations of the first-step values below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from spin_mega.config import LossConfig


@dataclass
class SpinLossOutput:
    loss: torch.Tensor  # scalar mean over pairs, differentiable w.r.t. the policy log-probs
    reward_chosen: torch.Tensor  # [B] beta * (pi_c - opp_c), detached
    reward_rejected: torch.Tensor  # [B]
    sft_nll: Optional[torch.Tensor] = None  # [B] the policy's NLL per token of the human response, detached

    @property
    def reward_margin(self) -> torch.Tensor:
        return self.reward_chosen - self.reward_rejected

    @property
    def reward_accuracy(self) -> torch.Tensor:
        return (self.reward_chosen > self.reward_rejected).float()


def spin_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    opponent_chosen: torch.Tensor,
    opponent_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "logistic",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    chosen_tokens: Optional[torch.Tensor] = None,
    rejected_tokens: Optional[torch.Tensor] = None,
) -> SpinLossOutput:
    """`chosen_tokens` / `rejected_tokens` [B]: response token counts, needed by ipo (both) and by the SFT
    term and its metric (chosen)."""
    # float32 whatever the model dtype: sums over hundreds of tokens lose the margin in bf16.
    chosen_ratio = policy_chosen.float() - opponent_chosen.float().detach()
    rejected_ratio = policy_rejected.float() - opponent_rejected.float().detach()
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the response token counts of both sides")
        # IPO's authors regress the margin of per-token means, so long responses do not dominate it.
        margin = chosen_ratio / chosen_tokens.float() - rejected_ratio / rejected_tokens.float()
        losses = (margin - 1.0 / (2.0 * beta)) ** 2
    else:
        logits = beta * (chosen_ratio - rejected_ratio)
        if loss_type == "logistic":
            losses = F.softplus(-logits)  # log(1 + e^-t) without overflow for large |t|
            if label_smoothing:
                losses = (1.0 - label_smoothing) * losses + label_smoothing * F.softplus(logits)
        elif loss_type == "hinge":
            losses = torch.relu(1.0 - logits)
        elif loss_type == "robust":
            eps = label_smoothing
            losses = ((1.0 - eps) * F.softplus(-logits) - eps * F.softplus(logits)) / (1.0 - 2.0 * eps)
        else:
            raise ValueError(f"unknown SPIN loss type {loss_type!r}")
    loss = losses.mean()
    sft_nll = None
    if chosen_tokens is not None:
        nll = -policy_chosen.float() / chosen_tokens.float()
        sft_nll = nll.detach()
        if sft_weight:
            loss = loss + sft_weight * nll.mean()
    elif sft_weight:
        raise ValueError("loss.sft_weight needs the chosen responses' token counts")
    return SpinLossOutput(
        loss=loss,
        reward_chosen=(beta * chosen_ratio).detach(),
        reward_rejected=(beta * rejected_ratio).detach(),
        sft_nll=sft_nll,
    )


def first_step_loss(loss: LossConfig, sft_nll: float = 0.0) -> float:
    """The loss at an iteration's first step, where the policy is the opponent and every log-ratio is 0:
    logistic ln 2 (any label smoothing: (1 - eps) ln 2 + eps ln 2), robust ln 2 (its correction cancels at
    z = 0), hinge 1, ipo (0 - 1/(2 beta))^2 = 1/(4 beta^2); plus sft_weight times the policy's NLL per token
    of the human responses (`sft_nll`, the metric of the same name), which the policy alone decides."""
    closed = {"logistic": math.log(2.0), "robust": math.log(2.0), "hinge": 1.0, "ipo": 1.0 / (4.0 * loss.beta**2)}
    if loss.loss_type not in closed:
        raise ValueError(f"unknown SPIN loss type {loss.loss_type!r}")
    return closed[loss.loss_type] + loss.sft_weight * sft_nll


def describe(loss: LossConfig) -> str:
    """The configured loss in words, as the report names it."""
    eps = loss.label_smoothing
    words = {
        "logistic": f"logistic with label smoothing {eps:g} (conservative DPO)" if eps else "logistic (the SPIN paper's)",
        "hinge": "hinge (the SPIN paper's alternative)",
        "ipo": "IPO (squared margin of per-token means)",
        "robust": f"robust DPO with label smoothing {eps:g}",
    }[loss.loss_type]
    if loss.sft_weight:
        words += f" + {loss.sft_weight:g} × the policy's NLL per token of the human responses"
    return words

