"""Benchmark harness for defences against harmful fine-tuning of LLMs."""

__version__ = "0.1.0"
