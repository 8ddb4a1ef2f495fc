"""The lm-evaluation-harness hook: the benchmarks SPIN's published numbers are quoted on.

`eval.lm_eval_tasks` lists harness task names, each optionally `TASK:SHOTS`; the name
`open_llm_leaderboard_v1` stands for the six tasks of the Open LLM Leaderboard (v1) with its few-shot
counts, the suite on which the SPIN paper reports 58.14 -> 63.16. The model is loaded once and the tasks
run in one harness call per few-shot count, batched (`eval.lm_eval_batch_size`). Nothing is downloaded:
the tasks' data must already be in the datasets cache (or, for local tasks, in `eval.lm_eval_include_path`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

from spin_mega.config import EvalConfig
from spin_mega.errors import SpinMegaError

# Task and few-shot count of each Open LLM Leaderboard v1 benchmark (its "About" page, 2023-2024).
OPEN_LLM_LEADERBOARD_V1 = (
    ("arc_challenge", 25),
    ("hellaswag", 10),
    ("truthfulqa_mc2", 0),
    ("mmlu", 5),
    ("winogrande", 5),
    ("gsm8k", 5),
)
PRESETS = {"open_llm_leaderboard_v1": OPEN_LLM_LEADERBOARD_V1}


def parse_tasks(entries: list[str]) -> list[tuple[str, Optional[int]]]:
    """(task, shots) per entry; presets expanded; shots None leaves the task's own default."""
    tasks: list[tuple[str, Optional[int]]] = []
    for entry in entries:
        if entry in PRESETS:
            tasks.extend(PRESETS[entry])
            continue
        name, _, shots = entry.partition(":")
        if not name or (shots and not shots.isdigit()):
            raise SpinMegaError(f"eval.lm_eval_tasks: {entry!r} is not TASK or TASK:SHOTS (e.g. arc_challenge:25)")
        tasks.append((name, int(shots) if shots else None))
    return tasks


@functools.lru_cache(maxsize=4)
def task_manager(include_path: Optional[str] = None):
    """The harness's task index (its built-in tasks plus `include_path`'s): built once per process, since
    indexing the harness's thousands of task files takes tens of seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def run_lm_eval(model_dir: str | Path, cfg: EvalConfig) -> dict[str, Any]:
    """{task: {metric: value, ..., "num_fewshot": n}} for the tasks of `cfg.lm_eval_tasks`."""
    try:
        import datasets
        import torch
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise SpinMegaError(f"eval.lm_eval_tasks is set but lm-evaluation-harness cannot be imported ({exc}); pip install lm-eval") from None
    tasks = parse_tasks(cfg.lm_eval_tasks)
    include = cfg.lm_eval_include_path
    if include is not None and not Path(include).is_dir():
        raise SpinMegaError(f"eval.lm_eval_include_path {include} is not a directory")
    manager = task_manager(include)
    unknown = [t for t, _ in tasks if t not in manager.all_tasks]
    if unknown:
        raise SpinMegaError(f"lm-evaluation-harness has no task {', '.join(unknown)} (eval.lm_eval_tasks)")
    cuda = torch.cuda.is_available()
    lm = HFLM(pretrained=str(model_dir), batch_size=cfg.lm_eval_batch_size, device="cuda" if cuda else "cpu",
              dtype="bfloat16" if cuda else "float32")
    by_shots: dict[Optional[int], list[str]] = {}
    for name, shots in tasks:
        by_shots.setdefault(shots, []).append(name)
    results: dict[str, Any] = {}
    # The harness reads task data with datasets.load_dataset: from the cache, never the Hub.
    previous = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        for shots, names in by_shots.items():
            out = simple_evaluate(model=lm, tasks=names, num_fewshot=shots, task_manager=manager,
                                  batch_size=cfg.lm_eval_batch_size, limit=cfg.lm_eval_limit)
            for task, metrics in out["results"].items():
                results[task] = dict(metrics, num_fewshot=out.get("n-shot", {}).get(task, shots))
    except Exception as exc:
        raise SpinMegaError(f"lm-evaluation-harness failed on {', '.join(n for n, _ in tasks)}: {exc}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = previous
    return results
