"""Config loading: typed dataclasses, --set overrides, clear errors naming the dotted key."""

from __future__ import annotations

import pytest

from spin_mega.config import load_config, per_iteration
from spin_mega.errors import ConfigError
from tests.support import REPO


def test_shipped_configs_load():
    tiny = load_config(REPO / "configs" / "tiny-cpu.yaml")
    assert tiny.model.head_dim >= 64  # vLLM's CPU attention needs it
    paper = load_config(REPO / "configs" / "zephyr-7b-spin.yaml")
    assert paper.optim.optimizer == "rmsprop" and paper.train.global_batch_size == 64
    assert paper.iterations.lr == [5e-7, 5e-7, 1e-7, 1e-7]


def test_overrides_are_typed():
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", ["optim.lr=1e-7", "train.opponent=fused", "iterations.beta=[0.1, 5.0]"])
    assert cfg.optim.lr == 1e-7 and cfg.train.opponent == "fused" and cfg.iterations.beta == [0.1, 5.0]
    assert per_iteration(cfg.iterations.beta, 7) == 5.0


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.micro_batchsize=2", "train.micro_batchsize"),
        ("optim.lr=fast", "optim.lr"),
        ("train.opponent=both", "train.opponent"),
        ("parallel.tensor_parallel=1.5", "parallel.tensor_parallel"),
        ("nonsense", "dotted.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(REPO / "configs" / "tiny-cpu.yaml", [override])


def test_inconsistent_values_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="max_prompt_length"):
        load_config(None, ["data.max_prompt_length=600", "data.max_length=512"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2]\n")
    with pytest.raises(ConfigError, match="model"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_paper_preset_is_the_authors_setting():
    cfg = load_config("paper")
    assert cfg == load_config(REPO / "configs" / "zephyr-7b-spin-paper.yaml")
    g = cfg.generation
    assert (g.temperature, g.top_p, g.max_new_tokens) == (0.0, 1.0, 256)
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (1024, 512)
    assert cfg.data.system_prompt == "" and cfg.data.add_bos == "auto"
    assert cfg.optim.optimizer == "rmsprop" and cfg.optim.weight_decay == 0.0
    assert cfg.iterations.lr == [5e-7, 5e-7, 1e-7, 1e-7] and cfg.iterations.beta == [0.1, 0.1, 0.1, 5.0]
    assert cfg.train.epochs == 2 and cfg.train.global_batch_size == 64 and cfg.iterations.num_prompts == 50000
    assert cfg.eval.lm_eval_tasks == ["open_llm_leaderboard_v1"] and not cfg.iterations.resample_prompts
    # The vLLM-script alternative documented in the README and the file.
    alt = load_config("paper", ["generation.temperature=1.0", "generation.top_p=1.0"])
    assert (alt.generation.temperature, alt.generation.top_p) == (1.0, 1.0)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["loss.loss_type=ipo", "loss.label_smoothing=0.1"], "the ipo loss has no smoothed form"),
        (["loss.loss_type=hinge", "loss.label_smoothing=0.1"], "the hinge loss has no smoothed form"),
        (["loss.loss_type=robust"], "with 0 it is the logistic loss"),
        (["loss.label_smoothing=0.5"], r"loss\.label_smoothing must be in \[0, 0\.5\)"),
        (["loss.label_smoothing=-0.1"], r"loss\.label_smoothing must be in \[0, 0\.5\)"),
        (["loss.sft_weight=-1"], r"loss\.sft_weight must be zero or positive"),
    ],
)
def test_loss_combinations_that_make_no_sense_are_refused(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(REPO / "configs" / "tiny-cpu.yaml", overrides)


def test_loss_combinations_that_exist_load():
    for overrides in (
        ["loss.loss_type=logistic", "loss.label_smoothing=0.1"],
        ["loss.loss_type=robust", "loss.label_smoothing=0.2", "loss.sft_weight=0.5"],
        ["loss.loss_type=ipo", "loss.sft_weight=1.0"],
        ["loss.loss_type=hinge", "loss.sft_weight=0.1"],
    ):
        cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", overrides)
        assert cfg.loss.loss_type == overrides[0].split("=")[1]
