"""MFU and NVML telemetry pieces that run without a GPU: the peak table, the parameter count behind MFU
(against HF transformers' own models), the handle lookup by PCI bus id, and NVML failures switching
telemetry off instead of stopping training (real pynvml: on a machine without a driver its nvmlInit fails)."""

from __future__ import annotations

import pynvml
import pytest

from spin_mega.config import ModelConfig
from spin_mega.training.telemetry import GpuTelemetry, non_embedding_params, nvml_pci_bus_id, peak_flops, peak_for_device_name


@pytest.mark.parametrize(
    "name, label, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", "H100 NVL", 835.0),
        ("NVIDIA H200", "H200 SXM", 989.0),
        ("NVIDIA H200 NVL", "H200 NVL", 835.0),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ],
)
def test_peak_follows_the_gpu_model_and_form_factor(name, label, tflops):
    peak = peak_for_device_name(name)
    assert (peak.label, peak.flops) == (label, tflops * 1e12)


def test_unknown_gpu_has_no_peak_and_the_override_wins():
    assert peak_for_device_name("NVIDIA GeForce RTX 4090") is None
    assert peak_flops() is None  # no CUDA here: no MFU rather than a wrong one
    override = peak_flops(400.0)
    assert (override.label, override.flops) == ("train.peak_tflops", 400e12)


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral"])
def test_non_embedding_parameters_match_transformers(architecture):
    """The count MFU is built on, against the parameter count of the HF model of the same shape (embedding and
    output layer excluded); qwen2 adds the q/k/v biases, qwen3 the query/key norms (with head_dim 32 x 6 heads
    decoupled from the hidden size 96), the MoE models a router and 5 experts of width 40 per layer. It depends on the shape only, so it is right for any
    TP/PP split, uneven pipeline stages included."""
    from transformers import AutoConfig, AutoModelForCausalLM

    moe = architecture in ("qwen3_moe", "mixtral")
    shape = ModelConfig(
        architecture=architecture, vocab_size=320, hidden_size=96, ffn_hidden_size=40 if architecture == "mixtral" else 200,
        num_layers=3, num_attention_heads=6, num_query_groups=2, head_dim=32, qkv_bias=architecture == "qwen2",
        num_experts=5 if moe else None, moe_ffn_hidden_size=40 if moe else None, moe_router_topk=2,
    )
    experts = {"qwen3_moe": dict(num_experts=5, moe_intermediate_size=40, num_experts_per_tok=2),
               "mixtral": dict(num_local_experts=5, num_experts_per_tok=2)}.get(architecture, {})
    hf_config = AutoConfig.for_model(
        architecture, vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.ffn_hidden_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_query_groups,
        head_dim=shape.head_dim, tie_word_embeddings=False, **experts,
    )
    model = AutoModelForCausalLM.from_config(hf_config)
    embeddings = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    assert non_embedding_params(shape) == sum(p.numel() for p in model.parameters()) - embeddings
    if moe:
        # A token passes through 2 of the 5 experts: MFU counts those.
        assert non_embedding_params(shape) - non_embedding_params(shape, active=True) == 3 * 3 * (3 * 96 * 40)


def test_nvml_pci_bus_id_spelling():
    assert nvml_pci_bus_id(0, 0x3B, 0) == "00000000:3B:00.0"
    assert nvml_pci_bus_id(1, 0xC1, 0x1F) == "00000001:C1:1F.0"


def test_a_failing_nvml_turns_telemetry_off_with_one_line():
    """Real pynvml: without an NVIDIA driver on this machine nvmlInit raises NVMLError_LibraryNotFound."""
    lines = []
    telemetry = GpuTelemetry(identity=("pci", "00000000:3B:00.0"), log=lines.append)
    assert not telemetry.enabled
    assert telemetry.sample() == {}
    assert len(lines) == 1 and "GPU telemetry off" in lines[0] and "00000000:3B:00.0" in lines[0]


class _NvmlWithoutPower:
    """pynvml's interface up to a power query that raises pynvml's own NotSupported error, as on MIG."""

    def __init__(self):
        self.opened = []

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByPciBusId_v2(self, bus_id):
        self.opened.append(("pci", bus_id))
        return object()

    def nvmlDeviceGetHandleByIndex(self, index):  # never to be used: indices ignore CUDA_VISIBLE_DEVICES
        raise AssertionError("NVML handle looked up by index")

    def nvmlDeviceGetMemoryInfo(self, handle):
        return type("Memory", (), {"used": 3 * 2**30})()

    def nvmlDeviceGetUtilizationRates(self, handle):
        return type("Utilization", (), {"gpu": 87})()

    def nvmlDeviceGetPowerUsage(self, handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)


def test_handle_is_found_by_pci_bus_id_and_a_failing_query_stops_telemetry_once():
    nvml = _NvmlWithoutPower()
    lines = []
    telemetry = GpuTelemetry(identity=("pci", "00000000:C1:00.0"), nvml=nvml, log=lines.append)
    assert telemetry.enabled and nvml.opened == [("pci", "00000000:C1:00.0")]
    assert telemetry.sample() == {}
    assert telemetry.sample() == {}
    assert not telemetry.enabled
    assert len(lines) == 1 and "Not Supported" in lines[0]
