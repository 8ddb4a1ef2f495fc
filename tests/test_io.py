"""The project's one JSONL reader: a half-written last line (what a crash mid-append leaves) is left out
with a warning; anything else that does not parse is refused with the file, the line and the fix."""

from __future__ import annotations

import json

import pytest

from spin_mega.errors import DataError
from spin_mega.io import read_jsonl, scan_jsonl

ROWS = [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.68, "note": "café"}, {"step": 3, "loss": 0.67}]


def _lines(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


@pytest.mark.parametrize(
    "tail",
    [b'{"step": 4, "lo', '{"step": 4, "note": "caf'.encode() + "é".encode()[:1], b"\0" * 37],
    ids=["cut mid-row", "cut inside a UTF-8 character", "NUL bytes a crashed file system leaves"],
)
def test_a_half_written_last_line_is_left_out_with_a_warning(tmp_path, capsys, tail):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(_lines(ROWS) + tail)
    assert read_jsonl(path) == ROWS
    warning = capsys.readouterr().err
    assert f"last line (4) of {path}" in warning and warning.count("\n") == 1
    contents = scan_jsonl(path)
    assert contents.torn_line == 4 and contents.valid_bytes == len(_lines(ROWS))


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(_lines(ROWS)[:-1])
    assert read_jsonl(path) == ROWS
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda data: data.replace(b'"loss": 0.68', b'"loss": 0.', 1), "line 2 is not valid JSON (Expecting ',' delimiter at column 22)"),
        (lambda data: data.replace("café".encode(), b"caf\xe9", 1), "line 2 is not UTF-8 text (byte 0xe9 at byte offset 64)"),
        (lambda data: data.replace(b'{"step": 2, "loss": 0.68, "note": "caf\xc3\xa9"}', b"[2, 0.68]", 1), "line 2 holds a JSON list"),
    ],
    ids=["torn row", "latin-1 byte", "not an object"],
)
def test_a_damaged_line_elsewhere_is_refused_with_file_line_and_fix(tmp_path, damage, problem):
    path = tmp_path / "generations.jsonl"
    data = _lines(ROWS)
    assert data.index("é".encode()) == 64  # the offset the message names
    path.write_bytes(damage(data))
    with pytest.raises(DataError) as caught:
        read_jsonl(path)
    message = str(caught.value)
    assert message.startswith(f"{path} {problem}"), message
    assert message.endswith("repair or delete that line") and "\n" not in message


def test_the_warning_is_given_once_per_file_and_line(tmp_path, capsys):
    path = tmp_path / "twice.jsonl"
    path.write_bytes(_lines(ROWS) + b'{"st')
    read_jsonl(path)
    read_jsonl(path)
    assert capsys.readouterr().err.count("half-written") == 1


@pytest.mark.parametrize("tail, kept", [(b'{"prompt_id": "c", "x": 1}', 3), (b'{"prompt_id": "c", "x', 2)],
                         ids=["whole row without its newline", "torn row"])
def test_generation_resume_leaves_a_partial_file_that_appends_on_a_line_of_its_own(tmp_path, tail, kept):
    from spin_mega.generation.runner import _read_partial

    path = tmp_path / "out.jsonl.partial"
    path.write_bytes(b'{"prompt_id": "a", "x": 1}\n{"prompt_id": "b", "x": 1}\n' + tail)
    done = _read_partial(path, {"a": 0, "b": 1, "c": 2})
    assert len(done) == kept
    with open(path, "a") as handle:  # what the runner does next
        handle.write('{"prompt_id": "d", "x": 1}\n')
    assert [r["prompt_id"] for r in read_jsonl(path)] == ["a", "b", "c", "d"][:kept] + ["d"]
