"""One SPIN iteration's training on Megatron-core: TP x PP x DP, resumable, preemptible.

    train(cfg, workdir) -> exit code (0 done, 75 preempted with a checkpoint saved)

Start-up, before anything is written: the process groups, then rank 0 takes the work directory's lock (the
others learn the outcome by a broadcast, so a refusal ends every rank at once), then every rank compares the
config with the one the directory's results came from (rundir.check_resume). Rank 0 then records the config
(WORKDIR/config.yaml) and training sets up.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from spin_mega.config import SpinConfig, config_to_dict
from spin_mega.errors import SpinMegaError, TrainingUnhealthy
from spin_mega.io import atomic_write_json
from spin_mega.models import checkpoint as model_ckpt
from spin_mega.models import moe
from spin_mega.models.chunks import build_model_chunks
from spin_mega.models.gpt import have_transformer_engine, padded_vocab_size, transformer_config
from spin_mega.models.hf_config import resolve_model_config
from spin_mega.models.packed_attention import choose_backend
from spin_mega.parallel import distributed
from spin_mega.rundir import (
    CONFIG, EXIT_PREEMPTED, EXIT_UNHEALTHY, METRICS, NOT_READ_BY_TRAINING, OPPONENT_LOGPS, PREEMPTED_MARKER, START_MCORE,
    TRAIN_SUMMARY, check_resume, hold_lock, write_resolved_config,
)
from spin_mega.training import checkpoint as train_ckpt
from spin_mega.training import health
from spin_mega.training import metrics
from spin_mega.training import pipeline
from spin_mega.training.aux_loss import local_aux_losses, step_aux_loss
from spin_mega.training.environment import resolve_dtype, summary, training_choices
from spin_mega.training.first_step import RTOL as FIRST_STEP_RTOL
from spin_mega.training.first_step import FirstStepCheck
from spin_mega.training.forward import STAT_NAMES, PolicyOpponent, make_forward_step, make_logprob_step
from spin_mega.training.logprobs import resolve_impl
from spin_mega.training.optim import build_optimizer, build_scheduler, uses_distributed_optimizer
from spin_mega.training.telemetry import GpuTelemetry, mfu, peak_flops


class _StopFlag:
    """Set by SIGUSR1/SIGTERM; acted on at the next optimizer-step boundary, agreed over all ranks (each rank's
    `vote` rides the step's one all-reduce, in the health guard: a signal is seen by the step under way when
    it arrives before that step's update, else by the next)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def vote(self) -> float:
        return 1.0 if self.requested else 0.0


def _start_checkpoint_helpers_deaf_to_preemption() -> None:
    """Starts dist_checkpointing's helper processes (its spawn-context manager and multiprocessing's resource
    tracker) with SIGUSR1 and SIGTERM blocked, which they inherit.

    Slurm signals every process of a job step, not only the trainer: helpers that died on SIGUSR1 or SIGTERM
    would break the very checkpoint the signal asks for. The trainer itself handles the signals at a step
    boundary."""
    import multiprocessing.resource_tracker as resource_tracker

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    preemption = {signal.SIGUSR1, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, preemption)
    try:
        resource_tracker.ensure_running()
        # ensure_running unblocks SIGINT and SIGTERM once its own process is started, whatever the mask was
        # before (CPython bpo-33613): block them again, or the manager below would die of a group SIGTERM.
        signal.pthread_sigmask(signal.SIG_BLOCK, preemption)
        filesystem_async._get_write_results_queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"[spin-mega] {msg}", file=sys.stderr, flush=True)


def _is_metrics_writer() -> bool:
    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )


@dataclass
class _Start:
    """Where the initial weights (theta_t) come from and the tokenizer beside them."""

    mcore_dir: Optional[Path]  # None: random initialisation from cfg.model (tests)
    tokenizer_dir: Optional[Path]


def _prepare_start(cfg: SpinConfig, workdir: Path) -> _Start:
    start = cfg.start_model
    tokenizer = Path(cfg.data.tokenizer) if cfg.data.tokenizer else None
    if start is None:
        if tokenizer is None:
            raise SpinMegaError("set start_model (an HF or spin-mega Megatron directory) or data.tokenizer")
        return _Start(None, tokenizer)
    start_path = Path(start)
    if model_ckpt.is_model_checkpoint(start_path):
        tok = start_path / model_ckpt.TOKENIZER_SUBDIR
        return _Start(start_path, tokenizer or (tok if tok.is_dir() else None))
    if (start_path / "config.json").is_file():
        imported = workdir / START_MCORE
        if not model_ckpt.is_model_checkpoint(imported):
            if dist.get_rank() == 0:
                _log(f"importing the HF model {start_path} into {imported}")
                # A separate process: the converter runs its own single-rank process group.
                result = subprocess.run(
                    [sys.executable, "-m", "spin_mega", "convert", "hf-to-mcore", "--hf", str(start_path), "--out", str(imported)],
                    capture_output=True,
                    text=True,
                )
                if result.returncode != 0:
                    raise SpinMegaError(f"importing {start_path} failed: {result.stderr.strip().splitlines()[-1:]}")
            dist.barrier()
        tok = imported / model_ckpt.TOKENIZER_SUBDIR
        return _Start(imported, tokenizer or (tok if tok.is_dir() else start_path))
    raise SpinMegaError(f"start_model {start} is neither an HF model directory nor a spin-mega Megatron checkpoint")


def _load_tokenizer(path: Optional[Path]):
    from transformers import AutoTokenizer

    if path is None:
        raise SpinMegaError("no tokenizer: set data.tokenizer or start from a model directory that has one")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise SpinMegaError(f"cannot load a tokenizer from {path}: {exc}") from exc


class _MicroBatches:
    """Iterator over collated micro-batches of example indices, with opponent log-probs attached; packed
    (one THD row per micro-batch, data/packing.py) or padded (one row per sequence)."""

    def __init__(
        self, dataset, batches: list[list[int]], pad_id: int, opponent: Optional[dict], pad_multiple: int = 8,
        packed: bool = False,
    ):
        self.dataset = dataset
        self.pad_multiple = pad_multiple
        self.batches = batches
        self.pad_id = pad_id
        self.opponent = opponent
        self.packed = packed
        self.tokens = 0  # non-padding tokens
        self.padded_tokens = 0
        self.max_len = 0  # the longest sequence (padded: row) the attention saw

    def __iter__(self):
        from spin_mega.data import collate_pairs
        from spin_mega.data.packing import collate_packed

        collate = collate_packed if self.packed else collate_pairs
        pairs_in_step = sum(len(indices) for indices in self.batches)
        for indices in self.batches:
            columns = self.dataset[indices]  # one Arrow read for the whole micro-batch
            batch = collate(columns, self.pad_id, pad_to_multiple_of=self.pad_multiple)
            batch["index"] = torch.tensor(indices)
            batch["loss_scale"] = len(indices) * len(self.batches) / pairs_in_step  # see forward._loss_func
            if self.opponent is not None:
                batch["opponent_logps"] = torch.tensor(
                    [self.opponent["chosen"][i] for i in indices] + [self.opponent["rejected"][i] for i in indices],
                    dtype=torch.float32,
                )
            ids = batch["input_ids"]
            self.tokens += sum(
                2 * len(p) + len(c) + len(r)
                for p, c, r in zip(columns["prompt_ids"], columns["chosen_ids"], columns["rejected_ids"])
            )
            self.padded_tokens += ids.numel()
            self.max_len = max(self.max_len, batch["max_seqlen"] if self.packed else ids.shape[1])
            yield batch


class Trainer:
    def __init__(self, cfg: SpinConfig, workdir: Path, max_steps: Optional[int] = None):
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.max_steps = max_steps if max_steps is not None else cfg.train.max_steps

    # ---- start-up and set-up ------------------------------------------------------------------------
    def init_process_groups(self) -> None:
        """The process groups; nothing is written. Once per process: setup() calls it when run() has not."""
        if getattr(self, "launch", None) is not None:
            return
        p = self.cfg.parallel
        # Before any process group: a layout the model cannot be split into fails in a second.
        self.layout = pipeline.check_layout(self.cfg)
        self.launch = distributed.initialize(
            p.tensor_parallel, p.pipeline_parallel, seed=self.cfg.train.seed, virtual_pipeline=p.virtual_pipeline_parallel,
            expert_parallel=p.expert_parallel, expert_tensor_parallel=p.expert_tensor_parallel,
        )

    @contextlib.contextmanager
    def workdir_lock(self):
        """The work directory's lock (rundir.hold_lock), taken by rank 0 for the whole training; a refusal
        reaches every rank, so none is left waiting at a collective for a rank that has gone."""
        with contextlib.ExitStack() as stack:
            refusal = [None]
            if dist.get_rank() == 0:
                try:
                    stack.enter_context(hold_lock(self.workdir))
                except SpinMegaError as exc:
                    refusal = [str(exc)]
            dist.broadcast_object_list(refusal, src=0)
            if refusal[0] is not None:
                raise SpinMegaError(refusal[0])
            yield

    def record_config(self) -> None:
        """Refuses a resume whose config changes the result (the keys training reads), then records this
        one as WORKDIR/config.yaml. Directories from before the record compare with their newest checkpoint's."""
        resolved = config_to_dict(self.cfg)
        check_resume(self.workdir, resolved, ignore=NOT_READ_BY_TRAINING, fallback=train_ckpt.saved_config(self.workdir),
                     defaults=config_to_dict(SpinConfig()))
        dist.barrier()
        if dist.get_rank() == 0:
            write_resolved_config(self.workdir / CONFIG, resolved)
        dist.barrier()

    def setup(self) -> None:
        self.init_process_groups()
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        p = cfg.parallel
        self.dtype = resolve_dtype(cfg.train.precision)
        self.start = _prepare_start(cfg, self.workdir)
        if self.start.mcore_dir is not None:
            self.model_cfg, _, _ = model_ckpt.read_meta(self.start.mcore_dir)
        else:
            self.model_cfg = resolve_model_config(cfg.model)
        window = self.model_cfg.sliding_window
        if window and cfg.data.max_length > window:
            raise SpinMegaError(
                f"data.max_length {cfg.data.max_length} exceeds the model's sliding attention window ({window}); "
                "training attends over the full context, so keep sequences within the window"
            )
        self.padded_vocab = padded_vocab_size(self.model_cfg.vocab_size, p.tensor_parallel)
        self.equal_lengths = moe.needs_equal_token_counts(
            self.model_cfg, p.expert_parallel, p.expert_tensor_parallel, p.tensor_parallel
        )
        self.tokenizer = _load_tokenizer(self.start.tokenizer_dir)
        metrics.check_trackers(cfg, _is_metrics_writer(), _device())
        self._setup_data()
        self._setup_models()
        _log(f"using {summary(training_choices(cfg))}")

    def _setup_data(self) -> None:
        from spin_mega.data import PairBatchSampler, load_tokenized_pairs, pair_lengths, pad_token_id

        cfg = self.cfg
        if not cfg.data.train_path:
            raise SpinMegaError("data.train_path is not set: point it at the SPIN pairs (prompt, chosen, rejected)")
        self.dataset, stats = load_tokenized_pairs(cfg.data.train_path, self.tokenizer, cfg.data)
        self.data_stats = stats
        _log(f"data: {stats.summary()}")
        self.pad_id = pad_token_id(self.tokenizer)
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.sampler = PairBatchSampler(
            pair_lengths(self.dataset),
            micro_batch_size=cfg.train.micro_batch_size,
            global_batch_size=cfg.train.global_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=self.dp_size,
            seed=cfg.train.seed,
            num_buckets=cfg.train.length_buckets,
        )
        total = self.sampler.steps_for_epochs(cfg.train.epochs)
        if self.max_steps is not None:
            total = min(total, self.max_steps)
        self.total_steps = max(1, total)
        self.num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.dp_size)
        pipeline.check_microbatches(self.layout, self.num_microbatches)
        self.packer = None
        if cfg.data.packing:
            from spin_mega.data.packing import PackedPairSampler, pair_tokens, resolve_pack_tokens

            pack_tokens = resolve_pack_tokens(cfg.data.pack_tokens, cfg.train.micro_batch_size, cfg.data.max_length)
            # The interleaved schedule runs micro-batches in groups of PP: the packer makes that many rows.
            multiple = self.layout.pipeline_parallel if self.layout.interleaved else 1
            # MoE over data-parallel ranks: equal row counts, which an expert-parallel group spanning them needs
            # (tokens are exchanged in every forward); at any EP, so that the rows, and with them the balancing
            # loss's per-micro-batch token statistics, do not depend on the expert-parallel layout.
            self.packer = PackedPairSampler(
                self.sampler, pair_tokens(self.dataset), pack_tokens, multiple,
                equal_rows=self.model_cfg.is_moe and self.dp_size > 1,
            )
            _log(f"packing: each step's pairs in rows of at most {pack_tokens} tokens (data.pack_tokens)")
        _log(self.layout.describe(self.num_microbatches))

    def _build(self) -> list[torch.nn.Module]:
        """This rank's model chunks: one, or one per virtual pipeline stage."""
        p = self.cfg.parallel
        tconfig = transformer_config(
            self.model_cfg,
            p.tensor_parallel,
            p.pipeline_parallel,
            dtype=self.dtype,
            sequence_parallel=p.sequence_parallel,
            recompute=self.cfg.train.recompute,
            virtual_pipeline=p.virtual_pipeline_parallel,
            first_stage_layers=p.first_stage_layers,
            last_stage_layers=p.last_stage_layers,
            expert_parallel=p.expert_parallel,
            expert_tensor_parallel=p.expert_tensor_parallel,
        )
        # Variable-length micro-batches (length bucketing) need shapes exchanged between stages.
        tconfig.variable_seq_lengths = True
        return build_model_chunks(self.model_cfg, tconfig, vocab_size=self.padded_vocab)

    def _setup_models(self) -> None:
        cfg = self.cfg
        self.fused = cfg.train.opponent == "fused"
        # One chunk per virtual pipeline stage (one without interleaving); `policy` and `model` name the first.
        self.policies = self._build()
        policy = self.policies[0]
        # Sequence parallelism splits the sequence over TP ranks, so padded lengths must divide evenly.
        self.pad_multiple = math.lcm(8, policy.config.tensor_model_parallel_size) if policy.config.sequence_parallel else 8
        # A packed row is padded only as far as the layout needs: to a multiple of TP when sequence
        # parallelism splits it (kernels need no more; the padding tail is a sequence of its own).
        self.pack_multiple = policy.config.tensor_model_parallel_size if policy.config.sequence_parallel else 1
        if self.start.mcore_dir is not None:
            model_ckpt.load_model(self.policies, self.start.mcore_dir)
        opponents = [None] * len(self.policies)
        if self.fused:
            opponents = self._build()
            for opponent, chunk in zip(opponents, self.policies):
                opponent.load_state_dict(chunk.state_dict())
                opponent.requires_grad_(False)
                opponent.eval()
        self.logprob_impl = resolve_impl(cfg.train.logprobs)
        packed_backend, _ = choose_backend(torch.cuda.is_available(), self.dtype, have_transformer_engine())
        modules = [
            PolicyOpponent(chunk, opponent, self.model_cfg.vocab_size, self.logprob_impl, packed_backend)
            for chunk, opponent in zip(self.policies, opponents)
        ]
        self.overlap_grad_reduce = cfg.parallel.overlap_grad_reduce
        if self.overlap_grad_reduce is None:
            self.overlap_grad_reduce = torch.cuda.is_available() and parallel_state.get_data_parallel_world_size() > 1
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=self.overlap_grad_reduce,
            use_distributed_optimizer=uses_distributed_optimizer(cfg.optim, cfg.parallel.distributed_optimizer),
        )
        self.model_chunks = pipeline.wrap_chunks(modules, policy.config, ddp_config)
        self.model = self.model_chunks[0]
        self.policy = policy
        self.optimizer = build_optimizer(cfg.optim, self.model_chunks, self.dtype, cfg.parallel.distributed_optimizer)
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, self.total_steps)
        config = policy.config
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = pipeline.no_sync_func(self.model_chunks)
        # With overlap, the schedules start each bucket's reduction from the last micro-batch's backward
        # (one function per chunk under the interleaved schedule).
        grad_syncs = [chunk.start_grad_sync for chunk in self.model_chunks]
        config.grad_sync_func = (grad_syncs[0] if len(grad_syncs) == 1 else grad_syncs) if self.overlap_grad_reduce else None
        self.performance_paths = {
            "logprobs": self.logprob_impl,
            "response_rows_only": True,
            "label_checks": "host, once per micro-batch",
            "overlap_grad_reduce": self.overlap_grad_reduce,
            "packing": f"{packed_backend} attention" if self.packer is not None else "off",
        }
        _log("performance paths: " + ", ".join(f"{k}={v}" for k, v in self.performance_paths.items()))
        config.grad_scale_func = self.optimizer.scale_loss if self.dtype == torch.float16 else None

    # ---- opponent precompute ------------------------------------------------------------------------
    def _precompute_opponent(self) -> dict:
        """Per-sequence log-probs of theta_t on every pair, computed once before the first update and kept
        in the work directory (`opponent_logps.json`, with the prompt ids) so a resume reuses them."""
        path = self.workdir / OPPONENT_LOGPS
        n = len(self.dataset)
        if path.is_file():
            table = json.loads(path.read_text())
            if len(table["chosen"]) == n:
                return table
        if "opponent_chosen_logp" in self.dataset.column_names:
            cols = self.dataset.with_format(None)
            return {"chosen": list(cols["opponent_chosen_logp"]), "rejected": list(cols["opponent_rejected_logp"])}
        _log(f"precomputing opponent log-probs for {n} pairs")
        mbs = self.cfg.train.micro_batch_size
        # Forward-only passes need no data-parallel synchronisation, so DP ranks may run unequal counts.
        mine = list(range(parallel_state.get_data_parallel_rank(), n, self.dp_size))
        batches = [mine[i : i + mbs] for i in range(0, len(mine), mbs)]
        if self.equal_lengths and batches:
            # Expert-parallel ranks exchange tokens in every forward: all run as many micro-batches (a repeat of
            # a rank's own batch writes the same sums again).
            batches += [batches[0]] * (math.ceil(math.ceil(n / self.dp_size) / mbs) - len(batches))
        batches = pipeline.pad_microbatches(batches, self.layout)
        chosen = torch.zeros(n, dtype=torch.float64, device=_device())
        rejected = torch.zeros(n, dtype=torch.float64, device=_device())
        data = _MicroBatches(self.dataset, batches, self.pad_id, None, self.pad_multiple)
        longest = math.ceil(self.cfg.data.max_length / self.pad_multiple) * self.pad_multiple
        for chunk in self.model_chunks:
            chunk.eval()
        with torch.no_grad(), moe.isolated_router_state(*self.policies):
            outputs = get_forward_backward_func()(
                forward_step_func=make_logprob_step(),
                data_iterator=pipeline.data_iterators(
                    data, self.model_chunks, self.pad_id, fixed_length=longest, equal_across_ranks=self.equal_lengths
                ),
                model=self.model_chunks,
                num_microbatches=len(batches),
                seq_length=self.cfg.data.max_length,
                micro_batch_size=2 * mbs,
                forward_only=True,
            )
        for chunk in self.model_chunks:
            chunk.train()
        if parallel_state.is_pipeline_last_stage():
            for out in outputs:
                idx = out["index"].to(chosen.device)
                chosen[idx] = out["logps"][: idx.numel()].double()
                rejected[idx] = out["logps"][idx.numel() : 2 * idx.numel()].double()
        # Every index was computed by exactly one DP rank, so a sum over DP assembles the whole table.
        for t in (chosen, rejected):
            dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
        # Only the last stage computed the sums; the other stages learn them by a broadcast from it.
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        for t in (chosen, rejected):
            dist.broadcast(t, src=last, group=parallel_state.get_pipeline_model_parallel_group())
        table = {"chosen": chosen.tolist(), "rejected": rejected.tolist(), "prompt_id": list(self.dataset["prompt_id"])}
        if dist.get_rank() == 0:
            atomic_write_json(path, table)
        dist.barrier()
        return table

    # ---- one step ------------------------------------------------------------------------------------
    def step_data(self, step: int, opponent_table: Optional[dict], packed: Optional[bool] = None) -> _MicroBatches:
        """This rank's micro-batches of optimizer step `step`: packed when packing is on (or `packed`
        says so), else padded; the same pairs either way."""
        packed = self.packer is not None if packed is None else packed
        if packed:
            batches = self.packer.microbatches_for_step(step)
            return _MicroBatches(self.dataset, batches, self.pad_id, opponent_table, self.pack_multiple, packed=True)
        batches = self.sampler.microbatches_for_step(step)
        return _MicroBatches(self.dataset, batches, self.pad_id, opponent_table, self.pad_multiple)

    def forward_backward(self, data: _MicroBatches, forward_step) -> list:
        """Zeroed gradients, then the schedule's forward and backward over the step's micro-batches."""
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=pipeline.data_iterators(
                data, self.model_chunks, self.pad_id, equal_across_ranks=self.equal_lengths
            ),
            model=self.model_chunks,
            num_microbatches=len(data.batches),
            seq_length=self.cfg.data.max_length,
            micro_batch_size=2 * self.cfg.train.micro_batch_size * (2 if self.fused else 1),
            forward_only=False,
        )

    # ---- the loop -----------------------------------------------------------------------------------
    def _write_meta(self, path: Path) -> None:
        model_ckpt.write_meta(path, self.model_cfg, self.dtype, self.padded_vocab)

    def _save(self, step: int) -> Path:
        return train_ckpt.save(
            self.workdir,
            step,
            self.policies,
            self.optimizer,
            self.scheduler,
            {"total_steps": self.total_steps, "config": config_to_dict(self.cfg)},
            self._write_meta,
            self.start.tokenizer_dir,
            self.start.mcore_dir,
        )

    def _stop_unhealthy(self, step: int, cause: str, advice: Optional[str] = None) -> int:
        """Leaves the checkpoints and `latest` as they are; the state that failed is never saved."""
        last_good = train_ckpt.latest_checkpoint(self.workdir) or self.start.mcore_dir or "none (the random initialisation)"
        if dist.get_rank() == 0:
            record = health.record_stop(
                self.workdir, step, cause, str(last_good), self.cfg.optim.lr, self.cfg.optim.clip_grad, advice
            )
        dist.barrier()
        if dist.get_rank() == 0:
            raise TrainingUnhealthy(health.stop_message(record))
        return EXIT_UNHEALTHY

    def run(self) -> int:
        self.init_process_groups()
        with self.workdir_lock():
            health.refuse_to_resume(self.workdir)
            self.record_config()
            return self._train()

    def _train(self) -> int:
        self.setup()
        cfg = self.cfg
        opponent_table = None if self.fused else self._precompute_opponent()
        start_step = 0
        resumed = train_ckpt.resume(self.workdir, self.policies, self.optimizer, self.scheduler, config_to_dict(cfg)["parallel"], _log)
        if resumed is not None:
            latest, state = resumed
            start_step = int(state["step"])
            _log(f"resuming from {latest} (step {start_step} of {self.total_steps})")
        if _is_metrics_writer():
            metrics.truncate_after(self.workdir / METRICS, start_step)
        if dist.get_rank() == 0:
            (self.workdir / PREEMPTED_MARKER).unlink(missing_ok=True)
        if start_step >= self.total_steps:
            _log("training already complete")
            return 0

        _start_checkpoint_helpers_deaf_to_preemption()
        stop = _StopFlag()
        stop.install()
        telemetry = GpuTelemetry()
        forward_step = make_forward_step(cfg.loss, self.fused)
        writer = _is_metrics_writer()
        counts_metrics = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
        progress = None
        if writer:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=start_step, desc="SPIN training", unit="step", file=sys.stderr)
        metrics_path = self.workdir / METRICS
        peak = peak_flops(cfg.train.peak_tflops)
        guard = health.HealthGuard(cfg.train.collapse_bound, cfg.train.on_collapse == "stop", cfg.loss.beta, _log)
        precision = "bf16" if self.dtype == torch.bfloat16 else "fp16" if self.dtype == torch.float16 else "fp32"
        guard.first_step = FirstStepCheck(cfg.loss, FIRST_STEP_RTOL[precision])
        guard.replay(metrics_path)
        metrics_log = metrics.open_metrics(cfg, self.workdir, start_step, writer, _device())
        try:
            for step in range(start_step, self.total_steps):
                t0 = time.perf_counter()
                data = self.step_data(step, opponent_table)
                outputs = self.forward_backward(data, forward_step)
                aux_local = local_aux_losses(self.model_cfg, _device())
                lr = self.optimizer.param_groups[0]["lr"]
                # This step's sums ride the health guard's all-reduce: the metrics from one rank per data-parallel
                # replica of the last stage (so a world sum is the data-parallel sum the writer needs), every
                # rank's MoE balancing losses (aux_loss.py), and every rank's preemption vote (a sum above 0: some
                # rank was signalled). Layout: stats | tokens, padded tokens | balancing loss per layer | vote.
                n_stats, n_aux = len(STAT_NAMES), 0 if aux_local is None else aux_local.numel()
                step_sums = torch.zeros(n_stats + 2 + n_aux + 1, dtype=torch.float64, device=_device())
                if counts_metrics:
                    for out in outputs or []:
                        step_sums[:n_stats] += out["stats"].double()
                    step_sums[n_stats : n_stats + 2] = torch.tensor([data.tokens, data.padded_tokens], dtype=torch.float64)
                if n_aux:
                    step_sums[n_stats + 2 : n_stats + 2 + n_aux] = aux_local
                step_sums[-1] = stop.vote()
                checked = guard.step(self.optimizer, outputs, _device(), step + 1, also=step_sums)
                grad_norm = checked.grad_norm
                if checked.applied:
                    self.scheduler.step(increment=1)
                step_time = time.perf_counter() - t0
                done = step + 1
                stats, tokens = checked.also[:n_stats], checked.also[n_stats : n_stats + 2]
                aux_loss = None
                if n_aux:
                    # Packed steps run as many micro-batches as their rows (with MoE, as many on every rank).
                    aux_loss = step_aux_loss(
                        self.model_cfg, checked.also[n_stats + 2 : n_stats + 2 + n_aux], len(data.batches), self.dp_size
                    )
                stop_agreed = checked.also[-1].item() > 0
                if writer:
                    pairs = max(stats[STAT_NAMES.index("pairs")].item(), 1.0)
                    row = {"step": done, **{name: stats[i].item() / pairs for i, name in enumerate(STAT_NAMES) if name != "pairs"}}
                    row["reward_margin"] = row["reward_chosen"] - row["reward_rejected"]
                    if aux_loss is not None:
                        row["aux_loss"] = aux_loss
                    row["pairs"] = int(pairs)
                    row["lr"] = lr
                    row["grad_norm"] = float(grad_norm) if grad_norm is not None else None
                    row["tokens_per_s"] = tokens[0].item() / step_time
                    row["padding_fraction"] = 1.0 - tokens[0].item() / max(tokens[1].item(), 1.0)
                    row["step_time_s"] = step_time
                    if peak is not None:
                        row["mfu"] = mfu(self.model_cfg, int(tokens[0].item()), data.max_len, self.fused, step_time, peak, dist.get_world_size())
                        row["mfu_peak"] = peak.label
                    row.update(telemetry.sample())
                    row.update(checked.metrics())
                    metrics_log.write(row)
                    progress.update(1)
                    progress.set_postfix(
                        loss=f"{row['loss']:.4f}", acc=f"{row['reward_accuracy']:.2f}",
                        tok_s=f"{row['tokens_per_s']:.0f}", pad=f"{row['padding_fraction']:.1%}",
                    )
                if checked.stop_cause is not None:
                    return self._stop_unhealthy(done, checked.stop_cause, checked.advice)
                save_due = cfg.train.save_interval and done % cfg.train.save_interval == 0 and done < self.total_steps
                if stop_agreed:
                    self._save(done)
                    if dist.get_rank() == 0:
                        atomic_write_json(self.workdir / PREEMPTED_MARKER, {"step": done, "time": time.time()})
                    _log(f"stopped by a signal after step {done}; checkpoint saved, re-run the same command to resume")
                    return EXIT_PREEMPTED
                if save_due and cfg.train.save_checkpoints:
                    self._save(done)
            if cfg.train.save_checkpoints:
                self._save(self.total_steps)
            if dist.get_rank() == 0:
                atomic_write_json(
                    self.workdir / TRAIN_SUMMARY,
                    {"steps": self.total_steps, "data": self.data_stats.as_dict(), "checkpoint": str(train_ckpt.latest_checkpoint(self.workdir)),
                     "health": guard.summary()},
                )
            return 0
        finally:
            stop.restore()
            if progress is not None:
                progress.close()
            if metrics_log is not None:
                metrics_log.close()


def train(cfg: SpinConfig, workdir: str | Path, max_steps: Optional[int] = None) -> int:
    trainer = Trainer(cfg, Path(workdir), max_steps=max_steps)
    try:
        return trainer.run()
    finally:
        distributed.shutdown()
