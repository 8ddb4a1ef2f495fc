"""`spin-mega train` on a mixture-of-experts model (Qwen3-MoE shape) on CPU over gloo, with packed rows (the
default data.packing): the SPIN loss stays ln 2 at the first step with the balancing loss logged beside it as
`aux_loss`, the balancing loss reaches the gradient, the opponent (fused or precomputed) adds none, and expert
parallelism over data-parallel ranks, and combined with tensor and pipeline parallelism, trains as the same
data-parallel ranks do without it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.support import read_metrics, spin_mega, write_random_start

LN2 = math.log(2.0)
AUX_COEFF = 0.02
MOE_MODEL = {
    "architecture": "qwen3_moe", "vocab_size": 400, "hidden_size": 64, "ffn_hidden_size": 128, "num_layers": 2,
    "num_attention_heads": 4, "num_query_groups": 2, "head_dim": 32, "max_position_embeddings": 256,
    "num_experts": 4, "moe_ffn_hidden_size": 48, "moe_router_topk": 2, "moe_norm_topk_prob": False,
    "moe_aux_loss_coeff": AUX_COEFF,
}
# Metrics that every layout must reproduce, and how closely (fp32; reductions ordered differently per layout).
COMPARED = ("loss", "aux_loss", "grad_norm", "logp_chosen", "logp_rejected")
REL = 1e-5


@pytest.fixture(scope="module")
def moe_start(tiny_run, tmp_path_factory) -> dict:
    """Two Qwen3-MoE start checkpoints with the same random weights: one with the balancing loss, one without
    (a copy whose spin_mega_model.json says coefficient 0)."""
    root = tmp_path_factory.mktemp("moe_start")
    with_aux = write_random_start(root / "with_aux", tiny_run["tokenizer"], seed=5, model=MOE_MODEL)
    without = Path(shutil.copytree(with_aux, root / "without_aux"))
    meta = json.loads((without / "spin_mega_model.json").read_text())
    meta["model"]["moe_aux_loss_coeff"] = 0.0
    (without / "spin_mega_model.json").write_text(json.dumps(meta))
    return {AUX_COEFF: with_aux, 0.0: without}


def _train(tiny_run, start: Path, workdir: Path, *extra: str, nproc: int = 1, max_steps: int = 2) -> list[dict]:
    result = spin_mega(
        "train", str(tiny_run["config"]), "--workdir", str(workdir), "--max-steps", str(max_steps),
        "--set", f"start_model={start}", "--set", "train.save_checkpoints=false", *extra, nproc=nproc,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(workdir)


@pytest.fixture(scope="module")
def one_process(tiny_run, moe_start, tmp_path_factory) -> list[dict]:
    """The reference: one process (EP 1), opponent precomputed."""
    return _train(tiny_run, moe_start[AUX_COEFF], tmp_path_factory.mktemp("moe_one_process") / "w")


@pytest.fixture(scope="module")
def data_parallel(tiny_run, moe_start, tmp_path_factory) -> list[dict]:
    """Two data-parallel ranks at EP 1, opponent precomputed, packed (the default): each rank's rows are what an
    EP 2 run's are, since with MoE every rank packs as many rows (equal_rows) whatever the EP."""
    return _train(tiny_run, moe_start[AUX_COEFF], tmp_path_factory.mktemp("moe_data_parallel") / "w", nproc=2)


def _assert_same_run(actual: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for a, e in zip(actual, expected, strict=True):
        for key in COMPARED:
            assert abs(a[key] - e[key]) <= REL * max(abs(e[key]), 1e-3), (a["step"], key, a[key], e[key])


def test_spin_loss_is_ln2_with_the_balancing_loss_logged_beside_it(one_process):
    first = one_process[0]
    # The logged loss is SPIN's alone: ln 2 to float32 precision at theta = theta_t, although the balancing loss
    # (about coefficient x 2 layers for near-uniform routing) was added to what the optimizer minimised.
    assert abs(first["loss"] - LN2) < 1e-6
    assert all(row["aux_loss"] > 0 for row in one_process)
    assert 0.9 * AUX_COEFF * 2 < first["aux_loss"] < 2.0 * AUX_COEFF * 2


def test_balancing_loss_reaches_the_gradient(tiny_run, moe_start, one_process, tmp_path):
    """Same weights and batch, coefficient 0: no aux_loss in the metrics and a different gradient."""
    without = _train(tiny_run, moe_start[0.0], tmp_path / "w", max_steps=1)
    assert "aux_loss" not in without[0]
    assert without[0]["loss"] == one_process[0]["loss"]
    assert abs(without[0]["grad_norm"] - one_process[0]["grad_norm"]) > 1e-4 * one_process[0]["grad_norm"]


@pytest.mark.slow
def test_expert_parallel_over_data_parallel_ranks_with_the_fused_opponent(tiny_run, moe_start, data_parallel, tmp_path):
    """EP 2 over the 2 data-parallel ranks, packed (the all-gather dispatcher lengthens both ranks' rows to one
    length; that padding tail is left out of the routing statistics), with the opponent running fused beside
    the policy: the same losses, balancing losses and gradient norms as the same two ranks at EP 1 with the
    opponent precomputed. A balancing loss from the opponent's pass would double aux_loss; routing over a
    different set of tokens would change it; unequal row counts would hang the token exchange.

    Against two ranks, not one process: packing groups each rank's share of a step into rows, and the
    balancing loss is a statistic of each micro-batch's tokens, so one process's rows give another aux_loss
    (1.7e-4 relative measured at the first step); at EP 1 the two ranks' aux_loss averages like EP 2's."""
    metrics = _train(tiny_run, moe_start[AUX_COEFF], tmp_path / "w", "--ep", "2", "--set", "train.opponent=fused", nproc=2)
    _assert_same_run(metrics, data_parallel)


@pytest.mark.slow
def test_expert_parallel_with_tensor_and_pipeline_parallel(tiny_run, moe_start, one_process, tmp_path):
    """TP 2 (sequence parallel) x PP 2 x EP 2 on 4 ranks, packed like the one process (one data-parallel rank:
    the same rows): the experts of each stage's layer spread over 2 ranks, the routers' token statistics
    summed over the TP ranks' sequence shards, the padding mask split over them on the second stage too."""
    metrics = _train(tiny_run, moe_start[AUX_COEFF], tmp_path / "w", "--tp", "2", "--pp", "2", "--ep", "2", nproc=4)
    _assert_same_run(metrics, one_process)
