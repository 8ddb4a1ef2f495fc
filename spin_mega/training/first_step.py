"""The first-step guard: at the first step of an iteration the policy is the opponent, so every reward is 0
and the loss is the configured loss's closed form (`loss.first_step_loss`: ln 2 for logistic, 1 for hinge).

A run whose first step is off computes the policy's log-probs differently from the opponent's for the same
weights: the classic packing bug (a sequence attending across its packed boundary, or padding placed inside
a sequence), an opponent table computed for other weights or data, a log-prob path that disagrees with the
opponent pass. In precompute mode the opponent's table comes from a pass with one sequence per row, so a
packed step is checked against an unpacked one; in fused mode both see the same stream, and the guard
catches only what differs between the two models' passes.

Tolerance. Both sides are log-prob sums over a response; what can differ between the two passes is their
rounding, which is relative to the sums. So each pair's |reward_chosen| + |reward_rejected| (beta times the
sums' differences) must stay within rtol x beta x (|log p(chosen)| + |log p(rejected)|), averaged over the
step's pairs, and the loss within the same amount of its closed form (both losses have a slope of at most 1
in the reward margin). rtol is 1e-5 in fp32 (measured: ~1e-7 between packed and padded passes on CPU) and
2e-2 in bf16/fp16: bf16 keeps 8 bits of mantissa (4e-3 per rounding), and two passes of different shapes
round a few hundred tokens' log-probs differently (tens of ulps of a sum of hundreds of nats, ~1e-3
relative), so 2e-2 leaves a margin of ten while a leak across sequences moves a trained model's log-probs
by whole nats per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

RTOL = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-2}
# Rounding of the loss itself (float32 softplus of ~0): an absolute floor under the relative tolerance.
LOSS_FLOOR = 1e-6


@dataclass(frozen=True)
class FirstStepCheck:
    expected_loss: float  # loss.first_step_loss(cfg.loss)
    loss_type: str
    beta: float
    rtol: float

    def problem(self, loss: float, reward_abs: float, logp_abs: float) -> Optional[str]:
        """A sentence fragment naming what is off, or None. Arguments are means over the step's pairs:
        the loss, |reward_chosen| + |reward_rejected|, and |log p(chosen)| + |log p(rejected)|."""
        tolerance = self.rtol * self.beta * logp_abs
        if abs(loss - self.expected_loss) <= tolerance + LOSS_FLOOR and reward_abs <= tolerance:
            return None
        return (
            f"the first step's loss is {loss:.6f} where the {self.loss_type} loss of a policy equal to its opponent is "
            f"{self.expected_loss:.6f}, and the mean |reward| per pair is {reward_abs:.3g} instead of 0 (tolerance "
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
