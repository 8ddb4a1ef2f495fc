"""The demo's shipped data and its start-model builder (tokenizer, tiny Llama, SFT warm-up)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spin_mega.data.chat import render_prompt
from spin_mega.demo.build import ASSETS, encode_sft_example, load_demo_rows, sft_warmup
from spin_mega.demo.make_data import extract_answer


def test_shipped_data_is_the_scripts_output():
    proc = subprocess.run([sys.executable, "-m", "spin_mega.demo.make_data", "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_shipped_data_is_sized_for_a_fair_comparison_and_well_formed():
    assert sum(p.stat().st_size for p in ASSETS.glob("*.jsonl")) < 1_500_000
    train, validation, heldout = load_demo_rows("train"), load_demo_rows("validation"), load_demo_rows("heldout")
    # Thousands of training rows (too many to memorise), >= 500 test items (one SE <= 2.5 points).
    assert len(train) >= 5000 and len(heldout) >= 500 and len(validation) >= 200
    for row in train + validation + heldout:
        assert list(row) == ["prompt_id", "prompt", "response", "answer"]
        assert extract_answer(row["response"]) == row["answer"]
    ids = [r["prompt_id"] for r in train + validation + heldout]
    assert len(set(ids)) == len(ids)
    prompts = [{r["prompt"] for r in split} for split in (train, validation, heldout)]
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]
    for split in (train, validation, heldout):
        assert {r["prompt_id"].split("-")[1] for r in split[:12]} == {"add", "copy", "reverse"}


def test_the_evaluators_answer_extraction_agrees_with_the_data():
    from spin_mega.evaluation.heldout import extract_answer

    for row in load_demo_rows("train") + load_demo_rows("validation") + load_demo_rows("heldout"):
        assert extract_answer(row["response"]) == row["answer"]


def test_tokenizer_and_model_shape(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    assert len(tokenizer) % 64 == 0 and len(tokenizer) <= 1024
    assert tokenizer.bos_token and tokenizer.eos_token and tokenizer.pad_token
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    text = render_prompt(tokenizer, "What is 3 plus 4?")
    assert text == "<|bos|><|user|>\nWhat is 3 plus 4?\n<|assistant|>\n"
    # BOS comes from the template only, so added special tokens cannot double it.
    assert tokenizer(text)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    for row in load_demo_rows("heldout"):
        assert tokenizer.decode(tokenizer(row["response"])["input_ids"]) == row["response"]
    config = json.loads((tiny_model / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (256, 4, 2, 64)
    assert config["vocab_size"] == len(tokenizer) and config["tie_word_embeddings"] is False
    assert (tiny_model / "model.safetensors").is_file() and (tiny_model / "generation_config.json").is_file()
    generation = json.loads((tiny_model / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id


def test_sft_examples_mask_the_prompt(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    ids, labels = encode_sft_example(tokenizer, "Add 1 and 2.", "1 plus 2 is 3.")
    prompt_len = len(tokenizer(render_prompt(tokenizer, "Add 1 and 2."), add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[prompt_len:-1]) == "1 plus 2 is 3."


def test_sft_lowers_the_response_loss_and_writes_the_best_measured_weights(tiny_model, tmp_path):
    from spin_mega.demo.build import response_nll

    rows = load_demo_rows("train")[:64]
    validation = load_demo_rows("validation")[:32]
    # Patience 5 never runs out in 3 measurements: all 24 steps train, and the best measurement (step 16 with
    # these seeds) is not the last one, so writing the final weights instead of the best would be caught.
    result = sft_warmup(tiny_model, rows, steps=24, lr=3e-3, out_dir=tmp_path / "sft", batch_size=16,
                        decay="constant", validation=validation, eval_every=8, patience=5)
    losses = result["losses"]
    assert len(losses) == 24 and sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3
    assert json.loads((tmp_path / "sft" / "spin_mega_build.json").read_text())["steps"] == 24
    history = result["validation"]
    assert [h["step"] for h in history] == [8, 16, 24]
    assert history[0]["validation_nll"] > history[-1]["validation_nll"]  # it learned
    kept = min(history, key=lambda h: h["validation_nll"])
    assert result["kept_step"] == kept["step"]

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sft"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "sft"))
    examples = [encode_sft_example(tokenizer, r["prompt"], r["response"]) for r in validation]
    per_row = response_nll(model, examples, tokenizer.pad_token_id)
    assert abs(sum(per_row) / len(per_row) - kept["validation_nll"]) < 1e-4
    ids, labels = encode_sft_example(tokenizer, rows[0]["prompt"], rows[0]["response"])
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    assert float(loss) < losses[0]


def test_sft_stops_at_the_validation_plateau_and_keeps_the_best_weights(tiny_model, tmp_path):
    # lr 1e-9 moves the validation loss consistently but negligibly: the first measurement is the best; each later
    # one cuts the rate 0.3x, and after `patience` of them training stops, long before the step cap.
    rows = load_demo_rows("train")[:64]
    validation = load_demo_rows("validation")[:16]
    result = sft_warmup(tiny_model, rows, steps=200, lr=1e-9, out_dir=tmp_path / "flat", batch_size=4, warmup_ratio=0.0,
                        decay="constant", validation=validation, eval_every=2, patience=2)
    assert [h["step"] for h in result["validation"]] == [2, 4, 6]
    assert [h["improved"] for h in result["validation"]] == [True, False, False]
    assert [h["lr"] for h in result["validation"]] == pytest.approx([1e-9, 1e-9, 3e-10])
    assert len(result["losses"]) == 6 and result["kept_step"] == 2
