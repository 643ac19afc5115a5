"""Test helpers for the spec, CLI and driver tests: toy passes and tiny model directories.

The toy passes are registered under ``toy_*`` names only while a test runs (see
``register_toy_passes``), so the broken specs in this folder can name them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from flexc.passes.base import Pass, PassOptions, PassResult


class ToyRankOptions(PassOptions):
    score: Literal["taylor", "activation", "weight_activation"] = "taylor"
    granule: int = Field(16, gt=0)


class ToyRank(Pass):
    """Records a per-layer score tensor in ctx.state; changes nothing in the graph."""

    name = "toy_rank"
    Options = ToyRankOptions
    guarantees = frozenset({"toy_ranked"})
    preserves_computation = True
    calls: list[str] = []

    def run(self, graph, ctx):
        import torch

        ToyRank.calls.append(self.name)
        ctx.state["toy_scores"] = {"layer0": torch.arange(4.0), "note": "ranked", "n": 4}
        (ctx.workdir / "scores.txt").write_text("ok")
        return PassResult(graph=graph, modified=False)


class ToyGate(Pass):
    """Needs toy_rank's property and its state; halves every expert's width."""

    name = "toy_gate"
    requires = frozenset({"toy_ranked"})
    guarantees = frozenset({"toy_gated"})
    calls: list[str] = []
    fail = False

    def run(self, graph, ctx):
        ToyGate.calls.append(self.name)
        if ToyGate.fail:
            raise RuntimeError("toy_gate failed on purpose")
        assert ctx.state["toy_scores"]["note"] == "ranked"
        widths = graph.widths()
        graph.set_widths(widths // 2)
        ctx.state["gated"] = True
        return PassResult(graph=graph)


TOY_PASSES = (ToyRank, ToyGate)


def register_toy_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    from flexc.passes import registry

    registry.available_passes()  # load built-ins first, so ours are added on top
    for cls in TOY_PASSES:
        monkeypatch.setitem(registry._BUILTINS, cls.name, cls)


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n"] * 20
    tok.train_from_iterator(text, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def make_tiny_moe(directory: Path, family: str = "qwen3_moe", **overrides) -> Path:
    """A tiny random MoE checkpoint (with a byte-level BPE tokenizer) in ``directory``; ``overrides``: config
    fields (see :func:`flexc.ir.testing.tiny_config`)."""
    from flexc.ir.testing import tiny_model

    tokenizer = _tokenizer(300)
    model = tiny_model(family, vocab_size=len(tokenizer), **overrides)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_dense(directory: Path) -> Path:
    """A tiny dense (non-MoE) Llama checkpoint."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def rehash(run_dir: Path) -> None:
    """Record the current digests of every file a run's manifest vouches for: what someone who
    edits a run's files and its manifest alike would do (the loaders' own checks must then catch it)."""
    import json

    from flexc.compiler.integrity import sha256

    path = Path(run_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    records = [r for r in manifest.get("stages", []) if isinstance(r, dict)]
    records += [manifest[k] for k in ("state", "state_before") if isinstance(manifest.get(k), dict)]
    for record in records:
        for rel in record.get("files") or {}:
            if (Path(run_dir) / rel).is_file():
                record["files"][rel] = sha256(Path(run_dir) / rel)
    path.write_text(json.dumps(manifest))
