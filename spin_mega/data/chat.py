"""Prompt rendering shared by generation, training and evaluation.

The authors' scripts rendered prompts one way for generation and another for training (a known
confound, DESIGN.md); here all three call `render_prompt` for the text and `encode_prompts` for its
token ids, so the model is trained and evaluated on exactly the prefix it generated from.

The chat-template options a model's SFT used (DataConfig.system_prompt, DataConfig.add_bos) are applied
here and nowhere else: zephyr-7b-sft-full was trained with an empty system turn before each user turn,
and with the tokenizer's BOS in front of a template that does not write one itself.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

from spin_mega.errors import DataError

Messages = list[dict[str, str]]
Prompt = Union[str, Messages]


def prompt_messages(prompt: Prompt) -> Messages:
    """A prompt as chat messages: a plain string is one user turn; a message list is used as is (its
    final turn must not be the assistant's, which would be the response)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        raise DataError("a prompt must be a string or a list of {role, content} messages")
    if prompt and prompt[-1]["role"] == "assistant":
        raise DataError("a prompt's last message is the assistant's; that turn belongs in the response")
    return list(prompt)


def require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise DataError(
            f"{name} has no chat template; set one (tokenizer.chat_template in tokenizer_config.json) so that "
            "prompts render the same way in generation and training"
        )


def render_prompt(tokenizer: Any, prompt: Prompt, options: Any = None) -> str:
    """The exact text the model sees before its response: the chat template applied to the prompt turns
    with the generation prompt (the assistant header) appended. `options` (a DataConfig) with a
    `system_prompt` (an empty string included) puts that system turn first when the prompt has none."""
    require_chat_template(tokenizer)
    messages = prompt_messages(prompt)
    system = getattr(options, "system_prompt", None)
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}] + messages
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of text on its own (add_special_tokens=True), as an SFT
    script that tokenized the rendered chat text got it."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_prompts(tokenizer: Any, texts: Sequence[str], options: Any = None) -> list[list[int]]:
    """Token ids of rendered prompts. With `add_bos` "auto" (the default) a tokenizer that adds BOS on its
    own gets it here too, once: not again when the chat template already wrote it (a double BOS shifts
    every position the model saw in SFT). "never" leaves the ids as the template's text gives them."""
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if getattr(options, "add_bos", "auto") != "auto" or not _adds_bos(tokenizer):
        return [list(ids) for ids in encoded]
    bos = tokenizer.bos_token_id
    return [list(ids) if ids and ids[0] == bos else [bos, *ids] for ids in encoded]


def encode_prompt(tokenizer: Any, prompt: Prompt, options: Any = None) -> list[int]:
    """`render_prompt` then `encode_prompts` for one prompt."""
    return encode_prompts(tokenizer, [render_prompt(tokenizer, prompt, options)], options)[0]


def render_response(tokenizer: Any, response: str) -> str:
    """The response text as it follows the rendered prompt: the response and the end-of-sequence token,
    so that the model is trained to stop where the human response stopped."""
    eos = tokenizer.eos_token or ""
    return response + eos
