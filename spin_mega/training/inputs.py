"""The paths a training (or a whole run) reads, checked before anything is written: a missing start model,
data file or tokenizer is one sentence naming its config key in the first second, not a traceback after
minutes of work, and since nothing was recorded, the corrected command is not "another config"."""

from __future__ import annotations

import re
from pathlib import Path

from spin_mega.config import SpinConfig
from spin_mega.data.sources import check_source
from spin_mega.errors import ConfigError
from spin_mega.models.checkpoint import MODEL_META, is_model_checkpoint

# A Hub model id (org/name): transformers finds it in its cache, so it need not exist as a path here.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HF_MODEL_CONFIG = "config.json"


def check_start_model(start: str) -> None:
    path = Path(start)
    if not path.exists():
        raise ConfigError(f"start_model {start} does not exist; point it at theta_0, an HF model directory or a "
                          "spin-mega Megatron checkpoint")
    if not (path / HF_MODEL_CONFIG).is_file() and not is_model_checkpoint(path):
        raise ConfigError(f"start_model {start} is neither an HF model directory (no {HF_MODEL_CONFIG}) nor a spin-mega "
                          f"Megatron checkpoint (no {MODEL_META})")


def check_inputs(cfg: SpinConfig, *, loop: bool) -> None:
    """start_model, data.train_path and data.tokenizer (and, for the loop, data.eval_path) exist; `loop`:
    the checks of `spin-mega run`, where start_model and data.train_path (the SFT data) are required.
    `spin-mega train` may start from a random model of cfg.model with data.tokenizer instead."""
    if cfg.start_model:
        check_start_model(cfg.start_model)
    elif loop:
        raise ConfigError("start_model is not set: point it at theta_0, an HF model directory or a spin-mega checkpoint")
    elif not cfg.data.tokenizer:
        raise ConfigError("set start_model (an HF or spin-mega Megatron directory) or data.tokenizer")
    if not cfg.data.train_path:
        what = "the SFT data (prompt, response)" if loop else "the SPIN pairs (prompt, chosen, rejected)"
        raise ConfigError(f"data.train_path is not set: point it at {what}")
    check_source(cfg.data.train_path, "data.train_path")
    tokenizer = cfg.data.tokenizer
    if tokenizer and not Path(tokenizer).is_dir() and not (_HUB_ID.match(tokenizer) and not Path(tokenizer).exists()):
        raise ConfigError(f"data.tokenizer {tokenizer} is not a directory; point it at a tokenizer directory, or leave "
                          "it unset to use the start model's")
    if loop and cfg.data.eval_path:
        check_source(cfg.data.eval_path, "data.eval_path")
