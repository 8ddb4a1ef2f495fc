"""Hugging Face <-> spin-mega Megatron checkpoint conversion, streaming one tensor at a time.

Both directions are plain functions of directories. They run in the calling process alone (no
collectives): call them from one rank, before or after `spin_mega.parallel.distributed.initialize`.
The output directory appears complete or not at all (`atomic_directory`); an existing one is replaced only
after the new one is complete.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import functools
import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from spin_mega.config import ModelConfig
from spin_mega.conversion import dist_ckpt
from spin_mega.conversion.heap import trim_heap
from spin_mega.conversion.mappings import Architecture, Dims, Rule, architecture, sharded_object_key
from spin_mega.conversion.safetensors_io import (
    CODE_DTYPES,
    DTYPE_CODES,
    INDEX_NAME,
    SafetensorsReader,
    StreamingShardWriter,
    plan_shards,
    shard_name,
)
from spin_mega.errors import ConfigError, SpinMegaError
from spin_mega.io import atomic_directory, atomic_write_json

# The record hf-to-mcore leaves beside the checkpoint: the source's config and generation config (for
# export) and the suggested TP x PP layout. Training checkpoints may lack it; export then works from the
# model config and the tokenizer alone.
CONVERSION_RECORD = "conversion.json"

DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "spiece.model",
    "sentencepiece*.model",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates",
)

# Files of an exported HF directory that are written from the checkpoint, never copied from a tokenizer.
_GENERATED = ("config.json", "generation_config.json", "model*.safetensors", INDEX_NAME)

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

Pathish = Union[str, Path]


@contextlib.contextmanager
def _quiet_megatron():
    """megatron-core warns on import about missing GPU extras and on config construction about deprecated
    defaults; neither concerns a converter, and a CLI error must stay one sentence."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _dtype(value) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in DTYPE_CODES:
            raise ConfigError(f"dtype {value} is not supported; use float32, bfloat16 or float16")
        return value
    name = str(value).lower().removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype {value!r} is not supported; use float32, bfloat16 or float16")
    return DTYPE_NAMES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def _check_distinct(source: Path, out: Path) -> None:
    source, out = source.resolve(), out.resolve()
    if source == out or source in out.parents or out in source.parents:
        raise SpinMegaError(f"the output {out} must lie outside the input {source}, and not contain it")


def _copy_tokenizer_files(source: Path, target: Path, patterns=TOKENIZER_PATTERNS, skip=()) -> list[str]:
    copied = []
    if not source.is_dir():
        return copied
    for entry in sorted(source.iterdir()):
        if not any(fnmatch.fnmatch(entry.name, p) for p in patterns):
            continue
        if any(fnmatch.fnmatch(entry.name, p) for p in skip):
            continue
        target.mkdir(parents=True, exist_ok=True)
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name)
        else:
            shutil.copy2(entry, target / entry.name)
        copied.append(entry.name)
    return copied


def _check_hf_config(hf: dict) -> None:
    from spin_mega.models.hf_config import SUPPORTED_MODEL_TYPES

    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if model_type in SUPPORTED_MODEL_TYPES and architectures and architectures[0] != SUPPORTED_MODEL_TYPES[model_type]:
        raise ConfigError(
            f"architecture {architectures[0]!r} is not supported; the converter handles causal LMs "
            f"({', '.join(SUPPORTED_MODEL_TYPES.values())})"
        )
    if hf.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported (the Megatron model has no MLP biases)")
    if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise ConfigError(
            "use_sliding_window=true is not supported (the Megatron model attends over the full causal window)"
        )


def _units(arch: Architecture, model: ModelConfig, dims: Dims) -> list[tuple[Rule, tuple[int, ...]]]:
    """(rule, index) pairs in the order HF lists a model's tensors: embedding, layer by layer (within a layer,
    expert by expert), the rest. The index is () for a global tensor, (layer,) or (layer, expert). Both
    directions walk it, so reads of sharded files move forward through them, and each expert is one unit: a
    conversion holds one expert's tensors at a time, never a whole MoE layer."""
    rules = arch.active_rules(model)
    first = [(r, ()) for r in rules if not r.per_layer and r.mcore.startswith("embedding.")]
    last = [(r, ()) for r in rules if not r.per_layer and not r.mcore.startswith("embedding.")]
    layers = []
    for i in range(model.num_layers):
        for r in rules:
            if r.per_expert:
                layers += [(r, (i, e)) for e in range(dims.experts)]
            elif r.per_layer:
                layers.append((r, (i,)))
    return first + layers + last


def _validate_hf_tensors(reader: SafetensorsReader, arch: Architecture, model: ModelConfig, dims: Dims) -> torch.dtype:
    """Every tensor the mapping needs is present with the shape config.json implies, and nothing else is
    there. Returns the dtype the checkpoint stores its embedding in."""
    expected: dict[str, tuple[int, ...]] = {}
    for rule in arch.active_rules(model):
        shapes = rule.hf_shapes(dims)
        for index in rule.stack_indices(dims):
            for name, shape in zip(rule.hf_names(*index), shapes, strict=True):
                expected[name] = shape
    for name, shape in expected.items():
        if name not in reader:
            raise ConfigError(f"tensor {name} is missing from the checkpoint in {reader.dir}")
        actual = reader.shape(name)
        if actual != shape:
            raise ConfigError(f"tensor {name} has shape {list(actual)} but config.json implies {list(shape)}")
        code = reader.dtype(name)
        if code not in CODE_DTYPES:
            raise ConfigError(f"tensor {name} is stored as {code}; only F32, BF16 and F16 weights are supported")
    unexpected = [n for n in reader.names() if n not in expected and not arch.is_ignored(n, model)]
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise ConfigError(
            f"tensor {unexpected[0]}{more} in {reader.dir} has no place in a {model.architecture} model "
            f"with this config.json"
        )
    embedding = _units(arch, model, dims)[0][0].hf[0]
    return CODE_DTYPES[reader.dtype(embedding)]


def _produce(rule: Rule, dims: Dims, reader: SafetensorsReader, names: list[str], dtype: torch.dtype, stacked: int):
    tensor = rule.to_mcore(dims, [reader.get(n) for n in names], dtype)
    return tensor.view((1,) * stacked + tuple(tensor.shape))


def hf_to_mcore(
    hf_dir: Pathish,
    out_dir: Pathish,
    tp: int = 1,
    pp: int = 1,
    dtype: Union[str, torch.dtype, None] = None,
    ep: int = 1,
) -> Path:
    """Converts an HF model directory (config.json + safetensors) to a spin-mega Megatron checkpoint at
    `out_dir` that loads at any TP x PP (x EP x expert TP for MoE models) the model can be split into. `tp`,
    `pp` and `ep` are checked against the model and recorded as the suggested layout; `tp` also sets the
    vocabulary padding (a multiple of 128 * tp, as Megatron pads). `dtype` defaults to the checkpoint's own."""
    with _quiet_megatron():
        from spin_mega.models.checkpoint import MODEL_SUBDIR, TOKENIZER_SUBDIR, write_meta
        from spin_mega.models.gpt import padded_vocab_size, transformer_config
    from spin_mega.models.hf_config import model_config_from_hf, read_hf_config

    hf_dir, out_dir, tp, pp, ep = Path(hf_dir), Path(out_dir), int(tp), int(pp), int(ep)
    if not hf_dir.is_dir():
        raise SpinMegaError(f"HF model directory {hf_dir} does not exist")
    _check_distinct(hf_dir, out_dir)
    if tp < 1 or pp < 1 or ep < 1:
        raise ConfigError(f"tensor, pipeline and expert parallel sizes must be at least 1 (got tp={tp}, pp={pp}, ep={ep})")
    hf = read_hf_config(hf_dir)
    _check_hf_config(hf)
    arch = architecture(hf.get("model_type"))
    model = model_config_from_hf(hf)
    target_dtype = _dtype(dtype)
    with _quiet_megatron():
        transformer_config(model, tp, pp, expert_parallel=ep)  # raises ConfigError when the model cannot be split so
    padded = padded_vocab_size(model.vocab_size, tp)
    dims = Dims.of(model, padded)
    reader = SafetensorsReader(hf_dir)
    stored = _validate_hf_tensors(reader, arch, model, dims)
    target_dtype = target_dtype or stored

    entries: list[dist_ckpt.Entry] = []
    for rule, index in _units(arch, model, dims):
        shape = rule.mcore_shape(dims)
        entries.append(
            dist_ckpt.TensorChunk(
                key=rule.mcore,
                global_shape=rule.global_shape(dims),
                offsets=index + (0,) * len(shape),
                sizes=(1,) * len(index) + shape,
                dtype=target_dtype,
                produce=functools.partial(_produce, rule, dims, reader, rule.hf_names(*index), target_dtype, len(index)),
            )
        )
    for layer in range(dims.layers):
        entries += [
            dist_ckpt.ObjectEntry(sharded_object_key(key, (layer,), (dims.layers,)), None)
            for key in arch.mcore_layer_objects
        ]
        entries += [
            dist_ckpt.ObjectEntry(sharded_object_key(key, (layer, expert), (dims.layers, dims.experts)), None)
            for expert in range(dims.experts)
            for key in arch.mcore_expert_objects
        ]

    generation_config = None
    if (hf_dir / "generation_config.json").is_file():
        try:
            generation_config = json.loads((hf_dir / "generation_config.json").read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{hf_dir / 'generation_config.json'} is not valid JSON: {exc}") from None

    with atomic_directory(out_dir) as tmp:
        dist_ckpt.write_checkpoint(tmp / MODEL_SUBDIR, entries)
        write_meta(tmp, model, target_dtype, padded)
        _copy_tokenizer_files(hf_dir, tmp / TOKENIZER_SUBDIR)
        atomic_write_json(
            tmp / CONVERSION_RECORD,
            {
                "source": str(hf_dir.resolve()),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "suggested_layout": {"tensor_parallel": tp, "pipeline_parallel": pp}
                | ({"expert_parallel": ep} if model.is_moe else {}),
                "hf_config": hf,
                "generation_config": generation_config,
            },
        )
    return out_dir


def _tokenizer_ids(tokenizer_dir: Path) -> dict[str, object]:
    if not tokenizer_dir.is_dir() or not any(tokenizer_dir.iterdir()):
        return {}
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:  # tokenizers fail in many ways; the weights are still worth exporting
        warnings.warn(
            f"the tokenizer in {tokenizer_dir} does not load ({exc}); token ids come from the config", stacklevel=3
        )
        return {}
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def _generation_config(record: dict, tokenizer_ids: dict) -> dict:
    """The source's generation config wins (it may list several end tokens, e.g. Llama-3 instruct); the
    tokenizer fills what it leaves out."""
    source = record.get("generation_config") or {}
    source_config = record.get("hf_config") or {}
    # `_from_model_config` would tell transformers to re-derive the file from config.json.
    generation = {k: v for k, v in source.items() if k not in ("transformers_version", "_from_model_config")}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if generation.get(key) is None:
            value = tokenizer_ids.get(key, source_config.get(key))
            if value is not None:
                generation[key] = value
    return generation


def _read_rows(reader: dist_ckpt.CheckpointReader, rule: Rule, index: tuple[int, ...], dims: Dims) -> torch.Tensor:
    """The rows of one layer's (one expert's) Megatron tensor that hold data (vocabulary padding is not read)."""
    lo, hi = rule.mcore_row_span(dims)
    tail = rule.mcore_shape(dims)[1:]
    box = reader.read(rule.mcore, index + (lo,) + (0,) * len(tail), (1,) * len(index) + (hi - lo,) + tail)
    return box.view((hi - lo,) + tail)


def mcore_to_hf(
    mcore_dir: Pathish,
    out_dir: Pathish,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Exports a spin-mega Megatron checkpoint (converted or written by the trainer, saved at any TP x PP)
    to an HF model directory: config.json, sharded safetensors with their index, generation_config.json
    and the tokenizer files. The vocabulary padding is dropped and each tensor keeps its stored dtype."""
    with _quiet_megatron():
        from spin_mega.models.checkpoint import MODEL_SUBDIR, TOKENIZER_SUBDIR, read_meta
    from spin_mega.models.hf_config import hf_config_from_model_config

    mcore_dir, out_dir = Path(mcore_dir), Path(out_dir)
    if not mcore_dir.is_dir():
        raise SpinMegaError(f"Megatron checkpoint directory {mcore_dir} does not exist")
    _check_distinct(mcore_dir, out_dir)
    model, dtype, padded = read_meta(mcore_dir)
    arch = architecture(model.architecture)
    dims = Dims.of(model, padded)
    reader = dist_ckpt.CheckpointReader(mcore_dir / MODEL_SUBDIR)

    units = _units(arch, model, dims)
    stored: dict[str, torch.dtype] = {}
    for rule, _ in units:
        if rule.mcore in stored:
            continue
        meta = reader.tensor_meta(rule.mcore)
        if tuple(meta.size) != rule.global_shape(dims):
            raise SpinMegaError(
                f"{rule.mcore} in {mcore_dir} has shape {list(meta.size)}, but its spin_mega_model.json "
                f"implies {list(rule.global_shape(dims))}"
            )
        if meta.properties.dtype not in DTYPE_CODES:
            raise SpinMegaError(
                f"{rule.mcore} in {mcore_dir} is stored as {meta.properties.dtype}, which HF export does not support"
            )
        stored[rule.mcore] = meta.properties.dtype

    def hf_entries(rule: Rule, index: tuple[int, ...]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        names, shapes = rule.hf_names(*index), rule.hf_shapes(dims)
        return [(name, stored[rule.mcore], shape) for name, shape in zip(names, shapes, strict=True)]

    def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
        return torch.empty((), dtype=dtype).element_size() * math.prod(shape)

    shards = plan_shards(
        [sum(nbytes(dt, shape) for _, dt, shape in hf_entries(*unit)) for unit in units], max_shard_bytes
    )

    record_path = mcore_dir / CONVERSION_RECORD
    try:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise SpinMegaError(f"{record_path} is not valid JSON: {exc}") from None
    tokenizer_dir = mcore_dir / TOKENIZER_SUBDIR
    generation = _generation_config(record, _tokenizer_ids(tokenizer_dir))
    token_ids = {k: generation[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in generation}

    with atomic_directory(out_dir) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        for s, unit_ids in enumerate(shards):
            file = shard_name(s, len(shards))
            writer = StreamingShardWriter(tmp / file, [entry for u in unit_ids for entry in hf_entries(*units[u])])
            try:
                for u in unit_ids:
                    rule, index = units[u]
                    lo, _ = rule.mcore_row_span(dims)
                    tensors = rule.to_hf(dims, _read_rows(reader, rule, index, dims), lo)
                    for name, tensor in zip(rule.hf_names(*index), tensors, strict=True):
                        writer.write(name, tensor)
                        weight_map[name] = file
                    # Freed before the next unit is read, not as its tensors replace these.
                    del tensors, tensor
                    trim_heap()
            except BaseException:
                writer.abort()
                raise
            writer.close()
            total += writer.data_bytes
        atomic_write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        config = hf_config_from_model_config(model, _dtype_name(dtype), extra=token_ids)
        atomic_write_json(tmp / "config.json", config)
        atomic_write_json(tmp / "generation_config.json", generation)
        _copy_tokenizer_files(tokenizer_dir, tmp, patterns=("*",), skip=_GENERATED)
    return out_dir
