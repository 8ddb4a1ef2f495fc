"""The data SPIN users have, read as published: UCLA-AGI/SPIN_iter* (`real`, `generated`) and
HuggingFaceH4/ultrachat_200k (`prompt`, `prompt_id`, `messages`, parquet shards per split), from a file,
a folder of shards, or a dataset name resolved offline through a real `datasets` cache entry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spin_mega.data import load_rows
from spin_mega.errors import DataError
from tests.support import spin_mega


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


SPIN_ROWS = [
    {"real": [turn("user", "Name a colour."), turn("assistant", "Blue.")],
     "generated": [turn("user", "Name a colour."), turn("assistant", "Colour is a word.")]},
    {"real": [turn("user", "How many legs has a spider?"), turn("assistant", "Eight.")],
     "generated": [turn("user", "How many legs has a spider?"), turn("assistant", "Six.")]},
]


def ultrachat_row(i: int, turns: int = 1) -> dict:
    messages = []
    for k in range(turns):
        messages += [turn("user", f"question {i}.{k}"), turn("assistant", f"answer {i}.{k}")]
    return {"prompt": f"question {i}.0", "prompt_id": f"id{i}", "messages": messages}


def write_shards(folder: Path, split: str, rows: list[dict], shards: int = 1) -> None:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        part = rows[s::shards]
        table = pa.Table.from_pylist(part) if part else pa.table({"prompt": pa.array([], pa.string())})
        pq.write_table(table, folder / "data" / f"{split}-{s:05d}-of-{shards:05d}.parquet")


def cache_dataset(name: str, splits: dict[str, list[dict]], tmp: Path) -> None:
    """Puts `splits` into the datasets cache where `datasets.load_dataset(name)` leaves a Hub dataset:
    prepared by datasets' own parquet builder, under NAMESPACE___name/default/0.0.0/HASH."""
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.parquet.parquet import Parquet

    namespace, repo = name.split("/")
    source = tmp / "hub_files"
    files = {}
    for split, rows in splits.items():
        write_shards(source, split, rows)
        files[split] = [str(source / "data" / f"{split}-00000-of-00001.parquet")]
    snake = camelcase_to_snakecase(repo)
    builder = Parquet(cache_dir=str(tmp / "build"), dataset_name=snake, data_files=files, hash="0123abcd")
    builder.download_and_prepare()
    target = Path(datasets.config.HF_DATASETS_CACHE) / f"{namespace}___{snake}" / "default" / "0.0.0" / "0123abcd"
    shutil.copytree(builder.cache_dir, target)


def test_spin_iter_rows_become_pairs_from_a_file(tmp_path):
    path = tmp_path / "spin.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SPIN_ROWS))
    rows = load_rows(path)
    assert rows.column_names == ["prompt_id", "prompt", "chosen", "rejected"]
    assert rows["prompt"][:] == ["Name a colour.", "How many legs has a spider?"]
    assert rows["chosen"][:] == ["Blue.", "Eight."]
    assert rows["rejected"][:] == ["Colour is a word.", "Six."]


def test_spin_iter_shards_folder_with_splits(tmp_path):
    folder = tmp_path / "SPIN_iter0"
    write_shards(folder, "train", SPIN_ROWS * 3, shards=2)
    write_shards(folder, "test", SPIN_ROWS[:1])
    assert len(load_rows(f"{folder}:train")) == 6
    assert load_rows(f"{folder}:test")["chosen"][:] == ["Blue."]
    with pytest.raises(DataError, match="holds the splits test, train; name one as"):
        load_rows(folder)
    with pytest.raises(DataError, match="has no split 'validation'"):
        load_rows(f"{folder}:validation")


def test_ultrachat_shards_first_turn_and_multi_turn_count(tmp_path):
    folder = tmp_path / "ultrachat_200k"
    write_shards(folder, "train_sft", [ultrachat_row(i, turns=1 + i % 3) for i in range(9)], shards=3)
    write_shards(folder, "test_sft", [ultrachat_row(100 + i) for i in range(4)])
    counts: dict = {}
    rows = load_rows(f"{folder}:train_sft", counts=counts)
    assert len(rows) == 9 and counts == {"rows": 9, "multi_turn_first_turn_only": 6}
    by_id = {r["prompt_id"]: r for r in rows}
    # Multi-turn rows give their first exchange, as the SPIN authors used UltraChat.
    assert by_id["id2"]["prompt"] == "question 2.0" and by_id["id2"]["response"] == "answer 2.0"
    assert sorted(load_rows(f"{folder}:test_sft")["prompt_id"][:]) == ["id100", "id101", "id102", "id103"]


def test_dataset_names_resolve_offline_through_the_datasets_cache(tmp_path):
    online_setting = datasets.config.HF_HUB_OFFLINE
    cache_dataset("UCLA-AGI/SPIN_iter0", {"train": SPIN_ROWS}, tmp_path / "spin")
    cache_dataset("HuggingFaceH4/ultrachat_200k",
                  {"train_sft": [ultrachat_row(i, 2) for i in range(5)], "test_sft": [ultrachat_row(9)]}, tmp_path / "uc")
    pairs = load_rows("UCLA-AGI/SPIN_iter0")
    assert pairs["rejected"][:] == ["Colour is a word.", "Six."]
    counts: dict = {}
    train = load_rows("HuggingFaceH4/ultrachat_200k:train_sft", counts=counts)
    assert len(train) == 5 and counts["multi_turn_first_turn_only"] == 5
    assert load_rows("HuggingFaceH4/ultrachat_200k:test_sft")["response"][:] == ["answer 9.0"]
    # The Hub is never asked: a name missing from the cache fails at once (offline), and the process's
    # own setting is restored afterwards.
    assert datasets.config.HF_HUB_OFFLINE == online_setting
    with pytest.raises(DataError, match="UCLA-AGI/SPIN_iter9 is neither a file nor a directory"):
        load_rows("UCLA-AGI/SPIN_iter9")
    with pytest.raises(DataError, match="split test"):
        load_rows("UCLA-AGI/SPIN_iter0:test")


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory) -> Path:
    from spin_mega.demo.build import build_tiny_model, build_tokenizer

    root = tmp_path_factory.mktemp("model")
    build_tokenizer(root / "tokenizer")
    return build_tiny_model(root / "model", root / "tokenizer", seed=0)


def _no_user_turn(folder: Path) -> str:
    rows = [SPIN_ROWS[0], {"real": [turn("system", "Be brief."), turn("assistant", "Blue.")], "generated": SPIN_ROWS[0]["generated"]}]
    write_shards(folder, "train", rows)
    return f"{folder}:train"


def _no_schema(folder: Path) -> str:
    path = folder / "odd.jsonl"
    folder.mkdir(parents=True)
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    return str(path)


def _empty_split(folder: Path) -> str:
    write_shards(folder, "train_sft", [ultrachat_row(0)])
    write_shards(folder, "test_sft", [])
    return f"{folder}:test_sft"


@pytest.mark.parametrize("make, message", [
    (_no_user_turn, r"data:train: row 2, column 'real' is a message list with no user turn"),
    (_no_schema, r"odd.jsonl: cannot tell its schema from its columns \(answer, question\)"),
    (_empty_split, r"ultrachat:test_sft holds no rows"),
], ids=["no-user-turn", "no-schema", "empty-split"])
def test_bad_published_data_is_one_sentence_exit_2_nothing_written(tiny_hf_model, tmp_path, make, message):
    import re

    source = make(tmp_path / ("data" if make is _no_user_turn else "ultrachat"))
    out = tmp_path / "out" / "generations.jsonl"
    result = spin_mega("generate", "--model", str(tiny_hf_model), "--data", source, "--out", str(out), "--backend", "hf")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [l for l in result.stderr.splitlines() if l.startswith("spin-mega")]
    assert len(errors) == 1 and re.search(message, errors[0]), result.stderr
    assert not (tmp_path / "out").exists()
