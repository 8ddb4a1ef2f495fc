"""Tokenizing SPIN pairs: prompt, chosen and rejected token ids with the prompt/response boundary exact.

The prompt is rendered with the chat template (`render_prompt`, the same text generation sampled from)
and the responses with `render_response` (text + EOS); each is tokenized on its own and the ids are
concatenated by the collator. Tokenizing the joined text instead could merge tokens across the
boundary, so that the log-prob sum would cover a token that is half prompt, or miss one.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

import datasets
import jinja2
import numpy as np
import pyarrow.compute as pc

from spin_mega.config import DataConfig
from spin_mega.data.chat import encode_prompts, render_prompt, render_response, require_chat_template
from spin_mega.data.packing import fit_pair
from spin_mega.data.sources import (
    OPPONENT_COLUMNS,
    is_pair_dataset,
    is_valid_prompt,
    load_rows,
    map_cache_kwargs,
    prompt_id_for,
    subsample,
)
from spin_mega.errors import DataError

_KEPT, _MALFORMED, _EMPTY_RESPONSE, _PROMPT_TOO_LONG = 0, 1, 2, 3
_HELPER_COLUMNS = ("_status", "_prompt_truncated", "_response_truncated", "_cut_to_pack")


@dataclass
class TokenizeStats:
    """What tokenization kept, skipped and cut. `prompt_truncated` and `response_truncated` count kept
    pairs (a pair whose chosen or rejected response, or both, lost tokens counts once);
    `cut_to_pack_tokens` the kept pairs whose responses were cut further so that the pair fits one
    packed row of data.pack_tokens (data/packing.py fit_pair)."""

    rows_in: int = 0
    rows_kept: int = 0
    malformed: int = 0
    empty_response: int = 0
    prompt_too_long_dropped: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    cut_to_pack_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.rows_kept} of {self.rows_in} pairs kept; skipped {self.malformed} malformed, "
            f"{self.empty_response} with an empty response, {self.prompt_too_long_dropped} with a prompt over "
            f"the limit; truncated {self.prompt_truncated} prompts and {self.response_truncated} responses"
            + (f"; cut {self.cut_to_pack_tokens} pairs to fit data.pack_tokens" if self.cut_to_pack_tokens else "")
        )


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the pad token, else EOS. Which one does not matter for the loss (padding is
    masked by position, not by value), only that it is a valid embedding row."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    raise DataError(f"{getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'} has neither a pad nor an eos token")


def _usable_logp(value: Any) -> bool:
    # A sum of log-probs is at most 0; a positive one comes from a broken kernel (DESIGN.md notes one that
    # collapsed training elsewhere), so such a row is treated as malformed rather than trained on.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value <= 0


def _tokenize_batch(
    batch: dict,
    tokenizer: Any,
    max_prompt_length: int,
    max_length: int,
    keep_end: bool,
    with_logps: bool,
    options: Optional[DataConfig] = None,
    pack_tokens: Optional[int] = None,
) -> dict:
    n = len(batch["prompt"])
    status = [_KEPT] * n
    prompt_texts: list[Optional[str]] = [None] * n
    for i in range(n):
        prompt, chosen, rejected = batch["prompt"][i], batch["chosen"][i], batch["rejected"][i]
        malformed = not (is_valid_prompt(prompt) and isinstance(chosen, str) and isinstance(rejected, str))
        if with_logps and not all(_usable_logp(batch[c][i]) for c in OPPONENT_COLUMNS):
            malformed = True
        if malformed:
            status[i] = _MALFORMED
            continue
        if not chosen.strip() or not rejected.strip():
            status[i] = _EMPTY_RESPONSE
            continue
        try:
            prompt_texts[i] = render_prompt(tokenizer, prompt, options)
        except (DataError, jinja2.TemplateError):
            # A template may refuse a row's roles (e.g. no system turn allowed): that row is unusable,
            # the rest of the data is not.
            status[i] = _MALFORMED

    live = [i for i in range(n) if status[i] == _KEPT]

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    prompt_ids = encode_prompts(tokenizer, [prompt_texts[i] for i in live], options)
    chosen_ids = encode([render_response(tokenizer, batch["chosen"][i]) for i in live])
    rejected_ids = encode([render_response(tokenizer, batch["rejected"][i]) for i in live])

    given_ids = batch["prompt_id"] if "prompt_id" in batch else [None] * n
    out: dict[str, list] = {
        "prompt_id": [prompt_id_for(pid, p) for pid, p in zip(given_ids, batch["prompt"])],
        "prompt_ids": [[] for _ in range(n)],
        "chosen_ids": [[] for _ in range(n)],
        "rejected_ids": [[] for _ in range(n)],
        "pair_length": [0] * n,
        "_status": status,
        "_prompt_truncated": [False] * n,
        "_response_truncated": [False] * n,
        "_cut_to_pack": [False] * n,
    }

    for k, i in enumerate(live):
        prompt = prompt_ids[k]
        if not prompt:
            status[i] = _MALFORMED
            continue
        if len(prompt) > max_prompt_length:
            if not keep_end:
                status[i] = _PROMPT_TOO_LONG
                continue
            prompt = prompt[-max_prompt_length:]
            out["_prompt_truncated"][i] = True
        room = max_length - len(prompt)
        chosen, rejected = chosen_ids[k], rejected_ids[k]
        if len(chosen) > room or len(rejected) > room:
            chosen, rejected = chosen[:room], rejected[:room]
            out["_response_truncated"][i] = True
        if pack_tokens is not None:
            room = fit_pair(len(prompt), len(chosen), len(rejected), pack_tokens)
            if len(chosen) > room or len(rejected) > room:
                chosen, rejected = chosen[:room], rejected[:room]
                out["_cut_to_pack"][i] = True
        out["prompt_ids"][i], out["chosen_ids"][i], out["rejected_ids"][i] = prompt, chosen, rejected
        out["pair_length"][i] = len(prompt) + max(len(chosen), len(rejected))
    if with_logps:
        for c in OPPONENT_COLUMNS:
            out[c] = [float(v) if st == _KEPT else None for v, st in zip(batch[c], status)]
    return out


def tokenize_pairs(
    rows: datasets.Dataset,
    tokenizer: Any,
    cfg: DataConfig,
    *,
    source: str = "the pair data",
) -> tuple[datasets.Dataset, TokenizeStats]:
    """Tokenizes normalised pair rows (`load_rows(..., "pairs")`) into a dataset with columns
    `prompt_id`, `prompt_ids`, `chosen_ids`, `rejected_ids` (response ids only), `pair_length`
    (prompt + the longer response, for `PairBatchSampler`) and, when the rows have them, the opponent
    log-prob columns; returns it with the counts of what was skipped or cut.

    A prompt over `cfg.max_prompt_length` tokens is dropped, or with `prompt_truncation: keep_end` cut
    to its last tokens; responses are cut at the end so that prompt + response fits `cfg.max_length`
    (a cut response loses its EOS). Opponent log-probs read from the rows must have been computed on
    these same truncated ids, which is the case when they come from a forward pass over this output.
    Malformed rows and empty responses are skipped and counted; if no pair is left, DataError.
    """
    require_chat_template(tokenizer)
    if tokenizer.eos_token is None:
        raise DataError(
            f"{getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'} has no eos token; responses must end "
            "with one so that the model learns where they stop"
        )
    if not is_pair_dataset(rows):
        raise DataError(f"{source} has no prompt, chosen and rejected columns (it has: {', '.join(rows.column_names)})")
    if not 0 < cfg.max_prompt_length < cfg.max_length:
        raise DataError(
            f"data.max_prompt_length ({cfg.max_prompt_length}) must be positive and smaller than "
            f"data.max_length ({cfg.max_length})"
        )
    with_logps = all(c in rows.column_names for c in OPPONENT_COLUMNS)
    ids = datasets.List(datasets.Value("int32"))
    features = {
        "prompt_id": datasets.Value("string"),
        "prompt_ids": ids,
        "chosen_ids": ids,
        "rejected_ids": ids,
        "pair_length": datasets.Value("int32"),
    }
    if with_logps:
        features.update({c: datasets.Value("float64") for c in OPPONENT_COLUMNS})
    features.update({"_status": datasets.Value("int8"), "_prompt_truncated": datasets.Value("bool"),
                     "_response_truncated": datasets.Value("bool"), "_cut_to_pack": datasets.Value("bool")})

    tokenized = rows.map(
        _tokenize_batch,
        batched=True,
        num_proc=1,
        remove_columns=rows.column_names,
        features=datasets.Features(features),
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_prompt_length": cfg.max_prompt_length,
            "max_length": cfg.max_length,
            "keep_end": cfg.prompt_truncation == "keep_end",
            "with_logps": with_logps,
            "options": cfg,
            # Only a row smaller than a pair at the length limits cuts anything (the default never does).
            "pack_tokens": cfg.pack_tokens if cfg.packing else None,
        },
        desc="tokenizing pairs",
        **map_cache_kwargs(rows),
    )

    table = tokenized.with_format("arrow")
    status = table["_status"].to_numpy()
    kept = status == _KEPT
    stats = TokenizeStats(
        rows_in=len(rows),
        rows_kept=int(kept.sum()),
        malformed=int((status == _MALFORMED).sum()),
        empty_response=int((status == _EMPTY_RESPONSE).sum()),
        prompt_too_long_dropped=int((status == _PROMPT_TOO_LONG).sum()),
        prompt_truncated=int(pc.sum(table["_prompt_truncated"]).as_py() or 0),
        response_truncated=int(pc.sum(table["_response_truncated"]).as_py() or 0),
        cut_to_pack_tokens=int(pc.sum(table["_cut_to_pack"]).as_py() or 0),
    )
    if stats.rows_kept == 0:
        raise DataError(
            f"no usable pairs in {source}: of {stats.rows_in} rows, {stats.malformed} are malformed, "
            f"{stats.empty_response} have an empty chosen or rejected response and {stats.prompt_too_long_dropped} "
            f"have a prompt over data.max_prompt_length={cfg.max_prompt_length} tokens"
        )
    if not kept.all():
        tokenized = tokenized.select(np.flatnonzero(kept).tolist())
    return tokenized.remove_columns(list(_HELPER_COLUMNS)), stats


def load_tokenized_pairs(
    path: str | os.PathLike, tokenizer: Any, cfg: DataConfig
) -> tuple[datasets.Dataset, TokenizeStats]:
    """The trainer's entry point: `load_rows(path, cfg.schema)`, then `cfg.max_samples` rows drawn with
    `cfg.shuffle_seed`, then `tokenize_pairs`."""
    rows = load_rows(path, cfg.schema)
    if not is_pair_dataset(rows):
        raise DataError(f"{path} holds SFT rows, not SPIN pairs (prompt, chosen, rejected); generate pairs from it first")
    rows = subsample(rows, cfg.max_samples, cfg.shuffle_seed)
    return tokenize_pairs(rows, tokenizer, cfg, source=str(path))


def pair_lengths(tokenized: datasets.Dataset) -> np.ndarray:
    """Per pair, prompt + the longer response in tokens (int64), read from Arrow without touching the ids."""
    return tokenized.with_format("arrow")["pair_length"].to_numpy().astype(np.int64)
