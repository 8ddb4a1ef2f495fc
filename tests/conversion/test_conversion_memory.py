"""The Megatron checkpoint writer holds one chunk at a time: what it has written is freed before the next
chunk is produced, although DCP's file writer keeps references to written chunks until its file closes.
(How much memory a conversion holds is measured by benchmarks/conversion.py --scaling.)"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from spin_mega.conversion import dist_ckpt
from spin_mega.conversion.safetensors_io import SafetensorsReader


def test_written_chunks_are_freed_before_the_next_is_produced(tmp_path):
    generator = torch.Generator().manual_seed(0)
    source = {f"w{i}": torch.randn(2, 8, 16, generator=generator) for i in range(4)}
    per_layer = {f"{name}.{layer}": t[layer] for name, t in source.items() for layer in range(2)}
    save_file(per_layer, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(tmp_path)
    produced: list[torch.Tensor] = []
    live_bytes_at_produce: list[int] = []

    def produce(name: str, layer: int) -> torch.Tensor:
        live_bytes_at_produce.append(sum(t.untyped_storage().nbytes() for t in produced))
        # Straight from the safetensors reader, as hf_to_mcore hands over tensors that need no reshaping.
        tensor = reader.get(f"{name}.{layer}").unsqueeze(0)
        produced.append(tensor)
        return tensor

    entries = [
        dist_ckpt.TensorChunk(
            key=name,
            global_shape=(2, 8, 16),
            offsets=(layer, 0, 0),
            sizes=(1, 8, 16),
            dtype=torch.float32,
            produce=lambda name=name, layer=layer: produce(name, layer),
        )
        for name in source
        for layer in range(2)
    ]
    dist_ckpt.write_checkpoint(tmp_path / "model", entries)

    assert live_bytes_at_produce == [0] * len(entries)
    assert [t.untyped_storage().nbytes() for t in produced] == [0] * len(entries)
    checkpoint = dist_ckpt.CheckpointReader(tmp_path / "model")
    for name, tensor in source.items():
        assert torch.equal(checkpoint.read(name, (0, 0, 0), (2, 8, 16)), tensor)
