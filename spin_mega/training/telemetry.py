"""GPU telemetry (NVML) and model FLOPs utilisation (MFU), neither of which may ever stop training.

NVML numbers its devices by the machine's order and ignores CUDA_VISIBLE_DEVICES, while torch's cuda:N counts
only the visible ones: the handle is therefore looked up by the PCI bus id (or UUID) torch reports for its
device, never by index, through nvidia-ml-py's nvmlDeviceGetHandleByPciBusId (which calls the C library's _v2
itself; the Python module has no _v2 name). Any NVML error (no driver in the container, MIG or vGPU without the
queried counter, a driver/library mismatch) turns NVML's columns off with one log line and training goes on;
torch's own peak-memory column does not depend on NVML.

MFU = model FLOPs of the step's real tokens / (step time x peak FLOP/s of the GPUs). Model FLOPs come from the
model's shape (so they do not depend on how TP/PP split it), padding tokens are not counted, and the peak is
the dense bf16 figure of the GPU found, or `train.peak_tflops` when set; the metrics name which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from spin_mega.config import ModelConfig

# Dense bf16 peak per device, TFLOP/s (vendor datasheets), matched against torch's device name in this order:
# the first entry whose every fragment occurs in the name wins, so the specific forms come first.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], str, float], ...] = (
    (("H100", "PCIe"), "H100 PCIe", 756.0),
    (("H100", "NVL"), "H100 NVL", 835.0),
    (("H100",), "H100 SXM", 989.0),
    (("H200", "NVL"), "H200 NVL", 835.0),
    (("H200",), "H200 SXM", 989.0),
    (("A100",), "A100", 312.0),
    (("B200",), "B200", 2250.0),
)


@dataclass(frozen=True)
class Peak:
    label: str  # what the metrics name: the GPU model matched, or "train.peak_tflops"
    flops: float  # per GPU, FLOP/s


def peak_for_device_name(name: str) -> Optional[Peak]:
    for fragments, label, tflops in PEAK_BF16_TFLOPS:
        if all(fragment.lower() in name.lower() for fragment in fragments):
            return Peak(label, tflops * 1e12)
    return None


def peak_flops(override_tflops: Optional[float] = None) -> Optional[Peak]:
    """The peak MFU is quoted against: the override, else the GPU found; None without CUDA or for a GPU not in
    the table (then no MFU is logged rather than a wrong one)."""
    if override_tflops is not None:
        return Peak("train.peak_tflops", override_tflops * 1e12)
    if not torch.cuda.is_available():
        return None
    return peak_for_device_name(torch.cuda.get_device_name())


def non_embedding_params(model: ModelConfig, active: bool = False) -> int:
    """Weights of the transformer layers and final norm of the whole model (input embedding and output layer
    excluded), from its shape: the same for every TP/PP/EP layout, even or uneven. `active`: for a mixture of
    experts, only the router and the top-k experts a token passes through (what its FLOPs scale with)."""
    h, d = model.hidden_size, model.head_dim
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    attention = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if model.qkv_bias else 0)
    if model.qk_layernorm:
        attention += 2 * d  # one RMSNorm weight over head_dim for the queries, one for the keys
    if model.is_moe:
        experts = model.moe_router_topk if active else model.num_experts
        mlp = model.num_experts * h + experts * 3 * h * model.moe_ffn_hidden_size  # router, gated experts
    else:
        mlp = 3 * h * model.ffn_hidden_size  # gated: gate and up projections, then down
    norms = 2 * h
    return model.num_layers * (attention + mlp + norms) + h


def transformer_flops_per_token(
    num_params_no_embed: int, num_layers: int, hidden: int, seq_len: int, vocab: int, attention_width: Optional[int] = None
) -> float:
    """Forward FLOPs per token: 2 per weight of the dense layers and the output layer, plus causal attention
    (QK^T and PV: 2 * 2 * s * heads * head_dim per layer, halved for the causal mask). `attention_width`:
    heads x head_dim when it differs from the hidden size (Qwen3)."""
    dense = 2.0 * (num_params_no_embed + hidden * vocab)
    attention = 2.0 * num_layers * seq_len * (attention_width or hidden)
    return dense + attention


def spin_step_flops(forward_flops_per_token: float, tokens: int, fused_opponent: bool) -> float:
    """One SPIN step: policy forward + backward (3x forward) on chosen and rejected, plus the opponent's
    forward (1x) when it runs fused; in precompute mode the opponent pass is a separate, one-off cost."""
    multiplier = 3.0 + (1.0 if fused_opponent else 0.0)
    return multiplier * forward_flops_per_token * tokens


def mfu(model: ModelConfig, real_tokens: int, seq_len: int, fused_opponent: bool, step_time: float, peak: Peak, world_size: int) -> float:
    """Model FLOPs utilisation of one optimizer step over all `world_size` GPUs; `real_tokens` excludes padding
    (the FLOPs spent on padding are waste, not model FLOPs)."""
    per_token = transformer_flops_per_token(
        non_embedding_params(model, active=True), model.num_layers, model.hidden_size, seq_len, model.vocab_size,
        attention_width=model.num_attention_heads * model.head_dim,
    )
    return spin_step_flops(per_token, real_tokens, fused_opponent) / (step_time * peak.flops * world_size)


def nvml_pci_bus_id(domain: int, bus: int, device: int) -> str:
    """NVML's spelling of a PCI address (nvmlPciInfo_t.busId), as nvmlDeviceGetHandleByPciBusId accepts it."""
    return f"{domain:08X}:{bus:02X}:{device:02X}.0"


def _device_identity(index: int) -> tuple[str, str]:
    """('pci', bus id) or ('uuid', 'GPU-...') of torch's cuda:index, whichever this torch exposes."""
    props = torch.cuda.get_device_properties(index)
    if hasattr(props, "pci_bus_id") and hasattr(props, "pci_domain_id"):
        return "pci", nvml_pci_bus_id(props.pci_domain_id, props.pci_bus_id, props.pci_device_id)
    uuid = str(props.uuid)
    return "uuid", uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def _log_once(message: str) -> None:
    import sys

    print(f"[spin-mega] {message}", file=sys.stderr, flush=True)


class GpuTelemetry:
    """Memory, utilisation and power of this rank's GPU, and torch's peak allocation on it; an empty sample
    without CUDA, only torch's figure once NVML failed."""

    def __init__(
        self,
        identity: Optional[tuple[str, str]] = None,
        nvml=None,
        log: Callable[[str], None] = _log_once,
        torch_peak_bytes: Optional[Callable[[], int]] = None,
    ) -> None:
        """identity: ('pci', bus id) or ('uuid', uuid) of the device; default: torch's current CUDA device.
        nvml: the pynvml module (tests pass a double built from it). torch_peak_bytes: torch's peak allocation
        on the device; default torch.cuda.max_memory_allocated with CUDA, none without."""
        self._handle = None
        self._log = log
        if torch_peak_bytes is None and torch.cuda.is_available():
            torch_peak_bytes = torch.cuda.max_memory_allocated
        self._torch_peak_bytes = torch_peak_bytes
        if identity is None:
            if not torch.cuda.is_available():
                return
            identity = _device_identity(torch.cuda.current_device())
        self.identity = identity
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
            kind, key = identity
            if kind == "pci":
                self._handle = nvml.nvmlDeviceGetHandleByPciBusId(key)
            else:
                self._handle = nvml.nvmlDeviceGetHandleByUUID(key)
            self._nvml = nvml
        except Exception as exc:  # ImportError or any NVMLError: training matters more than telemetry
            self._disable(f"GPU telemetry off: NVML could not open the device {identity[1]} ({exc})")

    @property
    def enabled(self) -> bool:
        return self._handle is not None

    def _disable(self, message: str) -> None:
        self._handle = None
        self._log(message)

    def sample(self) -> dict:
        out = {}
        if self._torch_peak_bytes is not None:
            out["torch_max_allocated_gib"] = self._torch_peak_bytes() / 2**30
        if self._handle is None:
            return out
        nv = self._nvml
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(self._handle)
            util = nv.nvmlDeviceGetUtilizationRates(self._handle)
            power = nv.nvmlDeviceGetPowerUsage(self._handle)
        except Exception as exc:  # e.g. utilisation or power not supported on MIG / vGPU
            self._disable(f"GPU telemetry off: an NVML query failed ({exc})")
            return out
        out.update(gpu_mem_used_gib=mem.used / 2**30, gpu_util_pct=float(util.gpu), gpu_power_w=power / 1000.0)
        return out
