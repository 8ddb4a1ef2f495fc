"""Generation with the transformers backend: rows, prompt rendering, resumption, sharding, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from transformers import AutoTokenizer

from spin_mega.config import DataConfig
from spin_mega.data.chat import render_prompt
from spin_mega.errors import DataError, SpinMegaError
from spin_mega.generation import (
    generate,
    merge_shards,
    prepare_prompts,
    shard_from_env,
    shard_path,
)
from spin_mega.generation.base import cut_at_eos, prompt_seed
from spin_mega.generation.runner import partial_path
from tests.generation.gen_helpers import gen_config, read_rows
from tests.support import REPO


def test_hf_generates_one_row_per_prompt(tiny_model, sft_file, sft_rows, tmp_path):
    out = tmp_path / "gen.jsonl"
    summary = generate(tiny_model, sft_file(6), out, config=gen_config(), progress=False)
    rows = read_rows(out)
    assert summary.total == summary.generated == 6 and summary.resumed == 0
    assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in sft_rows[:6]]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    for row, source in zip(rows, sft_rows):
        assert set(row) == {"prompt_id", "prompt", "chosen", "rejected", "meta"}
        assert row["prompt"] == source["prompt"] and row["chosen"] == source["response"]
        assert isinstance(row["rejected"], str)
        meta = row["meta"]
        assert meta["backend"] == "hf" and meta["finish_reason"] in ("stop", "length")
        assert 1 <= meta["num_tokens"] <= 8
        # The stored text holds no special tokens: they are stripped when decoding.
        for special in tokenizer.all_special_tokens:
            assert special not in row["rejected"]
    assert not partial_path(out).exists()


def test_prompts_are_rendered_exactly_as_training_renders_them(tiny_model, sft_rows):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    rows = sft_rows[:8] + [{"prompt_id": "chat", "response": "ok",
                            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 2."}]}]
    prepared, dropped = prepare_prompts(tokenizer, rows)
    assert dropped == 0 and len(prepared) == len(rows)
    for p, row in zip(prepared, rows):
        expected = render_prompt(tokenizer, row["prompt"])
        assert p.text.encode() == expected.encode()
        assert list(p.token_ids) == tokenizer(expected, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(list(p.token_ids)) == expected
        assert list(p.token_ids).count(tokenizer.bos_token_id) == 1


def test_long_prompts_follow_the_training_truncation_policy(tiny_model, sft_rows):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    full, _ = prepare_prompts(tokenizer, sft_rows[:4])
    limit = min(len(p.token_ids) for p in full) - 1
    cut, dropped = prepare_prompts(tokenizer, sft_rows[:4], DataConfig(max_prompt_length=limit, prompt_truncation="keep_end"))
    assert dropped == 0
    assert [p.token_ids for p in cut] == [p.token_ids[-limit:] for p in full]
    kept, dropped = prepare_prompts(tokenizer, sft_rows[:4], DataConfig(max_prompt_length=limit, prompt_truncation="drop"))
    assert kept == [] and dropped == 4


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 2, 0, 0], [2]) == ([5, 6], 3, "stop")
    assert cut_at_eos([5, 6, 7], [2, 9]) == ([5, 6, 7], 3, "length")
    assert cut_at_eos([9, 5], [2, 9]) == ([], 1, "stop")


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_regenerates_nothing_finished(tiny_model, sft_file, sft_rows, tmp_path):
    data = sft_file(10)
    out = tmp_path / "gen.jsonl"
    cfg = gen_config(batch_size=3)
    flushes: list[list[dict]] = []

    def stop_after_two(rows):
        flushes.append(rows)
        if len(flushes) == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        generate(tiny_model, data, out, config=cfg, progress=False, on_flush=stop_after_two)
    assert not out.exists()
    first = read_rows(partial_path(out))
    assert len(first) == 6

    second: list[dict] = []
    summary = generate(tiny_model, data, out, config=cfg, progress=False, on_flush=second.extend)
    assert (summary.resumed, summary.generated, summary.total) == (6, 4, 10)
    assert {r["prompt_id"] for r in second}.isdisjoint(r["prompt_id"] for r in first)
    rows = read_rows(out)
    assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in sft_rows[:10]]
    by_id = {r["prompt_id"]: r for r in rows}
    assert all(by_id[r["prompt_id"]] == r for r in first)
    assert not partial_path(out).exists()

    again = generate(tiny_model, data, out, config=cfg, progress=False)
    assert again.generated == 0 and read_rows(out) == rows


def test_resume_after_the_process_is_killed_mid_run(tiny_model, sft_file, sft_rows, tmp_path):
    """A real hard kill (SIGKILL right after the second flush), plus a torn last line as a kill in the
    middle of a write leaves it; the re-run keeps the finished rows and completes the file."""
    data = sft_file(12)
    out = tmp_path / "gen.jsonl"
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        from spin_mega.generation import generate
        from tests.generation.gen_helpers import gen_config

        flushes = []

        def die(rows):
            flushes.append(rows)
            if len(flushes) == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        if __name__ == "__main__":
            generate({str(tiny_model)!r}, {str(data)!r}, {str(out)!r}, config=gen_config(batch_size=4),
                     progress=False, on_flush=die)
    """))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    partial = partial_path(out)
    finished = read_rows(partial)
    assert len(finished) == 8 and not out.exists()
    with open(partial, "a") as handle:
        handle.write('{"prompt_id": "' + sft_rows[8]["prompt_id"] + '", "prompt": "torn')

    regenerated: list[dict] = []
    summary = generate(tiny_model, data, out, config=gen_config(batch_size=4), progress=False, on_flush=regenerated.extend)
    assert (summary.resumed, summary.generated) == (8, 4)
    assert [r["prompt_id"] for r in regenerated] == [r["prompt_id"] for r in sft_rows[8:12]]
    rows = read_rows(out)
    assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in sft_rows[:12]]
    assert rows[:8] == finished


def test_pairs_rows_use_chosen_as_the_human_response(tiny_model, sft_rows, tmp_path):
    pairs = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "chosen": r["response"], "rejected": "old"} for r in sft_rows[:3]]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    generate(tiny_model, path, tmp_path / "gen.jsonl", config=gen_config(), progress=False)
    assert [r["chosen"] for r in read_rows(tmp_path / "gen.jsonl")] == [r["response"] for r in sft_rows[:3]]


def test_duplicate_prompt_ids_are_refused(tiny_model, sft_rows, tmp_path):
    rows = [sft_rows[0], dict(sft_rows[1], prompt_id=sft_rows[0]["prompt_id"])]
    with pytest.raises(DataError, match="more than once"):
        generate(tiny_model, rows, tmp_path / "gen.jsonl", config=gen_config(), progress=False)


def test_partial_file_of_another_run_is_refused(tiny_model, sft_file, tmp_path):
    out = tmp_path / "gen.jsonl"
    partial_path(out).write_text(json.dumps({"prompt_id": "not-in-this-data", "rejected": "x"}) + "\n")
    with pytest.raises(DataError, match="not among this run's prompts"):
        generate(tiny_model, sft_file(3), out, config=gen_config(), progress=False)


def test_shards_merge_into_the_unsharded_rows(tiny_model, sft_file, tmp_path):
    # Batches of one prompt: each sample then depends only on its own prompt's seed, so the sharded
    # run must reproduce the unsharded one row for row, sampled text included.
    data = sft_file(7)
    cfg = gen_config(batch_size=1)
    whole = tmp_path / "whole.jsonl"
    generate(tiny_model, data, whole, config=cfg, progress=False)
    out = tmp_path / "sharded.jsonl"
    for i in range(3):
        summary = generate(tiny_model, data, out, config=cfg, shard_index=i, num_shards=3, progress=False)
        assert summary.out == shard_path(out, i, 3)
        assert [r["meta"]["index"] for r in read_rows(summary.out)] == list(range(i, 7, 3))
    assert not out.exists()
    merge_shards(out, 3)
    assert read_rows(out) == read_rows(whole)


def test_merge_names_unfinished_and_missing_shards(tiny_model, sft_file, tmp_path):
    data = sft_file(6)
    out = tmp_path / "gen.jsonl"
    generate(tiny_model, data, out, config=gen_config(), shard_index=0, num_shards=3, progress=False)
    partial_path(shard_path(out, 1, 3)).write_text("")
    with pytest.raises(SpinMegaError) as err:
        merge_shards(out, 3)
    assert "shard 1 is unfinished" in str(err.value) and "shard 2 has not been generated" in str(err.value)
    assert not out.exists()


def test_clear_errors_for_missing_model_and_data(tiny_model, sft_file, tmp_path):
    with pytest.raises(SpinMegaError, match="model directory .* does not exist"):
        generate(tmp_path / "nope", sft_file(2), tmp_path / "o.jsonl", config=gen_config(), progress=False)
    with pytest.raises(SpinMegaError, match="no config.json"):
        generate(tmp_path, sft_file(2), tmp_path / "o.jsonl", config=gen_config(), progress=False)
    with pytest.raises(DataError, match="does not exist"):
        generate(tiny_model, tmp_path / "missing.jsonl", tmp_path / "o.jsonl", config=gen_config(), progress=False)


def test_cli_errors_are_one_sentence(tiny_model, tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cases = [
        (["--model", str(tmp_path / "nope"), "--data", "x.jsonl"], "does not exist"),
        (["--model", str(tiny_model), "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl does not exist"),
        (["--merge", "--num-shards", "2"], "shard 0 has not been generated"),
    ]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "spin_mega", "generate", "--out", str(tmp_path / "o.jsonl"),
                               "--backend", "hf", *args], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and message in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("spin-mega generate: error:")


def test_cli_generates_with_config_overrides(tiny_model, sft_file, tmp_path):
    out = tmp_path / "gen.jsonl"
    config = tmp_path / "c.yaml"
    # data.schema describes data.train_path; a file given with --data is recognised by its columns.
    config.write_text("data:\n  schema: ultrachat\ngeneration:\n  backend: vllm\n  max_new_tokens: 64\n")
    proc = subprocess.run(
        [sys.executable, "-m", "spin_mega", "generate", str(config), "--model", str(tiny_model), "--data", str(sft_file(5)),
         "--out", str(out), "--backend", "hf", "--set", "generation.max_new_tokens=3", "--num-prompts", "4", "--no-progress"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(out)
    assert len(rows) == 4 and all(r["meta"]["backend"] == "hf" and r["meta"]["num_tokens"] <= 3 for r in rows)


def test_shard_defaults_come_from_slurm():
    assert shard_from_env({}) == (0, 1)
    assert shard_from_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}) == (2, 4)
    with pytest.raises(SpinMegaError):
        shard_from_env({"SLURM_PROCID": "x", "SLURM_NTASKS": "4"})


def test_prompt_seeds_depend_on_seed_and_prompt_only():
    assert prompt_seed(0, "a") == prompt_seed(0, "a")
    assert len({prompt_seed(0, "a"), prompt_seed(1, "a"), prompt_seed(0, "b")}) == 3
    assert 0 <= prompt_seed(123, "x") < 2**31
