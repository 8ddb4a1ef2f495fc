import os
import sys
from pathlib import Path

import pytest
import torch

# `tests.support` holds helpers shared by the test packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if not torch.cuda.is_available():
    # The kernel tests run the real Triton kernels through Triton's interpreter on CPU. Triton fixes the mode
    # of every @triton.jit function when it is defined, so the kernels are imported here, before anything
    # else imports triton (megatron.core does), with the interpreter on...
    os.environ["TRITON_INTERPRET"] = "1"
    import triton
    import triton.language  # noqa: F401

    import spin_mega.kernels  # noqa: F401

    # ...then the choice moves from the environment to Triton's in-process setting (kernel launches consult
    # it), so that the processes the tests start (trainer runs, Slurm jobs, vLLM engines) take the kernels'
    # PyTorch path on CPU, as they do for users, instead of inheriting the slow interpreter.
    triton.knobs.runtime.interpret = True
    del os.environ["TRITON_INTERPRET"]


@pytest.fixture(autouse=True, scope="session")
def _isolated_datasets_cache(tmp_path_factory):
    # `datasets` caches converted files in the user's cache; tests neither read stale entries nor leave any.
    import datasets

    datasets.disable_progress_bars()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cache")))
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The demo's tokenizer and a random tiny Llama, built locally with spin_mega.demo.build (nothing
    downloaded); shared by the generation and demo tests."""
    from spin_mega.demo.build import build_tiny_model, build_tokenizer

    root = tmp_path_factory.mktemp("tiny_model")
    build_tokenizer(root / "tokenizer")
    return build_tiny_model(root / "model", root / "tokenizer", seed=0)
