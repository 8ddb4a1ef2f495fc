"""`spin-mega plan --model HF_DIR|config.json --nodes N --gpus-per-node G ...`: per-GPU memory of every
candidate TP x PP x DP layout and the fastest one that fits, with the sbatch line that runs it."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "plan",
        help="per-GPU memory of each TP x PP x DP layout for a model, and the fastest that fits",
        description=(
            "Plans a SPIN training layout: for every TP (within a node) x PP (layers split as the trainer splits them) x DP (x EP "
            "for a mixture-of-experts model), the "
            "per-GPU bytes of weights, fp32 gradient buffer, fp32 main weights, optimizer state, activations "
            "with and without recomputation, the fused opponent and the log-prob head, on the fullest pipeline "
            "stage; then the fitting layout with the lowest estimated step time and the launch/train.sbatch "
            "line for it. The arithmetic is in spin_mega/parallel/memory_plan.py."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="an HF model directory or its config.json")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gib", type=float, default=79.6, help="usable memory per GPU (an 80 GB GPU: 79.6)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence, prompt + response")
    parser.add_argument("--micro-batch", type=int, default=1, help="pairs per micro-batch per data-parallel rank")
    parser.add_argument("--global-batch", type=int, default=64, help="pairs per optimizer step")
    parser.add_argument("--opponent", choices=("precompute", "fused"), default="precompute")
    parser.add_argument("--optimizer", choices=("rmsprop", "adamw"), default="rmsprop")
    parser.add_argument("--distributed-optimizer", choices=("on", "off"), default="on",
                        help="shard fp32 main weights and optimizer state over DP (parallel.distributed_optimizer; RMSProp and AdamW)")
    parser.add_argument("--logprobs", choices=("fused_linear", "full_logits"), default="fused_linear",
                        help="log-prob head: fused with the output layer, or full logits then the kernel")
    parser.add_argument("--sequence-parallel", choices=("on", "off"), default="on",
                        help="sequence parallelism at TP > 1 (parallel.sequence_parallel): splits the hidden-sized activations over TP")
    parser.add_argument("--packing", choices=("on", "off"), default="on",
                        help="packed rows (data.packing, the default) or padded micro-batches")
    parser.add_argument("--pack-tokens", type=int, default=None,
                        help="tokens per packed row (data.pack_tokens); default 2 x micro-batch x seq-len, the padded worst case")
    parser.add_argument("--tp", type=int, default=None, help="consider only this tensor-parallel size")
    parser.add_argument("--pp", type=int, default=None, help="consider only this pipeline-parallel size")
    parser.add_argument("--ep", type=int, default=None, help="MoE models: consider only this expert-parallel size")
    parser.add_argument("--etp", type=int, default=1, help="MoE models: expert tensor-parallel size (each expert split over it)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="nominal dense bf16 peak per GPU, for the time estimate")
    parser.add_argument("--config", default="CONFIG.yaml", help="run configuration named in the printed sbatch line")
    parser.add_argument("--all", action="store_true", help="list layouts that do not fit as well")
    parser.set_defaults(handler=run)


def _gib(n: float) -> str:
    return f"{n / 2**30:6.1f}"


def run(args) -> int:
    from spin_mega.models.hf_config import model_config_from_hf, read_hf_config
    from spin_mega.parallel.memory_plan import GIB, PlanRequest, active_params, plan, total_params

    model = model_config_from_hf(read_hf_config(args.model))
    req = PlanRequest(
        model=model, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory_gib,
        seq_len=args.seq_len, micro_batch=args.micro_batch, global_batch=args.global_batch, opponent=args.opponent,
        optimizer=args.optimizer, distributed_optimizer=args.distributed_optimizer == "on", logprobs=args.logprobs,
        tensor_parallel=args.tp, pipeline_parallel=args.pp, expert_parallel=args.ep, expert_tensor_parallel=args.etp,
        sequence_parallel=args.sequence_parallel == "on", peak_tflops=args.peak_tflops,
        pack_tokens=(args.pack_tokens or 2 * args.micro_batch * args.seq_len) if args.packing == "on" else None,
    )
    layouts, best = plan(req)
    total = total_params(model)
    mlp = (f"{model.num_experts} experts of width {model.moe_ffn_hidden_size}, top-{model.moe_router_topk}"
           if model.is_moe else f"ffn {model.ffn_hidden_size}")
    active = f" ({active_params(model) / 1e9:.2f} B active per token)" if model.is_moe else ""
    print(
        f"model: {model.num_layers} layers, hidden {model.hidden_size}, {mlp}, "
        f"{model.num_attention_heads} heads / {model.num_query_groups} KV groups, vocabulary {model.vocab_size}: "
        f"~{total / 1e9:.2f} B parameters{active}"
    )
    print(
        f"run: {args.nodes} x {args.gpus_per_node} GPUs of {args.gpu_memory_gib} GiB, sequences of {args.seq_len} tokens, "
        f"{args.micro_batch} pair(s) per micro-batch, {args.global_batch} per step, {args.optimizer}"
        f"{' (sharded over DP by the distributed optimizer)' if req.distributed_optimizer else ' (replicated on every DP rank)'}, "
        f"opponent {args.opponent}, log-probs {args.logprobs}"
        + (f", packed rows of at most {req.pack_tokens} tokens" if req.pack_tokens else ", padded micro-batches")
    )
    if args.opponent == "precompute":
        print("opponent: precomputed once before training, a table of 2 float64 per pair (16 B; 0.8 MB for 50k pairs) "
              "on the host and in the work directory; nothing on the GPU while training")
    else:
        print("opponent: a frozen copy of each stage's weights beside the policy (the 'oppon' column), one more "
              "forward per step")
    print("GiB per GPU on the fullest pipeline stage (act: activations kept for backward; +rc: with full recomputation)")
    moe = model.is_moe
    header = (f"{'TP':>3} {'PP':>3} {'DP':>3} " + (f"{'EP':>3} {'a2a':>6} " if moe else "")
              + f"{'m':>4} {'bubble':>7} {'params':>8} {'weights':>7} {'grads':>6} "
              f"{'main':>6} {'optim':>6} {'act':>6} {'act+rc':>6} {'oppon':>6} {'logp':>6} {'total':>6} {'+rc':>6} "
              f"{'est s':>6}  verdict")
    print(header)
    shown = [l for l in sorted(layouts, key=lambda l: (l.tp, l.pp)) if args.all or l.fits]
    for layout in shown:
        s = max(layout.stages, key=lambda st: st.total)
        verdict = "does not fit"
        if layout.fits:
            verdict = "fits with recomputation" if layout.recompute else "fits"
        if layout is best:
            verdict += "  <- chosen"
        expert_columns = f"{layout.ep:>3} {_gib(layout.all_to_all_bytes)} " if moe else ""
        print(
            f"{layout.tp:>3} {layout.pp:>3} {layout.dp:>3} {expert_columns}{layout.microbatches:>4} {100 * layout.bubble:6.1f}% "
            f"{s.params / 1e9:7.2f}B {_gib(s.weights)} {_gib(s.grads)} {_gib(s.main_params)} {_gib(s.optimizer_state)} "
            f"{_gib(s.activations)} {_gib(s.activations_recompute)} {_gib(s.opponent)} {_gib(s.logprobs)} "
            f"{_gib(s.total)} {_gib(s.total_recompute)} {layout.step_seconds:6.2f}  {verdict}"
        )
    hidden = len(layouts) - len(shown)
    if hidden:
        print(f"({hidden} layouts that do not fit are not shown; --all lists them)")
    print("totals include 3 GiB for NCCL buffers, the CUDA context and allocator slack; 'est s' is the cost model's "
          "step time (memory_plan.py: 40% of the nominal peak, bubble, uneven stages, TP collectives, unoverlapped DP gradient traffic)")
    if moe:
        print(f"EP: expert parallelism (experts / EP per GPU; their optimizer state sharded over world / (ETP {args.etp} x EP x PP)); "
              "a2a: GiB per GPU and step of tokens exchanged with other EP ranks' experts (all-to-all, forward and backward)")
    if best is None:
        print(f"no layout fits {args.gpu_memory_gib} GiB per GPU, even with recomputation: more GPUs, a shorter "
              "sequence or AdamW with the distributed optimizer over more DP ranks")
        return 1
    sets = [f"--set train.micro_batch_size={args.micro_batch}", f"--set train.global_batch_size={args.global_batch}",
            f"--set train.opponent={args.opponent}", f"--set optim.optimizer={args.optimizer}",
            f"--set data.max_length={args.seq_len}", f"--set parallel.sequence_parallel={'true' if req.sequence_parallel else 'false'}", f"--set parallel.distributed_optimizer={'true' if req.distributed_optimizer else 'false'}"]
    sets.append(f"--set data.packing=true --set data.pack_tokens={req.pack_tokens}" if req.pack_tokens else "--set data.packing=false")
    if best.recompute:
        sets.append("--set train.recompute=full")
    if args.logprobs == "full_logits":
        sets.append("--set train.logprobs=triton")
    peak = best.peak_bytes(best.recompute)
    expert_layout = f" x EP {best.ep}" + (f" (expert TP {args.etp})" if args.etp > 1 else "") if moe else ""
    print(
        f"\nchosen: TP {best.tp} x PP {best.pp} x DP {best.dp}{expert_layout}, {peak / GIB:.1f} of {args.gpu_memory_gib} GiB per GPU"
        f"{' with activation recomputation' if best.recompute else ''}, {best.microbatches} micro-batches per step, "
        f"bubble {100 * best.bubble:.1f}% of the ideal step time"
    )
    if best.pp > 1:
        print(best.pipeline.describe(best.microbatches))
    print("run it with (launch/README.md):")
    print(f"    launch/train.sbatch {args.config} --workdir W --nodes {args.nodes} --gpus-per-node {args.gpus_per_node} \\")
    start = Path(args.model).parent if Path(args.model).is_file() else Path(args.model)
    expert_args = f"--ep {best.ep} " if moe else ""
    if moe and args.etp > 1:
        sets.append(f"--set parallel.expert_tensor_parallel={args.etp}")
    print(f"        --tp {best.tp} --pp {best.pp} {expert_args}--set start_model={start} \\")
    print("        " + " ".join(sets))
    return 0
