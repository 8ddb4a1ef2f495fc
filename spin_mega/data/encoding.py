"""Text data must be UTF-8: a file in another encoding (latin-1, cp1252, UTF-16) is refused before any of
it is used, with the place of the first byte that is not UTF-8, instead of failing later inside pyarrow.

`check_utf8_file` reads a JSON / JSONL file's raw bytes (its byte offset and line are what an editor or
`iconv` needs); `check_utf8_table` validates the string columns of an Arrow-backed dataset (parquet,
`save_to_disk` directories, the datasets cache), where a row and a column locate the text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from spin_mega.errors import DataError

_CHUNK = 16 << 20
_FIX_FILE = "convert the file to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8, with the encoding it was written in)"
_FIX_TABLE = "write that text as UTF-8 where the data is made"


def first_invalid_utf8(path: str | Path) -> Optional[tuple[int, int, int]]:
    """(byte offset, the byte, line number) of the first byte of `path` that is not valid UTF-8, or None."""
    offset = 0  # of `carry` in the file
    carry = b""
    lines_before = 0
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(_CHUNK)
            data = carry + chunk
            if not data:
                return None
            try:
                data.decode("utf-8")
                good = len(data)
            except UnicodeDecodeError as exc:
                # A character cut by the chunk boundary is completed by the next read.
                if chunk and exc.reason == "unexpected end of data" and exc.start >= len(data) - 3:
                    good = exc.start
                else:
                    bad = offset + exc.start
                    return bad, data[exc.start], lines_before + data.count(b"\n", 0, exc.start) + 1
            lines_before += data.count(b"\n", 0, good)
            offset += good
            carry = data[good:]
            if not chunk:
                return None


def check_utf8_file(path: str | Path) -> None:
    found = first_invalid_utf8(path)
    if found is not None:
        offset, byte, line = found
        raise DataError(f"{path} is not UTF-8 text: byte 0x{byte:02x} at byte offset {offset} (line {line}) does not "
                        f"decode; {_FIX_FILE}")


def check_utf8_table(table: pa.Table, source: str, row_files: Optional[list[tuple[str, int]]] = None) -> None:
    """Validates every string column (nested ones too: message lists) of `table`. `row_files`: (file, rows)
    of each file the table was read from, in order, to name the file holding a bad row."""
    try:
        table.validate(full=True)
        return
    except pa.ArrowInvalid:
        pass  # located below; other invalid data is left to the readers, which name it themselves
    for name in table.column_names:
        row_start = 0
        for chunk in table.column(name).chunks:
            found = _first_bad_string(chunk)
            if found is not None:
                row, raw = found
                try:
                    raw.decode("utf-8")
                    detail = ""
                except UnicodeDecodeError as exc:
                    detail = f" (byte 0x{raw[exc.start]:02x} at byte offset {exc.start} of the value)"
                where = _locate(row_start + row, source, row_files)
                raise DataError(f"{where}, column '{name}' is not UTF-8 text{detail}; {_FIX_TABLE}")
            row_start += len(chunk)


def _first_bad_string(array: pa.Array) -> Optional[tuple[int, bytes]]:
    """(row of `array`, the bytes) of the first string anywhere inside `array` that is not UTF-8, or None."""
    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        row = _first_invalid(array)
        if row is None:
            return None
        raw = array.slice(row, 1).cast(pa.large_binary() if pa.types.is_large_string(kind) else pa.binary())
        return row, raw[0].as_py()
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        found = _first_bad_string(array.flatten())
        if found is None:
            return None
        return pc.list_parent_indices(array)[found[0]].as_py(), found[1]
    if pa.types.is_struct(kind):
        candidates = [f for f in (_first_bad_string(child) for child in array.flatten()) if f is not None]
        return min(candidates, key=lambda f: f[0]) if candidates else None
    return None


def _first_invalid(strings: pa.Array) -> Optional[int]:
    """Binary search for the first element of a flat string array that fails validation."""
    lo, hi = 0, len(strings)  # the first invalid element lies in [lo, hi)
    try:
        strings.validate(full=True)
        return None
    except pa.ArrowInvalid:
        pass
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            strings.slice(lo, mid - lo).validate(full=True)
            lo = mid
        except pa.ArrowInvalid:
            hi = mid
    return lo


def _locate(row: int, source: str, row_files: Optional[list[tuple[str, int]]]) -> str:
    for file, rows in row_files or []:
        if row < rows:
            return f"{file}: row {row + 1}"
        row -= rows
    return f"{source}: row {row + 1}"
