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
        (["loss.label_smoothing=0.5"], r"loss\.label_smoothing is 0\.5 but must be in \[0, 0\.5\)"),
        (["loss.label_smoothing=-0.1"], r"loss\.label_smoothing is -0\.1 but must be in \[0, 0\.5\)"),
        (["loss.sft_weight=-1"], r"loss\.sft_weight is -1\.0 but must be 0 or more"),
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


# ---- numeric ranges: every key refused out of range at load, in one sentence naming it ------------------

def _numeric_keys() -> dict[str, tuple[type, bool]]:
    """Every int / float key of SpinConfig, optional ones and lists of numbers included: (type, is a list)."""
    import dataclasses
    import typing

    from spin_mega.config import SpinConfig

    keys = {}
    for section in dataclasses.fields(SpinConfig):
        if not dataclasses.is_dataclass(section.default_factory):
            continue  # start_model: a path
        for name, hint in typing.get_type_hints(section.default_factory).items():
            # Optional[X] is a Union of X and None; X may be a list of numbers (iterations.lr).
            options = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
            is_list = any(typing.get_origin(option) is list for option in options)
            inner = {arg for option in options for arg in (typing.get_args(option) or (option,))}
            for number in (int, float):
                if number in inner:
                    keys[f"{section.name}.{name}"] = (number, is_list)
    return keys


def test_every_numeric_key_has_a_range():
    from spin_mega.config import NUMERIC_RANGES

    keys = _numeric_keys()
    assert "optim.lr" in keys and "iterations.lr" in keys and "train.max_steps" in keys  # the walk finds them
    assert sorted(set(keys) - set(NUMERIC_RANGES)) == [], "numeric keys without a range in config.NUMERIC_RANGES"
    assert sorted(set(NUMERIC_RANGES) - set(keys)) == [], "ranges of keys that do not exist"


# The cases, and the keys users get wrong: (override, the start of the one-sentence error).
OUT_OF_RANGE = [
    ("optim.lr=-1e-5", "optim.lr is -1e-05 but must be positive"),
    ("optim.lr=0", "optim.lr is 0.0 but must be positive"),
    ("optim.lr=.nan", "optim.lr is nan but must be positive"),
    ("optim.min_lr=1e-3", "optim.min_lr (0.001) is above optim.lr (1e-05)"),
    ("iterations.lr=[]", "iterations.lr is [] but must be a list of at least one value"),
    ("iterations.lr=[1e-5, 0]", "iterations.lr[1] is 0.0 but must be positive"),
    ("iterations.beta=[0.1, -5]", "iterations.beta[1] is -5.0 but must be positive"),
    ("iterations.beta=[]", "iterations.beta is [] but must be a list"),
    ("loss.beta=0", "loss.beta is 0.0 but must be positive"),
    ("train.micro_batch_size=0", "train.micro_batch_size is 0 but must be at least 1"),
    ("train.global_batch_size=-8", "train.global_batch_size is -8 but must be at least 1"),
    ("train.epochs=0", "train.epochs is 0.0 but must be positive"),
    ("train.max_steps=0", "train.max_steps is 0 but must be at least 1"),
    ("optim.warmup_ratio=1.0", "optim.warmup_ratio is 1.0 but must be in [0, 1)"),
    ("optim.clip_grad=-1", "optim.clip_grad is -1.0 but must be 0 or more"),
    ("optim.adam_beta2=1.5", "optim.adam_beta2 is 1.5 but must be in [0, 1)"),
    ("generation.temperature=-0.5", "generation.temperature is -0.5 but must be 0 or more"),
    ("generation.top_p=0", "generation.top_p is 0.0 but must be in (0, 1]"),
    ("generation.top_p=1.5", "generation.top_p is 1.5 but must be in (0, 1]"),
    ("generation.max_new_tokens=0", "generation.max_new_tokens is 0 but must be at least 1"),
    ("generation.gpu_memory_utilization=.inf", "generation.gpu_memory_utilization is inf but must be in (0, 1]"),
    ("generation.kv_cache_gb=0", "generation.kv_cache_gb is 0.0 but must be positive"),
    ("eval.max_new_tokens=-1", "eval.max_new_tokens is -1 but must be at least 1"),
    ("eval.max_samples=0", "eval.max_samples is 0 but must be at least 1"),
    ("iterations.num_prompts=0", "iterations.num_prompts is 0 but must be at least 1"),
    ("data.shuffle_seed=-1", "data.shuffle_seed is -1 but must be 0 or more"),
]


@pytest.mark.parametrize("override, message", OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_out_of_range_values_are_refused_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(REPO / "configs" / "tiny-cpu.yaml", [override])
    text = str(caught.value)
    assert text.startswith(message), text
    assert "\n" not in text and ("--set" in text or "lower" in text)


def _outside_and_edge(valid) -> tuple[list[float], list[float]]:
    """Values just outside `valid` and the edges inside it."""
    outside, edge = [float("nan"), float("inf")], []
    if valid.low is not None:
        (outside if valid.low_open else edge).append(valid.low)
        outside.append(valid.low - 1)
        if valid.low_open:
            edge.append(valid.low + 0.5 if valid.high is not None else valid.low + 1)
    if valid.high is not None:
        (outside if valid.high_open else edge).append(valid.high)
        outside.append(valid.high + 1)
    return outside, edge


def test_every_numeric_key_refuses_values_outside_its_range_and_accepts_its_edges():
    from spin_mega.config import NUMERIC_RANGES

    kinds = _numeric_keys()
    for key, valid in NUMERIC_RANGES.items():
        number, is_list = kinds[key]
        outside, edge = _outside_and_edge(valid)

        def override(value) -> str:
            shown = int(value) if number is int else value
            return f"{key}={[shown] if is_list else shown}"

        for value in outside:
            if number is int and not (value == value and abs(value) != float("inf") and value == int(value)):
                continue  # refused as "expected an integer" already
            with pytest.raises(ConfigError) as caught:
                load_config(REPO / "configs" / "tiny-cpu.yaml", [override(value)])
            assert str(caught.value).startswith(f"{key}{'[0]' if is_list else ''} is "), (key, value, str(caught.value))
        for value in edge:
            if number is int and value != int(value):
                continue
            try:
                load_config(REPO / "configs" / "tiny-cpu.yaml", [override(value)])
            except ConfigError as exc:  # a check across keys may still refuse it, never this key's range
                assert not str(exc).startswith(f"{key} is"), (key, value, str(exc))


def test_spin_mega_train_refuses_a_negative_learning_rate_before_anything_runs(tmp_path):
    from tests.support import spin_mega

    result = spin_mega("train", str(REPO / "configs" / "tiny-cpu.yaml"), "--workdir", str(tmp_path / "w"),
                       "--set", "optim.lr=-1e-5")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "spin-mega train: error: optim.lr is -1e-05 but must be positive; set it in the config file or with "
        "--set optim.lr=VALUE"
    ]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("iterations.lr=[1e-5, 0]", "iterations.lr[1] is 0.0 but must be positive"),
        ("optim.min_lr=4e-7", "iterations.lr[0] (1e-07) is below optim.min_lr (4e-07)"),
    ],
)
def test_spin_mega_run_refuses_a_bad_schedule_before_writing_anything(tmp_path, override, message):
    from tests.support import spin_mega

    # A schedule takes the place of optim.lr, which stays at its default (5e-7) beside it.
    extra = ["--set", "optim.lr=5e-7", "--set", "iterations.lr=[1e-7]"] if "min_lr" in override else ["--set", "optim.lr=5e-7"]
    result = spin_mega("run", str(REPO / "configs" / "tiny-cpu.yaml"), "--workdir", str(tmp_path / "w"),
                       "--set", override, *extra)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"spin-mega run: error: {message}"), errors
    assert not (tmp_path / "w").exists()
