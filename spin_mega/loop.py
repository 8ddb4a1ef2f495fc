"""The SPIN loop (`spin-mega run`): for t = 0..T-1, theta_t generates, theta_(t+1) is trained against it.

Every stage runs in processes of its own (vLLM engines, the training ranks, the converter, the evaluation),
on this node or as srun steps across a Slurm allocation (spin_mega/loop_stages.py): memory is returned
between stages and a crash in one stage leaves the others' outputs intact. Each stage writes its outputs under a temporary name, renames them into
place and then marks itself done, so re-running the same command resumes at the first unfinished stage.

    WORKDIR/config.yaml                    the resolved config (a re-run must not change it silently)
    WORKDIR/start_mcore/                   theta_0 imported into Megatron format (when it starts from HF)
    WORKDIR/heldout.jsonl                  the held-out rows every evaluation reads
    WORKDIR/baseline_eval.json             evaluation of theta_0
    WORKDIR/iter_<t>/prompts.jsonl         this iteration's SFT prompts (+ held-out prompts)
    WORKDIR/iter_<t>/generations.jsonl     prompt_id, prompt, chosen (human), rejected (theta_t), meta
    WORKDIR/iter_<t>/heldout_generations.jsonl
    WORKDIR/iter_<t>/pairs.jsonl           this iteration's pairs plus earlier iterations' (mixing)
    WORKDIR/iter_<t>/train/                spin-mega train's work directory (checkpoints, metrics.jsonl)
    WORKDIR/iter_<t>/hf/                   theta_(t+1) exported for vLLM, evaluation and the user
    WORKDIR/iter_<t>/eval.json             evaluation of theta_(t+1)
    WORKDIR/summary.json                   one entry per finished iteration
    WORKDIR/report/                        plots and report.md
"""

from __future__ import annotations

import functools
import json
import random
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from spin_mega.config import SpinConfig, config_from_dict, config_to_dict, dump_config, per_iteration
from spin_mega.errors import SpinMegaError, TrainingUnhealthy
from spin_mega.io import atomic_write_json, atomic_write_text, read_jsonl
from spin_mega.loop_stages import EXIT_PREEMPTED, Preempted, StageFailed, log, make_launcher, spin_mega_cmd  # noqa: F401
from spin_mega.models import checkpoint as model_ckpt

HELDOUT_PREFIX = "heldout/"


class SpinLoop:
    def __init__(self, cfg: SpinConfig, workdir: Path, nproc: int = 1, sft_data: Optional[str] = None,
                 launcher: str = "local"):
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.nproc = nproc
        self.sft_data = sft_data or cfg.data.train_path
        self.config_path = self.workdir / "config.yaml"
        # Starts every stage in processes of its own: on this node, or as srun steps across an allocation.
        self.stages = make_launcher(launcher, cfg, self.workdir, nproc)

    # ---- bookkeeping --------------------------------------------------------------------------------
    def _done(self, stage_dir: Path, stage: str) -> bool:
        return (stage_dir / f".done.{stage}").is_file()

    def _mark(self, stage_dir: Path, stage: str, seconds: float) -> None:
        atomic_write_json(stage_dir / f".done.{stage}", {"seconds": round(seconds, 2), "finished": time.time()})

    def _stage(self, stage_dir: Path, stage: str, label: str, fn: Callable[[], None]) -> None:
        if self._done(stage_dir, stage):
            log(f"{label}: done earlier, skipped")
            return
        log(f"{label}: starting")
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        self._mark(stage_dir, stage, seconds)
        log(f"{label}: finished in {seconds:.1f} s")

    def _write_config(self) -> None:
        resolved = config_to_dict(self.cfg)
        if self.config_path.is_file():
            previous = yaml.safe_load(self.config_path.read_text())
            if previous != resolved:
                changed = sorted(k for k in set(previous) | set(resolved) if previous.get(k) != resolved.get(k))
                raise SpinMegaError(
                    f"{self.workdir} holds a run with a different config (sections differing: {', '.join(changed)}); "
                    "use a new --workdir, or delete its config.yaml to continue with the new settings"
                )
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.config_path)

    # ---- models of each iteration -------------------------------------------------------------------
    def hf_model(self, t: int) -> Path:
        """theta_t as an HF directory."""
        if t == 0:
            start = Path(self.cfg.start_model)
            if (start / "config.json").is_file():
                return start
            return self.workdir / "start_hf"
        return self.workdir / f"iter_{t - 1}" / "hf"

    def mcore_model(self, t: int) -> Path:
        """theta_t as a Megatron checkpoint."""
        if t == 0:
            start = Path(self.cfg.start_model)
            return start if model_ckpt.is_model_checkpoint(start) else self.workdir / "start_mcore"
        from spin_mega.training.checkpoint import latest_checkpoint

        path = latest_checkpoint(self.workdir / f"iter_{t - 1}" / "train")
        if path is None:
            raise SpinMegaError(f"iteration {t - 1} has no final checkpoint; its training did not finish")
        return path

    # ---- stages -------------------------------------------------------------------------------------
    def _import_start(self) -> None:
        start = Path(self.cfg.start_model)
        if model_ckpt.is_model_checkpoint(start):
            self._stage(self.workdir, "export_start", "export theta_0 to HF", lambda: self._export(start, self.workdir / "start_hf"))
        else:
            def run():
                self.stages.convert(
                    ["hf-to-mcore", "--hf", str(start), "--out", str(self.workdir / "start_mcore"),
                     "--tp", str(self.cfg.parallel.tensor_parallel), "--pp", str(self.cfg.parallel.pipeline_parallel)],
                    "importing the start model", self.workdir / "logs" / "convert.log",
                )
            self._stage(self.workdir, "import_start", "import theta_0 into Megatron format", run)

    def _export(self, mcore: Path, out: Path) -> None:
        self.stages.convert(["mcore-to-hf", "--mcore", str(mcore), "--out", str(out)],
                            f"exporting {mcore}", self.workdir / "logs" / "convert.log")

    def _prompts(self, t: int, it_dir: Path) -> None:
        from spin_mega.data import drop_incomplete, load_rows, subsample

        counts: dict = {}
        rows = load_rows(self.sft_data, self.cfg.data.schema, counts=counts)
        rows, skipped = drop_incomplete(rows)
        if skipped:
            log(f"iteration {t}: {skipped} SFT rows without a usable prompt or response skipped")
        if counts["multi_turn_first_turn_only"]:
            log(f"iteration {t}: {counts['multi_turn_first_turn_only']} multi-turn conversations contribute their first turn only")
        draw = t if self.cfg.iterations.resample_prompts else 0
        rows = subsample(rows, self.cfg.iterations.num_prompts, seed=self.cfg.data.shuffle_seed + draw)
        atomic_write_json(it_dir / "prompts_counts.json", dict(counts, skipped=skipped, sampled=len(rows)))
        out = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "response": r["response"]} for r in rows]
        for r in self.heldout_rows:
            out.append({"prompt_id": HELDOUT_PREFIX + str(r["prompt_id"]), "prompt": r["prompt"], "response": r["response"]})
        atomic_write_text(it_dir / "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in out))

    @functools.cached_property
    def heldout_rows(self) -> list[dict]:
        """The held-out rows, read once per run (every evaluation and the prompt files use them)."""
        path = self.cfg.eval.eval_path or self.cfg.data.eval_path
        if not path:
            return []
        rows = read_jsonl(path) if str(path).endswith(".jsonl") else None
        if rows is None:
            from spin_mega.generation.runner import load_sft_rows

            rows = load_sft_rows(path, "auto")
        for i, r in enumerate(rows):
            r.setdefault("prompt_id", f"heldout-{i}")
        return rows[: self.cfg.eval.max_samples]

    def _generate(self, t: int, it_dir: Path) -> None:
        combined = it_dir / "all_generations.jsonl"
        seed = self.cfg.generation.seed + t
        # Sharded over the launcher's engines (each shard index set explicitly, never read from the
        # SLURM_PROCID/SLURM_NTASKS of an enclosing allocation) and merged into `combined`.
        self.stages.generate(
            [str(self.config_path), "--model", str(self.hf_model(t)), "--data", str(it_dir / "prompts.jsonl"),
             "--set", f"generation.seed={seed}"],
            combined, f"generation of iteration {t}", it_dir / "logs",
        )
        rows = read_jsonl(combined)
        train = [r for r in rows if not str(r["prompt_id"]).startswith(HELDOUT_PREFIX)]
        heldout = []
        for r in rows:
            if str(r["prompt_id"]).startswith(HELDOUT_PREFIX):
                heldout.append(dict(r, prompt_id=str(r["prompt_id"])[len(HELDOUT_PREFIX) :]))
        atomic_write_text(it_dir / "heldout_generations.jsonl", "".join(json.dumps(r) + "\n" for r in heldout))
        atomic_write_text(it_dir / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in train))

    def _pairs(self, t: int, it_dir: Path) -> None:
        rows, identical = [], 0
        first = max(0, t - self.cfg.iterations.mix_previous_iterations)
        for s in range(first, t + 1):
            for r in read_jsonl(self.workdir / f"iter_{s}" / "generations.jsonl"):
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
        atomic_write_text(it_dir / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def _train(self, t: int, it_dir: Path) -> None:
        from spin_mega.training.trackers import iteration_overrides

        args = [
            "train", str(self.config_path), "--workdir", str(it_dir / "train"),
            "--set", f"start_model={self.mcore_model(t)}",
            "--set", f"data.train_path={it_dir / 'pairs.jsonl'}",
            "--set", "data.schema=pairs",
            "--set", f"optim.lr={per_iteration(self.cfg.iterations.lr, t)}",
            "--set", f"loss.beta={per_iteration(self.cfg.iterations.beta, t)}",
            *iteration_overrides(self.cfg.logging, self.workdir, t),
        ]
        from spin_mega.training.trainer import PREEMPTED_MARKER

        self._refuse_unhealthy(t, it_dir)
        try:
            self.stages.train(args, f"training of iteration {t}", it_dir / "logs" / "train.log", it_dir / "train" / PREEMPTED_MARKER)
        except StageFailed:
            self._refuse_unhealthy(t, it_dir)  # under torchrun the trainer's own status arrives as 1
            raise

    def _refuse_unhealthy(self, t: int, it_dir: Path) -> None:
        """theta_(t+1) is not exported, generated from or evaluated once its training stopped unhealthy."""
        from spin_mega.training.health import read_stop

        record = read_stop(it_dir / "train")
        if record is None:
            return
        raise TrainingUnhealthy(
            f"iteration {t}'s training stopped before the update of step {record['step']}: {record['cause']}; "
            f"theta_{t + 1} was not exported, generated from or evaluated and earlier outputs are kept; lower "
            f"iterations.lr (it is {per_iteration(self.cfg.iterations.lr, t):g}) in a new --workdir, or delete "
            f"{self.config_path} and {it_dir / 'train'} to retrain only this iteration"
        )

    def _evaluate(self, model_dir: Path, out: Path, opponent: Optional[Path], heldout_pairs: Optional[Path]) -> None:
        # In a process of its own: a model loaded here would keep its memory (on a GPU, a CUDA context and
        # cached blocks on GPU 0) for the rest of the run.
        heldout = self.workdir / "heldout.jsonl"
        if not heldout.is_file():
            atomic_write_text(heldout, "".join(json.dumps(r) + "\n" for r in self.heldout_rows))
        args = ["--config", str(self.config_path), "--model", str(model_dir), "--heldout", str(heldout), "--out", str(out)]
        if opponent is not None:
            args += ["--opponent", str(opponent)]
        if heldout_pairs is not None:
            args += ["--pairs", str(heldout_pairs)]
        self.stages.evaluate(args, f"evaluation of {model_dir}", self.workdir / "logs" / "evaluate.log")

    def _iteration_summary(self, t: int) -> dict:
        it_dir = self.workdir / f"iter_{t}"
        metrics = read_jsonl(it_dir / "train" / "metrics.jsonl")
        train_summary = it_dir / "train" / "train_summary.json"
        gens = read_jsonl(it_dir / "generations.jsonl")
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
            "eval": json.loads((it_dir / "eval.json").read_text()) if (it_dir / "eval.json").is_file() else None,
            "generation": {
                "num_prompts": len(gens),
                "identical_to_human": sum(str(r["rejected"]).strip() == str(r["chosen"]).strip() for r in gens),
                "mean_response_tokens": mean_tokens("rejected"),
                "mean_chosen_tokens": mean_tokens("chosen"),
            },
            "prompts": json.loads((it_dir / "prompts_counts.json").read_text()) if (it_dir / "prompts_counts.json").is_file() else None,
        }

    def write_summary(self, extra: Optional[dict] = None) -> dict:
        summary_path = self.workdir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        iterations = []
        for t in range(self.cfg.iterations.num_iterations):
            if self._done(self.workdir / f"iter_{t}", "eval"):
                iterations.append(self._iteration_summary(t))
        summary["iterations"] = iterations
        baseline = self.workdir / "baseline_eval.json"
        if baseline.is_file():
            summary["baseline"] = {"eval": json.loads(baseline.read_text())}
        summary.update(extra or {})
        atomic_write_json(summary_path, summary)
        return summary

    def run(self) -> int:
        if not self.cfg.start_model:
            raise SpinMegaError("start_model is not set: point it at theta_0, an HF model directory or a spin-mega checkpoint")
        if not Path(self.cfg.start_model).exists():
            raise SpinMegaError(f"start_model {self.cfg.start_model} does not exist")
        if not self.sft_data:
            raise SpinMegaError("data.train_path is not set: point it at the SFT data (prompt, response)")
        self._write_config()
        try:
            self._import_start()
            if self.heldout_rows or self.cfg.eval.lm_eval_tasks:
                self._stage(self.workdir, "baseline_eval", "evaluate theta_0",
                            lambda: self._evaluate(self.hf_model(0), self.workdir / "baseline_eval.json", None, None))
            for t in range(self.cfg.iterations.num_iterations):
                it_dir = self.workdir / f"iter_{t}"
                it_dir.mkdir(parents=True, exist_ok=True)
                n = self.cfg.iterations.num_iterations
                self._stage(it_dir, "prompts", f"iteration {t + 1}/{n}: sample prompts", lambda: self._prompts(t, it_dir))
                self._stage(it_dir, "generate", f"iteration {t + 1}/{n}: generate with theta_{t}", lambda: self._generate(t, it_dir))
                self._stage(it_dir, "pairs", f"iteration {t + 1}/{n}: build pairs", lambda: self._pairs(t, it_dir))
                self._stage(it_dir, "train", f"iteration {t + 1}/{n}: train theta_{t + 1}", lambda: self._train(t, it_dir))
                self._stage(it_dir, "export", f"iteration {t + 1}/{n}: export theta_{t + 1} to HF",
                            lambda: self._export(self.mcore_model(t + 1), it_dir / "hf"))
                if self.heldout_rows or self.cfg.eval.lm_eval_tasks:
                    self._stage(it_dir, "eval", f"iteration {t + 1}/{n}: evaluate theta_{t + 1}",
                                lambda: self._evaluate(it_dir / "hf", it_dir / "eval.json", self.hf_model(t), it_dir / "heldout_generations.jsonl"))
                else:
                    self._mark(it_dir, "eval", 0.0)
                self.write_summary()
        except Preempted as exc:
            log(f"{exc}; re-run the same command to resume")
            return EXIT_PREEMPTED
        except TrainingUnhealthy:
            self.write_summary()  # the report shows the stopped iteration beside the finished ones
            from spin_mega.report import write_report

            write_report(self.workdir)
            raise
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
    from spin_mega.config import load_config, validate_run

    if config_path is None:
        saved = workdir / "config.yaml"
        if not saved.is_file():
            raise SpinMegaError(f"no config given and {saved} does not exist")
        cfg = config_from_dict(yaml.safe_load(saved.read_text()), overrides)
    else:
        cfg = load_config(config_path, overrides)
    validate_run(cfg)
    return cfg
