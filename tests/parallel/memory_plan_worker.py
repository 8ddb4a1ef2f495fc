"""Run under torchrun: builds the trainer's real model, DDP wrapper and optimizer (Trainer.setup), takes
one optimizer step so that the optimizer's state exists, and writes, per rank, the bytes read from the
live objects (parameters, DDP gradient buffers, fp32 main parameters, optimizer state) and, on a
single-stage layout, the bytes of activations one transformer layer saves for backward.

    torchrun --nproc-per-node N tests/parallel/memory_plan_worker.py SPEC_JSON OUT_JSON
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _bytes(t) -> int:
    return t.numel() * t.element_size()


def saved_activation_bytes(trainer, batch: int, seq_len: int) -> int:
    """Bytes of the tensors the first transformer layer saves for backward in one forward pass (each
    storage counted once, parameters excluded)."""
    import torch

    policy = trainer.policy
    param_storages = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    seen: dict[int, int] = {}
    active = [False]

    def pack(t):
        if active[0]:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in param_storages:
                seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    layer = policy.decoder.layers[0]
    layer.register_forward_pre_hook(lambda *a: active.__setitem__(0, True))
    layer.register_forward_hook(lambda *a: active.__setitem__(0, False))
    ids = torch.randint(0, 64, (batch, seq_len))
    positions = torch.arange(seq_len).unsqueeze(0).expand(batch, -1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = policy(ids, positions, None)
    del out
    return sum(seen.values())


def main(spec_path: str, out_path: str) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from spin_mega.config import load_config
    from spin_mega.parallel import distributed
    from spin_mega.training.trainer import Trainer

    spec = json.loads(Path(spec_path).read_text())
    cfg = load_config(spec["config"], spec["overrides"])
    trainer = Trainer(cfg, Path(spec["workdir"]), max_steps=1)
    trainer.setup()
    # The distributed optimizer's fp32 "main" shards of fp32 weights are views into the model's own
    # parameter buffer: storage, not identity, tells a main copy from the weights.
    model_storages = {p.untyped_storage().data_ptr() for p in trainer.policy.parameters()}
    record = {
        "rank": dist.get_rank(),
        "stage": parallel_state.get_pipeline_model_parallel_rank(),
        "params": sum(p.numel() for p in trainer.policy.parameters()),
        "weights": sum(_bytes(p) for p in trainer.policy.parameters()),
        "grads": sum(_bytes(b.grad_data) for b in trainer.model.buffers + trainer.model.expert_parallel_buffers),
    }
    trainer.model.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    ok, _, _ = trainer.optimizer.step()
    assert ok
    main_params = state = 0
    for wrapper in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for group in wrapper.optimizer.param_groups:
            main_params += sum(_bytes(p) for p in group["params"] if p.untyped_storage().data_ptr() not in model_storages)
        for per_param in wrapper.optimizer.state.values():
            # The step counters are scalars; the state that scales with the model is the rest.
            state += sum(_bytes(v) for v in per_param.values() if torch.is_tensor(v) and v.numel() > 1)
    record.update(main_params=main_params, optimizer_state=state)
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        record["layer_activation_bytes"] = saved_activation_bytes(trainer, *spec["activation_shape"])
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(records))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
