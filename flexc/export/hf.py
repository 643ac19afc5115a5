"""The ``hf`` export: the compiled weights as a plain Hugging Face checkpoint.

``<out>/hf/`` is what ``save_pretrained`` writes for the model after the pipeline (channel
ranking, recovery merges, …) plus the tokenizer: the original architecture at full width,
loadable with ``AutoModelForCausalLM`` and no flexc. Budgets are not in it: the ``nested``
export carries every budget, ``sliced`` one checkpoint per budget.
"""

from __future__ import annotations

from flexc.export.context import ExportContext


def export_hf(ctx: ExportContext) -> None:
    if ctx.state.removes_experts():
        raise ValueError("the hf export writes the full-width model, but this pipeline removed whole experts "
                         "(expert_prune) through router masks that a plain checkpoint cannot express; "
                         "drop hf from export.formats")
    ctx.model.save_pretrained(ctx.target)
    if ctx.tokenizer is not None:
        ctx.tokenizer.save_pretrained(ctx.target)
    else:
        ctx.logger.warning("hf: the model has no tokenizer; the checkpoint holds the weights and config only")
    ctx.logger.info("hf: full-width checkpoint (%s parameters)%s", f"{sum(p.numel() for p in ctx.model.parameters()):,}",
                    "; budgets are in the nested/sliced exports" if ctx.state.width_tables is not None else "")
