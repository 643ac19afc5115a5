"""flexc's vLLM MoE block and artifact detection, without vLLM (these run in the default suite).

The block must compute what the family's transformers MoE block computes with flexc's experts
at the same widths, loading its weights from the checkpoint names ``save_pretrained`` writes
(per-expert), from transformers' stacked layout, and from a sliced checkpoint's packed experts.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from flexc.export.nested import ArtifactError
from flexc.ir.experts_impl import set_widths, use_flexc_experts
from flexc.ir.families import detect_family
from flexc.ir.groups import find_expert_groups
from flexc.ir.testing import tiny_model
from flexc.serving.artifact import Artifact, detect
from flexc.serving.families import FAMILIES, ServingError, family_for
from flexc.serving.moe import BlockPlan, FlexcMoeBlock, building

FAMILY_NAMES = list(FAMILIES)


def _saved(model, directory) -> dict[str, torch.Tensor]:
    model.save_pretrained(directory)
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _block(model, layer: int, artifact: Artifact, weights: dict[str, torch.Tensor]) -> FlexcMoeBlock:
    family = family_for(model.config.model_type)
    prefix = f"model.layers.{layer}.{family.block_attr}"
    with building(BlockPlan(family, model.config, artifact)):
        block = FlexcMoeBlock(prefix=prefix, ignored="decoder-layer arguments")
    for name, tensor in weights.items():
        if name.startswith(prefix + "."):
            block.load(name[len(prefix) + 1:], tensor, name)
    assert block.experts.missing() == []
    return block


def _hf_block(model, layer: int):
    group = find_expert_groups(model, detect_family(model.config))[layer]
    return model.get_submodule(group.path.rpartition(".")[0]), model.get_submodule(group.path), group


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_block_equals_transformers_block_at_full_and_random_widths(family, tmp_path):
    model = tiny_model(family, seed=1)
    use_flexc_experts(model)
    weights = _saved(model, tmp_path)
    assert not any(k.endswith("experts.gate_up_proj") for k in weights), "expected per-expert checkpoint names"
    block = _block(model, 1, Artifact("nested", None), weights)
    hf_block, hf_experts, group = _hf_block(model, 1)
    hidden = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(2)
    for widths in (None, torch.randint(0, group.intermediate_size + 1, (group.num_experts,), generator=gen)):
        full = torch.full((group.num_experts,), group.intermediate_size)
        set_widths(hf_experts, full if widths is None else widths)
        block.experts.widths.copy_(full if widths is None else widths)
        with torch.no_grad():
            want = hf_block(hidden[None])
            want = want[0] if isinstance(want, tuple) else want
            got = block(hidden)
        torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)
    assert (block.shared_expert is not None) == (family == "qwen2_moe")  # and loaded: the outputs agree


def test_block_loads_the_stacked_layout(tmp_path):
    model = tiny_model("qwen3_moe", seed=3)
    stacked = {k: v for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in stacked)
    block = _block(model, 0, Artifact("nested", None), stacked)
    _, hf_experts, _ = _hf_block(model, 0)
    torch.testing.assert_close(block.experts.gate_up_proj, hf_experts.gate_up_proj)
    torch.testing.assert_close(block.experts.down_proj, hf_experts.down_proj)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("pattern", ["mixed", "one bucket"])
def test_sliced_checkpoint_loads_bucketed_experts_at_their_widths(family, pattern, tmp_path):
    from flexc.export.sliced import write_sliced

    model = tiny_model(family, seed=4)
    use_flexc_experts(model)
    groups = find_expert_groups(model, detect_family(model.config))
    gen = torch.Generator().manual_seed(5)
    if pattern == "mixed":
        widths = torch.stack([torch.randint(0, g.intermediate_size + 1, (g.num_experts,), generator=gen)
                              for g in groups])
        widths[0, 0] = 0  # a removed expert
    else:  # every expert of a layer at one width: one call on the routing as it is
        widths = torch.stack([torch.full((g.num_experts,), g.intermediate_size // 2) for g in groups])
    write_sliced(tmp_path, model, groups, widths, budget=0.5)
    config = json.loads((tmp_path / "config.json").read_text())
    weights = {}
    for path in tmp_path.glob("*.safetensors"):
        weights.update(load_file(path))
    artifact = Artifact("sliced", tmp_path, sliced=config["flexc_sliced"])
    for layer in range(len(groups)):
        block = _block(model, layer, artifact, weights)
        assert block.experts.widths.tolist() == widths[layer].tolist()
        stored = sum(kernel.w2_weight.numel() for kernel in block.experts.kernels)
        assert stored == model.config.hidden_size * int(widths[layer].sum())  # memory: each expert at its width
        assert [w for w, _ in block.experts.buckets] == sorted(set(widths[layer].tolist()) - {0}, reverse=True)
        assert block.experts.routing.whole == (pattern == "one bucket")
        hf_block, hf_experts, _ = _hf_block(model, layer)
        set_widths(hf_experts, widths[layer])
        # 1 and 5 tokens: planned on the host (buckets over every token, padded); 100: sorted on the device
        for tokens in (1, 5, 100):
            hidden = torch.randn(tokens, model.config.hidden_size, generator=gen)
            with torch.no_grad():
                want = hf_block(hidden[None])
                want = want[0] if isinstance(want, tuple) else want
                torch.testing.assert_close(block(hidden), want[0], rtol=1e-5, atol=1e-5)
                if tokens == 5 and pattern == "mixed":  # kernels built for one k: each pair a row of its own
                    for kernel in block.experts.kernels:
                        kernel.takes_any_k = lambda: False
                    torch.testing.assert_close(block(hidden), want[0], rtol=1e-5, atol=1e-5)
                    for kernel in block.experts.kernels:
                        del kernel.takes_any_k


def test_block_refuses_tensors_it_has_no_place_for(tmp_path):
    model = tiny_model("qwen3_moe", seed=0)
    weights = _saved(model, tmp_path)
    block = _block(model, 0, Artifact("nested", None), weights)
    with pytest.raises(ServingError, match="has no place"):
        block.load("experts.0.bogus.weight", torch.zeros(1), "model.layers.0.mlp.experts.0.bogus.weight")
    with pytest.raises(ServingError, match=r"shape \(3, 3\), expected"):
        block.load("experts.0.gate_proj.weight", torch.zeros(3, 3), "model.layers.0.mlp.experts.0.gate_proj.weight")
    with pytest.raises(ServingError, match="bucketed .sliced. experts in a checkpoint whose config has no flexc_sliced"):
        block.load("experts.bucket_0_down", torch.zeros(3, 3), "model.layers.0.mlp.experts.bucket_0_down")


def test_sliced_block_refuses_buckets_that_disagree_with_its_config(tmp_path):
    model = tiny_model("qwen3_moe", seed=0)
    hidden = model.config.hidden_size
    widths = [16, 16, 32, 0, 16, 32, 16, 16]
    buckets = [{"width": 32, "experts": [2, 5]}, {"width": 16, "experts": [0, 1, 4, 6, 7]}]
    section = {"experts": {"model.layers.0.mlp.experts": {"widths": widths, "buckets": buckets}}}
    with building(BlockPlan(family_for("qwen3_moe"), model.config, Artifact("sliced", tmp_path, sliced=section))):
        block = FlexcMoeBlock(prefix="model.layers.0.mlp")
    assert [(w, ids) for w, ids in block.experts.buckets] == [(32, [2, 5]), (16, [0, 1, 4, 6, 7])]
    name = "model.layers.0.mlp.experts.bucket_1_down"
    with pytest.raises(ServingError, match="bucket 1 .5 experts of width 16. needs .5, {}, 16.: the checkpoint's "
                       "buckets disagree with its config".format(hidden)):
        block.load("experts.bucket_1_down", torch.zeros(4, hidden, 16), name)
    with pytest.raises(ServingError, match="bucket 2, but the config's widths give 2 buckets"):
        block.load("experts.bucket_2_down", torch.zeros(1, hidden, 8), "model.layers.0.mlp.experts.bucket_2_down")
    with pytest.raises(ServingError, match="stored by width bucket"):
        block.load("experts.sliced_down", torch.zeros(3, 3), "model.layers.0.mlp.experts.sliced_down")


def test_block_outside_a_flexc_model_is_an_error():
    with pytest.raises(RuntimeError, match="only inside a flexc vLLM model"):
        FlexcMoeBlock(prefix="model.layers.0.mlp")


# ---- what vLLM was given ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def nested_dir(tmp_path_factory):
    from flexc.export.nested import write_nested
    from flexc.ir.tables import WidthTables

    model = tiny_model("qwen3_moe", seed=0)
    groups = find_expert_groups(model, detect_family(model.config))
    full = groups[0].intermediate_size
    tables = torch.tensor([[[full // 2] * 8] * len(groups)], dtype=torch.int32)
    out = tmp_path_factory.mktemp("nested")
    write_nested(out, model, groups, WidthTables([0.5], tables, "params", [g.layer for g in groups],
                                                 [g.intermediate_size for g in groups]))
    return out, model.config


def test_detect_nested_artifact_and_the_budget_asked_for(nested_dir):
    directory, config = nested_dir
    artifact = detect(directory, config)
    assert artifact.kind == "nested" and artifact.tables.budgets == [0.5] and artifact.budget is None
    config.flexc_budget = 0.5
    try:
        assert detect(directory, config).budget == 0.5
        for bad in (0, 1.5, "half", True):
            config.flexc_budget = bad
            with pytest.raises(ServingError, match="flexc_budget must be a keep ratio in"):
                detect(directory, config)
    finally:
        del config.flexc_budget


def test_the_experts_kernel_asked_for_is_read_and_checked(nested_dir):
    directory, config = nested_dir
    assert detect(directory, config).experts_kernel == "vllm"  # the default
    config.flexc_experts_kernel = "flexc"
    try:
        assert detect(directory, config).experts_kernel == "flexc"
        config.flexc_experts_kernel = "triton"
        with pytest.raises(ServingError, match="flexc_experts_kernel must be one of vllm, flexc .* found 'triton'"):
            detect(directory, config)
        sliced = type(config).from_dict({**config.to_dict(), "flexc_experts_kernel": "flexc",
                                         "flexc_sliced": {"format": 2, "budget": 0.5, "experts": {}}})
        with pytest.raises(ServingError, match="flexc_experts_kernel applies to nested artifacts only"):
            detect(None, sliced)
    finally:
        del config.flexc_experts_kernel


def test_stock_checkpoint_is_not_an_artifact_and_refuses_a_budget(tmp_path):
    model = tiny_model("qwen3_moe", seed=0)
    model.save_pretrained(tmp_path)
    assert detect(tmp_path, model.config) is None
    assert detect("Qwen/Qwen3-30B-A3B", model.config) is None  # a hub name: vLLM's own class serves it
    model.config.flexc_budget = 0.5
    with pytest.raises(ServingError, match="not a flexc nested artifact"):
        detect(tmp_path, model.config)
    with pytest.raises(ServingError, match="not a local directory"):
        detect("Qwen/Qwen3-30B-A3B", model.config)


def test_width_file_without_a_nested_manifest_is_refused(nested_dir, tmp_path):
    directory, config = nested_dir
    for name in ("config.json", "flexc_widths.safetensors"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    with pytest.raises(ArtifactError, match="does not describe a nested artifact"):
        detect(tmp_path, config)


def test_sliced_config_is_detected_and_refuses_a_budget(nested_dir):
    _, config = nested_dir
    config = type(config).from_dict(config.to_dict())
    config.flexc_sliced = {"format": 2, "budget": 0.5, "experts": {}}
    assert detect(None, config).kind == "sliced"
    config.flexc_budget = 0.75
    with pytest.raises(ServingError, match="a sliced checkpoint holds one budget"):
        detect(None, config)
    del config.flexc_budget
    for old_or_new in (1, 99):  # format 1 packed the experts along the channel axis
        config.flexc_sliced = {"format": old_or_new, "experts": {}}
        with pytest.raises(ServingError, match=f"sliced format {old_or_new}; this flexc serves format 2 .experts "
                           "stored by width bucket.: re-export"):
            detect(None, config)


def test_unserved_family_names_what_is_served():
    with pytest.raises(ServingError, match="does not serve model type 'olmoe'.*Qwen3Moe, Qwen2Moe, Mixtral"):
        family_for("olmoe")


def test_sliced_block_refuses_a_config_whose_buckets_are_not_its_widths(tmp_path):
    model = tiny_model("qwen3_moe", seed=0)
    widths = [16, 16, 32, 0, 16, 32, 16, 16]
    edited = [{"width": 32, "experts": [2, 4]}, {"width": 16, "experts": [0, 1, 5, 6, 7]}]  # experts 4, 5 swapped
    for buckets in (edited, None):
        section = {"experts": {"model.layers.0.mlp.experts": {"widths": widths, "buckets": buckets}}}
        with building(BlockPlan(family_for("qwen3_moe"), model.config, Artifact("sliced", tmp_path, sliced=section))):
            with pytest.raises(ServingError, match=r"config.json, decoder layer 0: the config's buckets .* are not the "
                               r"width buckets of its widths .*re-export the sliced checkpoint"):
                FlexcMoeBlock(prefix="model.layers.0.mlp")


def test_a_packed_copy_is_sized_by_its_kept_channels_and_made_only_where_it_fits(monkeypatch):
    """The nested engine's copy of a budget's experts for vLLM's CPU kernel: each expert's kept channels,
    rounded up to vLLM's 32; the experts in 32-channel pieces (cut also at the tables' widths off that grid,
    plus one zero piece): one copy; refused when it would take more than half the memory left."""
    import types

    from flexc.serving.packed import fits_in_memory, packed_nbytes, pieces_nbytes

    assert packed_nbytes([64, 16, 0, 40], 8, torch.float32) == 3 * 8 * 4 * (64 + 32 + 64)  # 40 -> 64, 16 -> 32
    assert packed_nbytes([64, 32, 0, 40], 8, torch.bfloat16) == 3 * 8 * 2 * (64 + 32 + 64)
    rows = [[64, 32, 0, 40], [64, 16, 0, 40]]  # pieces of expert 1: 0-16, 16-32, 32-64; expert 3: 0-32, 32-40, 40-64
    assert pieces_nbytes(rows, 64, 8, torch.float32) == 3 * 32 * 8 * 4 * (2 + 3 + 2 + 3 + 1)
    monkeypatch.setitem(sys.modules, "psutil", types.SimpleNamespace(
        virtual_memory=lambda: types.SimpleNamespace(available=1000)))
    assert fits_in_memory(500, held=0) and not fits_in_memory(501, held=0)
    assert fits_in_memory(700, held=400)  # the copy it replaces is freed first
