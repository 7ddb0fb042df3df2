"""Measuring a model: greedy answers, the refusal judges, the refusal benchmark per language, KL against
the base model, lm-eval capability, results.json and the before/after report.
"""
