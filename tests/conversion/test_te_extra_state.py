"""A converter-written checkpoint loads into a model whose modules carry Transformer Engine's extra state (what
the first `spin-mega train` from an HF model does on a machine with TE), at TP 1 and TP 2, and gives the HF
model's logits; a TE run's fp8 extra state survives a save and reload; a missing weight still fails the load.
The TE stand-in modules are described in te_extra_state_worker.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conv_testlib import save_hf_model, token_batch
from te_extra_state_worker import TE_SPEC_EXTRA_STATE_KEYS

from spin_mega.conversion import hf_to_mcore

WORKER = Path(__file__).with_name("te_extra_state_worker.py")


@pytest.fixture(scope="module")
def te_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("te_extra_state")
    tokens = token_batch(length=32)
    torch.save(tokens, root / "tokens.pt")
    model = save_hf_model("llama", root / "hf")
    with torch.no_grad():
        reference = model(tokens).logits
    checkpoint = hf_to_mcore(root / "hf", root / "mcore")
    out = root / "out"
    out.mkdir()
    job = root / "job.json"
    job.write_text(json.dumps({"checkpoint": str(checkpoint), "tokens": str(root / "tokens.pt"), "out": str(out)}))
    result = subprocess.run([sys.executable, "-W", "ignore", str(WORKER), str(job)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"out": out, "reference": reference, "summary": json.loads((out / "summary.json").read_text())}


def test_stand_in_asks_for_the_te_spec_extra_state(te_run):
    assert te_run["summary"]["asked_extra_state_keys"] == TE_SPEC_EXTRA_STATE_KEYS


@pytest.mark.parametrize("tp", [1, 2])
def test_converted_checkpoint_loads_into_te_modules_and_matches_hf(te_run, tp):
    logits = torch.load(te_run["out"] / f"logits_tp{tp}.pt")
    torch.testing.assert_close(logits, te_run["reference"], rtol=1e-4, atol=1e-4)
    received = te_run["summary"][f"received_tp{tp}"]
    # The converter's None entries reach the linears; attention and the final norm, which the checkpoint has
    # nothing for, are handed back their own (empty, as without fp8) state.
    for name, what in received.items():
        expected = "0 bytes" if name.endswith(("core_attention", "final_layernorm")) else "None"
        assert what == expected, (name, what)
    assert sum(name.endswith("core_attention") for name in received) == 4 and "decoder.final_layernorm" in received


def test_fp8_extra_state_of_a_te_run_is_restored_and_ignored_by_local_layers(te_run):
    restored = te_run["summary"]["fp8_state_restored"]
    assert len(restored) == 4 * 5 + 1 and all(restored.values()), restored
    local = torch.load(te_run["out"] / "logits_local_from_te_saved.pt")
    torch.testing.assert_close(local, te_run["reference"], rtol=1e-4, atol=1e-4)


def test_a_missing_weight_still_fails_the_load(te_run):
    error = te_run["summary"]["missing_weight_error"]
    assert error and "lacks weights this model needs" in error and "linear_qkv.bias" in error
