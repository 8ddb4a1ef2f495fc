"""Paired comparison of two models scored on the same items (per-item exact match, 0 or 1).

Two arms evaluated on the same prompts are compared by McNemar's exact test: only the items on which they
disagree carry information, and under "no difference" each disagreement is equally likely to go either
way, so the count one arm wins is Binomial(disagreements, 1/2). The two-sided p-value doubles the smaller
tail. The verdict word follows the test and nothing else: "beat" or "lost to" only when p < alpha, else
"tied with".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

ALPHA = 0.05


def mean_and_se(hits: Sequence[int]) -> tuple[float, float]:
    """Accuracy and its binomial standard error sqrt(p(1-p)/n)."""
    n = len(hits)
    if n == 0:
        raise ValueError("no items")
    p = sum(hits) / n
    return p, math.sqrt(p * (1 - p) / n)


def _binomial_tail(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exactly (log-space terms so n in the thousands stays finite)."""
    if k < 0:
        return 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(x - top) for x in logs))


@dataclass(frozen=True)
class PairedResult:
    n: int
    a: float  # accuracy of arm a
    a_se: float
    b: float
    b_se: float
    a_only: int  # items a got right and b wrong
    b_only: int
    p_value: float

    @property
    def word(self) -> str:
        """How a compares with b, as the test allows: "beat", "lost to" or "tied with"."""
        if self.p_value >= ALPHA or self.a_only == self.b_only:
            return "tied with"
        return "beat" if self.a_only > self.b_only else "lost to"


def mcnemar(a_hits: Sequence[int], b_hits: Sequence[int]) -> PairedResult:
    """McNemar's exact test of arm a against arm b on the same items, in the same order."""
    if len(a_hits) != len(b_hits):
        raise ValueError(f"the arms were scored on different numbers of items ({len(a_hits)} vs {len(b_hits)})")
    a_only = sum(1 for x, y in zip(a_hits, b_hits) if x and not y)
    b_only = sum(1 for x, y in zip(a_hits, b_hits) if y and not x)
    discordant = a_only + b_only
    p_value = 1.0 if discordant == 0 else min(1.0, 2 * _binomial_tail(min(a_only, b_only), discordant))
    a, a_se = mean_and_se(a_hits)
    b, b_se = mean_and_se(b_hits)
    return PairedResult(len(a_hits), a, a_se, b, b_se, a_only, b_only, p_value)
