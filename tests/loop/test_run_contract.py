"""`spin-mega run`'s contract with its user, met through the CLI before any stage runs: a value the user set
reaches the stage that uses it (one key per value, one precedence), every input is checked before anything is
written, two runs never share a work directory, and a resumed directory keeps the settings its results came
from. Each refusal is one sentence with exit 2; nothing is written or lost. (The same contract over a whole
run: tests/loop/test_run_loop.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spin_mega import rundir
from spin_mega.config import config_to_dict, load_config
from tests.support import REPO


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """What a run reads: theta_0 as an HF model directory (its config; no stage reads its weights here), the
    SFT data and the held-out rows, and the tiny CPU config pointing at them."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("contract")
    start = root / "theta0"
    LlamaConfig(vocab_size=400, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(start)
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"what is {i} plus 1", "response": f"it is {i + 1}."}) + "\n" for i in range(16)))
    heldout = root / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"prompt": f"what is {i} plus 2", "response": f"it is {i + 2}.", "answer": str(i + 2)}) + "\n"
                               for i in range(4)))
    config = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    config["start_model"] = str(start)
    config["data"].update(train_path=str(sft), eval_path=str(heldout), schema="prompt_response")
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"root": root, "config": path, "start": start, "sft": sft, "heldout": heldout}


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """`spin-mega ARGV` in this process: (exit status, the lines it wrote to stderr)."""
    from spin_mega.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    return exited.value.code, capsys.readouterr().err.strip().splitlines()


def _refused(capsys, *argv: str) -> str:
    code, lines = _cli(capsys, *argv)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"spin-mega {argv[0]}: error: "), (code, lines)
    return lines[0]


# ---- 1. one key per value: the user's loss.beta and optim.lr reach training ---------------------------------

class _RecordingStages:
    """Stands in for the stage launcher: keeps the `spin-mega train` command line the loop would start."""

    def __init__(self):
        self.train_args: list[list[str]] = []

    def train(self, args, what, log_path, preempted):
        self.train_args.append(list(args))


def _training_config(config: Path, workdir: Path, t: int):
    """The config iteration t's training stage resolves, read as `spin-mega train` reads its command line."""
    from spin_mega.loop.driver import SpinLoop

    cfg = load_config(config)
    workdir.mkdir(parents=True)
    # The loop's resolved config, as the run leaves it in WORKDIR/config.yaml for its stages.
    (workdir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    for s in range(t):  # earlier iterations' final checkpoints, where iteration t starts
        checkpoints = workdir / f"iter_{s}" / "train" / "checkpoints"
        (checkpoints / "step_000004").mkdir(parents=True)
        (checkpoints / "step_000004" / "trainer_state.json").write_text("{}")
        (checkpoints / "latest").write_text("step_000004\n")
    loop = SpinLoop(cfg, workdir)
    loop.stages = _RecordingStages()
    loop._train(t, workdir / f"iter_{t}")
    (args,) = loop.stages.train_args
    assert args[:2] == ["train", str(workdir / "config.yaml")]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    return load_config(args[1], overrides)


def test_the_users_beta_and_learning_rate_reach_the_training_stage(inputs, tmp_path):
    raw = yaml.safe_load(inputs["config"].read_text())
    raw["loss"]["beta"] = 0.5
    raw["optim"]["lr"] = 2e-5
    config = tmp_path / "beta.yaml"
    config.write_text(yaml.safe_dump(raw))
    for t in (0, 1):
        trained = _training_config(config, tmp_path / f"w{t}", t)
        assert (trained.loss.beta, trained.optim.lr) == (0.5, 2e-5)


def test_a_schedule_takes_the_place_of_its_single_value(inputs, tmp_path):
    raw = yaml.safe_load(inputs["config"].read_text())
    del raw["optim"]["lr"]
    raw["iterations"].update(lr=[3e-5, 1e-5], beta=[0.1, 0.1, 5.0])
    config = tmp_path / "schedule.yaml"
    config.write_text(yaml.safe_dump(raw))
    got = [_training_config(config, tmp_path / f"w{t}", t) for t in (0, 1, 2)]
    assert [(c.optim.lr, c.loss.beta) for c in got] == [(3e-5, 0.1), (1e-5, 0.1), (1e-5, 5.0)]


def test_a_schedule_and_its_single_value_together_are_refused(inputs, tmp_path, capsys):
    workdir = tmp_path / "w"
    error = _refused(capsys, "run", str(inputs["config"]), "--workdir", str(workdir), "--set", "loss.beta=0.5",
                     "--set", "iterations.beta=[0.1, 5.0]")
    assert "loss.beta (0.5) and iterations.beta ([0.1, 5.0]) are both set" in error and "set only one" in error
    assert not workdir.exists()


def test_the_paper_preset_keeps_its_schedules():
    from spin_mega.config import iteration_beta, iteration_lr, validate_run

    for preset in ("paper", REPO / "configs" / "zephyr-7b-spin.yaml"):
        cfg = load_config(preset)
        validate_run(cfg)
        assert [iteration_lr(cfg, t) for t in range(4)] == [5e-7, 5e-7, 1e-7, 1e-7]
    assert [iteration_beta(load_config("paper"), t) for t in range(4)] == [0.1, 0.1, 0.1, 5.0]


def test_the_held_out_path_has_one_key(inputs, tmp_path, capsys):
    error = _refused(capsys, "run", str(inputs["config"]), "--workdir", str(tmp_path / "w"),
                     "--set", f"eval.eval_path={inputs['heldout']}")
    assert error.endswith("config key 'eval.eval_path' was replaced by data.eval_path (the held-out data, beside data.train_path)")


# ---- 2. every input checked before anything is written ------------------------------------------------------

def _heldout_case(root: Path, case: str) -> Path:
    path = root / f"heldout_{case}.jsonl"
    if case == "not_utf8":
        path.write_bytes(b'{"prompt": "caf\xe9", "response": "ok"}\n')
    elif case == "no_response":
        path.write_text('{"prompt": "what is 1 plus 2", "answer": "3"}\n')
    elif case == "empty":
        path.write_text("")
    elif case == "blank_responses":
        path.write_text('{"prompt": "what is 1 plus 2", "response": "  "}\n')
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "data.eval_path {path} does not exist; point data.eval_path at the data file, directory or cached dataset"),
    ("not_utf8", "the held-out data (data.eval_path): {path} is not UTF-8 text: byte 0xe9 at byte offset 15 (line 1)"),
    ("no_response", "the held-out data (data.eval_path): {path} has a prompt column but no response to go with it "
                    "(its columns: answer, prompt)"),
    ("empty", "the held-out data (data.eval_path): data file {path} is empty"),
    ("blank_responses", "the held-out data (data.eval_path): {path} has no row with a usable prompt and response"),
])
def test_the_held_out_file_is_checked_before_any_stage(inputs, tmp_path, capsys, case, message):
    heldout = _heldout_case(tmp_path, case)
    workdir = tmp_path / "w"
    error = _refused(capsys, "run", str(inputs["config"]), "--workdir", str(workdir), "--set", f"data.eval_path={heldout}")
    assert message.format(path=heldout) in error
    assert not workdir.exists()


@pytest.mark.parametrize("key, message", [
    ("start_model", "start_model {path} does not exist"),
    ("data.train_path", "data.train_path {path} does not exist"),
    ("data.tokenizer", "data.tokenizer {path} is not a directory"),
])
def test_a_missing_input_path_is_refused_before_anything_is_written(inputs, tmp_path, capsys, key, message):
    missing = tmp_path / "nowhere" / key
    workdir = tmp_path / "w"
    error = _refused(capsys, "run", str(inputs["config"]), "--workdir", str(workdir), "--set", f"{key}={missing}")
    assert message.format(path=missing) in error
    # Nothing was recorded, so the corrected command is not "a run with other settings".
    assert not workdir.exists()


def test_a_start_model_that_is_no_model_is_refused(inputs, tmp_path, capsys):
    error = _refused(capsys, "run", str(inputs["config"]), "--workdir", str(tmp_path / "w"), "--set", f"start_model={tmp_path}")
    assert f"start_model {tmp_path} is neither an HF model directory" in error


def test_the_real_command_refuses_a_missing_data_path_at_once(inputs, tmp_path):
    workdir = tmp_path / "w"
    result = subprocess.run(
        [sys.executable, "-m", "spin_mega", "run", str(inputs["config"]), "--workdir", str(workdir),
         "--set", f"data.train_path={tmp_path / 'missing.jsonl'}"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"spin-mega run: error: data.train_path {tmp_path / 'missing.jsonl'} does not exist; point data.train_path at "
        "the data file, directory or cached dataset"]
    assert not workdir.exists()


# ---- 3. one process per work directory; 4. a resume keeps its settings ---------------------------------------

def test_a_second_run_in_a_working_directory_is_refused_naming_the_first(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(rundir.LOCK_TOKEN_ENV, raising=False)
    workdir = tmp_path / "w"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom spin_mega.rundir import hold_lock\n"
         "with hold_lock(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n    time.sleep(600)\n",
         str(workdir), "spin-mega run first.yaml"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        error = _refused(capsys, "run", str(inputs["config"]), "--workdir", str(workdir))
    finally:
        holder.kill()
        holder.wait()
    assert f"{workdir} is in use by `spin-mega run first.yaml` (pid {holder.pid} on " in error
    assert sorted(p.name for p in workdir.iterdir()) == [rundir.LOCK]  # no config recorded, no stage started


def test_resuming_with_another_beta_is_refused_naming_the_key(inputs, tmp_path, capsys):
    workdir = tmp_path / "w"
    recorded = config_to_dict(load_config(inputs["config"]))
    rundir.write_resolved_config(workdir / rundir.CONFIG, recorded)
    (workdir / rundir.START_HF).mkdir()  # a finished stage: the record binds
    rundir.mark_done(workdir, "export_start", 1.0)
    before = (workdir / rundir.CONFIG).read_text()
    error = _refused(capsys, "run", str(inputs["config"]), "--workdir", str(workdir),
                     "--set", "loss.beta=0.5", "--set", "optim.lr=2e-5")
    assert f"{workdir} holds results of other settings (loss.beta: 0.1 -> 0.5; optim.lr: 1.0e-05 -> 2.0e-05)" in error
    assert (workdir / rundir.CONFIG).read_text() == before
