"""megatron-core's overlapped data-parallel gradient reduction (on by default with NCCL and DP > 1) gives the
same training as the synchronous reduction: forced on over gloo with 2 data-parallel ranks."""

from __future__ import annotations

import pytest

from tests.support import read_metrics, spin_mega


def _train(tiny_run, workdir, overlap: bool):
    result = spin_mega(
        "train", str(tiny_run["config"]), "--workdir", str(workdir), "--max-steps", "2",
        "--set", f"parallel.overlap_grad_reduce={'true' if overlap else 'false'}", "--set", "train.global_batch_size=8",
        nproc=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"overlap_grad_reduce={overlap}" in result.stderr, result.stderr[-2000:]
    assert "response_rows_only=True" in result.stderr
    return read_metrics(workdir)


@pytest.mark.slow
def test_overlapped_gradient_reduction_matches_the_synchronous_one(tiny_run, tmp_path):
    synchronous = _train(tiny_run, tmp_path / "sync", overlap=False)
    overlapped = _train(tiny_run, tmp_path / "overlap", overlap=True)
    assert len(synchronous) == len(overlapped) == 2
    for a, b in zip(synchronous, overlapped):
        for key in ("loss", "logp_chosen", "logp_rejected"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(abs(a[key]), 1e-3), f"step {a['step']} {key}: {a[key]} vs {b[key]}"
