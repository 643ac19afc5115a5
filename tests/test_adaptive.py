"""Token-adaptive widths (flexc.ir.adaptive, the adaptive_widths pass): calibration, the runtime, the artifact."""

import json
import math
import shutil

import pytest
import torch

from flexc.ir.adaptive import AdaptivePolicy, LayerRule, calibrate_policy, calibrate_threshold, choose_levels
from flexc.ir.tables import BudgetError, WidthTables


def test_a_calibrated_threshold_keeps_at_most_the_target_and_within_one_pair_of_it():
    g = torch.Generator().manual_seed(0)
    full, n = 64, 4000
    ids = torch.randint(0, 8, (n,), generator=g)
    weights = torch.rand(n, generator=g)
    upper = torch.tensor([64, 48, 64, 32, 64, 48, 32, 64])
    lower = torch.tensor([16, 16, 32, 16, 16, 32, 16, 0])
    for target in (0.3, 0.5, 0.7):
        t = calibrate_threshold(weights, ids, upper, lower, full, target)
        widths = torch.where(weights >= t, upper[ids], lower[ids])
        keep = float(widths.double().mean()) / full
        assert keep <= target + 1e-9
        assert keep > target - 48 / full / n  # one more pair at upper would pass the target
        # pairs at the upper level are exactly the most confident ones
        assert float(weights[widths == upper[ids]].min()) >= float(weights[(widths != upper[ids])].max())


def test_the_scores_rule_keeps_each_pairs_channels_whose_weighted_score_clears_the_scale():
    from flexc.ir.adaptive import ScoredLayer, calibrate_scale

    g = torch.Generator().manual_seed(2)
    full, granule, experts = 64, 16, 4
    scores = torch.rand(experts, full, generator=g).sort(dim=1, descending=True).values
    bounds, mean = scores[:, granule - 1::granule], torch.tensor([0.2, 0.3, 0.25, 0.4])
    layer = ScoredLayer(0.5, mean, bounds, granule, full)
    ids, weights = torch.randint(0, experts, (500,), generator=g), torch.rand(500, generator=g)
    widths = layer.widths(ids, weights)
    for e, w, width in zip(ids.tolist(), weights.tolist(), widths.tolist()):
        assert width == granule * sum(w * float(b) / float(mean[e]) >= 0.5 for b in bounds[e])
    order = torch.argsort(weights)
    for e in range(experts):  # a more confident pair of the same expert never runs narrower
        mine = widths[order][ids[order] == e]
        assert bool((mine[1:] >= mine[:-1]).all())
    for target in (0.3, 0.6):
        scale = calibrate_scale(weights, ids, mean, bounds, granule, full, target)
        keep = float(ScoredLayer(scale, mean, bounds, granule, full).widths(ids, weights).double().mean()) / full
        assert target - 0.02 <= keep <= target + 1e-9


def test_a_target_outside_the_levels_runs_one_level_everywhere():
    assert choose_levels([1.0, 0.8, 0.5, 0.3], 0.8, "adjacent") == (0, 2)  # a level's own keep: its neighbours
    assert choose_levels([1.0, 0.8, 0.5, 0.3], 0.6, "adjacent") == (1, 2)
    assert choose_levels([1.0, 0.8, 0.5, 0.3], 0.6, "extreme") == (0, 3)
    assert choose_levels([1.0, 0.8, 0.5, 0.3], 0.3, "adjacent") == (3, 3)  # nothing narrower
    assert choose_levels([1.0, 0.8, 0.5, 0.3], 1.0, "extreme") == (0, 0)


def _tables() -> WidthTables:
    full = [64, 64]
    t75 = torch.tensor([[64, 64, 48, 32], [64, 48, 48, 32]])
    t50 = torch.tensor([[48, 32, 32, 16], [32, 32, 32, 32]])
    t25 = torch.tensor([[16, 16, 16, 16], [16, 16, 16, 16]])
    return WidthTables([0.75, 0.5, 0.25], torch.stack([t75, t50, t25]), "params", [0, 1], full)


def test_the_policy_meets_each_budgets_target_on_the_text_it_was_calibrated_on():
    tables = _tables()
    g = torch.Generator().manual_seed(1)
    routing = [(torch.rand(3000, generator=g), torch.randint(0, 4, (3000,), generator=g)) for _ in range(2)]
    for target in ("table", "budget"):
        policy = calibrate_policy(tables, routing, rule="adjacent", target=target)
        for b in tables.budgets:
            report = policy.report["budgets"][f"{b:g}"]
            if target == "budget" and b > 0.25:
                assert report["target_keep"] == pytest.approx(b)
            assert report["calibration_keep"] <= report["target_keep"] + 1e-9
            if b > 0.25:  # the narrowest budget has no narrower level to mix in
                assert report["calibration_keep"] == pytest.approx(report["target_keep"], abs=0.01)
        back = AdaptivePolicy.from_dict(json.loads(json.dumps(policy.to_dict())), tables, "here")
        assert back.budgets == policy.budgets


def test_a_policy_that_does_not_belong_to_the_tables_is_refused_naming_where():
    tables = _tables()
    good = AdaptivePolicy("adjacent", "table", {0.5: [LayerRule(0.2, 0.75, 0.25)] * 2}).to_dict()
    with pytest.raises(ValueError, match="policy.json: budget 0.6 is not one"):
        AdaptivePolicy.from_dict({**good, "budgets": [{"keep": 0.6, "layers": good["budgets"][0]["layers"]}]},
                                 tables, "policy.json")
    with pytest.raises(ValueError, match="one rule per MoE layer"):
        AdaptivePolicy.from_dict({**good, "budgets": [{"keep": 0.5, "layers": []}]}, tables, "policy.json")
    bad_level = {**good, "budgets": [{"keep": 0.5, "layers": [{"threshold": 0.1, "upper": 0.9, "lower": 0.25}] * 2}]}
    with pytest.raises(ValueError, match="levels 0.9/0.25"):
        AdaptivePolicy.from_dict(bad_level, tables, "policy.json")


def _compile_spec(model_dir, out, pipeline_tail) -> dict:
    data = {"builtin": "python-stdlib", "num_samples": 64, "seq_len": 128, "batch_size": 8}
    return {"model": {"path": str(model_dir)}, "data": {"calibration": {**data, "split": "train"}},
            "budgets": {"keep": [0.75, 0.5, 0.3]},
            "pipeline": [{"rank_channels": {"score": "activation", "plot": False}}, {"coverage": {}}, *pipeline_tail],
            "export": {"dir": str(out), "formats": ["nested", "sliced"]}}


@pytest.fixture(scope="module")
def adaptive_compile(tiny_model_dir, tmp_path_factory):
    """The zoo ``tiny`` model: rank, coverage tables, fold, a token-adaptive policy checked on 48 held-out windows."""
    import flexc

    out = tmp_path_factory.mktemp("adaptive") / "run"
    flexc.compile(_compile_spec(tiny_model_dir, out, [{"fold_masks": {}},
                                                       {"adaptive_widths": {"held_out": 48, "fallback": False}}]),
                  quiet=True)
    return out


def test_the_policy_realises_its_target_keep_on_the_held_out_split(adaptive_compile):
    from transformers import AutoTokenizer

    import flexc
    from flexc.compiler.spec import DataSource
    from flexc.data.calibration import CalibrationSet

    report = json.loads((adaptive_compile / "nested" / "flexc_adaptive.json").read_text())  # what the artifact keeps
    held = report["report"]["held_out"]
    assert set(held) == {"0.75", "0.5", "0.3"} and all(row["sequences"] == 48 for row in held.values())
    model = flexc.load(adaptive_compile / "nested")
    source = DataSource(builtin="python-stdlib", split="heldout", num_samples=48, seq_len=128, batch_size=16)
    batches = list(CalibrationSet(source, AutoTokenizer.from_pretrained(adaptive_compile / "nested"), role="evaluation"))
    mixed = False
    for budget in (0.75, 0.5, 0.3):
        target = report["report"]["budgets"][f"{budget:g}"]["target_keep"]
        model.set_budget(budget, adaptive=True)
        with torch.no_grad(), model.flexc.measure_active_keep() as keep:
            for ids in batches:
                model(input_ids=ids)
        assert abs(keep() - target) <= 0.02, (budget, keep(), target)
        mixed |= held[f"{budget:g}"]["policy"] in ("scores", "adjacent", "extreme")
    assert mixed  # some budget runs a rule (not only static tables): the keeps above are the policy's


def test_each_budget_runs_the_first_rule_that_beats_its_table_at_the_tables_keep_or_the_table():
    from types import SimpleNamespace

    from flexc.passes.adaptive_widths import _choose

    adjacent, extreme = [LayerRule(0.3, 0.75, 0.25)] * 2, [LayerRule(0.4, 1.0, 0.25)] * 2
    report = {"budgets": {"0.5": {"target_keep": 0.6, "calibration_keep": 0.6},
                          "0.25": {"target_keep": 0.3, "calibration_keep": 0.3}}}
    candidates = {"adjacent": AdaptivePolicy("adjacent", "table", {0.5: adjacent, 0.25: adjacent}, report),
                  "extreme": AdaptivePolicy("extreme", "table", {0.5: extreme, 0.25: extreme}, report)}

    def rule(matched_loss, keep, matched_keep=0.55):
        return {"loss": 4.0, "keep": keep, "matched_loss": matched_loss, "matched_keep": matched_keep}

    def comparison(static_05):
        # the table spends 0.55 on this text; the deployed rules spend more there, with the lowest loss of all (4.0):
        # they are judged fitted to the table's 0.55
        return {"0.5": {"full_loss": 4.0, "static_loss": static_05, "static_keep": 0.55,
                        "rules": {"adjacent": rule(4.2, 0.6), "extreme": rule(4.15, 0.63)}},
                "0.25": {"full_loss": 4.0, "static_loss": 4.5, "static_keep": 0.3,
                         "rules": {"adjacent": rule(4.4, 0.3, 0.3), "extreme": rule(4.45, 0.3, 0.3)}}}

    chosen = _choose(candidates, comparison(4.3), SimpleNamespace(fallback=True), 2)
    assert chosen.budgets[0.5] == adjacent and chosen.budgets[0.25] == adjacent  # the first that wins, in order
    row = chosen.report["held_out"]["0.5"]
    assert row["policy"] == "adjacent" and row["adaptive_keep"] == 0.6 and row["adaptive_loss"] == 4.2
    assert row["increase_ratio"] == pytest.approx(0.2 / 0.3)  # at the table's keep, not as deployed
    lost = _choose(candidates, comparison(4.1), SimpleNamespace(fallback=True), 2)
    assert lost.budgets[0.5] == [LayerRule(math.inf, 0.5, 0.5)] * 2
    assert lost.report["held_out"]["0.5"]["policy"].startswith("static (every adaptive rule lost")
    kept = _choose(candidates, comparison(4.1), SimpleNamespace(fallback=False), 2)
    assert kept.budgets[0.5] == extreme  # no fallback: the lowest matched loss
    unfitted = comparison(4.3)
    unfitted["0.5"]["rules"]["adjacent"]["matched_keep"] = 0.57  # its fit did not reach the table's keep
    assert _choose(candidates, unfitted, SimpleNamespace(fallback=True), 2).budgets[0.5] == extreme
    unfitted["0.5"]["rules"]["extreme"]["matched_keep"] = 0.575
    static = _choose(candidates, unfitted, SimpleNamespace(fallback=True), 2)
    assert static.budgets[0.5] == [LayerRule(math.inf, 0.5, 0.5)] * 2
    assert static.report["held_out"]["0.5"]["policy"].startswith("static (no adaptive rule could be fitted")


def test_a_policy_fitted_again_on_other_routing_meets_each_layers_goal_there_with_its_rules_kinds():
    from flexc.ir.adaptive import ScoredLayer, layer_keeps, level_row, recalibrate

    tables = _tables()
    g = torch.Generator().manual_seed(3)
    routing = [(torch.rand(3000, generator=g), torch.randint(0, 4, (3000,), generator=g)) for _ in range(2)]
    scores = torch.rand(2, 4, 64, generator=g).sort(dim=-1, descending=True).values
    # the routing as the policy runs: weights more confident, traffic moved to expert 0 (kept wide)
    shifted = [((w ** 0.5), torch.where(torch.rand(3000, generator=g) < 0.3, 0, i)) for w, i in routing]
    for rule in ("adjacent", "scores"):
        policy = calibrate_policy(tables, routing, rule=rule, scores=scores)
        goals = {0.5: layer_keeps(tables, 0.5, shifted)}
        again = recalibrate(policy, tables, {0.5: shifted}, goals)
        assert again.budgets[0.75] == policy.budgets[0.75]  # budgets not given stay as they were
        for i, (before, after) in enumerate(zip(policy.budgets[0.5], again.budgets[0.5])):
            assert (after.scale is None) == (before.scale is None)
            assert (after.upper, after.lower) == (before.upper, before.lower)
            weights, ids = shifted[i]
            if after.scale is not None:
                c = again.channels
                widths = ScoredLayer(after.scale, c.mean_weight[i], c.bounds[i], c.granule, 64).widths(ids, weights)
            else:
                upper, lower = level_row(tables, after.upper, i), level_row(tables, after.lower, i)
                widths = torch.where(weights >= after.threshold, upper[ids], lower[ids])
            keep = float(widths.double().mean()) / 64
            assert goals[0.5][i] - 0.01 <= keep <= goals[0.5][i] + 1e-9, (rule, i)
            assert (after.scale, after.threshold) != (before.scale, before.threshold)  # the shift moved the fit
        assert again.report["budgets"]["0.5"]["target_keep"] == pytest.approx(sum(goals[0.5]) / 2)


def test_an_adaptive_nested_artifact_switches_live_and_its_rules_pick_the_levels(adaptive_compile):
    import flexc

    model = flexc.load(adaptive_compile / "nested", budget=0.5, adaptive=True)
    runtime = model.flexc
    assert runtime.adaptive and runtime.budget == 0.5
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))

    def logits(budget, adaptive):
        model.set_budget(budget, adaptive=adaptive)
        with torch.no_grad():
            return model(ids).logits

    rules = runtime.policy.rules(0.5)
    adaptive = logits(0.5, True)
    static = logits(0.5, False)
    assert not runtime.adaptive
    assert not torch.allclose(adaptive, static, atol=1e-4)
    # a two-level rule: every pair above every threshold runs the upper level's table, none the lower level's
    for threshold, level in ((-math.inf, 0.75), (math.inf, 0.3)):
        runtime.policy.budgets[0.5] = [LayerRule(threshold, 0.75, 0.3) for _ in rules]
        runtime._adaptive_layers.clear()
        torch.testing.assert_close(logits(0.5, True), logits(level, False), rtol=1e-4, atol=1e-4)
    # the meter counts every routed pair at its width
    runtime.policy.budgets[0.5] = rules
    runtime._adaptive_layers.clear()
    model.set_budget(0.5, adaptive=True)
    with torch.no_grad(), runtime.measure_active_keep() as keep:
        model(ids)
        assert 0.3 < keep() < 1.0
    assert runtime.adaptive  # measuring leaves the policy in place
    runtime.set_layer_widths({0: runtime.widths()[0]})
    assert not runtime.adaptive
    model.set_budget(1.0, adaptive=True)  # full width: every level is full
    torch.testing.assert_close(logits(1.0, True), logits(1.0, False))


def test_adaptive_loading_errors_name_the_artifact(adaptive_compile, tmp_path):
    import flexc
    from flexc.export.nested import ArtifactError

    plain = tmp_path / "plain"
    shutil.copytree(adaptive_compile / "nested", plain)
    manifest = json.loads((plain / "flexc_manifest.json").read_text())
    del manifest["adaptive"]
    (plain / "flexc_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="no token-adaptive policy"):
        flexc.load(plain, budget=0.5, adaptive=True)
    with pytest.raises(BudgetError, match="no token-adaptive policy"):
        flexc.load(plain, budget=0.5).set_budget(0.5, adaptive=True)

    broken = tmp_path / "broken"
    shutil.copytree(adaptive_compile / "nested", broken)
    (broken / "flexc_adaptive.json").write_text('{"format": 1, "rule": "adjacent", "target": "table", "budgets": '
                                                '[{"keep": 0.5, "layers": []}]}')
    with pytest.raises(ArtifactError, match="flexc_adaptive.json: budget 0.5: expected one rule per MoE layer"):
        flexc.load(broken)
    (broken / "flexc_adaptive.json").unlink()
    with pytest.raises(ArtifactError, match="flexc_adaptive.json is missing"):
        flexc.load(broken)

    with pytest.raises(BudgetError, match="needs a budget"):
        flexc.load(adaptive_compile / "nested", adaptive=True)
    with pytest.raises(ValueError, match="applies to nested artifacts"):
        flexc.load(adaptive_compile / "sliced", budget=0.5, adaptive=True)


def test_the_policy_survives_a_saved_state(tmp_path):
    from flexc.ir.state import CompileState

    policy = AdaptivePolicy("extreme", "budget", {0.5: [LayerRule(0.25, 1.0, 0.25), LayerRule(math.inf, 0.25, 0.25)]},
                            {"budgets": {"0.5": {"target_keep": 0.5}}}).to_dict()
    CompileState(adaptive_policy=policy).save(tmp_path)
    back = CompileState.load(tmp_path).adaptive_policy
    assert back == json.loads(json.dumps(policy))
    assert AdaptivePolicy.from_dict(back, _tables(), "state").budgets[0.5][1].threshold == math.inf


def test_compare_shows_each_method_with_its_adaptive_policy_at_its_realised_keep(tiny_model_dir, tmp_path):
    from flexc.compiler.compare import compare
    from flexc.compiler.spec import Spec
    from flexc.passes.methods import parse_methods

    data = {"builtin": "python-stdlib", "seq_len": 128, "batch_size": 8}
    spec = Spec.model_validate({
        "model": {"path": str(tiny_model_dir)},
        "data": {"calibration": {**data, "split": "train", "num_samples": 32},
                 "evaluation": {**data, "split": "heldout", "num_samples": 16}},
        "budgets": {"keep": [0.75, 0.5]}, "pipeline": [], "export": {"dir": str(tmp_path / "run")}})
    plain = compare(spec, parse_methods("coverage", spec), tmp_path / "plain", quiet=True)
    result = compare(spec, parse_methods("coverage,expert_prune", spec), tmp_path / "cmp", quiet=True, adaptive=True)
    rows = {(r["method"], r["keep_target"]): r for r in result["results"]}
    for r in plain["results"]:  # the static rows are unchanged by the adaptive ones beside them
        assert rows[(r["method"], r["keep_target"])]["ppl"] == pytest.approx(r["ppl"], rel=1e-6)
    for b in (0.75, 0.5):
        row = rows[("coverage+adaptive", b)]
        assert row["keep"] == pytest.approx(rows[("coverage", b)]["keep"])
        assert 0 < row["active_keep"] <= 1 and 0 < row["static_active_keep"] <= 1
    assert ("expert_prune+adaptive", 0.5) not in rows
    assert "re-routes tokens" in result["not_run"]["expert_prune+adaptive"]
    assert "coverage+adaptive keep 0.5" in (tmp_path / "cmp" / "compare.md").read_text()


def test_flexc_eval_scores_each_budget_on_its_policy_with_the_realised_keep(adaptive_compile, tmp_path, capsys):
    from flexc.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", str(adaptive_compile / "nested"), "--adaptive", "--samples", "4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["perplexity"]
    adaptive = {r["budget"]: r for r in rows if r.get("adaptive")}
    static = {r["budget"]: r for r in rows if not r.get("adaptive")}
    assert set(adaptive) == {0.75, 0.5, 0.3} and set(static) == {1.0, 0.75, 0.5, 0.3}
    assert all(0 < r["active_keep"] <= 1 for r in adaptive.values())
    assert adaptive[0.5]["loss"] != static[0.5]["loss"]
    assert main(["eval", str(adaptive_compile / "sliced"), "--adaptive", "--samples", "4"]) == 2
    assert "--adaptive applies to nested artifacts" in capsys.readouterr().err
