"""Bad inputs: one clear error naming what is wrong, and no half-written output left behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conv_testlib import assert_same_tensors, save_hf_model

from spin_mega.conversion import hf_to_mcore, mcore_to_hf
from spin_mega.errors import ConfigError, SpinMegaError
from tests.support import spin_mega


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("conversion_errors")
    hf_dir = root / "hf"
    save_hf_model("llama", hf_dir)
    return {"hf": hf_dir, "mcore": hf_to_mcore(hf_dir, root / "mcore")}


def _copy(source: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(source, tmp_path / name))


def _shards(hf_dir: Path) -> list[Path]:
    return sorted(hf_dir.glob("model-*.safetensors"))


def _edit_config(hf_dir: Path, **changes) -> None:
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_corrupt_shard(good, tmp_path):
    hf_dir = _copy(good["hf"], tmp_path, "hf")
    shard = _shards(hf_dir)[1]
    with open(shard, "r+b") as handle:
        handle.write(b"\xff" * 16)
    with pytest.raises(SpinMegaError, match=f"{shard.name} is not a readable safetensors file"):
        hf_to_mcore(hf_dir, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_truncated_shard(good, tmp_path):
    hf_dir = _copy(good["hf"], tmp_path, "hf")
    shard = _shards(hf_dir)[-1]
    os.truncate(shard, shard.stat().st_size - 64)
    with pytest.raises(SpinMegaError, match=shard.name):
        hf_to_mcore(hf_dir, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_missing_shard(good, tmp_path):
    hf_dir = _copy(good["hf"], tmp_path, "hf")
    shard = _shards(hf_dir)[2]
    shard.unlink()
    with pytest.raises(SpinMegaError, match=f"{shard.name} listed in model.safetensors.index.json is missing"):
        hf_to_mcore(hf_dir, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_no_safetensors(good, tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shutil.copy(good["hf"] / "config.json", hf_dir)
    with pytest.raises(SpinMegaError, match="holds no model.safetensors"):
        hf_to_mcore(hf_dir, tmp_path / "out")


def test_shapes_that_do_not_match_the_config(good, tmp_path):
    hf_dir = _copy(good["hf"], tmp_path, "hf")
    _edit_config(hf_dir, intermediate_size=384)
    with pytest.raises(
        ConfigError, match=r"gate_proj.weight has shape \[512, 256\] but config.json implies \[384, 256\]"
    ):
        hf_to_mcore(hf_dir, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_config_with_more_layers_than_the_weights(good, tmp_path):
    hf_dir = _copy(good["hf"], tmp_path, "hf")
    _edit_config(hf_dir, num_hidden_layers=5)
    with pytest.raises(ConfigError, match=r"tensor model\.layers\.4\..* is missing"):
        hf_to_mcore(hf_dir, tmp_path / "out")


def test_weights_the_config_has_no_place_for(good, tmp_path):
    hf_dir = _copy(good["hf"], tmp_path, "hf")
    _edit_config(hf_dir, num_hidden_layers=3)
    with pytest.raises(ConfigError, match=r"model\.layers\.3\..* has no place in a llama model"):
        hf_to_mcore(hf_dir, tmp_path / "out")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "gpt2"}, "architecture 'gpt2' is not supported"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "'LlamaForSequenceClassification' is not supported"),
        ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ],
)
def test_unsupported_models(good, tmp_path, changes, message):
    hf_dir = _copy(good["hf"], tmp_path, "hf")
    _edit_config(hf_dir, **changes)
    with pytest.raises(ConfigError, match=message):
        hf_to_mcore(hf_dir, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_layout_the_model_cannot_take(good, tmp_path):
    with pytest.raises(ConfigError, match="tensor parallel 4 must divide"):
        hf_to_mcore(good["hf"], tmp_path / "out", tp=4)
    # Uneven splits are accepted (4 layers at PP 3 -> [2, 1, 1]); a stage without layers is not.
    with pytest.raises(ConfigError, match="pipeline parallel 64 would leave a stage with no layers"):
        hf_to_mcore(good["hf"], tmp_path / "out", pp=64)
    with pytest.raises(ConfigError, match="dtype 'int8' is not supported"):
        hf_to_mcore(good["hf"], tmp_path / "out", dtype="int8")


def test_a_failed_conversion_keeps_the_previous_output(good, tmp_path):
    hf_dir = _copy(good["hf"], tmp_path, "hf")
    _edit_config(hf_dir, intermediate_size=384)
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous").write_text("kept")
    with pytest.raises(ConfigError):
        hf_to_mcore(hf_dir, out)
    assert (out / "previous").read_text() == "kept"


def test_output_inside_the_input_is_refused(good):
    with pytest.raises(SpinMegaError, match="must lie outside the input"):
        mcore_to_hf(good["mcore"], good["mcore"] / "hf")


def test_megatron_checkpoint_missing_its_data(good, tmp_path):
    mcore = _copy(good["mcore"], tmp_path, "mcore")
    for data in (mcore / "model").glob("*.distcp"):
        data.unlink()
    with pytest.raises(SpinMegaError, match="cannot read .* from the Megatron checkpoint"):
        mcore_to_hf(mcore, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_megatron_checkpoint_that_disagrees_with_its_meta(good, tmp_path):
    mcore = _copy(good["mcore"], tmp_path, "mcore")
    meta_path = mcore / "spin_mega_model.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["ffn_hidden_size"] = 384
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(
        SpinMegaError,
        match=r"linear_fc1.weight in .* has shape \[4, 1024, 256\], but its spin_mega_model.json implies "
        r"\[4, 768, 256\]",
    ):
        mcore_to_hf(mcore, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_not_a_megatron_checkpoint(good, tmp_path):
    with pytest.raises(SpinMegaError, match="is not a spin-mega Megatron checkpoint"):
        mcore_to_hf(good["hf"], tmp_path / "out")


def test_cli_converts_both_ways(good, tmp_path):
    from spin_mega.cli import main

    with pytest.raises(SystemExit) as done:
        main(
            [
                "convert",
                "hf-to-mcore",
                "--hf",
                str(good["hf"]),
                "--out",
                str(tmp_path / "mcore"),
                "--tp",
                "2",
                "--pp",
                "2",
            ]
        )
    assert done.value.code == 0
    record = json.loads((tmp_path / "mcore" / "conversion.json").read_text())
    assert record["suggested_layout"] == {"tensor_parallel": 2, "pipeline_parallel": 2}
    with pytest.raises(SystemExit) as done:
        main(["convert", "mcore-to-hf", "--mcore", str(tmp_path / "mcore"), "--out", str(tmp_path / "hf")])
    assert done.value.code == 0
    assert_same_tensors(good["hf"], tmp_path / "hf")


def test_cli_reports_one_sentence_and_fails(good, tmp_path):
    hf_dir = _copy(good["hf"], tmp_path, "hf")
    _edit_config(hf_dir, model_type="gpt2")
    result = spin_mega("convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "out"), timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("spin-mega convert: error: architecture 'gpt2' is not supported")
    _assert_nothing_written(tmp_path / "out")
