"""Multi-rank Megatron side of the Qwen3 / MoE conversion tests, under torchrun:

    torchrun --nproc-per-node N conv_layout_worker.py JOB.json

JOB = {"tasks": [{"checkpoint": DIR, "tokens": FILE.pt, "out": DIR, "layouts": [LAYOUT, ...]}, ...]} with
LAYOUT = {"name": str, "tp": int, "pp": int, "ep": int, "etp": int, "first_stage_layers": int | null,
"logits": bool}. For each layout in turn, every rank builds the model at that TP x PP x EP x expert-TP (the rest
is data parallelism), loads the converted checkpoint, and saves it again into OUT/NAME, so that exporting OUT/NAME
exercises a real reshard; with "logits" (single-stage layouts) rank 0 also writes the full-vocabulary logits of
the tokens to OUT/logits_NAME.pt. Every rank feeds the same tokens, so under expert parallelism each expert
sees every rank's copy of them and hands each its own result back. Kept out of the pytest process: Megatron's
parallel state and the CPU shim are process-wide.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _layout_round(task: dict, layout: dict) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from spin_mega.models.checkpoint import TOKENIZER_SUBDIR, load_model, read_meta, save_model, write_meta
    from spin_mega.models.chunks import build_model_chunks
    from spin_mega.models.gpt import padded_vocab_size, transformer_config
    from spin_mega.parallel import distributed

    tp, pp, ep, etp = layout["tp"], layout["pp"], layout.get("ep", 1), layout.get("etp", 1)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    distributed.initialize(tp, pp, seed=1234, expert_parallel=ep, expert_tensor_parallel=etp)
    checkpoint = Path(task["checkpoint"])
    model_cfg, dtype, _ = read_meta(checkpoint)
    padded = padded_vocab_size(model_cfg.vocab_size, tp)
    tconfig = transformer_config(
        model_cfg, tp, pp, dtype=dtype, first_stage_layers=layout.get("first_stage_layers"),
        expert_parallel=ep, expert_tensor_parallel=etp,
    )
    chunks = build_model_chunks(model_cfg, tconfig, vocab_size=padded)
    for chunk in chunks:
        chunk.eval()
    load_model(chunks, checkpoint)
    out = Path(task["out"])
    if layout.get("logits"):
        assert pp == 1, "logits are read from single-stage layouts"
        model = chunks[0]
        tokens = torch.load(task["tokens"])
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            logits = model.vocab_parallel_logits(model(tokens, positions, None))  # [s, b, V_padded / tp]
        if tp > 1:
            parts = [torch.empty_like(logits) for _ in range(tp)]
            dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            logits = torch.cat(parts, dim=-1)
        if dist.get_rank() == 0:
            torch.save(logits.transpose(0, 1)[..., : model_cfg.vocab_size].contiguous(), out / f"logits_{layout['name']}.pt")
    target = out / layout["name"]
    save_model(chunks, target)
    if dist.get_rank() == 0:
        write_meta(target, model_cfg, dtype, padded)
        if (checkpoint / TOKENIZER_SUBDIR).is_dir():
            shutil.copytree(checkpoint / TOKENIZER_SUBDIR, target / TOKENIZER_SUBDIR)
    dist.barrier()


def main() -> None:
    from spin_mega.parallel import distributed

    job = json.loads(Path(sys.argv[1]).read_text())
    for task in job["tasks"]:
        for layout in task["layouts"]:
            _layout_round(task, layout)
    distributed.shutdown()


if __name__ == "__main__":
    main()
