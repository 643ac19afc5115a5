"""Read a spec's data sources and turn them into fixed-length token batches.

``batches(spec, "calibration")`` is what a pass calls to get its calibration data: documents
are read (builtin corpus, local files, or a cached ``datasets`` dataset), shuffled with the
spec's seed, joined with the tokenizer's end-of-text token, and cut into ``num_samples``
sequences of ``seq_len`` tokens, grouped ``batch_size`` at a time. Everything is offline and
deterministic for a seed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from flexc.compiler.errors import DataError

if TYPE_CHECKING:
    import torch

    from flexc.compiler.spec import DataSource, Spec

log = logging.getLogger("flexc")


def _text_of(row: Any, field: str, where: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        if field not in row:
            raise DataError(f"{where}: a row has no field {field!r} (set text_field; fields: {', '.join(row)})")
        return str(row[field])
    return str(getattr(row, "text", row))


def _read_file(path: Path, field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            yield path.read_text(encoding="utf-8", errors="replace")
        elif suffix == ".jsonl":
            with path.open(encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield _text_of(json.loads(line), field, f"{path}:{n}")
                        except json.JSONDecodeError as exc:
                            raise DataError(f"{path}:{n}: not valid JSON: {exc}") from None
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data.get(field, data) if isinstance(data, dict) else data
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a list of rows or a mapping with a {field!r} list")
            for row in rows:
                yield _text_of(row, field, str(path))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if field not in table.column_names:
                raise DataError(f"{path}: no column {field!r} (columns: {', '.join(table.column_names)})")
            yield from (str(t) for t in table.column(field).to_pylist() if t is not None)
        else:
            raise DataError(f"{path}: unsupported data file type {suffix!r}")
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc}") from None


def load_texts(source: "DataSource", role: str = "calibration") -> list[str]:
    """All documents of ``source`` as strings."""
    split = source.resolved_split(role)
    if source.builtin is not None:
        try:
            from flexc.data.corpus import stdlib_documents
        except ImportError as exc:
            raise DataError(f"the builtin corpus is not available in this installation ({exc})") from None
        return [_text_of(d, source.text_field, source.builtin) for d in stdlib_documents(split)]
    if source.files is not None:
        texts: list[str] = []
        for name in source.files:
            texts.extend(_read_file(Path(name).expanduser(), source.text_field))
        return texts
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    try:
        ds = datasets.load_dataset(source.hub, source.config, split=split)
    except Exception as exc:  # datasets raises many kinds when offline
        raise DataError(
            f"cannot load dataset {source.hub!r} (config {source.config!r}, split {split!r}) from the local "
            f"cache — flexc runs offline: {type(exc).__name__}: {exc}"
        ) from None
    if source.text_field not in ds.column_names:
        raise DataError(f"dataset {source.hub!r} has no column {source.text_field!r} (columns: {ds.column_names})")
    return [str(t) for t in ds[source.text_field] if t]


def token_blocks(texts: list[str], tokenizer: Any, *, num_samples: int, seq_len: int, seed: int = 0) -> "torch.Tensor":
    """``[n, seq_len]`` token ids cut from the shuffled, concatenated documents (n <= num_samples)."""
    import torch

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    sep = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    need = num_samples * seq_len
    ids: list[int] = []
    for i in order:
        if len(ids) >= need:
            break
        ids.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        ids.extend(sep)
    n = min(num_samples, len(ids) // seq_len)
    if n == 0:
        raise DataError(f"the data holds {len(ids)} tokens, fewer than one sequence of seq_len={seq_len}")
    if n < num_samples:
        log.warning("data gives only %d sequences of %d tokens (num_samples=%d)", n, seq_len, num_samples)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@functools.lru_cache(maxsize=4)
def _tokenizer_for(directory: str) -> Any:
    from flexc.models import load_tokenizer

    tok = load_tokenizer(Path(directory))
    if tok is None:
        raise DataError(f"the model in {directory} has no tokenizer, so text data cannot be tokenized")
    return tok


def batches(spec: "Spec", role: str = "calibration", tokenizer: Any = None) -> list["torch.Tensor"]:
    """The spec's ``role`` data as a list of ``[batch_size, seq_len]`` token-id tensors."""
    source = getattr(spec.data, role)
    if source is None:
        raise DataError(f"the spec has no data.{role} section")
    if tokenizer is None:
        from flexc.models import resolve_directory

        tokenizer = _tokenizer_for(str(resolve_directory(spec.model)))
    blocks = token_blocks(
        load_texts(source, role), tokenizer, num_samples=source.num_samples, seq_len=source.seq_len, seed=spec.seed
    )
    return list(blocks.split(source.batch_size))
