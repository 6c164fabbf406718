"""Evaluators and judges. Importing this package registers them."""

from evaluators import capability, harmfulness, judges, over_refusal, perplexity, trainability  # noqa: F401  # noqa: F401
