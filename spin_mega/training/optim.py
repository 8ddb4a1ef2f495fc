"""Optimizer and learning-rate schedule, through Megatron's optimizer wrappers.

Megatron's wrappers keep fp32 main weights for bf16 models, clip the gradient norm over the whole
model-parallel group and checkpoint optimizer state reshardably. They build Adam or SGD themselves; for
RMSProp (the paper's optimizer) the same wrapper is built and its inner torch optimizer swapped for
torch.optim.RMSprop over the same main-parameter groups. Megatron's distributed optimizer (ZeRO-1) shards
Adam state only and needs NCCL's reduce-scatter, so it is used for AdamW on GPUs.
"""

from __future__ import annotations

import math

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from spin_mega.config import OptimConfig


def uses_distributed_optimizer(optim: OptimConfig, want_distributed: bool) -> bool:
    return want_distributed and optim.optimizer == "adamw" and torch.cuda.is_available()


def _init_rmsprop_state(opt: torch.optim.Optimizer, config=None) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            if len(opt.state[p]) == 0:
                opt.state[p]["step"] = torch.zeros((), dtype=torch.float32)
                opt.state[p]["square_avg"] = torch.zeros_like(p.data)


def build_optimizer(optim: OptimConfig, model_chunks: list, dtype: torch.dtype, distributed: bool):
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=uses_distributed_optimizer(optim, distributed),
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    if optim.optimizer == "rmsprop":
        for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
            wrapper.optimizer = torch.optim.RMSprop(
                wrapper.optimizer.param_groups,
                lr=optim.lr,
                alpha=optim.rmsprop_alpha,
                eps=optim.eps,
                weight_decay=optim.weight_decay,
            )
            wrapper.init_state_fn = _init_rmsprop_state
    return optimizer


def build_scheduler(optim: OptimConfig, optimizer, total_steps: int) -> OptimizerParamScheduler:
    warmup = int(math.floor(optim.warmup_ratio * total_steps))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=warmup,
        # Megatron counts decay steps from zero including warm-up; at least one step past warm-up keeps
        # its assertion (decay_steps > warmup_steps) for very short runs.
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=optim.decay,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
