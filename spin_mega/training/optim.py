"""Optimizer and learning-rate schedule, through Megatron's optimizer wrappers.

Megatron's wrappers keep fp32 main weights for bf16 models, clip the gradient norm over the whole
model-parallel group and checkpoint optimizer state reshardably. They build Adam or SGD themselves; for
RMSProp (the paper's optimizer) the same wrapper is built and its inner torch optimizer swapped for
torch.optim.RMSprop over the same main-parameter groups.

Megatron's distributed optimizer (ZeRO-1) works the same way: its constructor insists on Adam, then shards the
fp32 main parameters over the data-parallel ranks and hands the inner optimizer only this rank's shards, so
RMSProp built over those groups keeps `square_avg` for 1/DP of the model per rank. Its checkpoint format
(`fully_sharded_model_space`, the default) names each state tensor by the inner optimizer's own keys and the
model parameter's sharded key, so it reshards over DP, TP and PP; only its load path allocates Adam's
`exp_avg`/`exp_avg_sq` when the state is still empty, which is why RMSProp's state is created at build time
here (zeros and step 0: exactly what RMSprop's first step would create). RMSProp's `step` counter does not
enter its update (no bias correction), so Megatron's Adam-oriented handling of `step` cannot change results.
"""

from __future__ import annotations

import math

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from spin_mega.config import OptimConfig


def uses_distributed_optimizer(optim: OptimConfig, want_distributed: bool) -> bool:
    """The distributed optimizer is used whenever asked for: AdamW and RMSProp, GPU and CPU (gloo)."""
    return want_distributed


def _init_rmsprop_state(opt: torch.optim.Optimizer, config=None) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            if len(opt.state[p]) == 0:
                opt.state[p]["step"] = torch.zeros((), dtype=torch.float32)
                opt.state[p]["square_avg"] = torch.zeros_like(p.data)


def _rmsprop_over(param_groups: list[dict], optim: OptimConfig) -> torch.optim.RMSprop:
    """RMSprop taking over the wrapper's parameter groups as they are (hyper-parameters, Megatron's group keys
    and all). The groups are assigned, not passed to the constructor, as Megatron does for its own inner
    optimizer: the distributed optimizer's fp32 shards are views into the model's parameters, which the
    constructor's leaf-tensor check would refuse."""
    placeholder = torch.zeros(1, requires_grad=True)
    rmsprop = torch.optim.RMSprop([placeholder], lr=optim.lr, alpha=optim.rmsprop_alpha, eps=optim.eps, weight_decay=optim.weight_decay)
    rmsprop.param_groups = [{**rmsprop.defaults, **group} for group in param_groups]
    return rmsprop


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
            wrapper.optimizer = _rmsprop_over(wrapper.optimizer.param_groups, optim)
            wrapper.init_state_fn = _init_rmsprop_state
            if config.use_distributed_optimizer:
                _init_rmsprop_state(wrapper.optimizer)
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
        # On resume the schedule is this run's, not the checkpoint's: a resume may change only the run's length
        # (rundir.RESUME_MAY_CHANGE), and the remaining steps then follow the schedule of the new length; with
        # the checkpoint's, steps past its old end would train at min_lr. The step count is restored either way.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
