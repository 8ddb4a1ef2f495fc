#!/usr/bin/env bash
# The prepared GPU benchmark run (docs/benchmarks.md, docs/gpu.md). On a fresh copy of the working tree on the GPU
# machine (Python 3.12 with torch, triton, transformers in the image; no network):
#
#     benchmarks/gpu/run.sh [--out DIR]         # results in benchmarks/results/gpu_run_<device>.{json,md}
#     benchmarks/gpu/run.sh --smoke             # the same steps on CPU with tiny shapes (CI runs this)
#
# Outside smoke mode it first installs, offline, the wheels that benchmarks/gpu/fetch_wheels.sh put in
# benchmarks/gpu/wheels/ (megatron-core, datasets' missing pieces, liger-kernel) and spin-mega itself
# (editable) into a fresh virtualenv layered over the image's Python, so the image's torch and triton
# are the ones used. Then benchmarks/gpu/run.py runs each step under its own timeout.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
smoke=0
for arg in "$@"; do [[ "$arg" == "--smoke" ]] && smoke=1; done
[[ "${SMOKE:-0}" == "1" ]] && smoke=1 && set -- "$@" --smoke

if (( smoke )); then
    # CI's environment already has every requirement; no install.
    python="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
else
    base="${PYTHON:-python3}"
    venv="${SPIN_MEGA_BENCH_VENV:-/tmp/spin-mega-bench-venv}"
    wheels="$repo/benchmarks/gpu/wheels"
    if ! compgen -G "$wheels/*.whl" >/dev/null; then
        echo "no wheels in $wheels: run benchmarks/gpu/fetch_wheels.sh where pip has an index, and carry the folder" >&2
        exit 2
    fi
    pip_runner=("$venv/bin/python" -m pip)
    if [[ ! -x "$venv/bin/python" ]]; then
        # An interpreter without ensurepip (a Debian python, a uv-made venv) still gets a venv; the image's
        # own pip then installs into it (pip's --python option).
        "$base" -m venv --system-site-packages "$venv" 2>/dev/null \
            || { rm -rf "$venv"; "$base" -m venv --system-site-packages --without-pip "$venv"; }
        # The image's python3 is itself a virtualenv (/opt/torch/.venv): --system-site-packages would
        # expose the interpreter's base site-packages, not the image's. A .pth file appends the image's
        # site-packages instead, after the new venv's own, so the carried wheels take precedence.
        site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        "$base" -c 'import site, sys; print("\n".join(p for p in site.getsitepackages() if p))' > "$site/spin_mega_bench_image.pth"
    fi
    python="$venv/bin/python"
    "$python" -m pip --version >/dev/null 2>&1 || pip_runner=("$base" -m pip --python "$python")
    pip=("${pip_runner[@]}" install --quiet --no-index --no-cache-dir --disable-pip-version-check)
    # --no-deps: every requirement not carried is already in the image; pip must not try to replace torch.
    "${pip[@]}" --no-deps --find-links "$wheels" "$wheels"/*.whl
    # The image's setuptools builds spin-mega (no build isolation: there is no index to fetch one from).
    "${pip[@]}" --no-deps --no-build-isolation -e "$repo"
fi
exec "$python" benchmarks/gpu/run.py "$@"
