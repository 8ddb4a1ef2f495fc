"""HF -> Megatron -> HF conversion: bit-exact round trips (TP=1, and resharded through real TP=2 / PP=2
models), logits parity of the converted Megatron model with the HF model, and the exported directory in
transformers."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conv_testlib import ARCH_CONFIGS, VOCAB, assert_same_tensors, read_safetensors_dir, save_hf_model, token_batch

from spin_mega.conversion import hf_to_mcore, mcore_to_hf
from spin_mega.conversion.mappings import ARCHITECTURES, Dims, qkv_interleave
from spin_mega.config import ModelConfig

ARCHS = list(ARCH_CONFIGS)
WORKER = Path(__file__).with_name("conv_mcore_worker.py")
# The layouts the worker re-saves from: TP 2, PP 2, PP 2 split [3, 1], PP 2 x VPP 2 (chunks of one layer).
LAYOUTS = ("tp2", "pp2", "pp2_uneven", "pp2_vpp2")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """Per architecture: the HF model, its directory, its converted checkpoint and its reference logits."""
    root = tmp_path_factory.mktemp("conversion")
    tokens = token_batch()
    torch.save(tokens, root / "tokens.pt")
    out = {}
    for arch in ARCHS:
        hf_dir = root / arch / "hf"
        model = save_hf_model(arch, hf_dir)
        with torch.no_grad():
            logits = model(tokens).logits
        mcore = hf_to_mcore(hf_dir, root / arch / "mcore")
        out[arch] = {"hf": hf_dir, "mcore": mcore, "logits": logits, "root": root / arch}
    out["tokens"] = root / "tokens.pt"
    return out


@pytest.fixture(scope="module")
def megatron_runs(sources) -> dict:
    """The converted checkpoints loaded into Megatron models at TP=1, TP=2 and PP=2 (2 gloo ranks), with
    logits and re-saved checkpoints; then exported back to HF."""
    tasks = []
    for i, arch in enumerate(ARCHS):
        out = sources[arch]["root"] / "megatron"
        out.mkdir()
        task = {"checkpoint": str(sources[arch]["mcore"]), "tokens": str(sources["tokens"]), "out": str(out)}
        if i == 0:
            task["hf"] = str(sources[arch]["hf"])
        tasks.append(task)
    job = sources[ARCHS[0]]["root"].parent / "job.json"
    job.write_text(json.dumps({"world_size": 2, "tasks": tasks}))
    result = subprocess.run(
        [sys.executable, "-W", "ignore", str(WORKER), str(job)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    runs = {}
    for arch, task in zip(ARCHS, tasks, strict=True):
        out = Path(task["out"])
        for layout in LAYOUTS:
            mcore_to_hf(out / layout, out / f"hf_{layout}")
        runs[arch] = out
    return runs


@pytest.mark.parametrize("arch", ARCHS)
def test_roundtrip_tp1_is_bit_exact(sources, tmp_path, arch):
    # A small shard limit makes the export write several shards and an index with more than one file.
    exported = mcore_to_hf(sources[arch]["mcore"], tmp_path / "hf", max_shard_bytes=1 << 20)
    assert_same_tensors(sources[arch]["hf"], exported)
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_single_file_checkpoint(tmp_path):
    hf_dir = tmp_path / "hf"
    save_hf_model("mistral", hf_dir, max_shard_size="1GB")
    assert (hf_dir / "model.safetensors").is_file()
    assert_same_tensors(hf_dir, mcore_to_hf(hf_to_mcore(hf_dir, tmp_path / "mcore"), tmp_path / "out"))


def test_tied_embeddings_store_no_output_layer(sources):
    metadata = pickle.loads((sources["qwen2"]["mcore"] / "model" / ".metadata").read_bytes())
    assert "output_layer.weight" not in metadata.state_dict_metadata
    assert "lm_head.weight" not in read_safetensors_dir(sources["qwen2"]["hf"])


@pytest.mark.parametrize("arch", ARCHS)
def test_vocab_padding_is_zero_filled(sources, arch):
    from spin_mega.conversion.dist_ckpt import CheckpointReader

    reader = CheckpointReader(sources[arch]["mcore"] / "model")
    embedding = reader.read("embedding.word_embeddings.weight", (0, 0), (1152, ARCH_CONFIGS[arch]["hidden_size"]))
    assert torch.count_nonzero(embedding[VOCAB:]) == 0
    assert torch.equal(embedding[:VOCAB], read_safetensors_dir(sources[arch]["hf"])["model.embed_tokens.weight"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_roundtrip_keeps_dtype(tmp_path, dtype):
    hf_dir = tmp_path / "hf"
    save_hf_model("qwen2", hf_dir, dtype=dtype)
    mcore = hf_to_mcore(hf_dir, tmp_path / "mcore")
    meta = json.loads((mcore / "spin_mega_model.json").read_text())
    assert meta["dtype"] == {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    exported = mcore_to_hf(mcore, tmp_path / "out")
    assert_same_tensors(hf_dir, exported)
    assert json.loads((exported / "config.json").read_text())["torch_dtype"] == meta["dtype"]


def test_dtype_override_upcasts_exactly(sources, tmp_path):
    source = read_safetensors_dir(sources["mistral"]["hf"])
    mcore = hf_to_mcore(sources["mistral"]["hf"], tmp_path / "mcore", dtype="bfloat16")
    exported = read_safetensors_dir(mcore_to_hf(mcore, tmp_path / "hf"))
    for name, tensor in source.items():
        assert exported[name].dtype == torch.bfloat16
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name


def test_qkv_layout_is_megatrons_gqa_interleave():
    # 8 query heads in 2 groups, head_dim 1: rows are [q0 q1 q2 q3 k0 v0 | q4 q5 q6 q7 k1 v1].
    dims = Dims.of(ModelConfig(num_attention_heads=8, num_query_groups=2, head_dim=1, hidden_size=8), 512)
    rows, segments = qkv_interleave(dims)
    assert rows == 12
    rule = next(r for r in ARCHITECTURES["llama"].rules if r.mcore.endswith("linear_qkv.bias"))
    q, k, v = torch.arange(8.0), torch.tensor([100.0, 101.0]), torch.tensor([200.0, 201.0])
    fused = rule.to_mcore(dims, [q, k, v], torch.float32)
    assert fused.tolist() == [0, 1, 2, 3, 100, 200, 4, 5, 6, 7, 101, 201]
    assert [t.tolist() for t in rule.to_hf(dims, fused)] == [q.tolist(), k.tolist(), v.tolist()]


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_and_generates_in_transformers(sources, tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = mcore_to_hf(sources[arch]["mcore"], tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert model.config.tie_word_embeddings == ARCH_CONFIGS[arch]["tie_word_embeddings"]
    tokens = torch.load(sources["tokens"])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, sources[arch]["logits"])
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    prompt = tokenizer("the sea is wide", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4


def test_generation_ids_come_from_the_tokenizer_without_a_conversion_record(sources, tmp_path):
    import shutil

    mcore = tmp_path / "trained"
    shutil.copytree(sources["llama"]["mcore"], mcore)
    (mcore / "conversion.json").unlink()
    exported = mcore_to_hf(mcore, tmp_path / "hf")
    generation = json.loads((exported / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (2, 3, 1)
    assert (exported / "tokenizer.json").is_file()


def test_rope_scaling_survives(sources, tmp_path):
    exported = mcore_to_hf(sources["llama"]["mcore"], tmp_path / "hf")
    config = json.loads((exported / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert config["rope_scaling"]["original_max_position_embeddings"] == 64


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_roundtrip_through_resharded_megatron_is_bit_exact(sources, megatron_runs, arch, layout):
    assert_same_tensors(sources[arch]["hf"], megatron_runs[arch] / f"hf_{layout}")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_logits_match_hf(sources, megatron_runs, arch, tp):
    logits = torch.load(megatron_runs[arch] / f"logits_tp{tp}.pt")
    reference = sources[arch]["logits"]
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max().item() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_converted_checkpoint_has_megatrons_own_layout(sources, megatron_runs, arch):
    """Same keys, global shapes and dtypes as the checkpoint Megatron itself saves for the model (at TP=2 the
    vocabulary is padded further, which Megatron's loader tolerates, so there only the keys must agree)."""

    def layout(path: Path) -> dict:
        metadata = pickle.loads((path / "model" / ".metadata").read_bytes()).state_dict_metadata
        return {
            k: (tuple(getattr(v, "size", ())), getattr(getattr(v, "properties", None), "dtype", None))
            for k, v in metadata.items()
        }

    converted = layout(sources[arch]["mcore"])
    # Interleaved and uneven stages save the same global tensors: layer numbers do not depend on the split.
    for pipeline_layout in ("pp2", "pp2_uneven", "pp2_vpp2"):
        assert converted == layout(megatron_runs[arch] / pipeline_layout), pipeline_layout
    assert converted.keys() == layout(megatron_runs[arch] / "tp2").keys()


@pytest.mark.slow
def test_conversion_inside_an_initialized_process(sources, megatron_runs):
    arch = ARCHS[0]
    assert_same_tensors(sources[arch]["hf"], megatron_runs[arch] / "initialized_hf")
