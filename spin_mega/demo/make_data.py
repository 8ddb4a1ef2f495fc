"""Writes the demo's SFT data: `assets/train.jsonl`, `assets/validation.jsonl` and `assets/heldout.jsonl`.

    python -m spin_mega.demo.make_data            # rewrites the shipped files (byte-identical output)
    python -m spin_mega.demo.make_data --check    # exits 1 if the shipped files differ from this script

Three templated tasks with an exact answer, so a demo can score a model by exact match in seconds:
two-digit addition (an answer to compute, with carries), repeating a word list (copying) and reversing
one (harder). Every human response follows one fixed style, ending in the answer and a full stop.

The sizes are chosen for a fair test of SPIN (DESIGN.md): the training split (8,100 rows) is too large for
the tiny model to memorise before its validation loss stops improving, so theta_0's own samples differ
from the human responses on thousands of prompts rather than on a few memorisation slips; the test split
(`heldout`, 600 prompts) makes one standard error of exact match at most 2.1 points; `validation` (300
prompts) is the only split the demo uses to choose anything (when theta_0 stops, the learning rates).
No prompt occurs in two splits.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from spin_mega.evaluation.heldout import extract_answer

ASSETS = Path(__file__).resolve().parent / "assets"
SEED = 20240102
TRAIN_PER_TASK = 2700
VALIDATION_PER_TASK = 100
HELDOUT_PER_TASK = 200

WORDS = (
    "red blue green cat dog sun moon tree fish bird star rain snow milk cake road ship lamp book door "
    "hat cup box pen key ring bell frog wolf bear lion duck goat corn rice salt gold iron rock sand"
).split()

ADD_PROMPTS = ("What is {a} plus {b}?", "Add {a} and {b}.")
COPY_PROMPTS = ("Repeat after me: {words}", "Say these words again: {words}")
REVERSE_PROMPTS = ("Reverse these words: {words}", "Say these words backwards: {words}")


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    answer = str(a + b)
    return rng.choice(ADD_PROMPTS).format(a=a, b=b), f"{a} plus {b} is {answer}.", answer


def _copy(rng: random.Random) -> tuple[str, str, str]:
    words = " ".join(rng.sample(WORDS, rng.randint(1, 5)))
    return rng.choice(COPY_PROMPTS).format(words=words), f"You said: {words}.", words


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(2, 4))
    answer = " ".join(reversed(words))
    return rng.choice(REVERSE_PROMPTS).format(words=" ".join(words)), f"Backwards: {answer}.", answer


TASKS = {"add": _add, "copy": _copy, "reverse": _reverse}


def build_rows() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    splits: dict[str, list[dict]] = {"heldout": [], "validation": [], "train": []}
    # Evaluation rows are drawn first and then excluded from later splits, so no evaluated prompt is trained on.
    seen: set[str] = set()
    for split, per_task in (("heldout", HELDOUT_PER_TASK), ("validation", VALIDATION_PER_TASK), ("train", TRAIN_PER_TASK)):
        for task, make in TASKS.items():
            count = 0
            while count < per_task:
                prompt, response, answer = make(rng)
                if prompt in seen:
                    continue
                seen.add(prompt)
                count += 1
                splits[split].append(
                    {"prompt_id": f"{split}-{task}-{count:04d}", "prompt": prompt, "response": response, "answer": answer}
                )
                assert extract_answer(response) == answer, (response, answer)
        # Interleaved so that any prefix of a split (a demo's `num_prompts`) covers every task.
        rng.shuffle(splits[split])
    return splits


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    parser.add_argument("--out", type=Path, default=ASSETS, help="output directory (default: the package assets)")
    args = parser.parse_args(argv)
    splits = build_rows()
    if args.check:
        stale = [name for name, rows in splits.items() if not (args.out / f"{name}.jsonl").is_file()
                 or (args.out / f"{name}.jsonl").read_text() != render(rows)]
        for name in stale:
            print(f"{args.out / f'{name}.jsonl'} differs from make_data.py's output", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    from spin_mega.io import atomic_write_text

    for name, rows in splits.items():
        atomic_write_text(args.out / f"{name}.jsonl", render(rows))
        # mkstemp creates files private to the user; package data must be readable by everyone.
        (args.out / f"{name}.jsonl").chmod(0o644)
        print(f"wrote {len(rows)} rows to {args.out / f'{name}.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
