"""recover: merged == adapter-applied, tables and nesting unchanged, only adapters train, resume, YAML."""

import json
import logging
from pathlib import Path

import pytest
import torch

import flexc
from flexc.export.tables import WidthTables
from flexc.ir.state import CompileState
from flexc.ir import lower
from flexc.ir.testing import tiny_model
from flexc.passes import PassContext
from flexc.passes.manager import run_pass
from flexc.passes.lora import attach_adapters, channel_mask, merge_adapters
from flexc.passes.recover import Recover, RecoverDiverged, apply_widths, select_budget

BUDGETS = (1.0, 0.6, 0.3)


def data(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (2, 12), generator=g) for _ in range(n)]


def nested_tables(graph, seed=0) -> torch.Tensor:
    """Random nested tables ``[1.0, 0.6, 0.3]`` in 16-channel granules, with a removed expert and a full one."""
    g = torch.Generator().manual_seed(seed)
    full = graph.groups[0].intermediate_size
    levels = full // 16
    mid = torch.randint(1, levels + 1, (len(graph.groups), graph.groups[0].num_experts), generator=g)
    low = (mid - torch.randint(0, 2, mid.shape, generator=g)).clamp_min(0)
    mid[0, 0], low[0, 0], low[0, 1] = levels, levels, 0
    return torch.stack([torch.full_like(mid, levels), mid, low]).to(torch.int32) * 16


def setup(tmp_path, family="qwen3_moe"):
    model = tiny_model(family, moe_intermediate_size=64) if family == "qwen3_moe" else tiny_model(family)
    graph = lower(model)
    tables = WidthTables(BUDGETS, nested_tables(graph), "params", layers=[g.layer for g in graph.groups],
                         full=[g.intermediate_size for g in graph.groups])
    ctx = PassContext(workdir=tmp_path, calibration_data=data(), quiet=True, state=CompileState(width_tables=tables),
                      logger=logging.getLogger("test"))
    return graph, ctx


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def restore(model, saved) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])


def recover(graph, ctx, workdir, **options):
    ctx.workdir = workdir
    run_pass(Recover({"steps": 6, "lr": 1e-2, "checkpoint_every": 2, **options}), graph, ctx)
    return json.loads((workdir / "recover.json").read_text())


@pytest.mark.parametrize("family,targets", [("qwen3_moe", ["experts", "attention"]), ("gpt_oss", ["experts"])])
def test_merged_model_equals_adapter_applied_model(tmp_path, family, targets):
    graph, ctx = setup(tmp_path, family)
    tables = ctx.state.width_tables
    experts = [graph.experts_module(g) for g in graph.groups]
    before = snapshot(graph.model)
    peft_model = attach_adapters(graph.model, graph.groups, rank=4, alpha=8, targets=targets, seed=0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.05)  # B starts at zero: make every update non-trivial
    ids = data(1, seed=5)[0]
    expected = {}
    with torch.no_grad():
        for b in (0.6, 0.3, 1.0):
            apply_widths(experts, graph.groups, tables.table(b))
            expected[b] = peft_model(input_ids=ids, use_cache=False).logits
        stats = merge_adapters(peft_model, experts, graph.groups, tables.table(0.6))
    peft_model.unload()
    assert type(graph.experts_module(graph.groups[0])) is type(experts[0])
    assert all(s["merged_norm"] > 0 and s["dropped_norm"] > 0 for s in stats)
    with torch.no_grad():
        for b in (0.6, 0.3):  # the fine-tuned table and a nested smaller one: the exact fine-tuned model
            graph.set_widths(tables.table(b))
            torch.testing.assert_close(graph.logits(ids), expected[b], rtol=0, atol=1e-5)
        graph.set_widths(None)  # full width: the unmasked update beyond the prefix was dropped
        assert (graph.logits(ids) - expected[1.0]).abs().max() > 1e-4
    table = tables.table(0.6)
    for i, (g, module) in enumerate(zip(graph.groups, experts)):
        for name in ("gate_up_proj", "down_proj"):
            key = f"{g.path}.{name}"
            new, old = getattr(module, name), before[key]
            if g.transposed:
                new, old = new.transpose(1, 2), old.transpose(1, 2)
            mask = channel_mask(g, table[i], name).expand_as(new)
            assert torch.equal(new[~mask], old[~mask])  # channels beyond the fine-tuned prefix: untouched
            assert not torch.equal(new[mask], old[mask])


def test_channel_mask_layouts():
    from types import SimpleNamespace

    widths = torch.tensor([0, 2, 4])
    concat = channel_mask(SimpleNamespace(intermediate_size=4, interleaved=False), widths, "gate_up_proj")
    inter = channel_mask(SimpleNamespace(intermediate_size=4, interleaved=True), widths, "gate_up_proj")
    down = channel_mask(SimpleNamespace(intermediate_size=4, interleaved=False), widths, "down_proj")
    assert concat[1, :, 0].tolist() == [True, True, False, False] * 2
    assert inter[1, :, 0].tolist() == [True] * 4 + [False] * 4
    assert down.shape == (3, 1, 4) and down[0].sum() == 0 and down[2].all()


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    root = tmp_path_factory.mktemp("recover")
    graph, ctx = setup(root)
    before = snapshot(graph.model)
    tables_before = ctx.state.width_tables.tables.clone()
    widths_before = graph.widths()
    seen = []

    def check_grads(step, peft_model):
        base = [p for n, p in peft_model.named_parameters() if ".lora_" not in n]
        lora = [p for n, p in peft_model.named_parameters() if ".lora_" in n]
        seen.append((all(p.grad is None and not p.requires_grad for p in base),
                     all(p.requires_grad for p in lora), sum(p.grad is not None for p in lora), len(lora)))

    Recover.on_step = staticmethod(check_grads)
    try:
        report = recover(graph, ctx, root / "run")
    finally:
        Recover.on_step = None
    return graph, ctx, before, tables_before, widths_before, seen, report, root


def test_only_adapter_parameters_receive_gradients(recovered):
    graph, _, _, _, _, seen, _, _ = recovered
    assert len(seen) == 6
    for base_frozen, lora_trainable, with_grad, total in seen:
        assert base_frozen and lora_trainable and with_grad == total == 8  # 2 layers x 2 weights x (A, B)
    assert all(p.requires_grad and p.grad is None for p in graph.model.parameters())  # flags restored


def test_widths_tables_and_nesting_unchanged(recovered):
    graph, ctx, _, tables_before, widths_before, _, report, root = recovered
    assert torch.equal(ctx.state.width_tables.tables, tables_before)
    assert torch.equal(graph.widths(), widths_before)
    assert report["keep_trained"] == 0.6 and ctx.state.recovered_keep == 0.6
    history = json.loads((root / "run" / "recover_history.json").read_text())
    for first, again in zip(history[:3], history[3:]):  # the same batch, three steps later: lower loss
        assert again["loss"] < first["loss"]


def test_graph_sees_merged_weights(recovered):
    graph, ctx, before, *_ = recovered
    changed = [n for n, p in graph.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("experts" in n for n in changed)
    ids = data(1, seed=7)[0]
    table = ctx.state.width_tables.tables[1]
    graph.set_widths(table)
    try:
        with torch.no_grad():
            eager = graph.model(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(graph.logits(ids), eager, rtol=0, atol=1e-6)
    finally:
        graph.set_widths(None)


def test_resume_gives_the_same_result(recovered, tmp_path):
    graph, ctx, before, *_ = recovered
    after = snapshot(graph.model)
    restore(graph.model, before)
    try:
        class Killed(Exception):
            pass

        def kill(step, _):
            if step == 3:  # after the checkpoint of step 2 (steps 0..3 done, checkpoint holds 2)
                raise Killed

        Recover.on_step = staticmethod(kill)
        try:
            with pytest.raises(Killed):
                recover(graph, ctx, tmp_path)
        finally:
            Recover.on_step = None
        assert all(torch.equal(p, before[n]) for n, p in graph.model.named_parameters())  # nothing merged
        assert type(graph.experts_module(graph.groups[0])).__name__ == "Qwen3MoeExperts"  # adapters removed
        assert torch.load(tmp_path / "recover_checkpoint.pt", weights_only=True)["step"] == 4
        report = recover(graph, ctx, tmp_path)
        assert report["steps"] == 6
        for n, p in graph.model.named_parameters():
            assert torch.equal(p, after[n]), n
    finally:
        restore(graph.model, after)


def test_non_finite_loss_is_a_clear_error_and_keeps_the_checkpoint(recovered, tmp_path):
    graph, ctx, before, *_ = recovered
    after = snapshot(graph.model)
    restore(graph.model, before)

    def poison(step, peft_model):
        if step == 2:
            with torch.no_grad():
                for n, p in peft_model.named_parameters():
                    if ".lora_A" in n:
                        p.fill_(float("nan"))

    Recover.on_step = staticmethod(poison)
    try:
        with pytest.raises(RecoverDiverged, match="the loss became nan at step 3"):
            recover(graph, ctx, tmp_path)
    finally:
        Recover.on_step = None
        unchanged = all(torch.equal(p, before[n]) for n, p in graph.model.named_parameters())
        restore(graph.model, after)
    assert unchanged
    ckpt = torch.load(tmp_path / "recover_checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(t).all() for t in ckpt["adapters"].values())


def test_keep_selects_the_nearest_budget_or_fails_clearly(recovered, tmp_path):
    graph, ctx, *_ = recovered
    tables = ctx.state.width_tables
    assert select_budget(tables, 0.62, 0.05) == 0.6
    assert select_budget(tables, 0.45, 0.15) == 0.3  # a tie goes to the smaller keep
    with pytest.raises(ValueError, match=r"within 0.05 of keep 0.45 .*exported budgets: 1, 0.6, 0.3"):
        select_budget(tables, 0.45, 0.05)
    with pytest.raises(ValueError, match="no width tables"):
        run_pass(Recover({}), graph, PassContext(workdir=tmp_path, calibration_data=data(), quiet=True))


def test_runs_from_a_yaml_pipeline_on_the_tiny_zoo_model(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""\
model: {{path: {tiny_model_dir}}}
data:
  calibration: {{builtin: python-stdlib, num_samples: 8, seq_len: 32, batch_size: 4}}
budgets: {{keep: [0.75, 0.6, 0.4]}}
pipeline:
  - rank_channels: {{plot: false}}
  - insert_action_gates: {{levels: 8}}
  - anneal: {{steps: 6, checkpoint_every: 3}}
  - recover: {{steps: 3, keep: 0.6, rank: 4}}
export: {{dir: {out}}}
""")
    flexc.compile(spec, quiet=True)
    report = json.loads((out / "stages" / "04-recover" / "recover.json").read_text())
    assert report["keep_trained"] == 0.6 and report["steps"] == 3
    assert all(s["merged_norm"] > 0 for s in report["merge"])
    assert Path(out / "stages" / "04-recover" / "recover_checkpoint.pt").is_file()
