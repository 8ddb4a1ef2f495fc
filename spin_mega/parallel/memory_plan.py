"""Per-GPU memory of a SPIN training layout (TP x PP x DP, x EP for mixture-of-experts models), and the fastest
layout that fits.

Pure arithmetic over the model's shape, counted the way the trainer allocates (`spin-mega plan` prints it;
tests compare it with the bytes of the live Megatron model, DDP buffers and optimizer state):

* parameters of a pipeline stage: its layers' weights, TP-sharded except the two RMSNorm weights per
  layer; the embedding [V_padded / TP, h] on the first stage; the final norm and the output layer on the
  last (with tied embeddings and PP > 1 the last stage holds its own copy, as Megatron does). The layers
  per stage are spin_mega.parallel.layout's split (uneven when PP does not divide the layers);
* model weights in the training dtype (2 bytes bf16, 4 fp32), the RMSNorm weights too (models/norm.py
  creates them in the model's dtype);
* gradients: Megatron DDP's fp32 buffer (grad_reduce_in_fp32), 4 bytes per parameter, never sharded;
* fp32 main parameters (bf16 training only) and optimizer state (RMSProp 4 bytes: square average; AdamW 8:
  both moments), divided by DP when the distributed optimizer shards them (parallel.distributed_optimizer,
  the default, for either optimizer: training/optim.py);
* activations kept for backward, per token per layer: the storages Megatron's local layer (the layer used
  without Transformer Engine) saves, as read from a live layer on CPU (tests/parallel/test_memory_plan.py):
  each RMSNorm's input and normalised output (4 h, in fp32: torch's RMSNorm upcasts bf16 input) and
  each linear block's input (2 h), split over TP by sequence parallelism; the fused QKV output (kept alive by the V view), q and k after RoPE and the attention output
  ((3 q + 3 kv) head_dim / TP); the SwiGLU MLP's fc1 output and three ffn-sized intermediates (5 ffn / TP);
  RoPE's cos and sin for q and k (4 head_dim per position). Fused (flash / SDPA) attention: no [s, s]
  scores. Under 1F1B, stage i holds min(PP - i, m) micro-batches of its layers in flight. Full recomputation keeps each
  layer's input plus one layer's activations being recomputed;
* the opponent: `fused` keeps a frozen copy of the stage's weights (and its rows travel with the policy's
  through the pipeline); `precompute` keeps two floats per pair on the host, nothing on the GPU;
* the log-prob head (last stage, one micro-batch at a time): the fused-linear path holds one vocabulary
  chunk of logits (about as large as the hidden states), the unfused path the micro-batch's full logits
  shard (bf16 logits kept for backward plus an fp32 working copy: 6 bytes per element);
* a fixed allowance for NCCL buffers, the CUDA context and allocator slack (3 GiB).

Mixture-of-experts models (Qwen3-MoE, Mixtral; spin_mega/models/moe.py) differ in their MLP:
* parameters: each layer's router (experts x h, replicated over TP) and experts / EP of the experts, each split
  over expert TP (1 unless asked); the expert weights' fp32 main copies and optimizer state are sharded over the
  expert data-parallel ranks (world / (ETP x EP x PP)) by the distributed optimizer, the rest over DP;
* activations per token and layer, as read from the live local MoE layer on CPU (tests/parallel/
  test_memory_plan.py): the top-k copies of the token dispatched to experts (k h), each expert's SwiGLU
  intermediates (fc1's 2 f, three f-sized tensors, and the routing-weighted one: 6 f / ETP per copy, f the
  expert width), the routing weights (4 bytes per copy) and the router's own tensors (indices, scores and the
  token-to-expert map: 28 bytes per copy, 9 per expert); split over TP by sequence parallelism (megatron-core
  trains MoE layers under TP only with it);
* the all-to-all token exchange (the GPU dispatcher): each MoE layer sends the k copies of its tokens that go to
  other EP ranks' experts and receives their outputs back, forward and backward; the cost model adds it (inside
  a node when ETP x EP fits in one, else over the network);
* FLOPs count the router and the k experts a token passes through, not all experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from spin_mega.config import ModelConfig
from spin_mega.errors import ConfigError
from spin_mega.parallel.layout import PipelineLayout, check_expert_parallel, check_tensor_parallel, resolve_layout

GIB = 2**30
VOCAB_DIVISIBLE_BY = 128  # as spin_mega.models.gpt (kept torch-free here so planning needs no torch import)
OVERHEAD_BYTES = 3 * GIB
NORM_ACTIVATION_BYTES = 4  # the tensors the norm saves are fp32 whatever the model's dtype (see above)
# The fused-linear kernel's chunk of logits holds about max(N * H, 2**24) elements (kernels/fused_linear.py).
FUSED_CHUNK_MIN_ELEMENTS = 1 << 24
# The cost model that ranks the layouts that fit: estimated seconds per optimizer step =
#   model FLOPs / (GPUs x nominal peak x ASSUMED_MFU)            compute, spread over every GPU
#   x (1 + pipeline bubble)                                      1F1B: (PP - 1) / m of the ideal time
#   x fullest stage's layers / mean layers per stage             an uneven split runs at its fullest stage's pace
#   x (1 + TP_COST_PER_DOUBLING x log2 TP)                       tensor-parallel collectives (NVLink)
#   x 4/3 with full recomputation                                one more forward per forward + backward
#   + (DP - 1) / DP x stage parameters x bytes / bandwidth       DP traffic, not overlapped (NVLink inside a
#                                                                node, the network across): with the distributed
#                                                                optimizer the fp32 gradient reduce-scatter and
#                                                                the weights' all-gather (4 + dtype bytes),
#                                                                without it the fp32 all-reduce (2 x 4 bytes)
# All four constants are assumptions, stated so that measured figures (benchmarks/gpu) can replace them.
ASSUMED_MFU = 0.4
TP_COST_PER_DOUBLING = 0.04
NVLINK_BYTES_PER_S = 300e9
NETWORK_BYTES_PER_S = 50e9  # one 400 Gb/s InfiniBand rail per GPU


@dataclass(frozen=True)
class PlanRequest:
    model: ModelConfig
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 79.6  # an "80 GB" H100/A100: 81,559 MiB
    seq_len: int = 2048  # prompt + response, per sequence
    micro_batch: int = 1  # pairs per micro-batch per data-parallel rank
    global_batch: int = 64  # pairs per optimizer step
    opponent: Literal["precompute", "fused"] = "precompute"
    optimizer: Literal["rmsprop", "adamw"] = "rmsprop"
    distributed_optimizer: bool = True
    dtype: Literal["bf16", "fp32"] = "bf16"
    logprobs: Literal["fused_linear", "full_logits"] = "fused_linear"
    sequence_parallel: bool = True  # at TP > 1 (the config's default; Megatron's torch norm needs TE for it)
    tensor_parallel: Optional[int] = None  # None: every candidate
    pipeline_parallel: Optional[int] = None
    expert_parallel: Optional[int] = None  # MoE only; None: every candidate dividing the experts
    expert_tensor_parallel: int = 1
    peak_tflops: float = 989.0  # nominal dense bf16 peak per GPU (H100 / H200 SXM)
    pack_tokens: Optional[int] = None  # packed rows of at most this many tokens (data.pack_tokens); None: padded


@dataclass
class StageMemory:
    """Bytes on one GPU of one pipeline stage."""

    stage: int
    layers: int
    params: int
    weights: int
    grads: int
    main_params: int
    optimizer_state: int
    activations: int  # without recomputation
    activations_recompute: int  # with full recomputation
    opponent: int
    logprobs: int
    overhead: int = OVERHEAD_BYTES
    expert_params: int = 0  # the part of `params` in experts (sharded over EP; optimizer state over expert DP)

    @property
    def static(self) -> int:
        return self.weights + self.grads + self.main_params + self.optimizer_state + self.opponent + self.overhead

    @property
    def total(self) -> int:
        return self.static + self.activations + self.logprobs

    @property
    def total_recompute(self) -> int:
        return self.static + self.activations_recompute + self.logprobs


@dataclass
class LayoutPlan:
    tp: int
    pp: int
    dp: int
    microbatches: int
    bubble: float  # idle time relative to the ideal step time (PipelineLayout.bubble_fraction)
    optimizer_sharded: bool
    pipeline: PipelineLayout
    stages: list[StageMemory] = field(default_factory=list)
    fits: bool = False
    recompute: bool = False  # the layout fits only with activation recomputation
    step_seconds: float = math.inf  # the cost model's estimate (see the constants above)
    ep: int = 1
    expert_dp: int = 1  # data-parallel ranks of the expert layers: world / (ETP x EP x PP)
    all_to_all_bytes: int = 0  # per GPU and step: MoE tokens sent to other EP ranks' experts and back

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total_recompute if self.recompute else s.total)

    def peak_bytes(self, recompute: bool) -> int:
        return max(s.total_recompute if recompute else s.total for s in self.stages)


def padded_vocab(vocab_size: int, tp: int) -> int:
    multiple = VOCAB_DIVISIBLE_BY * tp
    return -(-vocab_size // multiple) * multiple


def layer_expert_params(m: ModelConfig, ep: int = 1, etp: int = 1) -> int:
    """Expert weights of one MoE layer on one rank: experts / EP gated MLPs, each split over expert TP."""
    if not m.is_moe:
        return 0
    return m.num_experts // ep * 3 * m.hidden_size * m.moe_ffn_hidden_size // etp


def layer_params(m: ModelConfig, tp: int, ep: int = 1, etp: int = 1) -> int:
    """Parameters of one transformer layer on one TP (and EP / expert-TP) rank."""
    qkv_out = (m.num_attention_heads + 2 * m.num_query_groups) * m.head_dim
    sharded = m.hidden_size * qkv_out + m.num_attention_heads * m.head_dim * m.hidden_size
    if not m.is_moe:
        sharded += m.hidden_size * 2 * m.ffn_hidden_size + m.ffn_hidden_size * m.hidden_size
    if m.qkv_bias:
        sharded += qkv_out
    replicated = 2 * m.hidden_size  # two RMSNorm weights, replicated over TP
    if m.qk_layernorm:
        replicated += 2 * m.head_dim  # Qwen3's query and key norms, one head_dim-sized weight each
    if m.is_moe:
        replicated += m.num_experts * m.hidden_size  # the router
    return sharded // tp + replicated + layer_expert_params(m, ep, etp)


def active_layer_params(m: ModelConfig) -> int:
    """Parameters one token passes through in a layer: a mixture of experts' router and top-k experts only."""
    if not m.is_moe:
        return layer_params(m, 1)
    return layer_params(m, 1) - layer_expert_params(m) + m.moe_router_topk * 3 * m.hidden_size * m.moe_ffn_hidden_size


def total_params(m: ModelConfig) -> int:
    """The model's parameters (unpadded vocabulary), as model cards count them."""
    embeddings = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    return m.num_layers * layer_params(m, 1) + embeddings + m.hidden_size


def active_params(m: ModelConfig) -> int:
    """The parameters one token passes through: for a mixture of experts, the router and top-k experts only."""
    return total_params(m) - m.num_layers * (layer_params(m, 1) - active_layer_params(m))


def stage_layers(num_layers: int, pp: int) -> tuple[int, ...]:
    """Layers per stage: the trainer's default split (even, or the end stages lighter)."""
    return resolve_layout(num_layers, pp).stage_layers


def stage_params(m: ModelConfig, tp: int, pp: int, stage: int, ep: int = 1, etp: int = 1) -> int:
    n = stage_layers(m.num_layers, pp)[stage] * layer_params(m, tp, ep, etp)
    embedding = padded_vocab(m.vocab_size, tp) // tp * m.hidden_size
    if stage == 0:
        n += embedding
    if stage == pp - 1:
        n += m.hidden_size  # final norm
        if not (m.tie_word_embeddings and pp == 1):
            n += embedding
    return n


def moe_activation_bytes(m: ModelConfig, etp: int, dtype_bytes: int) -> float:
    """Bytes an MoE layer's router, dispatch and experts keep per token (before the sequence-parallel split)."""
    k = m.moe_router_topk
    copies = dtype_bytes * k * (m.hidden_size + 6 * m.moe_ffn_hidden_size / etp) + 4 * k
    return copies + 28 * k + 9 * m.num_experts


def layer_activation_bytes(
    m: ModelConfig, tp: int, sequence_parallel: bool, dtype_bytes: int, tokens: int, seq_len: int, etp: int = 1
) -> float:
    """Bytes one transformer layer keeps for backward for a micro-batch of `tokens` tokens in sequences
    of `seq_len` (see the module docstring for the list of tensors)."""
    h_split = tp if (sequence_parallel and tp > 1) else 1
    hidden_bytes = (4 * NORM_ACTIVATION_BYTES + 2 * dtype_bytes) * m.hidden_size / h_split
    if m.is_moe:
        hidden_bytes += moe_activation_bytes(m, etp, dtype_bytes) / h_split
    attention = (3 * m.num_attention_heads + 3 * m.num_query_groups) * m.head_dim
    inner = (attention + (0 if m.is_moe else 5 * m.ffn_hidden_size)) / tp
    if m.qk_layernorm:
        # The query and key norms save their input and output in fp32, as the hidden-size norms do.
        inner += 2 * NORM_ACTIVATION_BYTES / dtype_bytes * (m.num_attention_heads + m.num_query_groups) * m.head_dim / tp
    rope = 4 * m.head_dim * seq_len  # per position, shared by the micro-batch's sequences
    return (hidden_bytes + dtype_bytes * inner) * tokens + dtype_bytes * rope


def plan_layout(req: PlanRequest, tp: int, pp: int, ep: int = 1) -> LayoutPlan:
    m = req.model
    world = req.nodes * req.gpus_per_node
    dp = world // (tp * pp)
    etp = req.expert_tensor_parallel if m.is_moe else 1
    expert_dp = world // (etp * ep * pp)
    micro, tokens = micro_batches_and_tokens(req, dp)
    dtype_bytes = 2 if req.dtype == "bf16" else 4
    sharded = req.distributed_optimizer and dp > 1
    expert_sharded = req.distributed_optimizer and expert_dp > 1
    pipeline = resolve_layout(m.num_layers, pp)
    layout = LayoutPlan(tp, pp, dp, micro, pipeline.bubble_fraction(micro), sharded, pipeline, ep=ep, expert_dp=expert_dp)
    h_split = tp if (req.sequence_parallel and tp > 1) else 1
    layer_input = dtype_bytes * tokens * m.hidden_size / h_split
    one_layer = layer_activation_bytes(m, tp, req.sequence_parallel, dtype_bytes, tokens, req.seq_len, etp)
    state_bytes = {"rmsprop": 4, "adamw": 8}[req.optimizer]
    if m.is_moe:
        # Per MoE layer and micro-batch: the k copies of this rank's tokens that go to other EP ranks, and their
        # outputs back, forward and backward (4 transfers). Counted for the fullest stage.
        per_layer = dtype_bytes * tokens / h_split * m.moe_router_topk * m.hidden_size * (ep - 1) / ep
        layout.all_to_all_bytes = int(4 * per_layer * max(pipeline.stage_layers) * micro)
    for stage, layers in enumerate(pipeline.stage_layers):
        params = stage_params(m, tp, pp, stage, ep, etp)
        experts = layers * layer_expert_params(m, ep, etp)
        dense = params - experts
        in_flight = min(pp - stage, micro)
        shard = dp if sharded else 1
        expert_shard = expert_dp if expert_sharded else 1
        activations = in_flight * (layers * one_layer + layer_input)
        recomputed = in_flight * (layers + 1) * layer_input + one_layer
        opponent = 0
        if req.opponent == "fused":
            # A frozen copy of the stage; its rows ride along in the pipeline's in-flight tensors and its
            # no-grad forward holds about one layer's activations at a time.
            opponent = dtype_bytes * params + in_flight * layer_input + one_layer
        logprobs = 0
        if stage == pp - 1:
            vocab_shard = padded_vocab(m.vocab_size, tp) // tp
            if req.logprobs == "fused_linear":
                chunk = max(tokens * m.hidden_size, FUSED_CHUNK_MIN_ELEMENTS)
                logprobs = dtype_bytes * tokens * m.hidden_size + (dtype_bytes + 4) * min(chunk, tokens * vocab_shard)
            else:
                logprobs = 6 * tokens * vocab_shard
        layout.stages.append(StageMemory(
            stage=stage, layers=layers, params=params, weights=dtype_bytes * params,
            grads=4 * params,
            main_params=(4 * dense // shard + 4 * experts // expert_shard) if req.dtype == "bf16" else 0,
            optimizer_state=state_bytes * dense // shard + state_bytes * experts // expert_shard,
            activations=int(activations), activations_recompute=int(recomputed), opponent=int(opponent),
            logprobs=int(logprobs), expert_params=experts,
        ))
    budget = req.gpu_memory_gib * GIB
    if layout.peak_bytes(False) <= budget:
        layout.fits = True
    elif layout.peak_bytes(True) <= budget:
        layout.fits, layout.recompute = True, True
    layout.step_seconds = estimated_step_seconds(req, layout)
    return layout


def micro_batches_and_tokens(req: PlanRequest, dp: int) -> tuple[int, int]:
    """Micro-batches per step and tokens per micro-batch, at the worst case of every sequence at seq_len:
    padded, micro_batch pairs of chosen + rejected rows; packed, one row of at most pack_tokens tokens
    holding as many whole pairs as fit (at least one: a pair longer than the row is cut to fit it)."""
    pairs = req.global_batch // dp
    if req.pack_tokens is None:
        return pairs // req.micro_batch, 2 * req.micro_batch * req.seq_len  # chosen + rejected
    per_row = max(1, req.pack_tokens // (2 * req.seq_len))
    return -(-pairs // per_row), min(req.pack_tokens, per_row * 2 * req.seq_len)


def model_flops_per_step(req: PlanRequest) -> float:
    """Policy forward + backward (3 forwards) on chosen and rejected, plus the fused opponent's forward."""
    m = req.model
    non_embedding = m.num_layers * active_layer_params(m)
    per_token = 2.0 * (non_embedding + m.hidden_size * m.vocab_size) + 2.0 * m.num_layers * req.seq_len * m.hidden_size
    tokens = 2 * req.global_batch * req.seq_len
    return (3.0 + (1.0 if req.opponent == "fused" else 0.0)) * per_token * tokens


def estimated_step_seconds(req: PlanRequest, layout: LayoutPlan) -> float:
    world = req.nodes * req.gpus_per_node
    compute = model_flops_per_step(req) / (world * req.peak_tflops * 1e12 * ASSUMED_MFU)
    pipeline = layout.pipeline
    imbalance = max(pipeline.stage_layers) * pipeline.pipeline_parallel / pipeline.num_layers
    compute *= (1.0 + layout.bubble) * imbalance * (1.0 + TP_COST_PER_DOUBLING * math.log2(layout.tp))
    if layout.recompute:
        compute *= 4.0 / 3.0
    # Megatron orders ranks TP fastest, then DP: a DP group leaves the node once TP x DP exceeds it.
    bandwidth = NVLINK_BYTES_PER_S if layout.tp * layout.dp <= req.gpus_per_node else NETWORK_BYTES_PER_S
    fullest = max(layout.stages, key=lambda s: s.params)
    per_param = 4 + (2 if req.dtype == "bf16" else 4) if layout.optimizer_sharded else 2 * 4
    dense = fullest.params - fullest.expert_params
    data_parallel = (layout.dp - 1) / layout.dp * per_param * dense / bandwidth
    if fullest.expert_params:
        etp = req.expert_tensor_parallel
        expert_bandwidth = NVLINK_BYTES_PER_S if etp * layout.ep * layout.expert_dp <= req.gpus_per_node else NETWORK_BYTES_PER_S
        data_parallel += (layout.expert_dp - 1) / layout.expert_dp * per_param * fullest.expert_params / expert_bandwidth
        # Megatron orders expert ranks ETP fastest, then EP: an EP group stays in a node while ETP x EP fits.
        a2a_bandwidth = NVLINK_BYTES_PER_S if etp * layout.ep <= req.gpus_per_node else NETWORK_BYTES_PER_S
        data_parallel += layout.all_to_all_bytes / a2a_bandwidth
    return compute + data_parallel


def check_layout(m: ModelConfig, tp: int, pp: int, world: Optional[int] = None, ep: int = 1, etp: int = 1) -> None:
    """One sentence naming the broken constraint, before anything is built."""
    if tp < 1 or pp < 1:
        raise ConfigError(f"tensor and pipeline parallel sizes must be at least 1 (got TP {tp}, PP {pp})")
    check_tensor_parallel(m.num_attention_heads, m.num_query_groups, tp)
    check_expert_parallel(m.num_experts, m.moe_router_topk, ep, etp, m.moe_ffn_hidden_size)
    resolve_layout(m.num_layers, pp)
    if world is not None and world % (tp * pp):
        raise ConfigError(f"TP {tp} x PP {pp} does not divide the {world} GPUs")
    if world is not None and world % (etp * ep * pp):
        raise ConfigError(f"expert TP {etp} x EP {ep} x PP {pp} does not divide the {world} GPUs")


def candidate_layouts(req: PlanRequest) -> list[tuple[int, int, int]]:
    """TP within one node (tensor-parallel collectives stay on NVLink), PP up to the layer count (split
    as the trainer splits them), TP x PP dividing the GPUs, and the global batch splitting into whole
    micro-batches over DP; for an MoE model, EP dividing the experts with expert TP x EP x PP dividing the
    GPUs. (tp, pp, ep) triples, ep 1 for a dense model."""
    m = req.model
    world = req.nodes * req.gpus_per_node
    etp = req.expert_tensor_parallel
    for name, value in (("--tp", req.tensor_parallel), ("--pp", req.pipeline_parallel), ("--ep", req.expert_parallel), ("--etp", etp)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if req.tensor_parallel is not None or req.pipeline_parallel is not None or req.expert_parallel is not None or etp > 1:
        check_layout(m, req.tensor_parallel or 1, req.pipeline_parallel or 1, world, req.expert_parallel or 1, etp)
    tps = [req.tensor_parallel] if req.tensor_parallel else [t for t in range(1, req.gpus_per_node + 1)]
    pps = [req.pipeline_parallel] if req.pipeline_parallel else list(range(1, m.num_layers + 1))
    if req.expert_parallel:
        eps = [req.expert_parallel]
    else:
        eps = [e for e in range(1, (m.num_experts or 1) + 1) if (m.num_experts or 1) % e == 0]
    out = []
    for tp in tps:
        if m.num_attention_heads % tp or m.num_query_groups % tp or req.gpus_per_node % tp:
            continue
        for pp in pps:
            if pp > m.num_layers or world % (tp * pp):
                continue
            dp = world // (tp * pp)
            if req.global_batch % (req.micro_batch * dp):
                continue
            for ep in eps:
                if world % (etp * ep * pp):
                    continue
                out.append((tp, pp, ep))
    return out


def plan(req: PlanRequest) -> tuple[list[LayoutPlan], Optional[LayoutPlan]]:
    """Every candidate layout, and the fastest that fits (None when none does)."""
    if req.seq_len < 2 or req.micro_batch < 1 or req.global_batch < 1 or req.nodes < 1 or req.gpus_per_node < 1:
        raise ConfigError("sequence length, micro-batch, global batch, nodes and GPUs per node must be positive")
    if req.pack_tokens is not None and req.pack_tokens < req.seq_len:
        raise ConfigError(f"--pack-tokens ({req.pack_tokens}) is smaller than --seq-len ({req.seq_len}): a packed row must hold at least one whole sequence")
    layouts = [plan_layout(req, tp, pp, ep) for tp, pp, ep in candidate_layouts(req)]
    if not layouts:
        raise ConfigError(
            f"no layout of {req.nodes} x {req.gpus_per_node} GPUs splits a global batch of {req.global_batch} pairs "
            f"into micro-batches of {req.micro_batch} with TP dividing the heads and PP at most the layers"
        )
    fitting = [l for l in layouts if l.fits]
    best = min(fitting, key=lambda l: (l.step_seconds, l.tp, l.pp, l.ep)) if fitting else None
    return layouts, best
