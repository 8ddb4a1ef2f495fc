"""The SPIN loop (`spin-mega run`): for t = 0..T-1, theta_t generates, theta_(t+1) is trained against it.

Every stage runs in processes of its own (vLLM engines, the training ranks, the converter, the evaluation),
on this node or as srun steps across a Slurm allocation (spin_mega/loop/local.py, spin_mega/loop/slurm.py):
memory is returned between stages and a crash in one stage leaves the others' outputs intact. Each stage
writes its outputs under a temporary name, renames them into place and then marks itself done, so
re-running the same command resumes at the first unfinished stage. The run directory's layout and its
protocol (what "done" means, the lock, the config record that binds a resume) are spin_mega/rundir.py's.

Start-up checks everything a run reads before anything is written: the config's cross-key rules, every input
path, the held-out rows and (when a prompts stage is still to run) the SFT data. Only then is the work
directory locked and the config recorded.
"""

from __future__ import annotations

import functools
import json
import random
import time
from pathlib import Path
from typing import Callable, Optional

from spin_mega.config import SpinConfig, config_from_dict, config_to_dict, iteration_lr, per_iteration, validate_run
from spin_mega.errors import SpinMegaError, TrainingUnhealthy
from spin_mega.io import atomic_write_json, atomic_write_text, read_jsonl
from spin_mega.loop.local import LocalStages
from spin_mega.loop.slurm import SlurmStages
from spin_mega.loop.stages import Preempted, StageFailed, StageLauncher, log
from spin_mega.models import checkpoint as model_ckpt
from spin_mega.rundir import (
    ALL_GENERATIONS, BASELINE_EVAL, CONFIG, EVAL, EXIT_PREEMPTED, GENERATIONS, HELDOUT, HELDOUT_GENERATIONS, HF_DIR,
    LOGS_DIR, METRICS, PAIRS, PREEMPTED_MARKER, PROMPT_COUNTS, PROMPTS, START_HF, START_MCORE, SUMMARY, TRAIN_DIR,
    TRAIN_SUMMARY, check_resume, hold_lock, is_done, iteration_dir, mark_done, read_resolved_config, read_stop,
    write_resolved_config,
)

HELDOUT_PREFIX = "heldout/"


def make_launcher(kind: str, cfg: SpinConfig, workdir: Path, ranks_per_node: int) -> StageLauncher:
    if kind == "local":
        return LocalStages(cfg, workdir, ranks_per_node)
    if kind == "slurm":
        return SlurmStages(cfg, workdir, ranks_per_node)
    raise SpinMegaError(f"--launcher is local or slurm, not {kind!r}")


class SpinLoop:
    def __init__(self, cfg: SpinConfig, workdir: Path, nproc: int = 1, launcher: str = "local"):
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.nproc = nproc
        self.config_path = self.workdir / CONFIG
        # Starts every stage in processes of its own: on this node, or as srun steps across an allocation.
        self.stages = make_launcher(launcher, cfg, self.workdir, nproc)

    # ---- bookkeeping --------------------------------------------------------------------------------
    def _stage(self, stage_dir: Path, stage: str, label: str, fn: Callable[[], None]) -> None:
        if is_done(stage_dir, stage):
            log(f"{label}: done earlier, skipped")
            return
        log(f"{label}: starting")
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        mark_done(stage_dir, stage, seconds)
        log(f"{label}: finished in {seconds:.1f} s")

    def check_start(self) -> None:
        """Everything the run reads, checked before anything is written (refusals name the key or file)."""
        from spin_mega.training.inputs import check_inputs

        validate_run(self.cfg)
        check_inputs(self.cfg, loop=True)
        _ = self.heldout_rows  # read and checked now, not at the first evaluation
        if any(not is_done(iteration_dir(self.workdir, t), "prompts") for t in range(self.cfg.iterations.num_iterations)):
            _ = self.sft_rows

    def _record_config(self) -> None:
        """Compares the config with the one this work directory's results came from (rundir.check_resume),
        then records it: under the lock, after the start-up checks."""
        resolved = config_to_dict(self.cfg)
        check_resume(self.workdir, resolved, defaults=config_to_dict(SpinConfig()))
        write_resolved_config(self.config_path, resolved)

    # ---- models of each iteration -------------------------------------------------------------------
    def hf_model(self, t: int) -> Path:
        """theta_t as an HF directory."""
        if t == 0:
            start = Path(self.cfg.start_model)
            if (start / "config.json").is_file():
                return start
            return self.workdir / START_HF
        return iteration_dir(self.workdir, t - 1) / HF_DIR

    def mcore_model(self, t: int) -> Path:
        """theta_t as a Megatron checkpoint."""
        if t == 0:
            start = Path(self.cfg.start_model)
            return start if model_ckpt.is_model_checkpoint(start) else self.workdir / START_MCORE
        from spin_mega.training.checkpoint import latest_checkpoint

        path = latest_checkpoint(iteration_dir(self.workdir, t - 1) / TRAIN_DIR)
        if path is None:
            raise SpinMegaError(f"iteration {t - 1} has no final checkpoint; its training did not finish")
        return path

    # ---- stages -------------------------------------------------------------------------------------
    def _import_start(self) -> None:
        start = Path(self.cfg.start_model)
        if model_ckpt.is_model_checkpoint(start):
            self._stage(self.workdir, "export_start", "export theta_0 to HF", lambda: self._export(start, self.workdir / START_HF))
        else:
            def run():
                self.stages.convert(
                    ["hf-to-mcore", "--hf", str(start), "--out", str(self.workdir / START_MCORE),
                     "--tp", str(self.cfg.parallel.tensor_parallel), "--pp", str(self.cfg.parallel.pipeline_parallel),
                     "--ep", str(self.cfg.parallel.expert_parallel)],
                    "importing the start model", self.workdir / LOGS_DIR / "convert.log",
                )
            self._stage(self.workdir, "import_start", "import theta_0 into Megatron format", run)

    def _export(self, mcore: Path, out: Path) -> None:
        self.stages.convert(["mcore-to-hf", "--mcore", str(mcore), "--out", str(out)],
                            f"exporting {mcore}", self.workdir / LOGS_DIR / "convert.log")

    @functools.cached_property
    def sft_rows(self) -> tuple:
        """(the SFT rows with a usable prompt and response, what loading counted, how many were skipped):
        read once per run, at start-up, so that bad data is refused before any stage runs."""
        from spin_mega.data import drop_incomplete, load_rows

        counts: dict = {}
        rows = load_rows(self.cfg.data.train_path, self.cfg.data.schema, counts=counts)
        rows, skipped = drop_incomplete(rows)
        if len(rows) == 0:
            raise SpinMegaError(f"data.train_path {self.cfg.data.train_path} has no row with a usable prompt and response")
        return rows, counts, skipped

    def _prompts(self, t: int, it_dir: Path) -> None:
        from spin_mega.data import subsample

        rows, counts, skipped = self.sft_rows
        if skipped:
            log(f"iteration {t}: {skipped} SFT rows without a usable prompt or response skipped")
        if counts["multi_turn_first_turn_only"]:
            log(f"iteration {t}: {counts['multi_turn_first_turn_only']} multi-turn conversations contribute their first turn only")
        draw = t if self.cfg.iterations.resample_prompts else 0
        rows = subsample(rows, self.cfg.iterations.num_prompts, seed=self.cfg.data.shuffle_seed + draw)
        atomic_write_json(it_dir / PROMPT_COUNTS, dict(counts, skipped=skipped, sampled=len(rows)))
        out = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "response": r["response"]} for r in rows]
        for r in self.heldout_rows:
            out.append({"prompt_id": HELDOUT_PREFIX + str(r["prompt_id"]), "prompt": r["prompt"], "response": r["response"]})
        atomic_write_text(it_dir / PROMPTS, "".join(json.dumps(r) + "\n" for r in out))

    @functools.cached_property
    def heldout_rows(self) -> list[dict]:
        """The held-out rows of data.eval_path, read and checked once per run at start-up (every evaluation
        and the prompt files use them); none without data.eval_path."""
        if not self.cfg.data.eval_path:
            return []
        from spin_mega.evaluation.heldout import load_heldout

        return load_heldout(self.cfg.data.eval_path, self.cfg.eval.max_samples)

    def _generate(self, t: int, it_dir: Path) -> None:
        combined = it_dir / ALL_GENERATIONS
        seed = self.cfg.generation.seed + t
        # Sharded over the launcher's engines (each shard index set explicitly, never read from the
        # SLURM_PROCID/SLURM_NTASKS of an enclosing allocation) and merged into `combined`.
        self.stages.generate(
            [str(self.config_path), "--model", str(self.hf_model(t)), "--data", str(it_dir / PROMPTS),
             "--set", f"generation.seed={seed}"],
            combined, f"generation of iteration {t}", it_dir / LOGS_DIR,
        )
        rows = read_jsonl(combined)
        train = [r for r in rows if not str(r["prompt_id"]).startswith(HELDOUT_PREFIX)]
        heldout = []
        for r in rows:
            if str(r["prompt_id"]).startswith(HELDOUT_PREFIX):
                heldout.append(dict(r, prompt_id=str(r["prompt_id"])[len(HELDOUT_PREFIX) :]))
        atomic_write_text(it_dir / HELDOUT_GENERATIONS, "".join(json.dumps(r) + "\n" for r in heldout))
        atomic_write_text(it_dir / GENERATIONS, "".join(json.dumps(r) + "\n" for r in train))

    def _pairs(self, t: int, it_dir: Path) -> None:
        rows, identical = [], 0
        first = max(0, t - self.cfg.iterations.mix_previous_iterations)
        for s in range(first, t + 1):
            for r in read_jsonl(iteration_dir(self.workdir, s) / GENERATIONS):
                # A generation equal to the human response gives chosen == rejected: its loss is the constant
                # l(0) with zero gradient, so it would only dilute the batch and the reward accuracy.
                if str(r["rejected"]).strip() == str(r["chosen"]).strip():
                    identical += 1
                    continue
                rows.append({"prompt_id": f"{r['prompt_id']}@{s}", "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
        if identical:
            log(f"iteration {t}: {identical} generations identical to the human response left out of the pairs")
        if not rows:
            raise SpinMegaError(f"iteration {t}: every generation equals its human response; SPIN has nothing left to learn")
        random.Random(self.cfg.data.shuffle_seed + t).shuffle(rows)
        atomic_write_text(it_dir / PAIRS, "".join(json.dumps(r) + "\n" for r in rows))

    def training_overrides(self, t: int, it_dir: Path) -> list[str]:
        """What iteration t's training changes in the run's config: its start, its pairs and, where the run
        has per-iteration schedules, this iteration's entry in place of optim.lr / loss.beta. Nothing else:
        every other key the user set reaches the training as written."""
        from spin_mega.training.trackers import iteration_overrides

        overrides = [
            "--set", f"start_model={self.mcore_model(t)}",
            "--set", f"data.train_path={it_dir / PAIRS}",
            "--set", "data.schema=pairs",
        ]
        for schedule, key in ((self.cfg.iterations.lr, "optim.lr"), (self.cfg.iterations.beta, "loss.beta")):
            if schedule is not None:
                overrides += ["--set", f"{key}={per_iteration(schedule, t)!r}"]
        return overrides + iteration_overrides(self.cfg.logging, self.workdir, t)

    def _train(self, t: int, it_dir: Path) -> None:
        args = ["train", str(self.config_path), "--workdir", str(it_dir / TRAIN_DIR), *self.training_overrides(t, it_dir)]
        self._refuse_unhealthy(t, it_dir)
        try:
            self.stages.train(args, f"training of iteration {t}", it_dir / LOGS_DIR / "train.log", it_dir / TRAIN_DIR / PREEMPTED_MARKER)
        except StageFailed:
            self._refuse_unhealthy(t, it_dir)  # under torchrun the trainer's own status arrives as 1
            raise

    def _refuse_unhealthy(self, t: int, it_dir: Path) -> None:
        """theta_(t+1) is not exported, generated from or evaluated once its training stopped unhealthy."""
        record = read_stop(it_dir / TRAIN_DIR)
        if record is None:
            return
        raise TrainingUnhealthy(
            f"iteration {t}'s training stopped before the update of step {record['step']}: {record['cause']}; "
            f"theta_{t + 1} was not exported, generated from or evaluated and earlier outputs are kept; lower "
            f"{'iterations.lr' if self.cfg.iterations.lr is not None else 'optim.lr'} (it is "
            f"{iteration_lr(self.cfg, t):g}) in a new --workdir, or delete "
            f"{self.config_path} and {it_dir / TRAIN_DIR} to retrain only this iteration"
        )

    def evaluate(self, model_dir: Path, out: Path, opponent: Optional[Path], heldout_pairs: Optional[Path]) -> None:
        """Evaluates MODEL_DIR on the run's held-out rows into OUT (against OPPONENT's generations in
        HELDOUT_PAIRS when given), as the loop's evaluation stage does."""
        # In a process of its own: a model loaded here would keep its memory (on a GPU, a CUDA context and
        # cached blocks on GPU 0) for the rest of the run.
        heldout = self.workdir / HELDOUT
        if not heldout.is_file():
            atomic_write_text(heldout, "".join(json.dumps(r) + "\n" for r in self.heldout_rows))
        args = ["--config", str(self.config_path), "--model", str(model_dir), "--heldout", str(heldout), "--out", str(out)]
        if opponent is not None:
            args += ["--opponent", str(opponent)]
        if heldout_pairs is not None:
            args += ["--pairs", str(heldout_pairs)]
        self.stages.evaluate(args, f"evaluation of {model_dir}", self.workdir / LOGS_DIR / "evaluate.log")

    def _iteration_summary(self, t: int) -> dict:
        it_dir = iteration_dir(self.workdir, t)
        metrics = read_jsonl(it_dir / TRAIN_DIR / METRICS)
        train_summary = it_dir / TRAIN_DIR / TRAIN_SUMMARY
        gens = read_jsonl(it_dir / GENERATIONS)
        last = metrics[-1] if metrics else {}

        def mean_tokens(key: str) -> float:
            return sum(len(str(r[key]).split()) for r in gens) / max(len(gens), 1)

        return {
            "iteration": t,
            "train": {
                "steps": len(metrics),
                "final_loss": last.get("loss"),
                "final_reward_accuracy": last.get("reward_accuracy"),
                "final_reward_margin": last.get("reward_margin"),
                "health": json.loads(train_summary.read_text()).get("health") if train_summary.is_file() else None,
            },
            "eval": json.loads((it_dir / EVAL).read_text()) if (it_dir / EVAL).is_file() else None,
            "generation": {
                "num_prompts": len(gens),
                "identical_to_human": sum(str(r["rejected"]).strip() == str(r["chosen"]).strip() for r in gens),
                "mean_response_tokens": mean_tokens("rejected"),
                "mean_chosen_tokens": mean_tokens("chosen"),
            },
            "prompts": json.loads((it_dir / PROMPT_COUNTS).read_text()) if (it_dir / PROMPT_COUNTS).is_file() else None,
        }

    def write_summary(self, extra: Optional[dict] = None) -> dict:
        summary_path = self.workdir / SUMMARY
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        iterations = []
        for t in range(self.cfg.iterations.num_iterations):
            if is_done(iteration_dir(self.workdir, t), "eval"):
                iterations.append(self._iteration_summary(t))
        summary["iterations"] = iterations
        baseline = self.workdir / BASELINE_EVAL
        if baseline.is_file():
            summary["baseline"] = {"eval": json.loads(baseline.read_text())}
        summary.update(extra or {})
        atomic_write_json(summary_path, summary)
        return summary

    def run(self, evaluate: bool = True) -> int:
        """evaluate=False stops every iteration after its export: no evaluation, summary or report (a later
        run with evaluation on the same work directory does them)."""
        self.check_start()
        with hold_lock(self.workdir):
            self._record_config()
            return self._run_stages(evaluate)

    def _run_stages(self, evaluate: bool) -> int:
        try:
            self._import_start()
            evaluating = evaluate and bool(self.heldout_rows or self.cfg.eval.lm_eval_tasks)
            if evaluating:
                self._stage(self.workdir, "baseline_eval", "evaluate theta_0",
                            lambda: self.evaluate(self.hf_model(0), self.workdir / BASELINE_EVAL, None, None))
            for t in range(self.cfg.iterations.num_iterations):
                it_dir = iteration_dir(self.workdir, t)
                it_dir.mkdir(parents=True, exist_ok=True)
                n = self.cfg.iterations.num_iterations
                self._stage(it_dir, "prompts", f"iteration {t + 1}/{n}: sample prompts", lambda: self._prompts(t, it_dir))
                self._stage(it_dir, "generate", f"iteration {t + 1}/{n}: generate with theta_{t}", lambda: self._generate(t, it_dir))
                self._stage(it_dir, "pairs", f"iteration {t + 1}/{n}: build pairs", lambda: self._pairs(t, it_dir))
                self._stage(it_dir, "train", f"iteration {t + 1}/{n}: train theta_{t + 1}", lambda: self._train(t, it_dir))
                self._stage(it_dir, "export", f"iteration {t + 1}/{n}: export theta_{t + 1} to HF",
                            lambda: self._export(self.mcore_model(t + 1), it_dir / HF_DIR))
                if not evaluate:
                    continue
                if evaluating:
                    self._stage(it_dir, "eval", f"iteration {t + 1}/{n}: evaluate theta_{t + 1}",
                                lambda: self.evaluate(it_dir / HF_DIR, it_dir / EVAL, self.hf_model(t), it_dir / HELDOUT_GENERATIONS))
                else:
                    mark_done(it_dir, "eval", 0.0, skipped=True)
                self.write_summary()
        except Preempted as exc:
            log(f"{exc}; re-run the same command to resume")
            return EXIT_PREEMPTED
        except TrainingUnhealthy:
            self.write_summary()  # the report shows the stopped iteration beside the finished ones
            from spin_mega.report import write_report

            write_report(self.workdir)
            raise
        if not evaluate:
            return 0
        summary = self.write_summary()
        try:
            from spin_mega.report import write_report

            report = write_report(self.workdir)
            log(f"report written to {report}")
        except ImportError:
            pass
        log(f"done: {len(summary['iterations'])} iterations in {self.workdir}")
        return 0


def load_run_config(config_path: Optional[str], overrides: list[str], workdir: Path) -> SpinConfig:
    """The config of a run: CONFIG + overrides, or for a resumed run without CONFIG the one saved in WORKDIR."""
    from spin_mega.config import load_config

    if config_path is None:
        saved = read_resolved_config(workdir / CONFIG)
        if saved is None:
            raise SpinMegaError(f"no config given and {workdir / CONFIG} does not exist")
        return config_from_dict(saved, overrides)
    return load_config(config_path, overrides)
