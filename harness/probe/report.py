"""``harness probe`` end to end: stages → cached measurements → probe.json beside the run, with the tests.

The tests are the paper's question: does the defence lower linear-probe accuracy (defended vs base, one-sided
"less"), and does the attack bring it back (attacked vs defended, "greater")? Per-layer accuracies (means
over seeds) are paired by layer; the p-value is a sign-flip permutation test of the mean difference.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from harness.errors import HarnessError
from harness.files.atomic import write_json
from harness.models.activations import decoder_parts
from harness.probe.analysis import analysis_key, cached, measure, weights_key
from harness.probe.data import select_probe_data
from harness.probe.linear import check_split, paired_permutation_p, summarise
from harness.probe.params import ProbeParams
from harness.probe.stages import open_run
from harness.probe.weights import snapshot, weight_change
from harness.results.stats import t_interval
from harness.run.pipeline import _keyed_versions

OUTPUT = "probe.json"
WEIGHT_PAIRS = (("defended", "base"), ("attacked", "defended"), ("attacked", "base"), ("undefended-attacked", "base"))
TESTS = (("defended", "base", "less", "the defence lowers probe accuracy"),
         ("attacked", "defended", "greater", "the attack brings probe accuracy back"))


def check_layers(layers: list[int] | None, num_layers: int) -> list[int]:
    """The reported hidden-state indices; out-of-range ones are an error naming the valid range."""
    if layers is None:
        return list(range(num_layers + 1))
    bad = [i for i in layers if not 0 <= i <= num_layers]
    if bad:
        raise HarnessError(f"Layer index {bad[0]} is out of range: this model has {num_layers} decoder layers, so "
                           f"indices run from 0 (the embeddings) to {num_layers} (the last layer's output). "
                           "Fix --layers.")
    return layers


def _pick(values: list[Any], layers: list[int]) -> list[Any]:
    return [values[i] for i in layers]


def stage_block(analysis: dict[str, Any], layers: list[int], key: str, model_key: str) -> dict[str, Any]:
    accuracy = summarise([analysis["accuracy_per_seed"][i] for i in layers])
    noise_rows = [None] + [t_interval(list(col)) for col in zip(*analysis["mmd_noise_per_seed"])]  # 0: no MLP
    harmful, harmless = analysis["lens"]["harmful"], analysis["lens"]["harmless"]
    return {
        "model_key": model_key, "probe_key": key, "cached": analysis["cached"],
        "wall_seconds": analysis["wall_seconds"],
        "probe_accuracy": {**accuracy, "per_seed": [analysis["accuracy_per_seed"][i] for i in layers],
                           "seeds": analysis["seeds"], "interval": "Student-t 95% over seeds"},
        "lens_logprob": {"harmful": _pick(harmful, layers), "harmless": _pick(harmless, layers),
                         "harmful_minus_harmless": [harmful[i] - harmless[i] for i in layers]},
        "mmd_noise": {"mean": [None if r is None else r[0] for r in _pick(noise_rows, layers)],
                      "low": [None if r is None else r[1] for r in _pick(noise_rows, layers)],
                      "high": [None if r is None else r[2] for r in _pick(noise_rows, layers)]},
    }


def tests(stages: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for after, before, alternative, claim in TESTS:
        if after in stages and before in stages:
            a, b = stages[after]["probe_accuracy"]["mean"], stages[before]["probe_accuracy"]["mean"]
            out.append({"claim": claim, "after": after, "before": before, "alternative": alternative,
                        "mean_difference": sum(x - y for x, y in zip(a, b)) / len(a),
                        "p_value": paired_permutation_p(b, a, alternative),
                        "method": "sign-flip permutation test over layers, paired by layer, one-sided"})
    return out


def probe_run(run_dir: Path, params: ProbeParams, labels: tuple[str, ...], cache_dir: Path | None = None,
              console: Console | None = None) -> tuple[dict[str, Any], Path]:
    """Measure ``labels`` of the run in ``run_dir`` (cached), write probe.json beside it, return both."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    run = open_run(Path(run_dir), labels, cache_dir, console)
    seed, fmt = run.config.seed, run.config.data.prompt_format
    data = select_probe_data(run.pipeline.data, run.results["config"], params, seed)
    check_split(np.array([1] * len(data.harmful) + [0] * len(data.harmless)), params.test_fraction)  # before work
    versions = _keyed_versions(run.pipeline.versions)
    store = run.pipeline.store
    keys = {label: analysis_key(run.keys[label], params, data, seed, fmt, versions) for label in labels}
    pairs = [(a, b) for a, b in WEIGHT_PAIRS if a in labels and b in labels]
    pair_keys = {pair: weights_key(run.keys[pair[0]], run.keys[pair[1]], versions) for pair in pairs}
    need_weights = {label for pair in pairs if not store.has(pair_keys[pair]) for label in pair}
    analyses: dict[str, dict[str, Any]] = {}
    snapshots = {}
    for label in labels:
        meta = {"kind": "probe", "plugin": "probe", "parent": run.keys[label], "params": params.model_dump(mode="json")}
        if store.has(keys[label]) and label not in need_weights:
            analyses[label] = cached(store, keys[label], meta, lambda: {})
            continue
        loaded = run.load(label)
        check_layers(params.layers, decoder_parts(loaded.model).num_layers)  # before any measurement
        console.print(f"[bold]→ probe[/] {label}")
        analyses[label] = cached(store, keys[label], meta, lambda: measure(loaded, params, data, seed, fmt))
        if label in need_weights:
            snapshots[label] = snapshot(loaded.model)
    num_layers = analyses[labels[0]]["num_layers"]
    layers = check_layers(params.layers, num_layers)
    changes = {}
    for (after, before), key in pair_keys.items():
        meta = {"kind": "probe-weights", "plugin": "probe", "parent": run.keys[after], "before": run.keys[before]}
        value = cached(store, key, meta, lambda: weight_change(snapshots[after], snapshots[before]))
        changes[f"{after} vs {before}"] = {"absolute": _pick(value["absolute"], layers),
                                           "relative": _pick(value["relative"], layers), "key": key}
    stages = {label: stage_block(analyses[label], layers, keys[label], run.keys[label]) for label in labels}
    report = {
        "kind": "harness-probe", "version": 1, "run_name": run.results.get("run_name"),
        "model": run.config.model.ref, "defence": run.config.defence.name, "attack": run.config.attack.name,
        "seed": seed, "prompt_format": fmt, "params": params.model_dump(mode="json"), "data": data.summary(),
        "layers": layers, "layer_note": "0 = embeddings; j = output of decoder layer j (weights: layer j's)",
        "chance_accuracy": 0.5, "stages": stages, "weight_change": changes, "tests": tests(stages),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = Path(run_dir) / OUTPUT
    write_json(path, report)
    return report, path
