"""Tests that catch a backwards or disconnected trainer, judged by code that is not the trainer's.

A few full-batch `spin-mega train` steps on fixed pairs, the start and the trained checkpoints exported
with `spin-mega convert mcore-to-hf`, then scored with transformers' AutoModelForCausalLM and a
tokenization written here (the tokenizer's own chat template, text + EOS responses):
- the human (chosen) responses gain log-prob relative to the rejected ones;
- the trainer's step-0 opponent log-prob sums equal transformers' sums for the start model (fp32, 1e-5);
- the hinge loss runs inside the trainer: its first loss is exactly max(0, 1 - 0) = 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.support import read_metrics, spin_mega, write_pairs

pytestmark = pytest.mark.slow  # two training runs and two exports (about a minute on an idle 2-core machine)

NUM_PAIRS = 16


def _export(mcore: Path, out: Path) -> Path:
    result = spin_mega("convert", "mcore-to-hf", "--mcore", str(mcore), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _config(tiny_run, root: Path, **loss) -> Path:
    config = yaml.safe_load(Path(tiny_run["config"]).read_text())
    config["data"]["train_path"] = str(write_pairs(root / "pairs.jsonl", NUM_PAIRS, seed=3))
    # Full batch: every step sees all 16 pairs, so the steps are the gradient of the whole objective.
    config["train"].update(micro_batch_size=4, global_batch_size=NUM_PAIRS, epochs=10)
    config["optim"].update(lr=1e-3, warmup_ratio=0.0, decay="constant")
    config["loss"].update(loss)
    path = root / "direction.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("direction")
    config = _config(tiny_run, root)
    workdir = root / "train"
    result = spin_mega("train", str(config), "--workdir", str(workdir), "--max-steps", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    latest = (workdir / "checkpoints" / "latest").read_text().strip()
    return {
        "pairs": [json.loads(l) for l in (root / "pairs.jsonl").read_text().splitlines()],
        "workdir": workdir,
        "theta0": _export(Path(tiny_run["start"]), root / "hf0"),
        "theta1": _export(workdir / "checkpoints" / latest, root / "hf1"),
    }


def _score(model_dir: Path, pairs: list[dict]) -> tuple[list[float], list[float]]:
    """Summed response log-probs of chosen and rejected, float32, one sequence at a time (no padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    def logp(prompt: str, response: str) -> float:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        p = tok(text, add_special_tokens=False)["input_ids"]
        r = tok(response + tok.eos_token, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + r])).logits[0].float()
        logps = torch.log_softmax(logits, dim=-1)
        return sum(logps[len(p) - 1 + i, t].item() for i, t in enumerate(r))

    return [logp(x["prompt"], x["chosen"]) for x in pairs], [logp(x["prompt"], x["rejected"]) for x in pairs]


def test_human_responses_gain_log_prob_over_rejected_ones(trained):
    summary = json.loads((trained["workdir"] / "train_summary.json").read_text())
    assert summary["data"]["rows_kept"] == NUM_PAIRS and summary["data"]["response_truncated"] == 0
    c0, r0 = _score(trained["theta0"], trained["pairs"])
    c1, r1 = _score(trained["theta1"], trained["pairs"])
    gains = [(a1 - b1) - (a0 - b0) for a0, b0, a1, b1 in zip(c0, r0, c1, r1)]
    # Four full-batch steps on these very pairs: the margin log p(y|x) - log p(y'|x) grows for nearly all
    # of them under the exported model; a trainer that swapped chosen and rejected shrinks them instead.
    assert sum(gains) / len(gains) > 1.0, gains
    assert sum(g > 0 for g in gains) >= 0.8 * len(gains), gains


def test_opponent_logps_equal_an_independent_transformers_scoring(trained):
    table = json.loads((trained["workdir"] / "opponent_logps.json").read_text())
    by_id = {pid: (c, r) for pid, c, r in zip(table["prompt_id"], table["chosen"], table["rejected"])}
    chosen, rejected = _score(trained["theta0"], trained["pairs"])
    assert len(by_id) == NUM_PAIRS
    for pair, c, r in zip(trained["pairs"], chosen, rejected):
        mine_c, mine_r = by_id[pair["prompt_id"]]
        assert mine_c == pytest.approx(c, rel=1e-5) and mine_r == pytest.approx(r, rel=1e-5), pair["prompt_id"]
        assert c < 0 and r < 0


def test_hinge_loss_inside_the_trainer(tiny_run, tmp_path):
    config = _config(tiny_run, tmp_path, loss_type="hinge")
    result = spin_mega("train", str(config), "--workdir", str(tmp_path / "w"), "--max-steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(tmp_path / "w")
    # At theta = theta_t every margin is 0, and the hinge max(0, 1 - 0) is exactly 1 (logistic gives ln 2).
    assert metrics[0]["loss"] == pytest.approx(1.0, abs=1e-6)
    # One full-batch step along the hinge's gradient lowers it on the same pairs.
    assert metrics[1]["loss"] < 1.0 - 1e-4
