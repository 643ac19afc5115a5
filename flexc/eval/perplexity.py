"""Held-out perplexity of any flexc model: a Hugging Face model, a lowered graph, a budget of either.

The protocol is the zoo's (:mod:`flexc.zoo.evaluate`), reused here, not re-implemented:
documents are encoded one after another, each followed by one end-of-text token, the stream is
cut into non-overlapping ``seq_len`` windows, and every token of a window but its first is
scored. ``tokens`` in the result is the exact number of scored targets,
``n - ceil(n / seq_len)`` for a stream of ``n`` tokens.

What is evaluated comes from the spec's ``data.evaluation`` source, truncated to
``num_samples * seq_len`` tokens. Documents must not leak across the split:
:func:`check_no_leak` refuses an evaluation source that reads the same documents as the
calibration source (same corpus and split, or a shared file). The builtin corpus splits
whole files by a hash of their path, so no document is in both of its splits.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from flexc.data.calibration import DataError
from flexc.zoo.evaluate import EvalResult, encode_documents, num_targets, perplexity

__all__ = ["EvalResult", "GraphLM", "check_no_leak", "evaluate", "evaluation_stream", "num_targets"]


class GraphLM(nn.Module):
    """A lowered FlexGraph seen as a causal LM: ``lm(input_ids=x).logits``.

    The exported graph module cannot switch train/eval mode and needs ``use_cache``; this
    wrapper supplies both so the zoo's perplexity loop runs on graphs unchanged.
    """

    def __init__(self, graph):
        super().__init__()
        object.__setattr__(self, "graph", graph)  # not a submodule: its mode must not be toggled

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self.graph.model.parameters(recurse)

    def train(self, mode: bool = True) -> "GraphLM":
        self.training = mode  # the exported graph is always in inference form
        return self

    def forward(self, input_ids: torch.Tensor):
        return self.graph.module(input_ids=input_ids, use_cache=False)


def _identity(source) -> tuple:
    if getattr(source, "builtin", None):
        return ("builtin", source.builtin)
    if getattr(source, "hub", None):
        return ("hub", source.hub, getattr(source, "config", None))
    return ("files",)


def _split(source, role: str):
    resolve = getattr(source, "resolved_split", None)
    return resolve(role) if resolve is not None else getattr(source, "split", None)


def check_no_leak(calibration, evaluation) -> None:
    """Raise :class:`DataError` if ``evaluation`` reads documents that ``calibration`` also reads."""
    if calibration is None or evaluation is None:
        return
    if getattr(calibration, "files", None) and getattr(evaluation, "files", None):
        shared = {Path(f).resolve() for f in calibration.files} & {Path(f).resolve() for f in evaluation.files}
        if shared:
            raise DataError(f"evaluation data shares files with the calibration data: "
                            f"{', '.join(sorted(map(str, shared)))}; evaluate on held-out files")
        return
    if _identity(calibration) == _identity(evaluation) and _identity(evaluation)[0] != "files":
        split = _split(evaluation, "evaluation")
        if split == _split(calibration, "calibration"):
            raise DataError(f"evaluation data reads the same split ({split!r}) of the same dataset as the "
                            "calibration data; use a held-out split (for python-stdlib: 'heldout')")


def evaluation_stream(source, tokenizer, *, limit_tokens: int | None = None) -> torch.Tensor:
    """The evaluation token stream: whole documents in order, cut at ``num_samples * seq_len`` tokens.

    Documents are read in the source's own order (no shuffle), so a run always scores the
    same tokens. Fewer tokens are returned when the split is shorter than the limit.
    """
    limit = limit_tokens if limit_tokens is not None else int(source.num_samples) * int(source.seq_len)
    pieces, total = [], 0
    for text in _documents_in_order(source):
        ids = encode_documents(tokenizer, [text])
        pieces.append(ids)
        total += ids.numel()
        if total >= limit:
            break
    if not pieces:
        raise DataError("the evaluation data yielded no documents")
    return torch.cat(pieces)[:limit]


def _documents_in_order(source) -> Iterator[str]:
    if getattr(source, "builtin", None):
        from flexc.data.corpus import stdlib_documents

        for doc in stdlib_documents(_split(source, "evaluation") or "heldout"):
            yield doc.text
        return
    # hub / files: the same reader as calibration, but in dataset order (calibration shuffles)
    from flexc.data.calibration import _load_dataset

    field = source.text_field
    for row in _load_dataset(source, "evaluation"):
        if field not in row:
            raise DataError(f"evaluation data has no text field {field!r}; fields: {sorted(row)}")
        if row[field]:
            yield row[field]


def evaluate(model, tokenizer, source, *, batch_size: int | None = None, limit_tokens: int | None = None,
             stream: torch.Tensor | None = None, progress: bool = False) -> EvalResult:
    """Held-out perplexity of ``model`` (a causal LM or a FlexGraph) on ``source`` (a spec DataSource)."""
    if hasattr(model, "groups") and hasattr(model, "module"):  # a FlexGraph
        model = GraphLM(model)
    if stream is None:
        stream = evaluation_stream(source, tokenizer, limit_tokens=limit_tokens)
    return perplexity(model, stream, seq_len=int(source.seq_len),
                      batch_size=int(batch_size or getattr(source, "batch_size", 8)), progress=progress)
