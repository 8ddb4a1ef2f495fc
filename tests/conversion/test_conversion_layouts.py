"""Qwen3 and mixture-of-experts checkpoints (Qwen3-MoE, Mixtral): HF -> Megatron -> HF round trips that are
bit-exact directly and through Megatron models resharded over 4 gloo ranks (Qwen3 at TP 2 x PP 2, evenly and
unevenly split; MoE at expert parallel 2, with TP 2 beside EP 2, with each expert split over expert-TP 2, and
EP 2 x PP 2), and the Megatron models' log-probs against transformers' at EP 1 and EP 2."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conv_testlib import MOE_CONFIGS, VOCAB, assert_same_tensors, read_safetensors_dir, save_hf_model, token_batch

from spin_mega.conversion import hf_to_mcore, mcore_to_hf
from spin_mega.parallel.distributed import free_port

WORKER = Path(__file__).with_name("conv_layout_worker.py")
MOE_ARCHS = list(MOE_CONFIGS)
WORLD = 4


def _layout(name: str, tp: int = 1, pp: int = 1, ep: int = 1, etp: int = 1, first_stage_layers=None, logits=False) -> dict:
    return dict(name=name, tp=tp, pp=pp, ep=ep, etp=etp, first_stage_layers=first_stage_layers, logits=logits)


# Per model: the layouts the worker loads the converted checkpoint into (the rest of the 4 ranks is data
# parallelism), re-saves from, and, where marked, reads logits at.
LAYOUTS = {
    # 4 layers: [2, 2] and [3, 1] over the two stages, each stage's layers split over TP 2.
    "qwen3": [_layout("tp2_pp2", tp=2, pp=2), _layout("tp2_pp2_uneven", tp=2, pp=2, first_stage_layers=3)],
    "qwen3_moe": [
        _layout("ep1", logits=True),
        _layout("ep2", ep=2, logits=True),
        _layout("ep2_tp2", tp=2, ep=2, logits=True),
        _layout("ep2_tp2_etp2", tp=2, ep=2, etp=2, logits=True),
        _layout("ep2_pp2", pp=2, ep=2),
    ],
    "mixtral": [
        _layout("ep1", logits=True),
        _layout("ep2", ep=2, logits=True),
        _layout("ep2_tp2_etp2", tp=2, ep=2, etp=2, logits=True),
        _layout("ep2_pp2", pp=2, ep=2),
    ],
}
RESAVED = [(arch, layout["name"]) for arch, layouts in LAYOUTS.items() for layout in layouts]
WITH_LOGITS = [(arch, layout["name"]) for arch, layouts in LAYOUTS.items() for layout in layouts if layout["logits"]]
# Log-probs of fp32 models: Megatron's and transformers' kernels order their sums differently; measured
# differences stay below 3e-7 (logits of magnitude ~1).
LOGPROB_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """Per model: the HF model's directory, its converted checkpoint and its log-probs of the test tokens."""
    root = tmp_path_factory.mktemp("conversion_layouts")
    tokens = token_batch()
    torch.save(tokens, root / "tokens.pt")
    out = {"tokens": root / "tokens.pt", "root": root}
    for arch in LAYOUTS:
        hf_dir = root / arch / "hf"
        model = save_hf_model(arch, hf_dir)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(tokens).logits.double(), dim=-1)
        out[arch] = {"hf": hf_dir, "mcore": hf_to_mcore(hf_dir, root / arch / "mcore"), "logprobs": logprobs}
    return out


@pytest.fixture(scope="module")
def megatron_runs(sources) -> dict:
    """Every layout of LAYOUTS loaded, re-saved and (where marked) scored by 4 torchrun ranks on gloo; each
    re-saved checkpoint exported back to HF."""
    tasks = []
    for arch, layouts in LAYOUTS.items():
        out = sources["root"] / arch / "megatron"
        out.mkdir()
        tasks.append({"checkpoint": str(sources[arch]["mcore"]), "tokens": str(sources["tokens"]), "out": str(out),
                      "layouts": layouts})
    job = sources["root"] / "job.json"
    job.write_text(json.dumps({"tasks": tasks}))
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}",
         f"--master-port={free_port()}", str(WORKER), str(job)],
        capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    runs = {}
    for arch, task in zip(LAYOUTS, tasks, strict=True):
        out = Path(task["out"])
        for layout in LAYOUTS[arch]:
            mcore_to_hf(out / layout["name"], out / f"hf_{layout['name']}")
        runs[arch] = out
    return runs


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_roundtrip_is_bit_exact(sources, tmp_path, arch):
    exported = mcore_to_hf(sources[arch]["mcore"], tmp_path / "hf", max_shard_bytes=1 << 18)
    assert_same_tensors(sources[arch]["hf"], exported)
    config = json.loads((exported / "config.json").read_text())
    source = MOE_CONFIGS[arch]
    experts = config.get("num_experts", config.get("num_local_experts"))
    assert (config["model_type"], experts, config["num_experts_per_tok"]) == (arch, 4, 2)
    assert config["router_aux_loss_coef"] == source["router_aux_loss_coef"]
    if arch == "qwen3_moe":
        assert config["norm_topk_prob"] is False and config["moe_intermediate_size"] == 48


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_experts_are_stored_one_chunk_per_expert(sources, arch):
    """Megatron's global expert tensors [layers, experts, rows, columns], written one (layer, expert) chunk
    at a time: what lets the converters stream expert by expert and any EP layout load its share."""
    metadata = pickle.loads((sources[arch]["mcore"] / "model" / ".metadata").read_bytes()).state_dict_metadata
    fc1 = metadata["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
    fc2 = metadata["decoder.layers.mlp.experts.experts.linear_fc2.weight"]
    assert tuple(fc1.size) == (2, 4, 2 * 48, 64) and tuple(fc2.size) == (2, 4, 64, 48)
    assert sorted(tuple(c.offsets) for c in fc1.chunks) == [(i, e, 0, 0) for i in range(2) for e in range(4)]
    assert all(tuple(c.sizes) == (1, 1, 96, 64) for c in fc1.chunks)
    assert tuple(metadata["decoder.layers.mlp.router.weight"].size) == (2, 4, 64)
    assert "decoder.layers.pre_mlp_layernorm.weight" in metadata
    hf = read_safetensors_dir(sources[arch]["hf"])
    from spin_mega.conversion.dist_ckpt import CheckpointReader

    gate, up = ("gate_proj", "up_proj") if arch == "qwen3_moe" else ("w1", "w3")
    block = "mlp" if arch == "qwen3_moe" else "block_sparse_moe"
    expert = CheckpointReader(sources[arch]["mcore"] / "model").read(
        "decoder.layers.mlp.experts.experts.linear_fc1.weight", (1, 2, 0, 0), (1, 1, 96, 64)
    )[0, 0]
    # Megatron's SwiGLU order: the gate's rows, then the up projection's.
    assert torch.equal(expert[:48], hf[f"model.layers.1.{block}.experts.2.{gate}.weight"])
    assert torch.equal(expert[48:], hf[f"model.layers.1.{block}.experts.2.{up}.weight"])


def test_hf_to_mcore_streams_expert_by_expert(sources, tmp_path, monkeypatch):
    """Each Megatron chunk is made from one expert's HF tensors (gate and up, or down), and every chunk written
    before it has been freed by then (tests/conversion/test_conversion_memory.py's check, here through the
    real converter): the memory held is about one expert, whatever the number of experts per layer."""
    from spin_mega.conversion import converters

    produced: list[torch.Tensor] = []
    reads: list[list[str]] = []
    live_at_produce: list[int] = []
    real_produce = converters._produce

    def produce(rule, dims, reader, names, dtype, stacked):
        live_at_produce.append(sum(t.untyped_storage().nbytes() for t in produced))
        reads.append(list(names))
        tensor = real_produce(rule, dims, reader, names, dtype, stacked)
        produced.append(tensor)
        return tensor

    monkeypatch.setattr(converters, "_produce", produce)
    hf_to_mcore(sources["qwen3_moe"]["hf"], tmp_path / "mcore")
    assert live_at_produce == [0] * len(reads)
    expert_reads = [names for names in reads if ".experts." in names[0]]
    assert len(expert_reads) == 2 * 4 * 2  # layers x experts x (fc1, fc2)
    for names in expert_reads:
        assert len({name.split(".experts.")[1].split(".")[0] for name in names}) == 1, names


def test_mcore_to_hf_reads_expert_by_expert(sources, tmp_path, monkeypatch):
    from spin_mega.conversion import dist_ckpt

    boxes: list[tuple[str, tuple[int, ...]]] = []
    real_read = dist_ckpt.CheckpointReader.read

    def read(self, key, offsets, sizes):
        boxes.append((key, tuple(sizes)))
        return real_read(self, key, offsets, sizes)

    monkeypatch.setattr(dist_ckpt.CheckpointReader, "read", read)
    assert_same_tensors(sources["mixtral"]["hf"], mcore_to_hf(sources["mixtral"]["mcore"], tmp_path / "hf"))
    expert_boxes = [sizes for key, sizes in boxes if ".experts." in key]
    assert len(expert_boxes) == 2 * 4 * 2 and all(sizes[:2] == (1, 1) for sizes in expert_boxes)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_export_scores_as_the_source_in_transformers(sources, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mcore_to_hf(sources[arch]["mcore"], tmp_path / "hf")).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.load(sources["tokens"])).logits.double(), dim=-1)
    assert torch.equal(logprobs, sources[arch]["logprobs"])


@pytest.mark.slow
@pytest.mark.parametrize("arch, layout", RESAVED)
def test_roundtrip_through_resharded_megatron_is_bit_exact(sources, megatron_runs, arch, layout):
    assert_same_tensors(sources[arch]["hf"], megatron_runs[arch] / f"hf_{layout}")


@pytest.mark.slow
@pytest.mark.parametrize("arch, layout", WITH_LOGITS)
def test_megatron_logprobs_match_transformers(sources, megatron_runs, arch, layout):
    """The next-token log-probs of the test tokens (2 x 96) under the Megatron model at this layout, against
    transformers' forward of the source model, in fp32."""
    tokens = torch.load(sources["tokens"])
    logits = torch.load(megatron_runs[arch] / f"logits_{layout}.pt")
    assert logits.shape == (*tokens.shape, VOCAB)
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    reference = sources[arch]["logprobs"]
    targets = tokens[:, 1:].unsqueeze(-1)
    ours = logprobs[:, :-1].gather(-1, targets)
    theirs = reference[:, :-1].gather(-1, targets)
    assert (ours - theirs).abs().max().item() <= LOGPROB_TOLERANCE
    assert (logprobs - reference).abs().max().item() <= LOGPROB_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_converted_moe_checkpoint_has_megatrons_own_layout(sources, megatron_runs, arch):
    """The same keys, global shapes and dtypes as the checkpoint Megatron itself saves from the model at
    EP 2 x PP 2 (expert extra-state objects included: a checkpoint missing one does not load)."""

    def layout(path: Path) -> dict:
        metadata = pickle.loads((path / "model" / ".metadata").read_bytes()).state_dict_metadata
        return {
            k: (tuple(getattr(v, "size", ())), getattr(getattr(v, "properties", None), "dtype", None))
            for k, v in metadata.items()
        }

    assert layout(sources[arch]["mcore"]) == layout(megatron_runs[arch] / "ep2_pp2")
