from __future__ import annotations

import dataclasses

import pytest
import torch

from spin_mega.config import DataConfig
from spin_mega.data import (
    TokenizeStats,
    collate_pairs,
    load_rows,
    load_tokenized_pairs,
    pad_token_id,
    pair_lengths,
    render_prompt,
    render_response,
    tokenize_pairs,
)
from spin_mega.errors import DataError

PAIRS = [
    {"prompt_id": "p0", "prompt": "What is the capital of France?", "chosen": "The capital of France is Paris.", "rejected": "Lyon."},
    {"prompt_id": "p1", "prompt": "How many legs does a spider have?", "chosen": "Eight.", "rejected": "A spider has six legs, I think."},
    {
        "prompt_id": "p2",
        "prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Explain gradient descent."}],
        "chosen": "Step against the gradient.",
        "rejected": "It is a sea.",
    },
]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture()
def pairs_path(tmp_path, write_jsonl):
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)


def test_ids_are_the_separately_tokenized_prompt_and_responses(pairs_path, tiny_tokenizer):
    tok = tiny_tokenizer
    data, stats = load_tokenized_pairs(pairs_path, tok, DataConfig())
    assert stats == TokenizeStats(rows_in=3, rows_kept=3)
    for row, pair in zip(data, PAIRS):
        assert row["prompt_id"] == pair["prompt_id"]
        assert row["prompt_ids"] == ids(tok, render_prompt(tok, pair["prompt"]))
        assert row["chosen_ids"] == ids(tok, render_response(tok, pair["chosen"]))
        assert row["rejected_ids"] == ids(tok, render_response(tok, pair["rejected"]))
        sequence = row["prompt_ids"] + row["chosen_ids"]
        # BOS comes from the template only, once; the response ends in EOS so the model learns to stop.
        assert sequence.count(tok.bos_token_id) == 1 and sequence[0] == tok.bos_token_id
        assert row["chosen_ids"][-1] == tok.eos_token_id
        assert row["pair_length"] == len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
    assert pair_lengths(data).tolist() == data["pair_length"][:]


def test_collated_batch_from_tokenized_pairs(pairs_path, tiny_tokenizer):
    tok = tiny_tokenizer
    data, _ = load_tokenized_pairs(pairs_path, tok, DataConfig())
    examples = [data[i] for i in range(len(data))]
    batch = collate_pairs(examples, pad_token_id(tok))
    b = len(examples)
    n_rows, t = batch["input_ids"].shape
    assert n_rows == 2 * b and t % 8 == 0
    for row in range(2 * b):
        ex = examples[row % b]
        response = ex["chosen_ids"] if row < b else ex["rejected_ids"]
        p, n = len(ex["prompt_ids"]), len(ex["prompt_ids"]) + len(response)
        # The sequence is exactly the rendered prompt's tokens followed by the response's.
        assert batch["input_ids"][row, :n].tolist() == ex["prompt_ids"] + response
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        labels = batch["labels"][row]
        assert (labels[: p - 1] == -100).all() and (labels[n - 1 :] == -100).all()
        assert labels[p - 1 : n - 1].tolist() == batch["input_ids"][row, p:n].tolist() == response
        assert batch["num_response_tokens"][row] == len(response) == int((labels != -100).sum())
    assert torch.equal(batch["position_ids"][1], torch.arange(t))
    columns = data[list(range(len(data)))]
    assert all(torch.equal(v, collate_pairs(columns, pad_token_id(tok))[k]) for k, v in batch.items())


def test_bad_rows_are_counted_not_fatal(tmp_path, write_jsonl, tiny_tokenizer):
    good = PAIRS[0]
    data = [
        good,
        {"prompt": "Hi", "chosen": 5, "rejected": "x"},
        {"prompt": "Hi", "chosen": "x"},
        {"prompt": None, "chosen": "x", "rejected": "y"},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "chosen": "x", "rejected": "y"},
        {"prompt": "Hi", "chosen": "", "rejected": "y"},
        {"prompt": "Hi", "chosen": "x", "rejected": " \n "},
    ]
    rows = load_rows(write_jsonl(tmp_path / "bad.jsonl", data))
    out, stats = tokenize_pairs(rows, tiny_tokenizer, DataConfig())
    assert stats == TokenizeStats(rows_in=7, rows_kept=1, malformed=4, empty_response=2)
    assert out["prompt_id"][:] == ["p0"]


def test_bad_opponent_logps_are_malformed(tmp_path, write_jsonl, tiny_tokenizer):
    data = [
        dict(PAIRS[0], opponent_chosen_logp=-12.5, opponent_rejected_logp=-20.0),
        dict(PAIRS[1], opponent_chosen_logp=None, opponent_rejected_logp=-3.0),
        dict(PAIRS[2], opponent_chosen_logp=0.5, opponent_rejected_logp=-3.0),
    ]
    out, stats = tokenize_pairs(load_rows(write_jsonl(tmp_path / "l.jsonl", data)), tiny_tokenizer, DataConfig())
    assert (stats.rows_kept, stats.malformed) == (1, 2)
    batch = collate_pairs([out[0]], pad_token_id(tiny_tokenizer))
    assert batch["opponent_logps"].dtype == torch.float32
    assert batch["opponent_logps"].tolist() == [-12.5, -20.0]


def long_prompt_rows(tmp_path, write_jsonl):
    long_prompt = "The capital of France is Paris. " * 20
    data = [PAIRS[0], {"prompt_id": "long", "prompt": long_prompt, "chosen": "Yes.", "rejected": "No."}]
    return load_rows(write_jsonl(tmp_path / "long.jsonl", data)), long_prompt


def test_long_prompt_dropped(tmp_path, write_jsonl, tiny_tokenizer):
    rows, _ = long_prompt_rows(tmp_path, write_jsonl)
    cfg = DataConfig(max_prompt_length=32, max_length=64, prompt_truncation="drop")
    out, stats = tokenize_pairs(rows, tiny_tokenizer, cfg)
    assert stats == TokenizeStats(rows_in=2, rows_kept=1, prompt_too_long_dropped=1)
    assert out["prompt_id"][:] == ["p0"]


def test_long_prompt_keeps_its_end(tmp_path, write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    rows, long_prompt = long_prompt_rows(tmp_path, write_jsonl)
    cfg = DataConfig(max_prompt_length=32, max_length=64, prompt_truncation="keep_end")
    out, stats = tokenize_pairs(rows, tok, cfg)
    assert stats == TokenizeStats(rows_in=2, rows_kept=2, prompt_truncated=1)
    full = ids(tok, render_prompt(tok, long_prompt))
    assert len(full) > 32
    # The end holds the assistant header the response must follow, so that is the part to keep.
    assert out[1]["prompt_ids"] == full[-32:]


def test_long_responses_cut_to_max_length(tmp_path, write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    data = [{"prompt": "Hi", "chosen": "The sea is wide and deep and blue. " * 10, "rejected": "Blue."}]
    cfg = DataConfig(max_prompt_length=16, max_length=40)
    out, stats = tokenize_pairs(load_rows(write_jsonl(tmp_path / "r.jsonl", data)), tok, cfg)
    assert stats == TokenizeStats(rows_in=1, rows_kept=1, response_truncated=1)
    row = out[0]
    assert len(row["prompt_ids"]) + len(row["chosen_ids"]) == 40
    assert row["chosen_ids"] == ids(tok, render_response(tok, data[0]["chosen"]))[: 40 - len(row["prompt_ids"])]
    assert row["rejected_ids"] == ids(tok, render_response(tok, "Blue."))


def test_nothing_left_is_an_error(tmp_path, write_jsonl, tiny_tokenizer):
    rows = load_rows(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Hi", "chosen": " ", "rejected": "x"}]))
    with pytest.raises(DataError, match="no usable pairs in e.jsonl: of 1 rows, 0 are malformed, 1 have an empty"):
        tokenize_pairs(rows, tiny_tokenizer, DataConfig(), source="e.jsonl")


def test_tokenizer_without_chat_template(pairs_path, tokenizer_without_template):
    with pytest.raises(DataError, match="has no chat template"):
        load_tokenized_pairs(pairs_path, tokenizer_without_template, DataConfig())


def test_sft_rows_are_not_pairs(tmp_path, write_jsonl, tiny_tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hi", "response": "Hello."}])
    with pytest.raises(DataError, match="holds SFT rows, not SPIN pairs"):
        load_tokenized_pairs(path, tiny_tokenizer, DataConfig())


def test_tokenization_is_deterministic_and_honours_max_samples(tmp_path, write_jsonl, tiny_tokenizer):
    data = [{"prompt": f"Question {i}?", "chosen": "Yes. " * (i % 7 + 1), "rejected": "No."} for i in range(40)]
    path = write_jsonl(tmp_path / "many.jsonl", data)
    cfg = dataclasses.replace(DataConfig(), max_samples=12, shuffle_seed=5)
    a, stats = load_tokenized_pairs(path, tiny_tokenizer, cfg)
    b, _ = load_tokenized_pairs(path, tiny_tokenizer, cfg)
    assert stats.rows_in == 12 and len(a) == 12
    assert a[:] == b[:]
