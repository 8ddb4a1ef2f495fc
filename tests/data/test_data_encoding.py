"""Training or SFT data that is not UTF-8 is refused in one sentence naming the file and where the first
bad byte is, in every format that carries text: .jsonl, .json, .parquet, parquet shard folders and
`save_to_disk` directories (whose strings pyarrow would otherwise hand on unchecked)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spin_mega.data import encoding
from spin_mega.data.sources import load_rows
from spin_mega.errors import DataError
from tests.support import REPO, build_tokenizer, spin_mega

PAIRS = [
    {"prompt_id": f"p{i}", "prompt": f"what is {i} plus {i}", "chosen": f"it is {2 * i}", "rejected": "no idea"}
    for i in range(12)
]
BAD_ROW = 7  # 0-based; messages say "row 8"


def _jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _latin1_jsonl(path: Path) -> int:
    """PAIRS as JSONL with one prompt written in latin-1 ("café"); returns the bad byte's offset."""
    rows = [dict(r) for r in PAIRS]
    rows[BAD_ROW]["prompt"] = "CAFE_MARK"
    data = _jsonl_bytes(rows).replace(b"CAFE_MARK", b"caf\xe9")
    path.write_bytes(data)
    return data.index(b"\xe9")


def _table_with_bad_prompt() -> pa.Table:
    prompts = [r["prompt"].encode() for r in PAIRS]
    prompts[BAD_ROW] = b"caf\xe9 au lait"
    columns = {k: pa.array([r[k] for r in PAIRS]) for k in ("prompt_id", "chosen", "rejected")}
    columns["prompt"] = pa.array(prompts, pa.binary()).view(pa.string())  # unchecked, as a foreign writer leaves it
    return pa.table(columns)


def test_jsonl_names_the_byte_offset_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    offset = _latin1_jsonl(path)
    with pytest.raises(DataError) as caught:
        load_rows(path)
    assert str(caught.value).startswith(
        f"{path} is not UTF-8 text: byte 0xe9 at byte offset {offset} (line {BAD_ROW + 1}) does not decode; convert"
    )


def test_json_array_names_the_byte_offset(tmp_path):
    path = tmp_path / "pairs.json"
    data = json.dumps(PAIRS).encode()
    cut = data.index(b"plus 5")
    path.write_bytes(data[:cut] + b"\xff\xfe" + data[cut:])
    with pytest.raises(DataError, match=rf"byte 0xff at byte offset {cut} \(line 1\)"):
        load_rows(path)


def test_parquet_file_names_row_column_and_offset_in_the_value(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(_table_with_bad_prompt(), path)
    with pytest.raises(DataError) as caught:
        load_rows(path)
    assert str(caught.value).startswith(
        f"{path}: row {BAD_ROW + 1}, column 'prompt' is not UTF-8 text (byte 0xe9 at byte offset 3 of the value)"
    )


def test_parquet_shards_name_the_shard_holding_the_row(tmp_path):
    table = _table_with_bad_prompt()
    folder = tmp_path / "shards"
    (folder / "data").mkdir(parents=True)
    pq.write_table(table.slice(0, 5), folder / "data" / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(5), folder / "data" / "train-00001-of-00002.parquet")
    shard = folder / "data" / "train-00001-of-00002.parquet"
    with pytest.raises(DataError, match=rf"^{shard}: row {BAD_ROW - 5 + 1}, column 'prompt'"):
        load_rows(folder)


def test_saved_dataset_with_message_lists_names_the_row(tmp_path):
    contents = [r["prompt"].encode() for r in PAIRS]
    contents[BAD_ROW] = b"na\xefve question"
    messages = pa.ListArray.from_arrays(
        pa.array(list(range(0, 2 * len(PAIRS) + 1, 2)), pa.int32()),
        pa.StructArray.from_arrays(
            [pa.array(["user", "assistant"] * len(PAIRS)),
             pa.array([c for pair in zip(contents, [b"a reply"] * len(PAIRS)) for c in pair], pa.binary()).view(pa.string())],
            ["role", "content"],
        ),
    )
    saved = tmp_path / "saved"
    datasets.Dataset(pa.table({"messages": messages})).save_to_disk(str(saved))
    with pytest.raises(DataError, match=rf"row {BAD_ROW + 1}, column 'messages' is not UTF-8 text \(byte 0xef at byte offset 2"):
        load_rows(saved)


def test_a_character_split_across_reads_is_not_mistaken_for_bad_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(encoding, "_CHUNK", 5)
    path = tmp_path / "text.jsonl"
    text = '{"a": "één ünïcödé"}\n'.encode() * 3
    path.write_bytes(text)
    assert encoding.first_invalid_utf8(path) is None
    path.write_bytes(text + b"\x80")
    assert encoding.first_invalid_utf8(path) == (len(text), 0x80, 4)


def test_spin_mega_train_refuses_latin1_pairs_in_one_sentence(tmp_path):
    data = tmp_path / "latin1.jsonl"
    offset = _latin1_jsonl(data)
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    result = spin_mega("train", str(REPO / "configs" / "tiny-cpu.yaml"), "--workdir", str(tmp_path / "w"),
                       "--set", f"data.tokenizer={tokenizer}", "--set", f"data.train_path={data}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("spin-mega train: error:")]
    assert len(errors) == 1 and f"{data} is not UTF-8 text: byte 0xe9 at byte offset {offset}" in errors[0]
