"""Loads converter-written checkpoints into a model whose modules carry extra state the way Transformer Engine's
do, on 2 gloo ranks, in a process tree of its own (Megatron's parallel state is process-wide):

    python te_extra_state_worker.py JOB.json

JOB = {"checkpoint": DIR, "tokens": FILE.pt, "out": DIR}. Writes OUT/logits_tp{1,2}.pt (rank 0), re-saves from
TP 2 with fp8-like extra state into OUT/te_saved, reloads that into fresh TE-like and local models, and writes
what each module's set_extra_state received, plus the error a checkpoint lacking a weight gives, to
OUT/summary.json.

Transformer Engine does not install without CUDA, so the TE modules are stood in for by the project's local
modules with TE's extra-state protocol added (transformer_engine/pytorch/module/base.py and ops/op.py:
get_extra_state returns an empty uint8 tensor without fp8 and the pickled fp8 metadata as a uint8 tensor with
it; set_extra_state ignores None and empty tensors) on exactly the modules that have it under megatron-core's
TE layer spec (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec, TESpecProvider): the fused
layer-norm linears linear_qkv and linear_fc1, the row-parallel linear_proj and linear_fc2, TEDotProductAttention
as core_attention, and TENorm as the block's final_layernorm.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import torch

# Every extra-state key of a dense GPT under megatron-core 0.16's TE layer spec (the output layer's is
# dropped by GPTModel.sharded_state_dict). The test checks the stand-in model asks for exactly these.
TE_SPEC_EXTRA_STATE_KEYS = sorted([
    "decoder.layers.self_attention.linear_qkv._extra_state",
    "decoder.layers.self_attention.core_attention._extra_state",
    "decoder.layers.self_attention.linear_proj._extra_state",
    "decoder.layers.mlp.linear_fc1._extra_state",
    "decoder.layers.mlp.linear_fc2._extra_state",
    "decoder.final_layernorm._extra_state",
])


class TEExtraState:
    """Transformer Engine's get/set_extra_state; `fp8_meta` stands for the module's fp8 scaling state."""

    fp8_meta = None
    received = "never called"

    def get_extra_state(self) -> torch.Tensor:
        if self.fp8_meta is None:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(pickle.dumps(self.fp8_meta)), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        self.received = "None" if state is None else f"{state.numel()} bytes"
        if state is None or state.numel() == 0:
            return
        self.fp8_meta = pickle.loads(state.detach().cpu().numpy().tobytes())


def te_like_block_spec(config, vp_stage=None):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from spin_mega.models.attention import SDPAttention
    from spin_mega.models.gpt import layer_spec
    from spin_mega.models.norm import RMSNorm

    column = type("TELayerNormColumnParallelLinearStandIn", (TEExtraState, ColumnParallelLinear), {})
    row = type("TERowParallelLinearStandIn", (TEExtraState, RowParallelLinear), {})
    attention = type("TEDotProductAttentionStandIn", (TEExtraState, SDPAttention), {})
    norm = type("TENormStandIn", (TEExtraState, RMSNorm), {})
    spec = layer_spec(config)
    attn = spec.submodules.self_attention.submodules
    attn.linear_qkv, attn.linear_proj, attn.core_attention = column, row, attention
    mlp = spec.submodules.mlp.submodules
    mlp.linear_fc1, mlp.linear_fc2 = column, row
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=norm)


def _build(checkpoint: Path, tp: int, te_like: bool, **model_changes):
    import dataclasses

    from megatron.core import parallel_state

    import spin_mega.models.gpt as gpt
    from spin_mega.models.checkpoint import read_meta
    from spin_mega.models.chunks import build_model_chunks
    from spin_mega.parallel import distributed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    distributed.initialize(tp, 1, seed=1234)
    model_cfg, dtype, _ = read_meta(checkpoint)
    model_cfg = dataclasses.replace(model_cfg, **model_changes)
    original = gpt.block_spec
    gpt.block_spec = te_like_block_spec if te_like else original
    try:
        chunks = build_model_chunks(model_cfg, gpt.transformer_config(model_cfg, tp, 1, dtype=dtype), vocab_size=gpt.padded_vocab_size(model_cfg.vocab_size, tp))
    finally:
        gpt.block_spec = original
    for chunk in chunks:
        chunk.eval()
    return chunks, model_cfg


def _logits(chunks, model_cfg, tokens: torch.Tensor, tp: int) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state

    model = chunks[0]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        logits = model.vocab_parallel_logits(model(tokens, positions, None))
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits.transpose(0, 1)[..., : model_cfg.vocab_size].contiguous()


def _extra_state_modules(chunks) -> dict:
    return {name: module for name, module in chunks[0].named_modules() if isinstance(module, TEExtraState)}


def _rank_main(rank: int, world_size: int, port: int, job: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from spin_mega.errors import SpinMegaError
    from spin_mega.models.checkpoint import TOKENIZER_SUBDIR, load_model, read_meta, save_model, sharded_state_dict, write_meta
    from spin_mega.parallel import distributed

    checkpoint, out = Path(job["checkpoint"]), Path(job["out"])
    tokens = torch.load(job["tokens"])
    summary = {}

    # The converter's checkpoint into the TE-like model, at TP 1 (2 data-parallel replicas) and TP 2.
    for tp in (1, 2):
        chunks, model_cfg = _build(checkpoint, tp, te_like=True)
        summary["asked_extra_state_keys"] = sorted(
            {v.key for v in sharded_state_dict(chunks).values() if getattr(v, "key", "").endswith("_extra_state")}
        )
        load_model(chunks, checkpoint)
        logits = _logits(chunks, model_cfg, tokens, tp)
        if rank == 0:
            torch.save(logits, out / f"logits_tp{tp}.pt")
        summary[f"received_tp{tp}"] = {name: m.received for name, m in _extra_state_modules(chunks).items()}

    # A TE run's fp8 state (a different payload per module) is saved at TP 2 and must come back as saved.
    payloads = {}
    for name, module in _extra_state_modules(chunks).items():
        module.fp8_meta = {"recipe": "DelayedScaling", "scale_fwd": torch.full((3,), float(len(name))), "module": name}
        payloads[name] = module.fp8_meta
    saved = out / "te_saved"
    save_model(chunks, saved)
    if rank == 0:
        model_cfg, dtype, padded = read_meta(checkpoint)
        write_meta(saved, model_cfg, dtype, padded)
        (saved / TOKENIZER_SUBDIR).mkdir()
    dist.barrier()
    fresh, _ = _build(saved, 1, te_like=True)
    load_model(fresh, saved)
    summary["fp8_state_restored"] = {
        name: (m.fp8_meta is not None and m.fp8_meta["module"] == name and torch.equal(m.fp8_meta["scale_fwd"], payloads[name]["scale_fwd"]))
        for name, m in _extra_state_modules(fresh).items()
    }
    # The same checkpoint into the local layers (CPU): its extra state objects are simply not asked for.
    local, model_cfg = _build(saved, 2, te_like=False)
    load_model(local, saved)
    if rank == 0:
        torch.save(_logits(local, model_cfg, tokens, 2), out / "logits_local_from_te_saved.pt")
    else:
        _logits(local, model_cfg, tokens, 2)

    # Tolerating missing extra state must not tolerate a missing weight: this model also asks for QKV biases.
    biased, _ = _build(checkpoint, 1, te_like=True, qkv_bias=True)
    try:
        load_model(biased, checkpoint)
        summary["missing_weight_error"] = None
    except SpinMegaError as exc:
        summary["missing_weight_error"] = str(exc)
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    distributed.shutdown()


def main() -> None:
    import torch.multiprocessing as mp

    from spin_mega.parallel.distributed import free_port

    job = json.loads(Path(sys.argv[1]).read_text())
    mp.spawn(_rank_main, args=(2, free_port(), job), nprocs=2, join=True)


if __name__ == "__main__":
    main()
