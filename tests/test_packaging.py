"""Packaging: one distribution, `spin_mega` the only top-level import name, and a wheel that carries every
subpackage and data file the editable install sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.support import REPO

# Source folders installed under another name (pyproject's package-dir).
MAPPED = {"kernels": "spin_mega/kernels", "conversion": "spin_mega/conversion", "configs": "spin_mega/configs"}


def _source_packages() -> set[str]:
    found = set()
    for init in REPO.glob("*/**/__init__.py"):
        rel = init.parent.relative_to(REPO).as_posix()
        top = rel.split("/")[0]
        if top == "spin_mega":
            found.add(rel)
        elif top in MAPPED:
            found.add(MAPPED[top] + rel[len(top):])
    return found


# Where a fresh interpreter finds every package named on argv. Found, not imported: the packages' own
# imports (torch, megatron, vLLM) are the rest of the suite's business and would cost seconds each here.
FIND_ALL = ("import importlib.util, json, sys; "
            "print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) for n in sys.argv[1:]}))")


def _find_all(packages: list[str], cwd: Path, env: dict | None = None) -> dict[str, str]:
    result = subprocess.run([sys.executable, "-c", FIND_ALL, *packages], cwd=cwd, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_editable_install_finds_every_package(tmp_path):
    # Outside the checkout, so that only the installation can find them.
    packages = sorted(p.replace("/", ".") for p in _source_packages())
    found = _find_all(packages, cwd=tmp_path)
    folders = {installed: folder for folder, installed in MAPPED.items()}
    for package in packages:
        parts = package.split(".")
        mapped = folders.get("/".join(parts[:2]))
        expected = REPO.joinpath(mapped, *parts[2:]) if mapped else REPO.joinpath(*parts)
        assert found[package] == str(expected / "__init__.py"), (package, found[package])


def test_mapped_folders_import_only_under_spin_mega():
    import spin_mega.configs
    import spin_mega.conversion
    import spin_mega.kernels

    assert Path(spin_mega.kernels.__file__).parent == REPO / "kernels"
    assert Path(spin_mega.conversion.__file__).parent == REPO / "conversion"
    assert (Path(spin_mega.configs.__file__).parent / "tiny-cpu.yaml").is_file()

def test_installation_adds_no_top_level_kernels_or_conversion(tmp_path):
    # `kernels` and `conversion` are other projects' names on PyPI. Checked in a fresh interpreter outside the
    # checkout: the test process itself has the repository root on sys.path.
    probe = "import importlib.util as u; print([n for n in ('kernels', 'conversion', 'configs') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_wheel_carries_every_package_and_asset(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("spin_mega-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(p for p in _source_packages() if f"{p}/__init__.py" not in names)
    assert not missing, f"packages missing from the wheel (add them to pyproject's packages): {missing}"
    for asset in ("spin_mega/configs/tiny-cpu.yaml", "spin_mega/configs/zephyr-7b-spin.yaml", "spin_mega/configs/zephyr-7b-spin-paper.yaml",
                  "spin_mega/demo/assets/train.jsonl", "spin_mega/demo/assets/heldout.jsonl",
                  "spin_mega/demo/assets/validation.jsonl"):
        assert asset in names, asset
    assert not any(n.startswith(("kernels/", "conversion/", "configs/", "tests/")) for n in names)

    # The unpacked wheel first on the path: every package is found in it alone.
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    packages = sorted(p.replace("/", ".") for p in _source_packages())
    found = _find_all(packages, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(unpacked)})
    for package in packages:
        assert found[package] and Path(found[package]).resolve().is_relative_to(unpacked.resolve()), (package, found[package])
