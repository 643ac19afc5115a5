"""Evaluation: held-out perplexity of base models, budgets of a compile, and method comparisons."""

from flexc.eval.budgets import apply_budget
from flexc.eval.perplexity import EvalResult, GraphLM, check_no_leak, evaluate, evaluation_stream

__all__ = ["EvalResult", "GraphLM", "apply_budget", "check_no_leak", "evaluate", "evaluation_stream"]
