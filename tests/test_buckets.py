"""Width buckets (budgets.grid, budgets.max_buckets): every table a pass chooses is on the grid, has
at most max_buckets distinct nonzero widths per layer, stays within its budget and nests."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from flexc.ir import lower
from flexc.ir.buckets import BucketBound, auto_grid, bucket_table, count_buckets
from flexc.ir.tables import expert_weights, keep_ratio
from flexc.ir.testing import tiny_model
from flexc.passes import PassContext, resolve_pass
from flexc.passes.anneal import Anneal
from flexc.passes.manager import run_pass

BUDGETS = (0.75, 0.5, 0.3)


def _random_table(seed: int, layers=3, experts=16, full=256, step=16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, full // step + 1, (layers, experts), generator=gen) * step


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_buckets", [1, 2, 4])
def test_bucket_table_bounds_widths_and_keeps_budget_and_nesting(seed, max_buckets):
    full = torch.tensor([256, 256, 192])
    weights = torch.rand(3, 16, generator=torch.Generator().manual_seed(100 + seed))
    weights /= weights.sum()
    table = torch.minimum(_random_table(seed), full[:, None])
    table[0, 3] = 0  # a removed expert stays removed and is no bucket
    upper = None
    for target in (0.8, 0.55, 0.3):
        out = bucket_table(table, full, weights, target, [32, 32, 64], max_buckets, upper)
        assert max(count_buckets(out)) <= max_buckets
        assert int(out[0, 3]) == 0 and bool((out[table > 0] > 0).all())
        grid = torch.tensor([32, 32, 64])[:, None]
        assert bool(((out % grid == 0) | (out == full[:, None])).all())
        assert keep_ratio(out, full, weights) <= target + 1e-9
        if upper is not None:
            assert bool((out <= upper).all())  # nested within the previous budget's table
        upper, table = out, (table.float() * 0.7).long() // 16 * 16  # the next budget's raw table


def test_bucket_table_reaches_the_budget_when_levels_allow():
    full = torch.tensor([256, 256])
    weights = torch.full((2, 16), 1 / 32)
    table = _random_table(7, layers=2)
    for target in (0.75, 0.5, 0.25):
        raw = (table.float() * target / keep_ratio(table, full, weights)).round().long().clamp(16, 256) // 16 * 16
        out = bucket_table(raw, full, weights, target, [32, 32], 4)
        # short of the target by less than one grid step of a few experts (moves are between levels)
        assert target - 4 * 32 / 256 / 32 <= keep_ratio(out, full, weights) <= target + 1e-9


def test_bucket_table_without_a_bound_only_snaps_to_the_grid():
    full = torch.tensor([128])
    weights = torch.full((1, 4), 0.25)
    table = torch.tensor([[128, 96, 64, 32]])
    out = bucket_table(table, full, weights, keep_ratio(table, full, weights), [32], None)
    assert out.tolist() == table.tolist()


def test_auto_grid_keeps_eight_widths_per_expert():
    assert auto_grid(768, 16) == 64 and auto_grid(512, 16) == 64
    assert auto_grid(256, 16) == 32 and auto_grid(128, 16) == 16 and auto_grid(32, 16) == 16
    assert BucketBound().grids([768, 128], 16) == [64, 16]
    assert BucketBound(grid=None).grids([768], 16) == [16]
    assert not BucketBound(grid=None, max_buckets=None).active


def _graph_and_ctx(tmp_path, max_buckets, grid="auto"):
    model = tiny_model("qwen3_moe", moe_intermediate_size=128)
    graph = lower(model)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 97, (4, 16), generator=g) for _ in range(4)]
    spec = SimpleNamespace(budgets=SimpleNamespace(keep_ratios=BUDGETS, metric="params", grid=grid,
                                                   max_buckets=max_buckets))
    ctx = PassContext(workdir=tmp_path, spec=spec, calibration_data=data, quiet=True, logger=logging.getLogger("t"))
    run_pass(resolve_pass("rank_channels")({"plot": False}), graph, ctx)
    return graph, ctx


def _check_tables(graph, ctx, max_buckets):
    tables = ctx.state.width_tables
    full = torch.tensor(tables.full)
    weights = expert_weights(graph.groups, "params")
    for b, table in zip(tables.budgets, tables.tables):
        assert max(count_buckets(table)) <= max_buckets
        assert keep_ratio(table, full, weights) <= b + 1e-9
    return tables


@pytest.mark.parametrize("method", ["uniform", "coverage"])
def test_baselines_honour_the_bucket_bound(tmp_path, method):
    graph, ctx = _graph_and_ctx(tmp_path, max_buckets=2)
    run_pass(resolve_pass(method)({}), graph, ctx)
    unbounded_graph, unbounded_ctx = _graph_and_ctx(tmp_path / "free", max_buckets=None)
    run_pass(resolve_pass(method)({}), unbounded_graph, unbounded_ctx)
    _check_tables(graph, ctx, 2)
    if method == "coverage":  # coverage's own widths take more than two values: the bound is what cut them
        assert max(count_buckets(unbounded_ctx.state.width_tables.tables[1])) > 2


def test_anneal_honours_the_bucket_bound(tmp_path):
    graph, ctx = _graph_and_ctx(tmp_path, max_buckets=2)
    run_pass(resolve_pass("insert_action_gates")({"levels": 8}), graph, ctx)
    ctx.workdir = tmp_path / "anneal"
    run_pass(Anneal({"steps": 12, "lr": 0.1, "checkpoint_every": 100}), graph, ctx)
    tables = _check_tables(graph, ctx, 2)
    assert bool((tables.tables[1:] <= tables.tables[:-1]).all())  # nested
    report = json.loads((tmp_path / "anneal" / "width_tables.json").read_text())
    assert [row["widths_per_layer"] for row in report["budgets"]] == [count_buckets(t) for t in tables.tables]
