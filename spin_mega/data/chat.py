"""Prompt rendering shared by generation and training.

The authors' scripts rendered prompts one way for generation and another for training (a known
confound, DESIGN.md); here both call `render_prompt`, so the model is trained on exactly the prefix it
generated from, byte for byte.
"""

from __future__ import annotations

from typing import Any, Union

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


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The exact text the model sees before its response: the chat template applied to the prompt turns
    with the generation prompt (the assistant header) appended."""
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(prompt_messages(prompt), tokenize=False, add_generation_prompt=True)


def render_response(tokenizer: Any, response: str) -> str:
    """The response text as it follows the rendered prompt: the response and the end-of-sequence token,
    so that the model is trained to stop where the human response stopped."""
    eos = tokenizer.eos_token or ""
    return response + eos
