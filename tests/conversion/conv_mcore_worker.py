"""Multi-rank Megatron side of the conversion tests, run as a script in its own process tree:

    python conv_mcore_worker.py JOB.json

JOB = {"world_size": 2, "tasks": [{"checkpoint": DIR, "tokens": FILE.pt, "out": DIR, "hf": DIR?}, ...]}. For each task,
every rank loads the converted checkpoint into a model built at TP=1 (2 data-parallel replicas), TP=2 and
PP=2 (then PP=2 split unevenly, and PP=2 x VPP=2) in turn; rank 0 writes the TP=1 and TP=2 logits of the tokens to OUT/logits_tp{1,2}.pt, and the
model is saved again from TP=2 and from each PP layout into OUT/tp2, OUT/pp2, OUT/pp2_uneven and
OUT/pp2_vpp2, so exporting those exercises a real reshard. With "hf" set, rank 0 also converts both ways while the process group is up (into
OUT/initialized_mcore and OUT/initialized_hf). Kept out of the pytest process: Megatron's parallel state
and the CPU shim are process-wide.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch


def _layout_round(
    task: dict, tp: int, pp: int, save_to: str | None, logits_to: str | None, virtual: int = 1, first_stage_layers=None
) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from spin_mega.models.checkpoint import TOKENIZER_SUBDIR, load_model, read_meta, save_model, write_meta
    from spin_mega.models.chunks import build_model_chunks
    from spin_mega.models.gpt import padded_vocab_size, transformer_config
    from spin_mega.parallel import distributed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    distributed.initialize(tp, pp, seed=1234, virtual_pipeline=virtual)
    checkpoint = Path(task["checkpoint"])
    model_cfg, dtype, _ = read_meta(checkpoint)
    # As the trainer does: the padding follows this run's TP, whatever the checkpoint was padded to.
    padded = padded_vocab_size(model_cfg.vocab_size, tp)
    tconfig = transformer_config(
        model_cfg, tp, pp, dtype=dtype, virtual_pipeline=virtual, first_stage_layers=first_stage_layers
    )
    chunks = build_model_chunks(model_cfg, tconfig, vocab_size=padded)
    for chunk in chunks:
        chunk.eval()
    load_model(chunks, checkpoint)
    model = chunks[0]
    if logits_to is not None:
        tokens = torch.load(task["tokens"])
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            logits = model.vocab_parallel_logits(model(tokens, positions, None))  # [s, b, V_padded / tp]
        if tp > 1:
            group = parallel_state.get_tensor_model_parallel_group()
            parts = [torch.empty_like(logits) for _ in range(tp)]
            dist.all_gather(parts, logits.contiguous(), group=group)
            logits = torch.cat(parts, dim=-1)
        if dist.get_rank() == 0:
            torch.save(logits.transpose(0, 1)[..., : model_cfg.vocab_size].contiguous(), logits_to)
    if save_to is not None:
        target = Path(save_to)
        save_model(chunks, target)
        if dist.get_rank() == 0:
            write_meta(target, model_cfg, dtype, padded)
            if (checkpoint / TOKENIZER_SUBDIR).is_dir():
                shutil.copytree(checkpoint / TOKENIZER_SUBDIR, target / TOKENIZER_SUBDIR)
        dist.barrier()


def _rank_main(rank: int, world_size: int, port: int, job: dict) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from spin_mega.parallel import distributed

    for task in job["tasks"]:
        out = Path(task["out"])
        _layout_round(task, 1, 1, None, str(out / "logits_tp1.pt"))
        _layout_round(task, 2, 1, str(out / "tp2"), str(out / "logits_tp2.pt"))
        if task.get("hf") and rank == 0:
            # The loop converts from inside an initialised process (CPU shim active, groups up).
            from spin_mega.conversion import hf_to_mcore, mcore_to_hf

            hf_to_mcore(task["hf"], out / "initialized_mcore", tp=2)
            mcore_to_hf(out / "initialized_mcore", out / "initialized_hf")
        _layout_round(task, 1, 2, str(out / "pp2"), None)
        # 4 layers split [3, 1], and [2, 2] in interleaved chunks of one layer.
        _layout_round(task, 1, 2, str(out / "pp2_uneven"), None, first_stage_layers=3)
        _layout_round(task, 1, 2, str(out / "pp2_vpp2"), None, virtual=2)
    distributed.shutdown()


def main() -> None:
    import socket

    import torch.multiprocessing as mp

    job = json.loads(Path(sys.argv[1]).read_text())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_main, args=(job["world_size"], port, job), nprocs=job["world_size"], join=True)


if __name__ == "__main__":
    main()
