"""Train one zoo model: tokenizer, MoE weights (Qwen3-MoE or Mixtral), evaluation, manifest.

:func:`train_checkpoint` writes a complete checkpoint directory that loads offline with
``AutoTokenizer.from_pretrained(dir)`` and ``AutoModelForCausalLM.from_pretrained(dir)``.
It does not deal with the cache; :func:`flexc.zoo.build` wraps it with locking and an atomic
install.

Reproducibility: for a given recipe, seed, corpus and software stack, the weights are bit
identical from run to run on CPU. The run seeds torch's generator before initialising the
model, draws the data order from its own seeded generator, uses a fixed number of intra-op
threads (``Recipe.threads``, or ``$FLEXC_ZOO_THREADS``) and deterministic algorithms, and
restores the process' previous settings afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import time
import types
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flexc.ir.routing import route_by_expert
from flexc.utils.progress import console
from flexc.utils.training import TrainingRun
from flexc.zoo.cache import MANIFEST
from flexc.zoo.evaluate import encode_documents, perplexity, unigram_perplexity
from flexc.zoo.recipes import Recipe

__all__ = [
    "EOS_TOKEN",
    "MANIFEST_FORMAT",
    "PAD_TOKEN",
    "train_checkpoint",
    "train_tokenizer",
    "weights_sha256",
]

#: Version of the manifest layout; bump when its meaning changes (cached models are rebuilt).
MANIFEST_FORMAT = 1

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    Special tokens: ``<|endoftext|>`` (id 0; bos, eos and document separator) and ``<|pad|>``
    (id 1). No token is added automatically when encoding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=None,
        clean_up_tokenization_spaces=False,
    )


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over every state-dict tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _training_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Same computation as the Hugging Face eager experts forward, faster to train on CPU.

    The eager forward indexes ``gate_up_proj[e]`` once per expert, and each index
    materialises a zero gradient the size of all experts in backward; sorting the
    (token, slot) pairs by expert and unbinding the stacked weights once avoids that.
    Outputs are summed over the top-k slots in a fixed order (deterministic).
    """
    num_tokens, top_k = top_k_index.shape
    routing = route_by_expert(top_k_index, self.num_experts)
    order = routing.order
    x = hidden_states.index_select(0, routing.token)
    gate_up = self.gate_up_proj.unbind(0)
    down = self.down_proj.unbind(0)
    outs = []
    for e, chunk in enumerate(x.split(routing.counts)):
        if chunk.shape[0] == 0:
            continue
        gate, up = F.linear(chunk, gate_up[e]).chunk(2, dim=-1)
        outs.append(F.linear(self.act_fn(gate) * up, down[e]))
    y = torch.cat(outs) * top_k_weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(hidden_states.dtype)
    y = torch.zeros_like(y).index_copy(0, order, y)
    return y.view(num_tokens, top_k, -1).sum(dim=1)


@contextlib.contextmanager
def _training_experts(model: torch.nn.Module) -> Iterator[None]:
    """Use :func:`_training_experts_forward` in every experts module while the block runs."""
    patched = []
    for module in model.modules():
        if hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and hasattr(module, "num_experts"):
            if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
                continue
            module.forward = types.MethodType(_training_experts_forward, module)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' own save/load progress bars (the zoo reports its own progress)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _reproducible(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic algorithms, restored on exit."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def _threads(recipe: Recipe) -> int:
    env = os.environ.get("FLEXC_ZOO_THREADS")
    return int(env) if env else recipe.threads


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    try:
        from importlib.metadata import version

        flexc_version = version("flexc")
    except Exception:  # not installed (running from a checkout)
        flexc_version = "unknown"
    return {
        "flexc": flexc_version,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


class _Reporter:
    """Rich console messages, or nothing (the training bar is :meth:`flexc.utils.training.TrainingRun.progress`)."""

    def __init__(self, enabled: bool, title: str):
        self.enabled = enabled
        self.title = title

    def say(self, message: str) -> None:
        if self.enabled:
            console().print(f"[bold]{self.title}[/bold] {message}")


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _model_stats(model: torch.nn.Module, recipe: Recipe) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    routed = sum(
        p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n
    )
    per_expert = routed // (recipe.num_layers * recipe.num_experts)
    return {
        "parameters": total,
        "routed_expert_parameters": routed,
        "active_parameters_per_token": total - routed + recipe.num_layers * recipe.top_k * per_expert,
    }


def train_checkpoint(
    recipe: Recipe,
    out_dir: str | os.PathLike,
    *,
    seed: int | None = None,
    steps: int | None = None,
    progress: bool = True,
    train_documents: Sequence | None = None,
    heldout_documents: Sequence | None = None,
    corpus_identity: dict | None = None,
    extra_manifest: dict | None = None,
) -> dict[str, Any]:
    """Train ``recipe`` into ``out_dir`` (which must exist) and return the manifest written there.

    Args:
        recipe: what to build.
        out_dir: destination; receives the model, the tokenizer and ``manifest.json`` (last).
        seed: overrides ``recipe.seed``.
        steps: overrides ``recipe.steps`` (the learning-rate schedule is stretched to fit).
        progress: rich progress output on stderr.
        train_documents / heldout_documents: documents (``.name``, ``.text``) to use instead of
            the splits of the recipe's builtin corpus (both or neither; tests use small subsets).
        corpus_identity: how the manifest describes the corpus (default: the builtin corpus' identity,
            or the document names' hash for custom documents).
        extra_manifest: extra top-level manifest entries.
    """
    out = Path(out_dir)
    seed = recipe.seed if seed is None else int(seed)
    steps = recipe.steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError("steps must be >= 1")
    threads = _threads(recipe)
    report = _Reporter(progress, f"zoo/{recipe.name}")
    started = time.perf_counter()
    train_documents, heldout_documents, corpus_identity = _documents(recipe.corpus, train_documents,
                                                                    heldout_documents, corpus_identity)

    with _reproducible(threads), _quiet_transformers():
        # 1. Tokenizer.
        t0 = time.perf_counter()
        tokenizer, train_stream, heldout_stream = _tokenize(recipe, train_documents, heldout_documents, out, report)
        vocab_size = len(tokenizer)
        tokenizer_seconds = time.perf_counter() - t0

        # 2. Model.
        model, architecture, stats = _initial_model(recipe, tokenizer, seed, report)

        # 3. Train: windows of seq_len tokens, a fresh seeded permutation per epoch.
        seq_len, batch = recipe.seq_len, recipe.batch_size
        t0 = time.perf_counter()
        losses, aux_losses, n_windows = _pretrain(model, recipe, train_stream, seed=seed, steps=steps,
                                                  progress=progress, title=f"{report.title} training")
        train_seconds = time.perf_counter() - t0
        tail = max(1, steps // 20)
        report.say(f"trained {steps} steps in {train_seconds:.0f}s; train loss {sum(losses[-tail:]) / tail:.3f}")

        # 4. Save, then evaluate the saved checkpoint as a user would load it.
        model.save_pretrained(out)
        digest = weights_sha256(model)
        del model
        report.say("evaluating held-out perplexity")
        t0 = time.perf_counter()
        heldout, unigram = _evaluate_saved(out, digest, recipe, train_stream, heldout_stream, vocab_size, progress)
        eval_seconds = time.perf_counter() - t0

    manifest = _manifest(recipe, seed, steps, architecture, corpus_identity, stats, digest, {
        "vocab_size": vocab_size, "train_tokens": int(train_stream.numel()),
        "heldout_tokens": int(heldout_stream.numel())}, {
        "seconds": round(train_seconds, 2), "tokenizer_seconds": round(tokenizer_seconds, 2),
        "eval_seconds": round(eval_seconds, 2), "total_seconds": round(time.perf_counter() - started, 2),
        "threads": threads, "tokens_seen": steps * batch * seq_len, "epochs": round(steps * batch / n_windows, 4)},
        losses, aux_losses, heldout, unigram)
    if extra_manifest:
        manifest.update(extra_manifest)
    report.say(
        f"held-out perplexity {heldout.perplexity:.2f} over {heldout.tokens:,} tokens "
        f"(unigram {unigram.perplexity:.1f}); total {manifest['training']['total_seconds']:.0f}s"
    )
    _write_manifest(out, manifest)
    return manifest


def _pretrain(model, recipe: Recipe, train_stream: torch.Tensor, *, seed: int, steps: int, progress: bool,
              title: str) -> tuple[list[float], list[float], int]:
    """Train ``model`` for ``steps`` steps on ``recipe.seq_len``-token windows of ``train_stream``, a fresh
    seeded permutation of them per epoch, through the one training loop (:class:`TrainingRun`, no
    checkpoints: a zoo model is built in one go). Returns the language-model and router losses per
    step, and the number of windows."""
    seq_len, batch = recipe.seq_len, recipe.batch_size
    n_windows = train_stream.numel() // seq_len
    if n_windows < batch:
        raise ValueError(f"train split too small: {n_windows} windows of {seq_len} tokens < batch {batch}")
    data = train_stream[: n_windows * seq_len].view(n_windows, seq_len)
    data_gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_windows, generator=data_gen)
    cursor = 0
    optimizer = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr,
                                  betas=tuple(recipe.adam_betas), eps=1e-8, foreach=False)
    losses: list[float] = []
    aux_losses: list[float] = []
    model.train()

    def train_step(step: int) -> dict:
        nonlocal order, cursor
        if cursor + batch > n_windows:
            order = torch.randperm(n_windows, generator=data_gen)
            cursor = 0
        x = data[order[cursor : cursor + batch]]
        cursor += batch
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_at(step, steps)
        outputs = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False)
        outputs.loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip, foreach=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        aux = float(outputs.aux_loss.detach()) if outputs.aux_loss is not None else 0.0
        lm = float(outputs.loss.detach()) - recipe.router_aux_loss_coef * aux
        if not math.isfinite(lm):
            raise FloatingPointError(f"training diverged at step {step}: loss {lm}")
        losses.append(lm)
        aux_losses.append(aux)
        return {"loss": lm}

    run = TrainingRun(title, None, quiet=not progress)
    with run.progress(0, steps) as bar, _training_experts(model):
        run.steps(train_step, 0, steps, bar=bar)
    return losses, aux_losses, n_windows


def _documents(corpus: str, train, heldout, identity):
    """The training and held-out documents (the splits of the recipe's builtin ``corpus`` unless both are
    given) and how the manifest names the corpus."""
    if train is None and heldout is None:
        from flexc.data.builtin import builtin_documents, builtin_identity

        train, heldout = builtin_documents(corpus, "train"), builtin_documents(corpus, "heldout")
        identity = builtin_identity(corpus) if identity is None else identity
    elif train is None or heldout is None:
        raise ValueError("pass both train_documents and heldout_documents, or neither")
    if identity is None:
        names = [d.name for d in train] + ["\0"] + [d.name for d in heldout]
        identity = {
            "name": "custom",
            "train_files": len(train),
            "heldout_files": len(heldout),
            "list_sha256": hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest(),
        }
    return train, heldout, identity


def _manifest(recipe: Recipe, seed: int, steps: int, architecture: str, corpus: dict, stats: dict, digest: str,
              tokens: dict, timing: dict, losses: list[float], aux_losses: list[float], heldout, unigram) -> dict:
    """The zoo model's ``manifest.json``: what was built, from what, how long it took and how well it does."""
    seq_len = recipe.seq_len
    every = max(1, steps // 100)
    tail = max(1, steps // 20)
    return {
        "format": MANIFEST_FORMAT,
        "name": recipe.name,
        "description": recipe.description,
        "architecture": architecture,
        "recipe": recipe.to_dict(),
        "seed": seed,
        "steps": steps,
        "default_build": seed == recipe.seed and steps == recipe.steps,
        "corpus": corpus,
        "tokenizer": {"type": "byte-level BPE", "vocab_size": tokens["vocab_size"], "eos_token": EOS_TOKEN,
                      "pad_token": PAD_TOKEN, "train_tokens": tokens["train_tokens"],
                      "heldout_tokens": tokens["heldout_tokens"]},
        "model": stats,
        "training": {
            **timing,
            "train_loss": sum(losses[-tail:]) / tail,
            "train_loss_window": tail,
            "router_aux_loss": sum(aux_losses[-tail:]) / tail,
            "loss_curve": [[i, losses[i]] for i in range(0, steps, every)] + [[steps - 1, losses[-1]]],
        },
        "heldout": {
            "protocol": f"{recipe.corpus} heldout split, non-overlapping windows of {seq_len} tokens",
            "seq_len": seq_len,
            "tokens": heldout.tokens,
            "loss": heldout.loss,
            "perplexity": heldout.perplexity,
            "unigram_loss": unigram.loss,
            "unigram_perplexity": unigram.perplexity,
            "perplexity_ratio_to_unigram": heldout.perplexity / unigram.perplexity,
        },
        "weights_sha256": digest,
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _tokenize(recipe: Recipe, train_documents, heldout_documents, out: Path, report) -> tuple:
    """A byte-level BPE trained on the training documents and saved into ``out``, and both splits
    encoded with it."""
    report.say(f"training a {recipe.vocab_size}-token byte-level BPE on {len(train_documents)} files")
    t0 = time.perf_counter()
    tokenizer = train_tokenizer([d.text for d in train_documents], recipe.vocab_size)
    tokenizer.save_pretrained(out)
    train_stream = encode_documents(tokenizer, (d.text for d in train_documents))
    heldout_stream = encode_documents(tokenizer, (d.text for d in heldout_documents))
    report.say(f"tokenizer: {len(tokenizer)} tokens; train {train_stream.numel():,} tokens, held-out "
               f"{heldout_stream.numel():,} tokens ({time.perf_counter() - t0:.1f}s)")
    return tokenizer, train_stream, heldout_stream


def _evaluate_saved(out: Path, digest: str, recipe: Recipe, train_stream, heldout_stream, vocab_size: int,
                    progress: bool) -> tuple:
    """Held-out and unigram perplexity of the checkpoint in ``out``, loaded as a user would (it must
    reload to the trained weights, ``digest``)."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager")
    if weights_sha256(loaded) != digest:
        raise RuntimeError("saved checkpoint does not reload to the trained weights")
    heldout = perplexity(loaded, heldout_stream, seq_len=recipe.seq_len, batch_size=recipe.eval_batch_size,
                         progress=progress)
    unigram = unigram_perplexity(train_stream, heldout_stream, vocab_size=vocab_size, seq_len=recipe.seq_len)
    return heldout, unigram


def _initial_model(recipe: Recipe, tokenizer, seed: int, report) -> tuple:
    """The recipe's untrained model (float32, initialised from ``seed``), its class name and its sizes."""
    from transformers import AutoModelForCausalLM

    config = recipe.model_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    architecture = type(model).__name__
    model.to(torch.float32)
    stats = _model_stats(model, recipe)
    report.say(f"{architecture}: {stats['parameters']:,} parameters, {stats['routed_expert_parameters']:,} in routed "
               f"experts, {stats['active_parameters_per_token']:,} active per token")
    return model, architecture, stats


def _write_manifest(out: Path, manifest: dict) -> None:
    """The manifest goes last: its presence marks the directory complete."""
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, out / MANIFEST)
