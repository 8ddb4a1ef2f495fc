"""Held-out evaluation against independent float64 computations on a tiny HF model."""

from __future__ import annotations

import pytest
import torch

from spin_mega.config import EvalConfig
from spin_mega.data import render_prompt, render_response
from spin_mega.evaluation.heldout import evaluate, extract_answer, response_logprobs


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from spin_mega.demo.build import build_tiny_model, build_tokenizer

    root = tmp_path_factory.mktemp("eval")
    return build_tiny_model(root / "model", build_tokenizer(root / "tok"), seed=5)


def test_response_logprobs_match_unbatched_float64(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    rows = [("What is 2 plus 3?", "2 plus 3 is 5."), ("Say these words backwards: iron pen", "Backwards: pen iron."), ("Repeat after me: frog", "You said: frog.")]
    batched = response_logprobs(model, tok, rows, batch_size=2)  # padding inside a batch
    model64 = model.double()
    for (prompt, response), (total, count) in zip(rows, batched):
        p = tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
        r = tok(render_response(tok, response), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model64(input_ids=torch.tensor([p + r])).logits[0]
        logps = torch.log_softmax(logits, dim=-1)
        expected = sum(logps[len(p) - 1 + i, tok_id].item() for i, tok_id in enumerate(r))
        assert count == len(r)
        assert total == pytest.approx(expected, abs=1e-4)  # float32 forward vs float64


def test_evaluate_reports_every_metric(tiny_model):
    heldout = [{"prompt": "What is 2 plus 3?", "response": "2 plus 3 is 5.", "answer": "5"},
               {"prompt": "Repeat after me: frog", "response": "You said: frog.", "answer": "frog"}]
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": "no idea"} for r in heldout]
    pairs.append({"prompt": "x", "chosen": "same", "rejected": "same"})  # identical: carries no signal
    result = evaluate(tiny_model, heldout, EvalConfig(max_samples=8, max_new_tokens=8), opponent_dir=tiny_model, heldout_pairs=pairs)
    assert result["num_samples"] == 2
    assert result["heldout_logp_per_token"] < 0
    # The model against itself: every reward is exactly 0, and a tie is not a win.
    assert result["heldout_reward_accuracy"] == 0.0
    assert 0.0 <= result["exact_match"] <= 1.0 and len(result["examples"]) == 2


@pytest.mark.parametrize(
    "response, answer",
    [("2 plus 3 is 5.", "5"), ("Backwards: pen iron.", "pen iron"), ("You said: frog sand.", "frog sand"), ("no answer", "no answer")],
)
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


def test_evaluation_stage_process_reports_what_evaluate_reports(tiny_model, tmp_path):
    """The loop's evaluation stage (`python -m spin_mega.evaluation`, a process of its own so that the
    model's memory leaves with it) passes the config's eval section, the opponent and the pairs through."""
    import json
    import subprocess
    import sys

    import yaml

    from tests.support import REPO

    heldout = [{"prompt": "What is 2 plus 3?", "response": "2 plus 3 is 5.", "answer": "5"},
               {"prompt": "Repeat after me: frog", "response": "You said: frog.", "answer": "frog"}]
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": "no idea"} for r in heldout]
    config = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    config["eval"].update(max_samples=8, max_new_tokens=6)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    for name, rows in (("heldout.jsonl", heldout), ("pairs.jsonl", pairs)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, "-m", "spin_mega.evaluation", "--config", str(tmp_path / "c.yaml"), "--model", str(tiny_model),
         "--heldout", str(tmp_path / "heldout.jsonl"), "--out", str(out), "--opponent", str(tiny_model),
         "--pairs", str(tmp_path / "pairs.jsonl")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = evaluate(tiny_model, heldout, EvalConfig(max_samples=8, max_new_tokens=6), opponent_dir=tiny_model,
                        heldout_pairs=pairs)
    assert json.loads(out.read_text()) == json.loads(json.dumps(expected))
    missing = subprocess.run([sys.executable, "-m", "spin_mega.evaluation", "--config", str(tmp_path / "c.yaml"), "--model",
                              str(tmp_path), "--heldout", str(tmp_path / "heldout.jsonl"), "--out", str(tmp_path / "x.json")],
                             capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("spin-mega evaluate: error: cannot evaluate")
