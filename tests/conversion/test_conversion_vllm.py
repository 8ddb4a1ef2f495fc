"""The exported HF directory serves in vLLM (CPU build) and scores tokens as transformers does."""

from __future__ import annotations

import pytest
import torch
from conv_testlib import save_hf_model

from spin_mega.conversion import hf_to_mcore, mcore_to_hf
from tests.support import require_vllm

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPTS = [[2, 10, 20, 30, 40, 50, 60], [2, 7, 7, 300, 11]]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversion_vllm")
    # llama with llama3 rope scaling: the config field vLLM is most likely to read differently.
    save_hf_model("llama", root / "hf")
    return mcore_to_hf(hf_to_mcore(root / "hf", root / "mcore"), root / "exported")


@pytest.fixture(scope="module")
def engine(exported):
    vllm = require_vllm()
    # Eager mode: on CPU the graph compilation would dominate start-up; 0.3 of the node's memory for the
    # KV cache is what these shared machines grant.
    llm = vllm.LLM(
        model=str(exported), enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=256, dtype="float32", seed=0
    )
    yield llm
    del llm


def test_vllm_generates_and_scores_like_transformers(exported, engine):
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, prompt_logprobs=0)
    outputs = engine.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        generated = list(output.outputs[0].token_ids)
        assert len(generated) == NEW_TOKENS
        ids = torch.tensor([prompt + generated])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        for pos in range(1, len(prompt)):
            vllm_logprob = output.prompt_logprobs[pos][prompt[pos]].logprob
            assert abs(vllm_logprob - logprobs[pos - 1, prompt[pos]].item()) < 1e-4
        # Greedy tokens are argmaxes under transformers too (up to float noise between near-ties).
        for step, token in enumerate(generated):
            row = logprobs[len(prompt) - 1 + step]
            assert row[token] >= row.max() - 1e-4
