"""`spin-mega generate`: sample the model's own responses to SFT prompts (SPIN's rejected side)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from spin_mega.commands import add_config_arguments

    parser = sub.add_parser(
        "generate",
        help="generate responses to SFT prompts (chosen = human, rejected = model); resumable, shardable",
        description=(
            "Samples one response per SFT prompt with vLLM (or transformers: --backend hf) and writes JSONL rows "
            "prompt_id, prompt, chosen (the human response), rejected (the generated one), meta. Prompts are rendered "
            "with the chat template exactly as training renders them. Finished rows are streamed to OUT.partial; an "
            "interrupted run resumes where it stopped, and OUT appears, complete and in prompt order, only at the end. "
            "Under Slurm, every task takes its share of the prompts (SLURM_PROCID of SLURM_NTASKS) and writes "
            "OUT.shard-<i>-of-<n>; `--merge` then joins the shards into OUT. The resolved config is recorded beside OUT "
            "(gens.jsonl: gens.config.yaml)."
        ),
    )
    add_config_arguments(parser, config_required=False)
    parser.add_argument("--model", help="HF model directory to sample from (default: the config's start_model)")
    parser.add_argument("--data", help="SFT data: .jsonl/.json/.parquet or a save_to_disk directory (default: data.train_path)")
    parser.add_argument("--out", required=True, help="output JSONL file (shards: OUT.shard-<i>-of-<n>)")
    parser.add_argument("--backend", choices=["vllm", "hf"], default=None, help="default: generation.backend of the config")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: data.tokenizer, else the model's)")
    parser.add_argument("--num-prompts", type=int, default=None, help="only the first N prompts of the data")
    parser.add_argument("--shard-index", type=int, default=None, help="this worker's shard (default: SLURM_PROCID, else 0)")
    parser.add_argument("--num-shards", type=int, default=None, help="number of workers (default: SLURM_NTASKS, else 1)")
    parser.add_argument("--merge", action="store_true", help="merge the finished OUT.shard-*-of-<num-shards> files into OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def run(args) -> int:
    import dataclasses

    from spin_mega.config import config_to_dict, load_config
    from spin_mega.errors import SpinMegaError
    from spin_mega.generation.runner import generate, merge_shards, shard_from_env

    if args.merge:
        if args.num_shards is None:
            raise SpinMegaError("--merge needs --num-shards")
        merged = merge_shards(args.out, args.num_shards)
        print(f"spin-mega generate: merged {args.num_shards} shards into {merged}")
        return 0

    cfg = load_config(args.config, args.overrides)
    model = args.model or cfg.start_model
    if not model:
        raise SpinMegaError("no model to generate with: pass --model HF_DIR (or set start_model in the config)")
    data = args.data or cfg.data.train_path
    if not data:
        raise SpinMegaError("no prompts to generate for: pass --data FILE (or set data.train_path in the config)")
    data_cfg = cfg.data
    if args.data:
        # data.schema describes data.train_path; a file named on the command line (such as the loop's
        # normalised prompts.jsonl next to an UltraChat config) is recognised by its columns instead.
        data_cfg = dataclasses.replace(data_cfg, schema="auto")
    env_index, env_shards = shard_from_env()
    num_shards = args.num_shards if args.num_shards is not None else env_shards
    shard_index = args.shard_index if args.shard_index is not None else env_index
    if args.backend:
        cfg = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, backend=args.backend))
    gen_cfg = cfg.generation
    summary = generate(
        model,
        data,
        args.out,
        config=gen_cfg,
        data_config=data_cfg,
        tokenizer_dir=args.tokenizer or cfg.data.tokenizer,
        num_prompts=args.num_prompts,
        shard_index=shard_index,
        num_shards=num_shards,
        progress=not args.no_progress,
        # The config this generation runs with, beside its output (every shard writes the same file).
        resolved_config=config_to_dict(cfg),
    )
    print(f"spin-mega generate: {summary.out} ({summary.total} rows)")
    return 0
