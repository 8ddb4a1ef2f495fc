#!/usr/bin/env bash
# Fills benchmarks/gpu/wheels/ (git-ignored) with the cp312 manylinux x86_64 wheels that the GPU image
# lacks, for benchmarks/gpu/run.sh to install offline. Run it here, where pip reaches an index; the device
# tool then carries the folder (name it in `carry`), which must stay well under its 64 MiB limit.
#
# What the GPU image already has (DESIGN.md, /work/.library/device/KINDS.md): Python 3.12, torch 2.11,
# triton 3.6, transformers 5.17, numpy, pandas, pyarrow, fsspec, xxhash, huggingface-hub, filelock,
# pyyaml, tqdm, psutil, matplotlib, nvidia-ml-py, setuptools, wheel. What it lacks, and so is carried:
#   megatron-core 0.16.1   the version CI tests (requires numpy, packaging, torch: present)
#   datasets 5.2.0         the version CI tests; of its requirements only dill and multiprocess are missing
#   dill, multiprocess     pinned to datasets' ranges
#   liger-kernel 0.8.5     the benchmark's third baseline (requires torch, triton: present)
# Everything is fetched with --no-deps so that nothing the image provides (torch above all) is replaced.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/wheels}"
mkdir -p "$dest"
rm -f "$dest"/*.whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" \
    megatron-core==0.16.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5
ls -l "$dest"
total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "total: $total bytes ($(( total / 1024 / 1024 )) MiB) in $(ls "$dest"/*.whl | wc -l) wheels"
if (( total > 32 * 1024 * 1024 )); then
    echo "the wheels exceed 32 MiB: the device tool carries 64 MiB with the working tree; drop one" >&2
    exit 1
fi
