"""Evaluators and judges. Importing this package registers them."""

from evaluators import harmfulness, judges  # noqa: F401
from evaluators import capability, perplexity, trainability  # noqa: F401
