"""Nested and sliced artifacts of small models for the serving tests (built in seconds, no compile).

The width tables are random but nested (each budget's widths at most the previous budget's),
rounded to 16-channel granules, with some experts removed at the lowest budget: what a compile
produces, without the minutes a compile takes.
"""

from __future__ import annotations

from pathlib import Path

import torch

BUDGETS = (0.75, 0.4)
GRANULE = 16
ADAPTIVE = "adaptive"  # the nested artifact's token-adaptive policy at BUDGETS[1]


def adaptive_policy(groups, top_k: int) -> dict:
    """At the lower budget: in the first MoE layer the scores rule (synthetic channel scores falling along each
    expert's channels), in the others a threshold of 1/top_k (the mean of renormalised weights) between the upper
    budget's widths and the lower one's; the upper budget runs its own table."""
    import math

    from flexc.ir.adaptive import AdaptivePolicy, ChannelScores, LayerRule

    upper, lower = BUDGETS
    experts = max(g.num_experts for g in groups)
    channels = ChannelScores(GRANULE, [torch.full((experts,), 1.0 / top_k) for _ in groups],
                             [torch.linspace(1.0, 0.05, g.intermediate_size // GRANULE).expand(experts, -1)
                              for g in groups])
    rules = [LayerRule(scale=0.5)] + [LayerRule(1.0 / top_k, upper, lower)] * (len(groups) - 1)
    return AdaptivePolicy("auto", "table", {upper: [LayerRule(math.inf, upper, upper)] * len(groups),
                                            lower: rules}, channels=channels).to_dict()


def random_tables(groups, budgets=BUDGETS, seed: int = 0):
    from flexc.ir.tables import WidthTables

    gen = torch.Generator().manual_seed(seed)
    num_experts = max(g.num_experts for g in groups)
    tables = torch.zeros(len(budgets), len(groups), num_experts, dtype=torch.int32)
    for i, g in enumerate(groups):
        previous = torch.full((g.num_experts,), g.intermediate_size)
        for b, keep in enumerate(budgets):
            noise = torch.rand(g.num_experts, generator=gen) * 0.6 - 0.3
            want = ((keep + noise).clamp(0, 1) * g.intermediate_size / GRANULE).round() * GRANULE
            row = torch.minimum(want.to(torch.int64), previous)
            tables[b, i, : g.num_experts] = row
            previous = row
    return WidthTables(budgets=list(budgets), tables=tables, metric="params", layers=[g.layer for g in groups],
                       full=[g.intermediate_size for g in groups])


def write_artifacts(model, tokenizer, out: Path, seed: int = 0) -> dict[str, Path]:
    """``out/nested`` and ``out/sliced/keep_*`` of ``model`` with random nested width tables."""
    from flexc.export.nested import write_nested
    from flexc.export.sliced import write_sliced
    from flexc.ir.families import detect_family
    from flexc.ir.groups import find_expert_groups
    from flexc.ir.tables import budget_key

    groups = find_expert_groups(model, detect_family(model.config))
    tables = random_tables(groups, seed=seed)
    paths = {"nested": out / "nested"}
    write_nested(paths["nested"], model, groups, tables, tokenizer=tokenizer,
                 adaptive_policy=adaptive_policy(groups, int(model.config.num_experts_per_tok)))
    for budget in tables.budgets:
        target = out / "sliced" / budget_key(budget)
        write_sliced(target, model, groups, tables.table(budget), budget=budget, tokenizer=tokenizer)
        paths[budget_key(budget)] = target
    return paths


def source_model(name: str):
    """(model, tokenizer) of a serving test model: ``tiny`` (Qwen3-MoE), ``mixtral-tiny`` (zoo,
    trained) or ``qwen2-moe`` (random, with a shared expert; the zoo ``tiny`` tokenizer)."""
    import flexc.zoo
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "qwen2-moe":
        from flexc.ir.testing import tiny_model

        tokenizer = AutoTokenizer.from_pretrained(flexc.zoo.resolve("tiny", progress=False))
        model = tiny_model("qwen2_moe", vocab_size=2048, hidden_size=128, moe_intermediate_size=64,
                           shared_expert_intermediate_size=96, max_position_embeddings=512)
        return model, tokenizer
    directory = flexc.zoo.resolve(name, progress=False)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory)
