"""Training health end to end on CPU (real megatron-core over gloo): a non-finite loss stops the run before
the update with exit 3 and one sentence, the kept checkpoints stay as they were and still resume, a re-run is
refused; a collapse at a high learning rate is warned about once and recorded (or stops the run)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spin_mega.errors import TrainingUnhealthy
from spin_mega.rundir import UNHEALTHY_MARKER
from spin_mega.training.health import finite_json_line
from tests.support import free_port, read_metrics, spin_mega

EXIT_UNHEALTHY = TrainingUnhealthy.exit_code


def _strict_rows(workdir: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: NaN or Infinity anywhere fails."""

    def refuse(constant):
        raise AssertionError(f"metrics.jsonl holds {constant}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("spin-mega train: error:")]


def _checkpoint_files(workdir: Path) -> dict[str, bytes]:
    root = workdir / "checkpoints"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _train(tiny_run, workdir: Path, *extra: str, max_steps: int, nproc: int = 1):
    return spin_mega(
        "train", str(tiny_run["config"]), "--workdir", str(workdir), "--max-steps", str(max_steps), *extra, nproc=nproc
    )


def _run_killing_on_timeout(cmd: list[str], timeout: int) -> tuple[int, str]:
    """Runs cmd in its own session; ranks that part ways hang in a collective, so on timeout the whole
    group is killed (subprocess.run would kill only torchrun and leave its workers behind)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the ranks did not stop together within {timeout} s")
    return proc.returncode, stderr


def _poison_opponent_chosen(workdir: Path) -> str:
    """Makes every precomputed opponent log-prob of a human response +inf: the policy's reward is then -inf
    and the loss inf, while its gradient (-sigmoid(-inf) = -1 per pair) stays finite, so only a loss check
    catches it. Returns the good table."""
    path = workdir / "opponent_logps.json"
    good = path.read_text()
    table = json.loads(good)
    table["chosen"] = [math.inf] * len(table["chosen"])
    path.write_text(json.dumps(table))
    return good


def test_metrics_line_is_json_with_nulls_and_a_flag():
    line = finite_json_line({"step": 3, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3, "collapse": False})
    row = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} written"))
    assert row == {"step": 3, "loss": None, "grad_norm": None, "lr": 1e-3, "collapse": False, "non_finite": ["loss", "grad_norm"]}
    assert "non_finite" not in json.loads(finite_json_line({"step": 1, "loss": 0.69}))


def test_non_finite_loss_stops_before_the_update_and_keeps_the_checkpoints(tiny_run, tmp_path):
    work = tmp_path / "w"
    # The resumed run (5 steps) follows its own learning-rate schedule, under which the tiny model's human
    # responses fall ~1.1 nats per token by step 5: a bound above that keeps this test about the non-finite stop.
    settings = ("--set", "train.save_interval=1", "--set", "train.collapse_bound=5")
    # Three healthy steps, a checkpoint after each (two are kept).
    first = _train(tiny_run, work, *settings, max_steps=3)
    assert first.returncode == 0, first.stderr[-3000:]
    healthy = _strict_rows(work)
    assert [r["collapse"] for r in healthy] == [False] * 3
    # policy = opponent at step 1: 0, to the rounding of the packed step against the padded opponent pass.
    assert healthy[0]["logp_chosen_per_token_change"] == pytest.approx(0.0, abs=1e-6)
    kept = _checkpoint_files(work)
    assert (work / "checkpoints" / "latest").read_text().strip() == "step_000003"
    (work / "train_summary.json").unlink()

    # Step 4 meets an infinite loss: the run stops before applying it.
    good_table = _poison_opponent_chosen(work)
    stopped = _train(tiny_run, work, *settings, max_steps=6)
    assert stopped.returncode == EXIT_UNHEALTHY, stopped.stderr[-3000:]
    (error,) = _error_lines(stopped.stderr)
    assert "training stopped before the update of step 4: the loss and the log-probs are not finite" in error
    assert "step_000003" in error and "optim.lr" in error
    # Nothing was saved from the failed state: the same files, byte for byte, and `latest` unchanged.
    assert _checkpoint_files(work) == kept
    assert not (work / "train_summary.json").exists()
    rows = _strict_rows(work)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    last = rows[-1]
    assert last["loss"] is None and "loss" in last["non_finite"] and last["update_applied"] is False
    # The gradient was finite: the loss check alone stopped the update.
    assert isinstance(last["grad_norm"], float) and math.isfinite(last["grad_norm"])
    assert json.loads((work / UNHEALTHY_MARKER).read_text())["step"] == 4

    # The same command again is refused instead of resuming into the same failure.
    again = _train(tiny_run, work, *settings, max_steps=6)
    assert again.returncode == EXIT_UNHEALTHY
    (error,) = _error_lines(again.stderr)
    assert "an earlier run" in error and "step 4" in error and UNHEALTHY_MARKER in error
    assert _checkpoint_files(work) == kept

    # With the cause fixed and the record removed, the kept checkpoint loads and training resumes from it.
    (work / "opponent_logps.json").write_text(good_table)
    (work / UNHEALTHY_MARKER).unlink()
    resumed = _train(tiny_run, work, *settings, max_steps=5)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "step_000003" in resumed.stderr
    rows = read_metrics(work)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in rows) and "non_finite" not in rows[3]
    assert json.loads((work / "train_summary.json").read_text())["health"]["status"] == "healthy"


def test_finite_loss_with_a_non_finite_gradient_norm_stops_the_run(tiny_run, tmp_path):
    """Step 2's loss is finite but one gradient element is inf (written into the optimizer's main gradient
    after step 2's gradients are prepared): the norm check alone must stop the run before the update."""
    work = tmp_path / "grad"
    returncode, stderr = _run_killing_on_timeout(
        [sys.executable, str(Path(__file__).with_name("inf_grad_launcher.py")), "2", "train", str(tiny_run["config"]),
         "--workdir", str(work), "--max-steps", "4", "--set", "train.save_interval=1"],
        timeout=300,
    )
    assert returncode == EXIT_UNHEALTHY, stderr[-3000:]
    (error,) = _error_lines(stderr)
    assert "training stopped before the update of step 2: the gradient norm is not finite" in error and "step_000001" in error
    rows = _strict_rows(work)
    assert [r["step"] for r in rows] == [1, 2]
    last = rows[-1]
    assert isinstance(last["loss"], float) and math.isfinite(last["loss"]) and last["non_finite"] == ["grad_norm"]
    assert last["grad_norm"] is None and last["update_applied"] is False
    assert (work / "checkpoints" / "latest").read_text().strip() == "step_000001"
    assert json.loads((work / UNHEALTHY_MARKER).read_text())["cause"] == "the gradient norm is not finite (NaN or inf)"


@pytest.mark.slow
def test_pipeline_stages_agree_on_a_loss_only_the_last_stage_sees(tiny_run, tmp_path):
    # The first stage's gradients stay finite; without the agreement it would apply its update while the last
    # stage stops, and the two ranks would part ways.
    work = tmp_path / "pp"
    work.mkdir()
    pairs = [json.loads(line) for line in Path(tiny_run["pairs"]).read_text().splitlines()]
    table = {"chosen": [math.inf] * len(pairs), "rejected": [-50.0] * len(pairs), "prompt_id": [p["prompt_id"] for p in pairs]}
    (work / "opponent_logps.json").write_text(json.dumps(table))
    returncode, stderr = _run_killing_on_timeout(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}", "-m", "spin_mega",
         "train", str(tiny_run["config"]), "--workdir", str(work), "--max-steps", "2", "--pp", "2"],
        timeout=300,
    )
    assert returncode != 0
    assert len(_error_lines(stderr)) == 1  # one rank speaks
    record = json.loads((work / UNHEALTHY_MARKER).read_text())
    assert record["step"] == 1 and "the loss" in record["cause"]
    assert not (work / "checkpoints").exists()


def test_collapse_at_a_high_learning_rate_is_warned_once_and_recorded(tiny_run, tmp_path):
    work = tmp_path / "hot"
    # lr 1e-2 with RMSProp (steps of ~10 lr at first): the human responses' log-probs fall by nats per token.
    result = _train(tiny_run, work, "--set", "optim.lr=1e-2", max_steps=5)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("warning: collapse at step") == 1
    rows = _strict_rows(work)
    flagged = [r["step"] for r in rows if r["collapse"]]
    assert flagged and flagged[0] > 1
    first = rows[flagged[0] - 1]
    assert first["logp_chosen_per_token_change"] < -1.0
    # The flag is the bound applied to the logged change, and the change matches the logged rewards.
    for r in rows:
        assert r["collapse"] == (r["logp_chosen_per_token_change"] < -1.0)
        beta = 0.1
        assert r["logp_chosen_per_token_change"] == pytest.approx(r["reward_chosen"] / (beta * r["chosen_tokens"]), rel=1e-6, abs=1e-9)
    health = json.loads((work / "train_summary.json").read_text())["health"]
    assert health["status"] == "collapsed" and health["collapse"]["step"] == flagged[0]
    assert health["collapse_bound"] == 1.0

    # train.on_collapse=stop turns the same event into a stop before that step's update.
    stop_work = tmp_path / "hot_stop"
    stopped = _train(tiny_run, stop_work, "--set", "optim.lr=1e-2", "--set", "train.on_collapse=stop", max_steps=5)
    assert stopped.returncode == EXIT_UNHEALTHY, stopped.stderr[-3000:]
    (error,) = _error_lines(stopped.stderr)
    assert f"before the update of step {flagged[0]}" in error and "train.collapse_bound" in error
    assert [r["step"] for r in _strict_rows(stop_work)] == list(range(1, flagged[0] + 1))
    assert not (stop_work / "checkpoints").exists()


def test_first_step_check_tolerance_follows_the_log_prob_sums():
    """The allowed deviation is rtol x beta x the pairs' log-prob sums (times the loss's slope near zero
    rewards for the loss): a loss or reward within it passes, beyond it the check names the loss, its closed
    form and the mean |reward|."""
    from spin_mega.config import LossConfig
    from spin_mega.training.first_step import RTOL, FirstStepCheck

    check = FirstStepCheck(LossConfig(beta=0.1), rtol=RTOL["fp32"])
    logp_abs = 200.0  # |log p(chosen)| + |log p(rejected)|: tolerance 1e-4 x 0.1 x 200 = 2e-3
    assert check.problem(math.log(2.0), 0.0, logp_abs) is None
    assert check.problem(math.log(2.0) + 1.5e-3, 1.5e-3, logp_abs) is None
    off_loss = check.problem(math.log(2.0) + 5e-3, 1e-3, logp_abs)
    assert off_loss and "0.698147" in off_loss and "0.693147" in off_loss
    assert check.problem(math.log(2.0), 3e-3, logp_abs)  # a reward off while the loss is not (errors that cancel)
    # bf16: 2e-2 of the sums, 0.4 here, lets rounding through but not a leak of whole nats per token.
    loose = FirstStepCheck(LossConfig(beta=0.1, loss_type="hinge"), rtol=RTOL["bf16"])
    assert loose.problem(1.0 + 0.05, 0.05, logp_abs) is None
    assert "hinge loss" in loose.problem(1.0 + 0.05, 5.0, logp_abs)
    # ipo with the SFT term: the closed form 1 / (4 beta^2) plus the weight times the policy's own NLL.
    ipo = FirstStepCheck(LossConfig(beta=0.5, loss_type="ipo", sft_weight=2.0), rtol=RTOL["fp32"])
    assert ipo.problem(1.0 + 2.0 * 3.0, 0.0, logp_abs, sft_nll=3.0) is None
    assert ipo.problem(1.0, 0.0, logp_abs, sft_nll=3.0)


def test_first_step_off_the_closed_form_stops_the_run(tiny_run, tmp_path):
    """An opponent table that is not the start model's (here: wrong by tens of nats): the first step's loss is
    off ln 2, and the run stops before the update with one sentence naming the loss, its closed form and what
    to try, keeps no checkpoint and records the stop."""
    work = tmp_path / "w"
    work.mkdir()
    pairs = [json.loads(line) for line in Path(tiny_run["pairs"]).read_text().splitlines()]
    table = {"chosen": [-50.0] * len(pairs), "rejected": [-60.0] * len(pairs), "prompt_id": [p["prompt_id"] for p in pairs]}
    (work / "opponent_logps.json").write_text(json.dumps(table))
    stopped = _train(tiny_run, work, max_steps=2)
    assert stopped.returncode == EXIT_UNHEALTHY, stopped.stderr[-3000:]
    (error,) = _error_lines(stopped.stderr)
    assert "training stopped before the update of step 1: the first step's loss is" in error
    assert "the logistic loss of a policy equal to its opponent is 0.693147" in error
    assert "data.packing=false" in error and "optim.lr" not in error
    assert not (work / "checkpoints").exists()
    assert [r["update_applied"] for r in _strict_rows(work)] == [False]
