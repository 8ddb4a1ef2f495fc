"""The model chunks one pipeline rank holds: one without interleaving, `virtual` with it.

The interleaved schedule (megatron-core's forward_backward_pipelining_with_interleaving) takes a list of
chunks, each a full GPTModel over its own slice of layers; chunk i of stage s holds global layers starting
at megatron's `get_transformer_layer_offset(config, vp_stage=i)`, so checkpoints keep global layer numbers
and load at any other layout.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from spin_mega.config import ModelConfig
from spin_mega.models.gpt import SpinGPTModel, build_model


def build_model_chunks(model: ModelConfig, config: TransformerConfig, vocab_size: Optional[int] = None) -> list[SpinGPTModel]:
    virtual = config.virtual_pipeline_model_parallel_size
    if virtual is None:
        return [build_model(model, config, vocab_size=vocab_size)]
    return [build_model(model, config, vocab_size=vocab_size, vp_stage=i) for i in range(virtual)]
