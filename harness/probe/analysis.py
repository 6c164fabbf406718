"""One model stage's probe measurements, computed once and cached in the stage store.

The key hashes the model stage's key, the probe params (not the reported ``layers``: all are measured),
the probe data's fingerprint, the seed, the prompt format and the library versions, like every stage key;
a weight-change entry hashes the two stage keys it compares.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from typing import Any, Callable

import numpy as np

from harness.files.hashing import stable_hash
from harness.models.loading import LoadedModel
from harness.probe.data import ProbeData
from harness.probe.features import answer_batches, pooled_hidden, prompt_batches
from harness.probe.lens import lens_logprobs
from harness.probe.linear import layer_accuracies
from harness.probe.noise import mmd_to_noise
from harness.probe.params import ProbeParams
from harness.run.store import StageStore

RESULT = "probe.json"
VERSION = 1  # of these measurements: bump when a change alters a number


def _versions(keyed: dict[str, str]) -> dict[str, str]:
    return {**keyed, "scikit-learn": importlib.metadata.version("scikit-learn"), "probe": str(VERSION)}


def analysis_key(model_key: str, params: ProbeParams, data: ProbeData, seed: int, prompt_format: str,
                 versions: dict[str, str]) -> str:
    measured = params.model_dump(mode="json", exclude={"layers"})
    return stable_hash({"stage": "probe", "model": model_key, "params": measured, "data": data.fingerprint,
                        "seed": seed, "prompt_format": prompt_format, "versions": _versions(versions)})


def weights_key(after: str, before: str, versions: dict[str, str]) -> str:
    return stable_hash({"stage": "probe-weights", "after": after, "before": before, "versions": _versions(versions)})


def probe_seeds(params: ProbeParams, seed: int) -> list[int]:
    return [seed + i for i in range(params.seeds)]


def measure(loaded: LoadedModel, params: ProbeParams, data: ProbeData, seed: int, fmt: str) -> dict[str, Any]:
    """Linear-probe accuracies, logit lens and MMD to noise of one model, every layer."""
    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    size = (tokenizer, fmt, params.max_length, params.batch_size, device)
    started = time.perf_counter()
    prompts = [*data.harmful, *data.harmless]
    labels = np.array([1] * len(data.harmful) + [0] * len(data.harmless))
    features = pooled_hidden(model, prompt_batches(size[0], prompts, *size[1:]))
    seeds = probe_seeds(params, seed)
    accuracy = layer_accuracies(features, labels, params.test_fraction, seeds)
    harmful = [(p.prompt, p.harmful) for p in data.pairs]
    harmless = [(p.prompt, p.harmless) for p in data.pairs]
    lens = {"harmful": lens_logprobs(model, answer_batches(size[0], harmful, *size[1:])),
            "harmless": lens_logprobs(model, answer_batches(size[0], harmless, *size[1:]))}
    noise = mmd_to_noise(model, answer_batches(size[0], harmful, *size[1:]), seeds)
    return {"num_layers": len(features) - 1, "accuracy_per_seed": accuracy, "seeds": seeds, "lens": lens,
            "mmd_noise_per_seed": noise, "wall_seconds": round(time.perf_counter() - started, 2)}


def cached(store: StageStore, key: str, meta: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The stored result under ``key``, or ``compute()`` stored there first (atomically, as every stage)."""
    with store.claim(key):
        if not store.has(key):
            value = compute()
            with store.write(key, meta) as scratch:
                (scratch / RESULT).write_text(json.dumps(value), encoding="utf-8")
            return {**value, "cached": False}
    return {**json.loads((store.path(key) / RESULT).read_text(encoding="utf-8")), "cached": True}

