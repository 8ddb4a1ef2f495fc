"""Body of the response-row gather tests, one process per tensor-parallel rank over gloo (spawned
processes import it by name). Each rank checks its own results and raises on a mismatch."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

IMPLS = ("fused_linear", "triton", "reference")
S, B, H = 8, 3, 16
VOCAB, PADDED = 50, 64  # 14 padding rows, all on the last TP rank's shard
IGNORE = -100


class OutputHead:
    """What `sequence_logprobs` reads from the last pipeline stage: whether the hidden states are
    sequence-sharded, and this rank's vocabulary shard of the output weight."""

    def __init__(self, weight: torch.Tensor, sequence_parallel: bool):
        self.config = SimpleNamespace(sequence_parallel=sequence_parallel)
        self._weight = weight

    def output_weight(self) -> torch.Tensor:
        return self._weight


def _labels() -> torch.Tensor:
    """[b, s]: a prompt then a response, a response cut by padding, and a single labelled token."""
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    labels[0, :3] = IGNORE
    labels[1, :5] = IGNORE
    labels[1, -1] = IGNORE
    labels[2, :] = IGNORE
    labels[2, 4] = VOCAB - 1
    return labels


def run_case(rank: int, world: int, port: int, sequence_parallel: bool) -> None:
    from megatron.core import parallel_state

    from spin_mega.parallel import distributed
    from spin_mega.training.logprobs import response_rows, sequence_logprobs

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.initialize(tensor_parallel=world)
    try:
        torch.manual_seed(0)
        hidden = torch.randn(S, B, H, dtype=torch.float64)
        weight = torch.randn(PADDED, H, dtype=torch.float64) * 0.5
        labels = _labels()
        coeff = torch.randn(B, dtype=torch.float64)

        # Oracle: every position through the output layer in float64, prompt positions masked after.
        h_ref = hidden.clone().requires_grad_()
        w_ref = weight.clone().requires_grad_()
        logp = torch.log_softmax(h_ref @ w_ref[:VOCAB].T, dim=-1)
        labels_sb = labels.t()
        token = logp.gather(-1, labels_sb.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels_sb != IGNORE)
        expected = token.sum(dim=0)
        (expected * coeff).sum().backward()

        local = PADDED // world
        vocab_rows = slice(rank * local, (rank + 1) * local)
        seq = slice(rank * S // world, (rank + 1) * S // world) if sequence_parallel else slice(None)
        rows = response_rows(labels)
        assert parallel_state.get_tensor_model_parallel_world_size() == world
        for impl in IMPLS:
            h = hidden[seq].float().clone().requires_grad_()
            w = weight[vocab_rows].float().clone().requires_grad_()
            saved: list[torch.Size] = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.shape), t)[1], lambda t: t):
                out = sequence_logprobs(OutputHead(w, sequence_parallel), h, labels, VOCAB, impl, rows)
            (out * coeff.float()).sum().backward()
            what = f"{impl} tp={world} sp={sequence_parallel} rank {rank}"
            torch.testing.assert_close(out.double(), expected.detach(), atol=2e-5, rtol=1e-5, msg=what)
            torch.testing.assert_close(h.grad.double(), h_ref.grad[seq], atol=2e-5, rtol=1e-5, msg=f"{what}: d hidden")
            torch.testing.assert_close(w.grad.double(), w_ref.grad[vocab_rows], atol=2e-5, rtol=1e-5, msg=f"{what}: d weight")
            # No hidden state or logits row of a prompt or padding position was kept for backward: every
            # saved activation has one row per labelled position.
            activations = [shape for shape in saved if len(shape) >= 2 and shape not in (w.shape, w.t().shape)]
            assert activations and all(shape[0] == rows.numel() for shape in activations), f"{what}: saved {activations}"
    finally:
        distributed.shutdown()
