"""The exported HF directory serves in vLLM (CPU build) and scores tokens as transformers does: a Llama with
llama3 rope scaling, a Qwen3 (query/key norms, head_dim decoupled from the hidden size, tied embeddings) and a
Qwen3-MoE (vLLM's CPU fused-MoE path). One engine per model, shared by that model's tests."""

from __future__ import annotations

import pytest
import torch
from conv_testlib import save_hf_model

from spin_mega.conversion import hf_to_mcore, mcore_to_hf
from tests.support import require_vllm

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPTS = [[2, 10, 20, 30, 40, 50, 60], [2, 7, 7, 300, 11]]
NEW_TOKENS = 6
# llama: the config field vLLM is most likely to read differently (llama3 rope scaling).
ARCHS = ["llama", "qwen3", "qwen3_moe"]


@pytest.fixture(scope="module", params=ARCHS)
def served(request, tmp_path_factory):
    """(exported HF directory, its vLLM engine), one model at a time."""
    vllm = require_vllm()
    root = tmp_path_factory.mktemp(f"conversion_vllm_{request.param}")
    save_hf_model(request.param, root / "hf")
    exported = mcore_to_hf(hf_to_mcore(root / "hf", root / "mcore"), root / "exported")
    # Eager mode: on CPU the graph compilation would dominate start-up; 0.3 of the node's memory for the
    # KV cache is what these shared machines grant.
    llm = vllm.LLM(
        model=str(exported), enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=256, dtype="float32", seed=0
    )
    yield exported, llm
    del llm


def test_vllm_generates_and_scores_like_transformers(served):
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    exported, engine = served
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


def test_vllm_samples_with_the_logprobs_transformers_gives(served):
    """Sampling at temperature 1 (as SPIN's generation does): every sampled token's log-prob as vLLM reports it
    is transformers' log-prob of that token after the same prefix."""
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    exported, engine = served
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=0, seed=3)
    outputs = engine.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        sample = output.outputs[0]
        generated = list(sample.token_ids)
        assert len(generated) == NEW_TOKENS
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([prompt + generated])).logits[0].double(), dim=-1)
        for step, token in enumerate(generated):
            reported = sample.logprobs[step][token].logprob
            assert abs(reported - logprobs[len(prompt) - 1 + step, token].item()) < 1e-4
