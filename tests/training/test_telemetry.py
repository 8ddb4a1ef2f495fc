"""MFU and NVML telemetry pieces that run without a GPU: the peak table, the parameter count behind MFU
(against HF transformers' own models), the handle lookup by PCI bus id, and NVML failures switching
telemetry off instead of stopping training (real pynvml: on a machine without a driver its nvmlInit fails).
NVML doubles are create_autospec of the installed pynvml, and every NVML name the code uses must exist in it."""

from __future__ import annotations

import ast
import re
from importlib.metadata import version
from unittest.mock import create_autospec

import pynvml
import pytest

from spin_mega.config import ModelConfig
from spin_mega.training.telemetry import GpuTelemetry, non_embedding_params, nvml_pci_bus_id, peak_flops, peak_for_device_name
from tests.support import REPO


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


@pytest.fixture(scope="module")
def nvml_module_spec():
    """A double of the installed nvidia-ml-py built from the module itself: every function has its real
    signature, and a name the module does not define raises AttributeError, as the real one would."""
    return create_autospec(pynvml)


def _working_nvml(spec, power=None):
    nvml = spec
    nvml.reset_mock(return_value=True, side_effect=True)
    nvml.nvmlDeviceGetHandleByPciBusId.return_value = "handle"
    nvml.nvmlDeviceGetHandleByIndex.side_effect = AssertionError("NVML handle looked up by index")
    nvml.nvmlDeviceGetMemoryInfo.return_value = pynvml.c_nvmlMemory_t(total=80 * 2**30, free=77 * 2**30, used=3 * 2**30)
    nvml.nvmlDeviceGetUtilizationRates.return_value = pynvml.c_nvmlUtilization_t(gpu=87, memory=40)
    if power is None:
        nvml.nvmlDeviceGetPowerUsage.return_value = 412_500  # milliwatts
    else:
        nvml.nvmlDeviceGetPowerUsage.side_effect = power
    return nvml


def test_handle_is_opened_by_pci_bus_id_and_sampled(nvml_module_spec):
    nvml = _working_nvml(nvml_module_spec)
    lines = []
    telemetry = GpuTelemetry(identity=("pci", "00000000:C1:00.0"), nvml=nvml, log=lines.append, torch_peak_bytes=lambda: 5 * 2**30)
    assert telemetry.enabled and not lines
    nvml.nvmlDeviceGetHandleByPciBusId.assert_called_once_with("00000000:C1:00.0")
    assert telemetry.sample() == {"torch_max_allocated_gib": 5.0, "gpu_mem_used_gib": 3.0, "gpu_util_pct": 87.0, "gpu_power_w": 412.5}
    nvml.nvmlDeviceGetMemoryInfo.assert_called_with("handle")


def test_handle_by_uuid_when_torch_reports_no_pci_address(nvml_module_spec):
    nvml = _working_nvml(nvml_module_spec)
    nvml.nvmlDeviceGetHandleByUUID.return_value = "handle"
    telemetry = GpuTelemetry(identity=("uuid", "GPU-0f3a"), nvml=nvml, log=[].append, torch_peak_bytes=None)
    assert telemetry.enabled
    nvml.nvmlDeviceGetHandleByUUID.assert_called_once_with("GPU-0f3a")


def test_a_failing_query_stops_nvml_once_and_keeps_torchs_peak(nvml_module_spec):
    nvml = _working_nvml(nvml_module_spec, power=pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED))
    lines = []
    telemetry = GpuTelemetry(identity=("pci", "00000000:C1:00.0"), nvml=nvml, log=lines.append, torch_peak_bytes=lambda: 2**30)
    assert telemetry.enabled
    # The benchmark's peak-memory column comes from torch: it fills whether or not NVML works.
    assert telemetry.sample() == {"torch_max_allocated_gib": 1.0}
    assert telemetry.sample() == {"torch_max_allocated_gib": 1.0}
    assert not telemetry.enabled
    assert len(lines) == 1 and "Not Supported" in lines[0]


def _nvml_names_called(paths) -> dict[str, list[str]]:
    """Every NVML API name the code refers to (attribute, name or `from pynvml import`), with where."""
    found: dict[str, list[str]] = {}
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.ImportFrom) and node.module == "pynvml":
                names = [alias.name for alias in node.names]
            for name in names:
                if re.match(r"nvml[A-Z]", name):  # NVML's API names: nvmlInit, nvmlDeviceGet...
                    found.setdefault(name, []).append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_every_nvml_function_the_code_calls_exists_in_nvidia_ml_py():
    sources = [p for folder in ("spin_mega", "kernels", "conversion", "benchmarks") for p in (REPO / folder).rglob("*.py")]
    called = _nvml_names_called(sources)
    # The scan finds what it is meant to find: the handle lookup and the driver query are both in there.
    assert {"nvmlDeviceGetHandleByPciBusId", "nvmlInit", "nvmlSystemGetDriverVersion"} <= set(called), called
    missing = {name: where for name, where in called.items() if not callable(getattr(pynvml, name, None))}
    assert not missing, f"not defined by nvidia-ml-py {version('nvidia-ml-py')}: {missing}"
