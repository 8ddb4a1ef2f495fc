"""What the README's first command costs, stage by stage: CPU seconds of the whole process tree and wall.

    flock /tmp/spin-mega-heavy.lock .venv/bin/python benchmarks/demo_cost.py --label after --workdir /tmp/demo-cost
    .venv/bin/python benchmarks/demo_cost.py --label smoke --size smoke --workdir /tmp/demo-cost-smoke

Runs `spin-mega demo` (a fresh --workdir each time: a resumed demo costs nothing) as a child process and
samples, twice a second, every process of its tree: its own CPU time (user+sys), kept after it exits, so
that the tree's total counts engines, trainers and evaluations once each, orphaned ones included (the
kernel's reaped-children total, also recorded, misses those). Each `[spin-mega ...]` log line opens a segment; the segments are grouped into the demo's stages (theta_0's
SFT, generation, SPIN training, conversions, evaluations, the control's grid, ...) by the line's words.
Also recorded: the CPU model (lscpu), the load average before and after (the machine may be shared), and
the process's peak RSS. Appends one record per run to benchmarks/results/demo_cost_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]

# First match wins: a log line's words -> the stage its segment belongs to.
STAGES = (
    ("building the tokenizer", "theta_0 SFT (tokenizer, random model, SFT to plateau)"),
    ("import theta_0", "conversion (HF <-> Megatron)"),
    ("export theta", "conversion (HF <-> Megatron)"),
    ("evaluate theta", "test-split evaluation"),
    ("evaluating the lr", "test-split evaluation"),
    ("sample prompts", "loop bookkeeping"),
    ("build pairs", "loop bookkeeping"),
    ("generate with", "generation (engine start + sampling)"),
    ("train theta", "SPIN training"),
    ("validation exact match", "validation scoring (lr grids, theta_0)"),
    ("SFT control grid", "control grid (SFT + validation scoring)"),
    ("report written", "report"),
    ("done:", "after a loop: validation scoring, copying"),
    ("report:", "report"),
)


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def _kind(cmdline: list[str]) -> str:
    """Which of the demo's processes this is, from its command line."""
    text = " ".join(cmdline)
    for words, kind in (("spin_mega demo", "demo (main process: SFT, validation scoring, report)"),
                        ("spin_mega generate", "generate (vLLM front end)"), ("spin_mega train", "train"),
                        ("spin_mega convert", "convert"), ("spin_mega.evaluation", "evaluation"),
                        ("multiprocessing", "spawned")):
        if words in text:
            return kind
    return "other: " + text[:80]


def _sample(root: psutil.Process, own: dict[int, tuple[str, float, int]]) -> float:
    """Records every live process of root's tree: its kind, its own CPU seconds (user+sys, without children)
    and its most threads. Returns the sum of own CPU seconds over every process seen so far, exited ones at
    their last sample: unlike the reaped-children totals of the kernel, this also counts processes that
    were orphaned before exiting (vLLM's engine processes are), at the cost of up to one sampling interval
    per process."""
    procs = [root]
    try:
        procs += root.children(recursive=True)
    except psutil.Error:
        pass
    for p in procs:
        try:
            with p.oneshot():
                t = p.cpu_times()
                kind = own[p.pid][0] if p.pid in own else _kind(p.cmdline())
                if kind == "spawned":  # a helper of the process that spawned it (vLLM's engine, a checkpoint writer)
                    kind = own.get(p.ppid(), ("other",))[0].split(" (")[0] + " (spawned helpers)"
                threads = max(p.num_threads(), own[p.pid][2] if p.pid in own else 0)
                own[p.pid] = (kind, t.user + t.system, threads)
        except psutil.Error:
            pass
    return sum(cpu for _, cpu, _ in own.values())


def run(cmd: list[str], env: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    root = psutil.Process(proc.pid)
    samples: list[tuple[float, float]] = []
    own: dict[int, tuple[str, float, int]] = {}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            samples.append((time.perf_counter() - start, _sample(root, own)))
            stop.wait(0.5)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    marks: list[tuple[float, str]] = [(0.0, "start")]
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-40:]
        if line.startswith("[spin-mega run]"):
            marks.append((time.perf_counter() - start, line.split("]", 1)[1].strip()))
            print(f"{marks[-1][0]:7.1f}s {marks[-1][1]}", flush=True)
    code = proc.wait()
    wall = time.perf_counter() - start
    stop.set()
    poller.join()
    # What the kernel counted for the reaped tree (orphaned processes are missing from it), and what the
    # samples saw, which the per-stage figures use.
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    reaped_cpu = ru.ru_utime + ru.ru_stime
    total_cpu = max(samples[-1][1] if samples else 0.0, sum(cpu for _, cpu, _ in own.values()))
    samples.append((wall, total_cpu))
    processes: dict[str, dict] = {}
    for kind, cpu, threads in own.values():
        entry = processes.setdefault(kind, {"processes": 0, "cpu_s": 0.0, "most_threads": 0})
        entry["processes"] += 1
        entry["cpu_s"] = round(entry["cpu_s"] + cpu, 1)
        entry["most_threads"] = max(entry["most_threads"], threads)
    return {"code": code, "wall_s": wall, "processes": processes, "cpu_s": total_cpu, "cpu_s_reaped": reaped_cpu,
            "peak_rss_gb_largest_process": ru.ru_maxrss / 2**20,
            "marks": marks, "samples": samples, "tail": tail}


def _cpu_at(samples: list[tuple[float, float]], t: float) -> float:
    before = [c for s, c in samples if s <= t]
    return before[-1] if before else 0.0


def segments(result: dict) -> list[dict]:
    marks = result["marks"] + [(result["wall_s"], "end")]
    out = []
    for (t0, label), (t1, _) in zip(marks, marks[1:]):
        out.append({"label": label, "wall_s": t1 - t0,
                    "cpu_s": _cpu_at(result["samples"], t1) - _cpu_at(result["samples"], t0)})
    return out


def by_stage(segs: list[dict]) -> dict:
    stages: dict[str, dict] = {}
    current = "start-up"
    for seg in segs:
        label = seg["label"]
        for words, stage in STAGES:
            if words in label:
                current = stage
                break
        else:
            # "finished in", "done earlier", "done: ..." lines continue the stage they close
            if not re.search(r"finished in|done|skipped|identical|report written|left out", label):
                current = "other: " + label[:60]
        entry = stages.setdefault(current, {"wall_s": 0.0, "cpu_s": 0.0})
        entry["wall_s"] += seg["wall_s"]
        entry["cpu_s"] += seg["cpu_s"]
    return {k: {"wall_s": round(v["wall_s"], 1), "cpu_s": round(v["cpu_s"], 1)} for k, v in stages.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="name of this measurement (e.g. before, after)")
    parser.add_argument("--workdir", required=True, help="a fresh directory for the demo (must not exist)")
    parser.add_argument("--size", default="full", choices=["full", "smoke"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "demo_cost_cpu.json"))
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if workdir.exists():
        parser.error(f"{workdir} exists: the cost of a resumed demo is not the demo's cost")
    cmd = [sys.executable, "-m", "spin_mega", "demo", "--workdir", str(workdir), "--size", args.size, "--seed", str(args.seed)]
    load_before = os.getloadavg()
    result = run(cmd, dict(os.environ, PYTHONUNBUFFERED="1"))
    load_after = os.getloadavg()
    segs = segments(result)
    verdict = None
    report = workdir / "report" / "report.md"
    if report.is_file():
        verdict = next((l for l in report.read_text().splitlines() if l.startswith("SPIN ")), None)
    record = {
        "label": args.label, "note": args.note, "size": args.size, "seed": args.seed,
        "cpu_model": _cpu_model(), "cpus": os.cpu_count(),
        "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "exit_code": result["code"], "wall_s": round(result["wall_s"], 1), "cpu_s": round(result["cpu_s"], 1),
        "cpu_s_reaped": round(result["cpu_s_reaped"], 1),
        "peak_rss_gb_largest_process": round(result["peak_rss_gb_largest_process"], 2),
        "load_average_before": [round(x, 2) for x in load_before], "load_average_after": [round(x, 2) for x in load_after],
        "stages": by_stage(segs), "processes": result["processes"], "verdict": verdict,
        "segments": [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in s.items()} for s in segs],
    }
    if result["code"] != 0:
        record["tail"] = result["tail"]
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.is_file() else []
    records.append(record)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("label", "wall_s", "cpu_s", "stages", "processes", "verdict", "load_average_before",
                                             "load_average_after")}, indent=1))
    return result["code"]


if __name__ == "__main__":
    sys.exit(main())
