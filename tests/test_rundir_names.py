"""The run directory's names are spelled once, in spin_mega/rundir.py: every other module asks it. Read from
the source with `ast`: a string literal equal to one of its file names (or a stage marker, or an iteration
directory) anywhere else in the package is a second spelling that can drift."""

from __future__ import annotations

import ast

import spin_mega.rundir as rundir
from tests.support import REPO

# Names too common to police as literals: "train" is also a command and a data split, "hf" a backend.
GENERIC = {rundir.TRAIN_DIR, rundir.HF_DIR, rundir.REPORT_DIR, rundir.LOGS_DIR}
SOURCES = [REPO / "spin_mega", REPO / "kernels", REPO / "conversion"]


def _literals(source: str):
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def second_spellings(files) -> list[str]:
    names = {value for key, value in vars(rundir).items() if key.isupper() and isinstance(value, str)} - GENERIC
    found = []
    for path, source in files:
        for line, value in _literals(source):
            if value in names or value.startswith((rundir.done_marker(""), "iter_")):
                found.append(f"{path}:{line}: {value!r}")
    return found


def test_run_directory_names_are_spelled_only_in_rundir():
    files = [(p.relative_to(REPO), p.read_text()) for root in SOURCES for p in sorted(root.rglob("*.py"))
             if p != REPO / "spin_mega" / "rundir.py"]
    assert len(files) > 80
    found = second_spellings(files)
    assert not found, "spell these through spin_mega.rundir:\n" + "\n".join(found)


def test_the_check_sees_literals_but_not_docstrings():
    source = '"""Writes metrics.jsonl."""\nPATH = "metrics.jsonl"\nMARK = f".done.{stage}"\nIT = f"iter_{t}"\n'
    assert second_spellings([("m.py", source)]) == ["m.py:2: 'metrics.jsonl'", "m.py:3: '.done.'", "m.py:4: 'iter_'"]


def test_exit_codes_keep_their_values():
    from spin_mega.errors import SpinMegaError, TrainingUnhealthy

    # What users' scripts and Slurm's requeue logic test for (README, launch/common.sh).
    assert (rundir.EXIT_BAD_INPUT, rundir.EXIT_UNHEALTHY, rundir.EXIT_PREEMPTED) == (2, 3, 75)
    assert (SpinMegaError("x").exit_code, TrainingUnhealthy("x").exit_code) == (2, 3)
