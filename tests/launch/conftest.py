"""Session fixture: a real two-node Slurm cluster (slurm_harness.SlurmCluster), installed if missing,
started once, and always torn down, whatever the tests did."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.launch.slurm_harness import DAEMONS, REPO, SlurmCluster
from tests.support import in_ci


def _slurm_installed() -> bool:
    return all(shutil.which(tool) for tool in DAEMONS)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    if os.geteuid() != 0:
        why = "the local Slurm cluster runs its daemons and jobs as root and edits /etc/hosts"
        if in_ci():
            # CI can run them (the README's test command runs as root there): a skip would hide them for good.
            pytest.fail(f"CI must run the Slurm tests, but this is not root: {why}")
        pytest.skip(why)
    if not _slurm_installed():
        subprocess.run(["bash", str(REPO / "scripts" / "install-slurm.sh")], check=True)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def tiny_train(tmp_path_factory) -> dict:
    """The trainer tests' tiny set-up, over 2 epochs (16 steps available; the tests cap them with --max-steps):
    the same inputs for the Slurm runs and for the single-process reference they are compared with."""
    from tests.support import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("tiny_train"), epochs=2)


@pytest.fixture(scope="session")
def tiny_loop(tiny_train) -> dict:
    """A config for a one-iteration `spin-mega run` on CPU in well under a minute: the tiny start model,
    the demo's SFT prompts, generation with transformers, a checkpoint every training step (so that a
    signal can be aimed at training)."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    config["start_model"] = str(tiny_train["root"] / "start_mcore")
    config["data"].update(train_path=str(REPO / "spin_mega" / "demo" / "assets" / "train.jsonl"),
                          max_prompt_length=64, max_length=128)
    config["generation"].update(backend="hf", max_new_tokens=8)
    config["iterations"].update(num_iterations=1, num_prompts=96)
    config["train"].update(micro_batch_size=2, global_batch_size=8, epochs=1, save_interval=1)
    path = tiny_train["root"] / "loop.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"config": path, "start_mcore": tiny_train["root"] / "start_mcore",
            "sft": REPO / "spin_mega" / "demo" / "assets" / "train.jsonl"}
