"""Data for SPIN: reading SFT and pair files, tokenizing pairs, batching them for the trainer."""

from spin_mega.data.batching import IGNORE_INDEX, PairBatchSampler, collate_pairs, padding_fraction
from spin_mega.data.chat import render_prompt, render_response
from spin_mega.data.sources import (
    OPPONENT_COLUMNS,
    PAIR_COLUMNS,
    SCHEMAS,
    SFT_COLUMNS,
    detect_schema,
    drop_incomplete,
    is_pair_dataset,
    is_valid_prompt,
    load_rows,
    prompt_hash,
    prompt_id_for,
    subsample,
)
from spin_mega.data.tokenize import TokenizeStats, load_tokenized_pairs, pad_token_id, pair_lengths, tokenize_pairs

__all__ = [
    "IGNORE_INDEX",
    "OPPONENT_COLUMNS",
    "PAIR_COLUMNS",
    "SCHEMAS",
    "SFT_COLUMNS",
    "PairBatchSampler",
    "TokenizeStats",
    "collate_pairs",
    "detect_schema",
    "drop_incomplete",
    "is_pair_dataset",
    "is_valid_prompt",
    "load_rows",
    "load_tokenized_pairs",
    "pad_token_id",
    "padding_fraction",
    "pair_lengths",
    "prompt_hash",
    "prompt_id_for",
    "render_prompt",
    "render_response",
    "subsample",
    "tokenize_pairs",
]
