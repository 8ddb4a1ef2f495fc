"""Fixtures for the data tests: a tiny tokenizer built locally (no Hub access on CI machines) and an
isolated datasets cache, so that tests neither read nor leave files in the user's cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Zephyr's template shape: BOS once, then <|role|> turns ending in EOS, then the assistant header.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Write a short poem about the sea. The sea is wide and deep and blue.",
    "Explain gradient descent. Gradient descent follows the negative gradient of the loss.",
    "How many legs does a spider have? A spider has eight legs.",
    "You are a helpful assistant. Answer briefly and politely.",
]


def build_tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE (every string encodes, merges can straddle word boundaries like a real LLM
    tokenizer's) with Zephyr-like special tokens."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture()
def tokenizer_without_template() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer(chat_template=False)


@pytest.fixture()
def write_jsonl():
    def write(path: Path, rows: list[dict]) -> Path:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path

    return write
