"""The example specs for real checkpoints (specs/*.yaml) against config-only models of their shape.

No weights are downloaded or allocated: each hub id resolves to ``tests/data/configs/<name>/``,
which holds the checkpoint's real ``config.json`` only. ``flexc validate`` then checks
everything it checks on a machine holding the checkpoint, except what needs that machine:

- CUDA availability (``torch.cuda.is_available`` is patched to True: the specs ask for ``cuda``);
- the weight files' headers and the tokenizer, which a config-only directory lacks
  (``check_weight_files`` finds no problem; ``has_tokenizer`` and ``load_tokenizer`` give a
  stand-in tokenizer with an end-of-text token).

Each config is also built into a model on the meta device, which flexc's family adapter must
recognise (or, for DeepSeek-V2, refuse as unsupported, as the spec's header says), with the
parameter count the spec's header states.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "data" / "configs"

# spec name -> (hub id, family or None if unsupported, total parameters in billions as the header says)
EXAMPLES = {
    "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B", "qwen3_moe", "30.5"),
    "mixtral-8x7b": ("mistralai/Mixtral-8x7B-v0.1", "mixtral", "46.7"),
    "olmoe-1b-7b": ("allenai/OLMoE-1B-7B-0924", "olmoe", "6.9"),
    "deepseek-v2-lite": ("deepseek-ai/DeepSeek-V2-Lite", None, "15.7"),
}


@pytest.fixture
def hub_configs(monkeypatch):
    """Hub ids resolve to the config-only directories; CUDA, weights and tokenizer checks pass."""
    from flexc import models

    dirs = {hub: CONFIGS / name for name, (hub, _, _) in EXAMPLES.items()}

    def hub_directory(repo_id, revision=None):
        return dirs[repo_id]

    monkeypatch.setattr(models, "hub_directory", hub_directory)
    monkeypatch.setattr(models, "check_weight_files", lambda directory: [])
    monkeypatch.setattr(models, "has_tokenizer", lambda directory: True)
    monkeypatch.setattr(models, "load_tokenizer", lambda directory: SimpleNamespace(eos_token_id=0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def meta_model(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(CONFIGS / name))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def test_every_example_spec_is_listed():
    assert {p.stem for p in (ROOT / "specs").glob("*.yaml")} - {"quickstart"} == set(EXAMPLES)


@pytest.mark.parametrize("name", [n for n, (_, family, _) in EXAMPLES.items() if family])
def test_example_spec_validates(name, hub_configs):
    import flexc

    hub, _, _ = EXAMPLES[name]
    spec = flexc.validate(ROOT / "specs" / f"{name}.yaml")
    assert spec.model.hub == hub and spec.model.dtype == "bfloat16" and spec.model.device == "cuda"
    assert [e.name for e in spec.pipeline][-1] == "lower_kernels"


def test_deepseek_v2_lite_is_refused_as_unsupported(hub_configs):
    import flexc

    with pytest.raises(flexc.SpecError, match="unsupported MoE family 'deepseek_v2'"):
        flexc.validate(ROOT / "specs" / "deepseek-v2-lite.yaml")


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_meta_model_family_and_size(name):
    from flexc.ir.families import UnsupportedFamilyError, detect_family
    from flexc.ir.inspect import summarize

    _, family, billions = EXAMPLES[name]
    model = meta_model(name)
    total = sum(p.numel() for p in model.parameters())
    assert f"{total / 1e9:.1f} B parameters" == f"{billions} B parameters"
    assert f"{billions} B parameters" in (ROOT / "specs" / f"{name}.yaml").read_text()
    if family is None:
        with pytest.raises(UnsupportedFamilyError, match=model.config.model_type):
            detect_family(model)
        return
    assert detect_family(model).family == family
    summary = summarize(model)
    config = model.config
    assert len(summary.groups) == config.num_hidden_layers  # every decoder layer is an MoE layer
    assert summary.total_params == total and summary.routed_params > 0.9 * total


def test_validation_reads_the_config_shape(hub_configs, tmp_path):
    """The checks see the real expert shape: a budget below what 8 actions over 768 channels reach is refused."""
    import flexc

    text = (ROOT / "specs" / "qwen3-30b-a3b.yaml").read_text()
    text = text.replace("keep: [0.8, 0.6, 0.4, 0.25]", "keep: [0.8, 0.05]")
    (tmp_path / "low.yaml").write_text(text)
    with pytest.raises(flexc.SpecError, match=r"keep 0.05 is below .* 768 channels"):
        flexc.validate(tmp_path / "low.yaml")
