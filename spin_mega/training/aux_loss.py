"""The mixture-of-experts load-balancing loss of one optimizer step, for metrics.jsonl.

megatron-core's routers add the balancing loss to the gradient themselves (an autograd function on the routing
probabilities, scaled by the schedule like the main loss) and record each layer's loss, divided by its
coefficient, in a process-wide tracker, summed over the step's micro-batches. Every rank reads the tracker once
per step (and clears it for the next); the trainer sums the per-layer vectors over all ranks in the step's one
all-reduce (training/health.py), which puts the layers of all pipeline stages together, sums the
tensor-parallel ranks' parts (each routed its own share of the tokens) and the data-parallel ranks' (averaged
here: the world is tensor x pipeline x data parallel; spin-mega sets no context parallelism).

    aux_loss = coefficient x sum over MoE layers of the layer's balancing loss, averaged over micro-batches
               and data-parallel ranks: exactly what was added to the policy's SPIN loss

The SPIN loss itself (`loss`, ln 2 at the first step) is logged without it.
"""

from __future__ import annotations

from typing import Optional

import torch

from spin_mega.config import ModelConfig

TRACKER_NAME = "load_balancing_loss"  # megatron-core's name for the switch-transformer loss


def local_aux_losses(model: ModelConfig, device: torch.device) -> Optional[torch.Tensor]:
    """This rank's per-layer balancing losses of the step (float64, zero for layers of other stages), the
    tracker cleared; None for a dense model or without a coefficient. Not collective."""
    if not model.is_moe or model.moe_aux_loss_coeff <= 0:
        return None
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    per_layer = torch.zeros(model.num_layers, dtype=torch.float64, device=device)
    if TRACKER_NAME in tracker:  # absent on a rank until its stage has routed in training
        per_layer += tracker[TRACKER_NAME]["values"].to(device, torch.float64)
    clear_aux_losses_tracker()
    return per_layer


def step_aux_loss(model: ModelConfig, world_sum: torch.Tensor, num_microbatches: int, data_parallel_size: int) -> float:
    """The step's balancing loss as added to the loss, from `local_aux_losses` summed over every rank."""
    return model.moe_aux_loss_coeff * world_sum.sum().item() / data_parallel_size / num_microbatches
