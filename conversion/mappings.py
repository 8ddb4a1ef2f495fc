"""Per-architecture parameter mappings between Hugging Face and Megatron-core checkpoints.

Every fact about how a Megatron tensor relates to its Hugging Face tensors is declared here, once per
architecture, as a table of `Rule`s; the converters in this package are generic over the table.

A rule names one Megatron dist-checkpoint key, the HF tensors it is made of and a *layout*: where, along
dim 0, each HF tensor's rows sit inside the Megatron tensor. The four layouts cover the families:

  identity        the same tensor
  gate_up_concat  linear_fc1 = cat[gate_proj, up_proj] (the SwiGLU gate first; also each expert's)
  qkv_interleave  linear_qkv = for each of the ng key/value groups: [np/ng query heads, 1 key head,
                  1 value head], head_dim rows each (Megatron's GQA layout; also for the QKV bias)
  vocab_pad       the embedding / output layer padded to Megatron's padded vocabulary; the padding rows
                  are zero-filled on import and dropped on export

Megatron keys are the *global* dist-checkpoint keys: per-layer tensors are stacked along a leading
layer axis under `decoder.layers.*`, and the layer norms carry the names Megatron's checkpoints use for
Transformer Engine layers (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`), which is what
the local layer spec maps them to, so the same checkpoint loads with and without Transformer Engine.
Experts add a second stacking axis after the layer's: `decoder.layers.mlp.experts.experts.linear_fc1.weight`
is [layers, experts, 2 x expert ffn, hidden], as megatron-core's SequentialMLP, GroupedMLP and TEGroupedMLP all
save it, so one expert of one layer is one chunk: conversion streams expert by expert, and the checkpoint
loads at any expert-parallel layout. An MoE layer's pre-MLP norm is `decoder.layers.pre_mlp_layernorm.weight`
(Transformer Engine does not fuse it into the experts; the local spec saves it under the same name:
spin_mega/models/moe.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from spin_mega.config import ModelConfig
from spin_mega.errors import ConfigError

LAYER = "{i}"  # stands for the layer index in HF names
EXPERT = "{e}"  # and this for the expert index


@dataclass(frozen=True)
class Dims:
    """The sizes a layout needs, from the model config and the padded vocabulary."""

    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    padded_vocab: int
    layers: int
    experts: int = 0
    moe_ffn: int = 0

    @classmethod
    def of(cls, model: ModelConfig, padded_vocab: int) -> "Dims":
        return cls(
            hidden=model.hidden_size,
            ffn=model.ffn_hidden_size,
            heads=model.num_attention_heads,
            groups=model.num_query_groups,
            head_dim=model.head_dim,
            vocab=model.vocab_size,
            padded_vocab=padded_vocab,
            layers=model.num_layers,
            experts=model.num_experts or 0,
            moe_ffn=model.moe_ffn_hidden_size or 0,
        )

    def size(self, name: str) -> int:
        return {
            "hidden": self.hidden,
            "ffn": self.ffn,
            "q": self.heads * self.head_dim,
            "kv": self.groups * self.head_dim,
            "head_dim": self.head_dim,
            "vocab": self.vocab,
            "experts": self.experts,
            "moe_ffn": self.moe_ffn,
        }[name]


@dataclass(frozen=True)
class Segment:
    """Rows [hf_start, hf_start + rows) of HF tensor number `hf` are rows [mcore_start, ...) of the Megatron
    tensor."""

    hf: int
    hf_start: int
    mcore_start: int
    rows: int


# A layout maps the dims to (rows of the Megatron tensor, segments); rows not covered are padding.
Layout = Callable[[Dims], "tuple[int, list[Segment]]"]


def identity(rows: str) -> Layout:
    def layout(d: Dims):
        n = d.size(rows)
        return n, [Segment(0, 0, 0, n)]

    layout.__name__ = "identity"
    return layout


def gate_up_concat(ffn: str = "ffn") -> Layout:
    def layout(d: Dims):
        n = d.size(ffn)
        return 2 * n, [Segment(0, 0, 0, n), Segment(1, 0, n, n)]

    layout.__name__ = "gate_up_concat"
    return layout


def qkv_interleave(d: Dims):
    if d.heads % d.groups:
        raise ConfigError(f"num_attention_heads ({d.heads}) must be a multiple of num_key_value_heads ({d.groups})")
    per_group = d.heads // d.groups
    hn = d.head_dim
    segments = []
    for g in range(d.groups):
        base = g * (per_group + 2) * hn
        segments.append(Segment(0, g * per_group * hn, base, per_group * hn))
        segments.append(Segment(1, g * hn, base + per_group * hn, hn))
        segments.append(Segment(2, g * hn, base + (per_group + 1) * hn, hn))
    return (d.heads + 2 * d.groups) * hn, segments


def vocab_pad(d: Dims):
    return d.padded_vocab, [Segment(0, 0, 0, d.vocab)]


def _always(model: ModelConfig) -> bool:
    return True


def _qkv_bias(model: ModelConfig) -> bool:
    return model.qkv_bias


def _qk_norm(model: ModelConfig) -> bool:
    return model.qk_layernorm


def _untied(model: ModelConfig) -> bool:
    return not model.tie_word_embeddings


def _tied(model: ModelConfig) -> bool:
    return model.tie_word_embeddings


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: tuple[str, ...]
    layout: Layout
    tail: tuple[str, ...] = ()  # the trailing dims (after the rows), by name
    when: Callable[[ModelConfig], bool] = _always

    @property
    def per_layer(self) -> bool:
        return LAYER in self.hf[0]

    @property
    def per_expert(self) -> bool:
        return EXPERT in self.hf[0]

    def hf_names(self, layer: int | None = None, expert: int | None = None) -> list[str]:
        names = list(self.hf)
        if self.per_layer:
            names = [name.replace(LAYER, str(layer)) for name in names]
        if self.per_expert:
            names = [name.replace(EXPERT, str(expert)) for name in names]
        return names

    def stack_shape(self, d: Dims) -> tuple[int, ...]:
        """The stacking axes in front of one tensor: (layers,), (layers, experts) or none."""
        return ((d.layers,) if self.per_layer else ()) + ((d.experts,) if self.per_expert else ())

    def stack_indices(self, d: Dims) -> list[tuple[int, ...]]:
        """Every (layer,) or (layer, expert) index of the rule's tensors, layer-major; [()] for a global one."""
        if self.per_expert:
            return [(i, e) for i in range(d.layers) for e in range(d.experts)]
        return [(i,) for i in range(d.layers)] if self.per_layer else [()]

    def tail_shape(self, d: Dims) -> tuple[int, ...]:
        return tuple(d.size(t) for t in self.tail)

    def mcore_shape(self, d: Dims) -> tuple[int, ...]:
        """Shape of one layer's (one expert's) tensor (of the whole tensor for non-layer rules)."""
        rows, _ = self.layout(d)
        return (rows, *self.tail_shape(d))

    def global_shape(self, d: Dims) -> tuple[int, ...]:
        return self.stack_shape(d) + self.mcore_shape(d)

    def hf_shapes(self, d: Dims) -> list[tuple[int, ...]]:
        _, segments = self.layout(d)
        rows = [0] * len(self.hf)
        for s in segments:
            rows[s.hf] = max(rows[s.hf], s.hf_start + s.rows)
        return [(r, *self.tail_shape(d)) for r in rows]

    def mcore_row_span(self, d: Dims) -> tuple[int, int]:
        """The Megatron rows holding data (export reads only these, skipping vocabulary padding)."""
        _, segments = self.layout(d)
        return min(s.mcore_start for s in segments), max(s.mcore_start + s.rows for s in segments)

    def to_mcore(self, d: Dims, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        rows, segments = self.layout(d)
        if len(segments) == 1 and segments[0].rows == rows:
            return tensors[0].to(dtype).contiguous()
        covered = sum(s.rows for s in segments)
        alloc = torch.empty if covered == rows else torch.zeros
        out = alloc(self.mcore_shape(d), dtype=dtype)
        for s in segments:
            out[s.mcore_start : s.mcore_start + s.rows].copy_(tensors[s.hf][s.hf_start : s.hf_start + s.rows])
        return out

    def to_hf(self, d: Dims, mcore: torch.Tensor, row_offset: int = 0) -> list[torch.Tensor]:
        """`mcore` holds Megatron rows [row_offset, row_offset + len(mcore)) of one layer's tensor."""
        _, segments = self.layout(d)
        shapes = self.hf_shapes(d)
        if len(segments) == 1 and shapes[0][0] == mcore.shape[0] and segments[0].mcore_start == row_offset:
            return [mcore]
        outs = [torch.empty(shape, dtype=mcore.dtype) for shape in shapes]
        for s in segments:
            start = s.mcore_start - row_offset
            outs[s.hf][s.hf_start : s.hf_start + s.rows].copy_(mcore[start : start + s.rows])
        return outs


@dataclass(frozen=True)
class Architecture:
    rules: tuple[Rule, ...]
    # HF tensors that carry no weights of their own: recomputed buffers, or an lm_head that a tied
    # config makes transformers ignore in favour of the embedding (it does the same here).
    ignored_hf: tuple[tuple[str, Callable[[ModelConfig], bool]], ...] = ()
    # Megatron's linear layers each save an `_extra_state` object per layer (None without Transformer
    # Engine); written as None, which TE also reads as "no fp8 state". Experts' linear layers save one per layer
    # and expert. Extra state of other modules (TE's attention and norms) is left out: the load tolerates it
    # missing (models/checkpoint.py).
    mcore_layer_objects: tuple[str, ...] = ()
    mcore_expert_objects: tuple[str, ...] = ()

    def active_rules(self, model: ModelConfig) -> list[Rule]:
        return [rule for rule in self.rules if rule.when(model)]

    def is_ignored(self, hf_name: str, model: ModelConfig) -> bool:
        return any(re.fullmatch(pattern, hf_name) and when(model) for pattern, when in self.ignored_hf)


_ATTN = "model.layers.{i}.self_attn"
_MLP = "model.layers.{i}.mlp"

_EMBEDDING = Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab_pad, ("hidden",))
_ATTENTION = (
    Rule(
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        ("model.layers.{i}.input_layernorm.weight",),
        identity("hidden"),
    ),
    Rule(
        "decoder.layers.self_attention.linear_qkv.weight",
        (f"{_ATTN}.q_proj.weight", f"{_ATTN}.k_proj.weight", f"{_ATTN}.v_proj.weight"),
        qkv_interleave,
        ("hidden",),
    ),
    Rule(
        "decoder.layers.self_attention.linear_qkv.bias",
        (f"{_ATTN}.q_proj.bias", f"{_ATTN}.k_proj.bias", f"{_ATTN}.v_proj.bias"),
        qkv_interleave,
        when=_qkv_bias,
    ),
    Rule(
        "decoder.layers.self_attention.q_layernorm.weight", (f"{_ATTN}.q_norm.weight",), identity("head_dim"),
        when=_qk_norm,
    ),
    Rule(
        "decoder.layers.self_attention.k_layernorm.weight", (f"{_ATTN}.k_norm.weight",), identity("head_dim"),
        when=_qk_norm,
    ),
    Rule("decoder.layers.self_attention.linear_proj.weight", (f"{_ATTN}.o_proj.weight",), identity("hidden"), ("q",)),
)
_DENSE_MLP = (
    Rule(
        "decoder.layers.mlp.linear_fc1.layer_norm_weight",
        ("model.layers.{i}.post_attention_layernorm.weight",),
        identity("hidden"),
    ),
    Rule(
        "decoder.layers.mlp.linear_fc1.weight",
        (f"{_MLP}.gate_proj.weight", f"{_MLP}.up_proj.weight"),
        gate_up_concat("ffn"),
        ("hidden",),
    ),
    Rule("decoder.layers.mlp.linear_fc2.weight", (f"{_MLP}.down_proj.weight",), identity("hidden"), ("ffn",)),
)
_OUTPUT = (
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), identity("hidden")),
    Rule("output_layer.weight", ("lm_head.weight",), vocab_pad, ("hidden",), when=_untied),
)
_IGNORED = (
    (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", _always),
    (r"lm_head\.weight", _tied),
)
_ATTENTION_OBJECTS = (
    "decoder.layers.self_attention.linear_proj._extra_state",
    "decoder.layers.self_attention.linear_qkv._extra_state",
)


def _moe_mlp(block: str, gate: str, up: str, down: str) -> tuple[Rule, ...]:
    """An MoE block's rules: HF names `{block}.gate.weight` for the router and `{block}.experts.{e}.{gate|up|down}.weight`
    for the experts."""
    expert = f"{block}.experts.{EXPERT}"
    return (
        Rule("decoder.layers.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",), identity("hidden")),
        Rule("decoder.layers.mlp.router.weight", (f"{block}.gate.weight",), identity("experts"), ("hidden",)),
        Rule(
            "decoder.layers.mlp.experts.experts.linear_fc1.weight",
            (f"{expert}.{gate}.weight", f"{expert}.{up}.weight"),
            gate_up_concat("moe_ffn"),
            ("hidden",),
        ),
        Rule("decoder.layers.mlp.experts.experts.linear_fc2.weight", (f"{expert}.{down}.weight",), identity("hidden"), ("moe_ffn",)),
    )


# Llama, Mistral, Qwen2 and Qwen3 share one parameter layout; they differ in config only (Qwen2 always has
# the QKV bias, Llama may; Qwen3 adds a per-head RMSNorm of queries and keys, one head_dim-sized weight each,
# shared by all heads; Qwen2's and Qwen3's small models tie the embeddings).
LLAMA_FAMILY = Architecture(
    rules=(_EMBEDDING, *_ATTENTION, *_DENSE_MLP, *_OUTPUT),
    ignored_hf=_IGNORED,
    mcore_layer_objects=(*_ATTENTION_OBJECTS, "decoder.layers.mlp.linear_fc1._extra_state", "decoder.layers.mlp.linear_fc2._extra_state"),
)

_MOE_OBJECTS = (
    "decoder.layers.mlp.experts.experts.linear_fc1._extra_state",
    "decoder.layers.mlp.experts.experts.linear_fc2._extra_state",
)

# Qwen3-MoE: Qwen3's attention; every layer's MLP is a router (`mlp.gate`) and experts with gate/up/down
# projections. No shared experts.
QWEN3_MOE = Architecture(
    rules=(_EMBEDDING, *_ATTENTION, *_moe_mlp(_MLP, "gate_proj", "up_proj", "down_proj"), *_OUTPUT),
    ignored_hf=_IGNORED,
    mcore_layer_objects=_ATTENTION_OBJECTS,
    mcore_expert_objects=_MOE_OBJECTS,
)

# Mixtral: Mistral's attention; `block_sparse_moe` with experts w1 (gate), w3 (up), w2 (down). No shared experts.
MIXTRAL = Architecture(
    rules=(_EMBEDDING, *_ATTENTION, *_moe_mlp("model.layers.{i}.block_sparse_moe", "w1", "w3", "w2"), *_OUTPUT),
    ignored_hf=_IGNORED,
    mcore_layer_objects=_ATTENTION_OBJECTS,
    mcore_expert_objects=_MOE_OBJECTS,
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA_FAMILY,
    "mistral": LLAMA_FAMILY,
    "qwen2": LLAMA_FAMILY,
    "qwen3": LLAMA_FAMILY,
    "qwen3_moe": QWEN3_MOE,
    "mixtral": MIXTRAL,
}


def architecture(model_type: str) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"architecture {model_type!r} is not supported by the converter; it handles {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def sharded_object_key(key: str, index: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """The dist-checkpoint name Megatron gives a ShardedObject stacked over layers, or over layers and experts
    (its `unique_key`: offsets and global shape, each joined by dots)."""
    return f"{key}/shard_{'.'.join(map(str, index))}_{'.'.join(map(str, shape))}"
