"""Cheap checks of local data files, run by ``flexc validate`` before any model loads.

Each parses at most the first :data:`SNIFF_BYTES` of a file (a Parquet file's footer schema, a
small ``.json`` file whole), streams the rest only to check it is UTF-8 text, and says what is wrong in one sentence naming the file: empty,
binary, not UTF-8, not JSON, records without the ``text_field``, a text field that is not a
string. The formats are those :func:`flexc.data.calibration._load_dataset` reads: ``.txt``
(one document per file), ``.jsonl``/``.json`` (JSON lines, a JSON array of objects, or one
object) and ``.parquet``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SNIFF_BYTES = 64 * 1024
_FORMATS = {".txt": "UTF-8 text", ".jsonl": "JSON lines", ".json": "JSON", ".parquet": "a Parquet table"}
WHOLE_JSON_BYTES = 10_000_000  # a .json file up to this size may be parsed whole to check it
RECORDS_CHECKED = 5


def check_data_file(path: Path, text_field: str, role: str = "calibration") -> str | None:
    """What is wrong with data file ``path`` (None when its first records look usable).

    ``role`` (calibration or evaluation) names the spec section in hints.
    """
    size = path.stat().st_size
    suffix = path.suffix.lower()
    if size == 0:
        return f"{path} is empty; expected {_FORMATS.get(suffix, 'text')} with at least one document"
    if suffix == ".parquet":
        return _check_parquet(path, text_field, role)
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    complete = size <= SNIFF_BYTES
    if b"\0" in head:
        return f"{path} is a binary file; a {suffix} data file must be UTF-8 text"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if complete or exc.start < len(head) - 3:  # else only the read cut a multi-byte character
            return (f"{path} is not UTF-8 text (invalid byte at offset {exc.start}); expected UTF-8 text "
                    "(re-save it as UTF-8)")
        text = head[: exc.start].decode("utf-8")
    if not complete:
        tail = _check_rest(path, suffix)
        if tail is not None:
            return tail
    text = text.removeprefix("\ufeff")  # a byte-order mark is allowed (datasets skips it)
    if not text.strip() and complete:
        return f"{path} holds only whitespace; expected {_FORMATS.get(suffix, 'text')} with at least one document"
    if suffix == ".txt":
        return None
    records = _first_records(path, text, complete, size)
    if isinstance(records, str):
        return records
    for i, record in enumerate(records, 1):
        if not isinstance(record, dict):
            return f"{path}: record {i} is {_kind(record)}; expected a JSON object with a {text_field!r} field"
        if text_field not in record:
            fields = ", ".join(map(repr, list(record)[:10])) or "none"
            return f"{path}: record {i} has no {text_field!r} field (its fields: {fields}); set data.{role}.text_field"
        value = record[text_field]
        if value is not None and not isinstance(value, str):
            return f"{path}: field {text_field!r} of record {i} is {_kind(value)}; expected a string"
    return None


def _check_rest(path: Path, suffix: str) -> str | None:
    """The whole file is UTF-8 text without NUL bytes (the first read saw only its start; a binary tail
    would fail tokenization minutes later). Streams it: a gigabyte takes about a second."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            if b"\0" in chunk:
                return (f"{path} holds binary data (a NUL byte at offset {offset + chunk.index(0):,}); a {suffix} data "
                        "file must be UTF-8 text throughout")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return f"{path} is not UTF-8 text (invalid byte at offset {offset + exc.start:,}); expected UTF-8 throughout"
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"{path} is not UTF-8 text (it ends inside a multi-byte character); expected UTF-8 throughout"
    return None


def _first_records(path: Path, text: str, complete: bool, size: int) -> list[Any] | str:
    """Up to :data:`RECORDS_CHECKED` records from the start of a JSON file, or a message."""
    stripped = text.lstrip()
    if not stripped:
        return []
    if stripped[0] == "[":  # a JSON array: decode its first element(s) only
        decoder, pos, out = json.JSONDecoder(), 1, []
        try:
            while len(out) < RECORDS_CHECKED:
                pos = _skip(stripped, pos)
                if pos >= len(stripped) or stripped[pos] == "]":
                    break
                value, pos = decoder.raw_decode(stripped, pos)
                out.append(value)
                pos = _skip(stripped, pos)
                if pos < len(stripped) and stripped[pos] == ",":
                    pos += 1
        except json.JSONDecodeError as exc:
            if complete:
                return f"{path} is not valid JSON ({exc}); expected a JSON array of objects, or one object"
        return out
    lines = text.splitlines()
    if not complete:
        lines = lines[:-1]  # the read may have cut the last line
    out, bad = [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            bad = f"{path}: line {number} is not JSON ({exc.msg}); expected one JSON object per line"
            break
        if len(out) == RECORDS_CHECKED:
            break
    if bad is None:
        return out
    if path.suffix.lower() == ".json" and size <= WHOLE_JSON_BYTES:  # one pretty-printed document
        try:
            whole = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"{path} is not valid JSON ({exc}); expected a JSON array of objects, or one object"
        return whole[:RECORDS_CHECKED] if isinstance(whole, list) else [whole]
    return bad


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _kind(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return {dict: "a JSON object", list: "a JSON list", str: "a string"}.get(type(value), "a number")


def _check_parquet(path: Path, text_field: str, role: str) -> str | None:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - datasets requires pyarrow
        return None
    try:
        schema = pq.read_schema(str(path))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
        return f"{path} is not a readable Parquet file ({exc}); expected a Parquet table with a {text_field!r} column"
    if text_field not in schema.names:
        columns = ", ".join(schema.names[:10])
        return f"{path} has no column {text_field!r} (its columns: {columns}); set data.{role}.text_field"
    return None


def approx_max_tokens(paths: list[Path]) -> int:
    """An upper bound on the tokens the files can yield: at most one token per byte, plus one per line."""
    total = 0
    for p in paths:
        size = p.stat().st_size
        total += size + size // 2 + 1  # a newline-separated record of >= 2 bytes adds at most one EOS
    return total
