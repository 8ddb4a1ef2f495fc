"""`spin-mega train` end to end on CPU over gloo: real megatron-core, real dist_checkpointing."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.support import read_metrics, spin_mega

LN2 = math.log(2.0)
METRIC_KEYS = ("loss", "logp_chosen", "logp_rejected", "reward_accuracy")
REWARD_KEYS = ("reward_chosen", "reward_rejected", "reward_margin")
BETA = 0.1


def _assert_same_step(a: dict, b: dict, rel: float, what: str) -> None:
    for key in METRIC_KEYS:
        if key == "reward_accuracy" and a["step"] == 1:
            # policy = opponent: each reward is 0 up to the rounding of two passes (a packed step against the
            # opponent's padded pass), so which side wins is noise; the rewards themselves are checked below.
            continue
        _assert_close_rel(a[key], b[key], rel, f"{what} {key}")
    # Rewards are beta times differences of log-prob sums of ~100 nats: their float32 error is relative to
    # the sums, not to the (small) differences.
    scale = BETA * max(abs(a["logp_chosen"]), abs(a["logp_rejected"]))
    for key in REWARD_KEYS:
        assert abs(a[key] - b[key]) <= rel * scale, f"{what} {key}: {a[key]} vs {b[key]}"


def _train(tiny_run, workdir: Path, *extra: str, nproc: int = 1, max_steps: int = 2):
    result = spin_mega(
        "train", str(tiny_run["config"]), "--workdir", str(workdir), "--max-steps", str(max_steps), *extra, nproc=nproc
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(workdir)


def _final_weights(workdir: Path) -> dict[str, torch.Tensor]:
    """Global (TP/PP-gathered) tensors of the final checkpoint, read without building a model."""
    latest = (workdir / "checkpoints" / "latest").read_text().strip()
    return _final_weights_of(workdir / "checkpoints" / latest / "model")


def _final_weights_of(model_dir: Path) -> dict[str, torch.Tensor]:
    """Global tensors of a Megatron model directory (dist_checkpointing format)."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing import load_plain_tensors

    from tests.support import free_port

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        return load_plain_tensors(str(model_dir))
    finally:
        if owns_group:
            dist.destroy_process_group()


def _assert_close_rel(a: float, b: float, rel: float, what: str) -> None:
    assert abs(a - b) <= rel * max(abs(a), abs(b), 1e-3), f"{what}: {a} vs {b}"


def test_first_step_loss_is_ln2_and_metrics_are_complete(tiny_run, tmp_path):
    metrics = _train(tiny_run, tmp_path / "w", max_steps=2)
    assert len(metrics) == 2
    assert abs(metrics[0]["loss"] - LN2) < 1e-6
    required = {"step", "loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "lr", "grad_norm", "tokens_per_s"}
    assert required <= set(metrics[0])
    assert metrics[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    # Training moves the policy away from the opponent: the second step sees a non-zero margin.
    assert abs(metrics[1]["reward_margin"]) > 1e-4
    assert all(m["logp_chosen"] < 0 and m["logp_rejected"] < 0 for m in metrics)
    summary = json.loads((tmp_path / "w" / "train_summary.json").read_text())
    assert summary["data"]["rows_kept"] == 64


def test_precompute_and_fused_opponents_give_the_same_losses(tiny_run, tmp_path):
    pre = _train(tiny_run, tmp_path / "pre", "--set", "train.opponent=precompute", max_steps=3)
    fused = _train(tiny_run, tmp_path / "fused", "--set", "train.opponent=fused", max_steps=3)
    assert (tmp_path / "pre" / "opponent_logps.json").is_file()
    assert not (tmp_path / "fused" / "opponent_logps.json").exists()
    for a, b in zip(pre, fused):
        _assert_same_step(a, b, 1e-5, f"step {a['step']}")


# RMSProp's first updates are lr * g / (sqrt(0.01 g^2) + eps): with the default eps = 1e-8 an element whose
# gradient is at round-off level (~1e-9) moves by O(lr) in a direction set by summation order. eps = 1e-4 keeps
# such elements in the linear regime, so comparisons measure parallelism and precision, not that amplifier.
STABLE = ("--set", "optim.eps=1e-4")
PLAIN_OPTIMIZER = ("--set", "parallel.distributed_optimizer=false")


# MFU is logged on CPU too once a peak is given; 1 TFLOP/s makes its value easy to read back.
PEAK_OVERRIDE = ("--set", "train.peak_tflops=1.0")
# The reference runs pad every sequence to its micro-batch's longest; the runs compared with them pack
# (data.packing, the default), so each layout test is also a packed-against-padded test.
PADDED = ("--set", "data.packing=false")


@pytest.fixture(scope="module")
def single_process_run(tiny_run, tmp_path_factory):
    """The reference of the layout and precision tests: one process, fp32, the non-distributed optimizer,
    padded micro-batches."""
    workdir = tmp_path_factory.mktemp("tp1pp1")
    args = (*STABLE, *PLAIN_OPTIMIZER, *PEAK_OVERRIDE, *PADDED)
    result = spin_mega("train", str(tiny_run["config"]), "--workdir", str(workdir), "--max-steps", "2", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"metrics": read_metrics(workdir), "weights": _final_weights(workdir), "stderr": result.stderr, "overrides": args[1::2]}


@pytest.fixture(scope="module")
def single_process_fp32(single_process_run):
    return single_process_run["metrics"], single_process_run["weights"]


@pytest.mark.slow
def test_trainer_uses_what_spin_mega_env_reports(tiny_run, single_process_run):
    """`spin-mega env` for the same config and overrides, in a process like the trainer's, prints the choices
    the trainer logs at start-up, in the same order."""
    overrides = [arg for value in single_process_run["overrides"] for arg in ("--set", value)]
    env = spin_mega("env", str(tiny_run["config"]), *overrides)
    assert env.returncode == 0, env.stderr[-2000:]
    section = env.stdout.split("a training run with this configuration would use:\n", 1)[1]
    reported = [line.strip().split("  (")[0].replace(": ", " ", 1) for line in section.splitlines()]
    assert {"attention sdpa", "precision fp32", "distributed optimizer off", "sequence parallel off", "packing off"} <= set(reported)
    assert f"[spin-mega] using {', '.join(reported)}\n" in single_process_run["stderr"]


@pytest.mark.slow
def test_mfu_counts_real_tokens_and_names_its_peak(tiny_run, single_process_run):
    """MFU x peak x step time / 3 (forward + backward, precompute mode) is the model FLOPs of the step: per
    real token, between the FLOPs of a 1-token and a max_length-token context. Counting padded tokens
    (a ~20% padding fraction here) or the embeddings as dense weights falls outside that interval."""
    import yaml

    from spin_mega.config import ModelConfig
    from spin_mega.training.telemetry import non_embedding_params, transformer_flops_per_token

    shape = json.loads((tiny_run["start"] / "spin_mega_model.json").read_text())["model"]
    model = ModelConfig(**{k: v for k, v in shape.items() if k in ModelConfig.__dataclass_fields__})
    max_length = yaml.safe_load(tiny_run["config"].read_text())["data"]["max_length"]
    for row in single_process_run["metrics"]:
        assert row["mfu_peak"] == "train.peak_tflops"
        assert row["padding_fraction"] > 0.05
        real_tokens = row["tokens_per_s"] * row["step_time_s"]
        per_token = row["mfu"] * 1e12 * row["step_time_s"] / 3.0 / real_tokens
        bounds = [
            transformer_flops_per_token(non_embedding_params(model), model.num_layers, model.hidden_size, s, model.vocab_size)
            for s in (1, max_length)
        ]
        assert bounds[0] <= per_token <= bounds[1], (per_token, bounds)


def _relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12)).item()


@pytest.mark.slow
def test_parallel_layouts_match_single_process(tiny_run, single_process_fp32, tmp_path):
    """TP=2 with sequence parallelism, PP=2, TP=2 x PP=2 (sequence parallel, fused opponent) and DP=2 with the
    distributed optimizer (RMSProp state sharded) against one process with the plain optimizer and padded
    micro-batches: same losses, gradient norms and updated weights after two optimizer steps (fp32, 1e-5
    relative). All but PP=2 pack their micro-batches (one process packed too): packed equals padded under
    each layout; PP=2 stays padded, so that padded pipelines keep their test.

    The gradient norm is the sharpest check of the layouts' gradient reductions: a norm weight under sequence
    parallelism that missed its all-reduce over TP, or a parameter counted twice, changes it at step 1.
    TP=2 x PP=2 x DP=2 (8 ranks) is left out: 8 processes on CI's 2 cores cost minutes, and each of its
    reductions is exercised by a layout here."""
    base, base_weights = single_process_fp32
    # Rows of 256 tokens hold unequal numbers of pairs (the default row holds a whole step here), which the
    # loss's per-micro-batch scale must even out.
    small_rows = ("--set", "data.pack_tokens=256")
    layouts = {
        "packed": (1, [*STABLE, *PLAIN_OPTIMIZER, *small_rows]),
        "tp2_sp": (2, ["--tp", "2", "--set", "parallel.sequence_parallel=true", *STABLE, *small_rows]),
        "pp2": (2, ["--pp", "2", *STABLE, *PLAIN_OPTIMIZER, *PADDED]),
        "tp2pp2_sp": (4, ["--tp", "2", "--pp", "2", "--set", "train.opponent=fused", *STABLE]),
        "dp2_distopt": (2, ["--set", "parallel.distributed_optimizer=true", *STABLE]),
    }
    for name, (nproc, args) in layouts.items():
        metrics = _train(tiny_run, tmp_path / name, *args, nproc=nproc, max_steps=2)
        for a, b in zip(base, metrics):
            _assert_same_step(a, b, 1e-5, f"{name} step {a['step']}")
            _assert_close_rel(a["grad_norm"], b["grad_norm"], 1e-5, f"{name} step {a['step']} grad_norm")
        weights = _final_weights(tmp_path / name)
        assert weights.keys() == base_weights.keys()
        for key, ref in base_weights.items():
            if not torch.is_tensor(ref):
                continue
            # Relative Frobenius distance: RMSProp's early steps are nearly sign(g) * lr, so single elements
            # with gradients at round-off level can move by round-off-sized amounts times lr / eps.
            rel = _relative_distance(weights[key], ref)
            assert rel <= 1e-5, f"{name}: {key} differs by {rel:.2e} (relative)"


@pytest.mark.slow
def test_bf16_training_tracks_fp32(tiny_run, single_process_fp32, tmp_path):
    """bf16 parameters and activations (Megatron's Float16OptimizerWithFloat16Params: fp32 main weights and
    main gradients, log-prob sums and loss in fp32) against the fp32 run, then bf16 with the distributed
    optimizer over DP=2 against that. Tolerances are bf16's: its 8-bit
    mantissa gives ~4e-3 relative error per rounding, and the log-prob sums of ~100 nats and the weights after
    two RMSProp steps stay within 1e-2 relative; the first loss is still ln 2 (policy = opponent) to bf16's
    rounding of a packed step against the padded opponent pass (2.4e-5 measured)."""
    base, base_weights = single_process_fp32
    metrics = _train(tiny_run, tmp_path / "bf16", "--set", "train.precision=bf16", *STABLE, *PLAIN_OPTIMIZER, max_steps=2)
    assert abs(metrics[0]["loss"] - LN2) < 1e-4
    for a, b in zip(base, metrics):
        for key in ("loss", "logp_chosen", "logp_rejected", "grad_norm"):
            _assert_close_rel(a[key], b[key], 1e-2, f"bf16 step {a['step']} {key}")
    weights = _final_weights(tmp_path / "bf16")
    layer_weights = [key for key, ref in base_weights.items() if torch.is_tensor(ref)]
    assert all(weights[key].dtype == torch.bfloat16 for key in layer_weights)
    for key in layer_weights:
        rel = _relative_distance(weights[key], base_weights[key])
        assert rel <= 1e-2, f"bf16: {key} differs by {rel:.2e} (relative)"
    # The update really happened in bf16's resolution, not as a no-op: the weights moved from the start.
    start = _final_weights_of(tiny_run["start"] / "model")
    moved = max(_relative_distance(weights[key], start[key]) for key in layer_weights if key in start)
    assert moved > 1e-3
    # The GPU default: bf16 with the distributed optimizer (fp32 main-weight shards) over DP=2. Same bf16
    # rounding of the forward, gradients reduced in fp32 in another order: within 1e-3 of the plain wrapper.
    sharded = _train(tiny_run, tmp_path / "bf16_dp2", "--set", "train.precision=bf16", "--set", "parallel.distributed_optimizer=true", *STABLE, nproc=2, max_steps=2)
    for a, b in zip(metrics, sharded):
        for key in ("loss", "logp_chosen", "logp_rejected", "grad_norm"):
            _assert_close_rel(a[key], b[key], 1e-3, f"bf16 DP=2 distributed optimizer step {a['step']} {key}")


@pytest.mark.slow
def test_distributed_optimizer_checkpoint_resumes_at_another_dp_size(tiny_run, tmp_path):
    """RMSProp state sharded over DP=2 (square_avg), saved at step 2, resumed with one process: steps 3-4
    repeat the uninterrupted DP=2 run. A resume that lost square_avg takes a first-step-sized update at step 3
    (about lr / sqrt(1 - alpha) = 10 lr per element), which moved step 4's loss by 3e-2 when tried."""
    settings = ["--set", "parallel.distributed_optimizer=true", "--set", "train.save_interval=2", *STABLE]
    workdir = tmp_path / "w"
    straight = _train(tiny_run, workdir, *settings, nproc=2, max_steps=4)
    root = workdir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000004"
    shutil.rmtree(root / "step_000004")
    (root / "latest").write_text("step_000002\n")
    result = spin_mega("train", str(tiny_run["config"]), "--workdir", str(workdir), "--max-steps", "4", *settings)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    resumed = read_metrics(workdir)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight[2:], resumed[2:]):
        _assert_same_step(a, b, 1e-5, f"resumed step {a['step']}")
        _assert_close_rel(a["grad_norm"], b["grad_norm"], 1e-5, f"resumed step {a['step']} grad_norm")


@pytest.mark.slow
def test_signal_checkpoints_and_resume_reproduces_the_losses(tiny_run, tmp_path):
    steps = 24
    settings = ["--set", "train.global_batch_size=4", "--set", "train.epochs=2"]
    reference = _train(tiny_run, tmp_path / "straight", *settings, max_steps=steps)
    assert len(reference) == steps

    workdir = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "spin_mega", "train", str(tiny_run["config"]), "--workdir", str(workdir), "--max-steps", str(steps), *settings]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics_file = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.is_file() and metrics_file.read_text().count("\n") >= 2:
            proc.send_signal(signal.SIGUSR1)
            break
        time.sleep(0.01)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]
    stopped_at = len(read_metrics(workdir))
    assert 2 <= stopped_at < steps
    assert (workdir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:06d}"

    resumed = spin_mega("train", str(tiny_run["config"]), "--workdir", str(workdir), "--max-steps", str(steps), *settings)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    combined = read_metrics(workdir)
    assert [m["step"] for m in combined] == list(range(1, steps + 1))
    # Every step trained a whole global batch: no pair skipped or repeated across the resume (which pairs
    # they were is data/packing.py's pure function of the step, tests/data/test_packing.py).
    assert [m["pairs"] for m in combined] == [4] * steps
    for a, b in zip(reference[stopped_at:], combined[stopped_at:]):
        _assert_same_step(a, b, 1e-6, f"step {a['step']}")
        for key in ("lr", "grad_norm"):
            _assert_close_rel(a[key], b[key], 1e-6, f"step {a['step']} {key}")


def test_bad_rows_are_skipped_counted_and_reported(tiny_run, tmp_path):
    rows = [json.loads(line) for line in tiny_run["pairs"].read_text().splitlines()]
    rows[0]["prompt"] = 17  # malformed
    rows[1]["chosen"] = "   "  # empty response
    rows[2]["prompt"] = "the sea " * 200  # over max_prompt_length
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = spin_mega(
        "train", str(tiny_run["config"]), "--workdir", str(tmp_path / "w"), "--max-steps", "1",
        "--set", f"data.train_path={bad}", "--set", "data.prompt_truncation=drop",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "61 of 64 pairs kept" in result.stderr
    counts = json.loads((tmp_path / "w" / "train_summary.json").read_text())["data"]
    assert (counts["malformed"], counts["empty_response"], counts["prompt_too_long_dropped"]) == (1, 1, 1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--set", "train.micro_batchsize=2"], "unknown config key 'train.micro_batchsize'"),
        (["--set", "data.train_path=/nonexistent/pairs.jsonl"], "/nonexistent/pairs.jsonl"),
        (["--tp", "3"], "tensor parallel 3"),
        (["--set", "data.pack_tokens=100"], "data.pack_tokens (100) is smaller than data.max_length (128)"),
    ],
)
def test_bad_input_gives_one_clear_line(tiny_run, tmp_path, overrides, message):
    nproc = 3 if "--tp" in overrides else 1
    result = spin_mega("train", str(tiny_run["config"]), "--workdir", str(tmp_path / "w"), *overrides, nproc=nproc)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("spin-mega train: error:")]
    assert errors and message in errors[0], result.stderr[-2000:]
    if nproc == 1:  # torchrun prints its own traceback when a child exits non-zero
        assert "Traceback" not in result.stderr


def test_tokenizer_without_chat_template_is_refused(tiny_run, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_run["tokenizer"]))
    tok.chat_template = None
    plain = tmp_path / "plain_tokenizer"
    tok.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    result = spin_mega("train", str(tiny_run["config"]), "--workdir", str(tmp_path / "w"), "--set", f"data.tokenizer={plain}")
    assert result.returncode == 2
    assert "has no chat template" in result.stderr


@pytest.mark.slow
def test_triton_kernels_in_the_trainer_match_the_float64_reference(tiny_run, tmp_path):
    """The trainer's default log-prob path with the real Triton kernels (the interpreter on CPU, compiled on
    a GPU) against the float64 reference path, through the same two optimizer steps."""
    settings = ["--set", "train.global_batch_size=4"]
    kernel = spin_mega(
        "train", str(tiny_run["config"]), "--workdir", str(tmp_path / "kernel"), "--max-steps", "2", *settings,
        "--set", "train.logprobs=fused_linear", env={"TRITON_INTERPRET": "1"},
    )
    assert kernel.returncode == 0, kernel.stderr[-3000:]
    reference = _train(tiny_run, tmp_path / "reference", *settings, "--set", "train.logprobs=reference", max_steps=2)
    for a, b in zip(read_metrics(tmp_path / "kernel"), reference):
        _assert_same_step(a, b, 1e-5, f"step {a['step']}")


def test_training_starts_from_an_hf_model_directory(tiny_run, tmp_path):
    """start_model may be an HF directory: the trainer imports it into Megatron format once, then trains."""
    from spin_mega.demo.build import build_tiny_model, build_tokenizer

    hf = build_tiny_model(tmp_path / "hf", build_tokenizer(tmp_path / "tok"), seed=1)
    workdir = tmp_path / "w"
    result = spin_mega(
        "train", str(tiny_run["config"]), "--workdir", str(workdir), "--max-steps", "1",
        "--set", f"start_model={hf}", "--set", "data.tokenizer=null",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "start_mcore" / "spin_mega_model.json").is_file()
    assert abs(read_metrics(workdir)[0]["loss"] - LN2) < 1e-6


def test_save_checkpoints_false_trains_without_writing_any(tiny_run, tmp_path):
    """Benchmarks time steps of models whose checkpoints would be many GB: with the switch off, steps run
    and are logged, and no checkpoint (interval or final) is written."""
    metrics = _train(tiny_run, tmp_path / "w", "--set", "train.save_checkpoints=false", "--set", "train.save_interval=1")
    assert [m["step"] for m in metrics] == [1, 2]
    assert not (tmp_path / "w" / "checkpoints").exists()
