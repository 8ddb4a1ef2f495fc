"""The loop's prompt sample: the same prompts every iteration by default (the authors reused one 50k
set), a fresh draw per iteration with iterations.resample_prompts; the counts land in the summary."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from spin_mega.config import config_from_dict
from spin_mega.io import read_jsonl
from spin_mega.loop.driver import SpinLoop


def _ultrachat_folder(root):
    rows = []
    for i in range(40):
        messages = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        if i % 4 == 0:
            messages += [{"role": "user", "content": f"q{i} again"}, {"role": "assistant", "content": "again"}]
        rows.append({"prompt": f"q{i}", "prompt_id": f"id{i}", "messages": messages})
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "train_sft-00000-of-00001.parquet")
    return root


def _sampled(tmp_path, resample: bool) -> list[list[str]]:
    folder = _ultrachat_folder(tmp_path / f"uc{resample}")
    cfg = config_from_dict({"data": {"train_path": f"{folder}:train_sft"},
                            "iterations": {"num_prompts": 10, "resample_prompts": resample}})
    loop = SpinLoop(cfg, tmp_path / f"w{resample}")
    ids = []
    for t in (0, 1):
        it_dir = tmp_path / f"w{resample}" / f"iter_{t}"
        it_dir.mkdir(parents=True)
        loop._prompts(t, it_dir)
        ids.append(sorted(r["prompt_id"] for r in read_jsonl(it_dir / "prompts.jsonl")))
        counts = json.loads((it_dir / "prompts_counts.json").read_text())
        assert counts == {"rows": 40, "multi_turn_first_turn_only": 10, "skipped": 0, "sampled": 10}
    return ids


def test_same_prompts_every_iteration_by_default(tmp_path):
    first, second = _sampled(tmp_path, resample=False)
    assert len(first) == 10 and first == second


def test_resample_switch_draws_per_iteration(tmp_path):
    first, second = _sampled(tmp_path, resample=True)
    assert len(first) == len(second) == 10 and first != second
