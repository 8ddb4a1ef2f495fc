"""Reading SFT and SPIN-pair data into `datasets.Dataset`s with one normalised set of columns.

Normalised SFT rows: `prompt_id` (str), `prompt` (str, or a list of {role, content} messages), `response`.
Normalised pair rows: `prompt_id`, `prompt`, `chosen`, `rejected`, and, when the file has them,
`opponent_chosen_logp` and `opponent_rejected_logp`.

Where the data comes from (`load_rows`'s `path`): a .jsonl/.json/.parquet file, a `save_to_disk`
directory, a folder of parquet shards as the Hub downloads them (`data/train_sft-00000-of-00003.parquet`,
one split chosen as `FOLDER:SPLIT`), or a dataset name resolved offline through the `datasets` cache
(`HuggingFaceH4/ultrachat_200k:train_sft`). Published layouts read as they are: UltraChat-200k's
`messages` (schema `ultrachat`, the first user turn and its reply, as the SPIN authors used it) and
`UCLA-AGI/SPIN_iter*`'s `real` and `generated` message lists (schema `spin`: chosen = real, rejected =
generated).

Bad rows (a missing or non-string field) are kept as they are: the consumer decides, and counts, what
it skips (`tokenize_pairs` does; `drop_incomplete` is the shortcut for generation). Only problems with
the file as a whole raise a `DataError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional

import datasets
import numpy as np
import pyarrow.parquet as pq
from datasets.fingerprint import is_caching_enabled

from spin_mega.data.encoding import check_utf8_file, check_utf8_table
from spin_mega.errors import DataError

SCHEMAS = ("auto", "ultrachat", "prompt_response", "pairs", "spin")
SFT_COLUMNS = ("prompt_id", "prompt", "response")
PAIR_COLUMNS = ("prompt_id", "prompt", "chosen", "rejected")
OPPONENT_COLUMNS = ("opponent_chosen_logp", "opponent_rejected_logp")

_REQUIRED = {
    "ultrachat": ("messages",),
    "prompt_response": ("prompt", "response"),
    "pairs": ("prompt", "chosen", "rejected"),
    "spin": ("real", "generated"),
}
# Hub shard names: SPLIT-00000-of-00003.parquet, optionally followed by a content hash.
_SHARD_NAME = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}(?:-[0-9a-f]+)?\.parquet$")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def prompt_hash(prompt: Any) -> str:
    """A stable id for a prompt: the SHA-256 of its text, or of the canonical JSON of a message list, so
    that the same prompt gets the same id in every iteration's generations and across machines."""
    if isinstance(prompt, str):
        text = prompt
    else:
        text = json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_valid_prompt(prompt: Any) -> bool:
    """A non-blank string, or a non-empty list of {role: str, content: str} messages not ending with the
    assistant's turn (that turn would be the response)."""
    if isinstance(prompt, str):
        return bool(prompt.strip())
    if not isinstance(prompt, list) or not prompt:
        return False
    for message in prompt:
        if not isinstance(message, dict):
            return False
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            return False
    return prompt[-1]["role"] != "assistant"


def is_nonblank_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def detect_schema(columns: list[str], source: str = "the data") -> str:
    """The schema implied by a set of column names; pairs win over SFT columns because a pairs file may
    also carry the SFT columns it was generated from."""
    present = set(columns)
    for schema in ("pairs", "spin", "ultrachat", "prompt_response"):
        if set(_REQUIRED[schema]) <= present:
            return schema
    if "prompt" in present:
        raise DataError(
            f"{source} has a prompt column but no response to go with it (its columns: {', '.join(sorted(present))}); "
            "add the human responses as a response column (or chosen and rejected, for SPIN pairs)"
        )
    raise DataError(
        f"{source}: cannot tell its schema from its columns ({', '.join(sorted(present)) or 'none'}); expected "
        "prompt+chosen+rejected (pairs), real+generated (spin), messages (ultrachat) or prompt+response (prompt_response)"
    )


def split_source(spec: str | os.PathLike) -> tuple[str, Optional[str]]:
    """(file, folder or dataset name; split) of a data source written `SOURCE` or `SOURCE:SPLIT`."""
    text = os.fspath(spec)
    if Path(text).exists() or ":" not in text:
        return text, None
    base, split = text.rsplit(":", 1)
    if not base or not split or "/" in split:
        return text, None
    return base, split


def _shard_splits(folder: Path) -> dict[str, list[Path]]:
    """The parquet files under `folder` grouped by split: the name's prefix for Hub shard names, else
    the folder holding the file (`train/0000.parquet`)."""
    splits: dict[str, list[Path]] = {}
    for f in sorted(folder.rglob("*.parquet")):
        match = _SHARD_NAME.match(f.name)
        name = match["split"] if match else (f.parent.name if f.parent != folder else "train")
        splits.setdefault(name, []).append(f)
    return splits


def _choose_split(source: str, splits: list[str], split: Optional[str]) -> str:
    if split is None:
        if len(splits) == 1:
            return splits[0]
        raise DataError(f"{source} holds the splits {', '.join(splits)}; name one as {source}:SPLIT, e.g. {source}:{splits[0]}")
    if split not in splits:
        raise DataError(f"{source} has no split '{split}' (its splits: {', '.join(splits)})")
    return split


def _read_shards(folder: Path, split: Optional[str]) -> datasets.Dataset:
    splits = _shard_splits(folder)
    if not splits:
        raise DataError(f"{folder} is a directory but not one written by datasets.Dataset.save_to_disk, nor a folder of parquet shards")
    split = _choose_split(str(folder), sorted(splits), split)
    try:
        # datasets cannot read a shard of zero rows; the count is in each file's footer.
        row_files = [(str(f), pq.ParquetFile(f).metadata.num_rows) for f in splits[split]]
        if sum(rows for _, rows in row_files) == 0:
            raise DataError(f"{folder}:{split} holds no rows")
        ds = datasets.Dataset.from_parquet([str(f) for f in splits[split]])
        check_utf8_table(ds.data.table, f"{folder}:{split}", row_files)
        return ds
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{folder}:{split} could not be read as parquet: {_cause(exc)}") from None


def _read_named(name: str, split: Optional[str]) -> datasets.Dataset:
    """A dataset loaded before (`datasets.load_dataset(name)` or a download into the datasets cache),
    read from that cache with the Hub never contacted: runs do not depend on the network."""
    previous = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        loaded = datasets.load_dataset(name, split=split) if split else datasets.load_dataset(name)
    except Exception as exc:
        raise DataError(
            f"{name} is neither a file nor a directory, and the datasets cache ({datasets.config.HF_DATASETS_CACHE}) "
            f"cannot provide it{f' with split {split}' if split else ''}: {_cause(exc)}"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = previous
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[_choose_split(name, sorted(loaded), None)]
    check_utf8_table(loaded.data.table, f"{name}:{split}" if split else name)
    return loaded


def _read(path: Path, split: Optional[str] = None) -> datasets.Dataset:
    if not path.exists():
        if _DATASET_NAME.match(str(path)) and path.suffix.lower() not in _SUFFIXES:
            return _read_named(str(path), split)
        raise DataError(f"data file {path} does not exist")
    if path.is_dir() and not (path / "dataset_dict.json").is_file() and not (path / "dataset_info.json").is_file():
        return _read_shards(path, split)
    if split is not None:
        raise DataError(f"{path}:{split}: a split can only be chosen in a folder of parquet shards or a cached dataset")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / "dataset_info.json").is_file())
            raise DataError(
                f"{path} holds a DatasetDict with splits {', '.join(splits) or '(none)'}; "
                f"point the data path at one split's directory, e.g. {path / (splits[0] if splits else 'SPLIT')}"
            )
        if not (path / "dataset_info.json").is_file() or not (path / "state.json").is_file():
            raise DataError(f"{path} is a directory but not one written by datasets.Dataset.save_to_disk")
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"{path} could not be read as a saved dataset: {_cause(exc)}") from None
        if not isinstance(ds, datasets.Dataset):
            raise DataError(f"{path} does not hold a single dataset split")
        check_utf8_table(ds.data.table, str(path))
        return ds
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl, .json, .parquet or a save_to_disk directory")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    if kind == "json":
        # pyarrow's JSON reader passes bytes that are not UTF-8 into string columns unchecked.
        check_utf8_file(path)
    try:
        if kind == "json":
            return datasets.Dataset.from_json(str(path))
        ds = datasets.Dataset.from_parquet(str(path))
    except Exception as exc:
        raise DataError(f"{path} could not be read as {path.suffix[1:].upper()}: {_cause(exc)}") from None
    check_utf8_table(ds.data.table, str(path))
    return ds


def _cause(exc: BaseException) -> str:
    # datasets wraps the informative pyarrow error ("JSON parse error ... in row 7") in a generic one,
    # and behind that pyarrow error sits its fallback parser's less helpful complaint.
    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    first = next((e for e in chain if not type(e).__module__.startswith("datasets")), chain[-1])
    text = str(first).strip()
    return text.splitlines()[0] if text else type(first).__name__


def map_cache_kwargs(ds: datasets.Dataset) -> dict:
    """Where a `.map` over `ds` may write: datasets puts its cache file beside the source's Arrow files,
    which is fine inside the datasets cache but would write into a user's save_to_disk directory; in
    that case (and for in-memory data) the result is kept in memory instead."""
    files = [Path(f["filename"]).resolve() for f in ds.cache_files]
    if not files or not is_caching_enabled():
        return {"keep_in_memory": True}
    cache_root = Path(datasets.config.HF_DATASETS_CACHE).resolve()
    if all(cache_root in f.parents for f in files):
        return {}
    return {"keep_in_memory": True}


def prompt_id_for(value: Any, prompt: Any) -> str:
    """A row's prompt id as text: the given id (an integer id becomes its decimal string), or the
    prompt's hash when the id is missing or empty."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    return prompt_hash(prompt)


def _logp(value: Any) -> Optional[float]:
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        value = float(value)
        return value if math.isfinite(value) else None
    return None


def _split_conversation(messages: Any, prompt_column: Any, where: Callable[[], str]) -> tuple[Any, Any]:
    """(prompt, response) of an UltraChat-style conversation: the prompt is the user turn (the one whose
    text equals the `prompt` column when there is one, else the first) with any turns before it, the
    response the first assistant turn after it; later turns of a multi-turn conversation are not used
    (the SPIN authors trained on the first turn). A conversation with no user turn, and no `prompt`
    column to stand for it, raises a `DataError` naming `where()` (file, row and column)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return None, None
    user_turns = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not user_turns:
        if not is_valid_prompt(prompt_column):
            raise DataError(f"{where()} is a message list with no user turn, so it has no prompt")
        reply = next((m.get("content") for m in messages if m["role"] == "assistant"), None)
        return prompt_column, reply
    u = next((i for i in user_turns if messages[i].get("content") == prompt_column), user_turns[0])
    reply = next((m.get("content") for m in messages[u + 1 :] if m["role"] == "assistant"), None)
    if u == 0:
        return messages[0].get("content"), reply
    return [{"role": m["role"], "content": m.get("content")} for m in messages[: u + 1]], reply


def _normaliser(schema: str, columns: set[str], source: str, keep: tuple[str, ...] = ()) -> Callable[[dict, list[int]], dict]:
    has_id = "prompt_id" in columns
    has_logps = all(c in columns for c in OPPONENT_COLUMNS)

    def normalise(batch: dict, indices: list[int]) -> dict:
        n = len(next(iter(batch.values())))
        ids = batch["prompt_id"] if has_id else [None] * n

        def where(column: str, k: int) -> Callable[[], str]:
            return lambda: f"{source}: row {indices[k] + 1}, column '{column}'"

        if schema == "ultrachat":
            prompts_in = batch["prompt"] if "prompt" in batch else [None] * n
            split = [_split_conversation(m, p, where("messages", k)) for k, (m, p) in enumerate(zip(batch["messages"], prompts_in))]
            prompts = [p for p, _ in split]
            out = {"response": [r for _, r in split]}
        elif schema == "spin":
            real = [_split_conversation(m, None, where("real", k)) for k, m in enumerate(batch["real"])]
            # The generated conversation repeats the prompt; its reply is the opponent's response.
            generated = [_split_conversation(m, None, where("generated", k))[1] for k, m in enumerate(batch["generated"])]
            prompts = [p for p, _ in real]
            out = {"chosen": [r for _, r in real], "rejected": generated}
        else:
            prompts = batch["prompt"]
            if schema == "prompt_response":
                out = {"response": batch["response"]}
            else:
                out = {"chosen": batch["chosen"], "rejected": batch["rejected"]}
                if has_logps:
                    for c in OPPONENT_COLUMNS:
                        out[c] = [_logp(v) for v in batch[c]]
        kept = {c: batch[c] for c in keep if c in columns}
        return {"prompt_id": [prompt_id_for(i, p) for i, p in zip(ids, prompts)], "prompt": prompts, **out, **kept}

    return normalise


def count_multi_turn(ds: datasets.Dataset, column: str) -> int:
    """Rows whose conversation in `column` has more than one user turn (only the first is used)."""
    total = 0
    for batch in ds.select_columns([column]).iter(batch_size=4096):
        for messages in batch[column]:
            if isinstance(messages, list):
                total += sum(isinstance(m, dict) and m.get("role") == "user" for m in messages) > 1
    return total


def load_rows(path: str | os.PathLike, schema: str = "auto", counts: Optional[dict] = None,
              keep: tuple[str, ...] = ()) -> datasets.Dataset:
    """Reads a data source (see the module docstring: a file, a `save_to_disk` directory, a folder of
    parquet shards or a cached dataset name, each optionally `:SPLIT`) and returns its rows with the
    normalised columns of `schema`, in file order.

    `auto` picks `pairs` for prompt+chosen+rejected, `spin` for real+generated, `ultrachat` for
    messages, `prompt_response` for prompt+response. A missing source, an unreadable one, an empty one,
    an unknown schema, missing columns or a conversation with no user turn raise a `DataError` naming
    the source. `counts`, when given, receives `rows` and `multi_turn_first_turn_only` (conversations
    with more than one user turn, of which only the first is used). `keep`: source columns carried along
    unchanged where the source has them (the held-out `answer`).
    """
    spec, split = split_source(path)
    path = Path(spec)
    source = f"{spec}:{split}" if split else spec
    if schema not in SCHEMAS:
        raise DataError(f"unknown data schema '{schema}' for {source}; choose one of {', '.join(SCHEMAS)}")
    ds = _read(path, split)
    if len(ds) == 0:
        raise DataError(f"{source} holds no rows")
    columns = list(ds.column_names)
    if schema == "auto":
        schema = detect_schema(columns, source)
    missing = [c for c in _REQUIRED[schema] if c not in columns]
    if missing:
        raise DataError(
            f"{source} lacks the column(s) {', '.join(missing)} that schema '{schema}' needs "
            f"(it has: {', '.join(columns)})"
        )
    if schema == "pairs":
        present = [c for c in OPPONENT_COLUMNS if c in columns]
        if len(present) == 1:
            other = next(c for c in OPPONENT_COLUMNS if c not in present)
            raise DataError(f"{source} has the column {present[0]} but not {other}; opponent log-probs come in pairs")
    rows = ds.map(
        _normaliser(schema, set(columns), source, tuple(keep)),
        batched=True,
        with_indices=True,
        remove_columns=columns,
        # The outputs share names with inputs but not always types (an integer prompt_id becomes text).
        try_original_type=False,
        desc=f"normalising {schema} rows",
        **map_cache_kwargs(ds),
    )
    if counts is not None:
        conversation = {"ultrachat": "messages", "spin": "real"}.get(schema)
        counts["rows"] = len(rows)
        counts["multi_turn_first_turn_only"] = count_multi_turn(ds, conversation) if conversation else 0
    if schema not in ("pairs", "spin"):
        order = list(SFT_COLUMNS)
    else:
        order = list(PAIR_COLUMNS) + [c for c in OPPONENT_COLUMNS if c in rows.column_names]
    return rows.select_columns(order + [c for c in keep if c in columns and c not in order])


def check_source(spec: str | os.PathLike, key: str) -> None:
    """Refuses a data source named by config key `key` that does not exist, before anything reads it: a
    file or directory (optionally FOLDER:SPLIT) must be there; a dataset name is looked up in the datasets
    cache only when it is read."""
    base, _ = split_source(spec)
    path = Path(base)
    if path.exists():
        return
    if _DATASET_NAME.match(base) and path.suffix.lower() not in _SUFFIXES:
        return
    raise DataError(f"{key} {os.fspath(spec)} does not exist; point {key} at the data file, directory or cached dataset")


def is_pair_dataset(ds: datasets.Dataset) -> bool:
    return all(c in ds.column_names for c in PAIR_COLUMNS[1:])


def drop_incomplete(ds: datasets.Dataset) -> tuple[datasets.Dataset, int]:
    """The rows whose prompt is valid and whose response (or chosen and rejected) is non-blank text, and
    how many were dropped; for consumers, like generation, that need whole rows and no detailed count."""
    text_columns = ["chosen", "rejected"] if is_pair_dataset(ds) else ["response"]

    def keep(batch: dict) -> list[bool]:
        return [
            is_valid_prompt(p) and all(is_nonblank_text(batch[c][i]) for c in text_columns)
            for i, p in enumerate(batch["prompt"])
        ]

    kept = ds.filter(keep, batched=True, desc="dropping incomplete rows", **map_cache_kwargs(ds))
    return kept, len(ds) - len(kept)


def subsample(ds: datasets.Dataset, max_samples: Optional[int], seed: int) -> datasets.Dataset:
    """At most `max_samples` rows chosen at random with `seed`, kept in file order. The choice is a prefix
    of one seeded permutation, so raising `max_samples` with the same seed only adds rows."""
    if max_samples is None or max_samples >= len(ds):
        return ds
    if max_samples < 1:
        raise DataError(f"data.max_samples must be at least 1, got {max_samples}")
    chosen = np.sort(np.random.default_rng(seed).permutation(len(ds))[:max_samples])
    return ds.select(chosen.tolist())
