"""Held-out evaluation of an exported model, with nothing downloaded.

- heldout_logp_per_token: mean log-likelihood per response token of the held-out human responses
  (higher is better; SPIN should raise it, since it pushes the model towards the human distribution).
- heldout_reward_accuracy: SPIN's reward accuracy on held-out pairs (human response vs the opponent's
  own generation, where the two differ): how often log p_new(y|x) - log p_opp(y|x) exceeds
  log p_new(y'|x) - log p_opp(y'|x).
- exact_match: the task metric where the held-out rows carry an `answer`: greedy decoding, answer
  extracted as the text after the last "is " or ": " without the closing full stop (the demo's style).
- lm-evaluation-harness tasks, when `eval.lm_eval_tasks` is set and the harness and its data are installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from spin_mega.config import EvalConfig
from spin_mega.data.chat import render_prompt, render_response
from spin_mega.errors import SpinMegaError


def extract_answer(response: str) -> str:
    """The answer in a response written in the demo's style: the text after the last " is " or ": ",
    without the closing full stop. Applied the same way to human and generated responses."""
    text = response.strip()
    cut = max(text.rfind(" is "), text.rfind(": "))
    if cut >= 0:
        text = text[cut + (4 if text[cut] == " " else 2) :]
    return text.strip().rstrip(".").strip()


def _load_hf(model_dir: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir))


@torch.no_grad()
def response_logprobs(model, tokenizer, pairs: Sequence[tuple[Any, str]], batch_size: int = 16) -> list[tuple[float, int]]:
    """(sum of response-token log-probs, number of response tokens) per (prompt, response), rendered and
    tokenized exactly as training does."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    results: list[tuple[float, int]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        encoded = []
        for prompt, response in chunk:
            p = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
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
def greedy_responses(model, tokenizer, prompts: list[Any], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy responses with transformers: deterministic, and for a few prompts cheaper than an engine start."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [
            tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
            for p in prompts[start : start + batch_size]
        ]
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
) -> dict:
    """`heldout` rows: prompt, response[, answer]; `heldout_pairs` rows: prompt, chosen, rejected."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SpinMegaError(f"cannot evaluate {model_dir}: not an HF model directory")
    rows = list(heldout)[: cfg.max_samples]
    if not rows:
        raise SpinMegaError("no held-out rows to evaluate on")
    model, tokenizer = _load_hf(model_dir)
    scored = response_logprobs(model, tokenizer, [(r["prompt"], r["response"]) for r in rows])
    total_tokens = sum(n for _, n in scored)
    result: dict[str, Any] = {
        "model": str(model_dir),
        "num_samples": len(rows),
        "heldout_logp_per_token": sum(s for s, _ in scored) / max(total_tokens, 1),
        "heldout_reward_accuracy": None,
        "exact_match": None,
    }
    # Pairs whose generation equals the human response have equal rewards by construction: no signal.
    pairs = [p for p in (heldout_pairs or []) if str(p["rejected"]).strip() != str(p["chosen"]).strip()][: cfg.max_samples]
    if opponent_dir is not None and pairs:
        texts = [(p["prompt"], p["chosen"]) for p in pairs] + [(p["prompt"], p["rejected"]) for p in pairs]
        new = response_logprobs(model, tokenizer, texts)
        opp_model, opp_tok = _load_hf(opponent_dir)
        old = response_logprobs(opp_model, opp_tok, texts)
        del opp_model
        n = len(pairs)
        wins = sum(
            (new[i][0] - old[i][0]) > (new[n + i][0] - old[n + i][0]) for i in range(n)
        )
        result["heldout_reward_accuracy"] = wins / n
    if all("answer" in r and r["answer"] is not None for r in rows):
        responses = greedy_responses(model, tokenizer, [r["prompt"] for r in rows], cfg.max_new_tokens)
        hits = [extract_answer(text) == str(r["answer"]).strip() for text, r in zip(responses, rows)]
        result["exact_match"] = sum(hits) / len(hits)
        # Per item, in the held-out file's order: what a paired test between two models needs.
        result["exact_match_items"] = [int(h) for h in hits]
        result["examples"] = [
            {"prompt": r["prompt"], "answer": r["answer"], "response": text} for r, text in list(zip(rows, responses))[:5]
        ]
    if cfg.lm_eval_tasks:
        result["lm_eval"] = _lm_eval(model_dir, cfg.lm_eval_tasks)
    return result


def _lm_eval(model_dir: Path, tasks: list[str]) -> dict:
    """Optional hook: runs lm-evaluation-harness when it and the tasks' data are installed locally."""
    try:
        import lm_eval
    except ImportError:
        raise SpinMegaError("eval.lm_eval_tasks is set but lm-evaluation-harness is not installed (pip install lm-eval)") from None
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir}", tasks=tasks)
    return {task: metrics for task, metrics in out.get("results", {}).items()}
