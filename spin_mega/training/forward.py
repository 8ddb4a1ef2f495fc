"""One micro-batch through the pipeline: the policy, the opponent (fused mode) and the SPIN loss.

Fused mode runs the frozen opponent in the same forward step as the policy, on the same micro-batch and
under the same TP/PP schedule: between pipeline stages the two models' activations travel as one tensor,
policy rows first and opponent rows second along the batch dimension, so the schedule's send/recv carries
both with no extra messages. Precompute mode carries only the policy and reads the opponent's log-probs
from the batch.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch

from spin_mega.config import LossConfig
from spin_mega.models.moe import isolated_router_state, routing_padding_mask
from spin_mega.models.packed_attention import packed_seq_params
from spin_mega.training.logprobs import check_label_range, response_rows, sequence_logprobs
from spin_mega.training.loss import spin_loss


class PolicyOpponent(torch.nn.Module):
    """This stage's policy chunk and, in fused mode, the opponent's chunk of the same stage."""

    def __init__(
        self, policy: torch.nn.Module, opponent: Optional[torch.nn.Module], vocab_size: int, logprob_impl: str,
        packed_backend: str = "sdpa_per_segment",
    ):
        super().__init__()
        self.policy = policy
        # Held outside the module tree: the opponent is frozen and must stay out of DDP buffers,
        # optimizer parameters and the policy's checkpoints.
        self._opponent = [opponent] if opponent is not None else []
        self.vocab_size = vocab_size
        self.logprob_impl = logprob_impl
        self.packed_backend = packed_backend  # models/packed_attention.choose_backend
        self._input_tensor: Optional[torch.Tensor] = None

    @property
    def module(self) -> torch.nn.Module:
        """Megatron finds model attributes (config, pre_process, the shared embedding) by following
        `.module` through wrappers; this leads it to the policy."""
        return self.policy

    @property
    def opponent(self) -> Optional[torch.nn.Module]:
        return self._opponent[0] if self._opponent else None

    def set_input_tensor(self, tensor) -> None:
        if isinstance(tensor, (list, tuple)):
            tensor = tensor[0]
        self._input_tensor = tensor

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor,
        rows: Optional[torch.Tensor] = None,
        packed=None,
        segments: Optional[tuple[torch.Tensor, int, int]] = None,
    ) -> torch.Tensor:
        """Non-last stages return hidden states [s, b', h]; the last stage returns per-sequence log-prob sums:
        [2B] for the policy, followed by the opponent's [2B] in fused mode. `rows`: the labelled positions
        (`response_rows`), precomputed on the host. A packed micro-batch (one row of many sequences) brings
        its `packed` sequence parameters and the `segments` its sums are taken over."""
        # The chunk's own flag: under interleaving only the last chunk of the last stage ends the model.
        last_stage = self.policy.post_process
        incoming = self._input_tensor
        opponent = self.opponent
        if incoming is not None and opponent is not None:
            half = incoming.shape[1] // 2
            self.policy.set_input_tensor(incoming[:, :half])
            opponent.set_input_tensor(incoming[:, half:].detach())
        elif incoming is not None:
            self.policy.set_input_tensor(incoming)
        # MoE: right padding stays out of the routers' balancing statistics (None for a dense model). A packed
        # row [1, t] has padding only after its last sequence, which is what the mask marks there too.
        padding = routing_padding_mask(self.policy, labels)
        moe_kwargs = {} if padding is None else {"padding_mask": padding}
        policy_hidden = self.policy(input_ids, position_ids, None, packed_seq_params=packed, **moe_kwargs)
        if last_stage:
            outputs = [sequence_logprobs(self.policy, policy_hidden, labels, self.vocab_size, self.logprob_impl, rows, segments)]
        else:
            outputs = [policy_hidden]
        if opponent is not None:
            # The balancing loss and the routers' running counts belong to the policy alone (models/moe.py).
            with torch.no_grad(), isolated_router_state(opponent):
                opponent_hidden = opponent(input_ids, position_ids, None, packed_seq_params=packed, **moe_kwargs)
                if last_stage:
                    opponent_hidden = sequence_logprobs(
                        opponent, opponent_hidden, labels, self.vocab_size, self.logprob_impl, rows, segments
                    )
            outputs.append(opponent_hidden)
        return torch.cat(outputs, dim=0 if last_stage else 1)


def _loss_func(batch: dict, loss_cfg: LossConfig, fused: bool, output: torch.Tensor):
    n = batch["num_response_tokens"].numel() // 2  # pairs in this micro-batch
    policy = output[: 2 * n]
    if fused:
        opponent = output[2 * n :]
    else:
        opponent = batch["opponent_logps"].to(policy.device)
    # Counted from the labels on the host, so every log-prob path (and under PP the last stage) has them.
    tokens = batch["num_response_tokens"].to(policy.device, torch.float32)
    out = spin_loss(
        policy[:n], policy[n:], opponent[:n], opponent[n:], beta=loss_cfg.beta, loss_type=loss_cfg.loss_type,
        label_smoothing=loss_cfg.label_smoothing, sft_weight=loss_cfg.sft_weight,
        chosen_tokens=tokens[:n], rejected_tokens=tokens[n:],
    )
    # megatron divides each micro-batch's loss by the micro-batch count M; `loss_scale` = n M / P (P: this
    # rank's pairs in the step) turns that into the per-pair mean of the step whatever n each micro-batch
    # holds (packed rows hold different counts; padded ones n = P / M, a scale of exactly 1).
    loss = out.loss * batch.get("loss_scale", 1.0)
    # Sums (not means) over the micro-batch's pairs, reduced later over micro-batches and DP ranks.
    stats = torch.stack(
        [
            out.loss.detach() * n,
            out.reward_chosen.sum(),
            out.reward_rejected.sum(),
            out.reward_accuracy.sum(),
            torch.tensor(float(n), device=policy.device),
            (out.reward_chosen.abs() + out.reward_rejected.abs()).sum(),
            policy[:n].detach().sum(),
            policy[n:].detach().sum(),
            tokens[:n].sum(),
            tokens[n:].sum(),
            out.sft_nll.sum(),
        ]
    )
    return loss, {"stats": stats}


STAT_NAMES = (
    "loss", "reward_chosen", "reward_rejected", "reward_accuracy", "pairs", "reward_abs", "logp_chosen",
    "logp_rejected", "chosen_tokens", "rejected_tokens", "sft_nll",
)


def _unwrap(model) -> PolicyOpponent:
    return model if isinstance(model, PolicyOpponent) else model.module


def _host_label_rows(batch: dict, model) -> torch.Tensor:
    """Check the batch's labels and find its labelled positions on the host copy, once per micro-batch:
    the kernels then skip their per-call check, and the device never waits on the host for either."""
    check_label_range(batch["labels"], _unwrap(model).vocab_size)
    return response_rows(batch["labels"])


def _model_inputs(batch: dict, model, device: torch.device) -> dict:
    """The model's arguments for one micro-batch, moved to `device` without waiting for the copies."""
    inputs = {
        "input_ids": batch["input_ids"].to(device, non_blocking=True),
        "position_ids": batch["position_ids"].to(device, non_blocking=True),
        "labels": batch["labels"].to(device, non_blocking=True),
        "rows": _host_label_rows(batch, model).to(device, non_blocking=True),
    }
    if "cu_seqlens" in batch:
        inputs["packed"] = packed_seq_params(batch["cu_seqlens"], device, _unwrap(model).packed_backend)
        sequences = batch["num_response_tokens"].numel()
        inputs["segments"] = (batch["logp_slots"].to(device, non_blocking=True), sequences, batch["logp_width"])
    return inputs


def make_forward_step(loss_cfg: LossConfig, fused: bool) -> Callable:
    def forward_step(data_iterator, model: PolicyOpponent):
        batch = next(data_iterator)
        output = model(**_model_inputs(batch, model, next(model.parameters()).device))
        return output, partial(_loss_func, batch, loss_cfg, fused)

    return forward_step


def make_logprob_step() -> Callable:
    """Forward-only step returning per-sequence log-probs (the precompute pass of the opponent)."""

    def forward_step(data_iterator, model: PolicyOpponent):
        batch = next(data_iterator)
        output = model(**_model_inputs(batch, model, next(model.parameters()).device))

        def collect(out):
            return torch.zeros((), device=out.device), {"logps": out.detach().float(), "index": batch["index"]}

        return output, collect

    return forward_step
