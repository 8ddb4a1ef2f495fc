"""The lm-evaluation-harness hook, really run: a tiny model on small local multiple-choice tasks, with
per-task few-shot counts, batched, offline, and without a held-out file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from spin_mega.config import EvalConfig
from spin_mega.errors import SpinMegaError
from spin_mega.evaluation.heldout import evaluate
from spin_mega.evaluation.leaderboard import OPEN_LLM_LEADERBOARD_V1, parse_tasks, task_manager

pytestmark = pytest.mark.slow  # indexing the harness's task files takes tens of seconds

QUESTIONS = [
    ("What is 2 plus 3?", ["5", "7", "9"], 0),
    ("Repeat after me: frog", ["frog", "sand", "iron"], 0),
    ("What is 4 plus 4?", ["6", "8"], 1),
    ("Say these words backwards: iron pen", ["pen iron", "iron pen"], 0),
    ("What is 1 plus 1?", ["3", "2", "4"], 1),
    ("Repeat after me: sand", ["frog", "sand"], 1),
]
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}
    test: {data}
output_type: multiple_choice
training_split: train
test_split: test
fewshot_split: train
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from spin_mega.demo.build import build_tiny_model, build_tokenizer

    root = tmp_path_factory.mktemp("leaderboard")
    model = build_tiny_model(root / "model", build_tokenizer(root / "tok"), seed=5)
    data = root / "tiny_qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in QUESTIONS))
    tasks = root / "tasks"
    tasks.mkdir()
    for name in ("tiny_qa_zero", "tiny_qa_fewshot"):
        (tasks / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data))
    return {"model": model, "tasks": tasks}


def _independent_zero_shot_accuracy(model_dir) -> float:
    """Accuracy as the harness defines it for multiple choice (the choice whose continuation " choice"
    has the highest summed log-prob after the question), computed with transformers directly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    hits = 0
    for question, choices, answer in QUESTIONS:
        context = f"Question: {question}\nAnswer:"
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in choices:
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            with torch.no_grad():
                logps = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0], dim=-1)
            scores.append(sum(logps[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        hits += max(range(len(choices)), key=scores.__getitem__) == answer
    return hits / len(QUESTIONS)


def test_harness_runs_each_task_with_its_shots_without_heldout_data(setup):
    cfg = EvalConfig(lm_eval_tasks=["tiny_qa_zero:0", "tiny_qa_fewshot:2"], lm_eval_include_path=str(setup["tasks"]),
                     lm_eval_batch_size=4)
    result = evaluate(setup["model"], [], cfg)
    assert result["num_samples"] == 0 and "heldout_logp_per_token" not in result
    zero, few = result["lm_eval"]["tiny_qa_zero"], result["lm_eval"]["tiny_qa_fewshot"]
    assert zero["num_fewshot"] == 0 and few["num_fewshot"] == 2
    assert zero["acc,none"] == pytest.approx(_independent_zero_shot_accuracy(setup["model"]), abs=1e-9)
    assert 0.0 <= few["acc,none"] <= 1.0 and math.isfinite(few["acc_stderr,none"])


def test_leaderboard_v1_preset_names_installed_tasks_with_their_shots(setup):
    expected = {"arc_challenge": 25, "hellaswag": 10, "truthfulqa_mc2": 0, "mmlu": 5, "winogrande": 5, "gsm8k": 5}
    assert dict(parse_tasks(["open_llm_leaderboard_v1"])) == expected == dict(OPEN_LLM_LEADERBOARD_V1)
    # The index the hook itself uses (built-in tasks plus the local ones), shared with the other tests.
    known = set(task_manager(str(setup["tasks"])).all_tasks)
    assert set(expected) <= known


def test_unknown_task_and_bad_entry_are_one_sentence(setup):
    with pytest.raises(SpinMegaError, match="has no task no_such_task"):
        evaluate(setup["model"], [], EvalConfig(lm_eval_tasks=["no_such_task:5"], lm_eval_include_path=str(setup["tasks"])))
    with pytest.raises(SpinMegaError, match="is not TASK or TASK:SHOTS"):
        parse_tasks(["arc_challenge:many"])
