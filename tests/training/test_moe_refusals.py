"""Mixture-of-experts layouts and configs that cannot work are refused by `spin-mega train` and `spin-mega convert`
with one sentence naming the constraint and exit status 2, before any process group exists. Only config.json
is read for that, so the model directories here hold nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from tests.support import REPO

QWEN3_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 400, "hidden_size": 64,
    "intermediate_size": 128, "moe_intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True,
    "router_aux_loss_coef": 0.001, "max_position_embeddings": 256, "hidden_act": "silu",
}
LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 400, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "hidden_act": "silu",
}


def _model_dir(root: Path, config: dict, **changes) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps({**config, **changes}))
    return root


def _cli(capsys, *argv: str) -> str:
    from spin_mega.cli import main

    with pytest.raises(SystemExit) as done:
        main(list(argv))
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not dist.is_initialized()  # refused before any process group
    return err


def _train(capsys, tmp_path: Path, start: Path, *extra: str) -> str:
    config = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    config["start_model"] = str(start)
    pairs = tmp_path / "pairs.jsonl"
    # The input checks come first (a missing file is its own refusal): one well-formed pair.
    pairs.write_text(json.dumps({"prompt_id": "0", "prompt": "2 + 2?", "chosen": "4", "rejected": "5"}) + "\n")
    config["data"]["train_path"] = str(pairs)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return _cli(capsys, "train", str(path), "--workdir", str(tmp_path / "w"), *extra)


@pytest.mark.parametrize("changes, extra, message", [
    ({}, ["--ep", "3"], "expert parallel 3 must divide the model's 4 experts"),
    ({"num_experts_per_tok": 6}, [], "top-k routing to 6 experts needs between 1 and the model's 4 experts"),
    ({"model_type": "deepseek_v3"}, [], "model_type 'deepseek_v3' is not supported"),
    ({}, ["--tp", "2", "--set", "parallel.sequence_parallel=false"],
     "a mixture-of-experts model at tensor parallel 2 needs parallel.sequence_parallel: true"),
    ({}, ["--set", "parallel.expert_tensor_parallel=5"], "expert tensor parallel 5 must divide each expert's hidden size 48"),
])
def test_train_refuses(capsys, tmp_path, changes, extra, message):
    start = _model_dir(tmp_path / "start", QWEN3_MOE, **changes)
    assert message in _train(capsys, tmp_path, start, *extra)


def test_train_refuses_expert_parallel_for_a_dense_model(capsys, tmp_path):
    start = _model_dir(tmp_path / "start", LLAMA)
    assert "expert parallel 2 x expert tensor parallel 1 needs a mixture-of-experts model" in _train(
        capsys, tmp_path, start, "--ep", "2"
    )


@pytest.mark.parametrize("changes, extra, message", [
    ({}, ["--ep", "3"], "expert parallel 3 must divide the model's 4 experts"),
    ({"num_experts_per_tok": 5}, [], "top-k routing to 5 experts needs between 1 and the model's 4 experts"),
    ({"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"]}, [],
     "architecture 'olmoe' is not supported by the converter"),
    ({"architectures": ["Qwen3MoeForSequenceClassification"]}, [],
     "architecture 'Qwen3MoeForSequenceClassification' is not supported"),
    ({"mlp_only_layers": [1]}, [], "every layer must be a mixture of experts"),
])
def test_convert_refuses(capsys, tmp_path, changes, extra, message):
    hf = _model_dir(tmp_path / "hf", QWEN3_MOE, **changes)
    err = _cli(capsys, "convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "out"), *extra)
    assert message in err
    assert not (tmp_path / "out").exists()
