"""Modeling code that exports ship next to their weights (self-contained: torch and transformers only)."""
