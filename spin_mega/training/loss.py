"""The SPIN objective on per-sequence log-prob sums.

    L = mean over pairs of  l( beta * [(pi_c - opp_c) - (pi_r - opp_r)] )

with pi = log p_theta(y|x) and opp = log p_theta_t(y|x) summed over response tokens, l(t) = log(1 + e^-t)
(logistic, the paper's) or max(0, 1 - t) (hinge). When theta = theta_t the logistic loss is ln 2 exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spin_mega.config import LossConfig


@dataclass
class SpinLossOutput:
    loss: torch.Tensor  # scalar mean over pairs, differentiable w.r.t. the policy log-probs
    reward_chosen: torch.Tensor  # [B] beta * (pi_c - opp_c), detached
    reward_rejected: torch.Tensor  # [B]

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
) -> SpinLossOutput:
    # float32 whatever the model dtype: sums over hundreds of tokens lose the margin in bf16.
    chosen_ratio = policy_chosen.float() - opponent_chosen.float().detach()
    rejected_ratio = policy_rejected.float() - opponent_rejected.float().detach()
    logits = beta * (chosen_ratio - rejected_ratio)
    if loss_type == "logistic":
        losses = F.softplus(-logits)  # log(1 + e^-t) without overflow for large |t|
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - logits)
    else:
        raise ValueError(f"unknown SPIN loss type {loss_type!r}")
    return SpinLossOutput(
        loss=losses.mean(),
        reward_chosen=(beta * chosen_ratio).detach(),
        reward_rejected=(beta * rejected_ratio).detach(),
    )


def first_step_loss(loss: LossConfig) -> float:
    """The configured loss when the policy equals the opponent (every reward 0), as at the first step of
    every iteration: l(0). The health guard checks the first step against it."""
    closed_forms = {"logistic": math.log(2.0), "hinge": 1.0}
    if loss.loss_type not in closed_forms:
        raise ValueError(f"no closed form for the first step of the {loss.loss_type!r} loss")
    return closed_forms[loss.loss_type]
