"""GPU telemetry (NVML) and the model-FLOPs formula behind MFU."""

from __future__ import annotations

from typing import Optional

import torch

# Dense bf16 peak per device, TFLOP/s: MFU is quoted against the nominal figure.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


class GpuTelemetry:
    """Memory, utilisation and power of this rank's GPU; empty on machines without one."""

    def __init__(self) -> None:
        self._handle = None
        if not torch.cuda.is_available():
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:  # NVML missing in some containers: metrics go on without telemetry
            self._handle = None

    def sample(self) -> dict:
        if self._handle is None:
            return {}
        nv = self._nvml
        mem = nv.nvmlDeviceGetMemoryInfo(self._handle)
        util = nv.nvmlDeviceGetUtilizationRates(self._handle)
        return {
            "gpu_mem_used_gib": mem.used / 2**30,
            "gpu_util_pct": float(util.gpu),
            "gpu_power_w": nv.nvmlDeviceGetPowerUsage(self._handle) / 1000.0,
            "torch_max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        }


def peak_flops_per_gpu() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def transformer_flops_per_token(num_params_no_embed: int, num_layers: int, hidden: int, seq_len: int, vocab: int) -> float:
    """Forward FLOPs per token: 2 per weight of the dense layers and the output layer, plus causal attention
    (QK^T and PV: 2 * 2 * s * h per layer, halved for the causal mask)."""
    dense = 2.0 * (num_params_no_embed + hidden * vocab)
    attention = 2.0 * num_layers * seq_len * hidden
    return dense + attention


def spin_step_flops(forward_flops_per_token: float, tokens: int, fused_opponent: bool) -> float:
    """One SPIN step: policy forward + backward (3x forward) on chosen and rejected, plus the opponent's
    forward (1x) when it runs fused; in precompute mode the opponent pass is a separate, one-off cost."""
    multiplier = 3.0 + (1.0 if fused_opponent else 0.0)
    return multiplier * forward_flops_per_token * tokens
