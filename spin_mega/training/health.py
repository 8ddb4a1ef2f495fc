"""Training health: non-finite values stop a run before the update; a collapse of the human responses'
log-probs is reported (or stops the run).

Every optimizer step the trainer calls `HealthGuard.step(...)` in place of `optimizer.step()`. It prepares the
gradients, computes the global gradient norm, and agrees with every rank in one all-reduce (which also carries
the trainer's own per-step sums: metrics and the preemption vote, so a step has one such collective) on

  - whether the loss, the log-probs or the gradient norm is NaN or infinite (the loss lives on the last
    pipeline stage, so the other stages learn of it only through this agreement), and
  - the policy's change in log-prob per token of the human (chosen) and generated (rejected) responses
    relative to the opponent theta_t, the iteration's start: a fall of the chosen side by more than
    `train.collapse_bound` nats per token is the collapse SPIN and DPO show at too high a learning rate
    (both responses' log-probs fall while the margin grows).

Only then does it clip and apply the update, so a non-finite step never reaches the weights, the optimizer
state or a checkpoint. A stop leaves `WORKDIR/unhealthy.json` (torchrun reports a worker's exit status as
its own 1; the file tells the loop and a re-run what happened) and refuses to resume until it is removed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from spin_mega.errors import TrainingUnhealthy
from spin_mega.io import atomic_write_json, read_jsonl
from spin_mega.rundir import UNHEALTHY_MARKER, read_stop

if TYPE_CHECKING:
    from spin_mega.training.first_step import FirstStepCheck

# The order of the agreed vector; the non-finite flags are counts of ranks that saw them.
_LOSS_BAD, _LOGPS_BAD, _GRAD_BAD, _CHOSEN_DELTA, _CHOSEN_TOKENS, _REJECTED_DELTA, _REJECTED_TOKENS = range(7)
# Sums over the step's pairs for the first-step check (training/first_step.py).
_LOSS_SUM, _PAIRS, _REWARD_ABS, _LOGP_ABS, _SFT_NLL = range(7, 12)
_OWN = 12  # the guard's own sums; a caller's `also` vector follows them
_WHAT = {_LOSS_BAD: "the loss", _LOGPS_BAD: "the log-probs", _GRAD_BAD: "the gradient norm"}


def finite_json_line(row: dict) -> str:
    """One metrics.jsonl line that any JSON reader accepts: NaN and infinities become null and their keys
    are listed under `non_finite`."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        row = {k: (None if k in bad else v) for k, v in row.items()}
        row["non_finite"] = bad
    return json.dumps(row, allow_nan=False)


def _clip_and_apply(optimizer, grad_norm: float) -> None:
    """The second half of megatron-core's `optimizer.step()` once the gradients are prepared and their norm
    is known: clip every (chained) optimizer's gradients by the global norm, then update."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "is_stub_optimizer", False) or opt.config.clip_grad <= 0.0:
            continue
        params = opt.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(
                params, opt.config.clip_grad, grad_norm, opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            )
    optimizer.step_with_ready_grads()


@dataclass
class StepHealth:
    applied: bool  # the optimizer update was applied
    grad_norm: float
    non_finite: list[str]  # "the loss", "the log-probs", "the gradient norm"
    chosen_change: Optional[float]  # mean log-prob per token of the chosen responses minus the opponent's
    rejected_change: Optional[float]
    collapsed: bool  # chosen_change below -bound
    stop_cause: Optional[str] = None  # a sentence fragment; set when the run must stop at this step
    advice: Optional[str] = None  # what to try, when the default (a lower learning rate) does not fit the cause
    also: object = None  # the caller's `also` vector summed over every rank (a float64 tensor), or None

    def metrics(self) -> dict:
        """The columns this adds to the step's metrics row."""
        row = {
            "logp_chosen_per_token_change": self.chosen_change,
            "logp_rejected_per_token_change": self.rejected_change,
            "collapse": self.collapsed,
        }
        if not self.applied:
            row["update_applied"] = False
        return row


@dataclass
class HealthGuard:
    bound: float  # nats per token
    stop_on_collapse: bool
    beta: float
    log: Callable[[str], None] = print
    first_collapse: Optional[dict] = None
    lowest_chosen_change: Optional[float] = None
    first_step: Optional[FirstStepCheck] = None  # checked at step 1 (a run that starts the iteration)

    def step(self, optimizer, outputs: list, device, step: int, also=None) -> StepHealth:
        """Replaces `optimizer.step()` for optimizer step number `step` (1-based). Collective over all ranks.

        `outputs` are this rank's forward-backward outputs: on the last pipeline stage one dict per
        micro-batch whose "stats" follow forward.STAT_NAMES; elsewhere empty. `also`: a float64 vector of the
        same length on every rank, summed over all ranks in the same all-reduce (StepHealth.also)."""
        # Imported here: the loop and the report read stop records through this module without torch.
        import torch
        import torch.distributed as dist

        from spin_mega.training.forward import STAT_NAMES

        extra = 0 if also is None else also.numel()
        vector = torch.zeros(_OWN + extra, dtype=torch.float64, device=device)
        if extra:
            vector[_OWN:] = also
        if outputs:
            # Tensor operations only: one host synchronisation for the whole check, at the all-reduce.
            stats = torch.stack([out["stats"] for out in outputs]).to(device, torch.float64)
            col = {name: stats[:, i] for i, name in enumerate(STAT_NAMES)}
            vector[_LOSS_BAD] = (~torch.isfinite(col["loss"])).any().double()
            vector[_LOGPS_BAD] = (~torch.isfinite(stats)).any().double()
            # reward = beta * (policy - opponent), summed over each micro-batch's sequences.
            vector[_CHOSEN_DELTA] = col["reward_chosen"].sum() / self.beta
            vector[_CHOSEN_TOKENS] = col["chosen_tokens"].sum()
            vector[_REJECTED_DELTA] = col["reward_rejected"].sum() / self.beta
            vector[_REJECTED_TOKENS] = col["rejected_tokens"].sum()
            vector[_LOSS_SUM] = col["loss"].sum()
            vector[_PAIRS] = col["pairs"].sum()
            vector[_REWARD_ABS] = col["reward_abs"].sum()
            vector[_LOGP_ABS] = -(col["logp_chosen"].sum() + col["logp_rejected"].sum())
            vector[_SFT_NLL] = col["sft_nll"].sum()
        # Only the fp16 loss scaler reports overflows here; a non-finite norm catches the rest.
        scaler_overflow = optimizer.prepare_grads()
        grad_norm = float(optimizer.get_grad_norm())
        if scaler_overflow or not math.isfinite(grad_norm):
            vector[_GRAD_BAD] = 1.0
        # A sum over every rank: tensor-parallel ranks repeat the last stage's sums, which scales numerator
        # and denominator alike, and other stages add zeros.
        dist.all_reduce(vector)
        agreed = vector[:_OWN].tolist()
        non_finite = [what for i, what in _WHAT.items() if agreed[i] > 0]
        chosen = agreed[_CHOSEN_DELTA] / agreed[_CHOSEN_TOKENS] if agreed[_CHOSEN_TOKENS] else None
        rejected = agreed[_REJECTED_DELTA] / agreed[_REJECTED_TOKENS] if agreed[_REJECTED_TOKENS] else None
        if chosen is not None and not math.isfinite(chosen):
            chosen = None
        if rejected is not None and not math.isfinite(rejected):
            rejected = None
        collapsed = chosen is not None and chosen < -self.bound
        health = StepHealth(not non_finite, grad_norm, non_finite, chosen, rejected, collapsed, also=vector[_OWN:] if extra else None)
        if non_finite:
            values = non_finite[0] if len(non_finite) == 1 else ", ".join(non_finite[:-1]) + " and " + non_finite[-1]
            health.stop_cause = f"{values} {'is' if len(non_finite) == 1 else 'are'} not finite (NaN or inf)"
        elif step == 1 and self.first_step is not None and agreed[_PAIRS] > 0:
            pairs = agreed[_PAIRS]
            cause = self.first_step.problem(
                agreed[_LOSS_SUM] / pairs, agreed[_REWARD_ABS] / pairs, agreed[_LOGP_ABS] / pairs, agreed[_SFT_NLL] / pairs
            )
            if cause is not None:
                health.stop_cause, health.advice = cause, self.first_step.advice()
        if not non_finite and health.stop_cause is None and collapsed:
            self._note_collapse(step, chosen, rejected)
            if self.stop_on_collapse:
                health.stop_cause = (
                    f"the human responses' mean log-prob per token fell {-chosen:.3g} nats below the opponent's, "
                    f"past train.collapse_bound ({self.bound:g}), and train.on_collapse is stop"
                )
        if chosen is not None:
            self.lowest_chosen_change = chosen if self.lowest_chosen_change is None else min(self.lowest_chosen_change, chosen)
        if health.stop_cause is None:
            _clip_and_apply(optimizer, grad_norm)
        else:
            health.applied = False
        return health

    def replay(self, metrics_path: Path) -> None:
        """Picks up what the kept rows of a resumed run's metrics.jsonl recorded, so the collapse is warned
        about once per run and the summary covers every step."""
        if not Path(metrics_path).is_file():
            return
        for row in read_jsonl(metrics_path):
            chosen = row.get("logp_chosen_per_token_change")
            if not isinstance(chosen, (int, float)):
                continue
            self.lowest_chosen_change = chosen if self.lowest_chosen_change is None else min(self.lowest_chosen_change, chosen)
            if row.get("collapse") and self.first_collapse is None:
                self.first_collapse = {
                    "step": row.get("step"),
                    "logp_chosen_per_token_change": chosen,
                    "logp_rejected_per_token_change": row.get("logp_rejected_per_token_change"),
                }

    def _note_collapse(self, step: int, chosen: float, rejected: Optional[float]) -> None:
        if self.first_collapse is not None:
            return
        self.first_collapse = {"step": step, "logp_chosen_per_token_change": chosen, "logp_rejected_per_token_change": rejected}
        also = f" (the generated responses': {rejected:+.3g})" if rejected is not None else ""
        self.log(
            f"warning: collapse at step {step}: the human responses' mean log-prob per token is {-chosen:.3g} nats "
            f"below the opponent's{also}, past train.collapse_bound ({self.bound:g}); the policy is unlearning the "
            "data it should prefer: lower the learning rate (train.on_collapse=stop makes this a stop)"
        )

    def summary(self) -> dict:
        """The `health` entry of train_summary.json."""
        return {
            "status": "collapsed" if self.first_collapse else "healthy",
            "collapse_bound": self.bound,
            "collapse": self.first_collapse,
            "lowest_logp_chosen_per_token_change": self.lowest_chosen_change,
        }


# ---- the stop and what a re-run finds ------------------------------------------------------------------


def stop_message(record: dict) -> str:
    return (
        f"training stopped before the update of step {record['step']}: {record['cause']}; nothing from that "
        f"state was saved, the last good checkpoint is {record['last_good']}; {record['advice']}"
    )


def record_stop(
    workdir: Path, step: int, cause: str, last_good: str, lr: float, clip_grad: float, advice: Optional[str] = None
) -> dict:
    """Writes WORKDIR/unhealthy.json (call on one rank) and returns its content."""
    record = {
        "step": step,
        "cause": cause,
        "last_good": last_good,
        "advice": advice or (
            f"try a lower optim.lr (it is {lr:g})"
            + ("" if clip_grad > 0 else " with optim.clip_grad > 0")
            + " in a new --workdir"
        ),
        "time": time.time(),
    }
    atomic_write_json(Path(workdir) / UNHEALTHY_MARKER, record)
    return record


def refuse_to_resume(workdir: Path) -> None:
    """Raises TrainingUnhealthy when an earlier run in WORKDIR stopped unhealthy: resuming from the same
    checkpoint with the same settings would walk into the same divergence."""
    record = read_stop(workdir)
    if record is None:
        return
    raise TrainingUnhealthy(
        f"an earlier run in {workdir} stopped before the update of step {record['step']}: {record['cause']}; "
        f"resuming would repeat it, so {record['advice']} (last good checkpoint: {record['last_good']}), "
        f"or delete {Path(workdir) / UNHEALTHY_MARKER} to resume anyway"
    )
