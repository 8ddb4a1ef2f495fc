"""The preflight's pieces on CPU: a check whose process crashes is reported as failed, and the GPU checks'
own code rehearsed on CPU (the Triton interpreter, an NVML double built from nvidia-ml-py, TP 2 over gloo), so
that the first minute on a GPU does not meet a bug in the preflight itself."""

from __future__ import annotations

import dataclasses
import math
import re
from unittest.mock import create_autospec

import pynvml
import pytest

from spin_mega.commands import preflight


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("preflight_work")


def test_a_crashing_check_becomes_its_failed_line(work, monkeypatch):
    """Each check runs in a process of its own: one that aborts (a CUDA fault would) is reported, not fatal.
    (`spin-mega env --check` itself runs in CI through benchmarks/gpu/run.sh --smoke: test_gpu_run_smoke.)"""
    monkeypatch.setenv("SPIN_MEGA_PREFLIGHT_INJECT", "converted forward=crash")
    check = next(c for c in preflight.CHECKS if c.name == "converted forward")
    result = preflight.run_isolated(check, work)
    assert result.status == "failed" and result.detail.startswith("its process died (exit -6)")
    assert result.line().startswith("converted forward: failed: its process died")
    monkeypatch.setenv("SPIN_MEGA_PREFLIGHT_INJECT", "converted forward=raise")
    assert preflight.run_one("converted forward", work).line() == "converted forward: failed: RuntimeError: injected failure"
    # A hang is cut at the check's time limit (its whole process group is killed) and reported as such.
    monkeypatch.setenv("SPIN_MEGA_PREFLIGHT_INJECT", "converted forward=hang")
    hung = preflight.run_isolated(dataclasses.replace(check, timeout_s=5), work)
    assert hung.line() == "converted forward: failed: no answer within 5 s" and hung.seconds < 20


def test_fused_linear_check_on_cpu_names_the_formulation(work):
    detail = preflight.check_fp32_accumulation(work, device="cpu")
    assert detail.startswith("operands widened to float32, then addmm") and "torch.addmm(out_dtype=float32)" in detail


@pytest.mark.parametrize("check", [preflight.check_triton_logprobs, preflight.check_triton_fused_linear])
def test_kernel_checks_run_through_the_interpreter(work, check):
    # This session's kernels are interpreted: the check's own comparison runs, and its demand for compiled
    # Triton is what refuses the CPU.
    assert "float64" in check(work, device="cpu", compiled=False)
    with pytest.raises(AssertionError, match="not compiled Triton"):
        check(work, device="cpu")


def test_nvml_check_with_a_double_of_nvidia_ml_py(work):
    nvml = create_autospec(pynvml)
    nvml.nvmlDeviceGetHandleByPciBusId.return_value = "handle"
    nvml.nvmlDeviceGetMemoryInfo.return_value = pynvml.c_nvmlMemory_t(total=80 * 2**30, free=60 * 2**30, used=20 * 2**30)
    nvml.nvmlDeviceGetUtilizationRates.return_value = pynvml.c_nvmlUtilization_t(gpu=55, memory=10)
    nvml.nvmlDeviceGetPowerUsage.return_value = 300_000
    detail = preflight.check_nvml(work, nvml=nvml, identity=("pci", "00000000:3B:00.0"))
    assert detail == "opened by pci 00000000:3B:00.0; 20.0 GiB used, 55% busy, 300 W"
    nvml.nvmlDeviceGetHandleByPciBusId.assert_called_once_with("00000000:3B:00.0")
    nvml.nvmlDeviceGetMemoryInfo.assert_called_with("handle")
    nvml.nvmlDeviceGetPowerUsage.side_effect = pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
    with pytest.raises(AssertionError, match="Not Supported"):
        preflight.check_nvml(work, nvml=nvml, identity=("pci", "00000000:3B:00.0"))


@pytest.mark.slow
def test_tp2_step_check_over_gloo(work):
    """The GPU check's own command (bf16, TP 2, sequence parallelism, distributed optimizer) on 2 CPU ranks."""
    detail = preflight.check_tp2_step(work, nproc=2, timeout=300)
    # bf16 over 2 ranks: the first step's loss is ln 2 to bf16 rounding (0.6930 was seen), as the check allows.
    found = re.fullmatch(r"loss (\d\.\d{4}) \(ln 2\), grad norm \S+, 2 ranks", detail)
    assert found and abs(float(found[1]) - math.log(2)) <= 1e-2, detail
