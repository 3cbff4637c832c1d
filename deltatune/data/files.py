"""Reading a user's labelled data file (.csv, .tsv, .jsonl, optionally gzip-compressed)."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from deltatune.errors import UserError

SUPPORTED_SUFFIXES = (".csv", ".tsv", ".jsonl", ".csv.gz", ".tsv.gz", ".jsonl.gz")


@dataclass(frozen=True)
class LabelledRow:
    """One row of a user file, validated: non-empty text (and pair text), label as a string."""

    text: str
    text_pair: str | None
    label: str


@dataclass(frozen=True)
class RawRow:
    """One parsed record before validation: where it came from and its column values."""

    location: str  # "row 3 (line 4)" for CSV/TSV, "line 4" for JSONL
    values: dict[str, Any]


def data_file_suffix(path: Path) -> str | None:
    """The supported suffix ``path`` ends with (case-insensitive), or None."""
    lowered = path.name.lower()
    matches = [suffix for suffix in SUPPORTED_SUFFIXES if lowered.endswith(suffix)]
    return max(matches, key=len) if matches else None


def task_name_for_file(path: Path) -> str:
    """The task name of a data file: its name without the data suffix ("reviews.csv.gz" -> "reviews")."""
    suffix = data_file_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def read_text(path: str | Path) -> str:
    """A user's text file (`train --data`, `predict --file`; .gz unpacked): strict UTF-8, one rule for all.

    A byte-order mark (spreadsheet CSV exports) is dropped; invalid UTF-8 is a UserError naming the file
    and the line, never replacement characters."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"file not found: {path}")
    if not path.is_file():
        raise UserError(f"not a file: {path}")
    try:
        data = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as error:  # unreadable file, corrupt gzip stream
        raise UserError(f"cannot read {path}: {error}") from error
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise UserError(f"{path}: line {line} is not valid UTF-8 (byte {error.start}: "
                        f"{data[error.start:error.start + 1]!r}); save the file as UTF-8") from error


def read_delimited(handle: IO[str], path: Path, delimiter: str) -> tuple[list[str], list[RawRow]]:
    reader = csv.DictReader(handle, delimiter=delimiter)
    rows: list[RawRow] = []
    try:
        columns = list(reader.fieldnames or [])
        for row_number, record in enumerate(reader, start=1):
            location = f"row {row_number} (line {reader.line_num})"
            rows.append(RawRow(location, {key: value for key, value in record.items() if key is not None}))
    except csv.Error as error:
        raise UserError(
            f"{path}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} near line "
            f"{reader.line_num}: {error}"
        ) from error
    if not columns:
        raise UserError(f"{path} is empty: expected a header line with column names")
    return columns, rows


def read_jsonl(handle: IO[str], path: Path) -> tuple[list[str], list[RawRow]]:
    columns: dict[str, None] = {}
    rows: list[RawRow] = []
    for line_number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: line {line_number} is not valid JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise UserError(f"{path}: line {line_number} is not a JSON object")
        columns.update(dict.fromkeys(record))
        rows.append(RawRow(f"line {line_number}", record))
    return list(columns), rows


def read_raw_rows(path: Path) -> tuple[list[str], list[RawRow]]:
    """Column names (in file order) and all records of a data file; raises UserError on bad files."""
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if not path.is_file():
        raise UserError(f"data path is not a file: {path}")
    suffix = data_file_suffix(path)
    if suffix is None:
        raise UserError(
            f"unsupported data file type: {path.name} (supported: {', '.join(SUPPORTED_SUFFIXES)})"
        )
    handle = io.StringIO(read_text(path), newline="")
    if suffix.startswith(".jsonl"):
        return read_jsonl(handle, path)
    return read_delimited(handle, path, "\t" if suffix.startswith(".tsv") else ",")


def cell_text(value: Any, column: str, location: str, path: Path) -> str:
    """A cell as stripped text ("" when missing); JSON numbers become their string form."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UserError(
            f"{path}: {location}: column '{column}' must be a string or number, got {type(value).__name__}"
        )
    return str(value).strip()


def iter_labelled_rows(
    path: Path, rows: list[RawRow], text_column: str, text_pair_column: str | None, label_column: str
) -> Iterator[LabelledRow]:
    for row in rows:
        text = cell_text(row.values.get(text_column), text_column, row.location, path)
        if not text:
            raise UserError(f"{path}: {row.location} has empty text in column '{text_column}'")
        text_pair = None
        if text_pair_column is not None:
            text_pair = cell_text(row.values.get(text_pair_column), text_pair_column, row.location, path)
            if not text_pair:
                raise UserError(f"{path}: {row.location} has empty text in column '{text_pair_column}'")
        label = cell_text(row.values.get(label_column), label_column, row.location, path)
        if not label:
            raise UserError(f"{path}: {row.location} has a missing label in column '{label_column}'")
        yield LabelledRow(text, text_pair, label)


def read_labelled_file(
    path: str | Path, text_column: str, text_pair_column: str | None, label_column: str
) -> list[LabelledRow]:
    """Read and validate every row of a labelled data file, in file order."""
    path = Path(path)
    columns, rows = read_raw_rows(path)
    return labelled_rows(path, columns, rows, text_column, text_pair_column, label_column)


def labelled_rows(path: Path, columns: list[str], rows: list[RawRow], text_column: str,
                  text_pair_column: str | None, label_column: str) -> list[LabelledRow]:
    """Validate the rows of a classification file already read (`read_raw_rows`)."""
    flags = [("--text-column", text_column), ("--text-pair-column", text_pair_column), ("--label-column", label_column)]
    for i, (flag, column) in enumerate(flags):
        other = next((f for f, c in flags[i + 1:] if column is not None and c == column), None)
        if other:
            raise UserError(f"{flag} and {other} both name column '{column}': each role needs its own column")
    if not rows:
        raise UserError(f"{path} has no data rows")
    requested = [("text", text_column), ("label", label_column)]
    if text_pair_column is not None:
        requested.insert(1, ("text pair", text_pair_column))
    for role, column in requested:
        if column not in columns:
            available = ", ".join(repr(name) for name in columns) or "none"
            raise UserError(f"{path}: {role} column '{column}' not found (available columns: {available})")
    return list(iter_labelled_rows(path, rows, text_column, text_pair_column, label_column))
