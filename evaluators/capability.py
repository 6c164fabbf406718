"""Capability: multiple-choice benchmarks through lm-eval, scored on the already-loaded model.

Offline (the default), the tasks are the harness's own lm-eval configs in ``evaluators/lm_eval_tasks``
(``arc_easy_local``, ``hellaswag_local``, ``truthfulqa_mc1_local``, ``mmlu_local``). They read the
bundle's ``capability_eval/`` files through ``dataset_path: json``; the templates name those files
relative to ``${HARNESS_DATA_DIR}`` and are rendered with absolute paths into the stage's work
directory, and lm-eval indexes only that directory (``include_defaults=False``), not its 14k built-in
tasks. Any other task name (``arc_easy``, ``hellaswag``, ...) is an lm-eval built-in and needs the hub.

Metrics per task: every lm-eval metric with its standard error, e.g.
``{"arc_easy_local": {"acc": 0.6, "acc_stderr": 0.07, "acc_norm": 0.5, "acc_norm_stderr": 0.07,
"n": 50}}``, plus ``mean_acc`` (unweighted mean of the tasks' ``acc``). Records: one small dict per
scored document (task, doc id, target, per-choice log-likelihoods, prediction, correctness).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import math
import random
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from pydantic import Field, field_validator

from harness.api import (
    ConfigError,
    DataError,
    EvalResult,
    HarnessError,
    LoadedModel,
    Params,
    StageContext,
    evaluators,
    file_sha256,
    resolve_data_dir,
    stable_hash,
)

log = logging.getLogger(__name__)

TASK_TEMPLATE_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
DATA_DIR_TOKEN = "${HARNESS_DATA_DIR}"
DEFAULT_TASKS = ["arc_easy_local", "hellaswag_local", "truthfulqa_mc1_local", "mmlu_local"]


def local_task_names() -> list[str]:
    """The offline tasks this harness ships (one YAML template each)."""
    return sorted(p.stem for p in TASK_TEMPLATE_DIR.glob("*.yaml"))


class CapabilityParams(Params):
    tasks: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TASKS),
        min_length=1,
        description="lm-eval task names: the offline *_local tasks, or built-in lm-eval tasks (need the hub)",
    )
    limit: int | None = Field(
        None, ge=1, description="documents per task (the first N; None = all). CPU profiles use ~50"
    )
    task_limits: dict[str, int] = Field(
        default_factory=dict,
        description="per-task override of limit, e.g. {truthfulqa_mc1_local: 20} (its prompts are ~7x longer)",
    )
    num_fewshot: int | None = Field(
        None, ge=0, description="few-shot examples per prompt (None: each task's default, 0 for all local tasks)"
    )
    batch_size: int = Field(8, ge=1, description="lm-eval batch size")
    max_length: int | None = Field(
        None, ge=16, description="context length lm-eval truncates to (None: the model's own)"
    )
    bootstrap_iters: int = Field(
        100000, ge=0, description="lm-eval bootstrap iterations for non-mean stderrs (0: no stderr at all)"
    )
    apply_chat_template: bool = Field(
        False, description="wrap prompts in the model's chat template (paper: plain prompts)"
    )
    log_samples: bool = Field(True, description="keep one record per scored document")

    @field_validator("tasks")
    @classmethod
    def _no_duplicates(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) != len(tasks):
            raise ValueError("task names repeat")
        return tasks

    @field_validator("task_limits")
    @classmethod
    def _positive(cls, limits: dict[str, int]) -> dict[str, int]:
        bad = [name for name, n in limits.items() if n < 1]
        if bad:
            raise ValueError(f"limits must be >= 1 ({', '.join(bad)})")
        return limits


# --------------------------------------------------------------------------- task configs


def _template_data_files(text: str) -> list[str]:
    """Bundle-relative data paths a template names (``${HARNESS_DATA_DIR}/x/y.jsonl``)."""
    return re.findall(re.escape(DATA_DIR_TOKEN) + r"/([^\"'\s]+)", text)


def render_local_tasks(names: list[str], data_dir: Path, target_dir: Path) -> dict[str, dict[str, Any]]:
    """Write the named task templates into ``target_dir`` with absolute data paths.

    Returns, per task, its fingerprint (template text, hook source, data file hashes) for results.json;
    raises DataError naming the missing file when the bundle lacks one.
    """
    known = local_task_names()
    target_dir.mkdir(parents=True, exist_ok=True)
    utils_sha = file_sha256(TASK_TEMPLATE_DIR / "utils.py")
    absolute = str(data_dir.resolve())
    if '"' in absolute or "\\" in absolute:
        raise DataError(f"The data directory path {absolute!r} contains a quote or backslash; move or link it.")
    fingerprints: dict[str, dict[str, Any]] = {}
    for name in names:
        if name not in known:
            raise ConfigError(f"{name!r} is not a local lm-eval task; local tasks: {', '.join(known)}.")
        text = (TASK_TEMPLATE_DIR / f"{name}.yaml").read_text(encoding="utf-8")
        data_files = {}
        for relative in _template_data_files(text):
            path = data_dir / relative
            if not path.is_file():
                raise DataError(
                    f"lm-eval task {name!r} needs {path}, which does not exist. Point --data-dir / "
                    "$HARNESS_DATA_DIR at the offline bundle, or choose other capability.tasks."
                )
            data_files[relative] = file_sha256(path)
        (target_dir / f"{name}.yaml").write_text(text.replace(DATA_DIR_TOKEN, absolute), encoding="utf-8")
        uses_hooks = "evaluators.lm_eval_tasks.utils" in text
        fingerprints[name] = {
            "template_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),  # = sha256sum of the YAML
            "hooks_sha256": utils_sha if uses_hooks else None,
            "data_files": data_files,
        }
        fingerprints[name]["fingerprint"] = stable_hash(fingerprints[name])
    return fingerprints


def capability_data_files(params: CapabilityParams) -> list[str]:
    """Bundle-relative files the selected local tasks read (for the stage's cache key)."""
    local = set(local_task_names())
    files = set()
    for name in params.tasks:
        if name in local:
            files.update(_template_data_files((TASK_TEMPLATE_DIR / f"{name}.yaml").read_text(encoding="utf-8")))
    return sorted(files)


# --------------------------------------------------------------------------- plumbing


@contextmanager
def _preserved_rng() -> Iterator[None]:
    """lm-eval seeds python/numpy/torch globally; give later stages their own state back."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _stderr(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _task_metrics(results: dict[str, Any], task: str) -> dict[str, Any]:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s}`` → ``{"acc": x, "acc_stderr": s, "n": N}``."""
    out: dict[str, Any] = {}
    for key, value in results["results"].get(task, {}).items():
        if "," not in key:  # alias, sample_len and other non-metric fields
            continue
        metric, filter_name = key.split(",", 1)
        name = metric if filter_name == "none" else f"{metric}[{filter_name}]"
        out[name] = _stderr(value) if metric.endswith("_stderr") else float(value)
    n = results.get("n-samples", {}).get(task, {})
    if n:
        out["n"] = int(n.get("effective", n.get("original", 0)))
    return out


def _records(results: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """One JSON-able line per scored document; no prompts or documents (they are in the data files)."""
    rows = []
    for sample in results.get("samples", {}).get(task, []):
        row: dict[str, Any] = {"task": task, "doc_id": sample.get("doc_id")}
        target = sample.get("target")
        row["target"] = target if isinstance(target, (int, str)) else str(target)
        responses = sample.get("filtered_resps") or []
        if responses and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in responses):
            # multiple choice: (log-likelihood, is_greedy) per choice
            lls = [round(float(r[0]), 4) for r in responses]
            row["loglikelihoods"] = lls
            row["pred"] = max(range(len(lls)), key=lls.__getitem__)
        else:
            row["responses"] = [str(r)[:500] for r in responses]
        for metric in sample.get("metrics", []):
            if metric in sample:
                row[metric] = sample[metric]
        row["doc_hash"] = sample.get("doc_hash")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the evaluator


@evaluators.register(
    "capability",
    headline="mean_acc",
    params=CapabilityParams,
    description="lm-eval multiple-choice benchmarks (ARC-Easy, HellaSwag, TruthfulQA MC1, MMLU; offline configs)",
    data_files=capability_data_files,
    profiles={"cpu": {"limit": 20, "task_limits": {"truthfulqa_mc1_local": 10}}, "paper": {"limit": None}},
)
def capability(model: LoadedModel, params: CapabilityParams, ctx: StageContext) -> EvalResult:
    """Score the loaded model on lm-eval tasks; the model is left as it was found."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    local_names = set(local_task_names())
    local = [t for t in params.tasks if t in local_names]
    builtin = [t for t in params.tasks if t not in local_names]
    for name in builtin:
        if name.endswith("_local"):  # a typo of a local task: fail before indexing lm-eval's built-ins
            close = difflib.get_close_matches(name, sorted(local_names), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"capability.tasks: no local task {name!r}.{hint} Local: {', '.join(sorted(local_names))}."
            )

    task_dir = Path(ctx.workdir) / "lm_eval_tasks"
    fingerprints: dict[str, Any] = {}
    if local:
        data_dir = Path(getattr(ctx.data, "data_dir", None) or resolve_data_dir())
        fingerprints = render_local_tasks(local, data_dir, task_dir)
    task_manager = TaskManager(
        include_path=str(task_dir) if local else None,
        include_defaults=bool(builtin),  # indexing lm-eval's ~14k built-in configs takes seconds
    )
    unknown = [t for t in builtin if t not in task_manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"capability.tasks: unknown lm-eval task(s) {', '.join(map(repr, unknown))}. Offline tasks: "
            f"{', '.join(sorted(local_names))}; any lm-eval built-in name works with hub access."
        )
    if builtin:
        log.info("capability: built-in lm-eval tasks %s read their data from the hub", builtin)

    samples = None
    if params.task_limits:  # lm-eval has one global limit; per-task sizes go through `samples` (doc ids)
        stray = sorted(set(params.task_limits) - set(params.tasks))
        if stray:
            raise ConfigError(f"capability.task_limits names tasks not in capability.tasks: {', '.join(stray)}.")
        leaves = task_manager.load(list(params.tasks))["tasks"]
        samples = {}
        for name, task in leaves.items():
            n = params.task_limits.get(name, params.limit)
            if n is not None:
                samples[name] = list(range(min(n, len(task.eval_docs))))

    torch_model = model.model
    was_training = torch_model.training
    lm = HFLM(
        pretrained=torch_model,
        tokenizer=model.tokenizer,
        batch_size=params.batch_size,
        max_length=params.max_length,
        softmax_dtype=torch.float32,  # log-probabilities in float32 even for a bfloat16 model
    )
    start = time.perf_counter()
    try:
        with _preserved_rng():
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(params.tasks),
                num_fewshot=params.num_fewshot,
                limit=None if samples is not None else params.limit,
                samples=samples,
                bootstrap_iters=params.bootstrap_iters,
                log_samples=params.log_samples,
                apply_chat_template=params.apply_chat_template,
                task_manager=task_manager,
            )
    except (FileNotFoundError, ConnectionError) as exc:
        raise HarnessError(
            f"lm-eval could not read a task's data ({exc}). Offline, use the *_local tasks "
            f"({', '.join(sorted(local_names))})."
        ) from None
    finally:
        torch_model.train(was_training)
    wall = time.perf_counter() - start
    if results is None:  # non-zero rank in a distributed launch
        raise HarnessError("lm-eval returned no results (not the main process?).")

    metrics: dict[str, Any] = {task: _task_metrics(results, task) for task in params.tasks}
    accs = [m["acc"] for m in metrics.values() if isinstance(m.get("acc"), float)]
    metrics["mean_acc"] = sum(accs) / len(accs) if accs else None
    # samples are keyed by leaf task (a built-in group such as `mmlu` has one entry per subject)
    records = [r for task in results.get("samples", {}) for r in _records(results, task)]
    n_docs = sum(int(m.get("n", 0)) for k, m in metrics.items() if isinstance(m, dict))
    ctx.add_stat("capability_seconds", wall)
    info = {
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "tasks": {
            task: {
                "source": "local" if task in local_names else "lm-eval built-in (hub)",
                "version": results.get("versions", {}).get(task),
                "n_shot": results.get("n-shot", {}).get(task),
                "higher_is_better": results.get("higher_is_better", {}).get(task),
                **fingerprints.get(task, {}),
            }
            for task in params.tasks
        },
        "settings": params.model_dump(mode="json"),
        "documents": n_docs,
        "wall_seconds": round(wall, 2),
    }
    return EvalResult(metrics=metrics, records=records, info=info)
