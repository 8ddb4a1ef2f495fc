"""`spin-mega demo`: the embedded default, a fair CPU-scale test of SPIN against continued SFT.

1. theta_0: a tiny Llama fine-tuned on the shipped SFT data until its validation loss stops improving
   beyond noise (build.build_demo_start_model), so that continued SFT is at a plateau.
2. SPIN's learning rate: one SPIN iteration per candidate of a small grid, all trained on the same pairs
   (theta_0's generations are made once and shared); the candidate whose theta_1 has the best validation
   exact match is kept, and its run continues for the remaining iterations at that learning rate, through
   the same loop as `spin-mega run`.
3. The SFT control: theta_0 trained further on the SFT data for as many steps as SPIN took, with the same
   optimizer and schedule family as SPIN's trainer (AdamW, 10% linear warm-up, linear decay, clipping 1.0),
   its learning rate chosen from its own grid on the same validation split.
4. theta_0, every SPIN iteration and the control are scored on the test split (`heldout`, never used to
   choose anything); the report compares them item by item (McNemar's test) and says beat / tied / lost
   only as the test allows.

Every step resumes: re-running the same command reuses what a previous run finished.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from spin_mega.config import config_from_dict
from spin_mega.errors import SpinMegaError
from spin_mega.io import atomic_write_json, read_jsonl
from spin_mega.loop.driver import SpinLoop
from spin_mega.loop.stages import log
from spin_mega.rundir import HELDOUT_GENERATIONS, HF_DIR, OPPONENT_LOGPS, TRAIN_DIR, is_done, iteration_dir, stage_files


@dataclass(frozen=True)
class DemoSize:
    """Everything that scales the demo; `smoke` runs the same code path in a fraction of the time (tests)."""

    sft_max_steps: int  # cap on theta_0's SFT; it normally stops earlier, at the validation plateau
    sft_eval_every: int
    sft_patience: int
    num_prompts: int  # SFT prompts theta_t answers per SPIN iteration
    test_samples: int
    validation_samples: int
    spin_lrs: tuple[float, ...]
    control_lrs: tuple[float, ...]


SIZES = {
    "full": DemoSize(sft_max_steps=1500, sft_eval_every=100, sft_patience=3, num_prompts=800, test_samples=600,
                     validation_samples=300, spin_lrs=(3e-5, 1e-4, 3e-4), control_lrs=(3e-5, 1e-4, 3e-4)),
    "smoke": DemoSize(sft_max_steps=40, sft_eval_every=20, sft_patience=1, num_prompts=32, test_samples=24,
                      validation_samples=16, spin_lrs=(1e-5, 1e-4), control_lrs=(1e-5, 1e-4)),
}

SFT_LR = 3e-3  # theta_0's from-scratch SFT: constant after warm-up, cut 0.3x at each measurement without a gain
# The two arms' shared optimizer family: Megatron's AdamW wrapper in SPIN's trainer, torch's AdamW for the control.
ARM_OPTIM = {"optimizer": "adamw", "adam_beta1": 0.9, "adam_beta2": 0.999, "weight_decay": 0.0,
             "warmup_ratio": 0.1, "decay": "linear", "clip_grad": 1.0}
OPTIM_NOTE = "AdamW (β 0.9/0.999, no weight decay), 10% linear warm-up then linear decay to 0, gradient clipping 1.0"

# Stage outputs of a SPIN run that do not depend on its learning rate: shared by every grid candidate.
# (Candidates run without evaluation, so theta_0's baseline evaluation is not among them: the demo's own run
# below does it once.)
SHARED_STAGES = stage_files("import_start")
SHARED_ITER0 = stage_files("prompts") + stage_files("generate") + stage_files("pairs")
# theta_0's log-probs of the shared pairs, which the trainer precomputes into its work directory and reuses.
SHARED_TRAIN = (OPPONENT_LOGPS,)


def demo_config(start_model: Path, iterations: int, backend: Optional[str], lr: float, size: DemoSize, seed: int) -> dict:
    from spin_mega.demo.build import asset_path

    raw = yaml.safe_load(importlib.resources.files("spin_mega.configs").joinpath("tiny-cpu.yaml").read_text())
    raw["start_model"] = str(start_model)
    raw["data"].update(train_path=str(asset_path("train")), eval_path=str(asset_path("heldout")), schema="prompt_response",
                       shuffle_seed=seed)
    raw["eval"].update(max_samples=size.test_samples)
    raw["iterations"].update(num_iterations=iterations, num_prompts=size.num_prompts)
    raw["optim"].update(ARM_OPTIM, lr=lr)
    raw["train"]["seed"] = seed
    raw["generation"]["seed"] = seed
    raw["generation"]["backend"] = backend or ("vllm" if importlib.util.find_spec("vllm") else "hf")
    return raw


def validation_exact_match(model_dir: Path, rows: list[dict], max_new_tokens: int) -> float:
    """Greedy exact match on validation rows: the only number the demo chooses by."""
    from spin_mega.evaluation.heldout import extract_answer, greedy_responses, load_hf

    model, tokenizer = load_hf(model_dir)
    responses = greedy_responses(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens)
    return sum(extract_answer(t) == str(r["answer"]).strip() for t, r in zip(responses, rows)) / len(rows)


def _best(candidates: list[dict]) -> dict:
    """The candidate with the best validation exact match; a tie goes to the smaller learning rate."""
    return max(candidates, key=lambda c: (c["validation_exact_match"], -c["lr"]))


def _copy_into(src: Path, dest: Path, names: tuple[str, ...]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (dest / name).exists() or not (src / name).exists():
            continue
        if (src / name).is_dir():
            shutil.copytree(src / name, dest / name)
        else:
            shutil.copy2(src / name, dest / name)


def _spin_grid(workdir: Path, start: Path, backend, overrides, size: DemoSize, seed: int, validation: list[dict]) -> dict:
    """One SPIN iteration per candidate learning rate on the same pairs; the validation scores of theta_1."""
    candidates = []
    first: Optional[Path] = None
    for lr in size.spin_lrs:
        cand_dir = workdir / "grid" / f"spin_lr_{lr:g}"
        score_path = cand_dir / "validation.json"
        if not score_path.is_file():
            if first is not None:
                _copy_into(first, cand_dir, SHARED_STAGES)
                _copy_into(iteration_dir(first, 0), iteration_dir(cand_dir, 0), SHARED_ITER0)
                _copy_into(iteration_dir(first, 0) / TRAIN_DIR, iteration_dir(cand_dir, 0) / TRAIN_DIR, SHARED_TRAIN)
            log(f"SPIN learning-rate grid: one iteration at lr {lr:g}")
            cfg = config_from_dict(demo_config(start, 1, backend, lr, size, seed), overrides)
            # Candidates are compared on validation only: their test-split evaluation and report would be
            # read by nobody (the chosen one is evaluated by the demo's own run below).
            code = SpinLoop(cfg, cand_dir).run(evaluate=False)
            if code != 0:
                raise SpinMegaError(f"the SPIN grid run at lr {lr:g} stopped with exit status {code}; re-run to resume")
            em = validation_exact_match(iteration_dir(cand_dir, 0) / HF_DIR, validation, cfg.eval.max_new_tokens)
            atomic_write_json(score_path, {"lr": lr, "validation_exact_match": em})
        candidates.append(json.loads(score_path.read_text()) | {"dir": str(cand_dir)})
        first = first or cand_dir
    return {"candidates": candidates}


def run_demo(workdir: Path, iterations: int = 2, backend: Optional[str] = None, overrides: Optional[list[str]] = None,
             size: str = "full", seed: int = 0) -> int:
    from spin_mega.demo.build import asset_path, build_demo_start_model, sft_warmup

    if size not in SIZES:
        raise SpinMegaError(f"unknown demo size {size!r} (known: {', '.join(SIZES)})")
    scale = SIZES[size]
    workdir.mkdir(parents=True, exist_ok=True)
    selection_path = workdir / "demo_selection.json"
    selection = json.loads(selection_path.read_text()) if selection_path.is_file() else {}
    if selection and (selection.get("size"), selection.get("seed")) != (size, seed):
        raise SpinMegaError(f"{workdir} holds a demo of size {selection.get('size')} and seed {selection.get('seed')}; "
                            "use a new --workdir for another size or seed")
    validation = read_jsonl(asset_path("validation"))[: scale.validation_samples]

    log(f"demo in {workdir}: building the tokenizer, a tiny Llama and its SFT to a validation plateau (theta_0)")
    start = build_demo_start_model(workdir / "start", seed=seed, sft_steps=scale.sft_max_steps, sft_lr=SFT_LR,
                                   validation=validation, eval_every=scale.sft_eval_every, patience=scale.sft_patience,
                                   log_every=scale.sft_eval_every)
    info = json.loads((start / "spin_mega_build.json").read_text())
    kept = next((h for h in info["validation"] if h["step"] == info["kept_step"]), {})
    eval_tokens = 32
    theta0 = {"steps": info["steps"], "kept_step": info["kept_step"], "eval_every": scale.sft_eval_every,
              "patience": scale.sft_patience, "validation_nll": kept.get("validation_nll"), "train_nll": kept.get("train_nll"),
              "history": info["validation"]}

    if "spin" not in selection:
        grid = _spin_grid(workdir, start, backend, overrides, scale, seed, validation)
        chosen = _best(grid["candidates"])
        selection = {"size": size, "seed": seed, "theta0": theta0, "optimizer": OPTIM_NOTE,
                     "theta0_validation_exact_match": validation_exact_match(start, validation, eval_tokens),
                     "spin": {"candidates": [{k: c[k] for k in ("lr", "validation_exact_match")} for c in grid["candidates"]],
                              "chosen_lr": chosen["lr"], "dir": chosen["dir"],
                              "note": "chosen after iteration 0 and kept for every iteration"}}
        atomic_write_json(selection_path, selection)
    spin = selection["spin"]

    # The chosen candidate's finished iteration 0 becomes this run's; the loop then resumes at iteration 1.
    chosen_dir = Path(spin["dir"])
    _copy_into(chosen_dir, workdir, SHARED_STAGES)
    if not is_done(iteration_dir(workdir, 0), "eval"):
        shutil.copytree(iteration_dir(chosen_dir, 0), iteration_dir(workdir, 0), dirs_exist_ok=True)
    cfg = config_from_dict(demo_config(start, iterations, backend, spin["chosen_lr"], scale, seed), overrides)
    loop = SpinLoop(cfg, workdir)
    code = loop.run()
    if code != 0:
        return code

    spin_steps = sum(it["train"]["steps"] for it in loop.write_summary()["iterations"])
    if "control" not in selection:
        candidates = []
        for lr in scale.control_lrs:
            cand_dir = workdir / "grid" / f"control_lr_{lr:g}"
            score_path = workdir / "grid" / f"control_lr_{lr:g}.json"
            if not score_path.is_file():
                log(f"SFT control grid: {spin_steps} steps of continued SFT at lr {lr:g}")
                sft_warmup(start, asset_path("train"), spin_steps, lr, cand_dir, batch_size=cfg.train.global_batch_size,
                           seed=seed, decay=ARM_OPTIM["decay"], warmup_ratio=ARM_OPTIM["warmup_ratio"],
                           betas=(ARM_OPTIM["adam_beta1"], ARM_OPTIM["adam_beta2"]))
                atomic_write_json(score_path, {"lr": lr, "validation_exact_match": validation_exact_match(cand_dir, validation, eval_tokens)})
            candidates.append(json.loads(score_path.read_text()))
        chosen = _best(candidates)
        selection["control"] = {"candidates": candidates, "chosen_lr": chosen["lr"], "steps": spin_steps}
        atomic_write_json(selection_path, selection)
    control = selection["control"]
    control_dir = workdir / "grid" / f"control_lr_{control['chosen_lr']:g}"
    if not (workdir / "sft_control_eval.json").is_file():
        log(f"SFT control: evaluating the lr {control['chosen_lr']:g} control on the test split")
        loop.evaluate(control_dir, workdir / "sft_control_eval.json", start, iteration_dir(workdir, 0) / HELDOUT_GENERATIONS)
    control_eval = json.loads((workdir / "sft_control_eval.json").read_text())
    loop.write_summary({"sft_control": {"steps": control["steps"], "lr": control["chosen_lr"], "eval": control_eval},
                        "demo": {k: v for k, v in selection.items() if k not in ("size", "seed")}})
    from spin_mega.report import write_report

    report = write_report(workdir)
    log(f"report: {report}")
    return 0
