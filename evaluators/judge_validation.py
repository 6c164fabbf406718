"""How well a harmfulness judge agrees with labels it was never trained on.

``validate_judge(judge, data_dir)`` scores two held-out sets (see :mod:`evaluators.judges.judge_data`):

- ``xstest``: 2,250 XSTest v2 completions with human labels (harmful = unsafe prompt and full
  compliance): accuracy and macro-F1 at threshold 0.5, ROC-AUC, calibration (ECE, 10 equal-width
  bins; Brier score), positive/negative counts.
- ``xstest_heldout`` and ``xstest_heldout_unsafe``: the same metrics on the half of XSTest's prompts
  that a judge may not calibrate on (:func:`judge_data.is_xstest_calibration_prompt`), all of them
  and only the unsafe ones. The latter is the harness's own condition (it scores answers to harmful
  prompts, and reports their mean P(harmful)), so its ECE and mean score against the true rate are
  the calibration figures that matter.
- ``llamaguard2_jbb``: responses to held-out JailbreakBench prompts: agreement (accuracy) and
  Cohen's kappa with LlamaGuard2's verdicts, ROC-AUC, and calibration against those verdicts (ECE,
  mean score beside the unsafe rate): answers of models that comply, as attacked models do.
- Every block above carries ``confusion``: ``{"tp", "fp", "tn", "fn"}`` at threshold 0.5 (harmful = 1).
- ``harm_condition``: sensitivity and specificity (each ``{"value", "ci95", "k", "n"}``, Wilson
  interval) at 0.5 where the harness scores, answers to harmful prompts: the XSTest unsafe held-out
  half and the held-out JBB answers, pooled (``confusion``) and per set (``sets``). With them a
  measured harm rate p can be corrected for judge error (Rogan–Gladen: (p + spec − 1) / (sens + spec − 1)).
- ``loso`` (judges with a ``loso_validation`` method, i.e. minilm-harm in head mode): leave-one-source-out
  validation over every labelled source of the bundle (:mod:`evaluators.judges.loso`): per held-out
  source ROC-AUC, accuracy at 0.5, ECE, mean score beside the true rate, n, confusion counts; and the
  worst and mean ROC-AUC in ``summary``.

``run_validation(name, ctx)`` is what ``harness judge validate --judge NAME`` runs: it builds the
judge through the registry, validates it (or reuses the metrics the judge measured when it was
trained, if they came from this same code and data) and stores the JSON at
``<cache>/judges/validation/<name>-<version>.json``.

The metrics are plain numpy, each with its definition in the docstring.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evaluators.judges.metrics import (  # noqa: F401 (re-exported: the metrics live beside the judges)
    ECE_BINS,
    THRESHOLD,
    accuracy,
    binary_metrics,
    brier_score,
    cohen_kappa,
    confusion_counts,
    expected_calibration_error,
    f1_score,
    macro_f1,
    roc_auc,
)
from harness.api import Judge, file_sha256, stable_hash, write_json

log = logging.getLogger(__name__)

METRICS_VERSION = "judge-validation/4"  # bump when a metric or a validation set changes


# -- validation ------------------------------------------------------------------------------------
def validation_fingerprint(data_dir: Path) -> str:
    """Identity of the validation data and code (what a stored result is valid for)."""
    from evaluators.judges import judge_data, loso

    names = set(judge_data.VALIDATION_FILES) | {f for s in loso.SOURCES.values() for f in s.files}
    files = {f: file_sha256(Path(data_dir) / f) for f in sorted(names) if (Path(data_dir) / f).exists()}
    return stable_hash({"metrics": METRICS_VERSION, "files": files, "loso": loso.LOSO_VERSION,
                        "loso_features": loso.FEATURES_VERSION,
                        "jbb_fraction": judge_data.JBB_VALIDATION_FRACTION, "rule": judge_data.XSTEST_RULE,
                        "calibration_fraction": judge_data.XSTEST_CALIBRATION_FRACTION})


def validate_judge(judge: Judge, data_dir: Path) -> dict[str, Any]:
    """Score both held-out sets with ``judge`` and compute their metrics (see the module docstring)."""
    from evaluators.judges import judge_data

    data_dir = Path(data_dir)
    xstest = judge_data.xstest_validation(data_dir)
    jbb = judge_data.jbb_validation(data_dir)
    xs_scores = judge.score([x.prompt for x in xstest], [x.response for x in xstest])
    jbb_scores = judge.score([x.prompt for x in jbb], [x.response for x in jbb])

    xs_metrics = binary_metrics([x.label for x in xstest], xs_scores)
    xs_metrics["rule"] = judge_data.XSTEST_RULE
    xs_metrics["prompts"] = len({x.prompt for x in xstest})
    unsafe = judge_data.xstest_unsafe_prompts(data_dir)
    heldout = [i for i, x in enumerate(xstest) if not judge_data.is_xstest_calibration_prompt(x.prompt)]
    heldout_unsafe = [i for i in heldout if xstest[i].prompt in unsafe]
    subsets = {}
    for name, index in (("xstest_heldout", heldout), ("xstest_heldout_unsafe", heldout_unsafe)):
        subsets[name] = binary_metrics([xstest[i].label for i in index], [xs_scores[i] for i in index])
        subsets[name]["prompts"] = len({xstest[i].prompt for i in index})
    lg_labels = [x.label for x in jbb]
    lg_predicted = [int(s > THRESHOLD) for s in jbb_scores]
    lg_metrics = {
        "confusion": confusion_counts(lg_labels, lg_predicted),
        "n": len(jbb),
        "prompts": len({x.prompt for x in jbb}),
        "llamaguard_unsafe": int(sum(lg_labels)),
        "agreement": accuracy(lg_labels, lg_predicted),
        "cohen_kappa": cohen_kappa(lg_labels, lg_predicted),
        "roc_auc": roc_auc(lg_labels, jbb_scores),
        # calibration against LlamaGuard2 at a high unsafe rate, as after an attack
        "ece": expected_calibration_error(lg_labels, jbb_scores),
        "mean_score": float(np.mean(jbb_scores)) if jbb_scores else math.nan,
        "llamaguard_unsafe_rate": float(np.mean(lg_labels)) if lg_labels else math.nan,
    }
    condition = {
        "xstest_heldout_unsafe": ([xstest[i].label for i in heldout_unsafe], [xs_scores[i] for i in heldout_unsafe]),
        "llamaguard2_jbb": (lg_labels, list(jbb_scores)),
    }
    result = {
        "metrics_version": METRICS_VERSION,
        "validation_fingerprint": validation_fingerprint(data_dir),
        "xstest": xs_metrics,
        **subsets,
        "llamaguard2_jbb": lg_metrics,
        "harm_condition": error_rates(condition),
    }
    loso_hook = getattr(judge, "loso_validation", None)
    if callable(loso_hook):
        measured = loso_hook(data_dir)
        if measured is not None:
            result["loso"] = measured
    return result


def _rate(numerator: int, denominator: int) -> dict[str, Any]:
    from harness.api import wilson_ci

    if not denominator:
        return {"value": math.nan, "ci95": [math.nan, math.nan], "k": numerator, "n": denominator}
    value, lo, hi = wilson_ci(numerator, denominator)
    return {"value": value, "ci95": [lo, hi], "k": numerator, "n": denominator}


def error_rates(sets: dict[str, tuple[Sequence[int], Sequence[float]]],
                threshold: float = THRESHOLD) -> dict[str, Any]:
    """Sensitivity and specificity at ``threshold`` where the harness scores (answers to harmful prompts).

    sensitivity = TP / (TP + FN) (harmful answers called harmful), specificity = TN / (TN + FP);
    each with a Wilson 95% interval. ``pooled`` adds the sets' confusion counts; ``sets`` has each
    one. A later step corrects a measured harm rate p for judge error with Rogan–Gladen:
    (p + specificity − 1) / (sensitivity + specificity − 1).
    """
    per_set = {}
    total = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for name, (labels, scores) in sets.items():
        counts = confusion_counts(labels, [int(s > threshold) for s in scores])
        per_set[name] = {"confusion": counts, "sensitivity": _rate(counts["tp"], counts["tp"] + counts["fn"]),
                         "specificity": _rate(counts["tn"], counts["tn"] + counts["fp"])}
        for k in total:
            total[k] += counts[k]
    return {
        "threshold": threshold,
        "definition": "answers to harmful prompts: XSTest unsafe prompts (held-out half, human labels) and "
                      "held-out JailbreakBench answers (LlamaGuard2 labels); harmful = 1",
        "confusion": total,
        "sensitivity": _rate(total["tp"], total["tp"] + total["fn"]),
        "specificity": _rate(total["tn"], total["tn"] + total["fp"]),
        "sets": per_set,
    }


def _data_dir_of(ctx: Any) -> Path:
    from harness.api import resolve_data_dir

    data_dir = getattr(getattr(ctx, "data", None), "data_dir", None)
    return resolve_data_dir(data_dir)


def run_validation(
    judge_name: str, ctx: Any, params: dict[str, Any] | None = None, refresh: bool = False
) -> dict[str, Any]:
    """Build judge ``judge_name`` (with ``params``, else its defaults), validate it, store and return the metrics.

    The result is cached at ``ctx.cache_dir/judges/validation/<name>-<version>.json``; ``refresh``
    recomputes it. Metrics the judge measured itself when it was trained are reused when they
    came from this validation code and data.
    """
    from harness.api import judges

    plugin = judges.get(judge_name)
    judge = plugin.fn(plugin.parse_params(params, f"judge.{judge_name}"), ctx)
    described = judge.describe()
    version = str(described.get("version", "unversioned"))
    data_dir = _data_dir_of(ctx)
    path = Path(ctx.cache_dir) / "judges" / "validation" / f"{judge_name}-{version}.json"
    fingerprint = validation_fingerprint(data_dir)
    if path.exists() and not refresh:
        stored = json.loads(path.read_text())
        if stored.get("validation_fingerprint") == fingerprint:
            return stored
    own = described.get("validation")
    if not refresh and isinstance(own, dict) and own.get("validation_fingerprint") == fingerprint:
        metrics = dict(own)
    else:
        metrics = validate_judge(judge, data_dir)
    metrics = {"judge": judge_name, "version": version,
               **{k: v for k, v in metrics.items() if k not in ("judge", "version")}}
    write_json(path, metrics)
    log.info("Judge %s validation stored at %s", judge_name, path)
    return metrics


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def render_validation(metrics: dict[str, Any]) -> "Group":  # noqa: F821 (rich is imported lazily)
    """The terminal tables of :func:`validate_judge` / :func:`run_validation` output, one after the other."""
    from rich.console import Group

    return Group(*validation_tables(metrics))


def validation_tables(metrics: dict[str, Any]) -> list["Table"]:  # noqa: F821
    """The held-out sets table, then (when measured) the leave-one-source-out table."""
    tables = [_main_table(metrics)]
    if isinstance(metrics.get("loso"), dict):
        tables.append(loso_table(metrics["loso"], f"Leave-one-source-out: {metrics.get('judge', '')}".strip()))
    return tables


def _auc(value: Any) -> str:
    return "n/a (one class)" if value is None else _fmt(value)


def loso_table(loso: dict[str, Any], title: str = "Leave-one-source-out") -> "Table":  # noqa: F821
    """One row per held-out fold: ROC-AUC, accuracy at the threshold, ECE, mean score (true rate), n."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    summary = loso.get("summary", {})
    caption = (f"Worst ROC-AUC {_auc(summary.get('worst_roc_auc'))} ({escape(str(summary.get('worst_fold')))}), "
               f"mean {_auc(summary.get('mean_roc_auc'))}. Each row: head trained on the other sources, scored on "
               f"this one. acc @{loso.get('threshold', THRESHOLD)}; mean score; rate: true harmful rate; harm: "
               "harmful of n. One class: no ROC-AUC.")
    table = Table(title=escape(title), caption=caption, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("held-out source", overflow="fold", min_width=20, ratio=1)
    for column in ("ROC-AUC", "acc", "ECE", "mean", "rate", "n", "harm"):
        table.add_column(column, justify="right", no_wrap=True)
    for name, row in loso.get("folds", {}).items():
        if not row.get("n"):
            table.add_row(escape(name), "n/a", "", "", "", "", "0", "")
            continue
        auc = "n/a" if row.get("roc_auc") is None else _fmt(row.get("roc_auc"))
        table.add_row(escape(name), auc, _fmt2(row.get("accuracy")), _fmt2(row.get("ece")),
                      _fmt2(row.get("mean_score")), _fmt2(row.get("true_rate")), str(row.get("n")),
                      str(row.get("positives")))
    return table


def _with_ci(rate: dict[str, Any]) -> str:
    return f"{_fmt(rate.get('value'))} [{', '.join(_fmt(v) for v in rate.get('ci95', []))}]"


def _fmt2(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _main_table(metrics: dict[str, Any]) -> "Table":  # noqa: F821
    from rich.table import Table

    from harness.api import plain

    title = plain(f"Judge {metrics.get('judge', '')} {metrics.get('version', '')}".strip())
    table = Table(title=title)
    table.add_column("held-out set")
    table.add_column("metric")
    table.add_column("value", justify="right")
    xs = metrics.get("xstest", {})
    rows = [
        ("XSTest (human labels)", "items (harmful / not)",
         f"{xs.get('n')} ({xs.get('positives')} / {xs.get('negatives')})"),
        ("", "accuracy @0.5", _fmt(xs.get("accuracy"))),
        ("", "macro-F1 @0.5", _fmt(xs.get("macro_f1"))),
        ("", "ROC-AUC", _fmt(xs.get("roc_auc"))),
        ("", "ECE (10 bins)", _fmt(xs.get("ece"))),
        ("", "Brier", _fmt(xs.get("brier"))),
    ]
    # The harness's own condition: answers to harmful prompts, on the half no judge calibrates on.
    unsafe = metrics.get("xstest_heldout_unsafe", {})
    if unsafe:
        rows += [
            ("XSTest unsafe prompts, held-out half", "items (harmful / not)",
             f"{unsafe.get('n')} ({unsafe.get('positives')} / {unsafe.get('negatives')})"),
            ("", "accuracy @0.5", _fmt(unsafe.get("accuracy"))),
            ("", "ROC-AUC", _fmt(unsafe.get("roc_auc"))),
            ("", "ECE (10 bins)", _fmt(unsafe.get("ece"))),
            ("", "mean score (true rate)",
             f"{_fmt(unsafe.get('mean_score'))} ({_fmt(unsafe.get('positives', 0) / max(1, unsafe.get('n') or 0))})"),
        ]
    lg = metrics.get("llamaguard2_jbb", {})
    rows += [
        ("JBB (LlamaGuard2 labels)", "items (prompts)", f"{lg.get('n')} ({lg.get('prompts')})"),
        ("", "agreement @0.5", _fmt(lg.get("agreement"))),
        ("", "Cohen's kappa", _fmt(lg.get("cohen_kappa"))),
        ("", "ROC-AUC", _fmt(lg.get("roc_auc"))),
    ]
    if "ece" in lg:
        rows += [("", "ECE (10 bins)", _fmt(lg.get("ece"))),
                 ("", "mean score (unsafe rate)",
                  f"{_fmt(lg.get('mean_score'))} ({_fmt(lg.get('llamaguard_unsafe_rate'))})")]
    condition = metrics.get("harm_condition")
    if isinstance(condition, dict):
        c = condition.get("confusion", {})
        sens, spec = condition.get("sensitivity", {}), condition.get("specificity", {})
        rows += [
            ("Answers to harmful prompts (both above)", "TP / FP / TN / FN @0.5",
             f"{c.get('tp')} / {c.get('fp')} / {c.get('tn')} / {c.get('fn')}"),
            ("", "sensitivity [95% CI]", _with_ci(sens)),
            ("", "specificity [95% CI]", _with_ci(spec)),
        ]
    for row in rows:
        table.add_row(*row)
    return table
