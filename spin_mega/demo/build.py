"""Builds the demo's start model on one CPU box in about a minute, from files shipped in the package:
a byte-level BPE tokenizer trained on the demo data, a random tiny Llama, and a short supervised
fine-tune that turns it into a weak SFT model (SPIN's θ0). `sft_warmup` is also the demo's SFT control:
continuing plain SFT on the same data for as many steps as SPIN trains.

Nothing is downloaded. Every function writes its output directory atomically, so an interrupted build
never leaves a directory that a later call would mistake for a finished one.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from spin_mega.errors import DataError, SpinMegaError
from spin_mega.io import atomic_directory, atomic_write_json, read_jsonl

ASSETS = Path(__file__).resolve().parent / "assets"

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# The assistant's turns end with EOS, exactly as training appends it after a response
# (spin_mega.data.chat.render_response), so a multi-turn history looks like what the model learned to write.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Written next to a directory's weights when it is complete; reuse checks it, not mere existence.
BUILD_INFO = "spin_mega_build.json"

Rows = Union[str, Path, Sequence[dict]]


def asset_path(split: str) -> Path:
    """Path of a shipped demo split: "train", "validation" or "heldout" (the test split)."""
    path = ASSETS / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"demo split {split!r} not found at {path} (known: train, validation, heldout)")
    return path


def load_demo_rows(split: str) -> list[dict]:
    """Rows of a shipped split: prompt_id, prompt, response, answer."""
    return read_jsonl(asset_path(split))


def _rows(data: Rows) -> list[dict]:
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        rows = read_jsonl(path)
    else:
        rows = list(data)
    for i, row in enumerate(rows):
        if "prompt" not in row or "response" not in row:
            raise DataError(f"row {i} has no 'prompt' and 'response' (keys: {', '.join(sorted(row))})")
    if not rows:
        raise DataError("no rows to train on")
    return rows


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, texts: Optional[Iterable[str]] = None) -> Path:
    """Trains a byte-level BPE tokenizer on the demo data (or `texts`) and saves it as a
    PreTrainedTokenizerFast directory with the chat template and bos/eos/pad tokens. Digits are split
    one by one, so numbers are spelled the same way wherever they occur. The vocabulary is padded with
    reserved tokens to exactly `vocab_size` (a multiple of 64), the model's embedding size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size % 64 or not 64 <= vocab_size <= 1024:
        raise SpinMegaError(f"vocab_size must be a multiple of 64 between 64 and 1024, got {vocab_size}")
    if texts is None:
        texts = [r[k] for split in ("train", "validation", "heldout") for r in load_demo_rows(split) for k in ("prompt", "response")]
    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    trained = tok.get_vocab_size()
    if trained > vocab_size:
        raise SpinMegaError(f"the trained vocabulary ({trained}) exceeds vocab_size {vocab_size}")
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(vocab_size - trained)])
    # No post-processor: BOS comes from the chat template's text, so tokenizing a rendered prompt gives
    # one BOS whether or not the caller asks for special tokens (vLLM asks; training may not).
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1024
    )
    fast.chat_template = CHAT_TEMPLATE
    with atomic_directory(out_dir) as tmp:
        fast.save_pretrained(tmp)
        atomic_write_json(tmp / BUILD_INFO, {"kind": "tokenizer", "vocab_size": vocab_size, "trained_vocab": trained})
    return Path(out_dir)


def _copy_tokenizer(tokenizer_dir: Path, dest: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(dest)


def build_tiny_model(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 256,
    intermediate_size: int = 688,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 1024,
) -> Path:
    """A randomly initialised LlamaForCausalLM (head_dim 64, grouped-query attention, untied embeddings)
    saved as safetensors with its tokenizer and generation_config.json: a self-contained HF model
    directory that transformers and vLLM load as is."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise SpinMegaError(f"tokenizer directory {tokenizer_dir} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    head_dim = hidden_size // num_attention_heads
    if head_dim < 64:
        # vLLM's CPU attention refuses smaller heads (DESIGN.md), and the demo must run there.
        raise SpinMegaError(f"head_dim {head_dim} is below 64, which vLLM on CPU does not support")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=64,
    )
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / BUILD_INFO, {"kind": "random", "seed": seed, "parameters": model.num_parameters()})
    return Path(out_dir)


def encode_sft_example(tokenizer: Any, prompt: Any, response: str, max_length: int = 512) -> tuple[list[int], list[int]]:
    """Input ids and labels of one SFT example: the prompt as `render_prompt` renders it (labels -100)
    followed by the response and EOS (`render_response`), both tokenized without added special tokens.
    Truncated from the right to `max_length`."""
    from spin_mega.data.chat import render_prompt, render_response

    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(render_response(tokenizer, response), add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    return ids, labels


# Encoded SFT rows per (data file, tokenizer, max_length): theta_0's SFT and every control candidate of the
# demo encode the same 8,100 rows with the same tokenizer, once per process is enough.
_ENCODED: dict[tuple, list[tuple[list[int], list[int]]]] = {}


def _encoded(tokenizer: Any, data: Rows, rows: list[dict], max_length: int) -> list[tuple[list[int], list[int]]]:
    if not isinstance(data, (str, Path)):
        return [encode_sft_example(tokenizer, r["prompt"], r["response"], max_length) for r in rows]
    stat = Path(data).resolve().stat()
    key = (str(Path(data).resolve()), stat.st_mtime_ns, stat.st_size, tokenizer.backend_tokenizer.to_str(),
           tokenizer.chat_template, max_length)
    if key not in _ENCODED:
        _ENCODED[key] = [encode_sft_example(tokenizer, r["prompt"], r["response"], max_length) for r in rows]
    return _ENCODED[key]


def _batch_tensors(batch: list[tuple[list[int], list[int]]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return input_ids, labels, mask


def response_nll(model: Any, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 64) -> list[float]:
    """Mean negative log-likelihood per response token, one value per example (forward only)."""
    import torch

    out: list[float] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            input_ids, labels, mask = _batch_tensors(examples[start : start + batch_size], pad_id)
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
            valid = (target != -100).float()
            out.extend(((nll * valid).sum(1) / valid.sum(1).clamp(min=1)).tolist())
    model.train(was_training)
    return out


def sft_warmup(
    model_dir: str | Path,
    data: Rows,
    steps: int,
    lr: float,
    out_dir: str | Path,
    *,
    batch_size: int = 32,
    seed: int = 0,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.0,
    max_length: int = 512,
    log_every: int = 0,
    decay: str = "cosine",
    betas: tuple[float, float] = (0.9, 0.98),
    validation: Optional[Rows] = None,
    eval_every: int = 0,
    patience: int = 3,
    plateau_factor: float = 0.3,
    min_gain: float = 0.01,
) -> dict:
    """Supervised fine-tuning of an HF causal LM on (prompt, response) rows: a plain PyTorch AdamW loop,
    cross-entropy on response tokens (and EOS) only, linear warm-up then `decay` ("cosine", "linear" or
    "constant") to zero over `steps`. Writes the model, tokenizer and generation config to `out_dir` and
    returns {"losses": [...], "seconds": ..., "validation": [...]}. `data` is a JSONL path or row dicts.

    With `validation` rows and `eval_every`, the validation loss (mean response-token NLL per row) is
    measured every `eval_every` steps and training stops at a plateau: once `patience` measurements in a
    row failed to beat the best one by more than two standard errors of the paired per-row difference
    (i.e. by more than noise) and by more than `min_gain` of it (a consistent but negligible gain is
    no gain). Each such measurement also cuts the learning rate by `plateau_factor`, so
    that a plateau of a too-large step is not mistaken for the data's: continued SFT at a smaller rate
    gets its chance before training stops. The best measured weights are the ones written; `steps` is
    then a cap."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SpinMegaError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    if steps < 1:
        raise SpinMegaError(f"steps must be at least 1, got {steps}")
    if decay not in ("cosine", "linear", "constant"):
        raise SpinMegaError(f"decay must be cosine, linear or constant, got {decay!r}")
    rows = _rows(data)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()
    examples = _encoded(tokenizer, data, rows, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    val_examples = None
    if validation is not None and eval_every > 0:
        val_examples = [encode_sft_example(tokenizer, r["prompt"], r["response"], max_length) for r in _rows(validation)]

    torch.manual_seed(seed)
    rng = random.Random(seed)
    # One fused kernel per step instead of a dozen elementwise passes over the parameters (CPU and CUDA).
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas, fused=True)
    warmup = max(1, int(warmup_ratio * steps))

    scale = 1.0  # cut at each measurement that brought no gain beyond noise

    def lr_at(step: int) -> float:
        if step < warmup:
            return scale * lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        if decay == "cosine":
            return scale * lr * 0.5 * (1 + math.cos(math.pi * progress))
        return scale * (lr * (1 - progress) if decay == "linear" else lr)

    order: list[int] = []
    losses: list[float] = []
    history: list[dict] = []
    best: Optional[tuple[list[float], dict, int]] = None  # per-row NLL, weights, step
    stale = 0
    for step in range(steps):
        if len(order) < batch_size:
            # Epochs are reshuffled and concatenated, so every row is seen before any repeats.
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = [examples[i] for i in order[:batch_size]]
        del order[:batch_size]
        input_ids, labels, mask = _batch_tensors(batch, pad_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"sft step {step + 1}/{steps} loss {losses[-1]:.4f} lr {lr_at(step):.2e}", flush=True)
        if val_examples is not None and (step + 1) % eval_every == 0:
            per_row = response_nll(model, val_examples, pad_id)
            mean = sum(per_row) / len(per_row)
            improved = best is None
            if best is not None:
                diffs = [b - c for b, c in zip(best[0], per_row)]
                gain = sum(diffs) / len(diffs)
                se = (sum((d - gain) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
                improved = gain > max(2 * se, min_gain * sum(best[0]) / len(best[0]))
            recent = losses[-eval_every:]
            history.append({"step": step + 1, "validation_nll": mean, "train_nll": sum(recent) / len(recent),
                            "improved": bool(improved), "lr": lr_at(step)})
            if log_every:
                print(f"sft step {step + 1}: validation nll {mean:.4f} (train {history[-1]['train_nll']:.4f})"
                      f"{'' if improved else ' - no gain beyond noise'}", flush=True)
            if improved:
                best = (per_row, {k: v.detach().clone() for k, v in model.state_dict().items()}, step + 1)
                stale = 0
            else:
                stale += 1
                scale *= plateau_factor
                if stale >= patience:
                    break
    if best is not None:
        model.load_state_dict(best[1])

    model.eval()
    seconds = time.perf_counter() - start
    info = {"kind": "sft", "base": str(model_dir), "steps": len(losses), "lr": lr, "batch_size": batch_size, "seed": seed,
            "rows": len(rows), "final_loss": losses[-1], "seconds": round(seconds, 2), "decay": decay,
            "validation": history, "kept_step": best[2] if best is not None else len(losses)}
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / BUILD_INFO, info)
    return {"losses": losses, "seconds": seconds, "out_dir": str(out_dir), "validation": history,
            "kept_step": info["kept_step"]}


def _complete(path: Path, kind: str) -> bool:
    info = path / BUILD_INFO
    if not info.is_file():
        return False
    try:
        return json.loads(info.read_text()).get("kind") == kind
    except (OSError, ValueError):
        return False


def build_demo_start_model(
    work_dir: str | Path,
    *,
    seed: int = 0,
    sft_steps: int = 300,
    sft_lr: float = 3e-3,
    sft_batch_size: int = 32,
    num_layers: int = 2,
    log_every: int = 0,
    validation: Optional[Rows] = None,
    eval_every: int = 0,
    patience: int = 3,
) -> Path:
    """Tokenizer, random model and SFT warm-up under `work_dir` (tokenizer/, random/, sft/), reusing
    whichever of them a previous call finished. Returns the SFT model directory: the demo's θ0. With
    `validation` rows and `eval_every`, the SFT runs at a constant learning rate after warm-up and stops at
    its validation plateau (`sft_warmup`); `sft_steps` is then a cap."""
    work_dir = Path(work_dir)
    tok_dir, random_dir, sft_dir = work_dir / "tokenizer", work_dir / "random", work_dir / "sft"
    if not _complete(tok_dir, "tokenizer"):
        build_tokenizer(tok_dir)
    if not _complete(random_dir, "random"):
        build_tiny_model(random_dir, tok_dir, seed=seed, num_layers=num_layers)
    if not _complete(sft_dir, "sft"):
        plateau = validation is not None and eval_every > 0
        sft_warmup(random_dir, asset_path("train"), sft_steps, sft_lr, sft_dir,
                   batch_size=sft_batch_size, seed=seed, log_every=log_every,
                   decay="constant" if plateau else "cosine", warmup_ratio=0.05 if plateau else 0.1,
                   validation=validation, eval_every=eval_every, patience=patience)
    return sft_dir
