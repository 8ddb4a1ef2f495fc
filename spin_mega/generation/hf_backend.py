"""Batched `transformers` generation, for machines without vLLM (and as an independent check of it).

Prompts are left-padded so that every row's next token sits in the last column. Sampling follows the
config exactly (temperature, top_p, no top-k), instead of the model's generation_config.json defaults,
so that the hf and vllm backends sample from the same distribution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence

from spin_mega.config import GenerationConfig
from spin_mega.generation.base import GenerationBackend, GenerationOutput, GenerationRequest, eos_token_ids


def _torch_dtype(name: str, device):
    import torch

    if name == "auto":
        # Half precision is what the weights are usually stored in, but on CPU it is slower than
        # float32 and some kernels are missing, so CPU runs in float32.
        return "auto" if device.type == "cuda" else torch.float32
    mapping = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if name not in mapping:
        from spin_mega.errors import ConfigError

        raise ConfigError(f"generation.dtype: {name!r} is not one of auto, {', '.join(mapping)}")
    return mapping[name]


class HFBackend(GenerationBackend):
    name = "hf"

    def __init__(self, model_dir: str | Path, config: GenerationConfig, tokenizer_dir: Optional[str | Path] = None):
        super().__init__(model_dir, config, tokenizer_dir)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        self.eos_ids = eos_token_ids(self.model_dir, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.model = AutoModelForCausalLM.from_pretrained(
            str(self.model_dir), dtype=_torch_dtype(config.dtype, self.device)
        ).to(self.device)
        self.model.eval()

    def _generation_config(self):
        from transformers import GenerationConfig as HFGenerationConfig

        cfg = self.config
        sample = cfg.temperature > 0
        return HFGenerationConfig(
            do_sample=sample,
            temperature=cfg.temperature if sample else None,
            top_p=cfg.top_p if sample else None,
            top_k=0 if sample else None,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[GenerationOutput]:
        import torch

        gen_config = self._generation_config()
        batch_size = max(1, self.config.batch_size)
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            width = max(len(r.token_ids) for r in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, request in enumerate(batch):
                input_ids[row, width - len(request.token_ids) :] = torch.tensor(request.token_ids)
                attention_mask[row, width - len(request.token_ids) :] = 1
            # One generator for the whole batch: seeding it from the batch's first prompt keeps a run
            # reproducible; per-prompt independence of the batch holds only with batch_size 1.
            torch.manual_seed(batch[0].seed)
            with torch.inference_mode():
                sequences = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    generation_config=gen_config,
                )
            for row, request in enumerate(batch):
                yield GenerationOutput(request, tuple(sequences[row, width:].tolist()))

    def close(self) -> None:
        self.model = None
