"""Held-out evaluation of an exported model, with nothing downloaded.

- heldout_logp_per_token: mean log-likelihood per response token of the held-out human responses
  (higher is better; SPIN should raise it, since it pushes the model towards the human distribution).
- heldout_reward_accuracy: SPIN's reward accuracy on held-out pairs (human response vs the opponent's
  own generation, where the two differ): how often log p_new(y|x) - log p_opp(y|x) exceeds
  log p_new(y'|x) - log p_opp(y'|x).
- exact_match: the task metric where the held-out rows carry an `answer`: greedy decoding, answer
  extracted as the text after the last "is " or ": " without the closing full stop (the demo's style).
- lm-evaluation-harness tasks, when `eval.lm_eval_tasks` is set (spin_mega/evaluation/leaderboard.py: the Open LLM
  Leaderboard v1 set with its few-shot counts, batched, offline).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from spin_mega.config import DataConfig, EvalConfig
from spin_mega.data.chat import encode_prompt, render_response
from spin_mega.errors import SpinMegaError


HELDOUT_KEY = "data.eval_path"


def load_heldout(path: str | Path, max_samples: int) -> list[dict]:
    """The held-out rows of data.eval_path, read and checked as a whole before any stage runs: prompt_id,
    prompt, response (a pairs file's chosen), and answer where the data has one; the first `max_samples`
    usable rows. A missing, non-UTF-8 or empty source, one without a response column, or one without a
    single usable row is refused with one sentence naming data.eval_path."""
    from spin_mega.data.sources import is_nonblank_text, is_valid_prompt, load_rows
    from spin_mega.errors import DataError

    where = f"the held-out data ({HELDOUT_KEY})"
    try:
        ds = load_rows(path, "auto", keep=("answer",))
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    response = "response" if "response" in ds.column_names else "chosen"
    rows = []
    for row in ds:
        if is_valid_prompt(row["prompt"]) and is_nonblank_text(row[response]):
            rows.append({"prompt_id": row["prompt_id"], "prompt": row["prompt"], "response": row[response],
                         **({"answer": row["answer"]} if "answer" in row else {})})
    if not rows:
        raise DataError(f"{where}: {path} has no row with a usable prompt and response, so there is nothing to "
                        "evaluate on; fix the file, or leave data.eval_path unset to run without held-out evaluation")
    rows = rows[:max_samples]
    if len({r["prompt_id"] for r in rows}) < len(rows):
        # Generation keys its rows by prompt id: repeated prompts get positional ids instead.
        rows = [dict(r, prompt_id=f"heldout-{i}") for i, r in enumerate(rows)]
    return rows


def extract_answer(response: str) -> str:
    """The answer in a response written in the demo's style: the text after the last " is " or ": ",
    without the closing full stop. Applied the same way to human and generated responses."""
    text = response.strip()
    cut = max(text.rfind(" is "), text.rfind(": "))
    if cut >= 0:
        text = text[cut + (4 if text[cut] == " " else 2) :]
    return text.strip().rstrip(".").strip()


def load_hf(model_dir: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir))


@torch.no_grad()
def response_logprobs(model, tokenizer, pairs: Sequence[tuple[Any, str]], batch_size: int = 16,
                      chat: Optional[DataConfig] = None) -> list[tuple[float, int]]:
    """(sum of response-token log-probs, number of response tokens) per (prompt, response), rendered and
    tokenized exactly as training does (`chat`: the run's DataConfig with its chat-template options)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    results: list[tuple[float, int]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        encoded = []
        for prompt, response in chunk:
            p = encode_prompt(tokenizer, prompt, chat)
            r = tokenizer(render_response(tokenizer, response), add_special_tokens=False)["input_ids"]
            encoded.append((p, r))
        width = max(len(p) + len(r) for p, r in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (p, r) in enumerate(encoded):
            seq = p + r
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            labels[i, len(p) - 1 : len(seq) - 1] = torch.tensor(r)  # position t predicts token t+1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logps = torch.log_softmax(logits, dim=-1)
        valid = labels.to(device) != -100
        token = logps.gather(-1, labels.to(device).clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
        for i in range(len(encoded)):
            results.append((float(token[i].sum()), int(valid[i].sum())))
    return results


@torch.no_grad()
def greedy_responses(model, tokenizer, prompts: list[Any], max_new_tokens: int, batch_size: int = 32,
                     chat: Optional[DataConfig] = None) -> list[str]:
    """Greedy responses with transformers: deterministic, and for a few prompts cheaper than an engine start."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(tokenizer, p, chat) for p in prompts[start : start + batch_size]]
        width = max(len(e) for e in encoded)
        # Left padding: generation continues every row from its own last prompt token.
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encoded):
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in generated[:, width:]:
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def evaluate(
    model_dir: str | Path,
    heldout: Sequence[dict],
    cfg: EvalConfig,
    opponent_dir: Optional[str | Path] = None,
    heldout_pairs: Optional[Sequence[dict]] = None,
    chat: Optional[DataConfig] = None,
) -> dict:
    """`heldout` rows: prompt, response[, answer]; `heldout_pairs` rows: prompt, chosen, rejected; `chat`:
    the run's DataConfig, whose chat-template options render prompts as generation and training did.
    Without held-out rows only the lm-evaluation-harness tasks run."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SpinMegaError(f"cannot evaluate {model_dir}: not an HF model directory")
    rows = list(heldout)[: cfg.max_samples]
    if not rows and not cfg.lm_eval_tasks:
        raise SpinMegaError("no held-out rows to evaluate on, and no eval.lm_eval_tasks")
    result: dict[str, Any] = {"model": str(model_dir), "num_samples": len(rows)}
    if rows:
        result.update(_heldout_metrics(model_dir, rows, cfg, opponent_dir, heldout_pairs, chat))
    if cfg.lm_eval_tasks:
        from spin_mega.evaluation.leaderboard import run_lm_eval

        result["lm_eval"] = run_lm_eval(model_dir, cfg)
    return result


def _heldout_metrics(model_dir: Path, rows: list[dict], cfg: EvalConfig, opponent_dir, heldout_pairs, chat) -> dict:
    model, tokenizer = load_hf(model_dir)
    scored = response_logprobs(model, tokenizer, [(r["prompt"], r["response"]) for r in rows], chat=chat)
    total_tokens = sum(n for _, n in scored)
    result: dict[str, Any] = {
        "heldout_logp_per_token": sum(s for s, _ in scored) / max(total_tokens, 1),
        "heldout_reward_accuracy": None,
        "exact_match": None,
    }
    # Pairs whose generation equals the human response have equal rewards by construction: no signal.
    pairs = [p for p in (heldout_pairs or []) if str(p["rejected"]).strip() != str(p["chosen"]).strip()][: cfg.max_samples]
    if opponent_dir is not None and pairs:
        texts = [(p["prompt"], p["chosen"]) for p in pairs] + [(p["prompt"], p["rejected"]) for p in pairs]
        new = response_logprobs(model, tokenizer, texts, chat=chat)
        opp_model, opp_tok = load_hf(opponent_dir)
        old = response_logprobs(opp_model, opp_tok, texts, chat=chat)
        del opp_model
        n = len(pairs)
        wins = sum(
            (new[i][0] - old[i][0]) > (new[n + i][0] - old[n + i][0]) for i in range(n)
        )
        result["heldout_reward_accuracy"] = wins / n
    if all("answer" in r and r["answer"] is not None for r in rows):
        responses = greedy_responses(model, tokenizer, [r["prompt"] for r in rows], cfg.max_new_tokens, chat=chat)
        hits = [extract_answer(text) == str(r["answer"]).strip() for text, r in zip(responses, rows)]
        result["exact_match"] = sum(hits) / len(hits)
        # Per item, in the held-out file's order: what a paired test between two models needs.
        result["exact_match_items"] = [int(h) for h in hits]
        result["examples"] = [
            {"prompt": r["prompt"], "answer": r["answer"], "response": text} for r, text in list(zip(rows, responses))[:5]
        ]
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m spin_mega.evaluation`: one evaluation in a process of its own (the loop's evaluation
    stage), so that the model's memory, on a GPU the CUDA context and cached blocks, goes when it exits."""
    import argparse

    from spin_mega.config import config_to_dict, load_config
    from spin_mega.io import atomic_write_json, read_jsonl
    from spin_mega.rundir import EXIT_BAD_INPUT, config_beside, write_resolved_config

    parser = argparse.ArgumentParser(prog="python -m spin_mega.evaluation")
    parser.add_argument("--config", required=True, help="the run's config (its eval section is used)")
    parser.add_argument("--model", required=True, help="HF model directory to evaluate")
    parser.add_argument("--heldout", required=True, help="JSONL of held-out rows: prompt, response[, answer]")
    parser.add_argument("--out", required=True, help="where to write the evaluation (JSON, atomically)")
    parser.add_argument("--opponent", default=None, help="HF directory of the opponent, for held-out reward accuracy")
    parser.add_argument("--pairs", default=None, help="JSONL of held-out pairs: prompt, chosen, rejected")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, [])
        pairs = read_jsonl(args.pairs) if args.pairs and Path(args.pairs).is_file() else None
        result = evaluate(
            args.model, read_jsonl(args.heldout), cfg.eval, opponent_dir=args.opponent, heldout_pairs=pairs, chat=cfg.data
        )
    except SpinMegaError as exc:
        print(f"spin-mega evaluate: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    write_resolved_config(config_beside(Path(args.out)), config_to_dict(cfg))
    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
