"""Trainability: can the (defended) model still learn a harmless task? (PAPER.md §6)

Recipe: fine-tune a deep copy of the model (the evaluated model is never touched) on a GEM data-to-text
task with the shared training loop (1 epoch, lr 8e-5), then generate greedily ``max_new_tokens = 25`` on
the test split and score ROUGE-1 F against the references, before and after fine-tuning.

Text format (PAPER.md §6): training ``"{in_label} {input}\\n{out_label} {target}"`` + EOS, test prompt
``"{in_label} {input}\\n{out_label}"``. Direction and labels follow the authors' released code, which
maps a *description* to its *meaning representation* (in_label ``Description:``, out_label
``Meaning Representation:``); ``direction: data-to-text`` gives the usual GEM direction instead.
No chat template: the paper's format is plain text, whatever the run's ``prompt_format``.

Tasks (files of the offline bundle, ``harmless_tasks/``):
- ``viggo``: viggo_train.csv → viggo_test.csv (GEM ViGGO; 5103 / 1083 rows, columns mr, ref);
- ``e2e``: e2e_devset.csv → e2e_testset_w_refs.csv (the bundle has no E2E train split, so the dev
  set, disjoint from test, is the training set);
- ``dart``: dart_v1.1.1_full_dev.json only, split by tripleset: every 5th entry is test, the rest train
  (not the official DART test split, which the bundle lacks). A tripleset is written
  ``subject : relation : object | ...``.
"""

from __future__ import annotations

import copy
import json
import random
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import Field

from harness.api import (
    IGNORE_INDEX,
    DataError,
    EvalResult,
    GenerationSettings,
    HFBackend,
    LoadedModel,
    RowProblems,
    StageContext,
    TrainSettings,
    causal_lm_loss,
    collate_sft,
    evaluators,
    file_sha256,
    read_csv,
    resolve_data_dir,
    stable_hash,
    train,
)

Direction = Literal["text-to-data", "data-to-text"]
LABELS: dict[str, tuple[str, str]] = {
    "text-to-data": ("Description:", "Meaning Representation:"),  # the authors' code
    "data-to-text": ("Meaning Representation:", "Description:"),
}
TASK_FILES: dict[str, tuple[str, str]] = {
    "viggo": ("harmless_tasks/viggo_train.csv", "harmless_tasks/viggo_test.csv"),
    "e2e": ("harmless_tasks/e2e_devset.csv", "harmless_tasks/e2e_testset_w_refs.csv"),
    "dart": ("harmless_tasks/dart_v1.1.1_full_dev.json", "harmless_tasks/dart_v1.1.1_full_dev.json"),
}
DART_TEST_EVERY = 5


class TrainabilityParams(TrainSettings):
    task: Literal["viggo", "e2e", "dart"] = Field("viggo", description="GEM data-to-text task (paper: viggo first)")
    direction: Direction = Field(
        "text-to-data", description="text-to-data: description → meaning representation (authors' code)"
    )
    in_label: str | None = Field(None, description="label before the input (None: by direction)")
    out_label: str | None = Field(None, description="label before the target (None: by direction)")
    num_train: int | None = Field(None, ge=1, description="training examples (fixed seeded subset; None: all)")
    num_test: int | None = Field(None, ge=1, description="test items (fixed seeded subset; None: all)")
    data_seed: int = Field(0, description="picks the train/test subsets; fixed so runs with other seeds compare")
    lr: float = Field(8e-5, gt=0, description="peak learning rate (paper: 8e-5)")
    epochs: int = Field(1, ge=1, description="passes over the training examples (paper: 1)")
    batch_size: int = Field(4, ge=1, description="training examples per micro-batch")
    max_length: int = Field(256, ge=8, description="tokens per training example, truncated")
    loss_on: Literal["all", "target"] = Field(
        "all", description="all: LM loss on prompt and target (paper's code); target: target tokens only"
    )
    max_new_tokens: int = Field(25, ge=1, description="greedy new tokens per test prompt (paper: 25)")
    gen_batch_size: int = Field(16, ge=1, description="test prompts per generate() call")
    rouge_stemmer: bool = Field(False, description="Porter stemming in ROUGE (HF evaluate's default: off)")
    keep_outputs: int = Field(1000, ge=0, description="test items whose generations go into the records")


@dataclass(frozen=True)
class Item:
    """One example: the input text, one target, and every reference for the input."""

    input: str
    target: str
    references: tuple[str, ...]


# --------------------------------------------------------------------------- data


def _pairs_csv(path: Path) -> list[tuple[str, str]]:
    problems = RowProblems()
    rows = []
    for line, row in read_csv(path, problems):
        mr, ref = (row.get("mr") or "").strip(), (row.get("ref") or "").strip()
        if mr and ref:
            rows.append((mr, ref))
        else:
            problems.add(path, line, "missing mr or ref")
    if not rows:
        raise DataError(f"{path}: no usable (mr, ref) rows ({problems.first() if len(problems) else 'empty'}).")
    return rows


def _dart(path: Path, split: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as fh:
        entries = json.load(fh)
    rows = []
    for index, entry in enumerate(entries):
        if (index % DART_TEST_EVERY == 0) != (split == "test"):
            continue
        mr = " | ".join(" : ".join(str(x) for x in triple) for triple in entry.get("tripleset", []))
        for annotation in entry.get("annotations", []):
            text = (annotation.get("text") or "").strip()
            if mr and text:
                rows.append((mr, text))
    return rows


def task_pairs(task: str, split: str, data_dir: Path) -> list[tuple[str, str]]:
    """(meaning representation, reference text) rows of a task's train or test split."""
    path = data_dir / TASK_FILES[task][0 if split == "train" else 1]
    if not path.is_file():
        raise DataError(f"Trainability task {task!r} needs {path}, which does not exist (check --data-dir).")
    return _dart(path, split) if task == "dart" else _pairs_csv(path)


def make_items(pairs: Sequence[tuple[str, str]], direction: Direction, split: str) -> list[Item]:
    """Training: one item per row. Test: one per distinct input, with every reference for it."""
    oriented = [(ref, mr) if direction == "text-to-data" else (mr, ref) for mr, ref in pairs]
    if split == "train":
        return [Item(i, t, (t,)) for i, t in oriented]
    grouped: OrderedDict[str, list[str]] = OrderedDict()
    for source, target in oriented:
        refs = grouped.setdefault(source, [])
        if target not in refs:
            refs.append(target)
    return [Item(source, refs[0], tuple(refs)) for source, refs in grouped.items()]


def fixed_subset(items: list[Item], n: int | None, seed: int) -> list[Item]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[: n if n is not None else len(order)]]


# --------------------------------------------------------------------------- text and scoring


def prompt_text(item_input: str, in_label: str, out_label: str) -> str:
    return f"{in_label} {item_input}\n{out_label}"


def encode_example(
    tokenizer: Any, item: Item, in_label: str, out_label: str, max_length: int, loss_on: str
) -> dict[str, list[int]]:
    """``prompt`` + `` target`` + EOS, tokenised in two parts so the prompt tokens equal the test prompt's."""
    prompt_ids = list(tokenizer(prompt_text(item.input, in_label, out_label), add_special_tokens=False)["input_ids"])
    target_ids = list(tokenizer(" " + item.target, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    ids = (prompt_ids + target_ids)[:max_length]
    labels = list(ids)
    if loss_on == "target":
        n_prompt = min(len(prompt_ids), len(ids))
        labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
    return {"input_ids": ids, "labels": labels}


def rouge1_f(predictions: Sequence[str], references: Sequence[Sequence[str]], stemmer: bool = False) -> list[float]:
    """ROUGE-1 F per prediction (rouge-score; best over an item's references)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=stemmer)
    return [
        max(scorer.score(ref, pred)["rouge1"].fmeasure for ref in refs)
        for pred, refs in zip(predictions, references)
    ]


def _generate(loaded: LoadedModel, prompts: list[str], params: TrainabilityParams, ctx: StageContext) -> list[str]:
    settings = GenerationSettings(max_new_tokens=params.max_new_tokens, batch_size=params.gen_batch_size)
    return HFBackend(ctx).generate(loaded, prompts, settings)


def trainability_data_files(params: TrainabilityParams) -> list[str]:
    """Bundle-relative files the task reads (for the stage's cache key)."""
    return sorted(set(TASK_FILES[params.task]))


# --------------------------------------------------------------------------- the evaluator


@evaluators.register(
    "trainability",
    headline="rouge1_after",
    params=TrainabilityParams,
    description="ROUGE-1 on a GEM data-to-text task before/after harmless fine-tuning of a copy (PAPER.md §6)",
    data_files=trainability_data_files,
    profiles={"cpu": {"num_train": 64, "num_test": 20}, "paper": {"num_train": None, "num_test": None}},
)
def trainability(model: LoadedModel, params: TrainabilityParams, ctx: StageContext) -> EvalResult:
    default_in, default_out = LABELS[params.direction]
    in_label, out_label = params.in_label or default_in, params.out_label or default_out
    data_dir = Path(getattr(ctx.data, "data_dir", None) or resolve_data_dir())
    train_items = fixed_subset(
        make_items(task_pairs(params.task, "train", data_dir), params.direction, "train"), params.num_train,
        params.data_seed,
    )
    test_items = fixed_subset(
        make_items(task_pairs(params.task, "test", data_dir), params.direction, "test"), params.num_test,
        params.data_seed + 1,
    )
    tokenizer = model.tokenizer
    prompts = [prompt_text(item.input, in_label, out_label) for item in test_items]
    references = [item.references for item in test_items]
    start = time.perf_counter()

    before_outputs = _generate(model, prompts, params, ctx)
    before = rouge1_f(before_outputs, references, params.rouge_stemmer)

    tuned = copy.deepcopy(model.model)  # the evaluated model stays exactly as it was
    if hasattr(tuned, "merge_and_unload"):  # a LoRA-attacked model: fine-tune all merged weights
        tuned = tuned.merge_and_unload()
    tuned.requires_grad_(True)
    examples = [
        encode_example(tokenizer, item, in_label, out_label, params.max_length, params.loss_on) for item in train_items
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = TrainSettings.model_validate(params.model_dump(include=set(TrainSettings.model_fields)))
    report = train(
        tuned,
        examples,
        lambda batch: collate_sft(batch, pad_id, mask_padding=True),
        causal_lm_loss,
        settings,
        ctx,
        description=f"trainability ({params.task})",
    )
    after_outputs = _generate(LoadedModel(tuned, tokenizer, model.ref, model.fingerprint), prompts, params, ctx)
    del tuned
    after = rouge1_f(after_outputs, references, params.rouge_stemmer)
    wall = time.perf_counter() - start

    rouge_before, rouge_after = statistics.fmean(before), statistics.fmean(after)
    metrics = {
        "rouge1_before": rouge_before,
        "rouge1_after": rouge_after,
        "rouge1_delta": rouge_after - rouge_before,
        "n_train": len(train_items),
        "n_test": len(test_items),
        "train_loss_first": report.first_loss,
        "train_loss_last": report.last_loss,
    }
    records = [
        {
            "task": params.task,
            "input": item.input,
            "references": list(item.references),
            "before": b_out,
            "after": a_out,
            "rouge1_before": round(b, 4),
            "rouge1_after": round(a, 4),
        }
        for item, b_out, a_out, b, a in list(zip(test_items, before_outputs, after_outputs, before, after))[
            : params.keep_outputs
        ]
    ]
    data_files = {f: file_sha256(data_dir / f) for f in trainability_data_files(params)}
    info = {
        "format": {
            "train": f"{in_label} {{input}}\\n{out_label} {{target}}<eos>",
            "test_prompt": f"{in_label} {{input}}\\n{out_label}",
            "direction": params.direction,
            "chat_template": False,
        },
        "generation": {"backend": "hf", "greedy": True, "max_new_tokens": params.max_new_tokens},
        "rouge": {"package": "rouge-score", "type": "rouge1 F", "stemmer": params.rouge_stemmer,
                  "multi_reference": "max over references"},
        "data_files": data_files,
        "data_fingerprint": stable_hash({"task": params.task, "direction": params.direction, "files": data_files,
                                         "n_train": len(train_items), "n_test": len(test_items),
                                         "data_seed": params.data_seed}),
        "train": report.summary(),
        "settings": params.model_dump(mode="json"),
        "wall_seconds": round(wall, 2),
    }
    ctx.add_stat("trainability_seconds", wall)
    return EvalResult(metrics=metrics, records=records, info=info)
