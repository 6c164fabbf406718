"""Choose the minilm-harm configuration by leave-one-source-out validation (evaluators/judges/loso.py).

Every configuration is a set of MiniLMHarmParams overrides (features, pooled layers, head, training
mix, per-source balancing, the refusal-keyword feature). For each, the head is trained once per
held-out fold on the other sources' cached frozen features, and the held-out fold is scored. The
script prints one row per configuration: ROC-AUC on every fold with both classes, accuracy on the
negatives-only folds, and the worst and mean ROC-AUC — the selection criteria (worst first, then
mean), never the score on one set. The refusal-keyword baseline is the first row.

The backbone's features are embedded once per source and cached under
``<cache>/judges/features/`` (the same cache the judge trains from), so a rerun only trains heads.

    OMP_NUM_THREADS=1 python benchmarks/judge_selection.py --out /tmp/selection.json
    python benchmarks/judge_selection.py --only default,old-default

On a busy CPU, use one thread (the default): more threads contending with other jobs is far slower.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from evaluators.judges import loso
from evaluators.judges import minilm_harm as mh
from harness.files.paths import default_cache_dir, resolve_data_dir

# The mix the judge trained on before LOSO selection (judge_data.training_pool): no moderation texts;
# DecodingTrust's RealToxicityPrompts continuations here stand in for its 107 RepNoise rows.
OLD_MIX = ["jbb", "decodingtrust", "pyrit", "beavertails", "harmbench-safe", "safety-tuned-llamas",
           "harmless-tasks", "benign-qa"]
ALL_MIX = [s for s in loso.SOURCES if s != "xstest"]
# The default before this selection (every field that has changed since pinned, so the row stays that judge).
OLD = dict(features="joint+prompt+response", pool_layers=[3, 4, 5, 6], hidden=64, solver="adamw",
           refusal_feature=False, balance="none", train_sources=OLD_MIX)

LR = dict(hidden=0, solver="lbfgs", l2=1e-3)  # logistic regression by L-BFGS: seconds per fold


def _grid() -> dict[str, dict]:
    configs: dict[str, dict] = {
        "default": {},  # the judge as it ships (MiniLMHarmParams' defaults): the row to reproduce
        "old-default": OLD,  # the MLP default before this selection
        "lr": {**OLD, **LR},
        "lr+moderation": {**OLD, **LR, "train_sources": ALL_MIX},
        "lr+balance": {**OLD, **LR, "balance": "source"},
        "lr+refusal": {**OLD, **LR, "refusal_feature": True},
    }
    for features in ("joint", "response", "joint+response"):
        configs[f"lr {features}"] = {**OLD, **LR, "features": features}
    for layers in ([6], [5, 6], [1, 2, 3, 4, 5, 6]):
        configs[f"lr layers {','.join(map(str, layers))}"] = {**OLD, **LR, "pool_layers": layers}
    for l2 in (1e-2, 1e-4):
        configs[f"lr l2={l2:g}"] = {**OLD, **LR, "l2": l2}
    # second round: combine what helped the worst folds in the first
    base = {**OLD, **LR, "refusal_feature": True, "train_sources": ALL_MIX}
    configs["lr+refusal+moderation"] = base
    configs["lr+refusal+moderation+balance"] = {**base, "balance": "source"}
    for features in ("joint+response", "response"):
        configs[f"lr {features}+refusal+moderation+balance"] = {**base, "balance": "source", "features": features}
    configs["lr+refusal+moderation+balance l2=1e-4"] = {**base, "balance": "source", "l2": 1e-4}
    configs["lr joint+response+refusal+moderation+balance l2=1e-4"] = {
        **base, "balance": "source", "features": "joint+response", "l2": 1e-4}
    configs["lr layers 1-6+refusal+moderation+balance"] = {**base, "balance": "source",
                                                           "pool_layers": [1, 2, 3, 4, 5, 6]}
    # third round, around the best of the second (joint+response, refusal feature, moderation, balance)
    best = {**base, "balance": "source", "features": "joint+response"}
    configs["mlp joint+response+refusal+moderation+balance"] = {**best, "hidden": 64, "solver": "adamw"}
    configs["lr joint+response+refusal+moderation+balance l2=3e-3"] = {**best, "l2": 3e-3}
    configs["lr joint+response+refusal+moderation+balance layers 1-6"] = {**best, "pool_layers": [1, 2, 3, 4, 5, 6]}
    configs["lr joint+response+refusal+moderation+balance layers 2-6"] = {**best, "pool_layers": [2, 3, 4, 5, 6]}
    configs["lr joint+response+refusal+moderation+balance layers 4-6"] = {**best, "pool_layers": [4, 5, 6]}
    configs["lr joint+response+refusal+balance (no moderation)"] = {**best, "train_sources": OLD_MIX}
    return configs


CONFIGS: dict[str, dict] = _grid()


def _cell(row: dict) -> str:
    if not row.get("n"):
        return "-"
    if row.get("roc_auc") is None:
        return f"acc {row['accuracy']:.2f}"
    return f"{row['roc_auc']:.3f}"


def print_table(results: dict[str, dict]) -> None:
    folds = [f.name for f in loso.FOLDS]
    short = {f: f.split("+")[0][:12] for f in folds}
    header = f"{'configuration':44s} " + " ".join(f"{short[f]:>12s}" for f in folds) + f" {'worst':>7s} {'mean':>7s}"
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        s = result["summary"]
        cells = " ".join(f"{_cell(result['folds'].get(f, {})):>12s}" for f in folds)
        worst = "n/a" if s["worst_roc_auc"] is None else f"{s['worst_roc_auc']:.3f}"
        mean = "n/a" if s["mean_roc_auc"] is None else f"{s['mean_roc_auc']:.3f}"
        print(f"{name[:44]:44s} {cells} {worst:>7s} {mean:>7s}")
    print("\nfolds: " + "; ".join(f"{f.name} = {'+'.join(f.sources)}" for f in loso.FOLDS))
    print("cells: held-out ROC-AUC; 'acc' = accuracy (specificity) on a negatives-only fold, which has no ROC-AUC")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache-dir", default=None, help="default: $HARNESS_CACHE_DIR or .harness-cache")
    parser.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    parser.add_argument("--skip", default="old-default",
                        help="comma-separated configurations to leave out (default: the MLP, ~minutes per fold)")
    parser.add_argument("--extra", default=None,
                        help='JSON object of more configurations: {"name": {param: value, ...}, ...}')
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write every fold's metrics as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = resolve_data_dir(args.data_dir)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()

    started = time.perf_counter()
    bundle = loso.build_bundle(data_dir, cache_dir)
    print(f"{len(bundle.items)} items, features ready in {time.perf_counter() - started:.0f}s "
          f"({loso.EMBED_CALLS} sources embedded, the rest from the cache)\n")
    results: dict[str, dict] = {"refusal-keywords (baseline)": loso.keyword_loso(bundle)}
    configs = dict(CONFIGS)
    if args.extra:
        configs.update(json.loads(args.extra))
    skip = {n for n in args.skip.split(",") if n}
    names = [n for n in args.only.split(",") if n] or [n for n in configs if n not in skip]
    if unknown := [n for n in names if n not in configs]:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(configs)}")
    for name in names:
        t0 = time.perf_counter()
        params = mh.MiniLMHarmParams(**configs[name])
        results[name] = loso.run_loso(bundle, params)
        results[name]["params"] = configs[name]
        s = results[name]["summary"]
        print(f"  {name}: worst {s['worst_roc_auc']:.3f} ({s['worst_fold']}), mean {s['mean_roc_auc']:.3f} "
              f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    print()
    print_table(results)
    ranked = sorted((n for n in names), key=lambda n: (-results[n]["summary"]["worst_roc_auc"],
                                                       -results[n]["summary"]["mean_roc_auc"]))
    print("\nranked by worst-fold ROC-AUC, then mean (differences under ~0.005 are within seed noise; "
          "prefer the cheaper configuration there):")
    for n in ranked[:5]:
        print(f"  {results[n]['summary']['worst_roc_auc']:.3f} {results[n]['summary']['mean_roc_auc']:.3f}  {n}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=lambda v: None if (
            isinstance(v, float) and math.isnan(v)) else str(v)))


if __name__ == "__main__":
    main()
