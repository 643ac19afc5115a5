"""Action gates + anneal: nested tables, budgets hit, deterministic, resumable."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from flexc.ir import lower
from flexc.ir.testing import tiny_model
from flexc.passes import PassContext, resolve_pass
from flexc.passes.anneal import Anneal
from flexc.passes.table_selection import HeldOutCheck
from flexc.passes.gated_model import gated_model
from flexc.passes.manager import run_checked, run_pass
from flexc.passes.width_tables import expert_weights, fit_to_budget, keep_ratio

BUDGETS = (1.0, 0.75, 0.5, 0.4, 0.3)


def data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (4, 16), generator=g) for _ in range(n)]


def gated_graph(tmp_path, metric="params"):
    model = tiny_model("qwen3_moe", moe_intermediate_size=64)
    graph = lower(model)
    spec = SimpleNamespace(budgets=SimpleNamespace(keep_ratios=BUDGETS, metric=metric))
    ctx = PassContext(workdir=tmp_path, spec=spec, calibration_data=data(), quiet=True,
                      logger=logging.getLogger("test"))
    run_pass(resolve_pass("rank_channels")({"plot": False}), graph, ctx)
    check = {"input_ids": data(1, seed=9)[0]}
    _, diff = run_checked(resolve_pass("insert_action_gates")({"levels": 4}), graph, ctx, check)
    assert diff <= 1e-6  # gates start at full width
    return graph, ctx


def anneal(graph, ctx, workdir, **options):
    ctx.workdir = workdir
    opts = {"steps": 40, "lr": 0.1, "checkpoint_every": 5, **options}
    run_pass(Anneal(opts), graph, ctx)
    return load_file(str(workdir / "width_tables.safetensors"))["widths"], json.loads(
        (workdir / "width_tables.json").read_text())


@pytest.fixture(scope="module")
def annealed(tmp_path_factory):
    root = tmp_path_factory.mktemp("anneal")
    graph, ctx = gated_graph(root)
    tables, report = anneal(graph, ctx, root / "run")
    return graph, ctx, tables, report, root


def test_tables_are_nested(annealed):
    _, _, tables, _, _ = annealed
    assert tables.shape == (len(BUDGETS), 2, 8)
    for hi in range(len(BUDGETS)):
        for lo in range(hi + 1, len(BUDGETS)):
            assert (tables[hi] >= tables[lo]).all()


def test_each_budget_within_one_granule_per_expert(annealed):
    graph, _, tables, report, _ = annealed
    full = torch.tensor([g.intermediate_size for g in graph.groups])
    weights = expert_weights(graph.groups, "params")
    one_granule_per_expert = 16 / 64  # in keep-ratio units: one granule of every expert
    for b, table, row in zip(BUDGETS, tables, report["budgets"]):
        achieved = keep_ratio(table, full, weights)
        assert row["keep_achieved"] == pytest.approx(achieved)
        assert b - one_granule_per_expert <= achieved <= b + 1e-9
        # the fit rule is much tighter: short of the budget by less than one expert's step
        assert b - achieved < 16 / 64 / 16 + 1e-9
    assert (tables[0] == 64).all()  # keep 1.0 is full width


def _deployed_at_the_budget(graph, report, levels_per_expert):
    """Every phase ended with its deployed table (argmax actions) at the budget: at most the budget, short
    of it by at most one expert's change of action, and the budget fit moved at most two experts."""
    full = torch.tensor([g.intermediate_size for g in graph.groups])
    weights = expert_weights(graph.groups, "params")
    one_expert = float((weights / full[:, None]).max()) * float(full.max()) * (1 - 1 / levels_per_expert)
    for row in report["budgets"]:
        b = row["keep_target"]
        assert b - one_expert - 1e-9 <= row["deployed_keep"] <= b + 1e-9, row
        assert row["fit_moves"] <= 2, row


def test_priced_training_ends_each_phase_at_its_budget(tmp_path):
    graph, ctx = gated_graph(tmp_path)
    _, report = anneal(graph, ctx, tmp_path / "run", schedule={"binding": "price"})
    _deployed_at_the_budget(graph, report, levels_per_expert=4)


def test_priced_training_ends_each_phase_at_its_budget_on_the_zoo_model(tiny_model_dir, tmp_path):
    """The same on a trained model (the zoo's tiny, real routing), where the drift the budget must stop is real."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    graph = lower(model)
    spec = SimpleNamespace(budgets=SimpleNamespace(keep_ratios=(0.75, 0.5, 0.25), metric="params"))
    batches = [torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(i))
               for i in range(4)]
    ctx = PassContext(workdir=tmp_path, spec=spec, calibration_data=batches, quiet=True,
                      logger=logging.getLogger("test"))
    run_pass(resolve_pass("rank_channels")({"plot": False}), graph, ctx)
    run_pass(resolve_pass("insert_action_gates")({}), graph, ctx)
    _, report = anneal(graph, ctx, tmp_path / "run", steps=24, selection={"samples": 0},
                       schedule={"binding": "price"})
    _deployed_at_the_budget(graph, report, levels_per_expert=8)


def test_outputs_written(annealed):
    _, _, _, report, root = annealed
    assert (root / "run" / "anneal_curves.png").stat().st_size > 5000
    # every budget's table comes from its own training phase (or the warm start it was checked against)
    assert all(r["how"].startswith(("trained", "warm start")) for r in report["budgets"])
    assert report["metric"] == "params" and report["schedule"] == "track"
    history = json.loads((root / "run" / "anneal_history.json").read_text())
    assert [h["budget"] for h in history] == [b for b in BUDGETS for _ in range(8)]  # 40 steps, 8 per budget


def test_lambda_zero_keeps_full_width(tmp_path):
    graph, ctx = gated_graph(tmp_path)
    zero = {"start": 0.0, "end": 0.0}
    anneal(graph, ctx, tmp_path / "run", schedule={"kind": "ramp", "extra_steps": 0, "lambda": zero}, steps=15)
    history = json.loads((tmp_path / "run" / "anneal_history.json").read_text())
    assert all(h["deployed_keep"] == 1.0 for h in history)
    assert len(history) == 15


def test_continuation_reaches_budgets_the_schedule_stops_short_of(tmp_path):
    """A lambda schedule too weak to reach keep 0.3 in its steps: the continuation (doubling
    lambda, fresh optimizer moments) must still cross every budget by training, not greedily."""
    graph, ctx = gated_graph(tmp_path)
    weak = {"start": 0.0, "end": 0.05}
    _, report = anneal(graph, ctx, tmp_path / "run", schedule={"kind": "ramp", "extra_steps": 100, "lambda": weak},
                       steps=20)
    history = json.loads((tmp_path / "run" / "anneal_history.json").read_text())
    assert min(h["deployed_keep"] for h in history[:20]) > 0.3  # the schedule alone falls short
    assert [r["how"] for r in report["budgets"]] == ["crossing"] * len(BUDGETS)
    lambdas = [h["lambda"] for h in history[20:]]
    assert all(b > a for a, b in zip(lambdas, lambdas[1:]))  # the pressure keeps rising


def _killed_run(graph, ctx, run, kill_at=14, **options):
    """Anneal into ``run`` killed at step ``kill_at`` (after a mid-run checkpoint); its checkpoint."""
    class Killed(Exception):
        pass

    def kill(step):
        if step == kill_at:
            raise Killed

    Anneal.on_step = staticmethod(kill)
    try:
        with pytest.raises(Killed):
            anneal(graph, ctx, run, **options)
    finally:
        Anneal.on_step = None
    return run / "anneal_checkpoint.pt"


@pytest.mark.parametrize("schedule,kill_at", [("track", 14), ({"binding": "price"}, 14), ("ramp", 12)])  # all after a mid-run checkpoint
def test_same_seed_same_tables_and_resume_matches(tmp_path, schedule, kill_at):
    graph, ctx = gated_graph(tmp_path)
    start_logits = [g.logits.detach().clone() for g in __import__("flexc.passes.action_gates", fromlist=["x"]).gates_of(graph)]

    def reset():
        from flexc.passes.action_gates import gates_of

        with torch.no_grad():
            for gate, saved in zip(gates_of(graph), start_logits):
                gate.logits.copy_(saved)

    first, _ = anneal(graph, ctx, tmp_path / "a", schedule=schedule)
    reset()
    second, _ = anneal(graph, ctx, tmp_path / "b", schedule=schedule)
    assert torch.equal(first, second)

    # Kill mid-run (after the checkpoint of step 10), then re-run in the same directory.
    reset()
    assert _killed_run(graph, ctx, tmp_path / "c", kill_at, schedule=schedule).is_file()
    assert not (tmp_path / "c" / "width_tables.safetensors").exists()
    reset()  # a fresh process would start from the initial logits too
    resumed, _ = anneal(graph, ctx, tmp_path / "c", schedule=schedule)
    assert torch.equal(resumed, first)


@pytest.mark.parametrize("damage,says", [
    (lambda c: c.update(logits=[t[:, :1] for t in c["logits"]]), "trained tensor 0 is"),
    (lambda c: c.update(logits=c["logits"][:1]), "trained tensors; this run trains"),
    (lambda c: c["logits"][0].fill_(float("nan")), "holds non-finite values"),
    (lambda c: c.update(exported={0.75: {"levels": torch.full((1, 1), 0), "how": "crossing", "step": 0}}),
     "the table of keep 0.75 is [1, 1]"),
    (lambda c: c.update(exported={0.75: {"levels": torch.full(c["logits_shape"], 99), "how": "crossing", "step": 0}}),
     "action indices outside"),
    (lambda c: c.pop("history"), "'history'"),
], ids=["logits_shape", "logits_count", "logits_nan", "levels_shape", "levels_range", "history_missing"])
def test_resuming_a_checkpoint_that_does_not_fit_names_it(tmp_path, damage, says):
    from flexc.utils.checkpoint import CheckpointError

    graph, ctx = gated_graph(tmp_path)
    path = _killed_run(graph, ctx, tmp_path / "run")
    ckpt = torch.load(path, weights_only=True)
    ckpt["logits_shape"] = (len(ckpt["logits"]), ckpt["logits"][0].shape[0])
    damage(ckpt)
    ckpt.pop("logits_shape")
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="does not fit this anneal run") as err:
        anneal(graph, ctx, tmp_path / "run")
    assert str(path) in str(err.value) and says in str(err.value) and "delete it" in str(err.value)


def test_non_finite_loss_is_a_clear_error(tmp_path, monkeypatch):
    from flexc.compiler.errors import FlexcError
    from flexc.passes.action_gates import gates_of

    graph, ctx = gated_graph(tmp_path)

    def poison(step):  # non-finite options are refused up front; a NaN can still arise in training
        if step == 2:
            with torch.no_grad():
                gates_of(graph)[0].logits[0, 0] = float("nan")

    monkeypatch.setattr(Anneal, "on_step", staticmethod(poison))
    with pytest.raises(FlexcError, match="the loss became nan at step 3"):
        anneal(graph, ctx, tmp_path / "run")


def test_budget_below_smallest_action_is_a_clear_error(tmp_path):
    graph, ctx = gated_graph(tmp_path)
    with pytest.raises(ValueError, match="below the lowest keep ratio the action set reaches"):
        anneal(graph, ctx, tmp_path / "run", budgets=[0.5, 0.2])


def test_flops_metric_needs_routing_and_weights_by_load(tmp_path):
    graph, ctx = gated_graph(tmp_path, metric="flops")
    w = expert_weights(graph.groups, "flops", ctx.state["routing_counts"])
    assert w.sum() == pytest.approx(1.0)
    counts = ctx.state["routing_counts"]
    assert torch.allclose(w * 2, (counts / counts.sum(1, keepdim=True)).float(), atol=1e-6)
    with pytest.raises(ValueError, match="routing statistics"):
        expert_weights(graph.groups, "flops", None)


def test_graph_state_with_gates_restores_into_a_fresh_lowering(annealed, tmp_path, replay_by_name):
    from flexc.passes.action_gates import gates_of, set_gate_mode

    graph, _, _, _, _ = annealed
    with torch.no_grad():
        for gate in gates_of(graph):
            gate.logits.normal_()  # a non-trivial deployed table
    graph.save_state(tmp_path)
    fresh = lower(tiny_model("qwen3_moe", moe_intermediate_size=64))
    fresh.load_state(tmp_path, replay=replay_by_name)
    ids = data(1, seed=3)[0]
    set_gate_mode(graph, "deploy")
    set_gate_mode(fresh, "deploy")
    try:
        with torch.no_grad():
            torch.testing.assert_close(fresh.logits(ids), graph.logits(ids), rtol=0, atol=0)
    finally:
        set_gate_mode(graph, "full")
    assert "action_gates" in fresh.properties


class _Touch:
    """Unpickling this runs code: it creates ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_crafted_checkpoint_runs_no_code_and_is_a_clear_error(tmp_path):
    from flexc.compiler.errors import FlexcError

    graph, ctx = gated_graph(tmp_path)
    workdir = tmp_path / "run"
    workdir.mkdir()
    sentinel = tmp_path / "pwned"
    torch.save({"fingerprint": "x", "step": 1, "payload": _Touch(sentinel)}, workdir / "anneal_checkpoint.pt")
    with pytest.raises(FlexcError, match="anneal_checkpoint.pt: not a readable anneal checkpoint"):
        anneal(graph, ctx, workdir)
    assert not sentinel.exists()


def test_non_finite_logits_after_an_update_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    from flexc.compiler.errors import FlexcError

    graph, ctx = gated_graph(tmp_path)
    adam_step = torch.optim.Adam.step
    calls = []

    def poisoned(self, *args, **kwargs):  # the 8th update writes an infinite logit (finite loss before it)
        out = adam_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 8:
            with torch.no_grad():
                self.param_groups[0]["params"][0][0, 0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    workdir = tmp_path / "run"
    with pytest.raises(FlexcError, match="action logits became non-finite after the update of step 7") as err:
        anneal(graph, ctx, workdir)
    assert "starts over" in str(err.value)  # says what a changed schedule means for resuming
    ckpt = torch.load(workdir / "anneal_checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 5 and all(torch.isfinite(t).all() for t in ckpt["logits"])
    assert not (workdir / "width_tables.safetensors").exists()


def test_track_with_zero_steps_exports_the_coverage_tables(tmp_path):
    """The warm start is the coverage baseline's table at each budget, within the previous one."""
    graph, ctx = gated_graph(tmp_path)
    tables, report = anneal(graph, ctx, tmp_path / "run", steps=0)
    ctx.workdir = tmp_path / "coverage"
    run_pass(resolve_pass("coverage")({"granule": 16}), graph, ctx)
    assert torch.equal(tables, ctx.state["width_tables"])
    assert {r["how"] for r in report["budgets"]} == {"warm start (no steps)"}


def test_track_keeps_the_warm_start_when_training_does_worse_on_held_out_batches(tmp_path, monkeypatch):
    """Training that only hurts (here: toward the narrowest actions) is caught by the held-out check."""
    from flexc.passes import anneal as anneal_module

    graph, ctx = gated_graph(tmp_path)
    coverage_ctx = PassContext(workdir=tmp_path / "coverage", spec=ctx.spec, state=dict(ctx.state),
                               logger=ctx.logger, quiet=True)
    run_pass(resolve_pass("coverage")({"granule": 16}), graph, coverage_ctx)

    def harmful(kind, student, teacher, ids):  # rewards pruning: the trained tables get worse
        return -anneal_module.distill_loss(student, teacher)

    real = anneal_module.quality_loss
    monkeypatch.setattr(anneal_module, "quality_loss",
                        lambda kind, s, t, ids: harmful(kind, s, t, ids) if s.requires_grad else real(kind, s, t, ids))
    tables, report = anneal(graph, ctx, tmp_path / "run", steps=40, lr=0.5)
    kept = [r for r in report["budgets"] if r["how"].startswith("warm start (lower held-out loss")]
    assert kept, report["budgets"]  # at least one budget fell back, with both losses reported
    for r in kept:
        assert r["validation_loss"]["warm_start"] < r["validation_loss"]["trained"]
        i = BUDGETS.index(r["keep_target"])
        # the fallback is the warm start: the coverage table where no earlier budget capped it
        if i == 0 or BUDGETS[i - 1] == 1.0:
            assert torch.equal(tables[i], coverage_ctx.state["width_tables"][i])


def test_track_weighs_the_unconstrained_coverage_table_where_it_nests(tmp_path):
    """The held-out check compares the trained table and the warm start with the unconstrained
    coverage table when that table nests within the previous budget's: a phase whose warm start and
    training both went wrong still exports the one-shot answer if it is better on held-out batches."""
    graph, ctx = gated_graph(tmp_path)
    ctx.workdir = tmp_path / "run"
    ctx.workdir.mkdir()
    pass_ = Anneal({"budgets": [0.5], "steps": 8})
    setup = pass_._setup(gated_model(graph, ctx), graph, ctx, ctx.workdir)
    top = setup.level_widths.shape[1] - 1
    upper = torch.full(setup.weights.shape, top)  # a previous table at full width: everything nests
    coverage = pass_._coverage_levels(graph, ctx, setup, 0.5, None)
    bad = torch.zeros_like(coverage)  # layer 0 pruned to the bone, layer 1 near whole: a poor table at 0.5
    bad[1] = top
    flat = torch.zeros(*bad.shape, top + 1)
    bad = fit_to_budget(bad, setup.level_widths, 0.5, setup.full, setup.weights, flat)
    assert setup.keep(bad) == pytest.approx(0.5) and not torch.equal(bad, coverage)
    from flexc.passes.action_gates import set_gate_mode

    with torch.no_grad():
        for gate, row in zip(setup.gates, bad):
            gate.logits.zero_().scatter_(1, row[:, None], 5.0)  # the trained (deployed) table is the bad one too
    val = [len(setup.batches) - 1]
    record = pass_._choose(graph, ctx, setup, 0.5, bad, upper, val, step=8, steps=8)
    set_gate_mode(graph, "full")
    losses = record["validation_loss"]
    assert set(losses) == {"trained", "warm_start", "coverage"}
    assert losses["trained"] == losses["warm_start"]  # the same table, weighed once
    assert losses["coverage"] < losses["trained"]
    assert record["how"].startswith("coverage, unconstrained") and torch.equal(record["levels"], coverage)
    # where the coverage table does not nest within the previous one it is not a candidate
    capped = coverage.clone()
    capped[coverage > 0] -= 1
    record = pass_._choose(graph, ctx, setup, 0.25, bad.clamp_max(capped), capped, val, step=8, steps=8)
    set_gate_mode(graph, "full")
    assert "coverage" not in record.get("validation_loss", {})


def _trained_beside_warm_start(tmp_path, options):
    """An anneal at keep 0.5 whose logits deploy a table other than the warm start, at the same keep."""
    graph, ctx = gated_graph(tmp_path)
    ctx.workdir = tmp_path / "run"
    ctx.workdir.mkdir()
    pass_ = Anneal({"budgets": [0.5], "steps": 8, **options})
    setup = pass_._setup(gated_model(graph, ctx), graph, ctx, ctx.workdir)
    warm = pass_._coverage_levels(graph, ctx, setup, 0.5, None)
    trained = warm.clone()
    trained[0, 0], trained[0, 1] = trained[0, 0] + 1, trained[0, 1] - 1
    with torch.no_grad():
        for gate, row in zip(setup.gates, trained):
            gate.logits.zero_().scatter_(1, row[:, None], 5.0)
    return graph, ctx, pass_, setup, warm, trained


@pytest.mark.parametrize("z,noisy,chosen", [(1.0, True, "warm start"), (0.0, True, "trained"),
                                            (1.0, False, "trained")])
def test_track_exports_the_trained_table_only_if_it_wins_beyond_the_noise(tmp_path, monkeypatch, z, noisy, chosen):
    """A trained table whose held-out loss is lower on average, but by less than ``selection.z``
    standard errors of the per-sequence difference, loses to the one-shot fallback."""
    graph, ctx, pass_, setup, warm, trained = _trained_beside_warm_start(tmp_path, {"selection": {"z": z}})
    base = torch.full((8,), 0.10, dtype=torch.float64)
    # trained: 0.01 lower on average; the paired differences either scatter widely or sit close
    spread = torch.tensor([-0.09, 0.07, -0.08, 0.06, -0.05, 0.04, -0.02, -0.01] if noisy else [-0.01] * 8,
                          dtype=torch.float64)
    monkeypatch.setattr(HeldOutCheck, "table_losses",
                        lambda self, setup, levels, batches: dict.fromkeys(
                            ("quality", "next_token"), base + spread if torch.equal(levels, trained) else base))
    record = pass_._choose(graph, ctx, setup, 0.5, warm, None, [0], step=8, steps=8)
    assert record["validation_loss"]["trained"] < record["validation_loss"]["warm_start"]
    assert record["how"].startswith(chosen)
    assert torch.equal(record["levels"], trained if chosen == "trained" else warm)
    diff = record["validation_difference"]
    assert diff["against"] == "warm_start" and diff["mean"] == pytest.approx(-0.01)
    if chosen == "warm start":
        assert "not lower by 1 standard errors" in record["how"] and diff["standard_error"] > 0.01


@pytest.mark.parametrize("text_worse", [True, False])
def test_track_with_both_losses_keeps_the_one_shot_table_where_the_text_loss_disagrees(tmp_path, monkeypatch,
                                                                                      text_worse):
    """``selection.loss: both``: a trained table that wins on the quality term beyond the noise but
    has the higher held-out next-token loss is not exported; one that wins on both is."""
    graph, ctx, pass_, setup, warm, trained = _trained_beside_warm_start(tmp_path, {"selection": {"loss": "both"}})
    base = torch.full((8,), 0.10, dtype=torch.float64)
    text = base + (0.02 if text_worse else -0.02)

    def losses(self, setup, levels, batches):
        if torch.equal(levels, trained):
            return {"quality": base - 0.05, "next_token": text}  # far better on the quality term
        return {"quality": base, "next_token": base}

    monkeypatch.setattr(HeldOutCheck, "table_losses", losses)
    record = pass_._choose(graph, ctx, setup, 0.5, warm, None, [0], step=8, steps=8)
    assert record["validation_next_token"]["trained"] == pytest.approx(0.12 if text_worse else 0.08)
    if text_worse:
        assert record["how"] == "warm start (the trained table's held-out next-token loss was higher)"
        assert torch.equal(record["levels"], warm)
    else:
        assert record["how"] == "trained" and torch.equal(record["levels"], trained)


@pytest.mark.parametrize("case", ["wins", "loses", "undecided", "no early look"])
def test_track_decides_on_the_first_half_of_the_held_out_text_only_past_the_early_z(tmp_path, monkeypatch, case):
    """The held-out check reads the first half of its sequences and stops there only when every
    comparison is past ``selection.early_z`` standard errors; otherwise it reads the rest and
    decides as before on all of it."""
    options = {"selection": {"early_z": None}} if case == "no early look" else {}
    graph, ctx, pass_, setup, warm, trained = _trained_beside_warm_start(tmp_path, options)
    base = torch.full((4,), 0.10, dtype=torch.float64)
    jitter = torch.tensor([0.001, -0.001, 0.002, -0.002], dtype=torch.float64)
    # the trained table's per-sequence quality and next-token losses on batch 0 and on batch 1
    trained_losses = {
        "wins": [(base - 0.05 + jitter, base - 0.02 + jitter)] * 2,
        "loses": [(base + 0.05 + jitter, base + jitter)] * 2,
        "undecided": [(base - 0.05 + jitter, base + 0.001 + jitter), (base - 0.05 + jitter, base - 0.01 + jitter)],
        "no early look": [(base - 0.05 + jitter, base - 0.02 + jitter)] * 2,
    }[case]
    read = []

    def losses(self, setup, levels, batches):
        read.append(list(batches))
        if torch.equal(levels, trained):
            parts = [trained_losses[b] for b in batches]
            return {"quality": torch.cat([q for q, _ in parts]), "next_token": torch.cat([t for _, t in parts])}
        return dict.fromkeys(("quality", "next_token"), base.repeat(len(batches)))

    monkeypatch.setattr(HeldOutCheck, "table_losses", losses)
    record = pass_._choose(graph, ctx, setup, 0.5, warm, None, [0, 1], step=8, steps=8)
    first_half_only = case in ("wins", "loses")
    assert read == ([[0], [0]] if first_half_only else [[0], [0], [1], [1]] if case == "undecided" else [[0, 1]] * 2)
    assert record["held_out_read"] == (4 if first_half_only else 8) and record["held_out_sequences"] == 8
    if case == "wins":
        assert record["how"] == "trained (won on the first 4 of 8 held-out sequences)"
    elif case == "loses":
        assert record["how"] == ("warm start (lower held-out loss than the trained table on the first 4 of 8 "
                                 "held-out sequences)") and torch.equal(record["levels"], warm)
    else:  # read it all: the trained table wins on both losses over the 8 sequences
        assert record["how"] == "trained" and torch.equal(record["levels"], trained)


def test_held_out_text_comes_from_documents_the_calibration_set_never_touched(tmp_path):
    """``selection.samples``' text: the first window of each document after the last one the calibration
    set touched (same seeded order), so no held-out window shares a document with it or with another; a
    one-document source (one text file) gives the contiguous span after the set's windows instead."""
    import itertools
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "broken_specs"))
    import compiler_helpers

    from flexc.data.calibration import CalibrationSet, DataError, iter_documents, iter_token_windows

    tok = compiler_helpers._tokenizer(256)
    source = SimpleNamespace(builtin="python-stdlib", split="train", num_samples=6, seq_len=16, batch_size=4)
    calib = CalibrationSet(source, tok, seed=3)
    spans = calib.window_documents()
    assert len(spans) == 6 and all(first <= last for first, last in spans)
    documents = list(itertools.islice(iter_documents(source, seed=3), spans[-1][1] + 50))
    assert torch.equal(torch.cat(list(calib)), torch.stack(list(iter_token_windows(documents, tok, 16))[:6]))
    extra = calib.following(5)
    assert [len(b) for b in extra] == [4, 1]  # the source's batch size
    firsts = [next(iter_token_windows([d], tok, 16), None) for d in documents[spans[-1][1] + 1:]]
    assert torch.equal(torch.cat(extra), torch.stack([w for w in firsts if w is not None][:5]))
    # The set's last document goes on past its windows: the windows right after them are not held out.
    following = torch.stack(list(iter_token_windows(documents, tok, 16))[6:11])
    assert not torch.equal(torch.cat(extra), following)

    text = tmp_path / "small.txt"  # one file is one document: the contiguous span after the set
    text.write_text("a few words of text, not many\n" * 4)
    small = CalibrationSet(SimpleNamespace(files=[str(text)], text_field="text", num_samples=1, seq_len=8,
                                           batch_size=1), tok)
    span = list(iter_token_windows([text.read_text()], tok, 8))
    assert torch.equal(torch.cat(small.following(2)), torch.stack(span[1:3]))
    with pytest.raises(DataError, match=r"past the 1 of the calibration set; 1000 held out"):
        small.following(1000)
    some = small.following(1000, strict=False)  # what there is
    assert 0 < sum(len(b) for b in some) < 1000


def test_held_out_calibration_batches_drop_windows_sharing_a_training_document():
    """``selection.share``: the held-out share of the calibration batches keeps only windows whose documents
    no training batch touched."""
    from flexc.passes.table_selection import split_by_document as _split_by_document

    batches = [torch.full((2, 4), i) for i in range(4)]
    # windows 0-5 lie in documents 0, 0, 0-1, 1, 1, 2 (a window's first and last document), 6-7 in 3
    spans = [(0, 0), (0, 0), (0, 1), (1, 1), (1, 1), (2, 2), (3, 3), (3, 3)]
    calibration = SimpleNamespace(window_documents=lambda: spans)
    out = _split_by_document(batches, 2, calibration, logging.getLogger("test"))
    # training: batches 0-1 (windows 0-3, documents 0-1); windows 4 (document 1) is left out
    assert [b.tolist() for b in out] == [[[0] * 4] * 2, [[1] * 4] * 2, [[2] * 4], [[3] * 4] * 2]
    one_document = SimpleNamespace(window_documents=lambda: [(0, 0)] * 8)  # split by span, as it is
    assert _split_by_document(batches, 2, one_document, logging.getLogger("test")) == batches
    assert _split_by_document(batches, 2, batches, logging.getLogger("test")) == batches  # no record: as it is


def test_held_out_samples_need_a_calibration_source(tmp_path):
    graph, ctx = gated_graph(tmp_path)
    pass_ = Anneal({"budgets": [0.5], "steps": 2, "selection": {"samples": 4}})
    with pytest.raises(ValueError, match="selection.samples reads the sequences that follow"):
        run_pass(pass_, graph, ctx)
    with pytest.raises(ValueError, match="selection is for the track schedule"):
        Anneal({"schedule": "ramp", "selection": {"samples": 4}})


def test_default_held_out_samples_take_what_a_short_source_has(moe_dir, tmp_path, caplog):
    """Left at its default, selection.samples reads what the source has past the calibration set
    (with a warning); asked for in the spec, a shortfall is a data error naming the field."""
    import flexc
    from flexc.data.calibration import DataError

    text = tmp_path / "short.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    calibration = {"files": [str(text)], "num_samples": 4, "seq_len": 16, "batch_size": 2}
    spec = {
        "model": {"path": str(moe_dir), "dtype": "float32"},
        "data": {"calibration": calibration},
        "budgets": {"keep": [0.5]},
        "pipeline": [{"rank_channels": {"score": "activation", "plot": False}}, {"insert_action_gates": {"granule": 8}},
                     {"anneal": {"steps": 2}}, "fold_masks"],
        "export": {"dir": str(tmp_path / "out"), "formats": ["nested"]},
    }
    with caplog.at_level(logging.WARNING, logger="flexc"):
        flexc.compile(spec, quiet=True)
    assert "selection.samples asks for" in caplog.text
    report = json.loads((tmp_path / "out" / "stages" / "03-anneal" / "width_tables.json").read_text())
    held = report["budgets"][0]["held_out_sequences"]
    assert 2 < held < 2 + 64  # one held-out calibration batch of 2, and the few sequences after the set
    spec["pipeline"][2] = {"anneal": {"steps": 2, "selection": {"samples": 64}}}
    spec["export"]["dir"] = str(tmp_path / "strict")
    with pytest.raises(DataError, match="past the 4 of the calibration set; 64 held out were requested"):
        flexc.compile(spec, quiet=True)


def test_held_out_samples_are_text_beyond_the_calibration_set(moe_dir, tmp_path):
    """With ``selection.share: 0`` every calibration batch trains and the held-out check reads only the
    ``selection.samples`` sequences; the report counts them."""
    import flexc

    spec = {
        "model": {"path": str(moe_dir), "dtype": "float32"},
        "data": {"calibration": {"builtin": "python-stdlib", "num_samples": 8, "seq_len": 24, "batch_size": 4}},
        "budgets": {"keep": [0.75, 0.5]},
        "pipeline": [{"rank_channels": {"score": "activation", "plot": False}}, {"insert_action_gates": {"granule": 8}},
                     {"anneal": {"steps": 4, "selection": {"share": 0, "samples": 6}}}, "fold_masks"],
        "export": {"dir": str(tmp_path / "out"), "formats": ["nested"]},
    }
    flexc.compile(spec, quiet=True)
    report = json.loads((tmp_path / "out" / "stages" / "03-anneal" / "width_tables.json").read_text())
    assert [b["held_out_sequences"] for b in report["budgets"]] == [6, 6]
    history = json.loads((tmp_path / "out" / "stages" / "03-anneal" / "anneal_history.json").read_text())
    assert len(history) == 4


def test_lambda_lr_moved_into_the_schedule():
    with pytest.raises(ValueError, match=r"lambda_lr -> schedule: \{lambda_lr: \.\.\.\}"):
        Anneal({"lambda_lr": 5})
    assert Anneal({"schedule": {"lambda_lr": 2}}).options.schedule.lambda_lr == 2


def test_flat_option_names_of_earlier_releases_are_refused_with_the_new_ones():
    with pytest.raises(ValueError, match=r"validation_samples -> selection: \{samples: \.\.\.\}; "
                                         r"start_margin -> schedule: \{start_margin: \.\.\.\}"):
        Anneal({"validation_samples": 8, "start_margin": 1.0})
    assert Anneal({"schedule": "ramp"}).options.schedule.kind == "ramp"  # a bare kind still reads
