"""Calibration batches from a spec's data source: load, tokenize, pack, batch — streaming.

Documents come through ``datasets`` (a hub dataset from the local cache, local text / jsonl /
parquet files) or from the builtin ``python-stdlib`` corpus. Documents are visited in an order
shuffled by the seed, tokenized one at a time, joined with an end-of-text token and cut into
``seq_len`` windows; the first ``num_samples`` windows form the calibration set. Only one
batch of token ids and one document's tokens are held at a time, so memory does not grow
with ``num_samples``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from flexc.errors import FlexcError


class DataError(FlexcError, ValueError):
    """A data source cannot be read (missing file, unknown dataset, missing text field): exit status 2."""


@dataclass(frozen=True)
class CalibrationSet:
    """A deterministic stream of packed ``[batch, seq_len]`` token batches."""

    source: object  # flexc.compiler.spec.DataSource (duck-typed: builtin/hub/files/...)
    tokenizer: object
    seed: int = 0
    role: str = "calibration"
    device: str = "cpu"  # where the batches are yielded: the model's device

    @property
    def num_samples(self) -> int:
        return int(self.source.num_samples)

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // int(self.source.batch_size))

    def __iter__(self) -> Iterator[torch.Tensor]:
        batches = packed_batches(self.source, self.tokenizer, seed=self.seed, role=self.role)
        if torch.device(self.device).type == "cpu":
            return batches
        return (batch.to(self.device) for batch in batches)

    def __len__(self) -> int:
        return self.num_batches

    def following(self, count: int, strict: bool = True, spans: list[tuple[int, int]] | None = None
                  ) -> list[torch.Tensor]:
        """``count`` windows of held-out text from the same source, in batches of the source's
        ``batch_size``: the first window of each document after the last one the set touched (in the
        same seeded order; documents shorter than a window are passed over), so no held-out window
        shares a document with the set or with another held-out window: the check reads as many
        documents as windows, not the two or three long ones ``count`` windows would pack. A source whose
        documents the set used up (one text file is one document) gives the windows that follow
        the set's own instead: a contiguous span of text the set never shows. A source with fewer
        is an error, or (``strict=False``) gives what it has. ``spans``: :meth:`window_documents`, if
        already computed."""
        n, seq_len, size = self.num_samples, int(self.source.seq_len), int(self.source.batch_size)
        spans = spans if spans is not None else self.window_documents()
        documents = iter_documents(self.source, seed=self.seed, role=self.role)
        used = list(itertools.islice(documents, spans[-1][1] + 1 if n else 0))
        fresh = next(documents, None)
        if fresh is not None:
            firsts = (next(iter_token_windows([text], self.tokenizer, seq_len), None)
                      for text in itertools.chain([fresh], documents))
            rows = list(itertools.islice((w for w in firsts if w is not None), count))
        else:
            rows = list(itertools.islice(iter_token_windows(used, self.tokenizer, seq_len), n, n + count))
        if len(rows) < count and strict:
            raise DataError(f"{_describe(self.source)}: data.{self.role}: the data yields only {len(rows)} "
                            f"sequences of {seq_len} tokens past the {n} of the calibration set; {count} held out "
                            f"were requested (lower the held-out count or num_samples, or add text)")
        batches = [torch.stack(rows[i:i + size]) for i in range(0, len(rows), size)]
        return batches if torch.device(self.device).type == "cpu" else [b.to(self.device) for b in batches]

    def window_documents(self) -> list[tuple[int, int]]:
        """For each of the set's windows, the indices (in the seeded document order) of the documents of
        its first and last token: which windows share a document."""
        seq_len = int(self.source.seq_len)
        texts = iter_documents(self.source, seed=self.seed, role=self.role)
        spans = itertools.islice(document_spans(texts, self.tokenizer, seq_len), self.num_samples)
        return list(spans)


class LoadedCalibration(list):
    """A calibration set read into memory once (its batches), still able to read held-out text
    (:meth:`CalibrationSet.following`) and say which windows share a document."""

    def __init__(self, calibration: CalibrationSet):
        super().__init__(calibration)
        self._calibration = calibration
        self._spans: list[tuple[int, int]] | None = None

    def window_documents(self) -> list[tuple[int, int]]:
        """:meth:`CalibrationSet.window_documents`, computed once."""
        if self._spans is None:
            self._spans = self._calibration.window_documents()
        return self._spans

    def following(self, count: int, strict: bool = True) -> list[torch.Tensor]:
        """:meth:`CalibrationSet.following`, on the spans computed once."""
        return self._calibration.following(count, strict, spans=self.window_documents())


def _split(source, role: str) -> str | None:
    resolve = getattr(source, "resolved_split", None)
    return resolve(role) if resolve is not None else getattr(source, "split", None)


def iter_documents(source, *, seed: int = 0, role: str = "calibration") -> Iterator[str]:
    """Document texts of ``source`` in a seed-shuffled order (streaming where the source allows)."""
    if getattr(source, "builtin", None):
        from flexc.data.builtin import builtin_documents

        docs = builtin_documents(source.builtin, _split(source, role) or "train")
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        for i in order:
            yield docs[i].text
        return
    dataset = _load_dataset(source, role)
    field = source.text_field
    dataset = dataset.shuffle(seed=seed, buffer_size=1000) if hasattr(dataset, "shuffle") else dataset
    where = _describe(source)
    for row in _rows(dataset, where, role):
        if field not in row:
            raise DataError(f"{where}: data.{role}.text_field: no field {field!r} in a record; fields: {sorted(row)}")
        text = row[field]
        if text and not isinstance(text, str):
            raise DataError(f"{where}: data.{role}.text_field: field {field!r} holds {type(text).__name__}, not text")
        if text:
            yield text


def _rows(dataset, where: str, role: str) -> Iterator[dict]:
    """The dataset's rows; a file that breaks mid-way (bad JSON on line 10,000) is a DataError naming it."""
    rows = iter(dataset)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - datasets/pyarrow raise many kinds for a malformed file
            raise DataError(f"{where}: data.{role}: cannot read a record: {type(exc).__name__}: {exc}") from None
        yield row


def _describe(source) -> str:
    files = getattr(source, "files", None)
    if files:
        return ", ".join(map(str, files[:3])) + (" ..." if len(files) > 3 else "")
    return f"dataset {getattr(source, 'hub', None) or getattr(source, 'builtin', '?')!r}"


def _load_dataset(source, role: str):
    import datasets

    if getattr(source, "files", None):
        files = [str(Path(f)) for f in source.files]
        for f in files:
            if not Path(f).is_file():
                raise DataError(f"data file not found: {f}")
        suffix = Path(files[0]).suffix.lower()
        builder = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
        if builder is None:
            raise DataError(f"unsupported data file type {suffix!r} ({files[0]})")
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    try:
        return datasets.load_dataset(source.hub, source.config, split=_split(source, role), streaming=True)
    except Exception as exc:  # datasets raises many types for a missing offline dataset
        raise DataError(f"cannot load dataset {source.hub!r} (config {source.config!r}) offline: {exc}") from None


def _packed(texts: Iterable[str], tokenizer, seq_len: int) -> Iterator[tuple[list[int], int, int]]:
    """Document token streams joined by EOS and cut into consecutive ``seq_len`` windows: each window's
    token ids and the indices of the documents of its first and last token (a document's EOS is its)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("tokenizer has no eos_token_id to separate documents")
    buffer: list[int] = []
    owners: list[int] = []  # the document index of every buffered token
    for index, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        buffer.extend(ids)
        buffer.append(eos)
        owners.extend([index] * (len(ids) + 1))
        while len(buffer) >= seq_len:
            yield buffer[:seq_len], owners[0], owners[seq_len - 1]
            del buffer[:seq_len], owners[:seq_len]


def iter_token_windows(texts: Iterable[str], tokenizer, seq_len: int) -> Iterator[torch.Tensor]:
    """Pack document token streams (joined by EOS) into consecutive ``seq_len`` windows."""
    for ids, _, _ in _packed(texts, tokenizer, seq_len):
        yield torch.tensor(ids, dtype=torch.long)


def document_spans(texts: Iterable[str], tokenizer, seq_len: int) -> Iterator[tuple[int, int]]:
    """For each window :func:`iter_token_windows` cuts from ``texts``, the indices of the documents of
    its first and last token."""
    for _, first, last in _packed(texts, tokenizer, seq_len):
        yield first, last


def packed_batches(source, tokenizer, *, seed: int = 0, role: str = "calibration") -> Iterator[torch.Tensor]:
    """``num_samples`` windows of ``seq_len`` tokens, in batches of ``batch_size``."""
    n, seq_len, batch = int(source.num_samples), int(source.seq_len), int(source.batch_size)
    rows: list[torch.Tensor] = []
    produced = 0
    for window in iter_token_windows(iter_documents(source, seed=seed, role=role), tokenizer, seq_len):
        rows.append(window)
        produced += 1
        if len(rows) == batch or produced == n:
            yield torch.stack(rows)
            rows = []
        if produced == n:
            return
    if produced < n:
        raise DataError(f"{_describe(source)}: data.{role}.num_samples: the data yields only {produced} sequences "
                        f"of {seq_len} tokens; {n} requested (lower num_samples or seq_len, or add text)")
