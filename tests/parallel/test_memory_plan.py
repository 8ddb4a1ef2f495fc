"""`spin-mega plan`: its arithmetic against the bytes the trainer really allocates (live Megatron model,
DDP gradient buffers, fp32 main parameters, optimizer state) at several layouts, against the 7B and 70B
cases worked in launch/README.md, and its refusals of impossible layouts."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from spin_mega.config import ModelConfig
from spin_mega.parallel import memory_plan as mp
from spin_mega.parallel.rendezvous import free_port
from tests.support import REPO, TINY_MODEL, build_tokenizer, spin_mega, write_pairs

GIB = 2**30
WORKER = Path(__file__).with_name("memory_plan_worker.py")
ACTIVATION_SHAPE = (2, 48)  # sequences x tokens: tells per-token from per-position tensors
# The tiny shape as a Qwen3-MoE: 4 experts of width 80 per layer, 2 routed per token.
MOE_SHAPE = dict(num_experts=4, moe_ffn_hidden_size=80, moe_router_topk=2, moe_aux_loss_coeff=0.01)

# (name, ranks, config overrides, planner request fields): DP 2 in fp32 with RMSProp (no main weights; the
# distributed optimizer halves the square average), DP 2 in bf16 with AdamW (main weights and both moments
# halved), TP 2 in bf16 with AdamW, PP 2 in bf16 with RMSProp and tied embeddings (the last stage's own copy).
LAYOUTS = {
    "tp1_dp2_fp32_rmsprop": (2, ["train.precision=fp32", "optim.optimizer=rmsprop"],
                             dict(dtype="fp32", optimizer="rmsprop")),
    "dp2_bf16_adamw": (2, ["train.precision=bf16", "optim.optimizer=adamw"], dict(dtype="bf16", optimizer="adamw")),
    "tp2_bf16_adamw": (2, ["parallel.tensor_parallel=2", "train.precision=bf16", "optim.optimizer=adamw"],
                       dict(dtype="bf16", optimizer="adamw", tensor_parallel=2)),
    "pp2_bf16_rmsprop_tied": (2, ["parallel.pipeline_parallel=2", "train.precision=bf16", "optim.optimizer=rmsprop",
                                  "model.tie_word_embeddings=true"],
                              dict(dtype="bf16", optimizer="rmsprop", pipeline_parallel=2, tied=True)),
    # Qwen3: per-head query/key norms (replicated over TP, their gradients summed over it) and head_dim decoupled
    # from the hidden size (4 x 64 on 128).
    "qwen3_tp2_bf16_adamw": (2, ["model.architecture=qwen3", "parallel.tensor_parallel=2", "train.precision=bf16",
                                 "optim.optimizer=adamw"],
                             dict(dtype="bf16", optimizer="adamw", tensor_parallel=2, architecture="qwen3")),
    # Qwen3-MoE at EP 2 over the 2 ranks: each holds 2 of the 4 experts per layer; the distributed optimizer
    # shards the dense weights' main copies and moments over DP 2 and the experts' over expert-DP 1 (none).
    "qwen3_moe_ep2_bf16_adamw": (2, ["model.architecture=qwen3_moe", *(f"model.{k}={v}" for k, v in MOE_SHAPE.items()),
                                     "parallel.expert_parallel=2", "train.precision=bf16", "optim.optimizer=adamw"],
                                 dict(dtype="bf16", optimizer="adamw", expert_parallel=2, architecture="qwen3_moe")),
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory_plan")
    tokenizer = build_tokenizer(root / "tokenizer")
    pairs = write_pairs(root / "pairs.jsonl", 16)
    config = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    config["model"] = dict(TINY_MODEL)
    config["data"].update(train_path=str(pairs), tokenizer=str(tokenizer), max_prompt_length=64, max_length=128)
    config["train"].update(micro_batch_size=1, global_batch_size=4, save_checkpoints=False)
    config_path = root / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    results = {}
    for name, (nproc, overrides, _) in LAYOUTS.items():
        spec = root / f"{name}.json"
        spec.write_text(json.dumps({
            "config": str(config_path), "overrides": overrides, "workdir": str(root / name),
            "activation_shape": ACTIVATION_SHAPE,
        }))
        out = root / f"{name}.out.json"
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
             str(WORKER), str(spec), str(out)],
            capture_output=True, text=True, timeout=900, cwd=REPO,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[name] = json.loads(out.read_text())
    return results


def _request(fields: dict) -> mp.PlanRequest:
    fields = dict(fields)
    architecture = fields.pop("architecture", "llama")
    model = ModelConfig(**TINY_MODEL, tie_word_embeddings=fields.pop("tied", False), architecture=architecture,
                        **(MOE_SHAPE if architecture == "qwen3_moe" else {}))
    # The config's default, parallel.distributed_optimizer: true, shards main weights and state over DP (gloo too).
    return mp.PlanRequest(model=model, nodes=1, gpus_per_node=2, micro_batch=1, global_batch=4, seq_len=128,
                          distributed_optimizer=True, **fields)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planner_matches_live_allocations(measured, name):
    fields = LAYOUTS[name][2]
    req = _request(fields)
    layout = mp.plan_layout(req, req.tensor_parallel or 1, req.pipeline_parallel or 1, req.expert_parallel or 1)
    assert len(measured[name]) == 2
    for rank in measured[name]:
        stage = layout.stages[rank["stage"]]
        assert rank["params"] == stage.params, (name, rank)
        for key in ("weights", "grads", "main_params", "optimizer_state"):
            planned, live = getattr(stage, key), rank[key]
            if planned == 0 or live == 0:
                assert planned == live, (name, key, planned, live)
            else:
                assert abs(planned - live) / live <= 0.05, (name, key, planned, live)


@pytest.mark.slow
@pytest.mark.parametrize("name, tp, dtype_bytes, architecture", [
    ("tp1_dp2_fp32_rmsprop", 1, 4, "llama"), ("tp2_bf16_adamw", 2, 2, "llama"), ("qwen3_tp2_bf16_adamw", 2, 2, "qwen3"),
    ("qwen3_moe_ep2_bf16_adamw", 1, 2, "qwen3_moe"),
])
def test_activation_model_matches_the_tensors_a_layer_saves(measured, name, tp, dtype_bytes, architecture):
    """The activation bytes the planner assumes for one layer, against the storages the real Megatron
    layer saves for backward on CPU (SDPA attention; models/norm.py's RMSNorm, which upcasts bf16 input
    and saves fp32; at TP 2 sequence parallelism is on, the config's default, so the hidden-sized
    tensors are split over the TP ranks)."""
    batch, seq_len = ACTIVATION_SHAPE
    model = ModelConfig(**TINY_MODEL, architecture=architecture, **(MOE_SHAPE if architecture == "qwen3_moe" else {}))
    planned = mp.layer_activation_bytes(model, tp, True, dtype_bytes, batch * seq_len, seq_len)
    for rank in measured[name]:
        live = rank["layer_activation_bytes"]
        # Left out by the planner: two fp32 scalars per token (the norms' rsqrt), the attention's log-sum-exp.
        assert abs(planned - live) / live <= 0.02, (name, planned, live)


# ------------------------------------------------------------------------------- launch/README.md's cases

MISTRAL_7B = ModelConfig(vocab_size=32000, hidden_size=4096, ffn_hidden_size=14336, num_layers=32,
                         num_attention_heads=32, num_query_groups=8, head_dim=128)
LLAMA3_70B = ModelConfig(vocab_size=128256, hidden_size=8192, ffn_hidden_size=28672, num_layers=80,
                         num_attention_heads=64, num_query_groups=8, head_dim=128)


def _states_gib(stage: mp.StageMemory) -> float:
    return (stage.weights + stage.grads + stage.main_params + stage.optimizer_state) / GIB


def test_readme_7b_case():
    req = mp.PlanRequest(model=MISTRAL_7B, nodes=1, gpus_per_node=8)
    assert mp.total_params(MISTRAL_7B) / 1e9 == pytest.approx(7.24, abs=0.005)
    tp1 = mp.plan_layout(req, 1, 1)
    # The distributed optimizer over DP 8: (6 + 8 / 8) B per parameter, 14 B unsharded.
    assert _states_gib(tp1.stages[0]) == pytest.approx(47.2, abs=0.1)
    assert _states_gib(mp.plan_layout(replace(req, distributed_optimizer=False), 1, 1).stages[0]) == pytest.approx(94.4, abs=0.1)
    # 47.2 + 31.3 GiB of activations + 0.1 + 3 ≈ 81.7 GiB: fits only with recomputation (≈ 52 GiB).
    assert tp1.stages[0].activations / GIB == pytest.approx(31.3, abs=0.05)
    assert tp1.stages[0].total / GIB == pytest.approx(81.7, abs=0.1) and tp1.recompute
    assert tp1.stages[0].total_recompute / GIB == pytest.approx(52.3, abs=0.1)
    tp2 = mp.plan_layout(req, 2, 1)
    assert _states_gib(tp2.stages[0]) == pytest.approx(27.0, abs=0.1)  # (6 + 8 / 4) B x 3.62 B
    assert tp2.stages[0].weights / GIB == pytest.approx(6.7, abs=0.05)
    assert tp2.stages[0].main_params == tp2.stages[0].optimizer_state == pytest.approx(3.4 * GIB, abs=0.05 * GIB)
    assert _states_gib(mp.plan_layout(replace(req, distributed_optimizer=False), 2, 1).stages[0]) == pytest.approx(47.2, abs=0.1)
    assert tp2.microbatches == 16
    fused = mp.plan_layout(replace(req, opponent="fused"), 2, 1).stages[0]
    # A frozen bf16 copy (6.7 GiB) plus its rows in flight and one layer of no-grad forward: ≈ 53 GiB in all.
    assert 6.7 < fused.opponent / GIB < 7.3 and fused.total / GIB == pytest.approx(53.1, abs=0.1)
    logits = mp.plan_layout(replace(req, logprobs="full_logits"), 2, 1).stages[0]
    assert logits.logprobs / GIB == pytest.approx(0.37, abs=0.01)  # 16000 x 4096 x 6 B
    adamw = mp.plan_layout(replace(req, optimizer="adamw"), 1, 1).stages[0]  # (6 + 12 / 8) B per parameter
    assert _states_gib(adamw) == pytest.approx(50.6, abs=0.1)
    # Activations at TP 2 with sequence parallelism (launch/README: 15.7 GiB), and the whole: 27.0 + 15.7 +
    # 0.1 + 3 ≈ 46 GiB.
    assert tp2.stages[0].activations / GIB == pytest.approx(15.7, abs=0.05)
    assert tp2.stages[0].total / GIB == pytest.approx(45.8, abs=0.1)
    layouts, best = mp.plan(req)
    assert (best.tp, best.pp, best.dp) == (2, 1, 4) and not best.recompute


def test_readme_70b_case():
    req = mp.PlanRequest(model=LLAMA3_70B, nodes=4, gpus_per_node=8)
    assert mp.total_params(LLAMA3_70B) / 1e9 == pytest.approx(70.55, abs=0.005)
    layout = mp.plan_layout(req, 8, 4)
    first, last = layout.stages[0], layout.stages[-1]
    assert first.params / 1e9 == pytest.approx(2.27, abs=0.005)
    assert _states_gib(first) == pytest.approx(29.6, abs=0.1)
    assert layout.bubble == pytest.approx(3 / 64)  # (PP - 1) / m of the ideal step time, as layout.py prints it
    # 1F1B: the first stage holds PP micro-batches in flight, the last one.
    assert first.activations == pytest.approx(4 * last.activations, rel=0.01)
    assert first.activations / GIB == pytest.approx(19.5, abs=0.05) and first.total / GIB == pytest.approx(52.1, abs=0.1)
    adam = mp.plan_layout(replace(req, optimizer="adamw"), 8, 4).stages[0]  # DP 1: nothing to shard
    assert _states_gib(adam) == pytest.approx(38.1, abs=0.1)
    assert mp.plan_layout(replace(req, opponent="fused"), 8, 4).stages[0].opponent / GIB > 4.2
    tp8_pp2 = mp.plan_layout(req, 8, 2)
    assert tp8_pp2.stages[0].params / 1e9 == pytest.approx(4.41, abs=0.005)
    # The distributed optimizer over DP 2: (6 + 4) B x 4.41 B = 44.1 GB = 41.1 GiB, + 19.5 + 3 ≈ 63.5 GiB.
    assert _states_gib(tp8_pp2.stages[0]) == pytest.approx(41.1, abs=0.1)
    assert tp8_pp2.stages[0].total / GIB == pytest.approx(63.5, abs=0.1) and tp8_pp2.fits and not tp8_pp2.recompute
    unsharded = mp.plan_layout(replace(req, distributed_optimizer=False), 8, 2)
    assert unsharded.stages[0].total / GIB == pytest.approx(80.0, abs=0.1) and unsharded.recompute  # over 79.6
    # Both fit; PP 4's deeper bubble costs less than PP 2 x DP 2's gradient traffic across nodes.
    _, best = mp.plan(req)
    assert (best.tp, best.pp, best.dp) == (8, 4, 1)
    assert tp8_pp2.step_seconds > best.step_seconds


def test_uneven_pipeline_split_is_the_trainers():
    """PP need not divide the layers: the planner takes parallel/layout.py's split (end stages lighter)."""
    layout = mp.plan_layout(mp.PlanRequest(model=LLAMA3_70B, nodes=6, gpus_per_node=8), 8, 6)
    assert [s.layers for s in layout.stages] == [12, 14, 14, 14, 14, 12]
    assert layout.stages[1].params == 14 * mp.layer_params(LLAMA3_70B, 8)
    assert layout.bubble == pytest.approx(5 / 64)


def test_packed_rows_hold_as_many_whole_pairs_as_fit():
    """Packed rows (data.packing): the default row, 2 x micro_batch x seq_len tokens, is the padded micro-batch's
    worst case, so memory and micro-batch count match the padded plan; a row of 4 such pairs holds 4 pairs
    (a quarter of the micro-batches, 4x the tokens each); a row between whole pairs holds the whole ones."""
    req = mp.PlanRequest(model=MISTRAL_7B, nodes=1, gpus_per_node=8)
    padded = mp.plan_layout(req, 2, 1)
    default = mp.plan_layout(replace(req, pack_tokens=2 * 1 * 2048), 2, 1)
    assert default.microbatches == padded.microbatches == 16
    assert default.stages[0].activations == padded.stages[0].activations
    wide = mp.plan_layout(replace(req, pack_tokens=4 * 2 * 2048), 2, 1)
    assert wide.microbatches == 4
    assert mp.micro_batches_and_tokens(replace(req, pack_tokens=4 * 2 * 2048), 4) == (4, 16384)
    assert mp.micro_batches_and_tokens(replace(req, pack_tokens=3 * 2048), 4) == (16, 4096)
    assert wide.stages[0].activations > 3.9 * padded.stages[0].activations


# ------------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def llama70b_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama70b")
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "rope_theta": 500000.0,
        "max_position_embeddings": 8192, "hidden_act": "silu", "tie_word_embeddings": False,
    }))
    return path


def test_plan_command_prints_layouts_and_the_sbatch_line(llama70b_dir):
    result = spin_mega("plan", "--model", str(llama70b_dir / "config.json"), "--nodes", "4", "--gpus-per-node", "8")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "70.55 B parameters" in out
    assert "chosen: TP 8 x PP 4 x DP 1" in out
    assert "launch/train.sbatch CONFIG.yaml --workdir W --nodes 4 --gpus-per-node 8" in out
    assert f"--tp 8 --pp 4 --set start_model={llama70b_dir}" in out
    assert "<- chosen" in out
    assert "packed rows of at most 4096 tokens" in out and "--set data.packing=true --set data.pack_tokens=4096" in out


def test_plan_command_takes_an_uneven_split(llama70b_dir):
    result = spin_mega("plan", "--model", str(llama70b_dir), "--nodes", "3", "--tp", "8", "--pp", "3")
    assert result.returncode == 0, result.stderr
    assert "chosen: TP 8 x PP 3 x DP 1" in result.stdout
    assert "80 layers over 3 stages [27, 27, 26]" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--tp", "16", "--gpus-per-node", "16"], "tensor parallel 16 must divide the model's 8 key/value groups"),
    (["--pp", "96", "--nodes", "12"], "pipeline parallel 96 would leave a stage with no layers: the model has only 80 layers"),
    (["--tp", "8", "--pp", "3", "--nodes", "2"], "TP 8 x PP 3 does not divide the 16 GPUs"),
    (["--pack-tokens", "1024"], "--pack-tokens (1024) is smaller than --seq-len (2048): a packed row must hold"),
])
def test_plan_refuses_impossible_layouts_in_one_sentence(llama70b_dir, args, message):
    result = spin_mega("plan", "--model", str(llama70b_dir), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# ------------------------------------------------------------------------ Qwen3 presets (configs/qwen3-*.yaml)

# The published config.json shapes of Qwen3-8B and Qwen3-30B-A3B.
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096,
    "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 40960, "rope_theta": 1000000, "rms_norm_eps": 1e-06,
    "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 40960,
    "rope_theta": 1000000, "rms_norm_eps": 1e-06, "hidden_act": "silu", "tie_word_embeddings": False,
    "attention_bias": False, "use_sliding_window": False,
}


def _hf_model(config: dict) -> ModelConfig:
    from spin_mega.models.hf_config import model_config_from_hf

    return model_config_from_hf(config)


def test_qwen3_parameter_counts_are_the_model_cards():
    assert mp.total_params(_hf_model(QWEN3_8B)) / 1e9 == pytest.approx(8.19, abs=0.005)
    moe = _hf_model(QWEN3_30B_A3B)
    assert mp.total_params(moe) / 1e9 == pytest.approx(30.53, abs=0.005)
    assert mp.active_params(moe) / 1e9 == pytest.approx(3.35, abs=0.005)


def test_expert_weights_and_their_optimizer_state_shard_over_expert_parallel_ranks():
    """Qwen3-30B-A3B at TP 2 x PP 2 x EP 8 on 4 x 8 GPUs: each GPU holds 16 of the 128 experts of each of its 24
    layers; the experts' main weights and RMSProp state shard over expert-DP = 32 / (8 x 2) = 2, the dense
    weights' over DP = 32 / (2 x 2) = 8."""
    moe = _hf_model(QWEN3_30B_A3B)
    req = mp.PlanRequest(model=moe, nodes=4, gpus_per_node=8)
    layout = mp.plan_layout(req, 2, 2, 8)
    stage = layout.stages[0]
    expert = 3 * 2048 * 768
    assert (layout.dp, layout.expert_dp) == (8, 2)
    assert stage.expert_params == 24 * 16 * expert
    dense = stage.params - stage.expert_params
    assert stage.optimizer_state == 4 * dense // 8 + 4 * stage.expert_params // 2
    assert stage.main_params == stage.optimizer_state
    # All-to-all: per micro-batch and layer, the 8 copies of the rank's 4096 / TP tokens, 7/8 of them to other
    # ranks, there and back, forward and backward; 24 layers, 8 micro-batches.
    assert layout.all_to_all_bytes == int(4 * 2 * 2048 * 8 * 2048 * 7 / 8 * 24 * 8)
    assert mp.plan_layout(req, 2, 2, 1).all_to_all_bytes == 0
    # The router: experts x hidden per layer, replicated over TP.
    assert mp.layer_params(moe, 2, 8) - mp.layer_params(moe, 2, 16) == 8 * expert


@pytest.mark.parametrize("preset, config, nodes", [
    ("qwen3-8b-spin.yaml", QWEN3_8B, 1), ("qwen3-30b-a3b-spin.yaml", QWEN3_30B_A3B, 4),
])
def test_presets_hold_the_layout_the_planner_picks(preset, config, nodes):
    from spin_mega.config import load_config

    cfg = load_config(REPO / "configs" / preset)
    model = _hf_model(config)
    assert cfg.model.architecture == model.architecture
    _, best = mp.plan(mp.PlanRequest(
        model=model, nodes=nodes, gpus_per_node=8, seq_len=cfg.data.max_length, micro_batch=cfg.train.micro_batch_size,
        global_batch=cfg.train.global_batch_size, optimizer=cfg.optim.optimizer, opponent=cfg.train.opponent,
    ))
    p = cfg.parallel
    assert (best.tp, best.pp, best.ep) == (p.tensor_parallel, p.pipeline_parallel, p.expert_parallel)
    assert not best.recompute and cfg.train.recompute == "none"


@pytest.fixture(scope="module")
def qwen3_moe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_30b_a3b")
    (path / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    return path


def test_plan_command_knows_experts(qwen3_moe_dir):
    result = spin_mega("plan", "--model", str(qwen3_moe_dir), "--nodes", "1", "--gpus-per-node", "8", "--ep", "8", "--tp", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "128 experts of width 768, top-8" in out and "(3.35 B active per token)" in out
    assert "chosen: TP 1 x PP" in out and "x EP 8" in out
    assert "--ep 8 --set start_model=" in out


@pytest.mark.parametrize("args, message", [
    (["--ep", "3"], "expert parallel 3 must divide the model's 128 experts"),
    (["--ep", "16", "--pp", "2"], "expert TP 1 x EP 16 x PP 2 does not divide the 8 GPUs"),
])
def test_plan_refuses_impossible_expert_layouts_in_one_sentence(qwen3_moe_dir, args, message):
    result = spin_mega("plan", "--model", str(qwen3_moe_dir), "--gpus-per-node", "8", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_plan_refuses_expert_parallel_for_a_dense_model(llama70b_dir):
    result = spin_mega("plan", "--model", str(llama70b_dir), "--ep", "2")
    assert result.returncode == 2
    assert "needs a mixture-of-experts model" in result.stderr and len(result.stderr.strip().splitlines()) == 1
