"""Held-out perplexity, and the unigram baseline it is compared against.

Protocol (the same for the model and the unigram baseline, so the two are comparable):

1. Every document is tokenized without special tokens and followed by one end-of-text token;
   the documents are concatenated in corpus order into one token stream.
2. The stream is cut into consecutive, non-overlapping windows of ``seq_len`` tokens (the last
   window may be shorter). Each window is scored independently: every token of a window
   except its first is a *target*, predicted from the tokens before it in the same window.
3. Loss = mean negative log-likelihood (natural log) over all targets; perplexity = exp(loss).
   ``tokens`` is the exact number of targets: ``n - ceil(n / seq_len)`` for ``n`` tokens.

The unigram baseline predicts every target with add-one smoothed token frequencies counted on
the train split's stream (same tokenizer): ``p(t) = (count(t) + 1) / (N + V)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "EvalResult",
    "encode_documents",
    "evaluate_heldout",
    "num_targets",
    "perplexity",
    "target_mask",
    "unigram_perplexity",
    "windows",
]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Mean next-token loss (nats), its perplexity, and the exact number of scored tokens."""

    loss: float
    perplexity: float
    tokens: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def encode_documents(tokenizer, texts: Iterable[str], *, eos_token_id: int | None = None) -> torch.Tensor:
    """Tokenize ``texts`` and concatenate them, each followed by one end-of-text token.

    Args:
        tokenizer: a Hugging Face tokenizer (fast tokenizers encode in parallel).
        texts: document texts, in the order they should appear in the stream.
        eos_token_id: separator id; defaults to ``tokenizer.eos_token_id``.

    Returns:
        A 1-D ``torch.long`` tensor.
    """
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; pass eos_token_id explicitly")
    texts = list(texts)
    if not texts:
        return torch.empty(0, dtype=torch.long)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    total = sum(len(x) + 1 for x in ids)
    out = torch.empty(total, dtype=torch.long)
    pos = 0
    for seq in ids:
        n = len(seq)
        out[pos : pos + n] = torch.as_tensor(seq, dtype=torch.long)
        out[pos + n] = eos
        pos += n + 1
    return out


def windows(stream: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of ``seq_len`` tokens (views; the last may be shorter).

    A trailing window of a single token has no target and is dropped.
    """
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2")
    stream = stream.reshape(-1)
    return [w for w in stream.split(seq_len) if w.numel() >= 2]


def num_targets(n_tokens: int, seq_len: int) -> int:
    """Number of scored tokens for a stream of ``n_tokens`` cut into ``seq_len`` windows."""
    return n_tokens - math.ceil(n_tokens / seq_len) if n_tokens else 0


def target_mask(n_tokens: int, seq_len: int) -> torch.Tensor:
    """Boolean mask over stream positions: True where the token is a scored target."""
    mask = torch.ones(n_tokens, dtype=torch.bool)
    mask[::seq_len] = False
    return mask


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    stream: torch.Tensor,
    *,
    seq_len: int,
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool = False,
    description: str = "evaluating",
) -> EvalResult:
    """Perplexity of a causal LM on a token stream (see the module docstring for the protocol).

    Args:
        model: a causal LM returning ``.logits`` (put in eval mode for the call, then restored).
        stream: 1-D token ids.
        seq_len: window length.
        batch_size: windows per forward pass.
        max_tokens: score only the first ``max_tokens`` tokens of the stream (None: all).
        progress: show a rich progress bar.
    """
    stream = stream.reshape(-1)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    wins = windows(stream, seq_len)
    if not wins:
        raise ValueError("stream too short to score any token")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll = 0.0  # python float: exact enough and independent of batch composition order
    total = 0
    # Full windows share a shape and are batched; a shorter last window runs alone.
    batches: list[list[torch.Tensor]] = []
    for w in wins:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].numel() == w.numel():
            batches[-1].append(w)
        else:
            batches.append([w])
    bar = _progress(progress)
    try:
        task = bar.add_task(description, total=len(batches)) if bar else None
        for group in batches:
            x = torch.stack(group).to(device)
            logits = model(input_ids=x).logits
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total += x.shape[0] * (x.shape[1] - 1)
            if bar:
                bar.update(task, advance=1)
    finally:
        if bar:
            bar.stop()
        model.train(was_training)
    assert total == num_targets(stream.numel(), seq_len)
    loss = total_nll / total
    return EvalResult(loss=loss, perplexity=math.exp(loss), tokens=total)


def unigram_perplexity(
    train_stream: torch.Tensor, eval_stream: torch.Tensor, *, vocab_size: int, seq_len: int
) -> EvalResult:
    """Add-one smoothed unigram perplexity on the same targets :func:`perplexity` scores."""
    counts = torch.bincount(train_stream.reshape(-1), minlength=vocab_size).double()
    if counts.numel() != vocab_size:
        raise ValueError(f"token id >= vocab_size={vocab_size} in train stream")
    logp = torch.log(counts + 1.0) - math.log(float(counts.sum()) + vocab_size)
    eval_stream = eval_stream.reshape(-1)
    targets = eval_stream[target_mask(eval_stream.numel(), seq_len)]
    if targets.numel() == 0:
        raise ValueError("stream too short to score any token")
    loss = float(-logp[targets].mean())
    return EvalResult(loss=loss, perplexity=math.exp(loss), tokens=int(targets.numel()))


def evaluate_heldout(
    model: torch.nn.Module,
    tokenizer,
    *,
    seq_len: int = 128,
    batch_size: int = 16,
    max_tokens: int | None = None,
    documents: Sequence | None = None,
    progress: bool = False,
) -> EvalResult:
    """Perplexity of ``model`` on the ``python-stdlib`` held-out split (the zoo's protocol).

    ``documents`` (objects with a ``text`` attribute) replaces the held-out split if given.
    Use the zoo model's ``seq_len`` (in its manifest) to reproduce the manifest's number.
    """
    if documents is None:
        from flexc.data.corpus import stdlib_documents

        documents = stdlib_documents("heldout")
    stream = encode_documents(tokenizer, (d.text for d in documents))
    return perplexity(
        model, stream, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens, progress=progress
    )


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    )
    bar.start()
    return bar
