"""The first-step guard: at the first step of an iteration the policy is the opponent, so every reward is 0
and the loss is the configured loss's closed form (`loss.first_step_loss`: ln 2 for logistic, 1 for hinge,
1 / (4 beta^2) for ipo, plus the SFT term's weight times the policy's own NLL).

A run whose first step is off computes the policy's log-probs differently from the opponent's for the same
weights: the classic packing bug (a sequence attending across its packed boundary, or padding placed inside
a sequence), an opponent table computed for other weights or data, a log-prob path that disagrees with the
opponent pass. In precompute mode the opponent's table comes from a pass with one sequence per row, so a
packed step is checked against an unpacked one; in fused mode both see the same stream, and the guard
catches only what differs between the two models' passes.

Tolerance. Both sides are log-prob sums over a response; what can differ between the two passes is their
rounding, which is relative to the sums. So each pair's |reward_chosen| + |reward_rejected| (beta times the
sums' differences) must stay within rtol x beta x (|log p(chosen)| + |log p(rejected)|), averaged over the
step's pairs, and the loss within that amount times the loss's slope near zero rewards (`_slope`) of its
closed form. rtol is 1e-4 in fp32 (packed against padded measures ~1e-7 on CPU, but the same packed step
re-run in another process of the demo's learning-rate grid measured 8e-6: 1e-5 stopped a healthy run) and 2e-2 in
bf16/fp16: bf16 keeps 8 bits of mantissa (4e-3 per rounding), and two passes of different shapes round a
few hundred tokens' log-probs differently (tens of ulps of a sum of hundreds of nats, ~1e-3 relative), so
2e-2 leaves a margin of ten while a leak across sequences moves a trained model's log-probs by whole nats
per token. (A randomly initialised model's log-probs barely depend on context: there a leak shows in fp32,
not within bf16's tolerance.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from spin_mega.config import LossConfig

RTOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}
# Rounding of the loss itself (float32 softplus of ~0): an absolute floor under the relative tolerance.
LOSS_FLOOR = 1e-6


def _slope(loss: LossConfig) -> float:
    """A bound on how far the loss moves per unit of mean |reward_chosen| + |reward_rejected| near zero
    rewards: 1 for logistic (smoothed or not) and hinge, 1 / (1 - 2 eps) for robust, 1 / beta^2 for ipo (its
    margin is a per-token mean of the log-ratios, the rewards beta times their sums). The SFT term is the
    policy's own NLL on both sides of the check, so it adds nothing."""
    if loss.loss_type == "ipo":
        return 1.0 / loss.beta**2
    if loss.loss_type == "robust":
        return 1.0 / (1.0 - 2.0 * loss.label_smoothing)
    return 1.0


@dataclass(frozen=True)
class FirstStepCheck:
    loss: LossConfig
    rtol: float

    def problem(self, loss: float, reward_abs: float, logp_abs: float, sft_nll: float = 0.0) -> Optional[str]:
        """A sentence fragment naming what is off, or None. Arguments are means over the step's pairs: the
        loss, |reward_chosen| + |reward_rejected|, |log p(chosen)| + |log p(rejected)| and the policy's NLL
        per token of the chosen response (the SFT term's)."""
        from spin_mega.training.loss import first_step_loss  # torch: the health module is read without it

        expected = first_step_loss(self.loss, sft_nll)
        tolerance = self.rtol * self.loss.beta * logp_abs
        if abs(loss - expected) <= _slope(self.loss) * tolerance + LOSS_FLOOR and reward_abs <= tolerance:
            return None
        return (
            f"the first step's loss is {loss:.6f} where the {self.loss.loss_type} loss of a policy equal to its opponent "
            f"is {expected:.6f}, and the mean |reward| per pair is {reward_abs:.3g} instead of 0 (tolerance "
            f"{tolerance:.2g}: {self.rtol:g} of beta x the log-prob sums): the policy's log-probs differ from the "
            "opponent's for the same weights, as when a packed sequence attends across its boundary or the opponent "
            "table was computed for other weights or data"
        )

    @staticmethod
    def advice() -> str:
        return (
            "compare a run with data.packing=false in a new --workdir, and delete the opponent table "
            "(opponent_logps.json) if the start model changed"
        )
