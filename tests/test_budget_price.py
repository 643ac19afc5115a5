"""The budget's price (flexc.ir.tables): the deployed table at its price is at the budget, and the
sampled tables keep the budget in expectation at theirs."""

import pytest
import torch

from flexc.ir.tables import budget_price, expected_price


def _problem(seed: int, layers=3, experts=8, actions=8):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, experts, actions, generator=generator) * 2
    weights = torch.rand(layers, experts, generator=generator) + 0.1
    weights = weights / weights.sum()
    ratios = torch.arange(1, actions + 1) / actions
    return logits, weights[:, :, None] * ratios


def _keep(logits, cost, mu):
    return float(cost.gather(-1, (logits - mu * cost).argmax(-1, keepdim=True)).sum())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", [0.95, 0.75, 0.5, 0.3, 0.13])
def test_deployed_table_at_its_price_is_the_widest_within_the_budget(seed, target):
    logits, cost = _problem(seed)
    mu = budget_price(logits, cost, target)
    assert _keep(logits, cost, mu) <= target + 1e-6
    # Any cheaper price's table is over the budget: the price is the smallest that fits.
    assert _keep(logits, cost, mu - 1e-4 * max(abs(mu), 1.0)) > target
    # So the table is short of the budget by at most what the experts that change at mu change.
    before = (logits - (mu - 1e-4 * max(abs(mu), 1.0)) * cost).argmax(-1)
    after = (logits - mu * cost).argmax(-1)
    assert (before != after).sum() <= 2


def test_a_negative_price_pays_for_width_when_the_argmax_table_is_below_the_budget():
    logits, cost = _problem(0)
    logits[..., 0] += 10  # every expert prefers its narrowest action
    mu = budget_price(logits, cost, 0.9)
    assert mu < 0 and 0.9 - 1 / 8 < _keep(logits, cost, mu) <= 0.9 + 1e-6


def test_excluded_actions_stay_excluded():
    logits, cost = _problem(1)
    logits[:, :, 4:] = float("-inf")  # nesting: nothing above the previous budget's widths
    mu = budget_price(logits, cost, 0.45)  # more than the allowed actions can keep
    levels = (logits - mu * cost).argmax(-1)
    assert int(levels.max()) <= 3 and _keep(logits, cost, mu) <= 0.45


@pytest.mark.parametrize("target", [0.8, 0.5, 0.2])
def test_expected_keep_at_the_sampling_price_is_the_budget(target):
    logits, cost = _problem(2)
    mu = expected_price(logits, cost, target)
    expected = float((torch.softmax(logits - mu * cost, -1) * cost).sum())
    assert expected == pytest.approx(target, abs=1e-6)
