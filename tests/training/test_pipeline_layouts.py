"""Pipeline layouts real models need: uneven stage splits, the interleaved schedule (virtual pipeline
stages), activation recomputation, and layouts refused before start-up. Real megatron-core over gloo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from spin_mega.config import config_from_dict
from spin_mega.errors import ConfigError
from spin_mega.parallel.layout import resolve_layout
from tests.support import REPO, TINY_MODEL, build_tokenizer, read_metrics, spin_mega, write_pairs, write_random_start
from tests.training.test_trainer import _assert_same_step, _final_weights


@pytest.mark.parametrize(
    "layers, pp, virtual, stages",
    [
        (8, 4, 1, (2, 2, 2, 2)),  # even whenever the layers divide
        (5, 2, 1, (3, 2)),
        (6, 4, 1, (1, 2, 2, 1)),
        (28, 8, 1, (2, 4, 4, 4, 4, 4, 4, 2)),  # Qwen2.5-7B at PP 8
        (80, 6, 1, (12, 14, 14, 14, 14, 12)),  # a 70B-class model at PP 6
        (80, 3, 1, (27, 27, 26)),
        (6, 2, 2, (4, 2)),  # in units of the 2 chunks per stage
        (80, 6, 2, (12, 14, 14, 14, 14, 12)),
        (5, 4, 1, (2, 1, 1, 1)),
    ],
)
def test_default_split_fills_every_stage_and_shrinks_the_ends(layers, pp, virtual, stages):
    layout = resolve_layout(layers, pp, virtual)
    assert layout.stage_layers == stages
    assert sum(stages) == layers and all(n % virtual == 0 for n in stages)


def test_explicit_end_stages_and_megatron_fields():
    layout = resolve_layout(6, 4, 1, first_stage_layers=2, last_stage_layers=2)
    assert layout.stage_layers == (2, 1, 1, 2)
    assert layout.megatron_kwargs()["num_layers_in_first_pipeline_stage"] == 2
    assert layout.megatron_kwargs()["num_layers_in_last_pipeline_stage"] == 2
    # At PP 2 only the first stage is named (megatron-core 0.16 divides by the number of middle stages).
    two = resolve_layout(5, 2, 1).megatron_kwargs()
    assert two["num_layers_in_first_pipeline_stage"] == 3 and "num_layers_in_last_pipeline_stage" not in two
    assert "num_layers_in_first_pipeline_stage" not in resolve_layout(8, 4).megatron_kwargs()


def test_bubble_fraction_follows_the_interleaved_formula():
    assert resolve_layout(8, 4).bubble_fraction(8) == pytest.approx(3 / 8)
    assert resolve_layout(8, 4, 2).bubble_fraction(8) == pytest.approx(3 / 16)
    assert "(p-1)/(v*m) = 1/(2*4) = 12.5%" in resolve_layout(6, 2, 2).describe(4)


@pytest.mark.parametrize(
    "args, message",
    [
        ((6, 2, 1, 4, 3), "do not add up"),
        ((6, 2, 1, 6, None), "must split evenly, at least one each"),
        ((7, 3, 1, 2, None), "must split evenly"),
        ((6, 2, 2, 3, None), "stage 0 holds 3"),
        ((6, 2, 4, None, None), "does not divide the model's 6 layers"),
        ((6, 2, 1, 0, None), "a pipeline stage with no layers"),
    ],
)
def test_impossible_explicit_splits_are_refused(args, message):
    with pytest.raises(ConfigError, match=message):
        resolve_layout(*args)


def test_the_old_recompute_key_is_refused_with_its_replacement():
    with pytest.raises(ConfigError, match="train.recompute_activations' was replaced by train.recompute"):
        config_from_dict({"train": {"recompute_activations": True}})
    assert config_from_dict({"train": {"recompute": "selective"}}).train.recompute == "selective"


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory) -> dict:
    """The tiny model with 6 layers (uneven at PP 2 x VPP 2: [4, 2]), 32 pairs, 4 micro-batches a step. A
    constant learning rate keeps the schedule independent of the run length, so a run resumed to a later
    step compares with an uninterrupted one; eps = 1e-4 as in test_trainer (round-off-level gradients). The
    plain optimizer: its checkpoint reshards across layer splits, the distributed optimizer's flat buffers do
    not (that resume is refused, tests/training/test_resume_layout.py)."""
    root = tmp_path_factory.mktemp("six_layers")
    tokenizer = build_tokenizer(root / "tokenizer")
    pairs = write_pairs(root / "pairs.jsonl", 32)
    start = write_random_start(root / "start_mcore", tokenizer, seed=7, model=dict(TINY_MODEL, num_layers=6))
    config = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    config["start_model"] = str(start)
    config["data"].update(train_path=str(pairs), max_prompt_length=64, max_length=128)
    config["train"].update(micro_batch_size=2, global_batch_size=8, epochs=1, seed=11)
    config["optim"].update(lr=1.0e-3, warmup_ratio=0.0, decay="constant", eps=1.0e-4)
    config["parallel"]["distributed_optimizer"] = False
    path = root / "six.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"config": path, "root": root}


def _train(run: dict, workdir: Path, *extra: str, nproc: int, max_steps: int):
    result = spin_mega(
        "train", str(run["config"]), "--workdir", str(workdir), "--max-steps", str(max_steps), *extra, nproc=nproc
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_interleaved_and_uneven_pipelines_match_one_process_and_reshard(six_layers, tmp_path):
    """PP 2 x VPP 2 over [4, 2] layers (full recompute) trains two steps with PP 1's losses; its checkpoint
    resumes at PP 2 over [5, 1] (selective recompute, fused opponent) for a third step with PP 1's loss and
    final weights, and at PP 2 x VPP 2 over [2, 4] with a fused opponent per chunk, with PP 1's loss. Covers:
    uneven splits with and without interleaving, the interleaved opponent precompute and fused opponent,
    recompute modes, and checkpoints (model and optimizer) loaded at another layout. PP 1 pads its
    micro-batches and the pipelines pack theirs (the default), so each comparison is also packed against
    padded, the interleaved schedule's one length per step included."""
    base = tmp_path / "pp1"
    _train(six_layers, base, "--set", "data.packing=false", nproc=1, max_steps=3)
    reference = read_metrics(base)

    interleaved = tmp_path / "pp2_vpp2"
    result = _train(
        six_layers, interleaved, "--pp", "2", "--set", "parallel.virtual_pipeline_parallel=2",
        "--set", "train.recompute=full", nproc=2, max_steps=2,
    )
    assert "pipeline: 6 layers over 2 stages [4, 2] in 2 interleaved chunks per stage" in result.stderr
    assert "bubble (p-1)/(v*m) = 1/(2*4) = 12.5%" in result.stderr
    metrics = read_metrics(interleaved)
    assert len(metrics) == 2
    # The opponent table was computed through the interleaved chunks: the first step is exactly ln 2.
    base_table = json.loads((base / "opponent_logps.json").read_text())
    table = json.loads((interleaved / "opponent_logps.json").read_text())
    for side in ("chosen", "rejected"):
        assert torch.allclose(torch.tensor(table[side]), torch.tensor(base_table[side]), rtol=1e-6, atol=0)
    for a, b in zip(reference[:2], metrics):
        _assert_same_step(a, b, 1e-5, f"pp2 x vpp2 step {a['step']}")

    resumed = tmp_path / "resumed"
    shutil.copytree(interleaved, resumed)
    result = _train(
        six_layers, resumed, "--pp", "2", "--set", "parallel.first_stage_layers=5",
        "--set", "train.recompute=selective", "--set", "train.opponent=fused", nproc=2, max_steps=3,
    )
    assert "resuming from" in result.stderr and "[5, 1]" in result.stderr
    metrics = read_metrics(resumed)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    _assert_same_step(reference[2], metrics[2], 1e-5, "resumed at pp2 [5, 1], step 3")

    # The fused opponent per interleaved chunk, resumed into the other uneven interleaved split.
    swapped = tmp_path / "swapped"
    shutil.copytree(interleaved, swapped)
    result = _train(
        six_layers, swapped, "--pp", "2", "--set", "parallel.virtual_pipeline_parallel=2",
        "--set", "parallel.first_stage_layers=2", "--set", "train.opponent=fused", nproc=2, max_steps=3,
    )
    assert "[2, 4] in 2 interleaved chunks" in result.stderr
    _assert_same_step(reference[2], read_metrics(swapped)[2], 1e-5, "resumed at pp2 x vpp2 [2, 4], fused, step 3")

    # Packed against padded, the gradients agree to ~1e-7; three RMSProp updates later (an element whose
    # gradient is near round-off moves by an amount that round-off sets) the weights agree to 1.3e-5.
    weights, base_weights = _final_weights(resumed), _final_weights(base)
    assert weights.keys() == base_weights.keys()
    for key, ref in base_weights.items():
        if torch.is_tensor(ref):
            rel = ((weights[key] - ref).norm() / ref.norm().clamp(min=1e-12)).item()
            assert rel <= 3e-5, f"{key} differs by {rel:.2e} (relative)"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tp", "4"], "tensor parallel 4 must divide the model's 2 key/value groups"),
        (["--pp", "7"], "pipeline parallel 7 would leave a stage with no layers"),
        (["--set", "parallel.virtual_pipeline_parallel=2"], "virtual pipeline parallel 2 needs pipeline parallelism"),
        (["--pp", "2", "--set", "parallel.virtual_pipeline_parallel=4"], "virtual pipeline parallel 4 must divide"),
    ],
)
def test_impossible_layouts_are_refused_before_start_up(six_layers, tmp_path, args, message):
    """One process, so a refusal after start-up would read "the world size must be a multiple of ..."
    instead: the layout is checked before any process group."""
    workdir = tmp_path / "w"
    result = spin_mega("train", str(six_layers["config"]), "--workdir", str(workdir), *args)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("spin-mega train: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not workdir.exists()
