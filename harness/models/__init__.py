"""Models: loading and fingerprints, activations and hooks, generation backends (HF, vLLM)."""
