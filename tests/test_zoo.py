"""The builtin corpus and the offline reference model zoo."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch

import flexc.zoo
from flexc.data.corpus import (
    HELDOUT_FRACTION,
    Document,
    split_of,
    stdlib_documents,
    stdlib_identity,
)
from flexc.zoo import UnknownZooModel, entry_path
from flexc.zoo.evaluate import num_targets, perplexity, target_mask, unigram_perplexity, windows
from flexc.zoo.recipes import GRANULE, RECIPES, Recipe
from flexc.zoo.train import _training_experts, train_checkpoint, weights_sha256

# --------------------------------------------------------------------------------------------
# Corpus


def test_corpus_split_is_deterministic_and_disjoint():
    train, heldout = stdlib_documents("train"), stdlib_documents("heldout")
    assert train == stdlib_documents("train") and heldout == stdlib_documents("heldout")
    train_names, heldout_names = [d.name for d in train], [d.name for d in heldout]
    assert train_names == sorted(train_names) and heldout_names == sorted(heldout_names)
    assert not set(train_names) & set(heldout_names)
    assert len(set(train_names)) == len(train_names)
    assert all(split_of(n) == "train" for n in train_names)
    assert all(split_of(n) == "heldout" for n in heldout_names)
    identity = stdlib_identity()
    assert identity["files"] == len(train) + len(heldout)
    assert identity["heldout_files"] == len(heldout)
    assert identity == stdlib_identity()
    # A real corpus of real size, split roughly as documented.
    assert len(train) > 200 and sum(len(d.text) for d in train) > 2_000_000
    assert 0.5 * HELDOUT_FRACTION < len(heldout) / identity["files"] < 2 * HELDOUT_FRACTION
    # Excluded parts of the standard library stay out.
    for name in train_names + heldout_names:
        parts = name.split("/")
        assert not {"test", "tests", "site-packages", "idlelib", "lib2to3"} & set(parts[:-1]), name
        assert name.endswith(".py") and not parts[-1].startswith("_sysconfigdata")


def test_corpus_split_depends_only_on_the_path(tmp_path):
    files = {
        "a.py": "x = 1\n",
        "pkg/__init__.py": "from .b import y\n",
        "pkg/b.py": "y = 2\n",
        "pkg/test/test_b.py": "assert True\n",  # excluded directory
        "site-packages/third.py": "z = 3\n",  # excluded directory
        "_sysconfigdata__linux.py": "build = {}\n",  # excluded file
        "empty.py": "",  # empty files are skipped
        "notes.txt": "not python\n",
    }
    files.update({f"mod{i:03d}.py": f"value = {i}\n" for i in range(200)})
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    train = stdlib_documents("train", root=tmp_path)
    heldout = stdlib_documents("heldout", root=tmp_path)
    names = sorted(d.name for d in train + heldout)
    expected = sorted(["a.py", "pkg/__init__.py", "pkg/b.py"] + [f"mod{i:03d}.py" for i in range(200)])
    assert names == expected
    assert heldout and train  # 203 files: some land in each split
    assert all(split_of(d.name) == "heldout" for d in heldout)
    assert Document("pkg/b.py", "y = 2\n") in train + heldout
    # The same relative path lands in the same split wherever the tree lives.
    assert {d.name for d in heldout} == {d.name for d in stdlib_documents("heldout", root=tmp_path)}
    with pytest.raises(ValueError, match="split"):
        stdlib_documents("validation")


# --------------------------------------------------------------------------------------------
# Evaluation helpers


def test_prose_corpus_is_english_text_split_by_document():
    """``python-docs``: the help topics and the standard library's docstrings, no source code; the split is
    by whole document, as for ``python-stdlib``."""
    from flexc.data.builtin import builtin_documents, builtin_identity

    train, heldout = builtin_documents("python-docs", "train"), builtin_documents("python-docs", "heldout")
    names = [d.name for d in train + heldout]
    assert len(set(names)) == len(names) and all(n.startswith(("topics/", "docstrings/")) for n in names)
    assert any(n.startswith("topics/") for n in names) and any(n.startswith("docstrings/") for n in names)
    assert all(split_of(d.name) == "train" for d in train) and all(split_of(d.name) == "heldout" for d in heldout)
    assert sum(len(d.text) for d in train) > 1_000_000 and sum(len(d.text) for d in heldout) > 50_000
    lines = [line.strip() for d in train for line in d.text.splitlines() if line.strip()]
    code = sum(line.startswith(("def ", "class ", "import ", "from ", "return ", "self.")) for line in lines)
    assert code < 0.02 * len(lines)  # prose, not source: python-stdlib has these on a fifth of its lines
    assert sum(line.count(" the ") for line in lines) > 0.2 * len(lines)
    identity = builtin_identity("python-docs")
    assert identity["name"] == "python-docs" and identity["files"] == len(names)
    assert identity == builtin_identity("python-docs")
    with pytest.raises(ValueError, match="unknown builtin corpus 'nope'"):
        builtin_documents("nope", "train")


def test_unigram_and_model_score_the_same_targets():
    stream = torch.arange(300) % 7
    seq_len = 128
    assert [w.numel() for w in windows(stream, seq_len)] == [128, 128, 44]
    assert num_targets(300, seq_len) == 297 == int(target_mask(300, seq_len).sum())
    assert num_targets(257, seq_len) == 254  # a trailing one-token window scores nothing
    uni = unigram_perplexity(stream, stream, vocab_size=7, seq_len=seq_len)
    assert uni.tokens == 297 and abs(uni.perplexity - 7.0) < 0.05

    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, 7) + self.w
            return type("Out", (), {"logits": logits})()

    res = perplexity(Uniform(), stream, seq_len=seq_len, batch_size=2)
    assert res.tokens == 297 and math.isclose(res.perplexity, 7.0, rel_tol=1e-6)


# --------------------------------------------------------------------------------------------
# Recipes and training


def test_recipes_meet_the_brief():
    tiny, small = RECIPES["tiny"], RECIPES["small"]
    for r in (tiny, small):
        assert r.moe_intermediate_size % GRANULE == 0 and r.granules >= 8
        cfg = r.model_config()
        assert cfg.decoder_sparse_step == 1 and cfg.mlp_only_layers == [] and cfg.norm_topk_prob
    assert small.num_experts >= 8 and small.top_k >= 2 and small.num_layers >= 4
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny.replace(moe_intermediate_size=100)


def test_prose_recipes_are_other_families_on_other_text():
    """The models kept out of tuning: a Qwen2-MoE with a shared expert (16 experts top-4) and an
    OLMoE-style model with many small experts (64 top-8), both on English prose."""
    from transformers import AutoModelForCausalLM

    qwen2, olmoe = RECIPES["qwen2-moe-prose"], RECIPES["olmoe-prose"]
    assert (qwen2.num_experts, qwen2.top_k, olmoe.num_experts, olmoe.top_k) == (16, 4, 64, 8)
    for recipe, architecture in ((qwen2, "Qwen2MoeForCausalLM"), (olmoe, "OlmoeForCausalLM")):
        assert recipe.corpus == "python-docs" and recipe.moe_intermediate_size % GRANULE == 0 and recipe.granules >= 6
        model = AutoModelForCausalLM.from_config(recipe.model_config())
        assert type(model).__name__ == architecture
        assert model.model.layers[0].mlp.experts.down_proj.shape[-1] == recipe.moe_intermediate_size
    assert model.config.num_experts == 64
    assert "shared_expert_intermediate_size" in qwen2.to_dict() and "shared_expert_intermediate_size" not in \
        RECIPES["small"].to_dict()  # the caches built before the field existed stay current
    with pytest.raises(ValueError, match="set head_dim=32"):
        qwen2.replace(head_dim=16)
    with pytest.raises(ValueError, match="shared_expert_intermediate_size is for the qwen2_moe family"):
        olmoe.replace(shared_expert_intermediate_size=64)


def test_training_experts_forward_matches_eager():
    from transformers import Qwen3MoeForCausalLM

    recipe = _micro_recipe()
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM._from_config(recipe.model_config(), experts_implementation="eager")
    x = torch.randint(0, recipe.vocab_size, (3, 16))

    def run():
        model.zero_grad()
        out = model(input_ids=x, labels=x, output_router_logits=True)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_logits, ref_grads = run()
    with _training_experts(model):
        logits, grads = run()
    assert "forward" not in vars(model.model.layers[0].mlp.experts)  # patch undone
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _micro_recipe() -> Recipe:
    return Recipe(
        name="micro",
        description="test-only",
        vocab_size=320,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        num_experts=4,
        top_k=2,
        moe_intermediate_size=32,
        seq_len=32,
        batch_size=4,
        steps=3,
        lr=1e-2,
        warmup_steps=1,
        threads=1,
    )


def _micro_docs():
    train = [d for d in stdlib_documents("train") if 2_000 < len(d.text) < 6_000][:12]
    heldout = [d for d in stdlib_documents("heldout") if len(d.text) < 6_000][:2]
    return train, heldout


def test_same_seed_gives_bit_identical_weights(tmp_path):
    from safetensors.torch import load_file

    recipe = _micro_recipe()
    train, heldout = _micro_docs()
    manifests = {}
    for run in ("a", "b", "other-seed"):
        out = tmp_path / run
        out.mkdir()
        manifests[run] = train_checkpoint(
            recipe,
            out,
            seed=1 if run == "other-seed" else 0,
            steps=4,
            progress=False,
            train_documents=train,
            heldout_documents=heldout,
        )
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert manifests["a"]["weights_sha256"] == manifests["b"]["weights_sha256"]
    assert manifests["a"]["training"]["loss_curve"] == manifests["b"]["training"]["loss_curve"]
    assert manifests["a"]["weights_sha256"] != manifests["other-seed"]["weights_sha256"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert manifests["a"]["steps"] == 4 and not manifests["a"]["default_build"]


# --------------------------------------------------------------------------------------------
# Cache behaviour (training replaced by a fake that writes a complete checkpoint)


@pytest.fixture
def fake_training(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXC_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake(recipe, out, *, seed=None, steps=None, progress=True, **_):
        calls.append((recipe.name, seed, steps))
        if recipe.name == "small" and steps == 13:
            raise KeyboardInterrupt  # an interrupted build
        (Path(out) / "config.json").write_text("{}")
        manifest = {"format": flexc.zoo.train.MANIFEST_FORMAT, "recipe": recipe.to_dict(), "calls": len(calls)}
        (Path(out) / "manifest.json").write_text(json.dumps(manifest))
        return manifest

    import flexc.zoo.train

    monkeypatch.setattr(flexc.zoo.train, "train_checkpoint", fake)
    return calls


def test_build_caches_atomically_and_keys_overrides(fake_training, tmp_path):
    root = tmp_path / "cache" / "zoo"
    assert [e.name for e in flexc.zoo.available()] == list(RECIPES)
    assert not any(e.cached for e in flexc.zoo.available())

    path = flexc.zoo.build("tiny", progress=False)
    assert path == root / "tiny" == entry_path("tiny") == entry_path("tiny", seed=RECIPES["tiny"].seed)
    assert flexc.zoo.resolve("tiny") == path and len(fake_training) == 1  # cached: not retrained
    entry = {e.name: e for e in flexc.zoo.available()}["tiny"]
    assert entry.cached and entry.path == path and entry.manifest["calls"] == 1

    short = flexc.zoo.build("tiny", steps=5, progress=False)
    seeded = flexc.zoo.build("tiny", seed=7, progress=False)
    assert short == root / "tiny-steps5" and seeded == root / "tiny-seed7"
    assert json.loads((path / "manifest.json").read_text())["calls"] == 1  # default model untouched

    assert flexc.zoo.build("tiny", force=True, progress=False) == path
    assert json.loads((path / "manifest.json").read_text())["calls"] == 4

    # A stale checkpoint (another recipe) is reported and rebuilt.
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["recipe"]["steps"] += 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert {e.name: e for e in flexc.zoo.available()}["tiny"].stale
    flexc.zoo.build("tiny", progress=False)
    assert len(fake_training) == 5

    # An interrupted build leaves nothing behind that looks like a model.
    with pytest.raises(KeyboardInterrupt):
        flexc.zoo.build("small", steps=13, progress=False)
    assert not (root / "small-steps13").exists()
    assert not list(root.glob(".*.tmp-*"))

    with pytest.raises(UnknownZooModel, match="tiny, small") as err:
        flexc.zoo.build("huge")
    assert isinstance(err.value, ValueError)


def test_concurrent_builds_train_once(fake_training):
    barrier = threading.Barrier(4)
    results = []

    def worker():
        barrier.wait()
        results.append(flexc.zoo.build("small", progress=False))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert len(fake_training) == 1


# --------------------------------------------------------------------------------------------
# The real tiny model


@pytest.mark.slow
def test_tiny_model_loads_offline_and_beats_unigram(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexc.zoo.evaluate import evaluate_heldout

    manifest = json.loads((tiny_model_dir / "manifest.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert model.dtype == torch.float32
    assert weights_sha256(model) == manifest["weights_sha256"]
    cfg = model.config
    assert cfg.num_experts == RECIPES["tiny"].num_experts and cfg.norm_topk_prob
    assert cfg.vocab_size == len(tokenizer) == manifest["tokenizer"]["vocab_size"]

    text = 'def add(a, b):\n    """Return a + b."""\n    return a + b\n'
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text

    heldout = manifest["heldout"]
    assert heldout["tokens"] > 20_000
    assert heldout["perplexity"] < 0.5 * heldout["unigram_perplexity"], heldout

    # The recorded number is reproducible from the saved checkpoint, loaded the plain way.
    again = evaluate_heldout(model, tokenizer, seq_len=heldout["seq_len"])
    expected_tokens = num_targets(manifest["tokenizer"]["heldout_tokens"], heldout["seq_len"])
    assert again.tokens == heldout["tokens"] == expected_tokens
    assert math.isclose(again.perplexity, heldout["perplexity"], rel_tol=1e-4)
