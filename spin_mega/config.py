"""Run configuration: typed dataclasses loaded from YAML, with `--set dotted.key=value` overrides.

Unknown keys and values of the wrong type are rejected with a message naming the dotted key, so a typo
in a 7B recipe fails in the first second instead of silently training with a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from spin_mega.errors import ConfigError


@dataclass
class ModelConfig:
    """The transformer's shape. With `hf_config` set, the shape is read from that HF config.json (or the
    directory holding it) and the fields below are ignored."""

    hf_config: Optional[str] = None
    architecture: Literal["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"] = "llama"
    vocab_size: int = 512
    hidden_size: int = 256
    ffn_hidden_size: int = 688
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    # Llama-3 style scaling: {"rope_type": "llama3", "factor": ..., "low_freq_factor": ...,
    # "high_freq_factor": ..., "original_max_position_embeddings": ...}
    rope_scaling: Optional[dict] = None
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    # Mistral's sliding attention window. Training attends over the full causal context, which is the same
    # thing only while sequences fit the window: data.max_length must not exceed it.
    sliding_window: Optional[int] = None
    init_std: float = 0.02
    # Mixture of experts (Qwen3-MoE, Mixtral; spin_mega/models/moe.py): every layer's MLP is `num_experts`
    # SwiGLU experts of width `moe_ffn_hidden_size`, each token routed to `moe_router_topk` of them. null: dense.
    num_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_topk: int = 2
    # The top-k routing weights renormalised to sum to 1 (Mixtral always; Qwen3-MoE's `norm_topk_prob`), or
    # the full softmax's probabilities of the chosen experts as they are.
    moe_norm_topk_prob: bool = True
    # Coefficient of the load-balancing loss added per MoE layer to the policy's loss (HF `router_aux_loss_coef`).
    moe_aux_loss_coeff: float = 0.0

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def qk_layernorm(self) -> bool:
        """Qwen3 normalises each query and key head (RMSNorm over head_dim) before RoPE: megatron-core's
        qk_layernorm. The architecture decides it; it is not a separate key."""
        return self.architecture in QK_NORM_ARCHITECTURES


QK_NORM_ARCHITECTURES = ("qwen3", "qwen3_moe")


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # Sequence parallelism splits norms/dropout activations along the sequence when TP > 1, with or without
    # Transformer Engine (models/norm.py), on GPU and on CPU alike.
    sequence_parallel: bool = True
    # Megatron's distributed optimizer shards fp32 main weights and optimizer state (AdamW or RMSProp) over
    # data-parallel ranks (ZeRO-1); see training/optim.py.
    distributed_optimizer: bool = True
    # Megatron's overlap of the data-parallel gradient reduction with the backward (bucketed, launched
    # from the backward hooks of the last micro-batch). null: on with CUDA (NCCL) and DP > 1; on CPU,
    # gloo's collectives share the cores with the backward, so there is nothing to overlap.
    overlap_grad_reduce: Optional[bool] = None
    # Interleaved pipeline schedule: model chunks per pipeline stage (1: plain 1F1B). Shrinks the bubble
    # from (pp-1)/m to (pp-1)/(v*m) for v times more stage-to-stage messages (parallel/layout.py).
    virtual_pipeline_parallel: int = 1
    # Layers of the first and last pipeline stages when they should differ from an even split; the stages
    # between share the rest equally. Unset: even when the layers divide, else parallel/layout.py's default.
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    # Expert parallelism (mixture-of-experts models): each of `expert_parallel` ranks holds 1/EP of every MoE
    # layer's experts; the EP ranks are carved out of the data-parallel ones. `expert_tensor_parallel` splits
    # each expert's weights over that many ranks (1: whole experts, the usual choice for many small experts).
    expert_parallel: int = 1
    expert_tensor_parallel: int = 1


@dataclass
class DataConfig:
    # SFT data for generation, or SPIN pair rows (prompt, chosen, rejected) for `train`: a .jsonl,
    # .json or .parquet file, a directory written by `datasets.Dataset.save_to_disk`, a folder of parquet
    # shards or a dataset name in the datasets cache, either of the last two as SOURCE:SPLIT.
    train_path: Optional[str] = None
    # The held-out rows `spin-mega run` evaluates every model on (prompt and response, optionally answer),
    # in any of train_path's forms; null: no held-out evaluation.
    eval_path: Optional[str] = None
    schema: Literal["auto", "ultrachat", "prompt_response", "pairs", "spin"] = "auto"
    tokenizer: Optional[str] = None  # defaults to the start model's directory
    max_prompt_length: int = 256
    max_length: int = 512
    # What to do with a prompt longer than max_prompt_length: drop the row or keep its last tokens.
    prompt_truncation: Literal["drop", "keep_end"] = "keep_end"
    max_samples: Optional[int] = None
    shuffle_seed: int = 1234
    # Chat-template options of the model's SFT, applied alike in generation, training and evaluation
    # (data/chat.py): a system turn put before prompts that have none ("" for zephyr-7b-sft-full's empty
    # one; null: none), and BOS: "auto" adds the tokenizer's BOS when the template does not write it.
    system_prompt: Optional[str] = None
    add_bos: Literal["auto", "never"] = "auto"
    # Sequence packing (data/packing.py, docs/packing.md): each micro-batch is one row of many pairs'
    # sequences, at most pack_tokens tokens, attention kept within each sequence; no FLOP goes to padding.
    # null pack_tokens: 2 x train.micro_batch_size x max_length (a padded micro-batch at the length limit).
    # On by default: same losses as padding, no FLOPs on padding (docs/packing.md); false: one padded row
    # per sequence.
    packing: bool = True
    pack_tokens: Optional[int] = None


@dataclass
class LossConfig:
    """The preference loss (training/loss.py; formulas, closed forms and the keys that combine in
    docs/losses.md)."""

    beta: float = 0.1
    # logistic and hinge: the SPIN paper's; ipo: squared distance of the per-token-mean log-ratio margin
    # from 1/(2 beta); robust: the logistic loss corrected for a fraction label_smoothing of flipped pairs.
    loss_type: Literal["logistic", "hinge", "ipo", "robust"] = "logistic"
    # The fraction of pairs assumed mislabelled, in [0, 0.5): logistic smooths towards it (conservative DPO),
    # robust corrects for it; hinge and ipo take none.
    label_smoothing: float = 0.0
    # Adds this times the policy's negative log-likelihood per token of the human (chosen) response.
    sft_weight: float = 0.0


@dataclass
class OptimConfig:
    optimizer: Literal["rmsprop", "adamw"] = "rmsprop"
    lr: float = 5e-7
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    eps: float = 1e-8
    rmsprop_alpha: float = 0.99
    warmup_ratio: float = 0.1
    decay: Literal["linear", "cosine", "constant"] = "linear"
    clip_grad: float = 1.0


@dataclass
class TrainConfig:
    micro_batch_size: int = 1  # pairs per micro-batch per data-parallel rank
    global_batch_size: int = 64  # pairs per optimizer step, over all data-parallel ranks
    epochs: float = 2.0
    max_steps: Optional[int] = None
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    opponent: Literal["precompute", "fused"] = "precompute"
    # How per-sequence log-probs are computed (training/logprobs.py): auto is the kernel fused with the output
    # layer; `triton` materialises logits then runs the log-prob kernel; `reference` is float64 PyTorch.
    logprobs: Literal["auto", "fused_linear", "triton", "reference"] = "auto"
    seed: int = 1234
    save_interval: int = 0  # optimizer steps between checkpoints; 0 saves only at the end
    log_interval: int = 1
    length_buckets: int = 8  # micro-batches are drawn from pairs of similar length to cut padding
    # Activation recomputation (megatron-core): "selective" recomputes core attention only, "full" every
    # layer from its input (one layer input kept per layer).
    recompute: Literal["none", "selective", "full"] = "none"
    # False: no checkpoint at all, not even the final one (benchmarks time steps of models too big to save
    # casually); a preemption signal still saves, since that is what the signal asks for.
    save_checkpoints: bool = True
    # Collapse: the policy's mean log-prob per token of the human (chosen) responses falling this many nats
    # below the opponent's (the iteration's start). Reported once, or stops training with on_collapse: stop.
    collapse_bound: float = 1.0
    on_collapse: Literal["warn", "stop"] = "warn"
    # Dense bf16 TFLOP/s per GPU that MFU is quoted against; null: the datasheet peak of the GPU found
    # (A100, H100 SXM/PCIe/NVL, H200, B200; training/telemetry.py). Set it for other GPUs or clocks.
    peak_tflops: Optional[float] = None


@dataclass
class GenerationConfig:
    backend: Literal["vllm", "hf"] = "vllm"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    # vLLM's KV cache per engine in GiB, in place of the gpu_memory_utilization share. On CPU that share is
    # of host memory (0.3 takes 7 GB of a 23 GB machine, sized by a warm-up pass), far more than a small
    # model's few thousand sequences need; an explicit size also lets vLLM skip that warm-up. null: the share.
    kv_cache_gb: Optional[float] = None
    # true: vLLM's engine core runs inside the generating process instead of a process of its own (and, on
    # CPU, a third one for its worker). Same samples; on CPU it saves starting Python, torch and vLLM twice
    # per generation stage. On GPUs leave it false: the separate engine overlaps scheduling with the model.
    engine_in_process: bool = False
    enforce_eager: bool = False
    batch_size: int = 64  # prompts per hf-backend batch and per flush of results to disk
    dtype: str = "auto"
    # Engines `spin-mega run` starts per node, each answering a shard of the prompts: 0 = one per
    # tensor_parallel_size GPUs of the node (one on CPU).
    engines: int = 0


@dataclass
class IterationConfig:
    """The SPIN loop's iterations. `lr` and `beta`, when set, are per-iteration schedules (lists indexed by
    iteration, the last entry repeating: the authors' recipe changes both between iterations) that take the
    place of optim.lr and loss.beta; null, every iteration trains at optim.lr and loss.beta. A schedule and
    its single value set together are refused (validate_run): one key per value."""

    num_iterations: int = 3
    lr: Optional[list[float]] = None
    beta: Optional[list[float]] = None
    # Iteration t trains on its own pairs plus this many earlier iterations' pairs (the paper's
    # recipe trained iteration t on the pairs of t-1 and t).
    mix_previous_iterations: int = 1
    num_prompts: Optional[int] = None  # prompts sampled from the SFT data per iteration; None: all
    # False: every iteration uses the same prompt sample (the authors reused one 50k set); true: each
    # iteration draws its own.
    resample_prompts: bool = False


@dataclass
class EvalConfig:
    """How the loop evaluates (the held-out rows themselves are data.eval_path)."""

    max_samples: int = 64
    max_new_tokens: int = 32
    lm_eval_tasks: list[str] = field(default_factory=list)
    # lm-evaluation-harness (spin_mega/evaluation/leaderboard.py): entries TASK or TASK:SHOTS, or the preset
    # open_llm_leaderboard_v1; a folder of extra task YAMLs; requests per batch; examples per task (None: all).
    lm_eval_include_path: Optional[str] = None
    lm_eval_batch_size: int = 8
    lm_eval_limit: Optional[int] = None


@dataclass
class WandbConfig:
    # off, offline (run files under WORKDIR/wandb, `wandb sync` them later; no network) or online.
    mode: Literal["off", "offline", "online"] = "off"
    project: str = "spin-mega"
    # This run's name (default: the work directory's name). `spin-mega run` names each iteration's training
    # NAME/iter_T and sets group to NAME, so the iterations of one loop appear together.
    name: Optional[str] = None
    group: Optional[str] = None


@dataclass
class LoggingConfig:
    """Experiment trackers fed with every scalar of metrics.jsonl (training/trackers.py, docs/tracking.md)."""

    tensorboard: bool = False  # event files under WORKDIR/tensorboard
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class SpinConfig:
    start_model: Optional[str] = None  # HF model directory, or a Megatron checkpoint written by spin-mega
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    iterations: IterationConfig = field(default_factory=IterationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks (and where lossless, converts) `value` to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-7` (no dot) as a string; users write learning rates that way.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


# Keys that were renamed: naming the new key beats a list of every known one.
RENAMED_KEYS = {
    "train.recompute_activations": "train.recompute (none, selective or full)",
    "eval.eval_path": "data.eval_path (the held-out data, beside data.train_path)",
}


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in known:
            dotted = f"{prefix}.{name}" if prefix else name
            if dotted in RENAMED_KEYS:
                raise ConfigError(f"config key '{dotted}' was replaced by {RENAMED_KEYS[dotted]}")
            raise ConfigError(f"unknown config key '{dotted}' (known keys here: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in raw.items():
        dotted = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], dotted)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects dotted.key=value, got {text!r}")
    key, raw_value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects dotted.key=value, got {text!r}")
    # YAML scalars: 1e-7, true, null, [1, 2] all parse as a user would expect.
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict, overrides: Optional[list[str]] = None) -> SpinConfig:
    raw = apply_overrides(dict(raw or {}), list(overrides or []))
    cfg = _build(SpinConfig, raw)
    validate(cfg)
    return cfg


# Shipped configurations reachable by a short name in place of a file (spin-mega run paper ...).
PRESETS = {
    "paper": "zephyr-7b-spin-paper.yaml",
    "tiny-cpu": "tiny-cpu.yaml",
    "zephyr-7b-spin": "zephyr-7b-spin.yaml",
    "qwen3-8b-spin": "qwen3-8b-spin.yaml",
    "qwen3-30b-a3b-spin": "qwen3-30b-a3b-spin.yaml",
}


def load_config(path: Optional[str | Path], overrides: Optional[list[str]] = None) -> SpinConfig:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file() and str(path) in PRESETS:
            import spin_mega.configs

            path = Path(spin_mega.configs.__file__).parent / PRESETS[str(path)]
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return config_from_dict(raw, overrides)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric key: above `low` (or at it, unless `low_open`), below `high` (or at
    it, unless `high_open`), and always finite."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if value != value or value in (float("inf"), float("-inf")):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.high is None:
            if self.low == 0:
                return "positive" if self.low_open else "0 or more"
            return f"{'above' if self.low_open else 'at least'} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
SHARE = Range(0, 1, low_open=True)  # (0, 1]

# The valid range of every numeric key (None values of optional keys are always allowed; every entry of a
# list key is checked). tests/training/test_config.py fails when a numeric key is missing here.
NUMERIC_RANGES: dict[str, Range] = {
    "model.vocab_size": AT_LEAST_1,
    "model.hidden_size": AT_LEAST_1,
    "model.ffn_hidden_size": AT_LEAST_1,
    "model.num_layers": AT_LEAST_1,
    "model.num_attention_heads": AT_LEAST_1,
    "model.num_query_groups": AT_LEAST_1,
    "model.head_dim": AT_LEAST_1,
    "model.max_position_embeddings": AT_LEAST_1,
    "model.rope_theta": POSITIVE,
    "model.rms_norm_eps": POSITIVE,
    "model.sliding_window": AT_LEAST_1,
    "model.init_std": POSITIVE,
    "model.num_experts": AT_LEAST_1,
    "model.moe_ffn_hidden_size": AT_LEAST_1,
    "model.moe_router_topk": AT_LEAST_1,
    "model.moe_aux_loss_coeff": NON_NEGATIVE,  # 0: no balancing loss
    "parallel.tensor_parallel": AT_LEAST_1,
    "parallel.pipeline_parallel": AT_LEAST_1,
    "parallel.virtual_pipeline_parallel": AT_LEAST_1,
    "parallel.first_stage_layers": AT_LEAST_1,
    "parallel.last_stage_layers": AT_LEAST_1,
    "parallel.expert_parallel": AT_LEAST_1,
    "parallel.expert_tensor_parallel": AT_LEAST_1,
    "data.max_prompt_length": AT_LEAST_1,
    "data.max_length": Range(2),
    "data.max_samples": AT_LEAST_1,
    "data.shuffle_seed": NON_NEGATIVE,  # numpy's generators refuse negative seeds
    "data.pack_tokens": AT_LEAST_1,  # and at least data.max_length when packing (_validate_packing)
    "loss.beta": POSITIVE,
    "loss.label_smoothing": Range(0, 0.5, high_open=True),  # the fraction of pairs assumed mislabelled
    "loss.sft_weight": NON_NEGATIVE,
    "optim.lr": POSITIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.adam_beta1": FRACTION,
    "optim.adam_beta2": FRACTION,
    "optim.eps": NON_NEGATIVE,
    "optim.rmsprop_alpha": FRACTION,
    "optim.warmup_ratio": FRACTION,
    "optim.clip_grad": NON_NEGATIVE,  # 0: no clipping
    "train.micro_batch_size": AT_LEAST_1,
    "train.global_batch_size": AT_LEAST_1,
    "train.epochs": POSITIVE,
    "train.max_steps": AT_LEAST_1,
    "train.seed": NON_NEGATIVE,
    "train.save_interval": NON_NEGATIVE,  # 0: only at the end
    "train.log_interval": AT_LEAST_1,
    "train.length_buckets": AT_LEAST_1,
    "train.collapse_bound": POSITIVE,
    "train.peak_tflops": POSITIVE,
    "generation.temperature": NON_NEGATIVE,  # 0: greedy
    "generation.top_p": SHARE,
    "generation.max_new_tokens": AT_LEAST_1,
    "generation.seed": NON_NEGATIVE,
    "generation.tensor_parallel_size": AT_LEAST_1,
    "generation.gpu_memory_utilization": SHARE,
    "generation.kv_cache_gb": POSITIVE,  # GiB; null: the gpu_memory_utilization share
    "generation.batch_size": AT_LEAST_1,
    "generation.engines": NON_NEGATIVE,  # 0: one per tensor_parallel_size GPUs
    "iterations.num_iterations": AT_LEAST_1,
    "iterations.lr": POSITIVE,
    "iterations.beta": POSITIVE,
    "iterations.mix_previous_iterations": NON_NEGATIVE,
    "iterations.num_prompts": AT_LEAST_1,
    "eval.max_samples": AT_LEAST_1,
    "eval.max_new_tokens": AT_LEAST_1,
    "eval.lm_eval_batch_size": AT_LEAST_1,
    "eval.lm_eval_limit": AT_LEAST_1,
}


def _refuse(key: str, value: Any, requirement: str) -> ConfigError:
    return ConfigError(f"{key} is {value!r} but must be {requirement}; set it in the config file or with --set {key}=VALUE")


def _check_ranges(cfg: SpinConfig) -> None:
    for key, valid in NUMERIC_RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, list):
            if not value:
                raise _refuse(key, value, "a list of at least one value (the last entry repeats)")
            for i, entry in enumerate(value):
                if not valid.holds(entry):
                    raise _refuse(f"{key}[{i}]", entry, valid.describe())
        elif value is not None and not valid.holds(value):
            raise _refuse(key, value, valid.describe())


def validate(cfg: SpinConfig) -> None:
    """Every numeric key within its range (NUMERIC_RANGES), then the checks that span several keys."""
    _check_ranges(cfg)
    t, p, o = cfg.train, cfg.parallel, cfg.optim
    if t.global_batch_size < t.micro_batch_size:
        raise ConfigError("train.global_batch_size must be at least train.micro_batch_size")
    from spin_mega.parallel.layout import check_virtual_pipeline

    check_virtual_pipeline(p.pipeline_parallel, p.virtual_pipeline_parallel)
    if o.min_lr > o.lr:
        raise ConfigError(
            f"optim.min_lr ({o.min_lr:g}) is above optim.lr ({o.lr:g}), so the schedule would decay upwards; "
            "lower optim.min_lr or raise optim.lr"
        )
    _validate_loss(cfg.loss)
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ConfigError("data.max_prompt_length must be smaller than data.max_length")
    _validate_packing(cfg.data)
    m = cfg.model
    if m.hf_config is None:
        if m.num_attention_heads % m.num_query_groups:
            raise ConfigError("model.num_attention_heads must be a multiple of model.num_query_groups")


# The per-iteration schedules and the single values they take the place of.
SCHEDULED = {"iterations.lr": "optim.lr", "iterations.beta": "loss.beta"}


def _key(cfg: Any, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def validate_run(cfg: SpinConfig) -> None:
    """What `spin-mega run` adds. The precedence of a schedule over its single value: a schedule
    (iterations.lr, iterations.beta) replaces optim.lr / loss.beta in every iteration, so setting both is
    refused; a single value at its default counts as not set (a saved config holds every key). Each
    iteration's learning rate must stay at or above optim.min_lr (checked under the key the user sets)."""
    defaults = SpinConfig()
    for schedule, single in SCHEDULED.items():
        if _key(cfg, schedule) is not None and _key(cfg, single) != _key(defaults, single):
            raise ConfigError(
                f"{single} ({_key(cfg, single):g}) and {schedule} ({_key(cfg, schedule)}) are both set, and the "
                f"schedule would replace {single} in every iteration: set only one, {single} for every iteration "
                f"or {schedule} per iteration"
            )
    for i, lr in enumerate(cfg.iterations.lr or []):
        if cfg.optim.min_lr > lr:
            raise ConfigError(
                f"iterations.lr[{i}] ({lr:g}) is below optim.min_lr ({cfg.optim.min_lr:g}), so that iteration's "
                "schedule would decay upwards; lower optim.min_lr or raise iterations.lr"
            )


def iteration_lr(cfg: SpinConfig, t: int) -> float:
    """The learning rate iteration t trains at: iterations.lr[t] (the last entry repeating) when the
    schedule is set, else optim.lr."""
    return per_iteration(cfg.iterations.lr, t) if cfg.iterations.lr is not None else cfg.optim.lr


def iteration_beta(cfg: SpinConfig, t: int) -> float:
    """Iteration t's beta: iterations.beta[t] (the last entry repeating) when set, else loss.beta."""
    return per_iteration(cfg.iterations.beta, t) if cfg.iterations.beta is not None else cfg.loss.beta


def _validate_loss(loss: LossConfig) -> None:
    if loss.label_smoothing and loss.loss_type in ("hinge", "ipo"):
        raise ConfigError(
            f"loss.label_smoothing applies to the logistic and robust losses only; the {loss.loss_type} loss has "
            "no smoothed form, so set loss.label_smoothing to 0"
        )
    if loss.loss_type == "robust" and not loss.label_smoothing:
        raise ConfigError(
            "loss.loss_type robust needs loss.label_smoothing in (0, 0.5); with 0 it is the logistic loss, so use logistic"
        )


def _validate_packing(d: DataConfig) -> None:
    if not d.packing or d.pack_tokens is None:
        return  # the default row (2 x micro_batch_size x max_length) always holds a whole pair
    if d.pack_tokens < d.max_length:
        raise ConfigError(
            f"data.pack_tokens ({d.pack_tokens}) is smaller than data.max_length ({d.max_length}): a packed row "
            "must hold at least one whole sequence"
        )
    if d.pack_tokens < 2 * (d.max_prompt_length + 1):
        raise ConfigError(
            f"data.pack_tokens ({d.pack_tokens}) cannot hold both sequences of a pair with the longest prompt: "
            f"it must be at least 2 x (data.max_prompt_length + 1) = {2 * (d.max_prompt_length + 1)}"
        )


def per_iteration(values: list, iteration: int):
    """The value of a per-iteration list for `iteration`; the last entry repeats."""
    return values[min(iteration, len(values) - 1)]
