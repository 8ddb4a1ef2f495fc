"""The mixture-of-experts load-balancing loss of one optimizer step, for metrics.jsonl.

megatron-core's routers add the balancing loss to the gradient themselves (an autograd function on the routing
probabilities, scaled by the schedule like the main loss) and record each layer's loss, divided by its
coefficient, in a process-wide tracker, summed over the step's micro-batches. This reads the tracker once per
step on every rank, puts the layers of all pipeline stages together, sums the tensor-parallel ranks' parts
(each routed its own share of the tokens) and averages over data-parallel ranks, then clears it for the next
step. Collective: every rank calls it after the step's forward and backward.

    aux_loss = coefficient x sum over MoE layers of the layer's balancing loss, averaged over micro-batches
               and data-parallel ranks: exactly what was added to the policy's SPIN loss

The SPIN loss itself (`loss`, ln 2 at the first step) is logged without it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from spin_mega.config import ModelConfig

TRACKER_NAME = "load_balancing_loss"  # megatron-core's name for the switch-transformer loss


def step_aux_loss(model: ModelConfig, num_microbatches: int, device: torch.device) -> Optional[float]:
    """The step's balancing loss as added to the loss; None for a dense model or without a coefficient."""
    if not model.is_moe or model.moe_aux_loss_coeff <= 0:
        return None
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    per_layer = torch.zeros(model.num_layers, dtype=torch.float32, device=device)
    if TRACKER_NAME in tracker:  # absent on a rank until its stage has routed in training
        per_layer += tracker[TRACKER_NAME]["values"].to(device, torch.float32)
    dist.all_reduce(per_layer, group=parallel_state.get_pipeline_model_parallel_group())
    dist.all_reduce(per_layer, group=parallel_state.get_tensor_model_parallel_group())
    per_layer /= parallel_state.get_data_parallel_world_size()
    dist.all_reduce(per_layer, group=parallel_state.get_data_parallel_group())
    clear_aux_losses_tracker()
    return model.moe_aux_loss_coeff * per_layer.sum().item() / num_microbatches
