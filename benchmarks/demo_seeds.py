"""The demo's outcome over several seeds: `spin-mega demo --seed S` per seed, then one JSON of the results.

    .venv/bin/python benchmarks/demo_seeds.py --seeds 0 1 2 --root demo-seeds
    .venv/bin/python benchmarks/demo_seeds.py --seeds 0 1 2 --root demo-seeds --collect-only

Each seed changes the tiny model's initialisation, the SFT order, the sampling and the SPIN training; the
data and the grids stay the same. Per seed it records theta_0, SPIN's last iteration and the SFT control
on the test split (exact match with one standard error), McNemar's p-value for SPIN against the control
and against theta_0, the verdict sentence of the report, the chosen learning rates with their grids, the
SPIN signature gates and the wall time of the seed's demo (with the machine's load average, since the
machine these numbers come from may be shared). Writes benchmarks/results/demo_seeds.json (or --out).
Re-running resumes every seed's demo where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _seed_result(workdir: Path) -> dict:
    from spin_mega.evaluation.significance import mean_and_se
    from spin_mega.report.load import load_run
    from spin_mega.report.markdown import paired_comparison, signatures
    from spin_mega.rundir import SUMMARY

    run = load_run(workdir)
    summary = json.loads((workdir / SUMMARY).read_text())
    last = [it for it in run.iterations if it.finished][-1]
    control = run.sft_control["eval"]

    def arm(ev: dict) -> dict:
        p, se = mean_and_se(ev["exact_match_items"])
        return {"exact_match": p, "se": se, "n": len(ev["exact_match_items"])}

    vs_control = paired_comparison(last.eval, control)
    vs_theta0 = paired_comparison(last.eval, run.baseline)
    report = (workdir / "report" / "report.md").read_text()
    verdict = next(line for line in report.splitlines() if line.startswith("SPIN "))
    demo = summary["demo"]
    return {
        "theta0": arm(run.baseline),
        "spin": arm(last.eval) | {"iteration": last.t},
        "spin_per_iteration": [arm(it.eval) | {"iteration": it.t} for it in run.iterations if it.finished],
        "control": arm(control) | {"steps": summary["sft_control"]["steps"]},
        "spin_vs_control": {"word": vs_control.word, "p_value": vs_control.p_value,
                            "spin_only": vs_control.a_only, "control_only": vs_control.b_only},
        "spin_vs_theta0": {"word": vs_theta0.word, "p_value": vs_theta0.p_value,
                           "spin_only": vs_theta0.a_only, "theta0_only": vs_theta0.b_only},
        "verdict": verdict,
        "spin_lr": demo["spin"]["chosen_lr"],
        "spin_grid": demo["spin"]["candidates"],
        "control_lr": demo["control"]["chosen_lr"],
        "control_grid": demo["control"]["candidates"],
        "theta0_sft": {k: demo["theta0"][k] for k in ("steps", "kept_step", "validation_nll", "train_nll")},
        "theta0_validation_exact_match": demo["theta0_validation_exact_match"],
        "pairs_per_iteration": [it["generation"]["num_prompts"] - it["generation"]["identical_to_human"]
                                for it in summary["iterations"]],
        "gates": {f"iteration {it.t}": {name: ok for name, (ok, _) in (signatures(it) or {}).items()}
                  for it in run.iterations},
    }


def _partial(workdir: Path) -> dict:
    """What an unfinished seed has measured so far, so that a stopped run is recorded as such, not hidden."""
    out: dict = {"finished": False}
    info = workdir / "start" / "sft" / "spin_mega_build.json"
    if info.is_file():
        sft = json.loads(info.read_text())
        out["theta0_sft"] = {"steps": sft["steps"], "kept_step": sft["kept_step"], "validation": sft["validation"]}
    out["spin_grid"] = [json.loads(p.read_text()) for p in sorted((workdir / "grid").glob("spin_lr_*/validation.json"))]
    out["control_grid"] = [json.loads(p.read_text()) for p in sorted((workdir / "grid").glob("control_lr_*.json"))]
    summary = workdir / "summary.json"
    if summary.is_file():
        out["summary"] = json.loads(summary.read_text())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=Path("demo-seeds"), help="one demo work directory per seed under here")
    parser.add_argument("--size", default="full", choices=["full", "smoke"])
    parser.add_argument("--backend", default=None, choices=["vllm", "hf"])
    parser.add_argument("--collect-only", action="store_true", help="only read the finished seeds' results")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "demo_seeds.json")
    args = parser.parse_args(argv)

    results = {}
    for seed in args.seeds:
        workdir = args.root / f"seed_{seed}"
        timing = workdir / "demo_wall_time.json"
        if not timing.is_file():
            if args.collect_only:
                print(f"seed {seed}: no finished demo in {workdir}; recording what it measured so far", file=sys.stderr)
                results[str(seed)] = _partial(workdir)
                continue
            cmd = [sys.executable, "-m", "spin_mega", "demo", "--size", args.size, "--seed", str(seed), "--workdir", str(workdir)]
            if args.backend:
                cmd += ["--backend", args.backend]
            resumed = (workdir / "start").exists()
            load_before = os.getloadavg()
            start = time.perf_counter()
            code = subprocess.call(cmd)
            wall = time.perf_counter() - start
            if code != 0:
                print(f"seed {seed}: the demo exited {code}", file=sys.stderr)
                return code
            workdir.mkdir(parents=True, exist_ok=True)
            # A demo resumed from an interrupted earlier call would time only its remainder: the record says so.
            timing.write_text(json.dumps({"wall_s": wall, "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
                                          "resumed": resumed}))
        results[str(seed)] = _seed_result(workdir) | {"finished": True, "timing": json.loads(timing.read_text())}

    finished = {seed: r for seed, r in results.items() if r["finished"]}
    words = [r["spin_vs_control"]["word"] for r in finished.values()]
    out = {
        "benchmark": "demo_seeds",
        "size": args.size,
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "is_gpu": False,
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "seeds": results,
        "spin_vs_control": {w: words.count(w) for w in ("beat", "tied with", "lost to")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["spin_vs_control"]))
    for seed, r in finished.items():
        print(f"seed {seed}: theta0 {r['theta0']['exact_match']:.3f}±{r['theta0']['se']:.3f}  "
              f"SPIN {r['spin']['exact_match']:.3f}±{r['spin']['se']:.3f}  control {r['control']['exact_match']:.3f}±{r['control']['se']:.3f}  "
              f"p={r['spin_vs_control']['p_value']:.3g} ({r['spin_vs_control']['word']})  lr SPIN {r['spin_lr']:g} control {r['control_lr']:g}  "
              f"wall {r['timing']['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
