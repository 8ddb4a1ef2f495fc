"""Which transformer layers each pipeline stage (and each virtual chunk of a stage) holds: plain arithmetic,
checked before any process group exists so that an impossible layout costs one second, not a job.

megatron-core splits layers evenly unless told the first and/or last stage's count
(`num_layers_in_first_pipeline_stage` / `num_layers_in_last_pipeline_stage`); the stages in between then
share the rest equally. With interleaving (virtual pipeline stages) every stage's count must also split
into `virtual` equal chunks.

The default when the layers do not divide evenly: the middle stages take ceil(L / pp) layers each and the
first and last stages share what is left, the first taking the larger half. The end stages also hold the
embedding and the output layer with the loss, so giving them fewer layers is the usual choice
(Megatron's own recipes do it for Llama-3 405B). All counts are in units of `virtual` layers under
interleaving. Examples: 5 layers at PP 2 -> [3, 2]; 28 at PP 8 -> [2, 4 x 6, 2]; 80 at PP 6 ->
[12, 14 x 4, 12]; 6 at PP 2 x VPP 2 -> [4, 2] (chunks of 2 and 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from spin_mega.errors import ConfigError


@dataclass(frozen=True)
class PipelineLayout:
    num_layers: int
    pipeline_parallel: int
    virtual: int  # model chunks per pipeline stage; 1 = no interleaving
    stage_layers: tuple[int, ...]  # layers held by each pipeline stage, first to last

    @property
    def even(self) -> bool:
        return len(set(self.stage_layers)) == 1

    @property
    def interleaved(self) -> bool:
        return self.virtual > 1

    def megatron_kwargs(self) -> dict:
        """The TransformerConfig fields that describe this layout."""
        kwargs: dict = {
            "pipeline_model_parallel_size": self.pipeline_parallel,
            "virtual_pipeline_model_parallel_size": self.virtual if self.interleaved else None,
        }
        if self.interleaved:
            # As Megatron-LM sets them for interleaving. Batched p2p posts a rank's sends and receives to its
            # previous and next stage in one list; at PP 2 both are the same peer, so an activation and a
            # gradient in flight together are matched to each other's receive. The unbatched path keeps
            # the two directions on separate communicators.
            kwargs.update(overlap_p2p_comm=True, batch_p2p_comm=False)
        if not self.even:
            kwargs["num_layers_in_first_pipeline_stage"] = self.stage_layers[0]
            # With two stages the last one is megatron's single "middle" stage: naming it too would leave
            # zero middle stages, which megatron-core 0.16's interleaved offset arithmetic divides by.
            if self.pipeline_parallel > 2:
                kwargs["num_layers_in_last_pipeline_stage"] = self.stage_layers[-1]
        return kwargs

    def chunk_layers(self, stage: int) -> int:
        return self.stage_layers[stage] // self.virtual

    def bubble_fraction(self, num_microbatches: int) -> float:
        """Idle time of the 1F1B schedule relative to the ideal (bubble-free) step time, with equal stages:
        (p - 1) / m, and (p - 1) / (v * m) interleaved (Narayanan et al., SC'21, section 2.2)."""
        return (self.pipeline_parallel - 1) / (self.virtual * num_microbatches)

    def describe(self, num_microbatches: int) -> str:
        p, v, m = self.pipeline_parallel, self.virtual, num_microbatches
        if p == 1:
            return f"pipeline: none ({self.num_layers} layers on every rank)"
        stages = ", ".join(str(n) for n in self.stage_layers)
        chunks = f" in {v} interleaved chunks per stage" if self.interleaved else ""
        formula = f"(p-1)/(v*m) = {p - 1}/({v}*{m})" if self.interleaved else f"(p-1)/m = {p - 1}/{m}"
        text = (
            f"pipeline: {self.num_layers} layers over {p} stages [{stages}]{chunks}; "
            f"bubble {formula} = {self.bubble_fraction(m):.1%} of the ideal step time"
        )
        if not self.even:
            # The schedule runs at the pace of the fullest stage; the formula assumes equal stages.
            imbalance = max(self.stage_layers) / (self.num_layers / p)
            text += f"; fullest stage {imbalance:.2f}x the mean"
        return text


def check_virtual_pipeline(pipeline_parallel: int, virtual: int) -> None:
    if virtual < 1:
        raise ConfigError(f"parallel.virtual_pipeline_parallel must be at least 1 (got {virtual})")
    if virtual > 1 and pipeline_parallel == 1:
        raise ConfigError(
            f"virtual pipeline parallel {virtual} needs pipeline parallelism: interleaving splits each "
            "pipeline stage into chunks, and with pipeline_parallel 1 there is only one stage"
        )


def _default_split(units: int, stages: int) -> Optional[tuple[int, ...]]:
    if units % stages == 0:
        return (units // stages,) * stages
    if stages == 2:
        return (units - units // 2, units // 2)
    for middle in range(math.ceil(units / stages), 0, -1):
        rest = units - (stages - 2) * middle
        if rest >= 2:
            return (rest - rest // 2,) + (middle,) * (stages - 2) + (rest // 2,)
    return None


def resolve_layout(
    num_layers: int,
    pipeline_parallel: int,
    virtual: int = 1,
    first_stage_layers: Optional[int] = None,
    last_stage_layers: Optional[int] = None,
) -> PipelineLayout:
    """The layout, or a ConfigError naming the constraint a requested layout breaks."""
    L, p, v = num_layers, pipeline_parallel, virtual
    check_virtual_pipeline(p, v)
    if p == 1:
        if first_stage_layers is not None or last_stage_layers is not None:
            raise ConfigError("parallel.first_stage_layers / last_stage_layers need pipeline_parallel of 2 or more")
        return PipelineLayout(L, 1, 1, (L,))
    if L < p:
        raise ConfigError(
            f"pipeline parallel {p} would leave a stage with no layers: the model has only {L} layers"
        )
    for name, value in (("first_stage_layers", first_stage_layers), ("last_stage_layers", last_stage_layers)):
        if value is not None and value < 1:
            raise ConfigError(f"parallel.{name} must be at least 1: a pipeline stage with no layers is not supported")
    if first_stage_layers is None and last_stage_layers is None:
        if L % v:
            raise ConfigError(
                f"virtual pipeline parallel {v} must divide the layers of every pipeline stage, "
                f"but it does not divide the model's {L} layers"
            )
        split = _default_split(L // v, p)
        if split is None:
            raise ConfigError(
                f"{L} layers cannot be split over {p} pipeline stages x {v} virtual chunks without a stage "
                "holding no layers"
            )
        return PipelineLayout(L, p, v, tuple(n * v for n in split))
    first = first_stage_layers
    last = last_stage_layers
    ends = (first or 0) + (last or 0)
    middle_stages = p - (first is not None) - (last is not None)
    rest = L - ends
    if rest < 0 or (middle_stages == 0 and rest != 0):
        raise ConfigError(
            f"parallel.first_stage_layers / last_stage_layers ({first}, {last}) do not add up to the model's "
            f"{L} layers over {p} pipeline stages"
        )
    if middle_stages and (rest < middle_stages or rest % middle_stages):
        raise ConfigError(
            f"the {rest} layers left after parallel.first_stage_layers / last_stage_layers ({first}, {last}) "
            f"must split evenly, at least one each, over the other {middle_stages} pipeline stages"
        )
    per_middle = rest // middle_stages if middle_stages else 0
    stages = (
        ((first,) if first is not None else ())
        + (per_middle,) * middle_stages
        + ((last,) if last is not None else ())
    )
    for index, count in enumerate(stages):
        if count % v:
            raise ConfigError(
                f"virtual pipeline parallel {v} must divide the layers of every pipeline stage, "
                f"but stage {index} holds {count}"
            )
    return PipelineLayout(L, p, v, stages)


def check_tensor_parallel(num_attention_heads: int, num_query_groups: int, tensor_parallel: int) -> None:
    if tensor_parallel < 1:
        raise ConfigError(f"tensor parallel must be at least 1 (got {tensor_parallel})")
    if num_query_groups % tensor_parallel:
        raise ConfigError(
            f"tensor parallel {tensor_parallel} must divide the model's {num_query_groups} key/value groups "
            "(each tensor-parallel rank holds whole groups)"
        )
    if num_attention_heads % tensor_parallel:
        raise ConfigError(
            f"tensor parallel {tensor_parallel} must divide the model's {num_attention_heads} attention heads"
        )


def check_expert_parallel(
    num_experts: Optional[int],
    router_topk: int,
    expert_parallel: int,
    expert_tensor_parallel: int = 1,
    expert_ffn_hidden_size: Optional[int] = None,
) -> None:
    """The expert layout against the model's shape, before any process group exists. megatron-core lays the
    expert layers out over their own grid, ETP x EP x expert-DP x PP, beside the dense layers' TP x DP x PP on
    the same ranks (the world size is checked against both in parallel/distributed.py)."""
    ep, etp = expert_parallel, expert_tensor_parallel
    if ep < 1 or etp < 1:
        raise ConfigError(f"expert parallel and expert tensor parallel must be at least 1 (got EP {ep}, ETP {etp})")
    if num_experts is None:
        if ep > 1 or etp > 1:
            raise ConfigError(
                f"expert parallel {ep} x expert tensor parallel {etp} needs a mixture-of-experts model, "
                "and this model has no experts"
            )
        return
    if router_topk < 1 or router_topk > num_experts:
        raise ConfigError(
            f"top-k routing to {router_topk} experts needs between 1 and the model's {num_experts} experts"
        )
    if num_experts % ep:
        raise ConfigError(
            f"expert parallel {ep} must divide the model's {num_experts} experts (each expert-parallel rank holds "
            "whole experts)"
        )
    if expert_ffn_hidden_size is not None and expert_ffn_hidden_size % etp:
        raise ConfigError(
            f"expert tensor parallel {etp} must divide each expert's hidden size {expert_ffn_hidden_size}"
        )
