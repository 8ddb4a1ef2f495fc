"""Crash-safe file output: everything is written under a temporary name in the same directory and renamed
into place, so a reader never sees a half-written file and a good old file survives a failed write.

Appended JSONL files (metrics.jsonl, partial generations) are the exception, and the project's one JSONL
reader, `read_jsonl` / `scan_jsonl`, tolerates exactly what an interrupted append leaves: a half-written
last line."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional


def _default_file_mode() -> int:
    # mkstemp creates files 0600; outputs should get the permissions an ordinary open() would give.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator:
    """A file handle on a temporary sibling of `path`; renamed onto `path` when the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, _default_file_mode())
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as handle:
        handle.write(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling directory; on success it replaces `path` (an old `path` is removed only
    after the new one is complete), on failure it is deleted and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclasses.dataclass
class JsonlContents:
    rows: list[dict]
    line_numbers: list[int]  # of each row, counting from 1
    valid_bytes: int  # the file's length up to the end of the last row kept (and its newline)
    torn_line: Optional[int]  # number of a half-written last line that was left out


def scan_jsonl(path: str | Path, fix: str = "repair or delete that line") -> JsonlContents:
    """The rows of a JSONL file, one JSON object per line, blank lines skipped. A last line that is not
    UTF-8 JSON is what a writer interrupted mid-line leaves: it is left out (`torn_line`). Such a line
    anywhere else, or a line holding something other than an object, raises a DataError naming the file
    and line and ending in `fix`."""
    from spin_mega.errors import DataError

    rows, numbers = [], []
    valid_bytes = offset = 0
    bad: Optional[tuple[int, str]] = None  # a line that did not parse: an error unless nothing follows it
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            if bad is not None:
                raise DataError(
                    f"{path} line {bad[0]} {bad[1]}, and lines follow it, so it is not what an interrupted write "
                    f"leaves: {fix}"
                )
            try:
                row = json.loads(raw.decode("utf-8").rstrip())
            except UnicodeDecodeError as exc:
                bad = (number, f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte offset {start + exc.start})")
                continue
            except json.JSONDecodeError as exc:
                bad = (number, f"is not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number} holds a JSON {type(row).__name__}, not an object: {fix}")
            rows.append(row)
            numbers.append(number)
            valid_bytes = offset
    return JsonlContents(rows, numbers, valid_bytes, bad[0] if bad is not None else None)


_torn_warned: set[tuple[str, int]] = set()


def read_jsonl(path: str | Path, fix: str = "repair or delete that line") -> list[dict]:
    """The rows of a JSONL file (see scan_jsonl); a half-written last line is left out with a warning on
    stderr, given once per process."""
    contents = scan_jsonl(path, fix)
    if contents.torn_line is not None and (str(path), contents.torn_line) not in _torn_warned:
        _torn_warned.add((str(path), contents.torn_line))
        print(
            f"spin-mega: warning: left out the half-written last line ({contents.torn_line}) of {path}, "
            "as a write in progress, or one that was interrupted, leaves it",
            file=sys.stderr,
            flush=True,
        )
    return contents.rows


def append_jsonl(path: str | Path, rows) -> None:
    """Appends whole lines and fsyncs, so that after a crash at most a torn last line needs discarding."""
    with open(path, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
