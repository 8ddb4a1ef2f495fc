"""`spin-mega demo`: the embedded default, end to end on CPU in minutes.

Builds a tiny Llama and its tokenizer from files shipped in the package, fine-tunes it briefly into a weak
SFT model (theta_0), runs SPIN iterations through the same loop as `spin-mega run`, continues plain SFT
for the same number of steps as the paper's control, evaluates both on held-out prompts and writes the
report, which says whether SPIN beat the control in this run.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
from pathlib import Path
from typing import Optional

import yaml

from spin_mega.config import config_from_dict
from spin_mega.loop import SpinLoop, log


def demo_config(workdir: Path, start_model: Path, iterations: int, backend: Optional[str]) -> dict:
    from spin_mega.demo.build import asset_path

    raw = yaml.safe_load(importlib.resources.files("spin_mega.configs").joinpath("tiny-cpu.yaml").read_text())
    raw["start_model"] = str(start_model)
    raw["data"].update(train_path=str(asset_path("train")), schema="prompt_response")
    raw["eval"]["eval_path"] = str(asset_path("heldout"))
    raw["iterations"]["num_iterations"] = iterations
    raw["generation"]["backend"] = backend or ("vllm" if importlib.util.find_spec("vllm") else "hf")
    return raw


def run_demo(workdir: Path, iterations: int = 2, backend: Optional[str] = None, overrides: Optional[list[str]] = None) -> int:
    from spin_mega.demo.build import asset_path, build_demo_start_model, sft_warmup

    workdir.mkdir(parents=True, exist_ok=True)
    log(f"demo in {workdir}: building the tokenizer, a tiny Llama and its SFT warm-up (theta_0)")
    start = build_demo_start_model(workdir / "start", log_every=50)
    cfg = config_from_dict(demo_config(workdir, start, iterations, backend), overrides)
    loop = SpinLoop(cfg, workdir)
    code = loop.run()
    if code != 0:
        return code

    control_dir = workdir / "sft_control"
    spin_steps = sum(it["train"]["steps"] for it in loop.write_summary()["iterations"])
    if not (workdir / "sft_control_eval.json").is_file():
        log(f"SFT control: continuing SFT of theta_0 for {spin_steps} steps (the paper's comparison)")
        sft_warmup(start, asset_path("train"), spin_steps, lr=3e-4, out_dir=control_dir, batch_size=cfg.train.global_batch_size)
        loop._evaluate(control_dir, workdir / "sft_control_eval.json", start, workdir / "iter_0" / "heldout_generations.jsonl")
    control = json.loads((workdir / "sft_control_eval.json").read_text())
    loop.write_summary({"sft_control": {"steps": spin_steps, "eval": control}})
    from spin_mega.report import write_report

    report = write_report(workdir)
    log(f"report: {report}")
    return 0
