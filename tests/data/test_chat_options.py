"""Chat-template options of zephyr-7b-sft-full's SFT (an empty system turn; the tokenizer's BOS in front
of a template that does not write one) give the same prompt token ids in generation, training and
evaluation, with exactly one BOS whether or not the template writes it."""

from __future__ import annotations

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from spin_mega.config import DataConfig
from spin_mega.data import tokenize_pairs
from spin_mega.data.chat import render_prompt
from spin_mega.evaluation.heldout import response_logprobs
from spin_mega.generation.runner import prepare_prompts
from tests.data.conftest import CHAT_TEMPLATE, build_tiny_tokenizer

# zephyr-7b-sft-full's template: no BOS of its own (its tokenizer adds one), a turn per role.
ZEPHYR_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea."]
RESPONSE = "The capital of France is Paris."


def bos_adding_tokenizer(template: str):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = template
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert tokenizer("a")["input_ids"][0] == bos  # a Llama/Mistral-style tokenizer: BOS on its own
    return tokenizer


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).float().eval()


def _three_ways(tokenizer, options: DataConfig, model):
    import datasets

    rows = [{"prompt_id": f"p{i}", "prompt": p, "chosen": RESPONSE, "rejected": "Lyon."} for i, p in enumerate(PROMPTS)]
    tokenized, _ = tokenize_pairs(datasets.Dataset.from_list(rows), tokenizer, options)
    training = [list(ids) for ids in tokenized["prompt_ids"]]
    prepared, _ = prepare_prompts(tokenizer, [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "response": RESPONSE} for r in rows], options)
    generation = [list(p.token_ids) for p in prepared]
    # Evaluation's ids, seen through its scores: each equals the model's score of the training ids.
    scores = response_logprobs(model, tokenizer, [(p, RESPONSE) for p in PROMPTS], chat=options)
    for (total, count), prompt_ids, chosen_ids in zip(scores, training, tokenized["chosen_ids"]):
        ids = torch.tensor([prompt_ids + list(chosen_ids)])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        expected = sum(logps[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(chosen_ids))
        assert count == len(chosen_ids) and total == pytest.approx(expected, rel=1e-5)
    return training, generation


@pytest.mark.parametrize("template", [ZEPHYR_TEMPLATE, CHAT_TEMPLATE], ids=["template-without-bos", "template-with-bos"])
def test_paper_chat_options_give_one_bos_and_identical_ids(template, tiny_lm):
    tokenizer = bos_adding_tokenizer(template)
    options = DataConfig(system_prompt="", add_bos="auto", max_prompt_length=256, max_length=512)
    training, generation = _three_ways(tokenizer, options, tiny_lm)
    assert training == generation
    bos = tokenizer.bos_token_id
    for ids, prompt in zip(training, PROMPTS):
        assert ids[0] == bos and ids.count(bos) == 1
        text = tokenizer.decode(ids)
        assert text.startswith("<s><|system|>\n</s>\n<|user|>\n")  # the empty system turn zephyr's SFT saw
        assert text == ("" if template == CHAT_TEMPLATE else "<s>") + render_prompt(tokenizer, prompt, options)


def test_options_off_leave_the_template_alone(tiny_lm):
    tokenizer = bos_adding_tokenizer(ZEPHYR_TEMPLATE)
    options = DataConfig(system_prompt=None, add_bos="never", max_prompt_length=256, max_length=512)
    training, generation = _three_ways(tokenizer, options, tiny_lm)
    assert training == generation
    assert all(tokenizer.bos_token_id not in ids for ids in training)
    assert tokenizer.decode(training[0]).startswith("<|user|>\n")
