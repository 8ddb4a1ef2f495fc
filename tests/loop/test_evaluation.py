"""Held-out evaluation against independent float64 computations on a tiny HF model."""

from __future__ import annotations

import pytest
import torch

from spin_mega.config import EvalConfig
from spin_mega.data import render_prompt, render_response
from spin_mega.evaluation import evaluate, extract_answer, response_logprobs


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
