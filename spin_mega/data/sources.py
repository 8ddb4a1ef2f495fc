"""Reading SFT and SPIN-pair data into `datasets.Dataset`s with one normalised set of columns.

Normalised SFT rows: `prompt_id` (str), `prompt` (str, or a list of {role, content} messages), `response`.
Normalised pair rows: `prompt_id`, `prompt`, `chosen`, `rejected`, and, when the file has them,
`opponent_chosen_logp` and `opponent_rejected_logp`.

Bad rows (a missing or non-string field) are kept as they are: the consumer decides, and counts, what
it skips (`tokenize_pairs` does; `drop_incomplete` is the shortcut for generation). Only problems with
the file as a whole raise a `DataError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

import datasets
import numpy as np
from datasets.fingerprint import is_caching_enabled

from spin_mega.errors import DataError

SCHEMAS = ("auto", "ultrachat", "prompt_response", "pairs")
SFT_COLUMNS = ("prompt_id", "prompt", "response")
PAIR_COLUMNS = ("prompt_id", "prompt", "chosen", "rejected")
OPPONENT_COLUMNS = ("opponent_chosen_logp", "opponent_rejected_logp")

_REQUIRED = {
    "ultrachat": ("messages",),
    "prompt_response": ("prompt", "response"),
    "pairs": ("prompt", "chosen", "rejected"),
}
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
    for schema in ("pairs", "ultrachat", "prompt_response"):
        if set(_REQUIRED[schema]) <= present:
            return schema
    raise DataError(
        f"{source}: cannot tell its schema from its columns ({', '.join(sorted(present)) or 'none'}); expected "
        "prompt+chosen+rejected (pairs), messages (ultrachat) or prompt+response (prompt_response)"
    )


def _read(path: Path) -> datasets.Dataset:
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
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
        return ds
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl, .json, .parquet or a save_to_disk directory")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    try:
        if kind == "json":
            return datasets.Dataset.from_json(str(path))
        return datasets.Dataset.from_parquet(str(path))
    except Exception as exc:
        raise DataError(f"{path} could not be read as {path.suffix[1:].upper()}: {_cause(exc)}") from None


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


def _split_conversation(messages: Any, prompt_column: Any) -> tuple[Any, Any]:
    """(prompt, response) of an UltraChat-style conversation: the prompt is the user turn (the one whose
    text equals the `prompt` column when there is one, else the first) with any turns before it, the
    response the first assistant turn after it. Unusable conversations give (None, None)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return None, None
    user_turns = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not user_turns:
        reply = next((m.get("content") for m in messages if m["role"] == "assistant"), None)
        return prompt_column, reply
    u = next((i for i in user_turns if messages[i].get("content") == prompt_column), user_turns[0])
    reply = next((m.get("content") for m in messages[u + 1 :] if m["role"] == "assistant"), None)
    if u == 0:
        return messages[0].get("content"), reply
    return [{"role": m["role"], "content": m.get("content")} for m in messages[: u + 1]], reply


def _normaliser(schema: str, columns: set[str]) -> Callable[[dict], dict]:
    has_id = "prompt_id" in columns
    has_logps = all(c in columns for c in OPPONENT_COLUMNS)

    def normalise(batch: dict) -> dict:
        n = len(next(iter(batch.values())))
        ids = batch["prompt_id"] if has_id else [None] * n
        if schema == "ultrachat":
            prompts_in = batch["prompt"] if "prompt" in batch else [None] * n
            split = [_split_conversation(m, p) for m, p in zip(batch["messages"], prompts_in)]
            prompts = [p for p, _ in split]
            out = {"response": [r for _, r in split]}
        else:
            prompts = batch["prompt"]
            if schema == "prompt_response":
                out = {"response": batch["response"]}
            else:
                out = {"chosen": batch["chosen"], "rejected": batch["rejected"]}
                if has_logps:
                    for c in OPPONENT_COLUMNS:
                        out[c] = [_logp(v) for v in batch[c]]
        return {"prompt_id": [prompt_id_for(i, p) for i, p in zip(ids, prompts)], "prompt": prompts, **out}

    return normalise


def load_rows(path: str | os.PathLike, schema: str = "auto") -> datasets.Dataset:
    """Reads a .jsonl, .json or .parquet file, or a `save_to_disk` directory, and returns its rows with
    the normalised columns of `schema` (see the module docstring), in file order.

    `auto` picks `pairs` for prompt+chosen+rejected, `ultrachat` for messages, `prompt_response` for
    prompt+response. A missing file, an unreadable one, an unknown schema or missing columns raise a
    `DataError` naming the file.
    """
    path = Path(path)
    if schema not in SCHEMAS:
        raise DataError(f"unknown data schema '{schema}' for {path}; choose one of {', '.join(SCHEMAS)}")
    ds = _read(path)
    if len(ds) == 0:
        raise DataError(f"{path} holds no rows")
    columns = list(ds.column_names)
    if schema == "auto":
        schema = detect_schema(columns, str(path))
    missing = [c for c in _REQUIRED[schema] if c not in columns]
    if missing:
        raise DataError(
            f"{path} lacks the column(s) {', '.join(missing)} that schema '{schema}' needs "
            f"(it has: {', '.join(columns)})"
        )
    if schema == "pairs":
        present = [c for c in OPPONENT_COLUMNS if c in columns]
        if len(present) == 1:
            other = next(c for c in OPPONENT_COLUMNS if c not in present)
            raise DataError(f"{path} has the column {present[0]} but not {other}; opponent log-probs come in pairs")
    rows = ds.map(
        _normaliser(schema, set(columns)),
        batched=True,
        remove_columns=columns,
        # The outputs share names with inputs but not always types (an integer prompt_id becomes text).
        try_original_type=False,
        desc=f"normalising {schema} rows",
        **map_cache_kwargs(ds),
    )
    if schema != "pairs":
        order = list(SFT_COLUMNS)
    else:
        order = list(PAIR_COLUMNS) + [c for c in OPPONENT_COLUMNS if c in rows.column_names]
    return rows.select_columns(order)


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
