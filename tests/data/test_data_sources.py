from __future__ import annotations

import hashlib
import json

import datasets
import pytest

from spin_mega.data import detect_schema, drop_incomplete, load_rows, prompt_hash, subsample
from spin_mega.errors import DataError

PAIRS = [
    {"prompt_id": "p0", "prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon.", "meta": {"t": 0}},
    {"prompt": "How many legs does a spider have?", "chosen": "Eight.", "rejected": "Six."},
]
ULTRACHAT = [
    {
        "prompt": "Write a short poem about the sea.",
        "prompt_id": "u0",
        "messages": [
            {"role": "user", "content": "Write a short poem about the sea."},
            {"role": "assistant", "content": "The sea is wide."},
            {"role": "user", "content": "Another one."},
            {"role": "assistant", "content": "The sea is deep."},
        ],
    },
    {
        "prompt": "Explain gradient descent.",
        "prompt_id": "u1",
        "messages": [
            {"role": "user", "content": "Explain gradient descent."},
            {"role": "assistant", "content": "Follow the negative gradient."},
        ],
    },
]


def test_pairs_jsonl_normalised(tmp_path, write_jsonl):
    rows = load_rows(write_jsonl(tmp_path / "pairs.jsonl", PAIRS))
    assert rows.column_names == ["prompt_id", "prompt", "chosen", "rejected"]
    assert rows[0] == {"prompt_id": "p0", "prompt": PAIRS[0]["prompt"], "chosen": "Paris.", "rejected": "Lyon."}
    # A missing id is the prompt's SHA-256, so the same prompt has the same id in every iteration.
    assert rows[1]["prompt_id"] == hashlib.sha256(PAIRS[1]["prompt"].encode()).hexdigest()


def test_pairs_with_opponent_logps(tmp_path, write_jsonl):
    data = [dict(r, opponent_chosen_logp=-3.5, opponent_rejected_logp=-7) for r in PAIRS]
    rows = load_rows(write_jsonl(tmp_path / "pairs.jsonl", data), "pairs")
    assert rows["opponent_chosen_logp"][:] == [-3.5, -3.5]
    assert rows["opponent_rejected_logp"][:] == [-7.0, -7.0]


def test_one_opponent_column_is_an_error(tmp_path, write_jsonl):
    data = [dict(r, opponent_chosen_logp=-3.5) for r in PAIRS]
    with pytest.raises(DataError, match="opponent_chosen_logp but not opponent_rejected_logp"):
        load_rows(write_jsonl(tmp_path / "pairs.jsonl", data))


def test_prompt_response_parquet(tmp_path):
    path = tmp_path / "sft.parquet"
    datasets.Dataset.from_list([{"prompt": "Hi there", "response": "Hello."}, {"prompt": "Bye", "response": "Bye."}]).to_parquet(str(path))
    rows = load_rows(path)
    assert rows.column_names == ["prompt_id", "prompt", "response"]
    assert rows["response"][:] == ["Hello.", "Bye."]
    assert rows[0]["prompt_id"] == prompt_hash("Hi there")


def test_json_array_file(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([{"prompt": "Hi", "response": "Hello.", "prompt_id": 7}]))
    rows = load_rows(path, "prompt_response")
    assert rows[0] == {"prompt_id": "7", "prompt": "Hi", "response": "Hello."}


def test_ultrachat_save_to_disk(tmp_path):
    path = tmp_path / "ultrachat"
    datasets.Dataset.from_list(ULTRACHAT).save_to_disk(str(path))
    before = sorted(p.name for p in path.iterdir())
    rows = load_rows(path)
    assert rows[:] == {
        "prompt_id": ["u0", "u1"],
        "prompt": ["Write a short poem about the sea.", "Explain gradient descent."],
        "response": ["The sea is wide.", "Follow the negative gradient."],
    }
    # Normalising must not drop datasets cache files into the user's data directory.
    assert sorted(p.name for p in path.iterdir()) == before


def test_ultrachat_system_turn_kept_in_prompt(tmp_path, write_jsonl):
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    rows = load_rows(write_jsonl(tmp_path / "u.jsonl", [{"messages": convo}, ULTRACHAT[1]]), "ultrachat")
    assert rows[0]["prompt"] == convo[:2]
    assert rows[0]["response"] == "Blue."
    assert rows[0]["prompt_id"] == prompt_hash(convo[:2])
    assert rows[1]["prompt"] == "Explain gradient descent."


def test_mixed_prompt_kinds_in_one_file(tmp_path, write_jsonl):
    messages = [{"role": "user", "content": "Hi"}]
    rows = load_rows(
        write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "response": "a"}, {"prompt": messages, "response": "b"}])
    )
    assert rows["prompt"][:] == ["Hi", messages]


SFT = [{"prompt_id": "s0", "prompt": "Hi there", "response": "Hello."}, {"prompt": "Bye", "response": "See you."}]
EXPECTED = {
    "pairs": {
        "prompt_id": ["p0", prompt_hash(PAIRS[1]["prompt"])],
        "prompt": [p["prompt"] for p in PAIRS],
        "chosen": ["Paris.", "Eight."],
        "rejected": ["Lyon.", "Six."],
    },
    "ultrachat": {
        "prompt_id": ["u0", "u1"],
        "prompt": ["Write a short poem about the sea.", "Explain gradient descent."],
        "response": ["The sea is wide.", "Follow the negative gradient."],
    },
    "prompt_response": {"prompt_id": ["s0", prompt_hash("Bye")], "prompt": ["Hi there", "Bye"], "response": ["Hello.", "See you."]},
}


def write_rows(tmp_path, fmt, rows):
    if fmt == "jsonl":
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path = tmp_path / "rows.json"
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        path = tmp_path / "rows.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path = tmp_path / "rows"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "save_to_disk"])
@pytest.mark.parametrize("schema, rows", [("pairs", PAIRS), ("ultrachat", ULTRACHAT), ("prompt_response", SFT)])
@pytest.mark.parametrize("requested", ["auto", "explicit"])
def test_every_format_and_schema(tmp_path, fmt, schema, rows, requested):
    # Parquet and Arrow need one type per column, so the ragged `meta` column only goes to JSON.
    rows = [{k: v for k, v in r.items() if k != "meta"} for r in rows] if fmt in ("parquet", "save_to_disk") else rows
    loaded = load_rows(write_rows(tmp_path, fmt, rows), "auto" if requested == "auto" else schema)
    assert loaded[:] == EXPECTED[schema]


@pytest.mark.parametrize(
    "columns, schema",
    [
        (["prompt", "chosen", "rejected"], "pairs"),
        (["prompt", "chosen", "rejected", "response", "messages"], "pairs"),
        (["prompt", "prompt_id", "messages"], "ultrachat"),
        (["prompt", "response"], "prompt_response"),
    ],
)
def test_detect_schema(columns, schema):
    assert detect_schema(columns) == schema


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"data file .*nope\.jsonl does not exist"):
        load_rows(tmp_path / "nope.jsonl")


def test_missing_columns_named(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hi", "answer": "Hello"}])
    with pytest.raises(DataError) as err:
        load_rows(path, "prompt_response")
    message = str(err.value)
    assert "sft.jsonl" in message and "response" in message and "prompt_response" in message


def test_undetectable_schema(tmp_path, write_jsonl):
    with pytest.raises(DataError, match="cannot tell its schema from its columns"):
        load_rows(write_jsonl(tmp_path / "x.jsonl", [{"question": "Hi", "answer": "Hello"}]))


def test_unknown_schema_name(tmp_path, write_jsonl):
    with pytest.raises(DataError, match="unknown data schema 'sharegpt'"):
        load_rows(write_jsonl(tmp_path / "x.jsonl", PAIRS), "sharegpt")


def test_invalid_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PAIRS[1]) + "\n" + '{"prompt": "Hi", "chosen": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl could not be read as JSONL: JSON parse error"):
        load_rows(path)


@pytest.mark.parametrize("name, content, message", [("empty.jsonl", "", "is empty"), ("rows.csv", "a,b\n", "unsupported file type")])
def test_unreadable_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_rows(path)


def test_dataset_dict_directory_names_its_splits(tmp_path):
    path = tmp_path / "dd"
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(PAIRS[1:])}).save_to_disk(str(path))
    with pytest.raises(DataError, match="splits train_sft"):
        load_rows(path)


def test_plain_directory(tmp_path):
    with pytest.raises(DataError, match="not one written by datasets.Dataset.save_to_disk"):
        load_rows(tmp_path)


def test_drop_incomplete(tmp_path, write_jsonl):
    data = [
        {"prompt": "a", "response": "x"},
        {"prompt": "b", "response": "  "},
        {"prompt": None, "response": "y"},
        {"prompt": [{"role": "user", "content": "c"}], "response": "z"},
    ]
    rows, dropped = drop_incomplete(load_rows(write_jsonl(tmp_path / "s.jsonl", data)))
    assert dropped == 2
    assert rows["response"][:] == ["x", "z"]


def test_subsample_deterministic_and_nested(tmp_path, write_jsonl):
    data = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(50)]
    rows = load_rows(write_jsonl(tmp_path / "s.jsonl", data))
    a = subsample(rows, 10, seed=3)["prompt"][:]
    assert a == subsample(rows, 10, seed=3)["prompt"][:]
    assert a == sorted(a, key=lambda p: int(p[1:]))
    assert set(a) <= set(subsample(rows, 20, seed=3)["prompt"][:])
    assert a != subsample(rows, 10, seed=4)["prompt"][:]
    assert len(subsample(rows, None, seed=0)) == 50
